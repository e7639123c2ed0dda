//! A stand-in worker for load tests and benchmarks of the controller: the real `Worker` gRPC
//! service and the real `WorkerLink` registration, heartbeats and load commands, with a
//! deterministic engine in place of a model. Token `i` of a reply to prompt `p` is a function
//! of `p` and `i` only, so a stream resumed on another stand-in (after `resume_tokens`) goes on
//! with the very tokens an unbroken one gives; tokens come one every `interval`.
//!
//! It stands in for a worker where a real one would measure the model instead of the control
//! plane (1,000 streams on 2 cores). Shared by `tests/load_standin.rs` and the benchmarks in
//! `bench/` (included with `#[path]`); needs tokio, tonic, the protos and the worker crate.

#![allow(dead_code)]

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gantry_proto::v1 as pb;
use pb::worker_link_client::WorkerLinkClient;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Vocabulary of the stand-in engine.
pub const VOCAB: u32 = 32_000;

/// Token `i` of the reply to `prompt`.
pub fn token_at(prompt: &str, i: u32) -> u32 {
    // FNV-1a of the prompt, then one multiply-xorshift step per position.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in prompt.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut x = h ^ u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x % u64::from(VOCAB)) as u32
}

/// The whole reply to `prompt`: what a client must receive.
pub fn reply(prompt: &str, max_tokens: u32) -> Vec<u32> {
    (0..max_tokens).map(|i| token_at(prompt, i)).collect()
}

/// The prompt text a request carries (a chat's messages joined).
pub fn prompt_of(input: Option<&pb::generate_request::Input>) -> String {
    match input {
        Some(pb::generate_request::Input::Prompt(p)) => p.clone(),
        Some(pb::generate_request::Input::Chat(c)) => {
            c.messages.iter().map(|m| format!("{}: {}", m.role, m.content)).collect::<Vec<_>>().join("\n")
        }
        None => String::new(),
    }
}

/// When the process started: with `stamp`, a token's text is the nanoseconds since then at
/// which it was sent (the router benchmark reads one-way latencies from it).
static EPOCH: OnceLock<Instant> = OnceLock::new();

pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// How the stand-in answers.
#[derive(Debug, Clone, Copy)]
pub struct Engine {
    /// Between tokens.
    pub interval: Duration,
    /// Token text: the send time (`now_ns`) instead of the token id.
    pub stamp: bool,
    /// Declared GPU memory.
    pub gpu_bytes: u64,
}

impl Default for Engine {
    fn default() -> Self {
        Engine { interval: Duration::from_millis(10), stamp: false, gpu_bytes: 80 << 30 }
    }
}

#[derive(Clone)]
struct Service {
    engine: Engine,
    id: String,
    served: Arc<AtomicU64>,
}

type Events = Pin<Box<dyn Stream<Item = Result<pb::GenerateEvent, Status>> + Send>>;
type LoadEvents = Pin<Box<dyn Stream<Item = Result<pb::LoadModelEvent, Status>> + Send>>;

fn token_event(chunk: pb::TokenChunk) -> pb::GenerateEvent {
    pb::GenerateEvent { event: Some(pb::generate_event::Event::Token(chunk)) }
}

#[tonic::async_trait]
impl pb::worker_server::Worker for Service {
    type LoadModelStream = LoadEvents;
    type GenerateStream = Events;

    async fn load_model(&self, _: Request<pb::LoadModelRequest>) -> Result<Response<LoadEvents>, Status> {
        Err(Status::unimplemented("the stand-in loads through the link"))
    }

    async fn unload_model(
        &self,
        _: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        Ok(Response::new(pb::UnloadModelResponse {}))
    }

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Events>, Status> {
        let req = request.into_inner();
        let prompt = prompt_of(req.input.as_ref());
        let n = req.sampling.and_then(|s| s.max_tokens).unwrap_or(16);
        let resumed = req.resume_tokens;
        if resumed.len() > n as usize {
            return Err(Status::invalid_argument("more tokens to resume after than max_tokens"));
        }
        if resumed.iter().enumerate().any(|(i, &t)| t != token_at(&prompt, i as u32)) {
            return Err(Status::invalid_argument("resume tokens that this prompt never produced"));
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(8);
        let engine = self.engine;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(engine.interval);
            for i in resumed.len() as u32..n {
                tick.tick().await;
                let id = token_at(&prompt, i);
                let text = if engine.stamp { now_ns().to_string() } else { format!("{id} ") };
                let chunk = pb::TokenChunk { text, token_id: Some(id), ..Default::default() };
                if tx.send(Ok(token_event(chunk))).await.is_err() {
                    return;
                }
            }
            let done = pb::GenerateDone {
                finish_reason: pb::FinishReason::Length as i32,
                usage: Some(pb::Usage { prompt_tokens: prompt.len() as u32, completion_tokens: n }),
                ..Default::default()
            };
            let _ = tx.send(Ok(pb::GenerateEvent { event: Some(pb::generate_event::Event::Done(done)) })).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn tokenize(&self, _: Request<pb::GenerateRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        Err(Status::unimplemented("the stand-in keeps no prefix cache"))
    }

    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(status_with(&self.id, self.engine.gpu_bytes, &[])))
    }
}

