//! The worker's gRPC service: load and unload models, stream generations, report status.
//!
//! Every loaded model serves up to `parallel` generations at once, each with its own KV cache;
//! further requests wait in one worker-wide queue of `queue` places, and a request finding
//! it full is refused with `RESOURCE_EXHAUSTED` at once. A generation runs on a blocking
//! thread and hands each token to the response stream; when the client cancels or goes
//! away the stream is dropped and the generation stops at its next token.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use gantry_core::units::format_bytes;
use gantry_core::vram::{DeviceKind, ServeOptions, estimate_vram};
use gantry_proto::v1 as pb;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::engine::EngineError;
use crate::engine::chat::{ChatTemplate, Message, TemplateIsolation};
use crate::engine::files::ModelFiles;
use crate::engine::generate::{FinishReason, generate_from};
use crate::engine::model::StageInput;
use crate::engine::sampling::SamplingParams;
use crate::engine::tokenizer::Tokenizer;
use crate::gpu::{GpuInfo, GpuInventory, InventorySource};
use crate::pipeline::{Chain, Downstream, Segment, TurnLock, WireDtype, decode};
use crate::store::{self, Hub, HubError, Source};

/// Tokens generated when a request does not say.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// Tokens buffered between a generation and a slow client (small, so that a cancelled
/// stream is noticed after at most this many tokens plus one).
const STREAM_BUFFER: usize = 8;
/// Seconds over which tokens/s are averaged.
const RATE_WINDOW_SECS: u64 = 10;

/// How a worker serves.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub worker_id: String,
    /// Generations running at once on one model.
    pub parallel: usize,
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
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            worker_id: "worker".into(),
            parallel: 4,
            queue: 64,
            labels: Default::default(),
            stage_tls: None,
            templates: TemplateIsolation::InProcess,
        }
    }
}

/// Tokens per second over the last few seconds.
#[derive(Debug)]
struct RateMeter {
    origin: Instant,
    buckets: Mutex<VecDeque<(u64, u64)>>,
}

impl RateMeter {
    fn new() -> RateMeter {
        RateMeter { origin: Instant::now(), buckets: Mutex::new(VecDeque::new()) }
    }

    fn add(&self, n: u64) {
        let sec = self.origin.elapsed().as_secs();
        let Ok(mut b) = self.buckets.lock() else { return };
        match b.back_mut() {
            Some((s, count)) if *s == sec => *count += n,
            _ => b.push_back((sec, n)),
        }
        while b.front().is_some_and(|(s, _)| s + RATE_WINDOW_SECS < sec) {
            b.pop_front();
        }
    }

    fn rate(&self) -> f64 {
        let now = self.origin.elapsed().as_secs_f64();
        let Ok(b) = self.buckets.lock() else { return 0.0 };
        let from = (now - RATE_WINDOW_SECS as f64).max(0.0);
        let tokens: u64 = b.iter().filter(|(s, _)| *s as f64 + 1.0 > from).map(|(_, n)| n).sum();
        tokens as f64 / (now - from).max(1.0)
    }
}

/// Where a model runs and whose memory it takes.
#[derive(Debug, Clone, PartialEq)]
struct Placement {
    /// The engine's device name (`cpu`, `cuda:N`).
    engine_device: String,
    /// The inventory device its memory is counted against.
    inventory_index: Option<u32>,
    /// What requests and status call it (`gpu:0`, `cpu`, `cuda:1`).
    label: String,
}

/// The stage after this worker's layers of a split model.
#[derive(Debug)]
struct NextStage {
    address: String,
    channel: tonic::transport::Channel,
    wire: WireDtype,
}

/// A model (or this worker's stage of a split one) being served.
#[derive(Debug)]
struct Served {
    info: pb::ModelInfo,
    /// Its layer ranges in order, each on its device.
    segments: Vec<Segment>,
    /// Where each segment's memory is counted, and how much.
    placements: Vec<(Placement, u64)>,
    next: Option<NextStage>,
    tokenizer: Tokenizer,
    template: Result<ChatTemplate, String>,
    extra_eos: Vec<u32>,
    slots: Arc<Semaphore>,
    running: AtomicU32,
    queued: AtomicU32,
    tokens: AtomicU64,
    meter: RateMeter,
}

