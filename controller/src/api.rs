//! The controller's gRPC services: `Inference` (routed to replicas), `Deployments`,
//! `Cluster`, `Models`, and `WorkerLink` (the workers' side door).

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::Stream;
use gantry_core::catalog::Catalog;
use gantry_core::quant::WeightDtype;
use gantry_core::select::{Latency, Need, Task, select};
use gantry_core::shard::fit;
use gantry_core::vram::{ServeOptions, estimate_vram};
use gantry_proto::v1 as pb;
use gantry_proto::v1::worker_client::WorkerClient;
use pb::worker_message::Message as FromWorker;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::cluster::{Cluster, Target};
use crate::spec::DeploymentSpec;

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Implements every controller service over one `Cluster`.
#[derive(Debug, Clone)]
pub struct Api {
    cluster: Arc<Cluster>,
    /// Whether a worker must present a client certificate (mutual TLS) to attach.
    worker_certificates: bool,
    /// One permit per request relayed (`ControllerConfig::max_requests`).
    relays: Arc<tokio::sync::Semaphore>,
}

impl Api {
    pub fn new(cluster: Arc<Cluster>) -> Api {
        let relays = Arc::new(tokio::sync::Semaphore::new(cluster.config().max_requests));
        Api { cluster, worker_certificates: false, relays }
    }

    /// Requires workers to present a certificate the TLS layer verified against the client CA.
    pub fn require_worker_certificates(mut self, yes: bool) -> Api {
        self.worker_certificates = yes;
        self
    }
}

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(0);

fn request_id(given: &str) -> String {
    if given.trim().is_empty() {
        format!("c{:x}-{}", std::process::id(), REQUEST_SEQ.fetch_add(1, Ordering::Relaxed))
    } else {
        given.trim().to_string()
    }
}

/// The `grpc-timeout` a client set, as a duration.
fn deadline_of<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A status code as a metric label: `invalid_argument`, `unavailable` …
pub fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, ch) in format!("{code:?}").chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_lowercase());
    }
    out
}

/// Whether a worker's error means the replica failed (the worker died, its connection broke,
/// a pipeline stage went away) rather than that the request is wrong: then the request may go
/// on elsewhere.
fn replica_failed(e: &Status) -> bool {
    let transport = || {
        let m = e.message();
        ["transport", "connect", "connection", "broken pipe", "h2 protocol", "reset", "went away"]
            .iter()
            .any(|w| m.contains(w))
    };
    match e.code() {
        tonic::Code::Unavailable => true,
        tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled => transport(),
        _ => false,
    }
}

/// Events to a client: a request is relayed by a task of its own that keeps at most this many
/// ahead of the client.
const RELAY_BUFFER: usize = 16;

/// One routed request: what it asked for and what has been delivered, so that when its replica
/// fails mid-stream it can go on on another one from where it stopped.
struct Relay {
    cluster: Arc<Cluster>,
    model: String,
    input: pb::generate_request::Input,
    sampling: Option<pb::SamplingParams>,
    request_id: String,
    deadline: Option<Instant>,
    /// Token ids delivered to the client.
    sent: Vec<u32>,
    /// Whether held-back text (sent once, at the end) was delivered.
    flushed: bool,
    /// Replicas that failed this request (worker, replica id).
    failed: Vec<(String, String)>,
    started: Instant,
    last_token: Option<Instant>,
}

/// Holds a request against its replica's in-flight count while it runs there.
struct Attached {
    target: Target,
    events: Streaming<pb::GenerateEvent>,
}