/// The stand-in's status with these models loaded.
fn status_with(id: &str, gpu_bytes: u64, model_ids: &[String]) -> pb::StatusResponse {
    pb::StatusResponse {
        worker_id: id.into(),
        gpus: vec![pb::GpuStatus {
            index: 0,
            name: "stand-in".into(),
            total_bytes: gpu_bytes,
            free_bytes: gpu_bytes,
            source: "declared".into(),
            ..Default::default()
        }],
        models: model_ids
            .iter()
            .map(|id| pb::LoadedModel {
                info: Some(pb::ModelInfo { model_id: id.clone(), ..Default::default() }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A running stand-in worker; stops (server and link) when dropped.
pub struct StandIn {
    pub id: String,
    pub addr: std::net::SocketAddr,
    /// Generate calls it accepted.
    pub served: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl StandIn {
    /// Serves on a free loopback port and registers with the controller at `controller`.
    pub async fn start(controller: &str, id: &str, engine: Engine) -> StandIn {
        EPOCH.get_or_init(Instant::now);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        let addr = listener.local_addr().expect("its address");
        let served = Arc::new(AtomicU64::new(0));
        let service = Service { engine, id: id.into(), served: served.clone() };
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(pb::worker_server::WorkerServer::new(service))
                .serve_with_incoming(gantry_proto::serve::incoming(listener))
                .await;
        });
        // Like a real worker, it attaches again (reporting what it holds) when the link drops.
        let (controller, sid, advertise) = (controller.to_string(), id.to_string(), addr.to_string());
        let link = tokio::spawn(async move {
            let held: Arc<Mutex<Vec<String>>> = Arc::default();
            loop {
                link(&controller, &sid, &advertise, engine.gpu_bytes, held.clone()).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        StandIn { id: id.into(), addr, served, tasks: vec![server, link] }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Registers with the controller (reporting the models it holds), heartbeats, and answers load
/// and unload commands at once, until the link drops.
async fn link(controller: &str, id: &str, advertise: &str, gpu_bytes: u64, model_ids: Arc<Mutex<Vec<String>>>) {
    let Ok(mut client) = WorkerLinkClient::connect(controller.to_string()).await else { return };
    let id = id.to_string();
    let (tx, rx) = mpsc::channel(64);
    let reg = pb::WorkerRegistration {
        worker_id: id.clone(),
        address: advertise.to_string(),
        version: "stand-in".into(),
        status: Some(status_with(&id, gpu_bytes, &model_ids.lock().expect("ids").clone())),
        ..Default::default()
    };
    tx.send(pb::WorkerMessage { message: Some(pb::worker_message::Message::Register(reg)) }).await.expect("register");
    let Ok(inbound) = client.attach(ReceiverStream::new(rx)).await else { return };
    let mut inbound = inbound.into_inner();
    let (beat_tx, ids, beat_id) = (tx.clone(), model_ids.clone(), id.clone());
    let beats = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let status = status_with(&beat_id, gpu_bytes, &ids.lock().expect("ids").clone());
            let msg = pb::WorkerMessage { message: Some(pb::worker_message::Message::Heartbeat(status)) };
            if beat_tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    while let Ok(Some(msg)) = inbound.message().await {
        let result = match msg.message {
            Some(pb::controller_message::Message::Load(cmd)) => {
                let req = cmd.request.unwrap_or_default();
                model_ids.lock().expect("ids").push(req.model_id.clone());
                pb::CommandResult {
                    command_id: cmd.command_id,
                    model: Some(pb::ModelInfo { model_id: req.model_id, ..Default::default() }),
                    ..Default::default()
                }
            }
            Some(pb::controller_message::Message::Unload(cmd)) => {
                let gone = cmd.request.map(|r| r.model_id).unwrap_or_default();
                model_ids.lock().expect("ids").retain(|m| *m != gone);
                pb::CommandResult { command_id: cmd.command_id, ..Default::default() }
            }
            _ => continue,
        };
        let status = status_with(&id, gpu_bytes, &model_ids.lock().expect("ids").clone());
        let _ = tx.send(pb::WorkerMessage { message: Some(pb::worker_message::Message::Result(result)) }).await;
        let _ = tx.send(pb::WorkerMessage { message: Some(pb::worker_message::Message::Heartbeat(status)) }).await;
    }
    beats.abort();
}