/// The worker's state, shared by its gRPC handlers and the controller link.
#[derive(Debug)]
pub struct WorkerState {
    options: WorkerOptions,
    inventory: Box<dyn GpuInventory>,
    hub: Hub,
    models: RwLock<HashMap<String, Arc<Served>>>,
    loading: Mutex<HashSet<String>>,
    /// Models asked to be unloaded while they were loading: dropped when the load ends.
    unload_when_loaded: Mutex<HashSet<String>>,
    /// One turn lock per engine device (`cpu`, `cuda:0`, …).
    turns: Mutex<HashMap<String, Arc<TurnLock>>>,
    waiting: AtomicUsize,
    meter: RateMeter,
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
        })
    }

    pub fn options(&self) -> &WorkerOptions {
        &self.options
    }

    fn model(&self, id: &str) -> Result<Arc<Served>, Status> {
        let models = self.models.read().map_err(|_| Status::internal("model table lock poisoned"))?;
        models.get(id).cloned().ok_or_else(|| {
            let mut loaded: Vec<&str> = models.keys().map(String::as_str).collect();
            loaded.sort_unstable();
            Status::not_found(if loaded.is_empty() {
                format!("model `{id}` is not loaded on this worker; none is")
            } else {
                format!("model `{id}` is not loaded on this worker; loaded: {}", loaded.join(", "))
            })
        })
    }

    /// The devices with memory taken by declared-inventory models subtracted (NVML and
    /// `/proc/meminfo` already see what is in use).
    pub fn gpus(&self) -> Result<Vec<GpuInfo>, String> {
        let mut gpus = self.inventory.gpus()?;
        let models = self.models.read().map_err(|_| "model table lock poisoned".to_string())?;
        for g in gpus.iter_mut().filter(|g| g.source == InventorySource::Declared) {
            let reserved: u64 = models
                .values()
                .flat_map(|m| &m.placements)
                .filter(|(p, _)| p.inventory_index == Some(g.index))
                .map(|(_, bytes)| bytes)
                .sum();
            g.used_bytes = reserved.min(g.total_bytes);
            g.free_bytes = g.total_bytes - g.used_bytes;
        }
        Ok(gpus)
    }

    /// What `Status` answers.
    pub fn status(&self) -> Result<pb::StatusResponse, Status> {
        let gpus = self.gpus().map_err(|e| Status::internal(format!("reading the GPUs: {e}")))?;
        let models = self.models.read().map_err(|_| Status::internal("model table lock poisoned"))?;
        let mut loaded: Vec<pb::LoadedModel> = models
            .values()
            .map(|m| pb::LoadedModel {
                info: Some(m.info.clone()),
                running: m.running.load(Ordering::Relaxed),
                queued: m.queued.load(Ordering::Relaxed),
                tokens_generated: m.tokens.load(Ordering::Relaxed),
                tokens_per_sec: m.meter.rate(),
            })
            .collect();
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
        })
    }

    /// Where a load request's `device` puts the model.
    fn placement(&self, device: &str, gpus: &[GpuInfo]) -> Result<Placement, Status> {
        let device = device.trim().to_ascii_lowercase();
        let nvml = gpus.first().is_some_and(|g| g.source == InventorySource::Nvml);
        let index_of = |text: &str, prefix: &str| -> Result<u32, Status> {
            let n: u32 = text
                .strip_prefix(prefix)
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| Status::invalid_argument(format!("device `{text}`: use cpu, gpu:N or cuda:N")))?;
            if gpus.iter().any(|g| g.index == n) {
                Ok(n)
            } else {
                Err(Status::invalid_argument(format!(
                    "device `{text}`: this worker has {} device(s), numbered 0..{}",
                    gpus.len(),
                    gpus.len().saturating_sub(1)
                )))
            }
        };
        match device.as_str() {
            "" => {
                // The first inventory device: a GPU through NVML, a declared one, or the CPU.
                let first = gpus.first();
                let cpu = first.is_none_or(|g| g.source == InventorySource::Cpu);
                Ok(Placement {
                    engine_device: if nvml { format!("cuda:{}", first.map_or(0, |g| g.index)) } else { "cpu".into() },
                    inventory_index: first.map(|g| g.index),
                    label: match first {
                        Some(g) if !cpu => format!("gpu:{}", g.index),
                        _ => "cpu".into(),
                    },
                })
            }
            "cpu" => Ok(Placement {
                engine_device: "cpu".into(),
                inventory_index: gpus.iter().find(|g| g.source == InventorySource::Cpu).map(|g| g.index),
                label: "cpu".into(),
            }),
            d if d.starts_with("gpu:") => {
                let n = index_of(d, "gpu:")?;
                // Declared GPUs are accounted, not driven: their models run on the CPU.
                let engine_device = if nvml { format!("cuda:{n}") } else { "cpu".into() };
                Ok(Placement { engine_device, inventory_index: Some(n), label: d.to_string() })
            }
            d if d.starts_with("cuda:") => {
                let n = index_of(d, "cuda:")?;
                Ok(Placement { engine_device: d.to_string(), inventory_index: Some(n), label: d.to_string() })
            }
            d => Err(Status::invalid_argument(format!("device `{d}`: use cpu, gpu:N or cuda:N"))),
        }
    }

    /// The endpoint of another stage: TLS with this worker's certificate when workers serve TLS.
    fn stage_endpoint(&self, address: &str) -> Result<tonic::transport::Endpoint, Status> {
        let scheme = if self.options.stage_tls.is_some() { "https" } else { "http" };
        let endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|e| Status::invalid_argument(format!("next_stage `{address}`: {e}")))?;
        match &self.options.stage_tls {
            Some(tls) => endpoint
                .tls_config(tls.clone())
                .map_err(|e| Status::invalid_argument(format!("TLS to next_stage `{address}`: {e}"))),
            None => Ok(endpoint),
        }
    }

    /// Loads a model, sending progress to `events`; the model is served once this returns Ok.
    pub async fn load(
        self: &Arc<Self>,
        req: pb::LoadModelRequest,
        events: mpsc::Sender<Result<pb::LoadModelEvent, Status>>,
    ) -> Result<pb::ModelInfo, Status> {
        if req.source.trim().is_empty() {
            return Err(Status::invalid_argument("source is empty: give a model folder, a .gguf file or a Hub id"));
        }
        let source = Source::parse(req.source.trim());
        let model_id =
            if req.model_id.trim().is_empty() { default_model_id(&source) } else { req.model_id.trim().into() };
        for s in segments(&req) {
            if s.layer_end < s.layer_start {
                return Err(Status::invalid_argument(format!(
                    "layers [{}, {}): the end is before the start",
                    s.layer_start, s.layer_end
                )));
            }
        }
        WireDtype::parse(&req.wire_dtype).map_err(|e| Status::invalid_argument(e.to_string()))?;
        // A load of the same name already running is waited for (the controller may send a
        // load again after a reconnect), then this one goes on: done if it loaded the same
        // source, refused if another.
        loop {
            if let Ok(m) = self.model(&model_id) {
                if m.info.source == req.source.trim() {
                    return Ok(m.info.clone());
                }
                return Err(Status::already_exists(format!(
                    "model `{model_id}` is already loaded from {}; unload it first",
                    m.info.source
                )));
            }
            let started = self.loading.lock().map_err(|_| Status::internal("lock poisoned"))?.insert(model_id.clone());
            if started {
                break;
            }
            if events.is_closed() {
                return Err(Status::cancelled("the caller went away while an earlier load of the model ran"));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let result = self.load_inner(&model_id, &source, &req, &events).await;
        if result.is_err()
            && let Ok(mut marks) = self.unload_when_loaded.lock()
        {
            marks.remove(&model_id);
        }
        if let Ok(mut loading) = self.loading.lock() {
            loading.remove(&model_id);
        }
        result
    }

    async fn load_inner(
        self: &Arc<Self>,
        model_id: &str,
        source: &Source,
        req: &pb::LoadModelRequest,
        events: &mpsc::Sender<Result<pb::LoadModelEvent, Status>>,
    ) -> Result<pb::ModelInfo, Status> {
        let started = Instant::now();
        let progress_tx = events.clone();
        let mut last_sent = Instant::now() - std::time::Duration::from_secs(1);
        // A token sent with the load (a Kubernetes Secret's) stands in for the worker's own.
        let hub = match req.hf_token.trim() {
            "" => self.hub.clone(),
            token => self.hub.with_token(token),
        };
        let path = store::resolve(source, &hub, &mut |p| {
            // A few events a second are plenty; the last one always goes.
            if p.done == p.total || last_sent.elapsed().as_millis() >= 200 {
                last_sent = Instant::now();
                let _ = progress_tx.try_send(Ok(progress_event("download", &p.file, p.done, p.total)));
            }
        })
        .await
        .map_err(hub_status)?;

        let gpus = self.gpus().map_err(|e| Status::internal(format!("reading the GPUs: {e}")))?;
        let placements =
            segments(req).iter().map(|s| self.placement(&s.device, &gpus)).collect::<Result<Vec<_>, _>>()?;
        let next = match req.next_stage.trim() {
            "" => None,
            address => Some(NextStage {
                address: address.to_string(),
                channel: self
                    .stage_endpoint(address)?
                    .connect_timeout(std::time::Duration::from_secs(3))
                    .tcp_nodelay(true)
                    .connect_lazy(),
                wire: WireDtype::parse(&req.wire_dtype).map_err(|e| Status::invalid_argument(e.to_string()))?,
            }),
        };
        let state = self.clone();
        let req = req.clone();
        let model_id = model_id.to_string();
        let load_tx = events.clone();
        let served = tokio::task::spawn_blocking(move || {
            state.load_blocking(&model_id, path, &req, placements, next, &gpus, started, &load_tx)
        })
        .await
        .map_err(|e| Status::internal(format!("the load stopped: {e}")))??;
        let info = served.info.clone();
        // Decided under the model table's lock, as `unload` decides.
        let mut models = self.models.write().map_err(|_| Status::internal("model table lock poisoned"))?;
        if self.unload_when_loaded.lock().map_err(|_| Status::internal("lock poisoned"))?.remove(&info.model_id) {
            info!(model = %info.model_id, "unloaded as asked while it loaded");
            return Err(Status::aborted(format!("model `{}` was unloaded while it loaded", info.model_id)));
        }
        models.insert(info.model_id.clone(), Arc::new(served));
        info!(
            model = %info.model_id,
            source = %info.source,
            device = %info.device,
            layers = format!(
                "{} of {}",
                span(&(info.layer_start as usize..info.layer_end as usize)),
                info.num_layers
            ),
            next_stage = %info.next_stage,
            load_ms = info.load_ms,
            "serving"
        );
        Ok(info)
    }

    #[allow(clippy::too_many_arguments)]
    fn load_blocking(
        &self,
        model_id: &str,
        path: PathBuf,
        req: &pb::LoadModelRequest,
        placements: Vec<Placement>,
        next: Option<NextStage>,
        gpus: &[GpuInfo],
        started: Instant,
        events: &mpsc::Sender<Result<pb::LoadModelEvent, Status>>,
    ) -> Result<Served, Status> {
        let mut files = ModelFiles::open(&path).map_err(engine_status)?;
        let trained = files.config.context_length;
        let context = match req.context_length {
            0 => trained,
            n if n as usize > trained => {
                return Err(Status::invalid_argument(format!(
                    "context_length {n}: {} was trained for {trained} tokens; ask for at most that",
                    files.spec.name
                )));
            }
            n => n as usize,
        };
        std::sync::Arc::make_mut(&mut files.config).context_length = context;
        let layers = files.config.num_layers;
        let ranges = layer_ranges(&segments(req), layers, next.is_some())
            .map_err(|e| Status::invalid_argument(format!("{}: {e}", files.spec.name)))?;

        // Admission: the estimate for this context and `parallel` sequences, in proportion to
        // each segment's layers, against what is free on the device it is counted against.
        let options = ServeOptions {
            context: Some(context as u64),
            batch: self.options.parallel as u64,
            device: if placements.iter().all(|p| p.engine_device == "cpu")
                && gpus.first().is_none_or(|g| g.source != InventorySource::Declared)
            {
                DeviceKind::Cpu
            } else {
                DeviceKind::Gpu
            },
            ..ServeOptions::default()
        };
        let estimate = estimate_vram(&files.spec, &options).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let share = |bytes: u64, range: &std::ops::Range<usize>| bytes * range.len() as u64 / layers.max(1) as u64;
        let needs: Vec<u64> = ranges
            .iter()
            .map(|r| {
                share(estimate.weights_bytes + estimate.kv_cache_bytes, r)
                    + estimate.activation_bytes
                    + estimate.overhead_bytes
            })
            .collect();
        for (placement, range) in placements.iter().zip(&ranges) {
            let Some(g) = placement.inventory_index.and_then(|d| gpus.iter().find(|g| g.index == d)) else { continue };
            // Every segment counted against the same device takes from the same free memory.
            let needed: u64 = placements
                .iter()
                .zip(&needs)
                .filter(|(p, _)| p.inventory_index == placement.inventory_index)
                .map(|(_, n)| n)
                .sum();
            if needed > g.free_bytes {
                let what = if ranges.len() == 1 && range.len() == layers {
                    String::new()
                } else {
                    format!(" layers {}", span(range))
                };
                return Err(Status::resource_exhausted(format!(
                    "{}{what} needs {} on {} ({} weights, {} KV cache for {} tokens × {} sequences, {} activations and overhead); {} of {} is free",
                    files.spec.name,
                    format_bytes(needed),
                    placement.label,
                    format_bytes(share(estimate.weights_bytes, range)),
                    format_bytes(share(estimate.kv_cache_bytes, range)),
                    context,
                    self.options.parallel,
                    format_bytes(estimate.activation_bytes + estimate.overhead_bytes),
                    format_bytes(g.free_bytes),
                    format_bytes(g.total_bytes),
                )));
            }
        }

        let tokenizer = files.tokenizer().map_err(engine_status)?;
        let template = files.chat_template(&tokenizer, &self.options.templates).map_err(|e| e.to_string());
        let total_layers: usize = ranges.iter().map(|r| r.len()).sum();
        let mut done_before = 0;
        let mut segments = Vec::with_capacity(ranges.len());
        for (placement, range) in placements.iter().zip(&ranges) {
            let device = crate::engine::device(&placement.engine_device).map_err(engine_status)?;
            let mut last_layers = usize::MAX;
            let part = files
                .load_part(range.clone(), &device, &mut |p| {
                    if p.layers_done != last_layers {
                        last_layers = p.layers_done;
                        let _ = events.try_send(Ok(progress_event(
                            "load",
                            "layers",
                            (done_before + p.layers_done) as u64,
                            total_layers as u64,
                        )));
                    }
                })
                .map_err(engine_status)?;
            done_before += range.len();
            let turn = self
                .turns
                .lock()
                .map_err(|_| Status::internal("turn table lock poisoned"))?
                .entry(placement.engine_device.clone())
                .or_default()
                .clone();
            segments.push(Segment { part, turn });
        }
        let extra_eos = files.spec.eos_token_ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        let (first, last) = (ranges.first().cloned().unwrap_or_default(), ranges.last().cloned().unwrap_or_default());
        let info = pb::ModelInfo {
            model_id: model_id.to_string(),
            source: req.source.trim().to_string(),
            family: files.spec.family.to_string(),
            parameters: files.spec.parameters.total,
            context_length: context as u64,
            weights_bytes: ranges.iter().map(|r| share(estimate.weights_bytes, r)).sum(),
            device: placements.first().map(|p| p.label.clone()).unwrap_or_default(),
            layer_start: first.start as u32,
            layer_end: last.end as u32,
            num_layers: layers as u32,
            instruct: files.spec.tuning.instruct,
            chat_template: template.as_ref().map(|t| t.origin.clone()).unwrap_or_default(),
            load_ms: started.elapsed().as_millis() as u64,
            segments: placements
                .iter()
                .zip(&ranges)
                .map(|(p, r)| pb::LayerSegment {
                    device: p.label.clone(),
                    layer_start: r.start as u32,
                    layer_end: r.end as u32,
                })
                .collect(),
            next_stage: next.as_ref().map(|n| n.address.clone()).unwrap_or_default(),
        };
        Ok(Served {
            info,
            segments,
            placements: placements.into_iter().zip(needs).collect(),
            next,
            tokenizer,
            template,
            extra_eos,
            slots: Arc::new(Semaphore::new(self.options.parallel)),
            running: AtomicU32::new(0),
            queued: AtomicU32::new(0),
            tokens: AtomicU64::new(0),
            meter: RateMeter::new(),
        })
    }

    /// Stops serving a model; generations running on it finish first.
    pub fn unload(&self, model_id: &str) -> Result<(), Status> {
        let mut models = self.models.write().map_err(|_| Status::internal("model table lock poisoned"))?;
        if !models.contains_key(model_id)
            && self.loading.lock().map_err(|_| Status::internal("lock poisoned"))?.contains(model_id)
        {
            // Still loading: it is dropped as soon as the load ends.
            self.unload_when_loaded.lock().map_err(|_| Status::internal("lock poisoned"))?.insert(model_id.into());
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

    /// Checks a request and starts it (or queues it); the stream yields its tokens.
    pub fn generate(
        self: &Arc<Self>,
        req: pb::GenerateRequest,
    ) -> Result<mpsc::Receiver<Result<pb::GenerateEvent, Status>>, Status> {
        let model = self.model(&req.model_id)?;
        if model.info.layer_start != 0 {
            return Err(Status::failed_precondition(format!(
                "this worker runs layers {} of `{}`, a later pipeline stage; send requests to the stage holding layer 0",
                span(&(model.info.layer_start as usize..model.info.layer_end as usize)),
                model.info.model_id
            )));
        }
        let params = sampling_params(req.sampling.as_ref())?;
        let prompt = build_prompt(&model, req.input.as_ref())?;
        let context = model.info.context_length as usize;
        if prompt.len() >= context {
            return Err(Status::invalid_argument(format!(
                "the prompt is {} tokens; model `{}` has a context of {context} tokens, so at most {} prompt tokens fit",
                prompt.len(),
                model.info.model_id,
                context - 1
            )));
        }
        if params.max_tokens > context {
            return Err(Status::invalid_argument(format!(
                "max_tokens {} is more than model `{}` can hold: its context is {context} tokens, prompt included",
                params.max_tokens, model.info.model_id
            )));
        }
        let resumed = req.resume_tokens;
        check_resumed(&resumed, &model, prompt.len(), &params)?;

        // A free slot now, else a place in the queue, else refused.
        let permit = match model.slots.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                let cap = self.options.queue;
                let taken =
                    self.waiting.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| (w < cap).then_some(w + 1));
                if taken.is_err() {
                    return Err(Status::resource_exhausted(format!(
                        "the worker's queue is full: {cap} requests waiting, {} running on `{}`; retry later",
                        model.running.load(Ordering::Relaxed),
                        model.info.model_id
                    )));
                }
                model.queued.fetch_add(1, Ordering::Relaxed);
                None
            }
        };

        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let state = self.clone();
        let request_id = req.request_id.clone();
        tokio::spawn(async move {
            let permit = match permit {
                Some(p) => Ok(p),
                None => {
                    let got = tokio::select! {
                        p = model.slots.clone().acquire_owned() => p.map_err(|_| ()),
                        () = tx.closed() => Err(()),
                    };
                    state.waiting.fetch_sub(1, Ordering::AcqRel);
                    model.queued.fetch_sub(1, Ordering::Relaxed);
                    got
                }
            };
            let Ok(permit) = permit else { return };
            model.running.fetch_add(1, Ordering::Relaxed);
            let downstream = match &model.next {
                None => Ok(None),
                Some(next) => open_next(&model, next, &params, &request_id, resumed.len()).await.map(Some),
            };
            let run_model = model.clone();
            let run_state = state.clone();
            let run_tx = tx.clone();
            let request_id2 = request_id.clone();
            let outcome = match downstream {
                Ok(downstream) => {
                    tokio::task::spawn_blocking(move || {
                        let run = Run { prompt: &prompt, resumed: &resumed, params: &params, request_id: &request_id2 };
                        run_generation(&run_state, &run_model, downstream, &run, &run_tx)
                    })
                    .await
                }
                Err(e) => Ok(Err(engine_status(e))),
            };
            drop(permit);
            model.running.fetch_sub(1, Ordering::Relaxed);
            let event = match outcome {
                Ok(Ok(done)) => Ok(pb::GenerateEvent { event: Some(pb::generate_event::Event::Done(done)) }),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(Status::internal(format!("generation stopped: {e}"))),
            };
            if let Err(e) = &event {
                warn!(request_id = %request_id, model = %model.info.model_id, error = %e.message(), "generation failed");
            }
            let _ = tx.send(event).await;
        });
        Ok(rx)
    }
}

