//! `gantry-controller`: holds the desired deployments, knows every worker's GPUs, places
//! replicas with `gantry_core`'s planner and routes requests to them.
//!
//! Empty so far: the controller issue fills it (state store, worker registry, scheduler,
//! router, public gRPC and OpenAI-compatible APIs).
