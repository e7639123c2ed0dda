//! The controller's state and scheduler: desired deployments, the workers and their GPUs,
//! where every replica is, and the loop that makes the actual state follow the desired one.
//!
//! Everything lives behind one mutex and every change goes through `reconcile`, which:
//! removes replicas past the desired count (unloading them), places pending replicas with
//! `gantry_core::placement` against each GPU's memory net of reservations, reserves the
//! memory before the load command is sent, and releases it when a load fails or a worker is
//! lost. Deployment records are written to the store before an API call returns; placements
//! are written in order by one background writer.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gantry_core::placement::{GpuView, NodeView, PlacedStage, Plan, ReplicaRequest, place, with_margin};
use gantry_core::shard::layer_span;
use gantry_core::units::format_bytes;
use gantry_proto::v1 as pb;
use pb::controller_message::Message as ToWorker;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};
use tonic::Status;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use crate::spec::{DeploymentRecord, DeploymentSpec, SizedModel, check_name, check_replicas, size_model_async};
use crate::store::{Store, StoreError};

/// Events kept per deployment.
const MAX_EVENTS: usize = 50;
/// First wait before a failed load is tried again; doubles per failure up to `MAX_RETRY`.
const FIRST_RETRY: Duration = Duration::from_secs(2);
const MAX_RETRY: Duration = Duration::from_secs(60);
/// Extra time a restored placement's worker has to reconnect after a controller restart
/// (the worker link's longest backoff, plus a little).
const RESTORE_GRACE: Duration = Duration::from_secs(12);

/// How the controller runs.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// A worker silent for this long is lost.
    pub lease: Duration,
    /// How often workers send heartbeats.
    pub heartbeat: Duration,
    /// Safety margin on top of each replica's estimate, in percent.
    pub margin_percent: u64,
    /// How to dial workers that serve TLS (the cluster CA, and the controller's certificate).
    pub worker_tls: Option<tonic::transport::ClientTlsConfig>,
    /// Requests relayed at once; past this, new ones are refused with RESOURCE_EXHAUSTED.
    pub max_requests: usize,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            lease: Duration::from_secs(6),
            heartbeat: Duration::from_secs(1),
            margin_percent: 5,
            worker_tls: None,
            max_requests: 10_000,
        }
    }
}

/// A replica's placement as stored under `placements/NAME/INDEX`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    pub generation: u64,
    pub stages: Vec<PlacedStage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    Pending,
    Loading,
    Ready,
    Failed,
}

#[derive(Debug)]
struct Replica {
    state: ReplicaState,
    placement: Option<PlacementRecord>,
    reason: String,
    progress: String,
    retry_at: Option<Instant>,
    failures: u32,
    /// Load commands in flight: worker → command id (one per worker of the placement).
    commands: BTreeMap<String, u64>,
    /// Workers of the placement that hold their stage.
    loaded: BTreeSet<String>,
    /// Requests the router has sent to it and not seen end.
    inflight: Arc<AtomicU32>,
}

impl Replica {
    fn pending(reason: impl Into<String>) -> Replica {
        Replica {
            state: ReplicaState::Pending,
            placement: None,
            reason: reason.into(),
            progress: String::new(),
            retry_at: None,
            failures: 0,
            commands: BTreeMap::new(),
            loaded: BTreeSet::new(),
            inflight: Arc::new(AtomicU32::new(0)),
        }
    }

    fn on_worker(&self, worker: &str) -> bool {
        self.placement.as_ref().is_some_and(|p| p.stages.iter().any(|s| s.node == worker))
    }

    /// The workers of its placement, in pipeline order, each once.
    fn workers(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in self.placement.iter().flat_map(|p| &p.stages) {
            if !out.contains(&s.node) {
                out.push(s.node.clone());
            }
        }
        out
    }

    /// Whether every worker of its placement holds its stage.
    fn all_loaded(&self) -> bool {
        self.placement.is_some() && self.workers().iter().all(|w| self.loaded.contains(w))
    }

    /// Forgets load progress (a new placement, or none).
    fn clear_loads(&mut self) {
        self.commands.clear();
        self.loaded.clear();
        self.progress.clear();
    }
}

#[derive(Debug)]
struct Deployment {
    record: DeploymentRecord,
    sized: Result<SizedModel, String>,
    replicas: BTreeMap<u32, Replica>,
    events: VecDeque<pb::DeploymentEventRecord>,
}

#[derive(Debug)]
struct Worker {
    id: String,
    address: String,
    version: String,
    labels: BTreeMap<String, String>,
    status: pb::StatusResponse,
    /// The open link's sender; `None` while disconnected.
    tx: Option<mpsc::UnboundedSender<Result<pb::ControllerMessage, Status>>>,
    session: u64,
    last_seen: Instant,
    lost: bool,
    channel: Option<Channel>,
}

/// What a running command is for.
#[derive(Debug, Clone)]
struct Command {
    worker: String,
    deployment: String,
    replica: u32,
}

#[derive(Debug, Default)]
struct State {
    deployments: BTreeMap<String, Deployment>,
    workers: BTreeMap<String, Worker>,
    commands: HashMap<u64, Command>,
    next_command: u64,
    next_session: u64,
    /// The last view of each deployment sent to watchers.
    published: HashMap<String, pb::Deployment>,
    /// Hugging Face tokens for deployments' downloads (from Kubernetes Secrets): kept in
    /// memory only, never in the store.
    hub_tokens: HashMap<String, String>,
}

/// A write for the store, applied in order by the writer task.
#[derive(Debug)]
enum StoreOp {
    Put(String, Vec<u8>),
    Delete(String),
    DeletePrefix(String),
}

/// A ready replica the router may send a request to.
#[derive(Debug, Clone)]
pub struct Target {
    pub worker: String,
    pub model_id: String,
    pub channel: Channel,
    pub inflight: Arc<AtomicU32>,
}

/// The controller's shared state.
#[derive(Debug)]
pub struct Cluster {
    state: Mutex<State>,
    store: Arc<dyn Store>,
    config: ControllerConfig,
    writes: mpsc::UnboundedSender<StoreOp>,
    changes: broadcast::Sender<pb::DeploymentEvent>,
    /// Turns true when the controller stops: long-lived streams (worker links, watches) end.
    closing: watch::Sender<bool>,
    started: Instant,
}

/// How often writes the store refused are tried again.
const WRITE_RETRY: Duration = Duration::from_secs(1);

