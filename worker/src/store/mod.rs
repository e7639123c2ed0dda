//! The model store: where model files come from.

pub mod local;

pub use local::{ModelLocation, StoreError, locate, read_spec};
