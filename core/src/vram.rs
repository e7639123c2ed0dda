//! How much device memory a model needs: weights + KV cache + activations + runtime overhead.
//!
//! The formula, term by term (bytes):
//!
//! * **weights**: the tensor table's exact bytes (GGUF, safetensors), else parameters ×
//!   bytes per parameter of the dtype (GGML types by their block size: Q4_K is 144 bytes per
//!   256 weights). `--dtype` re-costs every parameter at the asked precision.
//! * **KV cache**: Σ over layers of `2 (K and V) × kv_heads × head_dim × kv_bytes × tokens ×
//!   batch`, where `tokens` is the context, or the window for sliding-window layers (Mistral
//!   v0.1, Gemma 2/3, gpt-oss). `kv_bytes` is 2 (f16/bf16 cache, the default of vLLM, TGI and
//!   llama.cpp) unless asked otherwise.
//! * **activations**: the live tensors of one forward step of `t = max(prefill_chunk, batch)`
//!   tokens through one layer: `t × (2·hidden + q + 2·kv + 2·mlp) × act_bytes` (residual and
//!   normed hidden state, the Q/K/V projections, the MLP's gate and up outputs; for MoE the
//!   routed experts' share) plus the logits of the last position of each sequence,
//!   `batch × vocab × 4` (f32). Attention is computed in tiles (flash attention on CUDA,
//!   per-chunk on CPU), so the full score matrix is not counted. `act_bytes` is 2 on GPUs,
//!   4 on CPU (Candle's CPU kernels compute in f32).
//! * **overhead**: per device, a fixed 512 MiB on GPUs — the CUDA context and cuBLAS/cuDNN
//!   workspaces, which NVIDIA's and the serving projects' notes put at 300–600 MiB on current
//!   drivers — or 64 MiB on CPU (runtime and tokenizer), plus 2% of weights + KV cache for
//!   allocator fragmentation.
//!
//! Placement adds its own safety margin on top; this module states the need itself.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, product, sum};
use crate::quant::WeightDtype;
use crate::spec::{ModelSpec, WeightLayout};
use crate::units::MIB;

/// Fixed runtime overhead per GPU (CUDA context, cuBLAS workspace, allocator pools).
pub const GPU_OVERHEAD_BYTES: u64 = 512 * MIB;
/// Fixed runtime overhead per CPU device.
pub const CPU_OVERHEAD_BYTES: u64 = 64 * MIB;
/// Fragmentation allowance, in percent of weights + KV cache.
pub const FRAGMENTATION_PERCENT: u64 = 2;
/// Tokens per prefill step when none is given (vLLM's and TGI's defaults are of this order).
pub const DEFAULT_PREFILL_CHUNK: u64 = 512;

/// The kind of device a model is estimated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Gpu,
    Cpu,
}

/// The KV cache element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    F32,
    #[default]
    F16,
    /// 8-bit cache (fp8 or q8_0): 1 byte per element.
    Q8,
}

impl KvDtype {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
            KvDtype::Q8 => 1,
        }
    }

    /// Parses `f32`, `f16`/`bf16`, `q8`/`fp8`/`q8_0`.
    pub fn parse(text: &str) -> Result<KvDtype> {
        match text.to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(KvDtype::F32),
            "f16" | "fp16" | "bf16" => Ok(KvDtype::F16),
            "q8" | "q8_0" | "fp8" | "f8" => Ok(KvDtype::Q8),
            _ => Err(Error::InvalidInput {
                what: format!("KV cache dtype `{text}`"),
                problem: "use f32, f16 or q8".into(),
            }),
        }
    }
}

/// How a model will be served: what the estimate depends on besides the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServeOptions {
    /// Tokens per sequence the KV cache must hold; `None` means the model's full context.
    pub context: Option<u64>,
    /// Sequences served at once.
    pub batch: u64,
    /// Serve the weights at this precision instead of as stored.
    pub dtype: Option<WeightDtype>,
    pub kv_dtype: KvDtype,
    pub device: DeviceKind,
    /// Tokens per prefill step.
    pub prefill_chunk: u64,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            context: None,
            batch: 1,
            dtype: None,
            kv_dtype: KvDtype::F16,
            device: DeviceKind::Gpu,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        }
    }
}

/// The memory a model needs on one device, term by term.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VramEstimate {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    pub activation_bytes: u64,
    pub overhead_bytes: u64,
    pub total_bytes: u64,
    /// The context (tokens per sequence) the KV cache was sized for.
    pub context: u64,
    pub batch: u64,
    /// KV cache bytes per token of one sequence at this context (an average where
    /// sliding-window layers cap their share).
    pub kv_bytes_per_token: u64,
    /// The precision the weights were costed at.
    pub weights_dtype: String,
}

