//! The worker's state: how it serves, its devices, and the table of models it serves. Loading
//! (`load`), generating (`generate`) and pipeline stages (`stage`) are each a module of their
//! own working on it; the gRPC service (`grpc`) and the controller link (`link`) share it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use gantry_engine::chat::TemplateIsolation;
use gantry_engine::pipeline::TurnLock;
use gantry_proto::v1 as pb;
use gantry_store::Hub;
use tracing::info;

use crate::error::WorkerError;
use crate::gpu::{GpuInfo, GpuInventory, InventorySource};
use crate::served::{RateMeter, Served};

/// Prefix-cache key changes one heartbeat carries per model, at most (8 bytes each); more wait
/// for the next.
const PREFIX_KEYS_PER_HEARTBEAT: usize = 16_384;

/// How a worker serves.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub worker_id: String,
    /// Sequences at the full context that a model's KV cache is sized for (its memory is
    /// reserved for `parallel × context` tokens); more, shorter ones run at once when their
    /// blocks fit.
    pub parallel: usize,
    /// Generations running at once on one model, at most (beyond it they queue).
    pub max_running: usize,
    /// Prompt tokens a forward pass takes at most beside the decoding tokens (chunked prefill).
    pub step_tokens: usize,
    /// Requests waiting for a slot, across the worker.
    pub queue: usize,
    /// `--label key=value`: what placement policies' node selectors match.
    pub labels: std::collections::BTreeMap<String, String>,
    /// How to dial the next pipeline stage when workers serve TLS (the cluster CA and this
    /// worker's certificate).
    pub stage_tls: Option<tonic::transport::ClientTlsConfig>,
    /// Where models' own chat templates render: the binaries use a child process
    /// ([`TemplateIsolation::Child`]), so that a hostile template cannot stop the worker.
    pub templates: TemplateIsolation,
    /// How long a client may leave its stream unread (the buffers full) before its generation
    /// is cancelled and its slot given back.
    pub stall_timeout: std::time::Duration,
    /// `--nvlink`: the operator declares the GPUs linked (NVML reports it on its own).
    pub gpus_linked: bool,
    /// Its port takes calls only with the cluster's worker token (it listens beyond loopback
    /// without TLS): the controller hands the token over the authenticated link.
    pub require_token: bool,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            worker_id: "worker".into(),
            parallel: 4,
            max_running: 64,
            step_tokens: gantry_engine::batch::DEFAULT_STEP_TOKENS,
            queue: 64,
            labels: Default::default(),
            stage_tls: None,
            templates: TemplateIsolation::InProcess,
            stall_timeout: std::time::Duration::from_secs(60),
            gpus_linked: false,
            require_token: false,
        }
    }
}

/// The worker's state, shared by its gRPC handlers and the controller link.
#[derive(Debug)]
pub struct WorkerState {
    pub(crate) options: WorkerOptions,
    inventory: Box<dyn GpuInventory>,
    pub(crate) hub: Hub,
    pub(crate) models: RwLock<HashMap<String, Arc<Served>>>,
    /// Models being loaded now.
    pub(crate) loading: Mutex<HashSet<String>>,
    /// Models asked to be unloaded while they were loading: dropped when the load ends.
    pub(crate) unload_when_loaded: Mutex<HashSet<String>>,
    /// One turn lock per engine device (`cpu`, `cuda:0`, …).
    turns: Mutex<HashMap<String, Arc<TurnLock>>>,
    /// Requests waiting for a slot, across the worker.
    pub(crate) waiting: AtomicUsize,
    pub(crate) meter: RateMeter,
    /// The cluster's worker token, once a controller has handed it over.
    cluster_token: std::sync::RwLock<Option<String>>,
}

impl WorkerState {
    pub fn new(options: WorkerOptions, inventory: Box<dyn GpuInventory>, hub: Hub) -> Arc<WorkerState> {
        Arc::new(WorkerState {
            options,
            inventory,
            hub,
            models: RwLock::new(HashMap::new()),
            loading: Mutex::new(HashSet::new()),
            unload_when_loaded: Mutex::new(HashSet::new()),
            turns: Mutex::new(HashMap::new()),
            waiting: AtomicUsize::new(0),
            meter: RateMeter::new(),
            cluster_token: std::sync::RwLock::new(None),
        })
    }

    pub fn options(&self) -> &WorkerOptions {
        &self.options
    }

    /// Keeps the cluster's worker token a controller handed over.
    pub fn set_cluster_token(&self, token: &str) {
        if let Ok(mut t) = self.cluster_token.write() {
            *t = Some(token.to_string());
        }
    }

    /// The cluster's worker token, if a controller has handed it over.
    pub fn cluster_token(&self) -> Option<String> {
        self.cluster_token.read().ok().and_then(|t| t.clone())
    }

    /// Whether a call's `authorization` value may use this worker's port: always when the port
    /// is not guarded; else only with the cluster's worker token (compared in constant time).
    pub fn admits(&self, authorization: Option<&[u8]>) -> Result<(), String> {
        if !self.options.require_token {
            return Ok(());
        }
        let Some(token) = self.cluster_token() else {
            return Err("this worker listens beyond loopback without TLS, so it takes calls only with its cluster's worker token, and no controller has handed it one yet (its link must be authenticated: --api-key)".into());
        };
        let given = authorization.and_then(|v| v.strip_prefix(b"Bearer ")).unwrap_or_default();
        let want = token.as_bytes();
        let same = given.len() == want.len() && given.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if same {
            Ok(())
        } else if authorization.is_some() {
            Err("the worker token is not valid".into())
        } else {
            Err("this worker takes calls only from its cluster: send `Authorization: Bearer <the cluster's worker token>` (the controller and the other workers do)".into())
        }
    }