/// Writes placements and worker records to the store in the background. A write the store
/// refuses (etcd unreachable) is kept and tried again until it lands, the latest for each key
/// winning, so the store catches up with what happened while it was away. Keys are written in
/// order, so a prefix's removal lands before later writes under it.
async fn write_behind(store: Arc<dyn Store>, mut rx: mpsc::UnboundedReceiver<StoreOp>) {
    let mut pending: BTreeMap<String, StoreOp> = BTreeMap::new();
    let mut failing = false;
    loop {
        // `None`: time to retry what is pending.
        let received = if pending.is_empty() {
            Some(rx.recv().await)
        } else {
            tokio::time::timeout(WRITE_RETRY, rx.recv()).await.ok()
        };
        match received {
            Some(None) => return,
            Some(Some(op)) => {
                queue_write(&mut pending, op);
                while let Ok(op) = rx.try_recv() {
                    queue_write(&mut pending, op);
                }
            }
            None => {}
        }
        while let Some((key, op)) = pending.pop_first() {
            let result = match &op {
                StoreOp::Put(k, value) => store.put(k, value.clone()).await,
                StoreOp::Delete(k) => store.delete(k).await.map(|_| ()),
                StoreOp::DeletePrefix(prefix) => store.delete_prefix(prefix).await.map(|_| ()),
            };
            if let Err(e) = result {
                if !failing {
                    warn!(key, error = %e, "could not write to the state store; keeping the change to write when it answers");
                    failing = true;
                }
                // The store is away: the rest would fail the same way.
                pending.insert(key, op);
                break;
            }
        }
        if failing && pending.is_empty() {
            info!("the state store answers again; the changes made meanwhile are written");
            failing = false;
        }
    }
}

/// Adds a write to those pending: the latest for a key replaces an earlier one, and a prefix's
/// removal replaces pending writes under it.
fn queue_write(pending: &mut BTreeMap<String, StoreOp>, op: StoreOp) {
    let key = match &op {
        StoreOp::Put(k, _) | StoreOp::Delete(k) => k.clone(),
        StoreOp::DeletePrefix(prefix) => {
            pending.retain(|k, _| !k.starts_with(prefix.as_str()));
            prefix.clone()
        }
    };
    pending.insert(key, op);
}

/// A replica state as people read it: `Pending`, `Loading`, `Ready`, `Failed`.
pub fn replica_state_name(state: i32) -> &'static str {
    match pb::ReplicaState::try_from(state) {
        Ok(pb::ReplicaState::Pending) => "Pending",
        Ok(pb::ReplicaState::Loading) => "Loading",
        Ok(pb::ReplicaState::Ready) => "Ready",
        Ok(pb::ReplicaState::Failed) => "Failed",
        _ => "Unknown",
    }
}

/// The model id a replica is loaded under on its worker: `NAME/INDEX`.
pub fn replica_model_id(deployment: &str, index: u32) -> String {
    format!("{deployment}/{index}")
}

/// The deployment and replica of a model id the controller loaded, if it is one.
fn parse_replica_model_id(id: &str) -> Option<(&str, u32)> {
    let (name, index) = id.split_once('/')?;
    check_name(name).ok()?;
    Some((name, index.parse().ok()?))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Unavailable(m) => Status::unavailable(format!(
            "the state store is unreachable, so changes are refused until it answers (requests are still served on the last known state): {m}"
        )),
        StoreError::Busy(m) => Status::failed_precondition(m),
        StoreError::Backend(m) => Status::internal(format!("the state store failed: {m}")),
    }
}

