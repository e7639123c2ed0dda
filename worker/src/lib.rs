//! `gantry-worker`: the process that owns a node's GPUs, loads models and streams tokens.
//!
//! - [`gpu`]: the devices it offers (NVML, declared, or the CPU);
//! - [`store`]: where model files come from (local paths, the Hugging Face Hub);
//! - [`engine`]: the Candle inference engine;
//! - [`service`] and [`server`]: the `gantry.v1.Worker` gRPC service;
//! - [`pipeline`]: running one stage of a model split over workers;
//! - [`link`]: the stream to the controller;
//! - [`cli`]: `gantry worker` / `gantry-worker` and `gantry pull`.

pub mod cli;
pub mod engine;
pub mod gpu;
pub mod link;
pub mod pipeline;
pub mod server;
pub mod service;
pub mod store;
