//! `gantry-controller`: holds the desired deployments, knows every worker's GPUs, places
//! replicas with `gantry_core::placement` and routes requests to them. It runs no model: it
//! does not depend on the engine.
//!
//! * [`cluster`]: the state behind one lock and the operations that change it;
//! * [`scheduler`]: the decisions — reconcile, placement, expiry — as functions of the state
//!   returning effects;
//! * [`router`]: picking a replica and relaying a request's stream, across failures;
//! * [`api`]: the gRPC services; [`http`]: the OpenAI API, metrics, the dashboard;
//! * [`statestore`]: where the state is kept (an embedded database file, or etcd), leadership;
//! * [`operator`]: the Kubernetes `ModelDeployment` operator;
//! * [`spec`]: what a deployment asks for, and sizing its model;
//! * [`auth`], [`tls`], [`metrics`], [`server`] (leadership and serving), [`error`], [`config`].

pub mod api;
pub mod auth;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod operator;
pub mod router;
pub mod scheduler;
pub mod server;
pub mod sim;
pub mod spec;
pub mod statestore;
pub mod tls;

pub use cluster::Cluster;
pub use config::ControllerConfig;
pub use error::ClusterError;