impl Cluster {
    /// Loads the deployments and placements in `store` and starts the writer, lease and
    /// retry tasks. Call after this controller has won leadership.
    pub async fn start(store: Arc<dyn Store>, config: ControllerConfig) -> Result<Arc<Cluster>, StoreError> {
        let (writes, write_rx) = mpsc::unbounded_channel::<StoreOp>();
        let (changes, _) = broadcast::channel(1024);
        let mut state = State::default();
        let started = Instant::now();
        for (key, value) in store.list("deployments/").await? {
            let record: DeploymentRecord = match serde_json::from_slice(&value) {
                Ok(r) => r,
                Err(e) => {
                    warn!(key, error = %e, "skipping an unreadable deployment record");
                    continue;
                }
            };
            let sized = size_model_async(&record.spec).await;
            state.deployments.insert(
                record.name.clone(),
                Deployment { record, sized, replicas: BTreeMap::new(), events: VecDeque::new() },
            );
        }
        for (key, value) in store.list("placements/").await? {
            let Some((name, index)) = key.strip_prefix("placements/").and_then(parse_replica_model_id) else {
                continue;
            };
            let Ok(placement) = serde_json::from_slice::<PlacementRecord>(&value) else { continue };
            let Some(d) = state.deployments.get_mut(name) else {
                // A placement of a deleted deployment: forget it.
                let _ = store.delete(&key).await;
                continue;
            };
            let workers: Vec<&str> = placement.stages.iter().map(|s| s.node.as_str()).collect();
            let mut r = Replica::pending(format!("waiting for {} to reconnect", workers.join(", ")));
            r.state = ReplicaState::Loading;
            r.placement = Some(placement);
            d.replicas.insert(index, r);
        }
        let restored: usize = state.deployments.values().map(|d| d.replicas.len()).sum();
        if !state.deployments.is_empty() {
            info!(
                deployments = state.deployments.len(),
                placements = restored,
                store = %store.describe(),
                "restored state"
            );
        }

        tokio::spawn(write_behind(store.clone(), write_rx));

        let cluster = Arc::new(Cluster {
            state: Mutex::new(state),
            store,
            config,
            writes,
            changes,
            closing: watch::channel(false).0,
            started,
        });
        // Leases, retries and anything waiting on time.
        let weak = Arc::downgrade(&cluster);
        let tick = (cluster.config.lease / 4).clamp(Duration::from_millis(50), Duration::from_millis(500));
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            loop {
                interval.tick().await;
                let Some(c) = weak.upgrade() else { return };
                c.tick();
            }
        });
        Ok(cluster)
    }

    /// Ends the long-lived streams so a graceful stop does not wait on them: every worker
    /// link is closed (workers keep serving and reconnect to whichever controller leads
    /// next) and watches end.
    pub fn shutdown(&self) {
        let _ = self.closing.send(true);
        let mut st = self.lock();
        for w in st.workers.values_mut() {
            w.tx = None;
        }
    }

    /// Turns true when the controller stops.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; keep serving what is there.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lease checks and retries; also runs `reconcile`.
    fn tick(&self) {
        let mut st = self.lock();
        let now = Instant::now();
        let lease = self.config.lease;
        let lost: Vec<String> = st
            .workers
            .values()
            .filter(|w| !w.lost && now.duration_since(w.last_seen) > lease)
            .map(|w| w.id.clone())
            .collect();
        for id in lost {
            self.worker_lost(&mut st, &id);
        }
        // Placements restored from the store whose worker never came back: workers retry a
        // lost controller with a backoff of up to 10 s, so they get that long past the lease.
        if now.duration_since(self.started) > lease + RESTORE_GRACE {
            let known: Vec<String> = st.workers.iter().filter(|(_, w)| !w.lost).map(|(k, _)| k.clone()).collect();
            let mut orphaned = Vec::new();
            for (name, d) in &st.deployments {
                for (&i, r) in &d.replicas {
                    if let Some(p) = &r.placement
                        && let Some(s) = p.stages.iter().find(|s| !known.contains(&s.node))
                    {
                        orphaned.push((name.clone(), i, s.node.clone()));
                    }
                }
            }
            for (name, i, worker) in orphaned {
                let msg = format!("worker {worker} did not come back within its lease; replica {i} is placed again");
                self.release(&mut st, &name, i, ReplicaState::Pending, &msg);
                self.event(&mut st, &name, "WorkerLost", msg);
            }
        }
        self.reconcile(&mut st);
    }

    // ---- Deployments API ----

    /// Creates or updates a deployment; returns its view.
    pub async fn apply(&self, name: &str, spec: DeploymentSpec) -> Result<pb::Deployment, Status> {
        check_name(name)?;
        let sized = size_model_async(&spec).await.map_err(Status::invalid_argument)?;
        let (record, existed) = {
            let st = self.lock();
            match st.deployments.get(name) {
                Some(d) => {
                    let generation = d.record.generation + u64::from(d.record.spec.differs_beyond_replicas(&spec));
                    (DeploymentRecord { spec, generation, ..d.record.clone() }, true)
                }
                None => (DeploymentRecord { name: name.into(), spec, generation: 1, created_ms: now_ms() }, false),
            }
        };
        self.store.put(&format!("deployments/{name}"), to_json(&record)).await.map_err(store_status)?;
        let mut st = self.lock();
        let msg = format!(
            "{} {} replica(s) of {} ({} each: {} estimated + {}% margin)",
            if existed { "updated to" } else { "created with" },
            record.spec.replicas,
            record.spec.source,
            format_bytes(with_margin(sized.bytes, self.config.margin_percent)),
            format_bytes(sized.bytes),
            self.config.margin_percent
        );
        match st.deployments.get_mut(name) {
            Some(d) => {
                d.record = record;
                d.sized = Ok(sized);
            }
            None => {
                st.deployments.insert(
                    name.into(),
                    Deployment { record, sized: Ok(sized), replicas: BTreeMap::new(), events: VecDeque::new() },
                );
            }
        }
        info!(deployment = name, "{msg}");
        self.event(&mut st, name, if existed { "Updated" } else { "Created" }, msg);
        self.reconcile(&mut st);
        Self::view(&st, name, &self.config).ok_or_else(|| Status::internal("the deployment vanished"))
    }

    /// What deployment `name` asks for.
    pub fn spec(&self, name: &str) -> Option<DeploymentSpec> {
        self.lock().deployments.get(name).map(|d| d.record.spec.clone())
    }

    /// Sets (or, with `None`, forgets) the Hugging Face token `name`'s loads carry.
    pub fn set_hub_token(&self, name: &str, token: Option<String>) {
        let mut st = self.lock();
        match token {
            Some(t) => st.hub_tokens.insert(name.to_string(), t),
            None => st.hub_tokens.remove(name),
        };
    }

    pub fn get(&self, name: &str) -> Result<pb::Deployment, Status> {
        let st = self.lock();
        Self::view(&st, name, &self.config).ok_or_else(|| not_found(&st, name))
    }

    pub fn list(&self) -> Vec<pb::Deployment> {
        let st = self.lock();
        st.deployments.keys().filter_map(|n| Self::view(&st, n, &self.config)).collect()
    }

    pub async fn scale(&self, name: &str, replicas: u32) -> Result<pb::Deployment, Status> {
        check_replicas(replicas)?;
        let record = {
            let st = self.lock();
            let d = st.deployments.get(name).ok_or_else(|| not_found(&st, name))?;
            let mut record = d.record.clone();
            record.spec.replicas = replicas;
            record
        };
        self.store.put(&format!("deployments/{name}"), to_json(&record)).await.map_err(store_status)?;
        let mut st = self.lock();
        let Some(d) = st.deployments.get_mut(name) else { return Err(not_found(&st, name)) };
        let before = d.record.spec.replicas;
        d.record.spec.replicas = replicas;
        if before != replicas {
            self.event(&mut st, name, "Scaled", format!("scaled from {before} to {replicas} replica(s)"));
        }
        self.reconcile(&mut st);
        Self::view(&st, name, &self.config).ok_or_else(|| Status::internal("the deployment vanished"))
    }

    pub async fn delete(&self, name: &str) -> Result<(), Status> {
        {
            let st = self.lock();
            if !st.deployments.contains_key(name) {
                return Err(not_found(&st, name));
            }
        }
        self.store.delete(&format!("deployments/{name}")).await.map_err(store_status)?;
        let mut st = self.lock();
        if let Some(d) = st.deployments.remove(name) {
            for (i, r) in d.replicas {
                self.unload_replica(&mut st, name, i, &r);
            }
        }
        let _ = self.writes.send(StoreOp::DeletePrefix(format!("placements/{name}/")));
        st.published.remove(name);
        info!(deployment = name, "deleted");
        let _ = self.changes.send(pb::DeploymentEvent {
            kind: pb::deployment_event::Kind::Deleted as i32,
            deployment: Some(pb::Deployment { name: name.into(), ..Default::default() }),
        });
        Ok(())
    }

    /// The current deployments, and a receiver for every later change.
    pub fn watch(&self) -> (Vec<pb::Deployment>, broadcast::Receiver<pb::DeploymentEvent>) {
        let st = self.lock();
        let rx = self.changes.subscribe();
        (st.deployments.keys().filter_map(|n| Self::view(&st, n, &self.config)).collect(), rx)
    }

    /// Deployed models for `Models/List`.
    pub fn models(&self) -> Vec<pb::DeployedModel> {
        let st = self.lock();
        st.deployments
            .values()
            .map(|d| {
                let ready = d.replicas.values().filter(|r| r.state == ReplicaState::Ready).count() as u32;
                let mut m = pb::DeployedModel {
                    name: d.record.name.clone(),
                    source: d.record.spec.source.clone(),
                    replicas: d.record.spec.replicas,
                    ready_replicas: ready,
                    ..Default::default()
                };
                if let Ok(s) = &d.sized {
                    m.family = s.spec.family.to_string();
                    m.parameters = s.spec.parameters.total;
                    m.context_length = s.options.context.unwrap_or(s.spec.context.length);
                    m.instruct = s.spec.tuning.instruct;
                }
                m
            })
            .collect()
    }

    // ---- Workers ----

    /// A worker registered on a new link; returns its session number.
    pub fn register(
        &self,
        reg: pb::WorkerRegistration,
        tx: mpsc::UnboundedSender<Result<pb::ControllerMessage, Status>>,
    ) -> Result<u64, Status> {
        let id = reg.worker_id.trim().to_string();
        if id.is_empty() {
            return Err(Status::invalid_argument("the worker registered without a worker_id"));
        }
        let status = reg.status.unwrap_or_default();
        let scheme = if reg.tls { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", reg.address))
            .map_err(|e| Status::invalid_argument(format!("worker address `{}`: {e}", reg.address)))?;
        if reg.tls {
            let tls = self.config.worker_tls.clone().ok_or_else(|| {
                Status::failed_precondition(
                    "this worker serves TLS, and this controller has no certificate to dial it with: start the controller with --tls-cert, --tls-key and --tls-client-ca",
                )
            })?;
            endpoint = endpoint.tls_config(tls).map_err(|e| Status::internal(format!("TLS to the worker: {e}")))?;
        }
        let channel = endpoint.connect_timeout(Duration::from_secs(3)).tcp_nodelay(true).connect_lazy();
        let mut st = self.lock();
        st.next_session += 1;
        let session = st.next_session;
        let registered = pb::Registered {
            heartbeat_ms: self.config.heartbeat.as_millis() as u64,
            lease_ms: self.config.lease.as_millis() as u64,
        };
        let _ = tx.send(Ok(pb::ControllerMessage { message: Some(ToWorker::Registered(registered)) }));
        let returning = st.workers.get(&id).map(|w| w.lost);
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
            "address": reg.address, "version": reg.version, "labels": reg.labels, "registered_ms": now_ms(),
        });
        let _ = self.writes.send(StoreOp::Put(format!("workers/{id}"), to_json(&record)));
        st.workers.insert(
            id.clone(),
            Worker {
                id: id.clone(),
                address: reg.address,
                version: reg.version,
                labels: reg.labels.into_iter().collect(),
                status,
                tx: Some(tx),
                session,
                last_seen: Instant::now(),
                lost: false,
                channel: Some(channel),
            },
        );
        self.adopt(&mut st, &id);
        self.reconcile(&mut st);
        Ok(session)
    }

    /// Matches what a (re)registered worker has loaded with what it should have: replicas
    /// placed on it that it has are ready, those it lacks are loaded again, and replicas it
    /// holds that the controller no longer wants are unloaded.
    fn adopt(&self, st: &mut State, worker: &str) {
        let loaded: Vec<String> = st.workers[worker]
            .status
            .models
            .iter()
            .filter_map(|m| m.info.as_ref().map(|i| i.model_id.clone()))
            .collect();
        // Commands sent on an earlier link are void.
        st.commands.retain(|_, c| c.worker != worker);
        let mut want = Vec::new();
        for (name, d) in &mut st.deployments {
            for (&i, r) in &mut d.replicas {
                if !r.on_worker(worker) {
                    continue;
                }
                let id = replica_model_id(name, i);
                r.commands.remove(worker);
                if loaded.contains(&id) {
                    r.loaded.insert(worker.to_string());
                    if r.all_loaded() && r.state != ReplicaState::Ready {
                        r.state = ReplicaState::Ready;
                        r.reason.clear();
                        r.progress.clear();
                    }
                } else {
                    r.loaded.remove(worker);
                    if r.state == ReplicaState::Ready {
                        r.state = ReplicaState::Loading;
                    }
                    want.push((name.clone(), i));
                }
            }
        }
        for (name, i) in want {
            // Reserved already; send the load again.
            self.send_load(st, &name, i, Some(worker));
        }
        let infos: Vec<pb::ModelInfo> =
            st.workers[worker].status.models.iter().filter_map(|m| m.info.clone()).collect();
        for info in infos {
            let id = info.model_id.clone();
            let Some((name, i)) = parse_replica_model_id(&id) else { continue };
            let wanted = st.deployments.get(name).and_then(|d| d.replicas.get(&i)).is_some_and(|r| r.on_worker(worker));
            if wanted {
                continue;
            }
            if self.adopt_loaded(st, worker, name, i, &info) {
                continue;
            }
            info!(worker, model = %id, "unloading a replica the controller no longer wants");
            self.send_unload(st, worker, &id);
        }
    }

    /// Takes a replica a returning worker still holds as the placement of that replica, when
    /// the replica is wanted, not placed anywhere else, and loaded from the current source:
    /// better than unloading it and loading it again.
    fn adopt_loaded(&self, st: &mut State, worker: &str, name: &str, index: u32, info: &pb::ModelInfo) -> bool {
        let Some(gpu) = st.workers.get(worker).and_then(|w| device_index(&w.status, &info.device)) else {
            return false;
        };
        let margin = self.config.margin_percent;
        let Some(d) = st.deployments.get_mut(name) else { return false };
        let Ok(sized) = &d.sized else { return false };
        let bytes = with_margin(sized.bytes, margin);
        let generation = d.record.generation;
        // A stage of a split model is not a replica by itself.
        if info.source != d.record.spec.source || info.layer_start != 0 || info.layer_end != info.num_layers {
            return false;
        }
        let Some(r) = d.replicas.get_mut(&index) else { return false };
        if r.placement.is_some() {
            return false;
        }
        let stage = PlacedStage { node: worker.to_string(), gpu, layers: 0..u64::from(info.num_layers), bytes };
        let record = PlacementRecord { generation, stages: vec![stage] };
        let _ = self.writes.send(StoreOp::Put(format!("placements/{name}/{index}"), to_json(&record)));
        r.placement = Some(record);
        r.state = ReplicaState::Ready;
        r.reason.clear();
        r.progress.clear();
        r.retry_at = None;
        r.clear_loads();
        r.loaded.insert(worker.to_string());
        let msg = format!("replica {index} adopted from {worker}, which still holds it");
        info!(deployment = name, "{msg}");
        self.event(st, name, "Adopted", msg);
        true
    }

    /// A heartbeat from `worker`'s link `session`.
    pub fn heartbeat(&self, worker: &str, session: u64, status: pb::StatusResponse) {
        let mut st = self.lock();
        let Some(w) = st.workers.get_mut(worker) else { return };
        if w.session != session {
            return;
        }
        w.status = status;
        w.last_seen = Instant::now();
        let was_lost = w.lost;
        w.lost = false;
        if was_lost {
            self.adopt(&mut st, worker);
        }
        self.reconcile(&mut st);
    }

    /// Load progress of a command.
    pub fn progress(&self, worker: &str, p: pb::CommandProgress) {
        let mut st = self.lock();
        if let Some(w) = st.workers.get_mut(worker) {
            w.last_seen = Instant::now();
        }
        let Some(c) = st.commands.get(&p.command_id).cloned() else { return };
        let Some(pr) = p.progress else { return };
        if let Some(r) = st.deployments.get_mut(&c.deployment).and_then(|d| d.replicas.get_mut(&c.replica)) {
            r.progress = if pr.total > 0 {
                format!("{} {} {}/{}", pr.stage, pr.item, pr.done, pr.total)
            } else {
                format!("{} {}", pr.stage, pr.item)
            };
        }
        self.publish(&mut st);
    }

    /// The end of a command.
    pub fn command_result(&self, worker: &str, result: pb::CommandResult) {
        let mut st = self.lock();
        let Some(c) = st.commands.remove(&result.command_id) else { return };
        if c.worker != worker {
            return;
        }
        let Some(r) = st.deployments.get_mut(&c.deployment).and_then(|d| d.replicas.get_mut(&c.replica)) else {
            return;
        };
        if r.commands.get(worker) != Some(&result.command_id) {
            return;
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
                self.event(&mut st, &c.deployment, "StageLoaded", msg);
                self.publish(&mut st);
                return;
            }
            r.state = ReplicaState::Ready;
            r.reason.clear();
            r.progress.clear();
            r.failures = 0;
            let msg = if stages > 1 {
                format!("replica {} ready: {stages} stages, the last on {worker} loaded in {load_ms} ms", c.replica)
            } else {
                format!("replica {} ready on {worker} (loaded in {load_ms} ms)", c.replica)
            };
            info!(deployment = %c.deployment, "{msg}");
            self.event(&mut st, &c.deployment, "Loaded", msg);
        } else {
            let code = tonic::Code::from_i32(result.code);
            let msg = format!("replica {} failed to load on {worker}: {} ({code:?})", c.replica, result.error);
            warn!(deployment = %c.deployment, "{msg}");
            // The other stages of a split replica are no use alone.
            self.unload_stages(&mut st, &c.deployment, c.replica, Some(worker));
            self.release(&mut st, &c.deployment, c.replica, ReplicaState::Failed, &msg);
            if let Some(r) = st.deployments.get_mut(&c.deployment).and_then(|d| d.replicas.get_mut(&c.replica)) {
                r.failures += 1;
                let wait = FIRST_RETRY.saturating_mul(1 << r.failures.min(5).saturating_sub(1)).min(MAX_RETRY);
                r.retry_at = Some(Instant::now() + wait);
            }
            crate::metrics::placement_failed("load_failed");
            self.event(&mut st, &c.deployment, "LoadFailed", msg);
        }
        self.reconcile(&mut st);
    }

    /// The link of `worker`'s `session` ended. The worker is lost only when its lease runs out.
    pub fn disconnected(&self, worker: &str, session: u64) {
        let mut st = self.lock();
        if let Some(w) = st.workers.get_mut(worker)
            && w.session == session
        {
            w.tx = None;
            info!(worker, "worker link closed; lost if it does not return within its lease");
        }
    }

    fn worker_lost(&self, st: &mut State, id: &str) {
        let Some(w) = st.workers.get_mut(id) else { return };
        w.lost = true;
        w.tx = None;
        let silent = w.last_seen.elapsed();
        warn!(worker = id, silent_ms = silent.as_millis() as u64, "worker lost: its lease ran out");
        let affected: Vec<(String, u32)> = st
            .deployments
            .iter()
            .flat_map(|(n, d)| d.replicas.iter().filter(|(_, r)| r.on_worker(id)).map(move |(&i, _)| (n.clone(), i)))
            .collect();
        st.commands.retain(|_, c| c.worker != id);
        for (name, i) in affected {
            self.unload_stages(st, &name, i, Some(id));
            let msg = format!(
                "worker {id} lost (silent for {:.1} s, lease {:.1} s); replica {i} is placed again",
                silent.as_secs_f64(),
                self.config.lease.as_secs_f64()
            );
            self.release(st, &name, i, ReplicaState::Pending, &msg);
            self.event(st, &name, "WorkerLost", msg);
        }
    }

    /// Forgets a replica's placement and reservation and sets its state.
    fn release(&self, st: &mut State, name: &str, index: u32, state: ReplicaState, reason: &str) {
        let Some(r) = st.deployments.get_mut(name).and_then(|d| d.replicas.get_mut(&index)) else { return };
        r.placement = None;
        r.clear_loads();
        r.state = state;
        r.reason = reason.to_string();
        let _ = self.writes.send(StoreOp::Delete(format!("placements/{name}/{index}")));
    }

    fn unload_replica(&self, st: &mut State, name: &str, index: u32, r: &Replica) {
        let id = replica_model_id(name, index);
        for worker in r.workers() {
            self.send_unload(st, &worker, &id);
        }
        let _ = self.writes.send(StoreOp::Delete(format!("placements/{name}/{index}")));
    }

    /// Unloads a placed replica's stages from its workers other than `except` (a split replica
    /// losing one stage cannot serve with the others).
    fn unload_stages(&self, st: &mut State, name: &str, index: u32, except: Option<&str>) {
        let Some(r) = st.deployments.get(name).and_then(|d| d.replicas.get(&index)) else { return };
        let workers: Vec<String> = r.workers().into_iter().filter(|w| Some(w.as_str()) != except).collect();
        if workers.len() + usize::from(except.is_some()) < 2 {
            return; // a whole-model replica: nothing else holds it
        }
        let id = replica_model_id(name, index);
        for w in workers {
            self.send_unload(st, &w, &id);
        }
    }

    fn send_unload(&self, st: &mut State, worker: &str, model_id: &str) {
        st.next_command += 1;
        let command_id = st.next_command;
        if let Some(tx) = st.workers.get(worker).and_then(|w| w.tx.as_ref()) {
            let cmd = pb::UnloadCommand {
                command_id,
                request: Some(pb::UnloadModelRequest { model_id: model_id.to_string() }),
            };
            let _ = tx.send(Ok(pb::ControllerMessage { message: Some(ToWorker::Unload(cmd)) }));
        }
    }

    /// Sends the load commands of a placed replica: one per worker of its placement (or only
    /// to `only`), each with the worker's layer segments and the address of the next stage.
    fn send_load(&self, st: &mut State, name: &str, index: u32, only: Option<&str>) {
        let Some(d) = st.deployments.get(name) else { return };
        let source = d.record.spec.source.clone();
        let context = d.record.spec.context_length;
        let wire = d.record.spec.stage_wire_dtype.clone();
        let Some(r) = d.replicas.get(&index) else { return };
        let Some(placement) = r.placement.clone() else { return };
        // Consecutive stages on one worker run in one process: one command for them.
        let mut groups: Vec<(String, Vec<pb::LayerSegment>)> = Vec::new();
        for s in &placement.stages {
            let cpu = st
                .workers
                .get(&s.node)
                .and_then(|w| w.status.gpus.iter().find(|g| g.index == s.gpu))
                .is_some_and(|g| g.source == "cpu");
            let segment = pb::LayerSegment {
                device: if cpu { "cpu".into() } else { format!("gpu:{}", s.gpu) },
                layer_start: s.layers.start as u32,
                layer_end: s.layers.end as u32,
            };
            match groups.last_mut() {
                Some((node, segments)) if *node == s.node => segments.push(segment),
                _ => groups.push((s.node.clone(), vec![segment])),
            }
        }
        let split = groups.len() > 1 || groups.first().is_some_and(|(_, segs)| segs.len() > 1);
        let mut sent = Vec::new();
        let mut waiting = Vec::new();
        for (k, (node, segments)) in groups.iter().enumerate() {
            if only.is_some_and(|o| o != node) {
                continue;
            }
            let next_stage = match groups.get(k + 1) {
                Some((next, _)) => match st.workers.get(next) {
                    Some(w) => w.address.clone(),
                    None => {
                        waiting.push(next.clone());
                        continue;
                    }
                },
                None => String::new(),
            };
            let Some(tx) = st.workers.get(node).and_then(|w| w.tx.clone()) else {
                waiting.push(node.clone());
                continue;
            };
            let request = if split {
                pb::LoadModelRequest {
                    model_id: replica_model_id(name, index),
                    source: source.clone(),
                    context_length: context,
                    segments: segments.clone(),
                    next_stage,
                    wire_dtype: wire.clone(),
                    ..Default::default()
                }
            } else {
                pb::LoadModelRequest {
                    model_id: replica_model_id(name, index),
                    source: source.clone(),
                    device: segments[0].device.clone(),
                    context_length: context,
                    ..Default::default()
                }
            };
            let request =
                pb::LoadModelRequest { hf_token: st.hub_tokens.get(name).cloned().unwrap_or_default(), ..request };
            st.next_command += 1;
            let command_id = st.next_command;
            let cmd = pb::LoadCommand { command_id, request: Some(request) };
            if tx.send(Ok(pb::ControllerMessage { message: Some(ToWorker::Load(cmd)) })).is_ok() {
                st.commands
                    .insert(command_id, Command { worker: node.clone(), deployment: name.to_string(), replica: index });
                sent.push((node.clone(), command_id));
            } else {
                waiting.push(node.clone());
            }
        }
        let Some(r) = st.deployments.get_mut(name).and_then(|d| d.replicas.get_mut(&index)) else { return };
        r.state = ReplicaState::Loading;
        for (node, id) in sent {
            r.commands.insert(node, id);
        }
        r.reason = if !waiting.is_empty() {
            format!("waiting for {} to reconnect", waiting.join(", "))
        } else if split {
            let where_: Vec<String> = placement
                .stages
                .iter()
                .map(|s| format!("{} gpu:{} layers {}", s.node, s.gpu, layer_span(&s.layers)))
                .collect();
            format!("loading {} stages: {}", placement.stages.len(), where_.join(", "))
        } else {
            let s = &placement.stages[0];
            format!("loading on {} gpu:{}", s.node, s.gpu)
        };
    }

    // ---- The scheduler ----

    /// Each GPU as placement sees it: its memory net of what is reserved.
    fn nodes(st: &State) -> Vec<NodeView> {
        // Reservations per (worker, gpu): all, and those the worker's last report does not
        // show yet (its free memory already counts the loaded ones).
        let mut reserved: HashMap<(&str, u32), (u64, u64)> = HashMap::new();
        for (name, d) in &st.deployments {
            for (&i, r) in &d.replicas {
                let Some(p) = &r.placement else { continue };
                let id = replica_model_id(name, i);
                for s in &p.stages {
                    let shown = st.workers.get(&s.node).is_some_and(|w| {
                        w.status.models.iter().any(|m| m.info.as_ref().is_some_and(|info| info.model_id == id))
                    });
                    let e = reserved.entry((s.node.as_str(), s.gpu)).or_default();
                    e.0 += s.bytes;
                    if !shown {
                        e.1 += s.bytes;
                    }
                }
            }
        }
        st.workers
            .values()
            .filter(|w| !w.lost && w.tx.is_some())
            .map(|w| NodeView {
                id: w.id.clone(),
                labels: w.labels.clone(),
                gpus: w
                    .status
                    .gpus
                    .iter()
                    .map(|g| {
                        let (all, unshown) = reserved.get(&(w.id.as_str(), g.index)).copied().unwrap_or_default();
                        GpuView {
                            index: g.index,
                            name: g.name.clone(),
                            total_bytes: g.total_bytes,
                            free_bytes: g.total_bytes.saturating_sub(all).min(g.free_bytes.saturating_sub(unshown)),
                        }
                    })
                    .collect(),
            })
            .collect()
    }

    /// Makes the actual state follow the desired one, then tells watchers what changed.
    fn reconcile(&self, st: &mut State) {
        let names: Vec<String> = st.deployments.keys().cloned().collect();
        let now = Instant::now();
        for name in &names {
            // Replicas past the desired count go, highest first.
            let Some(d) = st.deployments.get_mut(name) else { continue };
            let want = d.record.spec.replicas;
            let extra: Vec<u32> = d.replicas.keys().copied().filter(|&i| i >= want).collect();
            let mut removed = Vec::new();
            for i in extra.into_iter().rev() {
                if let Some(r) = d.replicas.remove(&i) {
                    removed.push((i, r));
                }
            }
            for (i, r) in &removed {
                self.unload_replica(st, name, *i, r);
            }
            let Some(d) = st.deployments.get_mut(name) else { continue };
            // A new generation replaces replicas placed for an older one.
            let generation = d.record.generation;
            let stale: Vec<u32> = d
                .replicas
                .iter()
                .filter(|(_, r)| r.placement.as_ref().is_some_and(|p| p.generation != generation))
                .map(|(&i, _)| i)
                .collect();
            for i in stale {
                let Some(d) = st.deployments.get_mut(name) else { break };
                if let Some(r) = d.replicas.remove(&i) {
                    self.unload_replica(st, name, i, &r);
                }
            }
            let Some(d) = st.deployments.get_mut(name) else { continue };
            for i in 0..want {
                d.replicas.entry(i).or_insert_with(|| Replica::pending("waiting to be placed"));
            }
        }
        // Place what is pending, deployments in name order, replicas in index order.
        for name in &names {
            let pending: Vec<u32> = match st.deployments.get(name) {
                Some(d) => d
                    .replicas
                    .iter()
                    .filter(|(_, r)| {
                        matches!(r.state, ReplicaState::Pending | ReplicaState::Failed)
                            && r.placement.is_none()
                            && r.retry_at.is_none_or(|t| t <= now)
                    })
                    .map(|(&i, _)| i)
                    .collect(),
                None => continue,
            };
            for i in pending {
                self.place_replica(st, name, i);
            }
        }
        self.publish(st);
    }

    fn place_replica(&self, st: &mut State, name: &str, index: u32) {
        let nodes = Self::nodes(st);
        let Some(d) = st.deployments.get(name) else { return };
        let sized = match &d.sized {
            Ok(s) => s.clone(),
            Err(e) => {
                let e = e.clone();
                self.set_pending(st, name, index, &format!("cannot size the model: {e}"));
                return;
            }
        };
        let mut replicas_on_node: BTreeMap<String, u32> = BTreeMap::new();
        for r in d.replicas.values() {
            if let Some(p) = &r.placement
                && let Some(s) = p.stages.first()
            {
                *replicas_on_node.entry(s.node.clone()).or_default() += 1;
            }
        }
        let policy = d.record.spec.policy.clone();
        let generation = d.record.generation;
        let request = ReplicaRequest {
            spec: &sized.spec,
            options: sized.options.clone(),
            policy: &policy,
            margin_percent: self.config.margin_percent,
            replicas_on_node: &replicas_on_node,
        };
        if nodes.is_empty() {
            self.set_pending(st, name, index, "no workers are connected");
            return;
        }
        match place(&nodes, &request) {
            Err(e) => self.set_pending(st, name, index, &format!("cannot size the model: {e}")),
            Ok(Err(unschedulable)) => {
                self.set_pending(st, name, index, &format!("unschedulable: {unschedulable}"));
            }
            Ok(Ok(plan)) => {
                let stages = plan.stages().to_vec();
                let msg = match &plan {
                    Plan::OneGpu { stage } => format!(
                        "replica {index} placed on {} gpu:{} ({} reserved)",
                        stage.node,
                        stage.gpu,
                        format_bytes(stage.bytes)
                    ),
                    _ => {
                        let list: Vec<String> = stages
                            .iter()
                            .map(|s| {
                                format!(
                                    "{} gpu:{} layers {} ({})",
                                    s.node,
                                    s.gpu,
                                    layer_span(&s.layers),
                                    format_bytes(s.bytes)
                                )
                            })
                            .collect();
                        format!("replica {index} split into {} stages: {}", stages.len(), list.join(", "))
                    }
                };
                let record = PlacementRecord { generation, stages };
                let _ = self.writes.send(StoreOp::Put(format!("placements/{name}/{index}"), to_json(&record)));
                if let Some(r) = st.deployments.get_mut(name).and_then(|d| d.replicas.get_mut(&index)) {
                    r.placement = Some(record);
                    r.clear_loads();
                    r.retry_at = None;
                }
                info!(deployment = name, "{msg}");
                self.event(st, name, "Placed", msg);
                self.send_load(st, name, index, None);
            }
        }
    }

    fn set_pending(&self, st: &mut State, name: &str, index: u32, reason: &str) {
        let Some(r) = st.deployments.get_mut(name).and_then(|d| d.replicas.get_mut(&index)) else { return };
        let changed = r.reason != reason;
        r.state = ReplicaState::Pending;
        r.reason = reason.to_string();
        if changed {
            info!(deployment = name, replica = index, "{reason}");
            // Counted once per new reason, not at every re-check.
            let kind = if reason.starts_with("unschedulable") {
                "unschedulable"
            } else if reason.starts_with("cannot size") {
                "cannot_size"
            } else if reason.starts_with("no workers") {
                "no_workers"
            } else {
                "other"
            };
            crate::metrics::placement_failed(kind);
            self.event(st, name, "Pending", format!("replica {index}: {reason}"));
        }
    }

    fn event(&self, st: &mut State, name: &str, kind: &str, message: String) {
        if let Some(d) = st.deployments.get_mut(name) {
            // The same message again (a pending reason re-checked) is not a new event.
            if d.events.back().is_some_and(|e| e.kind == kind && e.message == message) {
                return;
            }
            // Strictly increasing per deployment, so "published up to T" names each event once.
            let at_ms = d.events.back().map_or(0, |e| e.at_ms + 1).max(now_ms());
            d.events.push_back(pb::DeploymentEventRecord { at_ms, kind: kind.into(), message });
            while d.events.len() > MAX_EVENTS {
                d.events.pop_front();
            }
        }
    }

    /// Sends watchers each deployment whose view changed.
    fn publish(&self, st: &mut State) {
        let names: Vec<String> = st.deployments.keys().cloned().collect();
        for name in names {
            let Some(view) = Self::view(st, &name, &self.config) else { continue };
            if st.published.get(&name) == Some(&view) {
                continue;
            }
            st.published.insert(name, view.clone());
            let _ = self
                .changes
                .send(pb::DeploymentEvent { kind: pb::deployment_event::Kind::Changed as i32, deployment: Some(view) });
        }
    }

    fn view(st: &State, name: &str, config: &ControllerConfig) -> Option<pb::Deployment> {
        let d = st.deployments.get(name)?;
        let replica_status: Vec<pb::Replica> = d
            .replicas
            .iter()
            .map(|(&index, r)| pb::Replica {
                index,
                state: match r.state {
                    ReplicaState::Pending => pb::ReplicaState::Pending,
                    ReplicaState::Loading => pb::ReplicaState::Loading,
                    ReplicaState::Ready => pb::ReplicaState::Ready,
                    ReplicaState::Failed => pb::ReplicaState::Failed,
                } as i32,
                stages: r
                    .placement
                    .iter()
                    .flat_map(|p| &p.stages)
                    .map(|s| pb::ReplicaStage {
                        worker_id: s.node.clone(),
                        gpu_index: s.gpu,
                        layer_start: s.layers.start,
                        layer_end: s.layers.end,
                        reserved_bytes: s.bytes,
                    })
                    .collect(),
                reason: r.reason.clone(),
                progress: r.progress.clone(),
            })
            .collect();
        let ready = d.replicas.values().filter(|r| r.state == ReplicaState::Ready).count() as u32;
        let loading = d.replicas.values().any(|r| r.state == ReplicaState::Loading);
        let want = d.record.spec.replicas;
        let phase = if ready >= want {
            "Ready"
        } else if loading {
            "Progressing"
        } else if ready > 0 {
            "Degraded"
        } else {
            "Pending"
        };
        let replica_bytes = d.sized.as_ref().map_or(0, |s| with_margin(s.bytes, config.margin_percent));
        Some(pb::Deployment {
            name: name.to_string(),
            spec: Some(d.record.spec.to_proto()),
            status: Some(pb::DeploymentStatus {
                replicas: d.replicas.len() as u32,
                ready_replicas: ready,
                replica_status,
                observed_generation: d.record.generation,
                events: d.events.iter().cloned().collect(),
                replica_bytes,
                phase: phase.into(),
            }),
            generation: d.record.generation,
            created_ms: d.record.created_ms,
        })
    }

    // ---- Routing and the cluster view ----

    /// Two ready replicas of `model` at random, the less loaded of them (power of two choices),
    /// leaving out `avoid` (replicas that failed this request, as worker and replica id).
    pub fn pick(&self, model: &str, avoid: &[(String, String)]) -> Result<Target, Status> {
        let st = self.lock();
        let d = st.deployments.get(model).ok_or_else(|| not_found(&st, model))?;
        let mut ready: Vec<Target> = Vec::new();
        let mut load: Vec<u64> = Vec::new();
        let mut failed_here = Vec::new();
        for (&i, r) in &d.replicas {
            if r.state != ReplicaState::Ready {
                continue;
            }
            let Some(stage) = r.placement.as_ref().and_then(|p| p.stages.first()) else { continue };
            let Some(w) = st.workers.get(&stage.node).filter(|w| !w.lost) else { continue };
            let Some(channel) = w.channel.clone() else { continue };
            let model_id = replica_model_id(model, i);
            if avoid.iter().any(|(worker, id)| *worker == w.id && *id == model_id) {
                failed_here.push(i);
                continue;
            }
            let queued = w
                .status
                .models
                .iter()
                .find(|m| m.info.as_ref().is_some_and(|info| info.model_id == model_id))
                .map_or(0, |m| u64::from(m.queued));
            load.push(u64::from(r.inflight.load(Ordering::Relaxed)) + queued);
            ready.push(Target { worker: w.id.clone(), model_id, channel, inflight: r.inflight.clone() });
        }
        match ready.len() {
            0 => Err(Status::unavailable(no_replica_reason(model, d, &failed_here))),
            1 => Ok(ready.swap_remove(0)),
            n => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let pick = if load[b] < load[a] { b } else { a };
                Ok(ready.swap_remove(pick))
            }
        }
    }

    /// Every worker with its GPUs, reservations and replicas.
    pub fn workers(&self) -> Vec<pb::WorkerInfo> {
        let st = self.lock();
        let mut per_gpu: HashMap<(&str, u32), (u64, Vec<String>)> = HashMap::new();
        for (name, d) in &st.deployments {
            for (&i, r) in &d.replicas {
                for s in r.placement.iter().flat_map(|p| &p.stages) {
                    let e = per_gpu.entry((s.node.as_str(), s.gpu)).or_default();
                    e.0 += s.bytes;
                    e.1.push(replica_model_id(name, i));
                }
            }
        }
        st.workers
            .values()
            .map(|w| pb::WorkerInfo {
                worker_id: w.id.clone(),
                address: w.address.clone(),
                version: w.version.clone(),
                labels: w.labels.clone().into_iter().collect(),
                gpus: w
                    .status
                    .gpus
                    .iter()
                    .map(|g| {
                        let (reserved, replicas) = per_gpu.get(&(w.id.as_str(), g.index)).cloned().unwrap_or_default();
                        pb::GpuUsage {
                            index: g.index,
                            name: g.name.clone(),
                            total_bytes: g.total_bytes,
                            free_bytes: g.free_bytes,
                            reserved_bytes: reserved,
                            replicas,
                        }
                    })
                    .collect(),
                state: if w.lost {
                    "lost".into()
                } else if w.tx.is_none() {
                    "disconnected".into()
                } else {
                    "ready".into()
                },
                last_seen_ms_ago: w.last_seen.elapsed().as_millis() as u64,
                queue_depth: w.status.queue_depth,
                loaded_models: w
                    .status
                    .models
                    .iter()
                    .filter_map(|m| m.info.as_ref().map(|i| i.model_id.clone()))
                    .collect(),
                gpu_note: w.status.gpu_note.clone(),
            })
            .collect()
    }

    /// The GPUs of the connected workers with their free memory net of reservations, for
    /// `Inspect` and `Select` when the request names none.
    pub fn cluster_gpus(&self) -> Vec<gantry_core::Gpu> {
        let st = self.lock();
        Self::nodes(&st)
            .into_iter()
            .flat_map(|n| {
                n.gpus
                    .into_iter()
                    .map(move |g| gantry_core::Gpu { name: format!("{}/{}", n.id, g.name), memory_bytes: g.free_bytes })
            })
            .collect()
    }
}

