//! The workers' side of the cluster: a worker registers on its link, sends heartbeats and the
//! results of load commands; a returning worker's replicas are matched with what it holds.

use std::time::{Duration, Instant};

use gantry_core::placement::{PlacedStage, with_margin};
use gantry_proto::v1 as pb;
use pb::controller_message::Message as ToWorker;
use tonic::transport::Endpoint;
use tracing::{info, warn};

use super::events::EventKind;
use super::persist::{StoreOp, to_json};
use super::state::{
    PlacementRecord, ReplicaState, State, Worker, device_index, parse_replica_model_id, replica_model_id,
};
use super::{Cluster, Link, LinkSender};
use crate::clock::unix_ms;
use crate::config::ControllerConfig;
use crate::error::ClusterError;
use crate::scheduler::{self, Effect};

/// A retry wait that doubles per failure: 2 s, 4 s … up to a minute.
pub fn retry_after(failures: u32) -> Duration {
    const FIRST_RETRY: Duration = Duration::from_secs(2);
    const MAX_RETRY: Duration = Duration::from_secs(60);
    FIRST_RETRY.saturating_mul(1 << failures.min(5).saturating_sub(1)).min(MAX_RETRY)
}

/// How a worker's link was authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkAuth {
    /// The credential the worker id is bound to: `certificate sha256:…` (its TLS client
    /// certificate) or `key NAME` (an API key); `None` when nothing authenticated the link.
    pub credential: Option<String>,
    /// Whether secrets may go over the link.
    pub trusted: bool,
}

impl Cluster {
    /// A worker registered on a new link; returns its session number.
    pub fn register(&self, reg: pb::WorkerRegistration, tx: LinkSender) -> Result<u64, ClusterError> {
        self.register_as(reg, tx, LinkAuth { credential: None, trusted: true })
    }

