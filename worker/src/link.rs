//! The worker's side of the controller link: one bidirectional stream on which the worker
//! registers, sends heartbeats, and carries out load and unload commands. A lost controller
//! does not stop the worker: it keeps serving what it has and reconnects with backoff.

use std::sync::Arc;
use std::time::Duration;

use gantry_proto::v1 as pb;
use gantry_proto::v1::worker_link_client::WorkerLinkClient;
use pb::controller_message::Message as FromController;
use pb::worker_message::Message as ToController;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::{info, warn};

use gantry_store::hub::error_chain;

use crate::state::WorkerState;

/// Heartbeat period when the controller does not set one.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(2);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Where the controller is and how it reaches this worker.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// `http://host:port` of the controller; several, comma-separated, for controllers that
    /// share an etcd (only the leader listens: the others are tried in turn).
    pub controller: String,
    /// `host:port` the controller dials for `Worker` calls.
    pub advertise: String,
    /// Sent with the link when the controller requires API keys.
    pub api_key: Option<String>,
    /// TLS to the controller (its CA, and this worker's certificate for mutual TLS).
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Whether this worker's own gRPC is served over TLS (the controller then dials it so).
    pub serves_tls: bool,
}

/// The worker's TLS settings for its link, from PEM files: the CA that signed the
/// controller's certificate, and optionally this worker's certificate and key.
pub fn client_tls(
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<tonic::transport::ClientTlsConfig, String> {
    let read = |p: &std::path::Path, flag: &str| std::fs::read(p).map_err(|e| format!("{flag} {}: {e}", p.display()));
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(ca, "--tls-ca")?));
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?));
    }
    Ok(tls)
}

/// Keeps the link up until `shutdown` turns true.
pub async fn run(options: LinkOptions, state: Arc<WorkerState>, mut shutdown: watch::Receiver<bool>) {
    let controllers: Vec<String> = options
        .controller
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| url(c, options.tls.is_some()))
        .collect();
    let mut next = 0;
    let mut backoff = Duration::from_millis(250);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let Some(controller) = controllers.get(next % controllers.len().max(1)).cloned() else { return };
        let outcome = tokio::select! {
            r = session(&controller, &options, &state) => r,
            _ = shutdown.changed() => return,
        };
        match outcome {
            Ok(()) => {
                info!(%controller, "the controller closed the link; reconnecting");
                backoff = Duration::from_millis(250);
            }
            Err(e) => {
                warn!(%controller, error = %e, retry_in_ms = backoff.as_millis() as u64, "controller link down");
                next += 1;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// `host:port` → `http://host:port` (`https://` with TLS).
fn url(controller: &str, tls: bool) -> String {
    match (controller.contains("://"), tls) {
        (true, _) => controller.to_string(),
        (false, false) => format!("http://{controller}"),
        (false, true) => format!("https://{controller}"),
    }
}

/// One connection: register, then heartbeats and commands until the stream ends.
async fn session(controller: &str, options: &LinkOptions, state: &Arc<WorkerState>) -> Result<(), String> {
    let advertise = options.advertise.as_str();
    let bearer = gantry_proto::auth::Bearer::new(options.api_key.as_deref())?;
    let mut endpoint = tonic::transport::Endpoint::from_shared(controller.to_string())
        .map_err(|e| format!("controller address {controller}: {e}"))?;
    if let Some(tls) = &options.tls {
        endpoint = endpoint.tls_config(tls.clone()).map_err(|e| format!("TLS to {controller}: {e}"))?;
    }
    let channel = endpoint.connect().await.map_err(|e| error_chain(&e))?;
    let mut client = WorkerLinkClient::with_interceptor(channel, bearer);
    let (tx, rx) = mpsc::channel::<pb::WorkerMessage>(64);
    let status = state.status().map_err(|e| e.to_string())?;
    let register = pb::WorkerRegistration {
        worker_id: state.options().worker_id.clone(),
        address: advertise.to_string(),
        version: env!("CARGO_PKG_VERSION").into(),
        status: Some(status),
        labels: state.options().labels.clone().into_iter().collect(),
        tls: options.serves_tls,
    };
    tx.send(message(ToController::Register(register))).await.map_err(|e| e.to_string())?;
    let mut inbound = client.attach(ReceiverStream::new(rx)).await.map_err(|e| e.message().to_string())?.into_inner();

    // Aborted when this session ends, however it ends (dropped mid-await included): the
    // heartbeat task holds a sender of the request stream, which must close with the session.
    let mut heartbeat: Option<AbortOnDrop> = None;
    let result = loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(e) => break Err(format!("{}: {}", e.code(), e.message())),
        };
        match msg.message {
            Some(FromController::Registered(r)) => {
                let every = if r.heartbeat_ms == 0 { DEFAULT_HEARTBEAT } else { Duration::from_millis(r.heartbeat_ms) };
                if !r.cluster_token.is_empty() {
                    state.set_cluster_token(&r.cluster_token);
                } else if state.options().require_token {
                    warn!(%controller, "the controller handed no worker token (it did not authenticate this link): this worker's port refuses every call until one does");
                }
                info!(%controller, heartbeat_ms = every.as_millis() as u64, "registered with the controller");
                heartbeat = Some(AbortOnDrop(tokio::spawn(heartbeats(state.clone(), tx.clone(), every))));
            }
            Some(FromController::Load(cmd)) => {
                let (state, tx) = (state.clone(), tx.clone());
                tokio::spawn(async move { load(state, tx, cmd).await });
            }
            Some(FromController::Unload(cmd)) => {
                let id = cmd.request.map(|r| r.model_id).unwrap_or_default();
                let result = state.unload(&id).map_err(Status::from);
                let _ =
                    tx.send(message(ToController::Result(command_result(cmd.command_id, result.map(|()| None))))).await;
            }
            None => {}
        }
    };
    drop(heartbeat);
    result
}

