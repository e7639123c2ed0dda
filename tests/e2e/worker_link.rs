//! A real worker process attached to a controller: it registers with its GPUs, sends
//! heartbeats, runs load and unload commands, and reconnects when the controller restarts.
//! The controller here is a stand-in — a `WorkerLink` server in the test that records what
//! the worker sends and sends the commands the test chooses — until the controller issue
//! lands its real one.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::worker::{RunningWorker, chat_request, collect};
use gantry_proto::v1 as pb;
use gantry_proto::v1::worker_link_server::{WorkerLink, WorkerLinkServer};
use pb::controller_message::Message as ToWorker;
use pb::worker_message::Message as FromWorker;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// The stream of messages to the attached worker.
type Outbound = mpsc::Sender<Result<pb::ControllerMessage, Status>>;

/// What the stand-in controller saw, and the way to talk back to the attached worker.
#[derive(Clone, Default)]
struct StandIn {
    from_worker: Arc<Mutex<Option<mpsc::UnboundedSender<pb::WorkerMessage>>>>,
    to_worker: Arc<Mutex<Option<Outbound>>>,
}

#[tonic::async_trait]
impl WorkerLink for StandIn {
    type AttachStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

    async fn attach(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        tx.send(Ok(pb::ControllerMessage {
            message: Some(ToWorker::Registered(pb::Registered {
                heartbeat_ms: 200,
                lease_ms: 1000,
                ..Default::default()
            })),
        }))
        .await
        .unwrap();
        *self.to_worker.lock().unwrap() = Some(tx);
        let forward = self.from_worker.lock().unwrap().clone().unwrap();
        tokio::spawn(async move {
            while let Some(Ok(m)) = inbound.next().await {
                let _ = forward.send(m);
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Controller {
    stand_in: StandIn,
    messages: mpsc::UnboundedReceiver<pb::WorkerMessage>,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

impl Controller {
    async fn start(addr: SocketAddr) -> Controller {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let stand_in = StandIn::default();
        let (tx, messages) = mpsc::unbounded_channel();
        *stand_in.from_worker.lock().unwrap() = Some(tx);
        let (stop, stopped) = oneshot::channel::<()>();
        let service = WorkerLinkServer::new(stand_in.clone());
        let server = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Controller { stand_in, messages, stop: Some(stop), server }
    }

    /// The next message from the worker that `pick` accepts (others are skipped).
    async fn next<T>(&mut self, what: &str, mut pick: impl FnMut(FromWorker) -> Option<T>) -> T {
        let wait = async {
            loop {
                let m = self.messages.recv().await.expect("the link is open");
                if let Some(t) = m.message.and_then(&mut pick) {
                    return t;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), wait).await.unwrap_or_else(|_| panic!("no {what} within 60 s"))
    }

    async fn send(&self, m: ToWorker) {
        let tx = self.stand_in.to_worker.lock().unwrap().clone().unwrap();
        tx.send(Ok(pb::ControllerMessage { message: Some(m) })).await.unwrap();
    }

    async fn stop(mut self) {
        // Closing the worker's stream and the server, as a controller that dies would.
        self.stand_in.to_worker.lock().unwrap().take();
        let _ = self.stop.take().unwrap().send(());
        let _ = self.server.await;
    }
}

fn registration(m: FromWorker) -> Option<pb::WorkerRegistration> {
    match m {
        FromWorker::Register(r) => Some(r),
        _ => None,
    }
}

fn result(m: FromWorker) -> Option<pb::CommandResult> {
    match m {
        FromWorker::Result(r) => Some(r),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_registers_takes_commands_and_reconnects() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut controller = Controller::start(addr).await;
    let worker = RunningWorker::start(&[
        "--controller",
        &format!("http://{addr}"),
        "--worker-id",
        "node-a",
        "--gpus",
        "2x80GiB",
    ]);

    let reg = controller.next("registration", registration).await;
    assert_eq!((reg.worker_id.as_str(), reg.address.as_str()), ("node-a", worker.addr.as_str()));
    let status = reg.status.unwrap();
    let gpus: Vec<(u32, u64, &str)> = status.gpus.iter().map(|g| (g.index, g.free_bytes, g.source.as_str())).collect();
    assert_eq!(gpus, [(0, 80 << 30, "declared"), (1, 80 << 30, "declared")]);
    assert!(status.models.is_empty());

    // A load command on GPU 1: progress, then the result with what was loaded.
    let load = pb::LoadModelRequest {
        model_id: "chat".into(),
        source: common::smollm2().display().to_string(),
        device: "gpu:1".into(),
        ..Default::default()
    };
    controller.send(ToWorker::Load(pb::LoadCommand { command_id: 7, request: Some(load) })).await;
    let progress = controller
        .next("load progress", |m| match m {
            FromWorker::Progress(p) => Some(p),
            _ => None,
        })
        .await;
    assert_eq!(progress.command_id, 7);
    let done = controller.next("load result", result).await;
    assert_eq!((done.command_id, done.code, done.error.as_str()), (7, 0, ""));
    let info = done.model.unwrap();
    assert_eq!((info.model_id.as_str(), info.device.as_str()), ("chat", "gpu:1"));

    // Heartbeats carry the model and the memory it took on GPU 1 only.
    let beat = controller
        .next("heartbeat with the model", |m| match m {
            FromWorker::Heartbeat(s) if !s.models.is_empty() => Some(s),
            _ => None,
        })
        .await;
    assert_eq!(beat.gpus[0].free_bytes, 80 << 30);
    assert!(beat.gpus[1].free_bytes < 80 << 30);

    // The controller routes requests to the worker's advertised address.
    let mut client = worker.client().await;
    let out = collect(&mut client, chat_request("chat", "What is the capital of France?", 12)).await.unwrap();
    assert!(out.text.contains("Paris"), "{:?}", out.text);

    // Failures come back as results with the gRPC code and the message.
    let bad = pb::UnloadModelRequest { model_id: "nope".into() };
    controller.send(ToWorker::Unload(pb::UnloadCommand { command_id: 8, request: Some(bad) })).await;
    let r = controller.next("unload result", result).await;
    assert_eq!((r.command_id, r.code), (8, tonic::Code::NotFound as i32));
    assert_eq!(r.error, "model `nope` is not loaded on this worker; loaded: chat");

    // The controller goes away and comes back on the same address: the worker, still
    // serving meanwhile, registers again with the model it holds.
    controller.stop().await;
    let out = collect(&mut client, chat_request("chat", "Say hi.", 4)).await.unwrap();
    assert_eq!(out.tokens.len(), 4, "the worker serves while the controller is away");
    let mut controller = Controller::start(addr).await;
    let reg = controller.next("registration after the restart", registration).await;
    let models: Vec<String> = reg.status.unwrap().models.into_iter().map(|m| m.info.unwrap().model_id).collect();
    assert_eq!(models, ["chat"]);

    controller
        .send(ToWorker::Unload(pb::UnloadCommand {
            command_id: 9,
            request: Some(pb::UnloadModelRequest { model_id: "chat".into() }),
        }))
        .await;
    let r = controller.next("unload result", result).await;
    assert_eq!((r.command_id, r.code), (9, 0));
    let log = worker.stderr();
    assert!(
        log.contains("the controller closed the link") || log.contains("controller link down"),
        "the outage is logged:\n{log}"
    );
}
