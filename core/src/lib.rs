//! `gantry-core`: Gantry's pure decisions.
//!
//! What a model is ([`spec::ModelSpec`], read from `config.json`, safetensors headers or GGUF
//! metadata), what it needs ([`vram::estimate_vram`]), how it splits over devices
//! ([`shard::fit`]), which model suits a need ([`select::select`]) and where a replica goes in
//! a cluster ([`placement::place`]). Nothing here does I/O, spawns tasks or reads a clock:
//! every input is data and every decision a plain function.

pub mod arch;
pub mod autoscale;
pub mod catalog;
pub mod error;
pub mod family;
pub mod gguf;
pub mod hardware;
pub mod hf;
pub mod measured;
pub mod placement;
pub mod prefix;
pub mod quant;
pub mod safetensors;
pub mod sampling;
pub mod select;
pub mod shard;
pub mod spec;
pub mod tp;
pub mod units;
pub mod vram;
pub mod weights;
pub mod wire;

pub use arch::{Architecture, ParamBreakdown};
pub use catalog::{Catalog, CatalogEntry};
pub use error::{Error, Result};
pub use family::Family;
pub use hardware::{Gpu, parse_gpus};
pub use sampling::{SamplingError, SamplingParams};
pub use select::{Latency, Need, Selection, Task, select};
pub use shard::{Fit, Stage, fit, fit_on};
pub use spec::{HfFiles, ModelSpec, SizeClass};
pub use vram::{ServeOptions, VramEstimate, estimate_vram};
pub use wire::WireDtype;