/// The per-layer and per-step quantities estimates and shard plans are built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryModel {
    pub layout: WeightLayout,
    /// KV cache bytes of each layer at the options' context and batch.
    pub layer_kv_bytes: Vec<u64>,
    /// Activations of one step (needed on every device).
    pub activation_bytes: u64,
    /// Fixed runtime overhead per device.
    pub fixed_overhead_bytes: u64,
    pub context: u64,
    pub batch: u64,
    pub weights_dtype: String,
}

impl MemoryModel {
    /// Fragmentation allowance for `bytes` of weights and cache.
    pub fn fragmentation(bytes: u64) -> u64 {
        bytes / 100 * FRAGMENTATION_PERCENT
    }
}

/// Validates options against the model: context within what it was trained for, batch sane.
pub fn check_options(spec: &ModelSpec, options: &ServeOptions) -> Result<u64> {
    let context = options.context.unwrap_or(spec.context.length);
    if context == 0 {
        return Err(Error::InvalidInput { what: "context".into(), problem: "must be at least 1 token".into() });
    }
    if context > spec.context.length {
        return Err(Error::InvalidInput {
            what: format!("context {context}"),
            problem: format!(
                "{} was trained for {} tokens ({}); ask for at most that",
                spec.name, spec.context.length, spec.context.source
            ),
        });
    }
    if options.batch == 0 || options.batch > 1 << 16 {
        return Err(Error::InvalidInput {
            what: format!("batch {}", options.batch),
            problem: "must be 1..=65536".into(),
        });
    }
    if options.prefill_chunk == 0 || options.prefill_chunk > 1 << 20 {
        return Err(Error::InvalidInput {
            what: format!("prefill chunk {}", options.prefill_chunk),
            problem: "must be 1..=1048576 tokens".into(),
        });
    }
    Ok(context)
}

/// Builds the per-layer memory model for `spec` served with `options`.
pub fn memory_model(spec: &ModelSpec, options: &ServeOptions) -> Result<MemoryModel> {
    let context = check_options(spec, options)?;
    let arch = &spec.architecture;
    let what = "the KV cache size";
    let (layout, weights_dtype) = match options.dtype {
        Some(d) => (spec.weights_at(d)?, d.to_string()),
        None => (spec.weights.layout.clone(), spec.weights.dtype.clone()),
    };

    let per_token_layer = product(&[2, arch.num_kv_heads, arch.head_dim, options.kv_dtype.size()], what)?;
    let mut layer_kv_bytes = Vec::with_capacity(layout.layer_bytes.len());
    for layer in 0..arch.num_layers {
        let tokens = match &arch.sliding_window {
            Some(sw) if arch.is_sliding(layer) => context.min(sw.window),
            _ => context,
        };
        layer_kv_bytes.push(product(&[per_token_layer, tokens, options.batch], what)?);
    }

    let act = "the activation size";
    let act_bytes = match options.device {
        DeviceKind::Gpu => 2,
        DeviceKind::Cpu => 4,
    };
    let tokens = options.prefill_chunk.min(context).max(options.batch);
    let mlp = match arch.moe {
        Some(m) => {
            product(&[m.experts_per_token, m.expert_intermediate_size], act)?
                + m.shared_expert_intermediate_size.unwrap_or(0)
        }
        None => arch.intermediate_size,
    };
    let width = sum(&[2 * arch.hidden_size, arch.q_width(), 2 * arch.kv_width(), 2 * mlp], act)?;
    let activation_bytes =
        sum(&[product(&[tokens, width, act_bytes], act)?, product(&[options.batch, arch.vocab_size, 4], act)?], act)?;
    let fixed_overhead_bytes = match options.device {
        DeviceKind::Gpu => GPU_OVERHEAD_BYTES,
        DeviceKind::Cpu => CPU_OVERHEAD_BYTES,
    };
    Ok(MemoryModel {
        layout,
        layer_kv_bytes,
        activation_bytes,
        fixed_overhead_bytes,
        context,
        batch: options.batch,
        weights_dtype,
    })
}

/// Estimates the memory `spec` needs on one device when served with `options`.
pub fn estimate_vram(spec: &ModelSpec, options: &ServeOptions) -> Result<VramEstimate> {
    let m = memory_model(spec, options)?;
    let what = "the memory estimate";
    // Exact weight bytes from the tensor table when served as stored.
    let weights_bytes = match options.dtype {
        Some(_) => m.layout.total(),
        None => spec.weights.bytes,
    };
    let kv_cache_bytes = sum(&m.layer_kv_bytes, what)?;
    let overhead_bytes =
        sum(&[m.fixed_overhead_bytes, MemoryModel::fragmentation(weights_bytes + kv_cache_bytes)], what)?;
    let total_bytes = sum(&[weights_bytes, kv_cache_bytes, m.activation_bytes, overhead_bytes], what)?;
    Ok(VramEstimate {
        weights_bytes,
        kv_cache_bytes,
        activation_bytes: m.activation_bytes,
        overhead_bytes,
        total_bytes,
        context: m.context,
        batch: m.batch,
        kv_bytes_per_token: kv_cache_bytes / (m.context * m.batch).max(1),
        weights_dtype: m.weights_dtype,
    })
}
