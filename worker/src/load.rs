//! Loading a model: resolve its source (downloading it once), bind its layer segments to
//! devices, check the memory they need against what is free (`admit`), build the engine's parts,
//! and add it to the model table. A load of a name already loading is waited for; an unload
//! asked while it loads drops it when it ends.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Instant;

use gantry_core::WireDtype;
use gantry_core::measured::{Measurement, Terms};
use gantry_core::units::format_bytes;
use gantry_core::vram::{DeviceKind, ServeOptions, VramEstimate, estimate_vram};
use gantry_engine::files::ModelFiles;
use gantry_engine::model::Backend;
use gantry_engine::pipeline::Segment;
use gantry_proto::v1 as pb;
use gantry_store::Source;
use tokio::sync::{Semaphore, mpsc};
use tracing::info;

use crate::devices::{self, DeviceBinding};
use crate::error::WorkerError;
use crate::gpu::{GpuInfo, InventorySource};
use crate::measure;
use crate::served::{NextStage, RateMeter, Served};
use crate::state::WorkerState;

/// Where a load reports its progress (the `LoadModel` stream, or the controller link).
pub type LoadEvents = mpsc::Sender<Result<pb::LoadModelEvent, tonic::Status>>;

impl WorkerState {
    /// Loads a model, sending progress to `events`; the model is served once this returns Ok.
    pub async fn load(
        self: &Arc<Self>,
        req: pb::LoadModelRequest,
        events: LoadEvents,
    ) -> Result<pb::ModelInfo, WorkerError> {
        if req.source.trim().is_empty() {
            return Err(WorkerError::Invalid("source is empty: give a model folder, a .gguf file or a Hub id".into()));
        }
        // A source from a caller is read by this worker: only those the operator allowed.
        gantry_store::policy::current().check(req.source.trim()).map_err(WorkerError::PermissionDenied)?;
        let source = Source::parse(req.source.trim());
        let model_id =
            if req.model_id.trim().is_empty() { default_model_id(&source) } else { req.model_id.trim().into() };
        for s in segments(&req) {
            if s.layer_end < s.layer_start {
                return Err(WorkerError::Invalid(format!(
                    "layers [{}, {}): the end is before the start",
                    s.layer_start, s.layer_end
                )));
            }
        }
        WireDtype::parse(&req.wire_dtype).map_err(|e| WorkerError::Invalid(e.to_string()))?;
        // A load of the same name already running is waited for (the controller may send a
        // load again after a reconnect), then this one goes on: done if it loaded the same
        // source, refused if another.
        loop {
            if let Ok(m) = self.model(&model_id) {
                if m.info.source == req.source.trim() {
                    return Ok(m.info.clone());
                }
                return Err(WorkerError::AlreadyLoaded { id: model_id, source_now: m.info.source.clone() });
            }
            let started = self.loading.lock().map_err(|_| WorkerError::poisoned("loading"))?.insert(model_id.clone());
            if started {
                break;
            }
            if events.is_closed() {
                return Err(WorkerError::Aborted("the caller went away while an earlier load of the model ran".into()));
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
        events: &LoadEvents,
    ) -> Result<pb::ModelInfo, WorkerError> {
        let started = Instant::now();
        let progress_tx = events.clone();
        let mut last_sent = Instant::now() - std::time::Duration::from_secs(1);
        // A token sent with the load (a Kubernetes Secret's) stands in for the worker's own.
        let hub = match req.hf_token.trim() {
            "" => self.hub.clone(),
            token => self.hub.with_token(token),
        };
        let path = gantry_store::resolve(source, &hub, &mut |p| {
            // A few events a second are plenty; the last one always goes.
            if p.done == p.total || last_sent.elapsed().as_millis() >= 200 {
                last_sent = Instant::now();
                let _ = progress_tx.try_send(Ok(progress_event("download", &p.file, p.done, p.total)));
            }
        })
        .await?;

        let gpus = self.gpus().map_err(|e| WorkerError::Internal(format!("reading the GPUs: {e}")))?;
        let bindings = segments(req).iter().map(|s| bind_ranks(s, &gpus)).collect::<Result<Vec<_>, _>>()?;
        let next = match req.next_stage.trim() {
            "" => None,
            address => Some(NextStage {
                address: address.to_string(),
                channel: self
                    .stage_endpoint(address)?
                    .connect_timeout(std::time::Duration::from_secs(3))
                    .tcp_nodelay(true)
                    // A next stage cut off silently (no reset, no FIN) would hold a request
                    // until its deadline, or forever without one: HTTP/2 pings end the
                    // connection, and every request on it, within STAGE_PING + STAGE_PING_TIMEOUT.
                    .http2_keep_alive_interval(STAGE_PING)
                    .keep_alive_timeout(STAGE_PING_TIMEOUT)
                    .keep_alive_while_idle(true)
                    .connect_lazy(),
                wire: WireDtype::parse(&req.wire_dtype).map_err(|e| WorkerError::Invalid(e.to_string()))?,
                token: self.cluster_token(),
            }),
        };
        let state = self.clone();
        let req = req.clone();
        let model_id = model_id.to_string();
        let load_tx = events.clone();
        let served = tokio::task::spawn_blocking(move || {
            let load = Load { model_id: &model_id, path, req: &req, bindings, next, gpus: &gpus, started };
            state.load_blocking(load, &load_tx)
        })
        .await
        .map_err(|e| WorkerError::Internal(format!("the load stopped: {e}")))??;
        let info = served.info.clone();
        // Decided under the model table's lock, as `unload` decides.
        let mut models = self.models.write().map_err(|_| WorkerError::poisoned("model table"))?;
        if self.unload_when_loaded.lock().map_err(|_| WorkerError::poisoned("unload"))?.remove(&info.model_id) {
            info!(model = %info.model_id, "unloaded as asked while it loaded");
            return Err(WorkerError::Aborted(format!("model `{}` was unloaded while it loaded", info.model_id)));
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

    /// Reads the files and builds the model's parts (on a blocking thread).
    fn load_blocking(&self, load: Load<'_>, events: &LoadEvents) -> Result<Served, WorkerError> {
        let Load { model_id, path, req, bindings, next, gpus, started } = load;
        let mut files = ModelFiles::open(&path)?;
        let trained = files.config.context_length;
        let context = match req.context_length {
            0 => trained,
            n if n as usize > trained => {
                return Err(WorkerError::Invalid(format!(
                    "context_length {n}: {} was trained for {trained} tokens; ask for at most that",
                    files.spec.name
                )));
            }
            n => n as usize,
        };
        std::sync::Arc::make_mut(&mut files.config).context_length = context;
        let layers = files.config.num_layers;
        let ranges = layer_ranges(&segments(req), layers, next.is_some())
            .map_err(|e| WorkerError::Invalid(format!("{}: {e}", files.spec.name)))?;

        // Admission: the estimate for this context and `parallel` sequences, in proportion to
        // each segment's layers, against what is free on the device it is counted against.
        let options = ServeOptions {
            context: Some(context as u64),
            batch: self.options.parallel as u64,
            device: if bindings.iter().flatten().all(|b| b.engine_device == "cpu")
                && gpus.first().is_none_or(|g| g.source != InventorySource::Declared)
            {
                DeviceKind::Cpu
            } else {
                DeviceKind::Gpu
            },
            ..ServeOptions::default()
        };
        let mut estimate = estimate_vram(&files.spec, &options).map_err(|e| WorkerError::Invalid(e.to_string()))?;
        let experts_on_host =
            if req.experts_on_host { self.experts_on_host(&files, &options, &bindings, &mut estimate)? } else { 0 };
        let admission = Admission {
            name: &files.spec.name,
            estimate: &estimate,
            layers,
            context,
            sequences: self.options.parallel,
        };
        let needs = admission.check(&bindings, &ranges, gpus)?;

        let meter = Meter::new(self, &bindings);
        let before = meter.read();
        let tokenizer = files.tokenizer()?;
        let template = files.chat_template(&tokenizer, &self.options.templates).map_err(|e| e.to_string());
        let after_tokenizer = meter.read();
        let total_layers: usize = ranges.iter().map(|r| r.len()).sum();
        let mut done_before = 0;
        let mut segments = Vec::with_capacity(ranges.len());
        for (ranks, range) in bindings.iter().zip(&ranges) {
            let binding = &ranks[0];
            let backend = match ranks.as_slice() {
                [one] if experts_on_host > 0 => Backend::ExpertsOnHost(gantry_engine::device(&one.engine_device)?),
                [one] => Backend::for_device(&gantry_engine::device(&one.engine_device)?),
                // Every rank on Candle (declared GPUs: Candle on the CPU, each rank a thread).
                ranks => Backend::TensorParallel(
                    ranks.iter().map(|b| gantry_engine::device(&b.engine_device)).collect::<Result<_, _>>()?,
                ),
            };
            let mut last_layers = usize::MAX;
            let part = files.load_part_on(range.clone(), &backend, &mut |p| {
                // A tensor-parallel segment loads its layers once per rank.
                let done = p.layers_done * range.len() / p.layers_total.max(1);
                if done != last_layers {
                    last_layers = done;
                    let _ = events.try_send(Ok(progress_event(
                        "load",
                        "layers",
                        (done_before + done) as u64,
                        total_layers as u64,
                    )));
                }
            })?;
            done_before += range.len();
            if let Some(kv) = part.kv_pool() {
                // The memory reserved for `parallel` sequences at the full context.
                kv.set_max_blocks(self.options.parallel * context.div_ceil(gantry_engine::cpu::kv::BLOCK_TOKENS));
                // Replicas of a deployment share a namespace, so a prompt has the same keys on each.
                let namespace = req.prefix_namespace.trim();
                kv.set_model(if namespace.is_empty() { model_id } else { namespace });
            }
            segments.push(Segment::new(part, self.turn(&binding.engine_device)?, self.options.step_tokens));
        }
        let after_layers = meter.read();
        let measured = self.measure_load(
            &meter,
            &path,
            &files,
            &estimate,
            req,
            &segments,
            started,
            [before, after_tokenizer, after_layers],
        );
        let extra_eos = files.spec.eos_token_ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        let (first, last) = (ranges.first().cloned().unwrap_or_default(), ranges.last().cloned().unwrap_or_default());
        let info = pb::ModelInfo {
            model_id: model_id.to_string(),
            source: req.source.trim().to_string(),
            family: files.spec.family.to_string(),
            parameters: files.spec.parameters.total,
            context_length: context as u64,
            weights_bytes: ranges.iter().map(|r| admission.share(estimate.weights_bytes, r)).sum(),
            device: bindings.first().map(|b| b[0].label.clone()).unwrap_or_default(),
            layer_start: first.start as u32,
            layer_end: last.end as u32,
            num_layers: layers as u32,
            instruct: files.spec.tuning.instruct,
            chat_template: template.as_ref().map(|t| t.origin.clone()).unwrap_or_default(),
            load_ms: started.elapsed().as_millis() as u64,
            segments: bindings
                .iter()
                .zip(&ranges)
                .map(|(b, r)| pb::LayerSegment {
                    device: b[0].label.clone(),
                    layer_start: r.start as u32,
                    layer_end: r.end as u32,
                    tensor_parallel: if b.len() > 1 { b.iter().map(|r| r.label.clone()).collect() } else { Vec::new() },
                })
                .collect(),
            next_stage: next.as_ref().map(|n| n.address.clone()).unwrap_or_default(),
            experts_on_host_bytes: experts_on_host,
            measurement: measured.as_ref().map(|m| gantry_proto::convert::measurement_to_proto(&m.load)),
        };
        Ok(Served {
            info,
            segments,
            bindings: bindings
                .into_iter()
                .zip(needs)
                .flat_map(|(ranks, need)| ranks.into_iter().map(move |b| (b, need)))
                .collect(),
            next,
            tokenizer,
            template,
            extra_eos,
            slots: Arc::new(Semaphore::new(self.options.max_running.max(1))),
            running: AtomicU32::new(0),
            queued: AtomicU32::new(0),
            tokens: AtomicU64::new(0),
            meter: RateMeter::new(),
            measured,
        })
    }

    /// The load's measurement (see [`crate::measure`]), from the readings before the tokenizer,
    /// after it and after the layers; `None` when another load overlapped this one or nothing
    /// could be read. Starts a new peak of the resident set.
    #[allow(clippy::too_many_arguments)]
    fn measure_load(
        &self,
        meter: &Meter,
        path: &std::path::Path,
        files: &ModelFiles,
        estimate: &VramEstimate,
        req: &pb::LoadModelRequest,
        segments: &[Segment],
        started: Instant,
        readings: [Option<u64>; 3],
    ) -> Option<crate::served::LoadMeasurement> {
        let alone = self.loading.lock().is_ok_and(|l| l.len() == 1);
        let [Some(before), Some(after_tokenizer), Some(after_layers)] = readings else { return None };
        // Only a whole model on one device is what its estimate describes: a pipeline stage, a
        // tensor-parallel group or experts kept on the host take a part of it, or more devices.
        let layers = files.config.num_layers;
        let whole = req.next_stage.trim().is_empty()
            && !req.experts_on_host
            && segments.len() == 1
            && segments[0].part.range == (0..layers)
            && meter.ranks == 1;
        if !whole {
            return None;
        }
        if !alone {
            info!(model = %files.spec.name, "not measured: another load ran at the same time");
            return None;
        }
        let digest = match gantry_model::digest(path) {
            Ok(d) => d,
            Err(e) => {
                info!(model = %files.spec.name, error = %e, "not measured: the files' digest");
                return None;
            }
        };
        let pools = || segments.iter().filter_map(|s| s.part.kv_pool());
        let kv_reserved: u64 = pools().map(|k| (k.max_blocks() * k.shape().bytes_per_block()) as u64).sum();
        let kv_allocated: u64 = pools().map(|k| k.touched_bytes() as u64).sum();
        let readings = measure::Readings { before, after_tokenizer, after_layers };
        let load = Measurement {
            digest,
            device_kind: meter.kind.clone(),
            model: files.spec.name.clone(),
            sources: vec![req.source.trim().to_string()],
            context: estimate.context,
            batch: estimate.batch,
            estimated: Terms::of(estimate),
            measured: readings.terms(kv_reserved, meter.gpu.is_some(), segments[0].part.weight_bytes),
            method: if meter.gpu.is_some() { "nvml" } else { "rss" }.into(),
            load_ms: started.elapsed().as_millis() as u64,
            threads: if meter.gpu.is_some() { 0 } else { gantry_engine::cpu::pool::global().threads() as u32 },
            speed: Vec::new(),
            measured_at_ms: measure::now_ms(),
            by: self.options.worker_id.clone(),
        };
        info!(
            model = %load.model,
            device_kind = %load.device_kind,
            measured = %format_bytes(load.measured.total()),
            estimated = %format_bytes(load.estimated.total()),
            "measured the load"
        );
        measure::reset_peak();
        let resident_after = measure::resident().map_or(after_layers, |(rss, _)| rss);
        Some(crate::served::LoadMeasurement { load, resident_after, kv_allocated })
    }

    /// A load with its experts in host memory: checks that the model has experts and one device,
    /// that the host has room for them, and takes their bytes off the device's estimate.
    /// Returns the experts' bytes.
    fn experts_on_host(
        &self,
        files: &ModelFiles,
        options: &ServeOptions,
        bindings: &[Vec<DeviceBinding>],
        estimate: &mut VramEstimate,
    ) -> Result<u64, WorkerError> {
        let name = &files.spec.name;
        if bindings.len() != 1 || bindings[0].len() != 1 {
            return Err(WorkerError::Invalid(format!(
                "experts_on_host: {name} must be on one device (not split) to keep its experts in host memory"
            )));
        }
        let host = gantry_core::shard::experts_on_host(&files.spec, options)
            .map_err(|e| WorkerError::Invalid(e.to_string()))?
            .ok_or_else(|| {
                WorkerError::Invalid(format!(
                    "experts_on_host: {name} is not a mixture of experts; it has no experts to keep on the host"
                ))
            })?;
        let available = crate::state::host_available_bytes();
        if host.host_bytes > available {
            return Err(WorkerError::Exhausted(format!(
                "{name}'s experts need {} of host memory; {} is available",
                format_bytes(host.host_bytes),
                format_bytes(available)
            )));
        }
        estimate.weights_bytes = host.stage.weights_bytes;
        estimate.overhead_bytes = host.stage.overhead_bytes;
        estimate.total_bytes = host.stage.total_bytes;
        Ok(host.host_bytes)
    }

    /// The endpoint of another stage: TLS with this worker's certificate when workers serve TLS.
    fn stage_endpoint(&self, address: &str) -> Result<tonic::transport::Endpoint, WorkerError> {
        let scheme = if self.options.stage_tls.is_some() { "https" } else { "http" };
        let endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|e| WorkerError::Invalid(format!("next_stage `{address}`: {e}")))?;
        match &self.options.stage_tls {
            Some(tls) => endpoint
                .tls_config(tls.clone())
                .map_err(|e| WorkerError::Invalid(format!("TLS to next_stage `{address}`: {e}"))),
            None => Ok(endpoint),
        }
    }
}

/// Where a load's memory is read: the resident set of this process, or the used memory of the
/// GPU the load's first segment is bound to.
struct Meter<'a> {
    state: &'a WorkerState,
    /// The GPU's inventory index (a load on a GPU).
    gpu: Option<u32>,
    kind: String,
    /// Devices of the load (a tensor-parallel group has several).
    ranks: usize,
}

impl<'a> Meter<'a> {
    fn new(state: &'a WorkerState, bindings: &[Vec<DeviceBinding>]) -> Meter<'a> {
        let on_gpu = bindings.iter().flatten().find(|b| b.engine_device != "cpu");
        let gpu = on_gpu.and_then(|b| b.inventory_index);
        let name = gpu.and_then(|i| state.gpus().ok()?.into_iter().find(|g| g.index == i).map(|g| g.name));
        let ranks = bindings.iter().map(Vec::len).sum();
        match name {
            Some(name) => Meter { state, gpu, kind: name, ranks },
            None => Meter { state, gpu: None, kind: measure::cpu_kind(), ranks },
        }
    }

    fn read(&self) -> Option<u64> {
        match self.gpu {
            Some(i) => self.state.gpus().ok()?.into_iter().find(|g| g.index == i).map(|g| g.used_bytes),
            None => measure::resident().map(|(rss, _)| rss),
        }
    }
}

/// How often a stage pings the next one, and how long it waits for the answer before it
/// takes the link for dead (tests/e2e/faults_netns.rs cuts it).
pub const STAGE_PING: std::time::Duration = std::time::Duration::from_secs(5);
pub const STAGE_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a load reads on its blocking thread.
struct Load<'a> {
    model_id: &'a str,
    path: PathBuf,
    req: &'a pb::LoadModelRequest,
    /// Per segment, its device, or the ranks of its tensor-parallel group.
    bindings: Vec<Vec<DeviceBinding>>,
    next: Option<NextStage>,
    gpus: &'a [GpuInfo],
    started: Instant,
}

/// The memory check before a load: the estimate for this context and sequence count, split
/// over the segments in proportion to their layers, against each device's free memory.
#[derive(Debug)]
struct Admission<'a> {
    name: &'a str,
    estimate: &'a VramEstimate,
    layers: usize,
    context: usize,
    sequences: usize,
}

impl Admission<'_> {
    /// `bytes` of the whole model in proportion to `range`'s layers.
    fn share(&self, bytes: u64, range: &std::ops::Range<usize>) -> u64 {
        bytes * range.len() as u64 / self.layers.max(1) as u64
    }

