//! Serving the worker: the `gantry.v1.Worker` and `gantry.v1.StageLink` services with standard
//! gRPC health checking and server reflection (`v1` and `v1alpha`) beside them.

use std::future::Future;
use std::sync::Arc;

use gantry_proto::v1::stage_link_server::StageLinkServer;
use gantry_proto::v1::worker_server::WorkerServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::ServingStatus;

use crate::grpc::WorkerService;
use crate::state::WorkerState;

/// Serves `state` on `listener` until `shutdown` completes. Health answers `NOT_SERVING`
/// until `ready` turns true (the models asked for at start are loaded) and again once
/// shutdown begins, so load balancers stop sending while running streams finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<WorkerState>,
    mut ready: watch::Receiver<bool>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<WorkerServer<WorkerService>>().await;
    health.set_service_status("", ServingStatus::NotServing).await;
    let reporter = health.clone();
    tokio::spawn(async move {
        if ready.wait_for(|r| *r).await.is_ok() {
            reporter.set_serving::<WorkerServer<WorkerService>>().await;
            reporter.set_service_status("", ServingStatus::Serving).await;
        }
    });
    let reporter = health.clone();
    let shutdown = async move {
        shutdown.await;
        reporter.set_not_serving::<WorkerServer<WorkerService>>().await;
        reporter.set_service_status("", ServingStatus::NotServing).await;
    };
    // Pings find a caller gone silently (the controller's relay, a previous stage, cut off by
    // the network) so its requests end and free their slots.
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(crate::load::STAGE_PING_TIMEOUT))
        .http2_keepalive_timeout(Some(crate::load::STAGE_PING_TIMEOUT));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    // Every service but health checking takes calls only as `WorkerState::admits` says.
    let guard = {
        let state = state.clone();
        move |req: tonic::Request<()>| -> Result<tonic::Request<()>, tonic::Status> {
            let authorization = req.metadata().get("authorization").map(|v| v.as_bytes());
            state.admits(authorization).map_err(tonic::Status::unauthenticated)?;
            Ok(req)
        }
    };
    use tonic::service::interceptor::InterceptedService;
    builder
        .add_service(health_service)
        .add_service(InterceptedService::new(gantry_proto::serve::reflection_v1()?, guard.clone()))
        .add_service(InterceptedService::new(gantry_proto::serve::reflection_v1alpha()?, guard.clone()))
        .add_service(WorkerServer::with_interceptor(WorkerService::new(state.clone()), guard.clone()))
        .add_service(InterceptedService::new(
            StageLinkServer::new(WorkerService::new(state))
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
            guard,
        ))
        .serve_with_incoming_shutdown(gantry_proto::serve::incoming(listener), shutdown)
        .await?;
    Ok(())
}
