//! `gantry.v1.WorkerLink`: the workers' side door — one stream per worker for registration,
//! heartbeats, load progress and results one way, commands the other.

use std::time::Duration;

use gantry_proto::v1 as pb;
use pb::worker_message::Message as FromWorker;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::warn;

use super::Services;
use crate::auth::Caller;
use crate::cluster::workers::LinkAuth;
use crate::router::EventStream;

/// How a link was authenticated: by its TLS client certificate (its subject's common name: one
/// per worker), else by its API key's name; secrets go only over an authenticated link, or over one from this host
/// when the controller authenticates no one (`open_to_all`: no keys and no client CA).
fn link_auth<T>(request: &Request<T>, open_to_all: bool) -> LinkAuth {
    let certificate =
        request.peer_certs().and_then(|c| c.first().map(|c| crate::tls::certificate_identity(c.as_ref())));
    let credential = match (certificate, request.extensions().get::<Caller>()) {
        (Some(identity), _) => Some(identity),
        (None, Some(c)) => Some(format!("key {}", c.name)),
        (None, None) => None,
    };
    let local = request.remote_addr().is_none_or(|a| a.ip().is_loopback());
    LinkAuth { trusted: credential.is_some() || (open_to_all && local), credential }
}

#[tonic::async_trait]
impl pb::worker_link_server::WorkerLink for Services {
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
        let auth = link_auth(&request, self.open_to_all);
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no registration within 10 s of attaching"))??;
        let Some(pb::WorkerMessage { message: Some(FromWorker::Register(reg)) }) = first else {
            return Err(Status::invalid_argument("the first message on a worker link must be a registration"));
        };
        let worker = reg.worker_id.trim().to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        let session = self.cluster().register_as(reg, tx, auth)?;
        let cluster = self.cluster().clone();
        let mut closing = self.cluster().closing();
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