    /// What each device of each segment needs (a tensor-parallel rank: its share of the
    /// segment's weights and KV cache); an error naming the device short of memory, with the
    /// parts.
    fn check(
        &self,
        segments: &[Vec<DeviceBinding>],
        ranges: &[std::ops::Range<usize>],
        gpus: &[GpuInfo],
    ) -> Result<Vec<u64>, WorkerError> {
        let e = self.estimate;
        let needs: Vec<u64> = segments
            .iter()
            .zip(ranges)
            .map(|(ranks, r)| {
                self.share(e.weights_bytes + e.kv_cache_bytes, r) / ranks.len().max(1) as u64
                    + e.activation_bytes
                    + e.overhead_bytes
            })
            .collect();
        // One entry per device of every segment, with that device's need.
        let devices: Vec<(&DeviceBinding, u64, &std::ops::Range<usize>)> = segments
            .iter()
            .zip(&needs)
            .zip(ranges)
            .flat_map(|((ranks, &need), range)| ranks.iter().map(move |b| (b, need, range)))
            .collect();
        for &(binding, _, range) in &devices {
            let Some(g) = binding.inventory_index.and_then(|d| gpus.iter().find(|g| g.index == d)) else { continue };
            // Every segment counted against the same device takes from the same free memory.
            let needed: u64 = devices
                .iter()
                .filter(|(b, _, _)| b.inventory_index == binding.inventory_index)
                .map(|(_, n, _)| n)
                .sum();
            if needed > g.free_bytes {
                let what = if ranges.len() == 1 && range.len() == self.layers {
                    String::new()
                } else {
                    format!(" layers {}", span(range))
                };
                return Err(WorkerError::Exhausted(format!(
                    "{}{what} needs {} on {} ({} weights, {} KV cache for {} tokens × {} sequences, {} activations and overhead); {} of {} is free",
                    self.name,
                    format_bytes(needed),
                    binding.label,
                    format_bytes(self.share(e.weights_bytes, range)),
                    format_bytes(self.share(e.kv_cache_bytes, range)),
                    self.context,
                    self.sequences,
                    format_bytes(e.activation_bytes + e.overhead_bytes),
                    format_bytes(g.free_bytes),
                    format_bytes(g.total_bytes),
                )));
            }
        }
        Ok(needs)
    }
}

