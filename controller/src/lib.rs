//! `gantry-controller`: holds the desired deployments, knows every worker's GPUs, places
//! replicas with `gantry_core::placement` and routes requests to them.
//!
//! * [`store`]: the state store (an embedded database file, or etcd) with leader election.
//! * [`cluster`]: the state and the scheduler (desired vs actual, reservations, leases).
//! * [`api`]: the gRPC services — `Inference`, `Deployments`, `Cluster`, `Models`, and the
//!   workers' `WorkerLink`.
//! * [`metrics`]: Prometheus metrics (`GET /metrics`).
//! * [`openai`]: the OpenAI-compatible HTTP API (`/v1/chat/completions`, `/v1/completions`).
//! * [`auth`]: API keys for the gRPC and HTTP APIs.
//! * [`tls`]: TLS for gRPC and HTTP, mutual TLS for workers.
//! * [`server`]: leadership, restore, and serving.

pub mod api;
pub mod auth;
pub mod cluster;
pub mod metrics;
pub mod openai;
pub mod operator;
pub mod server;
pub mod spec;
pub mod store;
pub mod tls;
