//! `gantry-engine`: the inference engine. Candle models of the supported families, from GGUF
//! or safetensors, runnable whole or as any contiguous range of layers; Gantry's own quantized
//! kernels; tokenizers; chat templates (rendered in a child process, since a model's template
//! is untrusted); sampling; the generation loop; and the in-process part of a pipeline split.
//! No network: a worker serves it over gRPC, `gantry generate` runs it here.

pub mod attention;
pub mod batch;
pub mod chat;
pub mod chat_child;
pub mod config;
pub mod cpu;
pub mod detok;
pub mod experts;
pub mod files;
pub mod generate;
pub mod layers;
pub mod model;
pub mod moe;
pub mod pipeline;
pub mod sampling;
pub mod tokenizer;
pub mod tp;
pub mod weights;
pub mod wire;

use std::path::PathBuf;

use thiserror::Error;

/// Parses a device name: `cpu`, `cuda` (GPU 0) or `cuda:N`. CUDA needs a build with the
/// `cuda` feature; the default build says so instead of failing later.
pub fn device(name: &str) -> Result<candle_core::Device, EngineError> {
    let name = name.trim().to_ascii_lowercase();
    let ordinal = match name.as_str() {
        "cpu" => return Ok(candle_core::Device::Cpu),
        "cuda" | "gpu" => 0,
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => return Err(EngineError::Config(format!("device `{name}`: use cpu, cuda or cuda:N"))),
        },
    };
    if !cfg!(feature = "cuda") {
        return Err(EngineError::Unsupported(format!(
            "device `{name}`: this build has no CUDA support; rebuild with `cargo build --release --features cuda` on a machine with the CUDA toolkit"
        )));
    }
    candle_core::Device::new_cuda(ordinal).map_err(|e| EngineError::Config(format!("device `{name}`: {e}")))
}

/// What can go wrong loading or running a model.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Files(#[from] gantry_model::FilesError),

    #[error("{0}")]
    Model(#[from] gantry_core::Error),

    #[error("{0}")]
    Config(String),

    #[error("the model files have no tensor `{0}`")]
    MissingTensor(String),

    #[error("unsupported: {0}")]
    Unsupported(String),

    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the sequence needs {needed} positions; the model has {limit}")]
    ContextExceeded { needed: usize, limit: usize },

    #[error("prompt is {prompt} tokens; model context is {context} ({detail})")]
    PromptTooLong { prompt: usize, context: usize, detail: String },

    /// The part's KV cache has no free block for the sequence's next positions.
    #[error(
        "the KV cache is full: the sequence needs {needed} more blocks of {block_tokens} positions and {free} are free"
    )]
    KvCacheFull { needed: usize, free: usize, block_tokens: usize },

    /// A sequence longer than the whole KV cache: it cannot run however long it waits.
    #[error(
        "the sequence needs {needed} blocks of {block_tokens} positions ({positions} positions), more than the whole KV cache holds ({capacity} blocks); give the model more KV memory (the worker's --parallel) or send a shorter prompt"
    )]
    KvCacheTooSmall { needed: usize, capacity: usize, block_tokens: usize, positions: usize },

    #[error("invalid sampling: {0}")]
    InvalidSampling(String),

    #[error("numerical failure: {0}")]
    Numerics(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A later pipeline stage failed or went away: the error its transport gave (the worker
    /// gives a gRPC status, which it maps back to one).
    #[error("{0}")]
    Stage(Box<dyn std::error::Error + Send + Sync>),

    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<gantry_core::SamplingError> for EngineError {
    fn from(e: gantry_core::SamplingError) -> EngineError {
        EngineError::InvalidSampling(e.to_string())
    }
}