/// The inventory index of the device a worker reports a model on (`gpu:N`, `cuda:N`, `cpu`).
fn device_index(status: &pb::StatusResponse, device: &str) -> Option<u32> {
    if let Some(n) = device.strip_prefix("gpu:").or_else(|| device.strip_prefix("cuda:")) {
        return n.parse().ok();
    }
    status.gpus.iter().find(|g| g.source == "cpu").or(status.gpus.first()).map(|g| g.index)
}

fn not_found(st: &State, name: &str) -> Status {
    let names: Vec<&str> = st.deployments.keys().map(String::as_str).collect();
    Status::not_found(if names.is_empty() {
        format!("no deployment named `{name}`; none exists (create one with `gantry deploy`)")
    } else {
        format!("no deployment named `{name}`; deployed: {}", names.join(", "))
    })
}

/// Why a deployment has no ready replica, from its replicas' states.
/// Why no replica of `name` can take a request (`failed_here`: ready replicas that already
/// failed this one).
fn no_replica_reason(name: &str, d: &Deployment, failed_here: &[u32]) -> String {
    if d.record.spec.replicas == 0 {
        return format!("`{name}` is scaled to 0 replicas");
    }
    let mut parts: Vec<String> = Vec::new();
    for (i, r) in &d.replicas {
        let state = match r.state {
            _ if failed_here.contains(i) => "failed this request",
            ReplicaState::Pending => "pending",
            ReplicaState::Loading => "loading",
            ReplicaState::Ready => "ready",
            ReplicaState::Failed => "failed",
        };
        let detail = if !r.progress.is_empty() { &r.progress } else { &r.reason };
        parts.push(if detail.is_empty() {
            format!("replica {i} {state}")
        } else {
            format!("replica {i} {state}: {detail}")
        });
    }
    format!("no ready replica of `{name}`: {}", parts.join("; "))
}
