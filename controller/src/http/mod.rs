//! The controller's HTTP endpoint: the OpenAI-compatible API ([`openai`]), `/v1/models`,
//! Prometheus' `/metrics`, the dashboard (`/` and the `/api/v1/cluster` it reads), and
//! `/healthz`. Every route but `/healthz` and the page itself needs an API key when keys are
//! set.

pub mod openai;
pub mod serve;

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::routing::get;

use crate::auth::ApiKeys;
use crate::cluster::Cluster;
use crate::router::Router;

/// Every HTTP route over `router`, behind `keys` when set.
pub fn router(router: Router, keys: Option<ApiKeys>) -> axum::Router {
    let cluster = router.cluster().clone();
    let protected = axum::Router::new()
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route("/api/v1/cluster", get(cluster_view))
        .with_state(cluster)
        .merge(openai::routes(router))
        .layer(axum::middleware::from_fn_with_state(keys, require_key));
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        // The page holds no data; it asks for a key when the API needs one.
        .route("/", get(|| async { axum::response::Html(DASHBOARD) }))
        .merge(protected)
}

/// Serves only `GET /healthz` (`standby`) on `listener` while this controller waits to lead, so
/// an orchestrator sees a healthy standby; abort the task before the leader's server binds.
pub fn standby_health<L>(listener: L) -> tokio::task::JoinHandle<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let router = axum::Router::new().route("/healthz", get(|| async { "standby\n" }));
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    })
}

/// Refuses HTTP requests without a valid key (when keys are configured), in OpenAI's error shape.
async fn require_key(
    State(keys): State<Option<ApiKeys>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Some(keys) = &keys {
        let header = req.headers().get(axum::http::header::AUTHORIZATION);
        let path = req.uri().path();
        let needed = crate::auth::http_permission(path);
        match keys.authorize(header.map(|v| v.as_bytes()), needed, path) {
            // The caller goes with the request: its limits apply to inference.
            Ok(caller) => {
                req.extensions_mut().insert(caller);
            }
            Err(status) => return openai::ApiError::from(status).into_response(),
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
