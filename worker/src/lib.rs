//! `gantry-worker`: the process that owns a node's GPUs, loads models and streams tokens.
//!
//! Today it holds the model store's local side: reading a model folder, `config.json` or
//! `.gguf` file from disk into a [`gantry_core::ModelSpec`].

pub mod engine;
pub mod store;
