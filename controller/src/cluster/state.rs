//! The controller's state as plain data: desired deployments with their replicas, the workers
//! and what they report, the load commands in flight. No channels, no store, no clock reads:
//! the scheduler decides on it (`scheduler::reconcile`) and tests build it directly.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Instant;

use gantry_core::autoscale::Signals;
use gantry_core::placement::PlacedStage;
use gantry_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::spec::{DeploymentRecord, SizedModel, check_name};

/// Events kept per deployment.
pub const MAX_EVENTS: usize = 50;

/// A replica's placement as stored under `placements/NAME/INDEX`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    pub generation: u64,
    pub stages: Vec<PlacedStage>,
}

/// Where a replica is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    Pending,
    Loading,
    Ready,
    Failed,
}

impl ReplicaState {
    /// As the API reports it.
    pub fn to_proto(self) -> pb::ReplicaState {
        match self {
            ReplicaState::Pending => pb::ReplicaState::Pending,
            ReplicaState::Loading => pb::ReplicaState::Loading,
            ReplicaState::Ready => pb::ReplicaState::Ready,
            ReplicaState::Failed => pb::ReplicaState::Failed,
        }
    }
}

/// One replica of a deployment.
#[derive(Debug)]
pub struct Replica {
    pub state: ReplicaState,
    pub placement: Option<PlacementRecord>,
    pub reason: String,
    pub progress: String,
    pub retry_at: Option<Instant>,
    pub failures: u32,
    /// Load commands in flight: worker → command id (one per worker of the placement).
    pub commands: BTreeMap<String, u64>,
    /// Workers of the placement that hold their stage.
    pub loaded: BTreeSet<String>,
    /// Requests the router has sent to it and not seen end.
    pub inflight: Arc<AtomicU32>,
    /// Prompt tokens it has yet to compute for the requests the router sent it whose first
    /// token has not come back (each prompt less the prefix the router expected it to hold):
    /// the prefill ahead of a new request there.
    pub prefill: Arc<AtomicU64>,
}

impl Replica {
    pub fn pending(reason: impl Into<String>) -> Replica {
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
            prefill: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn on_worker(&self, worker: &str) -> bool {
        self.placement.as_ref().is_some_and(|p| p.stages.iter().any(|s| s.node == worker))
    }

    /// The workers of its placement, in pipeline order, each once.
    pub fn workers(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in self.placement.iter().flat_map(|p| &p.stages) {
            if !out.contains(&s.node) {
                out.push(s.node.clone());
            }
        }
        out
    }

    /// Whether every worker of its placement holds its stage.
    pub fn all_loaded(&self) -> bool {
        self.placement.is_some() && self.workers().iter().all(|w| self.loaded.contains(w))
    }

    /// Forgets load progress (a new placement, or none).
    pub fn clear_loads(&mut self) {
        self.commands.clear();
        self.loaded.clear();
        self.progress.clear();
    }

    /// Ready: every stage loaded, nothing pending.
    pub fn set_ready(&mut self) {
        self.state = ReplicaState::Ready;
        self.reason.clear();
        self.progress.clear();
    }
}

/// A deployment: what it asks for, how big a replica is, its replicas and events.
#[derive(Debug)]
pub struct Deployment {
    pub record: DeploymentRecord,
    pub sized: Result<SizedModel, String>,
    pub replicas: BTreeMap<u32, Replica>,
    pub events: VecDeque<pb::DeploymentEventRecord>,
    pub autoscaler: Autoscaler,
}

/// What the autoscaler keeps per deployment (in memory: after a restart the windows start
/// again, which only delays a scale-down).
#[derive(Debug, Default)]
pub struct Autoscaler {
    /// Signals over the policy's longest window, oldest first.
    pub samples: VecDeque<Signals>,
    /// Requests waiting for a replica to come up (a cold start).
    pub waiting: Arc<AtomicU32>,
    pub last_decision: String,
    pub last_decision_ms: u64,
    /// A count asked of the owner of `replicas` (Kubernetes) and not yet seen back, and when.
    pub asked: Option<(u32, Instant)>,
}

impl Deployment {
    pub fn new(record: DeploymentRecord, sized: Result<SizedModel, String>) -> Deployment {
        Deployment {
            record,
            sized,
            replicas: BTreeMap::new(),
            events: VecDeque::new(),
            autoscaler: Autoscaler::default(),
        }
    }