/// Opens the stream to the stage after `model`'s layers for one sequence.
async fn open_next(
    model: &Served,
    next: &NextStage,
    params: &SamplingParams,
    request_id: &str,
    resumed: usize,
) -> Result<Downstream, EngineError> {
    let open = pb::StageOpen {
        model_id: model.info.model_id.clone(),
        first_layer: model.info.layer_end,
        sampling: Some(sampling_proto(params)),
        request_id: request_id.to_string(),
        resumed_tokens: resumed as u32,
    };
    Downstream::open(next.channel.clone(), &next.address, open, next.wire).await
}

/// Tokens to resume after must be the model's, and leave room to generate.
fn check_resumed(resumed: &[u32], model: &Served, prompt: usize, params: &SamplingParams) -> Result<(), Status> {
    let vocab = model.segments.first().map_or(0, |s| s.part.config.vocab_size);
    if let Some(bad) = resumed.iter().find(|&&t| t as usize >= vocab) {
        return Err(Status::invalid_argument(format!(
            "resume token {bad} is not in the vocabulary of `{}` ({vocab} tokens)",
            model.info.model_id
        )));
    }
    let context = model.info.context_length as usize;
    let budget = params.max_tokens.min(context.saturating_sub(prompt));
    if resumed.len() > budget {
        return Err(Status::invalid_argument(format!(
            "{} tokens to resume after, but the request can generate at most {budget} (max_tokens {}, {} of the {context}-token context left after the prompt)",
            resumed.len(),
            params.max_tokens,
            context.saturating_sub(prompt)
        )));
    }
    Ok(())
}