impl Attached {
    fn new(target: Target, events: Streaming<pb::GenerateEvent>) -> Attached {
        target.inflight.fetch_add(1, Ordering::Relaxed);
        Attached { target, events }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.target.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a relay ended.
enum Ending {
    Done,
    Cancelled,
    Failed(Status),
}

impl Relay {
    /// Opens the request on a ready replica, past the ones that failed it, resuming after the
    /// tokens already delivered.
    async fn attach(&mut self) -> Result<Attached, Status> {
        let mut unreachable = Vec::new();
        loop {
            let target = self.cluster.pick(&self.model, &self.failed).map_err(|e| {
                if unreachable.is_empty() {
                    e
                } else {
                    Status::new(e.code(), format!("{} ({})", e.message(), unreachable.join("; ")))
                }
            })?;
            let mut req = Request::new(pb::GenerateRequest {
                model_id: target.model_id.clone(),
                input: Some(self.input.clone()),
                sampling: self.sampling.clone(),
                request_id: self.request_id.clone(),
                resume_tokens: self.sent.clone(),
            });
            if let Some(deadline) = self.deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Status::deadline_exceeded("the request's deadline passed while generating"));
                }
                req.set_timeout(left);
            }
            info!(
                request_id = %self.request_id,
                model = %self.model,
                worker = %target.worker,
                replica = %target.model_id,
                resume_after = self.sent.len(),
                "routing"
            );
            match WorkerClient::new(target.channel.clone()).generate(req).await {
                Ok(r) => return Ok(Attached::new(target, r.into_inner())),
                Err(e) if replica_failed(&e) => {
                    warn!(request_id = %self.request_id, worker = %target.worker, error = %e.message(), "replica unreachable; trying another");
                    unreachable.push(format!(
                        "worker {} serving replica {}: {}",
                        target.worker,
                        target.model_id,
                        e.message()
                    ));
                    self.failed.push((target.worker, target.model_id));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Forwards `at`'s events to `tx` until the request ends or its replica fails (`Ok`).
    async fn forward(
        &mut self,
        at: &mut Attached,
        tx: &mpsc::Sender<Result<pb::GenerateEvent, Status>>,
    ) -> Result<Ending, Status> {
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let deadline = tokio::time::sleep_until(self.deadline.unwrap_or(far));
        tokio::pin!(deadline);
        loop {
            let message = tokio::select! {
                () = tx.closed() => return Ok(Ending::Cancelled),
                () = &mut deadline => {
                    warn!(request_id = %self.request_id, worker = %at.target.worker, "deadline exceeded; cancelling");
                    return Ok(Ending::Failed(Status::deadline_exceeded("the request's deadline passed while generating")));
                }
                m = at.events.message() => m,
            };
            let ev = match message {
                Ok(Some(ev)) => ev,
                Ok(None) => return Err(Status::unavailable("its stream ended before the request finished")),
                Err(e) if replica_failed(&e) => return Err(e),
                Err(e) => return Ok(Ending::Failed(e)),
            };
            let done = match &ev.event {
                Some(pb::generate_event::Event::Token(t)) => match t.token_id {
                    Some(id) => {
                        self.sent.push(id);
                        let now = Instant::now();
                        let first = self.last_token.is_none().then(|| now - self.started);
                        let gap = self.last_token.map(|t| now - t);
                        self.last_token = Some(now);
                        crate::metrics::token(&self.model, first, gap);
                        false
                    }
                    // Held-back text is sent once; a resumed run that reaches the same end sends it again.
                    None if self.flushed => continue,
                    None => {
                        self.flushed = true;
                        false
                    }
                },
                Some(pb::generate_event::Event::Done(_)) => true,
                None => false,
            };
            if tx.send(Ok(ev)).await.is_err() {
                return Ok(Ending::Cancelled);
            }
            if done {
                return Ok(Ending::Done);
            }
        }
    }

    /// Runs the request to its end, moving it to another replica whenever its replica fails.
    async fn run(mut self, mut at: Attached, tx: mpsc::Sender<Result<pb::GenerateEvent, Status>>) {
        let ending = loop {
            let lost = match self.forward(&mut at, &tx).await {
                Ok(ending) => break ending,
                Err(e) => e,
            };
            let from = at.target.clone();
            drop(at);
            self.failed.push((from.worker.clone(), from.model_id.clone()));
            match self.attach().await {
                Ok(next) => {
                    warn!(
                        request_id = %self.request_id,
                        model = %self.model,
                        from_worker = %from.worker,
                        to_worker = %next.target.worker,
                        to_replica = %next.target.model_id,
                        tokens_sent = self.sent.len(),
                        error = %lost.message(),
                        "replica failed mid-stream; resumed on another"
                    );
                    crate::metrics::migration(&self.model, "resumed");
                    at = next;
                }
                Err(e) => {
                    crate::metrics::migration(&self.model, "failed");
                    let e = if e.code() == tonic::Code::Unavailable {
                        Status::unavailable(format!(
                            "worker {} serving replica {} failed after {} tokens ({}), and no other replica could go on with the request: {}",
                            from.worker,
                            from.model_id,
                            self.sent.len(),
                            lost.message(),
                            e.message()
                        ))
                    } else {
                        e
                    };
                    warn!(request_id = %self.request_id, model = %self.model, error = %e.message(), "replica failed mid-stream; request failed");
                    break Ending::Failed(e);
                }
            }
        };
        let outcome = match ending {
            Ending::Done => "ok".to_string(),
            Ending::Cancelled => "cancelled".to_string(),
            Ending::Failed(e) => {
                let name = code_name(e.code());
                let _ = tx.send(Err(e)).await;
                name
            }
        };
        crate::metrics::request_finished(&self.model, &outcome);
    }
}

impl Api {
    /// A fresh request id, as the gRPC API gives requests that bring none.
    pub fn new_request_id() -> String {
        request_id("")
    }

    /// Starts a generation on a ready replica of `model` (the OpenAI HTTP API's way in):
    /// the worker's events as they come; dropping the stream cancels it.
    pub async fn open_stream(
        &self,
        model: &str,
        input: pb::generate_request::Input,
        sampling: Option<pb::SamplingParams>,
        request_id: String,
        deadline: Option<Duration>,
    ) -> Result<EventStream<pb::GenerateEvent>, Status> {
        self.route(model, input, sampling, request_id, deadline).await.map(Response::into_inner)
    }

    /// Starts a request on a replica and relays its events; a replica that fails mid-stream
    /// hands the request to another, which goes on after the tokens already sent.
    async fn route(
        &self,
        model: &str,
        input: pb::generate_request::Input,
        sampling: Option<pb::SamplingParams>,
        request_id: String,
        deadline: Option<Duration>,
    ) -> Result<Response<EventStream<pb::GenerateEvent>>, Status> {
        if model.trim().is_empty() {
            return Err(Status::invalid_argument("the request names no model; `Models/List` shows what is deployed"));
        }
        let Ok(permit) = self.relays.clone().try_acquire_owned() else {
            let label = if self.cluster.get(model).is_ok() { model } else { "(unknown)" };
            crate::metrics::request_finished(label, "resource_exhausted");
            let limit = self.cluster.config().max_requests;
            return Err(Status::resource_exhausted(format!(
                "the controller is relaying {limit} requests, its limit (--max-requests); retry later"
            )));
        };
        // The deployment's defaults fill what the request leaves unset.
        let sampling = match self.cluster.spec(model) {
            Some(spec) => spec.sampling.apply(sampling),
            None => sampling,
        };
        let mut relay = Relay {
            cluster: self.cluster.clone(),
            model: model.to_string(),
            input,
            sampling,
            request_id,
            deadline: deadline.map(|d| Instant::now() + d),
            sent: Vec::new(),
            flushed: false,
            failed: Vec::new(),
            started: Instant::now(),
            last_token: None,
        };
        let attached = relay.attach().await.inspect_err(|e| {
            // Names that are not deployments are not labels (anyone could make up millions).
            let label = if e.code() == tonic::Code::NotFound { "(unknown)" } else { model };
            crate::metrics::request_finished(label, &code_name(e.code()));
        })?;
        let (tx, rx) = mpsc::channel(RELAY_BUFFER);
        tokio::spawn(async move {
            relay.run(attached, tx).await;
            drop(permit);
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl pb::inference_server::Inference for Api {
    type GenerateStream = EventStream<pb::GenerateEvent>;
    type ChatStream = EventStream<pb::GenerateEvent>;

    async fn generate(&self, request: Request<pb::InferenceRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let deadline = deadline_of(&request);
        let r = request.into_inner();
        let id = request_id(&r.request_id);
        self.route(&r.model, pb::generate_request::Input::Prompt(r.prompt), r.sampling, id, deadline).await
    }

    async fn chat(&self, request: Request<pb::ChatRequest>) -> Result<Response<Self::ChatStream>, Status> {
        let deadline = deadline_of(&request);
        let r = request.into_inner();
        if r.messages.is_empty() {
            return Err(Status::invalid_argument("the chat has no messages"));
        }
        let id = request_id(&r.request_id);
        let chat = pb::Conversation { messages: r.messages };
        self.route(&r.model, pb::generate_request::Input::Chat(chat), r.sampling, id, deadline).await
    }
}

#[tonic::async_trait]
impl pb::deployments_server::Deployments for Api {
    type WatchStream = EventStream<pb::DeploymentEvent>;

    async fn apply(&self, request: Request<pb::ApplyRequest>) -> Result<Response<pb::Deployment>, Status> {
        let r = request.into_inner();
        let spec = DeploymentSpec::from_proto(r.spec)?;
        Ok(Response::new(self.cluster.apply(r.name.trim(), spec).await?))
    }

    async fn get(&self, request: Request<pb::GetDeploymentRequest>) -> Result<Response<pb::Deployment>, Status> {
        Ok(Response::new(self.cluster.get(&request.into_inner().name)?))
    }

    async fn list(
        &self,
        _request: Request<pb::ListDeploymentsRequest>,
    ) -> Result<Response<pb::ListDeploymentsResponse>, Status> {
        Ok(Response::new(pb::ListDeploymentsResponse { deployments: self.cluster.list() }))
    }

    async fn scale(&self, request: Request<pb::ScaleRequest>) -> Result<Response<pb::Deployment>, Status> {
        let r = request.into_inner();
        Ok(Response::new(self.cluster.scale(&r.name, r.replicas).await?))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteDeploymentRequest>,
    ) -> Result<Response<pb::DeleteDeploymentResponse>, Status> {
        self.cluster.delete(&request.into_inner().name).await?;
        Ok(Response::new(pb::DeleteDeploymentResponse {}))
    }

    async fn watch(
        &self,
        _request: Request<pb::WatchDeploymentsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (current, mut rx) = self.cluster.watch();
        let mut closing = self.cluster.closing();
        let (tx, out) = mpsc::channel(64);
        tokio::spawn(async move {
            for d in current {
                let e = pb::DeploymentEvent { kind: pb::deployment_event::Kind::Existing as i32, deployment: Some(d) };
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            loop {
                let next = tokio::select! {
                    next = rx.recv() => next,
                    () = async { let _ = closing.wait_for(|c| *c).await; } => {
                        let _ = tx.send(Err(Status::unavailable("the controller is stopping; watch again"))).await;
                        return;
                    }
                };
                let msg = match next {
                    Ok(e) => Ok(e),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        Err(Status::data_loss(format!("the watch fell {n} changes behind; watch again")))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let end = msg.is_err();
                if tx.send(msg).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for Api {
    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        Ok(Response::new(pb::ListWorkersResponse { workers: self.cluster.workers() }))
    }
}

fn invalid(e: impl ToString) -> Status {
    Status::invalid_argument(e.to_string())
}

/// A model for `Inspect`: a path on the controller, or a catalog id.
fn inspect_spec(model: &str) -> Result<gantry_core::ModelSpec, Status> {
    let path = Path::new(model);
    if path.exists() {
        return gantry_worker::store::read_spec(path).map_err(invalid);
    }
    let catalog = Catalog::builtin().map_err(|e| Status::internal(e.to_string()))?;
    match catalog.get(model) {
        Ok(entry) => entry.spec().map_err(invalid),
        Err(_) => Err(Status::not_found(format!(
            "`{model}` is neither a path on the controller nor a model of Gantry's catalog"
        ))),
    }
}

fn request_gpus(gpus: &[pb::Gpu]) -> Vec<gantry_core::Gpu> {
    gpus.iter().map(|g| gantry_core::Gpu { name: g.name.clone(), memory_bytes: g.memory_bytes }).collect()
}

#[tonic::async_trait]
impl pb::models_server::Models for Api {
    async fn inspect(&self, request: Request<pb::InspectRequest>) -> Result<Response<pb::InspectResponse>, Status> {
        let r = request.into_inner();
        let spec = inspect_spec(r.model.trim())?;
        let options = ServeOptions {
            context: (r.context > 0).then_some(r.context),
            batch: r.batch.max(1),
            dtype: if r.dtype.is_empty() { None } else { Some(WeightDtype::parse(&r.dtype).map_err(invalid)?) },
            ..ServeOptions::default()
        };
        let estimate = estimate_vram(&spec, &options).map_err(invalid)?;
        let gpus = if r.gpus.is_empty() { self.cluster.cluster_gpus() } else { request_gpus(&r.gpus) };
        let (stages, no_fit_reason) = if gpus.is_empty() {
            (Vec::new(), String::new())
        } else {
            let free: Vec<u64> = gpus.iter().map(|g| g.memory_bytes).collect();
            match fit(&spec, &options, &free).map_err(invalid)? {
                gantry_core::Fit::NoFit { reason } => (Vec::new(), reason),
                f => (
                    f.stages()
                        .iter()
                        .map(|s| pb::Stage {
                            gpu_index: s.device as u32,
                            layer_start: s.layers.start,
                            layer_end: s.layers.end,
                            total_bytes: s.total_bytes,
                            free_bytes: s.free_bytes,
                        })
                        .collect(),
                    String::new(),
                ),
            }
        };
        Ok(Response::new(pb::InspectResponse {
            model: Some(pb::ModelFacts {
                name: spec.name.clone(),
                family: spec.family.to_string(),
                family_group: spec.family.group().into(),
                parameters: spec.parameters.total,
                active_parameters: spec.parameters.active,
                size_class: spec.size_class.as_str().into(),
                weights_dtype: estimate.weights_dtype.clone(),
                weights_bytes: spec.weights.bytes,
                context_length: spec.context.length,
                instruct: spec.tuning.instruct,
                instruct_evidence: spec.tuning.evidence.clone(),
                layers: spec.architecture.num_layers,
            }),
            memory: Some(pb::MemoryEstimate {
                weights_bytes: estimate.weights_bytes,
                kv_cache_bytes: estimate.kv_cache_bytes,
                activation_bytes: estimate.activation_bytes,
                overhead_bytes: estimate.overhead_bytes,
                total_bytes: estimate.total_bytes,
                context: estimate.context,
                batch: estimate.batch,
            }),
            stages,
            no_fit_reason,
        }))
    }

    async fn select(&self, request: Request<pb::SelectRequest>) -> Result<Response<pb::SelectResponse>, Status> {
        let r = request.into_inner();
        let need = Need {
            task: Task::parse(if r.task.is_empty() { "chat" } else { &r.task }).map_err(invalid)?,
            latency: Latency::parse(if r.latency.is_empty() { "interactive" } else { &r.latency }).map_err(invalid)?,
            min_context: (r.min_context > 0).then_some(r.min_context),
            no_gated: r.no_gated,
            max_params: (r.max_parameters > 0).then_some(r.max_parameters),
        };
        let gpus = if r.gpus.is_empty() { self.cluster.cluster_gpus() } else { request_gpus(&r.gpus) };
        let catalog = Catalog::builtin().map_err(|e| Status::internal(e.to_string()))?;
        let selection = select(&need, &gpus, &catalog).map_err(invalid)?;
        Ok(Response::new(pb::SelectResponse {
            candidates: selection
                .candidates
                .into_iter()
                .map(|c| pb::Candidate {
                    id: c.id,
                    score: c.score,
                    parameters: c.parameters,
                    context: c.context,
                    dtype: c.dtype,
                    memory_bytes: c.memory_bytes,
                    gpus_used: c.gpus_used as u32,
                    gated: c.gated,
                    reasons: c.reasons,
                })
                .collect(),
            rejected: selection.rejected.into_iter().map(|r| pb::Rejection { id: r.id, reasons: r.reasons }).collect(),
        }))
    }

    async fn list(&self, _request: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse { models: self.cluster.models() }))
    }
}

#[tonic::async_trait]
impl pb::worker_link_server::WorkerLink for Api {
    type AttachStream = EventStream<pb::ControllerMessage>;

    async fn attach(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        // The handshake verified any certificate against the client CA; a worker must have one.
        if self.worker_certificates && request.peer_certs().is_none_or(|c| c.is_empty()) {
            warn!(peer = ?request.remote_addr(), "refused a worker link without a client certificate");
            return Err(Status::unauthenticated(
                "this controller requires workers to present a TLS client certificate signed by its --tls-client-ca (gantry worker --tls-cert/--tls-key)",
            ));
        }
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no registration within 10 s of attaching"))??;
        let Some(pb::WorkerMessage { message: Some(FromWorker::Register(reg)) }) = first else {
            return Err(Status::invalid_argument("the first message on a worker link must be a registration"));
        };
        let worker = reg.worker_id.trim().to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        let session = self.cluster.register(reg, tx)?;
        let cluster = self.cluster.clone();
        let mut closing = self.cluster.closing();
        tokio::spawn(async move {
            loop {
                // A stopping controller stops reading, which resets the stream: a graceful
                // stop does not wait on links that would otherwise stay open.
                let next = tokio::select! {
                    next = inbound.message() => next,
                    () = async { let _ = closing.wait_for(|c| *c).await; } => break,
                };
                match next {
                    Ok(Some(pb::WorkerMessage { message: Some(m) })) => match m {
                        FromWorker::Heartbeat(status) => cluster.heartbeat(&worker, session, status),
                        FromWorker::Progress(p) => cluster.progress(&worker, p),
                        FromWorker::Result(r) => cluster.command_result(&worker, r),
                        FromWorker::Register(_) => warn!(worker, "ignoring a second registration on one link"),
                    },
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        warn!(worker, error = %e, "worker link failed");
                        break;
                    }
                }
            }
            cluster.disconnected(&worker, session);
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}