/// Layers as people write them (`10-19`).
pub(crate) fn span(layers: &std::ops::Range<usize>) -> String {
    gantry_core::shard::layer_span(&(layers.start as u64..layers.end as u64))
}

/// A segment's devices: its `device`, or the ranks of its tensor-parallel group (each a
/// different inventory device).
fn bind_ranks(segment: &pb::LayerSegment, gpus: &[GpuInfo]) -> Result<Vec<DeviceBinding>, WorkerError> {
    if segment.tensor_parallel.len() < 2 {
        return Ok(vec![devices::bind(&segment.device, gpus)?]);
    }
    let ranks = segment.tensor_parallel.iter().map(|d| devices::bind(d, gpus)).collect::<Result<Vec<_>, _>>()?;
    for (i, r) in ranks.iter().enumerate() {
        if r.inventory_index.is_none() || ranks[..i].iter().any(|o| o.inventory_index == r.inventory_index) {
            return Err(WorkerError::Invalid(format!(
                "tensor_parallel {:?}: each rank needs a device of its own (gpu:N or cuda:N), and `{}` is not one",
                segment.tensor_parallel, r.label
            )));
        }
    }
    Ok(ranks)
}

/// The layer segments a load asks for: its `segments`, or the one its `device` and
/// `layer_start`/`layer_end` describe.
fn segments(req: &pb::LoadModelRequest) -> Vec<pb::LayerSegment> {
    if req.segments.is_empty() {
        vec![pb::LayerSegment {
            device: req.device.clone(),
            layer_start: req.layer_start,
            layer_end: req.layer_end,
            ..Default::default()
        }]
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
    let name = gantry_store::url::file_name(u).unwrap_or_else(|_| "model.gguf".into());
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