/// One request's inputs, as the generation thread needs them.
struct Run<'a> {
    prompt: &'a [u32],
    /// Tokens an earlier run generated (a resumed request).
    resumed: &'a [u32],
    params: &'a SamplingParams,
    request_id: &'a str,
}

/// Runs one generation on the calling (blocking) thread, sending tokens to `tx`.
fn run_generation(
    state: &WorkerState,
    model: &Served,
    downstream: Option<Downstream>,
    run: &Run<'_>,
    tx: &mpsc::Sender<Result<pb::GenerateEvent, Status>>,
) -> Result<pb::GenerateDone, Status> {
    let Run { prompt, resumed, params, request_id } = *run;
    let mut chain = Chain::new(&model.segments, downstream, params, resumed.len()).map_err(engine_status)?;
    let summary = generate_from(&mut chain, &model.tokenizer, prompt, resumed, params, &model.extra_eos, &mut |ev| {
        if ev.token.is_some() {
            model.tokens.fetch_add(1, Ordering::Relaxed);
            model.meter.add(1);
            state.meter.add(1);
        }
        let chunk = pb::TokenChunk { text: ev.text.clone(), token_id: ev.token, logprob: ev.logprob };
        match tx.blocking_send(Ok(pb::GenerateEvent { event: Some(pb::generate_event::Event::Token(chunk)) })) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    })
    .map_err(engine_status)?;
    let t = summary.timings;
    let new_tokens = summary.completion_tokens - resumed.len().min(summary.completion_tokens);
    info!(
        request_id,
        model = %model.info.model_id,
        prompt_tokens = summary.prompt_tokens,
        completion_tokens = summary.completion_tokens,
        resumed_after = resumed.len(),
        finish = ?summary.finish_reason,
        decode_tokens_per_sec = format!("{:.1}", t.decode_tokens_per_sec(new_tokens)),
        "generated"
    );
    Ok(pb::GenerateDone {
        finish_reason: finish_reason(summary.finish_reason) as i32,
        usage: Some(pb::Usage {
            prompt_tokens: summary.prompt_tokens as u32,
            completion_tokens: summary.completion_tokens as u32,
        }),
        time_to_first_token_ms: t.first_token.as_secs_f64() * 1000.0,
        decode_tokens_per_sec: t.decode_tokens_per_sec(new_tokens),
    })
}

