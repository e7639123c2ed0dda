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
}

impl Services {
    pub fn new(cluster: Arc<Cluster>) -> Services {
        Services { router: Router::new(cluster), worker_certificates: false }
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
