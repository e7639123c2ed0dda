//! The controller's shared state and what changes it. Everything lives behind one mutex: the
//! state ([`state::State`], plain data), the open worker links, and the last view of each
//! deployment sent to watchers. An operation locks it, changes the state, asks the scheduler
//! ([`crate::scheduler`]) what follows, carries out the effects (commands on links, store writes)
//! and tells watchers what changed — all before unlocking, so effects leave in decision order.
//!
//! - [`deployments`]: the Deployments API (apply, scale, delete, watch …);
//! - [`workers`]: the worker links (register, heartbeats, command results, loss);
//! - [`autoscale`]: the autoscaler's rounds and requests waiting for a cold start;
//! - [`view`]: what the API reports (a deployment's view, workers, GPUs);
//! - [`measured`]: measurements of what models take and how fast they run;
//! - [`events`], [`persist`], [`state`].

pub mod autoscale;
pub mod deployments;
pub mod events;
pub mod measured;
pub mod persist;
pub mod state;
pub mod view;
pub mod workers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gantry_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc, watch};
use tonic::Status;
use tonic::transport::Channel;

use crate::config::ControllerConfig;
use crate::error::ClusterError;
use crate::scheduler::{self, Effect};
use crate::statestore::StateStore;
use persist::StoreOp;
use state::State;

/// The sending half of a worker's link.
pub type LinkSender = mpsc::UnboundedSender<Result<pb::ControllerMessage, Status>>;

/// A worker's connections: its link (while open) and the channel requests are sent on.
#[derive(Debug)]
pub struct Link {
    pub tx: Option<LinkSender>,
    pub channel: Channel,
}

/// What the lock guards.
#[derive(Debug, Default)]
pub struct Inner {
    pub state: State,
    /// By worker id (FNV-hashed: every routing decision looks up each ready replica's worker).
    pub links: HashMap<String, Link, crate::router::prefix::Keyed>,
    /// The last view of each deployment sent to watchers.
    published: HashMap<String, pb::Deployment>,
}

impl Inner {
    /// Forgets what watchers were last sent of a deleted deployment.
    fn forget_published(&mut self, name: &str) {
        self.published.remove(name);
    }
}

/// The controller's shared state.
#[derive(Debug)]
pub struct Cluster {
    inner: Mutex<Inner>,
    store: Arc<dyn StateStore>,
    config: ControllerConfig,
    writes: mpsc::UnboundedSender<StoreOp>,
    changes: broadcast::Sender<pb::DeploymentEvent>,
    /// Turns true when the controller stops: long-lived streams (worker links, watches) end.
    closing: watch::Sender<bool>,
    started: Instant,
    /// Another owner of replica counts (the operator), if any.
    scaler: Mutex<Option<Arc<dyn autoscale::Scaler>>>,
    /// The token workers require on their own ports (one per cluster, kept in the store).
    worker_token: String,
    /// The replica each session was last routed to (memory only).
    pub(crate) sessions: Mutex<crate::router::pick::Sessions>,
}

impl Cluster {
    /// Loads the deployments and placements in `store` and starts the writer and the ticks
    /// (leases, retries). Call after this controller has won leadership.
    pub async fn start(store: Arc<dyn StateStore>, config: ControllerConfig) -> Result<Arc<Cluster>, ClusterError> {
        let state = persist::restore(store.as_ref()).await?;
        let worker_token = worker_token(store.as_ref()).await?;
        let (writes, write_rx) = mpsc::unbounded_channel::<StoreOp>();
        tokio::spawn(persist::write_behind(store.clone(), write_rx));
        let cluster = Arc::new(Cluster {
            inner: Mutex::new(Inner { state, ..Inner::default() }),
            store,
            config,
            writes,
            changes: broadcast::channel(1024).0,
            closing: watch::channel(false).0,
            started: Instant::now(),
            scaler: Mutex::new(None),
            worker_token,
            sessions: Mutex::default(),
        });
        cluster.start_autoscaler();
        cluster.size_restored();
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
        let mut inner = self.lock();
        for link in inner.links.values_mut() {
            link.tx = None;
        }
        for w in inner.state.workers.values_mut() {
            w.connected = false;
        }
    }