/// A task aborted when this handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn heartbeats(state: Arc<WorkerState>, tx: mpsc::Sender<pb::WorkerMessage>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    // The first heartbeat of a link carries every prefix-cache key (the controller's index of
    // this worker starts afresh), the others what changed.
    let mut resync = true;
    loop {
        tick.tick().await;
        let Ok(status) = state.heartbeat(resync) else { continue };
        resync = false;
        if tx.send(message(ToController::Heartbeat(status))).await.is_err() {
            return;
        }
    }
}

/// Runs a load command, forwarding its progress and then its result.
async fn load(state: Arc<WorkerState>, tx: mpsc::Sender<pb::WorkerMessage>, cmd: pb::LoadCommand) {
    let id = cmd.command_id;
    let (events_tx, mut events_rx) = mpsc::channel(64);
    let forward_tx = tx.clone();
    let forward = tokio::spawn(async move {
        while let Some(Ok(pb::LoadModelEvent { event: Some(pb::load_model_event::Event::Progress(p)) })) =
            events_rx.recv().await
        {
            let progress = pb::CommandProgress { command_id: id, progress: Some(p) };
            let _ = forward_tx.send(message(ToController::Progress(progress))).await;
        }
    });
    let result = state.load(cmd.request.unwrap_or_default(), events_tx).await.map_err(Status::from);
    let _ = forward.await;
    let _ = tx.send(message(ToController::Result(command_result(id, result.map(Some))))).await;
}

fn command_result(command_id: u64, result: Result<Option<pb::ModelInfo>, Status>) -> pb::CommandResult {
    match result {
        Ok(model) => pb::CommandResult { command_id, error: String::new(), code: 0, model },
        Err(e) => pb::CommandResult { command_id, error: e.message().to_string(), code: e.code() as i32, model: None },
    }
}

fn message(m: ToController) -> pb::WorkerMessage {
    pb::WorkerMessage { message: Some(m) }
}
