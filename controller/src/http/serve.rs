//! Serving the HTTP router on a listener (plain TCP or TLS) with the limits `axum::serve` does
//! not set: a client must send a request's headers within `header_timeout` (a slow client
//! cannot hold a connection open by trickling bytes: "slowloris"), and a graceful stop waits
//! for the connections being served, at most `grace`.

use std::future::Future;
use std::time::Duration;

use axum::serve::Listener;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

/// Serves `router` on `listener` until `shutdown` completes, then lets open connections finish
/// for up to `grace`.
pub async fn serve<L>(
    mut listener: L,
    router: axum::Router,
    header_timeout: Duration,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send,
) where
    L: Listener,
    L::Io: Send + Unpin + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, _) = tokio::select! {
            conn = listener.accept() => conn,
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let mut builder = http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(true);
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(io), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(
            grace_s = grace.as_secs(),
            "HTTP connections still open after the grace period; stopping anyway"
        );
    }
}
