//! The model store: where model files come from.

pub mod local;

pub use local::{StoreError, read_spec};