    /// Registers a worker whose link was authenticated as `auth` says. A worker id is bound to
    /// the first credential that registers it: another credential cannot take it over, and no
    /// one can register an id whose worker is connected (its link must end, or its lease run
    /// out, first).
    pub fn register_as(
        &self,
        reg: pb::WorkerRegistration,
        tx: LinkSender,
        auth: LinkAuth,
    ) -> Result<u64, ClusterError> {
        let id = reg.worker_id.trim().to_string();
        if id.is_empty() {
            return Err(ClusterError::Invalid("the worker registered without a worker_id".into()));
        }
        {
            let inner = self.lock();
            if let Some(bound) = inner.state.worker_credentials.get(&id)
                && auth.credential.as_ref() != Some(bound)
            {
                warn!(worker = %id, "refused a registration of a worker id bound to another credential");
                return Err(ClusterError::PermissionDenied(format!(
                    "worker id `{id}` belongs to another credential: a worker registers with the key or certificate it first registered with"
                )));
            }
            if let Some(w) = inner.state.workers.get(&id)
                && w.connected
                && !w.lost
            {
                warn!(worker = %id, "refused a second link for a connected worker");
                return Err(ClusterError::AlreadyExists(format!(
                    "worker `{id}` is connected already: a second link for a live worker is refused (register again once its link ends or its lease runs out)"
                )));
            }
        }
        let status = reg.status.unwrap_or_default();
        let scheme = if reg.tls { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", reg.address))
            .map_err(|e| ClusterError::Invalid(format!("worker address `{}`: {e}", reg.address)))?;
        if reg.tls {
            let tls = self.config.worker_tls.clone().ok_or_else(|| {
                ClusterError::Precondition(
                    "this worker serves TLS, and this controller has no certificate to dial it with: start the controller with --tls-cert, --tls-key and --tls-client-ca".into(),
                )
            })?;
            endpoint =
                endpoint.tls_config(tls).map_err(|e| ClusterError::Internal(format!("TLS to the worker: {e}")))?;
        }
        let channel = endpoint.connect_timeout(Duration::from_secs(3)).tcp_nodelay(true).connect_lazy();
        let mut inner = self.lock();
        inner.state.next_session += 1;
        let session = inner.state.next_session;
        let registered = pb::Registered {
            heartbeat_ms: self.config.heartbeat.as_millis() as u64,
            lease_ms: self.config.lease.as_millis() as u64,
            // A secret: only over a link that proved who it is.
            cluster_token: if auth.trusted { self.worker_token.clone() } else { String::new() },
        };
        let _ = tx.send(Ok(pb::ControllerMessage { message: Some(ToWorker::Registered(registered)) }));
        let returning = inner.state.workers.get(&id).map(|w| w.lost);
        info!(
            worker = %id,
            address = %reg.address,
            gpus = status.gpus.len(),
            loaded = status.models.len(),
            "{}",
            match returning {
                Some(true) => "worker came back after being lost",
                Some(false) => "worker reconnected",
                None => "worker registered",
            }
        );
        let record = serde_json::json!({
            "address": reg.address, "version": reg.version, "labels": reg.labels, "registered_ms": unix_ms(),
            "credential": auth.credential,
        });
        if let Some(c) = &auth.credential {
            inner.state.worker_credentials.insert(id.clone(), c.clone());
        }
        let mut effects = vec![Effect::Persist(StoreOp::Put(format!("workers/{id}"), to_json(&record)))];
        inner.links.insert(id.clone(), Link { tx: Some(tx), channel });
        inner.state.workers.insert(
            id.clone(),
            Worker {
                id: id.clone(),
                address: reg.address,
                version: reg.version,
                labels: reg.labels.into_iter().collect(),
                status,
                connected: true,
                session,
                last_seen: Instant::now(),
                lost: false,
                credential: auth.credential,
                trusted: auth.trusted,
            },
        );
        effects.extend(adopt(&mut inner.state, &self.config, &id));
        self.settle(&mut inner, effects);
        Ok(session)
    }

    /// A heartbeat from `worker`'s link `session`.
    pub fn heartbeat(&self, worker: &str, session: u64, status: pb::StatusResponse) {
        let mut inner = self.lock();
        let link_open = inner.links.get(worker).is_some_and(|l| l.tx.is_some());
        let Some(w) = inner.state.workers.get_mut(worker) else { return };
        if w.session != session {
            return;
        }
        let mut status = status;
        // The prefix-cache key changes go to the index, not into the worker's status.
        let mut loaded = std::collections::HashSet::new();
        for m in &mut status.models {
            let Some(id) = m.info.as_ref().map(|i| i.model_id.clone()) else { continue };
            if let Some(changes) = m.prefix_keys.take() {
                inner.state.prefix.apply(worker, &id, &changes);
            }
            loaded.insert(id);
        }
        inner.state.prefix.retain_loaded(worker, &loaded);
        let measured: Vec<Effect> = inner
            .state
            .record_measurements(status.models.iter().filter_map(|m| m.measurement.as_ref()))
            .into_iter()
            .map(Effect::Persist)
            .collect();
        let Some(w) = inner.state.workers.get_mut(worker) else { return };
        w.status = status;
        w.last_seen = Instant::now();
        let was_lost = w.lost;
        w.lost = false;
        w.connected = link_open;
        let mut effects = measured;
        if was_lost {
            effects.extend(adopt(&mut inner.state, &self.config, worker));
        }
        self.settle(&mut inner, effects);
    }

    /// Load progress of a command.
    pub fn progress(&self, worker: &str, p: pb::CommandProgress) {
        let mut inner = self.lock();
        let st = &mut inner.state;
        if let Some(w) = st.workers.get_mut(worker) {
            w.last_seen = Instant::now();
        }
        let Some(c) = st.commands.get(&p.command_id).cloned() else { return };
        let Some(pr) = p.progress else { return };
        if let Some(r) = st.replica_mut(&c.deployment, c.replica) {
            r.progress = if pr.total > 0 {
                format!("{} {} {}/{}", pr.stage, pr.item, pr.done, pr.total)
            } else {
                format!("{} {}", pr.stage, pr.item)
            };
        }
        self.publish(&mut inner);
    }

    /// The end of a command.
    pub fn command_result(&self, worker: &str, result: pb::CommandResult) {
        let mut inner = self.lock();
        let measured = result.model.as_ref().and_then(|m| m.measurement.as_ref());
        let mut effects: Vec<Effect> =
            inner.state.record_measurements(measured).into_iter().map(Effect::Persist).collect();
        effects.extend(command_result(&mut inner.state, worker, result, Instant::now()));
        self.settle(&mut inner, effects);
    }

    /// The link of `worker`'s `session` ended. The worker is lost only when its lease runs out.
    pub fn disconnected(&self, worker: &str, session: u64) {
        let mut inner = self.lock();
        if let Some(w) = inner.state.workers.get_mut(worker)
            && w.session == session
        {
            w.connected = false;
            if let Some(link) = inner.links.get_mut(worker) {
                link.tx = None;
            }
            info!(worker, "worker link closed; lost if it does not return within its lease");
        }
    }
}

/// A load finished on `worker`: a stage loaded (the replica is ready once all are), or it
/// failed (the replica's other stages are unloaded, its reservation released, and it is tried
/// again after a wait that doubles per failure).
pub fn command_result(st: &mut State, worker: &str, result: pb::CommandResult, now: Instant) -> Vec<Effect> {
    let Some(c) = st.commands.remove(&result.command_id) else { return Vec::new() };
    if c.worker != worker {
        return Vec::new();
    }
    let Some(r) = st.replica_mut(&c.deployment, c.replica) else { return Vec::new() };
    if r.commands.get(worker) != Some(&result.command_id) {
        return Vec::new();
    }
    r.commands.remove(worker);
    if result.code == 0 {
        r.loaded.insert(worker.to_string());
        let load_ms = result.model.as_ref().map_or(0, |m| m.load_ms);
        let stages = r.workers().len();
        if !r.all_loaded() {
            r.reason = format!("{} of {stages} stages loaded", r.loaded.len());
            let msg = format!("replica {}: stage on {worker} loaded in {load_ms} ms", c.replica);
            info!(deployment = %c.deployment, "{msg}");
            st.event(&c.deployment, EventKind::StageLoaded, msg);
            return Vec::new();
        }
        r.set_ready();
        r.failures = 0;
        let msg = if stages > 1 {
            format!("replica {} ready: {stages} stages, the last on {worker} loaded in {load_ms} ms", c.replica)
        } else {
            format!("replica {} ready on {worker} (loaded in {load_ms} ms)", c.replica)
        };
        info!(deployment = %c.deployment, "{msg}");
        st.event(&c.deployment, EventKind::Loaded, msg);
        return Vec::new();
    }
    let code = tonic::Code::from_i32(result.code);
    let msg = format!("replica {} failed to load on {worker}: {} ({code:?})", c.replica, result.error);
    warn!(deployment = %c.deployment, "{msg}");
    // The other stages of a split replica are no use alone.
    let mut effects = scheduler::unload_stages(st, &c.deployment, c.replica, Some(worker));
    effects.extend(scheduler::release(st, &c.deployment, c.replica, ReplicaState::Failed, &msg));
    if let Some(r) = st.replica_mut(&c.deployment, c.replica) {
        r.failures += 1;
        r.retry_at = Some(now + retry_after(r.failures));
    }
    effects.push(Effect::PlacementFailed("load_failed"));
    st.event(&c.deployment, EventKind::LoadFailed, msg);
    effects
}

/// Matches what a (re)registered worker has loaded with what it should have: replicas placed
/// on it that it has are ready, those it lacks are loaded again, and replicas it holds that the
/// controller no longer wants are unloaded (or adopted, when wanted and placed nowhere else).
pub fn adopt(st: &mut State, config: &ControllerConfig, worker: &str) -> Vec<Effect> {
    let Some(w) = st.workers.get(worker) else { return Vec::new() };
    let loaded = w.loaded_ids();
    let infos: Vec<pb::ModelInfo> = w.status.models.iter().filter_map(|m| m.info.clone()).collect();
    // Commands sent on an earlier link are void.
    st.commands.retain(|_, c| c.worker != worker);
    let mut want = Vec::new();
    let (mut ready_again, mut lost) = (Vec::new(), Vec::new());
    for (name, d) in &mut st.deployments {
        for (&i, r) in &mut d.replicas {
            if !r.on_worker(worker) {
                continue;
            }
            r.commands.remove(worker);
            if loaded.contains(&replica_model_id(name, i)) {
                r.loaded.insert(worker.to_string());
                if r.all_loaded() && r.state != ReplicaState::Ready {
                    r.set_ready();
                    ready_again.push((name.clone(), i));
                }
            } else {
                r.loaded.remove(worker);
                if r.state == ReplicaState::Ready {
                    r.state = ReplicaState::Loading;
                    lost.push((name.clone(), i));
                }
                want.push((name.clone(), i));
            }
        }
    }
    // Served again without a load (the worker kept it through a restart or a lost link): the
    // deployment's events say so, as they say every other way a replica becomes ready.
    for (name, i) in lost {
        let msg = format!("replica {i} loading again: {worker} came back without it");
        info!(deployment = %name, "{msg}");
        st.event(&name, EventKind::WorkerLost, msg);
    }
    for (name, i) in ready_again {
        let msg = format!("replica {i} ready again on {worker}, which still holds it");
        info!(deployment = %name, "{msg}");
        st.event(&name, EventKind::Adopted, msg);
    }
    let mut effects = Vec::new();
    for (name, i) in want {
        // Reserved already; send the load again.
        effects.extend(scheduler::load_replica(st, &name, i, Some(worker)));
    }
    for info in infos {
        let Some((name, i)) = parse_replica_model_id(&info.model_id) else { continue };
        let wanted = st.deployments.get(name).and_then(|d| d.replicas.get(&i)).is_some_and(|r| r.on_worker(worker));
        if wanted {
            continue;
        }
        if let Some(more) = adopt_loaded(st, config, worker, name, i, &info) {
            effects.extend(more);
            continue;
        }
        info!(worker, model = %info.model_id, "unloading a replica the controller no longer wants");
        effects.push(scheduler::unload_model(st, worker, &info.model_id));
    }
    effects
}

/// Takes a replica a returning worker still holds as the placement of that replica, when the
/// replica is wanted, not placed anywhere else, and loaded from the current source: better than
/// unloading it and loading it again.
fn adopt_loaded(
    st: &mut State,
    config: &ControllerConfig,
    worker: &str,
    name: &str,
    index: u32,
    info: &pb::ModelInfo,
) -> Option<Vec<Effect>> {
    let gpu = st.workers.get(worker).and_then(|w| device_index(&w.status, &info.device))?;
    let d = st.deployments.get_mut(name)?;
    let bytes = with_margin(d.sized.as_ref().ok()?.bytes, config.margin_percent);
    let generation = d.record.generation;
    // A stage of a split model is not a replica by itself.
    if info.source != d.record.spec.source || info.layer_start != 0 || info.layer_end != info.num_layers {
        return None;
    }
    let r = d.replicas.get_mut(&index)?;
    if r.placement.is_some() {
        return None;
    }
    let stage = PlacedStage {
        node: worker.to_string(),
        gpu,
        layers: 0..u64::from(info.num_layers),
        bytes,
        tp: 0,
        experts_on_host: info.experts_on_host_bytes,
    };
    let record = PlacementRecord { generation, stages: vec![stage] };
    let effects = vec![Effect::Persist(StoreOp::Put(format!("placements/{name}/{index}"), to_json(&record)))];
    r.placement = Some(record);
    r.retry_at = None;
    r.clear_loads();
    r.loaded.insert(worker.to_string());
    r.set_ready();
    let msg = format!("replica {index} adopted from {worker}, which still holds it");
    info!(deployment = name, "{msg}");
    st.event(name, EventKind::Adopted, msg);
    Some(effects)
}