    /// Replicas ready to serve.
    pub fn ready(&self) -> u32 {
        self.replicas.values().filter(|r| r.state == ReplicaState::Ready).count() as u32
    }
}

/// A worker as the controller knows it.
#[derive(Debug)]
pub struct Worker {
    pub id: String,
    pub address: String,
    pub version: String,
    pub labels: BTreeMap<String, String>,
    pub status: pb::StatusResponse,
    /// Whether its link is open (commands can be sent).
    pub connected: bool,
    pub session: u64,
    pub last_seen: Instant,
    pub lost: bool,
    /// How its link was authenticated: the credential its id is bound to (`None`: it was not).
    pub credential: Option<String>,
    /// Whether secrets (a deployment's Hugging Face token) may be sent over its link: it was
    /// authenticated, or it came from this host to a controller that authenticates no one.
    pub trusted: bool,
}

impl Worker {
    /// Whether it reports `model_id` loaded.
    pub fn holds(&self, model_id: &str) -> bool {
        self.model(model_id).is_some()
    }

    /// What it reports of `model_id` (queue, KV blocks …), if it has it loaded.
    pub fn model(&self, model_id: &str) -> Option<&pb::LoadedModel> {
        self.status.models.iter().find(|m| m.info.as_ref().is_some_and(|i| i.model_id == model_id))
    }

    /// The models it reports loaded.
    pub fn loaded_ids(&self) -> Vec<String> {
        self.status.models.iter().filter_map(|m| m.info.as_ref().map(|i| i.model_id.clone())).collect()
    }
}

/// What a running command is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub worker: String,
    pub deployment: String,
    pub replica: u32,
}

/// Everything the controller knows, behind the cluster's one lock.
#[derive(Debug, Default)]
pub struct State {
    pub deployments: BTreeMap<String, Deployment>,
    pub workers: BTreeMap<String, Worker>,
    /// Load commands in flight, by id.
    pub commands: HashMap<u64, Command>,
    pub next_command: u64,
    pub next_session: u64,
    /// Hugging Face tokens for deployments' downloads (from Kubernetes Secrets): kept in
    /// memory only, never in the store.
    pub hub_tokens: HashMap<String, String>,
    /// The credential each worker id is bound to (its first authenticated registration; kept
    /// in the store with the worker's record).
    pub worker_credentials: HashMap<String, String>,
    /// Which replicas hold which prefix-cache keys (from the workers' heartbeats; memory only).
    pub prefix: crate::router::prefix::PrefixIndex,
    /// What models really took and how fast they ran, per (digest, device kind).
    pub measurements: super::measured::Measurements,
}

impl State {
    /// A fresh command id.
    pub fn command_id(&mut self) -> u64 {
        self.next_command += 1;
        self.next_command
    }

    /// A replica by deployment name and index.
    pub fn replica_mut(&mut self, name: &str, index: u32) -> Option<&mut Replica> {
        self.deployments.get_mut(name).and_then(|d| d.replicas.get_mut(&index))
    }

    /// The replicas (deployment, index) placed on `worker`.
    pub fn replicas_on(&self, worker: &str) -> Vec<(String, u32)> {
        self.deployments
            .iter()
            .flat_map(|(n, d)| {
                d.replicas.iter().filter(|(_, r)| r.on_worker(worker)).map(move |(&i, _)| (n.clone(), i))
            })
            .collect()
    }

    /// The names of the deployments, for "not found" errors.
    pub fn deployment_names(&self) -> Vec<String> {
        self.deployments.keys().cloned().collect()
    }
}

/// The model id a replica is loaded under on its worker: `NAME/INDEX`.
pub fn replica_model_id(deployment: &str, index: u32) -> String {
    format!("{deployment}/{index}")
}

/// The deployment and replica of a model id the controller loaded, if it is one.
pub fn parse_replica_model_id(id: &str) -> Option<(&str, u32)> {
    let (name, index) = id.split_once('/')?;
    check_name(name).ok()?;
    Some((name, index.parse().ok()?))
}

/// The inventory index of the device a worker reports a model on (`gpu:N`, `cuda:N`, `cpu`).
pub fn device_index(status: &pb::StatusResponse, device: &str) -> Option<u32> {
    if let Some(n) = device.strip_prefix("gpu:").or_else(|| device.strip_prefix("cuda:")) {
        return n.parse().ok();
    }
    status.gpus.iter().find(|g| g.source == "cpu").or(status.gpus.first()).map(|g| g.index)
}