fn finish_reason(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::EndOfSequence => pb::FinishReason::EndOfSequence,
        FinishReason::StopString => pb::FinishReason::StopString,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::ContextFull => pb::FinishReason::ContextFull,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

/// The engine's sampling settings from the request's, checked.
pub fn sampling_params(p: Option<&pb::SamplingParams>) -> Result<SamplingParams, Status> {
    let d = pb::SamplingParams::default();
    let p = p.unwrap_or(&d);
    let params = SamplingParams {
        temperature: p.temperature.unwrap_or(0.0),
        top_k: p.top_k.unwrap_or(0) as usize,
        top_p: p.top_p.unwrap_or(1.0),
        min_p: p.min_p.unwrap_or(0.0),
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        seed: p.seed,
        max_tokens: p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS) as usize,
        stop: p.stop.clone(),
        ignore_eos: p.ignore_eos,
        logprobs: p.logprobs,
    };
    params.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(params)
}

/// Layers as people write them (`10-19`).
fn span(layers: &std::ops::Range<usize>) -> String {
    gantry_core::shard::layer_span(&(layers.start as u64..layers.end as u64))
}

/// The request form of checked sampling settings (what the next stage is sent).
fn sampling_proto(p: &SamplingParams) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: Some(p.temperature),
        top_k: Some(p.top_k as u32),
        top_p: Some(p.top_p),
        min_p: Some(p.min_p),
        repetition_penalty: Some(p.repetition_penalty),
        seed: p.seed,
        max_tokens: Some(p.max_tokens as u32),
        stop: p.stop.clone(),
        ignore_eos: p.ignore_eos,
        logprobs: p.logprobs,
    }
}

