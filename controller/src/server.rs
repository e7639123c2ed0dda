//! Running a controller: win leadership in the store, restore the state, and serve the gRPC
//! services (with health checking and reflection) and the HTTP endpoint.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use tonic::service::interceptor::InterceptedService;

use crate::auth::ApiKeys;
use gantry_proto::v1 as pb;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tracing::info;

use crate::api::Api;
use crate::cluster::{Cluster, ControllerConfig};
use crate::store::{Leadership, Store, StoreError};

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
        store: Arc<dyn Store>,
        config: ControllerConfig,
        candidate: &str,
    ) -> Result<Controller, StoreError> {
        info!(store = %store.describe(), candidate, "campaigning for leadership");
        let leadership = store.campaign(candidate).await?;
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
        let api = Api::new(self.cluster.clone())
            .require_worker_certificates(self.tls.as_ref().is_some_and(|t| t.workers_need_certificates));
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<pb::inference_server::InferenceServer<Api>>().await;
        health.set_serving::<pb::deployments_server::DeploymentsServer<Api>>().await;
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
        let auth = move |req: tonic::Request<()>| match &keys {
            None => Ok(req),
            Some(k) => k.interceptor()(req),
        };
        if let Some(http) = http {
            let protected = axum::Router::new()
                .route("/v1/models", get(models))
                .route("/metrics", get(metrics))
                .route("/api/v1/cluster", get(cluster_view))
                .with_state(self.cluster.clone())
                .merge(crate::openai::routes(api.clone()))
                .layer(axum::middleware::from_fn_with_state(self.api_keys.clone(), require_key));
            let router = axum::Router::new()
                .route("/healthz", get(|| async { "ok\n" }))
                // The page holds no data; it asks for a key when the API needs one.
                .route("/", get(|| async { axum::response::Html(DASHBOARD) }))
                .merge(protected);
            let mut stop = stop_rx.clone();
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            match &self.tls {
                Some(tls) => {
                    let listener = tls.http_listener(http);
                    tokio::spawn(async move {
                        let _ = axum::serve(listener, router).with_graceful_shutdown(stopped).await;
                    });
                }
                None => {
                    tokio::spawn(async move {
                        let _ = axum::serve(http, router).with_graceful_shutdown(stopped).await;
                    });
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
            .add_service(InterceptedService::new(gantry_proto::serve::reflection_v1()?, auth.clone()))
            .add_service(InterceptedService::new(gantry_proto::serve::reflection_v1alpha()?, auth.clone()))
            .add_service(pb::inference_server::InferenceServer::with_interceptor(api.clone(), auth.clone()))
            .add_service(pb::deployments_server::DeploymentsServer::with_interceptor(api.clone(), auth.clone()))
            .add_service(pb::cluster_server::ClusterServer::with_interceptor(api.clone(), auth.clone()))
            .add_service(pb::models_server::ModelsServer::with_interceptor(api.clone(), auth.clone()))
            .add_service(pb::worker_link_server::WorkerLinkServer::with_interceptor(api, auth))
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
        if *self.leadership.lost.borrow() {
            return Err("lost leadership in the state store".into());
        }
        Ok(())
    }
}

/// Serves only `GET /healthz` (`standby`) on `listener` while this controller waits to lead, so
/// an orchestrator sees a healthy standby; abort the task before the leader's server binds.
pub fn standby_health(listener: TcpListener) -> tokio::task::JoinHandle<()> {
    let router = axum::Router::new().route("/healthz", get(|| async { "standby\n" }));
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    })
}

/// Refuses HTTP requests without a valid key (when keys are configured), in OpenAI's error shape.
async fn require_key(
    State(keys): State<Option<ApiKeys>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Some(keys) = &keys {
        let header = req.headers().get(axum::http::header::AUTHORIZATION);
        if !keys.accepts(header.map(|v| v.as_bytes())) {
            let status = crate::auth::unauthenticated(header.is_some());
            return crate::openai::ApiError::from(status).into_response();
        }
    }
    next.run(req).await
}

/// The dashboard: one page, no build step, refreshed from `/api/v1/cluster` every 2 s.
const DASHBOARD: &str = include_str!("dashboard.html");

/// `GET /api/v1/cluster`: workers with their GPUs and reservations, and deployments with
/// their replicas, stages and events, as the dashboard shows them.
async fn cluster_view(State(cluster): State<Arc<Cluster>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "workers": cluster.workers(), "deployments": cluster.list() }))
}

/// `GET /metrics`: Prometheus' text format.
async fn metrics(State(cluster): State<Arc<Cluster>>) -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], crate::metrics::render(&cluster))
}

/// `GET /v1/models`: the deployed models in the OpenAI list shape.
async fn models(State(cluster): State<Arc<Cluster>>) -> Json<serde_json::Value> {
    let data: Vec<serde_json::Value> = cluster
        .models()
        .into_iter()
        .map(|m| {
            let created = cluster.get(&m.name).map_or(0, |d| d.created_ms / 1000);
            serde_json::json!({
                "id": m.name, "object": "model", "created": created, "owned_by": "gantry",
                "source": m.source, "replicas": m.replicas, "ready_replicas": m.ready_replicas,
            })
        })
        .collect();
    Json(serde_json::json!({ "object": "list", "data": data }))
}

/// Binds a listener, saying which flag to change when the port is taken.
pub async fn bind(addr: &str, flag: &str) -> Result<(TcpListener, SocketAddr), String> {
    let l = TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr} ({flag}): {e}"))?;
    let a = l.local_addr().map_err(|e| e.to_string())?;
    Ok((l, a))
}
