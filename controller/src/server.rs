//! Running a controller: win leadership in the store, restore the state, and serve the gRPC
//! services (with health checking and reflection) and the HTTP endpoint.

use std::future::Future;
use std::sync::Arc;

use tonic::service::interceptor::InterceptedService;

use crate::auth::{ApiKeys, Permission};
use gantry_proto::v1 as pb;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tracing::info;

use crate::api::Services;
use crate::cluster::Cluster;
use crate::config::ControllerConfig;
use crate::error::ClusterError;
use crate::statestore::{Leadership, StateStore};

/// How long running streams may take to finish once a stop begins.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// A controller that leads and has its state loaded, ready to serve.
#[derive(Debug)]
pub struct Controller {
    pub cluster: Arc<Cluster>,
    pub leadership: Leadership,
    /// When set, every API but health checking and `/healthz` needs one of these keys.
    pub api_keys: Option<ApiKeys>,
    /// When set, gRPC and HTTP are served over TLS (and workers may need certificates).
    pub tls: Option<crate::tls::ServerTls>,
}

impl Controller {
    /// Waits to lead (`candidate` names this controller to the others), then restores the
    /// deployments and placements in `store`.
    pub async fn start(
        store: Arc<dyn StateStore>,
        config: ControllerConfig,
        candidate: &str,
    ) -> Result<Controller, ClusterError> {
        info!(store = %store.describe(), candidate, "campaigning for leadership");
        let leadership = store.campaign(candidate).await.map_err(ClusterError::from)?;
        info!(store = %store.describe(), "leading");
        let cluster = Cluster::start(store, config).await?;
        Ok(Controller { cluster, leadership, api_keys: None, tls: None })
    }

    /// Serves gRPC on `grpc` (and HTTP on `http` when given) until `shutdown` completes or
    /// leadership is lost (then it returns an error, so a supervisor restarts it as a standby).
    pub async fn serve(
        self,
        grpc: TcpListener,
        http: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let worker_certificates = self.tls.as_ref().is_some_and(|t| t.workers_need_certificates);
        let api = Services::new(self.cluster.clone())
            .require_worker_certificates(worker_certificates)
            .authenticating(self.api_keys.is_some() || worker_certificates);
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<pb::inference_server::InferenceServer<Services>>().await;
        health.set_serving::<pb::deployments_server::DeploymentsServer<Services>>().await;
        health.set_service_status("", ServingStatus::Serving).await;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut lost = self.leadership.lost.clone();
        let reporter = health.clone();
        let stopper = stop_tx.clone();
        let cluster = self.cluster.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown => {}
                r = lost.wait_for(|l| *l) => if r.is_ok() {
                    tracing::error!("lost leadership in the state store; stopping");
                },
            }
            reporter.set_service_status("", ServingStatus::NotServing).await;
            cluster.shutdown();
            let _ = stopper.send(true);
        });
        let keys = self.api_keys.clone();
        // Each service's interceptor checks the key and the permission its calls need
        // (`Deployments`' methods check theirs, reads and writes differ).
        let auth = move |needed: Option<Permission>, what: &'static str| {
            let keys = keys.clone();
            move |req: tonic::Request<()>| match &keys {
                None => Ok(req),
                Some(k) => k.interceptor(needed, what)(req),
            }
        };
        // The HTTP server's task: waited for at the end, so its streams in flight get the same
        // grace as gRPC's rather than being cut when this function returns.
        let mut http_task = None;
        if let Some(http) = http {
            let router = crate::http::router(api.router().clone(), self.api_keys.clone());
            let mut stop = stop_rx.clone();
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let headers = self.cluster.config().http_header_timeout;
            match &self.tls {
                Some(tls) => {
                    let listener = tls.http_listener(http);
                    http_task =
                        Some(tokio::spawn(crate::http::serve::serve(listener, router, headers, STOP_GRACE, stopped)));
                }
                None => {
                    http_task =
                        Some(tokio::spawn(crate::http::serve::serve(http, router, headers, STOP_GRACE, stopped)));
                }
            }
        }
        let mut stop = stop_rx.clone();
        let mut stopped = stop_rx.clone();
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.tls {
            builder = builder.tls_config(tls.grpc())?;
        }
        let server = builder
            .tcp_nodelay(true)
            .add_service(health_service)
            .add_service(InterceptedService::new(
                gantry_proto::serve::reflection_v1()?,
                auth(Some(Permission::Discover), "server reflection"),
            ))
            .add_service(InterceptedService::new(
                gantry_proto::serve::reflection_v1alpha()?,
                auth(Some(Permission::Discover), "server reflection"),
            ))
            .add_service(pb::inference_server::InferenceServer::with_interceptor(
                api.clone(),
                auth(Some(Permission::Infer), "Inference"),
            ))
            .add_service(pb::deployments_server::DeploymentsServer::with_interceptor(
                api.clone(),
                auth(None, "Deployments"),
            ))
            .add_service(pb::cluster_server::ClusterServer::with_interceptor(
                api.clone(),
                auth(Some(Permission::Read), "Cluster"),
            ))
            .add_service(pb::models_server::ModelsServer::with_interceptor(
                api.clone(),
                auth(Some(Permission::ListModels), "Models"),
            ))
            .add_service(pb::worker_link_server::WorkerLinkServer::with_interceptor(
                api,
                auth(Some(Permission::WorkerLink), "WorkerLink"),
            ))
            .serve_with_incoming_shutdown(gantry_proto::serve::incoming(grpc), async move {
                let _ = stop.wait_for(|s| *s).await;
            });
        // Streams in flight get a while to finish once stopping begins, not forever.
        tokio::select! {
            r = server => r?,
            () = async move {
                let _ = stopped.wait_for(|s| *s).await;
                tokio::time::sleep(STOP_GRACE).await;
            } => tracing::warn!(grace_s = STOP_GRACE.as_secs(), "streams still open after the grace period; stopping anyway"),
        }
        // HTTP streams (OpenAI's server-sent events) finish too; `serve` bounds its own wait by
        // the grace period, this bound only guards against a task that never ends.
        if let Some(task) = http_task {
            let _ = tokio::time::timeout(STOP_GRACE + std::time::Duration::from_secs(1), task).await;
        }
        if *self.leadership.lost.borrow() {
            return Err("lost leadership in the state store".into());
        }
        Ok(())
    }
}

pub use gantry_proto::serve::bind;