/// The layer segments a load asks for: its `segments`, or the one its `device` and
/// `layer_start`/`layer_end` describe.
fn segments(req: &pb::LoadModelRequest) -> Vec<pb::LayerSegment> {
    if req.segments.is_empty() {
        vec![pb::LayerSegment { device: req.device.clone(), layer_start: req.layer_start, layer_end: req.layer_end }]
    } else {
        req.segments.clone()
    }
}

/// The segments' layer ranges, checked: within the model, in order and contiguous, and ending
/// the model exactly when no next stage follows. One segment of `0..0` is the whole model.
fn layer_ranges(
    segments: &[pb::LayerSegment],
    layers: usize,
    has_next: bool,
) -> Result<Vec<std::ops::Range<usize>>, String> {
    if let [only] = segments
        && only.layer_start == 0
        && only.layer_end == 0
    {
        if has_next {
            return Err("a stage with a next stage must name its layers".into());
        }
        return Ok(std::iter::once(0..layers).collect());
    }
    let mut out: Vec<std::ops::Range<usize>> = Vec::with_capacity(segments.len());
    for s in segments {
        let (start, end) = (s.layer_start as usize, s.layer_end as usize);
        if start >= end || end > layers {
            return Err(format!("layers [{start}, {end}): the model has {layers} layers"));
        }
        if let Some(prev) = out.last()
            && prev.end != start
        {
            return Err(format!("layers [{start}, {end}) do not follow on from [{}, {})", prev.start, prev.end));
        }
        out.push(start..end);
    }
    match (out.last().map(|r| r.end), has_next) {
        (None, _) => Err("no layers given".into()),
        (Some(end), true) if end == layers => {
            Err(format!("these layers end the model at {end}, so there can be no next stage"))
        }
        (Some(end), false) if end < layers => Err(format!(
            "these layers end at {end} of {layers}; give the next stage's address (`next_stage`) for the rest"
        )),
        _ => Ok(out),
    }
}