    /// Sizes the restored deployments whose source is a URL, each on a task of its own (their
    /// replicas wait, with the reason, until it answers or fails).
    fn size_restored(self: &Arc<Self>) {
        let pending: Vec<(String, crate::spec::DeploymentSpec)> = self
            .lock()
            .state
            .deployments
            .iter()
            .filter(|(_, d)| d.sized.is_err() && gantry_store::url::is_url(&d.record.spec.source))
            .map(|(n, d)| (n.clone(), d.record.spec.clone()))
            .collect();
        for (name, spec) in pending {
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                let sized = crate::spec::size_model_async(&spec).await;
                let Some(c) = weak.upgrade() else { return };
                let mut inner = c.lock();
                if let Some(d) = inner.state.deployments.get_mut(&name)
                    && d.record.spec.source == spec.source
                {
                    if let Err(e) = &sized {
                        tracing::warn!(deployment = %name, error = %e, "sizing a restored deployment failed");
                    }
                    d.sized = sized;
                }
                c.settle(&mut inner, Vec::new());
            });
        }
    }

    /// The token workers require on their own ports, and that the controller sends them.
    pub fn worker_token(&self) -> &str {
        &self.worker_token
    }

    /// Turns true when the controller stops.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug; keep serving what is there.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lease checks and retries, then a reconcile.
    fn tick(&self) {
        let mut inner = self.lock();
        let now = Instant::now();
        let effects = scheduler::expire(&mut inner.state, &self.config, now, self.started);
        self.settle(&mut inner, effects);
    }

    /// After a change: carries out `effects`, reconciles (carrying out what that decides), and
    /// tells watchers what changed.
    pub(crate) fn settle(&self, inner: &mut Inner, effects: Vec<Effect>) {
        self.carry_out(inner, effects);
        let effects = scheduler::reconcile(&mut inner.state, &self.config, Instant::now());
        self.carry_out(inner, effects);
        self.publish(inner);
    }

    /// Carries out what a decision asks for, in order.
    pub(crate) fn carry_out(&self, inner: &mut Inner, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Send { worker, message } => {
                    if let Some(tx) = inner.links.get(&worker).and_then(|l| l.tx.as_ref()) {
                        let _ = tx.send(Ok(pb::ControllerMessage { message: Some(message) }));
                    }
                }
                Effect::CloseLink(worker) => {
                    if let Some(link) = inner.links.get_mut(&worker) {
                        link.tx = None;
                    }
                }
                Effect::Persist(op) => {
                    let _ = self.writes.send(op);
                }
                Effect::PlacementFailed(reason) => crate::metrics::placement_failed(reason),
            }
        }
    }

    /// Sends watchers each deployment whose view changed.
    pub(crate) fn publish(&self, inner: &mut Inner) {
        let Inner { state, published, .. } = inner;
        for name in state.deployments.keys() {
            let Some(view) = view::deployment(state, name, &self.config) else { continue };
            if published.get(name) == Some(&view) {
                continue;
            }
            published.insert(name.clone(), view.clone());
            let _ = self
                .changes
                .send(pb::DeploymentEvent { kind: pb::deployment_event::Kind::Changed as i32, deployment: Some(view) });
        }
    }
}

/// Where the cluster's worker token is kept.
const WORKER_TOKEN_KEY: &str = "cluster/worker-token";

/// The cluster's worker token: the one in the store, else a new random one put there (the
/// leader does this at start; a controller taking over later finds it).
async fn worker_token(store: &dyn StateStore) -> Result<String, ClusterError> {
    if let Some(v) = store.get(WORKER_TOKEN_KEY).await?
        && let Ok(t) = String::from_utf8(v)
        && t.len() >= 32
    {
        return Ok(t);
    }
    use rand::Rng;
    let bytes: [u8; 24] = rand::rng().random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    store.put(WORKER_TOKEN_KEY, token.clone().into_bytes()).await?;
    Ok(token)
}