    /// The model served as `id`.
    pub(crate) fn model(&self, id: &str) -> Result<Arc<Served>, WorkerError> {
        let models = self.models.read().map_err(|_| WorkerError::poisoned("model table"))?;
        models.get(id).cloned().ok_or_else(|| {
            let mut loaded: Vec<String> = models.keys().cloned().collect();
            loaded.sort_unstable();
            WorkerError::NotLoaded { id: id.to_string(), loaded }
        })
    }

    /// The turn lock of an engine device: generations on one device take turns at each pass.
    pub(crate) fn turn(&self, engine_device: &str) -> Result<Arc<TurnLock>, WorkerError> {
        let mut turns = self.turns.lock().map_err(|_| WorkerError::poisoned("turn table"))?;
        Ok(turns.entry(engine_device.to_string()).or_default().clone())
    }

    /// The devices with memory taken by declared-inventory models subtracted (NVML and
    /// `/proc/meminfo` already see what is in use).
    pub fn gpus(&self) -> Result<Vec<GpuInfo>, String> {
        let mut gpus = self.inventory.gpus()?;
        let models = self.models.read().map_err(|_| "model table lock poisoned".to_string())?;
        for g in gpus.iter_mut().filter(|g| g.source == InventorySource::Declared) {
            let reserved: u64 = models
                .values()
                .flat_map(|m| &m.bindings)
                .filter(|(b, _)| b.inventory_index == Some(g.index))
                .map(|(_, bytes)| bytes)
                .sum();
            g.used_bytes = reserved.min(g.total_bytes);
            g.free_bytes = g.total_bytes - g.used_bytes;
        }
        Ok(gpus)
    }

    /// What `Status` answers.
    pub fn status(&self) -> Result<pb::StatusResponse, WorkerError> {
        let gpus = self.gpus().map_err(|e| WorkerError::Internal(format!("reading the GPUs: {e}")))?;
        let models = self.models.read().map_err(|_| WorkerError::poisoned("model table"))?;
        let sole = models.len() == 1;
        let mut loaded: Vec<pb::LoadedModel> =
            models.values().map(|m| pb::LoadedModel { measurement: m.measurement(sole), ..m.loaded() }).collect();
        loaded.sort_by(|a, b| a.info.as_ref().map(|i| &i.model_id).cmp(&b.info.as_ref().map(|i| &i.model_id)));
        Ok(pb::StatusResponse {
            worker_id: self.options.worker_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            gpus: gpus.iter().map(gpu_status).collect(),
            models: loaded,
            queue_depth: self.waiting.load(Ordering::Relaxed) as u32,
            queue_capacity: self.options.queue as u32,
            tokens_per_sec: self.meter.rate(),
            gpu_note: self.inventory.note().to_string(),
            driver_version: self.inventory.driver_version().unwrap_or_default(),
            gpus_linked: self.options.gpus_linked || self.inventory.linked(),
            host_available_bytes: host_available_bytes(),
        })
    }

    /// A heartbeat on the controller link: `Status`, with each model's prefix-cache key changes
    /// since the last heartbeat (`resync`: all its keys, for a new link).
    pub fn heartbeat(&self, resync: bool) -> Result<pb::StatusResponse, WorkerError> {
        let mut status = self.status()?;
        let models = self.models.read().map_err(|_| WorkerError::poisoned("model table"))?;
        for m in &mut status.models {
            let served = m.info.as_ref().and_then(|i| models.get(&i.model_id));
            m.prefix_keys = served.and_then(|s| s.prefix_key_changes(PREFIX_KEYS_PER_HEARTBEAT, resync));
        }
        Ok(status)
    }

    /// Stops serving a model; generations running on it finish first.
    pub fn unload(&self, model_id: &str) -> Result<(), WorkerError> {
        let mut models = self.models.write().map_err(|_| WorkerError::poisoned("model table"))?;
        if !models.contains_key(model_id)
            && self.loading.lock().map_err(|_| WorkerError::poisoned("loading"))?.contains(model_id)
        {
            // Still loading: it is dropped as soon as the load ends.
            self.unload_when_loaded.lock().map_err(|_| WorkerError::poisoned("unload"))?.insert(model_id.into());
            info!(model = model_id, "unload asked while loading");
            return Ok(());
        }
        if models.remove(model_id).is_none() {
            drop(models);
            return self.model(model_id).map(|_| ());
        }
        info!(model = model_id, "unloaded");
        Ok(())
    }
}

fn gpu_status(g: &GpuInfo) -> pb::GpuStatus {
    pb::GpuStatus {
        index: g.index,
        name: g.name.clone(),
        uuid: g.uuid.clone(),
        total_bytes: g.total_bytes,
        used_bytes: g.used_bytes,
        free_bytes: g.free_bytes,
        compute_capability: g.compute_capability.map(|(a, b)| format!("{a}.{b}")).unwrap_or_default(),
        utilization_percent: g.utilization_percent,
        source: g.source.as_str().into(),
    }
}

/// The host memory the kernel says can still be given (`MemAvailable`; 0 when unreadable).
pub fn host_available_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| crate::gpu::parse_meminfo(&t))
        .map_or(0, |(_, available)| available)
}