/// Serves one `StageLink/Forward` stream on the calling (blocking) thread: each step's hidden
/// states through this worker's layers, then on to the next stage or sampled here.
fn run_stage(
    model: &Served,
    downstream: Option<Downstream>,
    params: &SamplingParams,
    resumed: usize,
    mut inbound: tonic::Streaming<pb::StageRequest>,
    tx: &mpsc::Sender<Result<pb::StageReply, Status>>,
) {
    let runtime = tokio::runtime::Handle::current();
    let mut chain = match Chain::new(&model.segments, downstream, params, resumed) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.blocking_send(Err(engine_status(e)));
            return;
        }
    };
    let Some(first) = model.segments.first() else { return };
    let (hidden_size, device) = (first.part.config.hidden_size, first.part.device().clone());
    // Ends when the previous stage closes the stream (done, cancelled, or gone).
    while let Ok(Some(msg)) = runtime.block_on(inbound.message()) {
        let Some(pb::stage_request::Message::Step(step)) = msg.message else {
            let _ = tx.blocking_send(Err(Status::invalid_argument("a stage stream sends `open` once, then steps")));
            return;
        };
        let reply = step
            .hidden
            .as_ref()
            .ok_or_else(|| EngineError::Config("a step without hidden states".into()))
            .and_then(|h| decode(h, hidden_size, &device))
            .and_then(|h| chain.step(StageInput::Hidden(h), &step.tokens, step.sample))
            .map(|choice| pb::StageReply { token_id: choice.map(|c| c.token), logprob: choice.and_then(|c| c.logprob) })
            .map_err(engine_status);
        let failed = reply.is_err();
        if tx.blocking_send(reply).is_err() || failed {
            return;
        }
    }
}

/// The roles a conversation's messages may have (chat templates know these).
const CHAT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// The prompt's token ids: plain text as is, a conversation through the chat template.
fn build_prompt(model: &Served, input: Option<&pb::generate_request::Input>) -> Result<Vec<u32>, Status> {
    let text = match input {
        None => return Err(Status::invalid_argument("the request has neither a prompt nor a chat")),
        Some(pb::generate_request::Input::Prompt(p)) => p.clone(),
        Some(pb::generate_request::Input::Chat(c)) => {
            if c.messages.is_empty() {
                return Err(Status::invalid_argument("the chat has no messages"));
            }
            if let Some((i, m)) = c.messages.iter().enumerate().find(|(_, m)| !CHAT_ROLES.contains(&m.role.as_str())) {
                return Err(Status::invalid_argument(format!(
                    "message #{} has unknown role `{}`: use {}",
                    i + 1,
                    m.role.escape_debug(),
                    CHAT_ROLES.join(", ")
                )));
            }
            let template = model.template.as_ref().map_err(|e| {
                Status::failed_precondition(format!("model `{}` has no usable chat template: {e}", model.info.model_id))
            })?;
            let messages: Vec<Message> = c.messages.iter().map(|m| Message::new(&m.role, &m.content)).collect();
            template.render(&messages, true, &Default::default()).map_err(engine_status)?
        }
    };
    if text.is_empty() {
        return Err(Status::invalid_argument("the prompt is empty"));
    }
    model.tokenizer.encode(&text, true, true).map_err(engine_status)
}

fn progress_event(stage: &str, item: &str, done: u64, total: u64) -> pb::LoadModelEvent {
    pb::LoadModelEvent {
        event: Some(pb::load_model_event::Event::Progress(pb::LoadProgress {
            stage: stage.into(),
            item: item.into(),
            done,
            total,
        })),
    }
}

/// A URL's file name without `.gguf`.
fn url_file_stem(u: &str) -> String {
    let name = store::url::file_name(u).unwrap_or_else(|_| "model.gguf".into());
    name.strip_suffix(".gguf").map(str::to_string).unwrap_or(name)
}

