//! `gantry-worker`: the process that owns a node's GPUs, loads models and streams tokens.
//!
//! - [`gpu`]: the devices it offers (NVML, declared, or the CPU);
//! - [`state`]: how it serves and the models it serves; [`served`]: one of them;
//! - [`load`] (with [`devices`]): loading a model onto its devices, admission by memory;
//! - [`generate`]: serving a generation; [`stage`] and [`downstream`]: a model split into
//!   pipeline stages over workers;
//! - [`grpc`] and [`server`]: the `gantry.v1.Worker` and `StageLink` services; [`error`]: the
//!   one place where errors become gRPC statuses;
//! - [`link`]: the stream to the controller.
//!
//! The engine itself is `gantry-engine`; model sources are `gantry-store`'s.

pub mod devices;
pub mod downstream;
pub mod error;
pub mod generate;
pub mod gpu;
pub mod grpc;
pub mod link;
pub mod load;
pub mod measure;
pub mod served;
pub mod server;
pub mod stage;
pub mod state;

pub use error::WorkerError;
pub use state::{WorkerOptions, WorkerState};
