//! The Deployments API on the cluster: create, update, scale and delete deployments (written
//! to the store before the call returns), read them, and watch them change.

use gantry_core::placement::with_margin;
use gantry_core::units::format_bytes;
use gantry_proto::v1 as pb;
use tokio::sync::broadcast;
use tracing::info;

use super::events::EventKind;
use super::persist::{StoreOp, to_json};
use super::state::Deployment;
use super::{Cluster, view};
use crate::clock::unix_ms;
use crate::error::ClusterError;
use crate::scheduler;
use crate::spec::{DeploymentRecord, DeploymentSpec, check_name, check_replicas, size_model_async};

impl Cluster {
    /// Creates or updates a deployment; returns its view.
    pub async fn apply(&self, name: &str, spec: DeploymentSpec) -> Result<pb::Deployment, ClusterError> {
        check_name(name)?;
        // Whatever the caller names is read by this controller and the workers: only sources
        // the operator allowed (`--model-roots`, `--allow-url-hosts`; Hub ids always).
        gantry_store::policy::current().check(spec.source.trim()).map_err(ClusterError::PermissionDenied)?;
        let sized = size_model_async(&spec).await.map_err(ClusterError::Invalid)?;
        let (record, existed) = {
            let inner = self.lock();
            match inner.state.deployments.get(name) {
                Some(d) => {
                    let generation = d.record.generation + u64::from(d.record.spec.differs_beyond_replicas(&spec));
                    (DeploymentRecord { spec, generation, ..d.record.clone() }, true)
                }
                None => (DeploymentRecord { name: name.into(), spec, generation: 1, created_ms: unix_ms() }, false),
            }
        };
        self.store.put(&format!("deployments/{name}"), to_json(&record)).await?;
        let mut inner = self.lock();
        let margin = self.config.margin_percent;
        let msg = format!(
            "{} {} replica(s) of {} ({} each: {} estimated + {margin}% margin)",
            if existed { "updated to" } else { "created with" },
            record.spec.replicas,
            record.spec.source,
            format_bytes(with_margin(sized.bytes, margin)),
            format_bytes(sized.bytes),
        );
        let st = &mut inner.state;
        match st.deployments.get_mut(name) {
            Some(d) => {
                d.record = record;
                d.sized = Ok(sized);
            }
            None => {
                st.deployments.insert(name.into(), Deployment::new(record, Ok(sized)));
            }
        }
        info!(deployment = name, "{msg}");
        st.event(name, if existed { EventKind::Updated } else { EventKind::Created }, msg);
        self.settle(&mut inner, Vec::new());
        view::deployment(&inner.state, name, &self.config)
            .ok_or_else(|| ClusterError::Internal("the deployment vanished".into()))
    }

    /// What deployment `name` asks for.
    pub fn spec(&self, name: &str) -> Option<DeploymentSpec> {
        self.lock().state.deployments.get(name).map(|d| d.record.spec.clone())
    }

    /// Sets (or, with `None`, forgets) the Hugging Face token `name`'s loads carry.
    pub fn set_hub_token(&self, name: &str, token: Option<String>) {
        let tokens = &mut self.lock().state.hub_tokens;
        match token {
            Some(t) => tokens.insert(name.to_string(), t),
            None => tokens.remove(name),
        };
    }

    pub fn get(&self, name: &str) -> Result<pb::Deployment, ClusterError> {
        let inner = self.lock();
        view::deployment(&inner.state, name, &self.config).ok_or_else(|| view::not_found(&inner.state, name))
    }

    pub fn list(&self) -> Vec<pb::Deployment> {
        let inner = self.lock();
        inner.state.deployments.keys().filter_map(|n| view::deployment(&inner.state, n, &self.config)).collect()
    }

    pub async fn scale(&self, name: &str, replicas: u32) -> Result<pb::Deployment, ClusterError> {
        self.scale_with(name, replicas, None).await
    }