/// The name a model is served under when the request gives none: a Hub repository's
/// name, a file's stem, a folder's name.
fn default_model_id(source: &Source) -> String {
    match source {
        Source::Hub(r) => match &r.file {
            Some(f) => f.trim_end_matches(".gguf").to_string(),
            None => r.repo.rsplit('/').next().unwrap_or(&r.repo).to_string(),
        },
        Source::Url(u) => url_file_stem(u),
        Source::Local(p) => {
            let p = if p.file_name().is_some_and(|n| n == "config.json") { p.parent().unwrap_or(p) } else { p };
            let name =
                p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string());
            name.strip_suffix(".gguf").map(str::to_string).unwrap_or(name)
        }
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

/// The gRPC status for an engine error.
pub fn engine_status(e: EngineError) -> Status {
    let msg = e.to_string();
    match e {
        EngineError::Store(store::StoreError::NotFound { .. }) => Status::not_found(msg),
        EngineError::InvalidSampling(_)
        | EngineError::PromptTooLong { .. }
        | EngineError::ContextExceeded { .. }
        | EngineError::Template(_) => Status::invalid_argument(msg),
        EngineError::Store(_) | EngineError::Model(_) | EngineError::MissingTensor(_) | EngineError::Config(_) => {
            Status::failed_precondition(msg)
        }
        EngineError::Unsupported(_) => Status::unimplemented(msg),
        EngineError::Stage { code, .. } => Status::new(tonic::Code::from_i32(code), msg),
        _ => Status::internal(msg),
    }
}

/// The gRPC status for a Hub error.
pub fn hub_status(e: HubError) -> Status {
    let msg = e.to_string();
    match e {
        HubError::Gated { had_token: false, .. } | HubError::Unauthorized { had_token: false, .. } => {
            Status::unauthenticated(msg)
        }
        HubError::Gated { .. } | HubError::Unauthorized { .. } => Status::permission_denied(msg),
        HubError::RepoNotFound { .. } | HubError::RevisionNotFound { .. } | HubError::FileNotFound { .. } => {
            Status::not_found(msg)
        }
        HubError::BadId(_) | HubError::AmbiguousGguf { .. } => Status::invalid_argument(msg),
        HubError::NothingToServe { .. } | HubError::OfflineMiss { .. } | HubError::UnsafePath(_) => {
            Status::failed_precondition(msg)
        }
        HubError::Checksum { .. } => Status::data_loss(msg),
        HubError::Unreachable { .. } | HubError::Http { .. } | HubError::Transfer { .. } => Status::unavailable(msg),
        HubError::Io { .. } => Status::internal(msg),
    }
}

/// The `gantry.v1.Worker` service over a [`WorkerState`].
#[derive(Debug, Clone)]
pub struct WorkerService {
    state: Arc<WorkerState>,
}

impl WorkerService {
    pub fn new(state: Arc<WorkerState>) -> WorkerService {
        WorkerService { state }
    }
}

type EventStream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    type LoadModelStream = EventStream<pb::LoadModelEvent>;
    type GenerateStream = EventStream<pb::GenerateEvent>;

    async fn load_model(
        &self,
        request: Request<pb::LoadModelRequest>,
    ) -> Result<Response<Self::LoadModelStream>, Status> {
        let req = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let state = self.state.clone();
        tokio::spawn(async move {
            let result = state.load(req, tx.clone()).await;
            let event = result.map(|info| pb::LoadModelEvent { event: Some(pb::load_model_event::Event::Done(info)) });
            if let Err(e) = &event {
                warn!(error = %e.message(), "load failed");
            }
            let _ = tx.send(event).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn unload_model(
        &self,
        request: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        self.state.unload(&request.into_inner().model_id)?;
        Ok(Response::new(pb::UnloadModelResponse {}))
    }

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        // Off the async threads: a chat's template renders in a child process (see
        // `engine::chat_child`), which may take up to its deadline when the template is hostile.
        let state = self.state.clone();
        let rx = tokio::task::spawn_blocking(move || state.generate(request.into_inner()))
            .await
            .map_err(|e| Status::internal(format!("the request's task failed: {e}")))??;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(self.state.status()?))
    }
}

#[tonic::async_trait]
impl pb::stage_link_server::StageLink for WorkerService {
    type ForwardStream = EventStream<pb::StageReply>;

    async fn forward(
        &self,
        request: Request<tonic::Streaming<pb::StageRequest>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        let mut inbound = request.into_inner();
        let open = match inbound.message().await? {
            Some(pb::StageRequest { message: Some(pb::stage_request::Message::Open(open)) }) => open,
            _ => return Err(Status::invalid_argument("a stage stream starts with `open`")),
        };
        let model = self.state.model(&open.model_id)?;
        if open.first_layer == 0 || model.info.layer_start != open.first_layer {
            return Err(Status::failed_precondition(format!(
                "this worker runs layers {} of `{}`; the previous stage hands on at layer {}",
                span(&(model.info.layer_start as usize..model.info.layer_end as usize)),
                model.info.model_id,
                open.first_layer
            )));
        }
        let params = sampling_params(open.sampling.as_ref())?;
        let downstream = match &model.next {
            None => None,
            Some(next) => Some(
                open_next(&model, next, &params, &open.request_id, open.resumed_tokens as usize)
                    .await
                    .map_err(engine_status)?,
            ),
        };
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::task::spawn_blocking(move || {
            model.running.fetch_add(1, Ordering::Relaxed);
            run_stage(&model, downstream, &params, open.resumed_tokens as usize, inbound, &tx);
            model.running.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_values_are_checked_with_the_numbers() {
        let bad = pb::SamplingParams { temperature: Some(-1.0), ..Default::default() };
        let e = sampling_params(Some(&bad)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("temperature must be between 0 and 100, got -1"), "{}", e.message());
        let bad = pb::SamplingParams { top_p: Some(1.5), ..Default::default() };
        assert!(sampling_params(Some(&bad)).unwrap_err().message().contains("got 1.5"));
        let p = sampling_params(None).unwrap();
        assert_eq!((p.temperature, p.max_tokens, p.top_p), (0.0, DEFAULT_MAX_TOKENS as usize, 1.0));
    }

    #[test]
    fn models_are_named_after_their_source() {
        assert_eq!(default_model_id(&Source::parse("HuggingFaceTB/SmolLM2-135M-Instruct")), "SmolLM2-135M-Instruct");
        assert_eq!(
            default_model_id(&Source::Local("models/SmolLM2-135M-Instruct.Q4_1.gguf".into())),
            "SmolLM2-135M-Instruct.Q4_1"
        );
        assert_eq!(default_model_id(&Source::Local("/m/llama/config.json".into())), "llama");
        assert_eq!(default_model_id(&Source::parse("org/repo-GGUF:model-Q4_K_M.gguf")), "model-Q4_K_M");
    }

    #[test]
    fn the_rate_meter_counts_recent_tokens() {
        let m = RateMeter::new();
        assert_eq!(m.rate(), 0.0);
        m.add(30);
        assert!(m.rate() > 0.0);
    }
}
