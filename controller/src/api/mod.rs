//! The controller's gRPC services, thin handlers over the cluster and the router:
//! [`inference`] (`Inference`), [`deployments`] (`Deployments`, `Cluster`), [`models`]
//! (`Models`) and [`worker_link`] (`WorkerLink`). Cluster errors become statuses in
//! [`crate::error`].

pub mod deployments;
pub mod inference;
pub mod models;
pub mod worker_link;

use std::sync::Arc;

use crate::cluster::Cluster;
use crate::router::Router;

/// Implements every controller service over one `Cluster`.
#[derive(Debug, Clone)]
pub struct Services {
    router: Router,
    /// Whether a worker must present a client certificate (mutual TLS) to attach.
    worker_certificates: bool,
    /// Whether the controller authenticates no one (no API keys, no client CA): a worker
    /// link from this host may then receive secrets.
    open_to_all: bool,
}

impl Services {
    pub fn new(cluster: Arc<Cluster>) -> Services {
        Services { router: Router::new(cluster), worker_certificates: false, open_to_all: true }
    }

    /// Whether callers are authenticated (API keys or a client CA); without, links from this
    /// host are trusted with secrets, others not.
    pub fn authenticating(mut self, yes: bool) -> Services {
        self.open_to_all = !yes;
        self
    }

    /// Requires workers to present a certificate the TLS layer verified against the client CA.
    pub fn require_worker_certificates(mut self, yes: bool) -> Services {
        self.worker_certificates = yes;
        self
    }

    /// The router (the OpenAI HTTP API routes through the same one).
    pub fn router(&self) -> &Router {
        &self.router
    }

    fn cluster(&self) -> &Arc<Cluster> {
        self.router.cluster()
    }
}