    /// Sets the replica count, written to the store first; the event is `why` (the autoscaler's
    /// decision) or `Scaled`.
    pub(crate) async fn scale_with(
        &self,
        name: &str,
        replicas: u32,
        why: Option<(EventKind, String)>,
    ) -> Result<pb::Deployment, ClusterError> {
        check_replicas(replicas)?;
        let record = {
            let inner = self.lock();
            let d = inner.state.deployments.get(name).ok_or_else(|| view::not_found(&inner.state, name))?;
            let mut record = d.record.clone();
            record.spec.replicas = replicas;
            record
        };
        self.store.put(&format!("deployments/{name}"), to_json(&record)).await?;
        let mut inner = self.lock();
        let st = &mut inner.state;
        let Some(d) = st.deployments.get_mut(name) else { return Err(view::not_found(st, name)) };
        let before = d.record.spec.replicas;
        d.record.spec.replicas = replicas;
        match why {
            Some((kind, message)) => st.event(name, kind, message),
            None if before != replicas => {
                st.event(name, EventKind::Scaled, format!("scaled from {before} to {replicas} replica(s)"));
            }
            None => {}
        }
        self.settle(&mut inner, Vec::new());
        view::deployment(&inner.state, name, &self.config)
            .ok_or_else(|| ClusterError::Internal("the deployment vanished".into()))
    }

    pub async fn delete(&self, name: &str) -> Result<(), ClusterError> {
        {
            let inner = self.lock();
            if !inner.state.deployments.contains_key(name) {
                return Err(view::not_found(&inner.state, name));
            }
        }
        self.store.delete(&format!("deployments/{name}")).await?;
        let mut inner = self.lock();
        let mut effects = Vec::new();
        if let Some(d) = inner.state.deployments.remove(name) {
            for (i, r) in &d.replicas {
                effects.extend(scheduler::unload_replica(&mut inner.state, name, *i, r));
            }
        }
        effects.push(scheduler::Effect::Persist(StoreOp::DeletePrefix(format!("placements/{name}/"))));
        self.carry_out(&mut inner, effects);
        inner.forget_published(name);
        info!(deployment = name, "deleted");
        let _ = self.changes.send(pb::DeploymentEvent {
            kind: pb::deployment_event::Kind::Deleted as i32,
            deployment: Some(pb::Deployment { name: name.into(), ..Default::default() }),
        });
        Ok(())
    }

    /// The current deployments, and a receiver for every later change.
    pub fn watch(&self) -> (Vec<pb::Deployment>, broadcast::Receiver<pb::DeploymentEvent>) {
        let inner = self.lock();
        let rx = self.changes.subscribe();
        let st = &inner.state;
        (st.deployments.keys().filter_map(|n| view::deployment(st, n, &self.config)).collect(), rx)
    }

    /// Deployed models for `Models/List`.
    /// With each its digest (once a replica loaded it) and its memory at the deployment's
    /// context: the estimate, the measurement beside it, the error per term.
    pub fn models(&self) -> Vec<pb::DeployedModel> {
        let here = self.device_kinds();
        let class = self.device_class();
        let inner = self.lock();
        let measured = &inner.state.measurements;
        inner
            .state
            .deployments
            .values()
            .map(|d| {
                let mut m = view::deployed_model(d);
                let of = measured.of(&d.record.spec.source);
                m.digest = of.iter().max_by_key(|m| m.measured_at_ms).map(|m| m.digest.clone()).unwrap_or_default();
                if let Ok(s) = &d.sized
                    && let Ok(e) = gantry_core::estimate_vram(&s.spec, &s.options)
                {
                    let terms = gantry_core::measured::Terms::of(&e);
                    m.memory = Some(super::measured::memory_report(
                        &terms,
                        &of,
                        measured.all(),
                        &here,
                        e.context,
                        e.batch,
                        class,
                    ));
                }
                m
            })
            .collect()
    }
}
