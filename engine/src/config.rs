//! What the engine needs to know to run a model, read from `config.json` or GGUF metadata.
//!
//! The same family can be stored two ways with different conventions: llama.cpp's converter
//! permutes LLaMA/Mistral query and key weights for interleaved rotary embeddings, stores
//! Gemma's norm weights with the `+1` already added, and reorders Falcon's fused QKV. The
//! config records the conventions of the files it came from, so the model code runs either.

use gantry_core::Family;
use gantry_core::arch::Architecture;
use gantry_core::gguf::{GgufFile, MetaValue};
use serde_json::Value;

use crate::EngineError;

/// Where the weights come from; decides the storage conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Gguf,
    Safetensors,
}

/// The non-linearity of the MLP.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// Exact GELU (erf).
    GeluErf,
    /// gpt-oss's gated unit: `(clamp(up, ±limit) + 1) · g·σ(alpha·g)` with `g = min(gate, limit)`.
    /// Only gated.
    ClampedSwiglu {
        alpha: f32,
        limit: f32,
    },
}

/// How a mixture-of-experts layer turns router logits into expert weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Softmax over every expert, keep the top k; `renormalize` divides the k by their sum
    /// (Mixtral, Qwen3-MoE with `norm_topk_prob`).
    SoftmaxTopK { renormalize: bool },
    /// Keep the top k logits, softmax over those k (gpt-oss).
    TopKSoftmax,
}

/// A model's mixture-of-experts layers.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub experts: usize,
    /// Experts each token goes through.
    pub top_k: usize,
    /// Intermediate size of one expert.
    pub expert_size: usize,
    pub routing: Routing,
    /// An always-on shared expert of this size, scaled by `σ(gate · x)` (Qwen2-MoE).
    pub shared_size: Option<usize>,
    /// Which layers have experts; the others have a dense MLP of `intermediate_size`.
    pub sparse_layers: Vec<bool>,
    /// The experts' non-linearity (gated).
    pub act: Activation,
    /// The router and the experts carry biases (gpt-oss).
    pub biases: bool,
}

impl MoeConfig {
    /// Picks the experts of one token from its router logits: `(expert, weight)`, best first
    /// (ties to the lower index), computed the same way whatever else is in the batch.
    pub fn route(&self, logits: &[f32]) -> Vec<(usize, f32)> {
        let k = self.top_k.min(logits.len());
        let mut order: Vec<usize> = (0..logits.len()).collect();
        // NaN logits sort last, so a broken router never panics.
        order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
        order.truncate(k);
        match self.routing {
            Routing::SoftmaxTopK { renormalize } => {
                let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let sum: f32 = logits.iter().map(|&v| (v - max).exp()).sum();
                let mut picked: Vec<(usize, f32)> = order.iter().map(|&e| (e, (logits[e] - max).exp() / sum)).collect();
                if renormalize {
                    let s: f32 = picked.iter().map(|p| p.1).sum();
                    picked.iter_mut().for_each(|p| p.1 /= s);
                }
                picked
            }
            Routing::TopKSoftmax => {
                let max = order.first().map_or(0.0, |&e| logits[e]);
                let exps: Vec<f32> = order.iter().map(|&e| (logits[e] - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                order.iter().zip(exps).map(|(&e, x)| (e, x / sum)).collect()
            }
        }
    }

    /// Whether layer `i` has experts.
    pub fn is_sparse(&self, i: usize) -> bool {
        self.sparse_layers.get(i).copied().unwrap_or(false)
    }
}

/// The normalisation layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    /// RMSNorm; `unit_offset` multiplies by `1 + w` (Gemma's convention in `transformers`).
    Rms { eps: f64, unit_offset: bool },
    /// LayerNorm with weight and bias.
    Layer { eps: f64 },
}

/// How attention and MLP are arranged in a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `x += attn(norm1(x)); x += mlp(norm2(x))` (LLaMA, GPT-2, Qwen, Phi-3).
    Sequential,
    /// `x += attn(n1(x)) + mlp(n2(x))`, where `n2` is `n1` when `shared_norm` (Phi-2, Falcon).
    Parallel { shared_norm: bool },
    /// Gemma 2/3: norms before and after both attention and MLP.
    Sandwich,
}

/// How the query/key/value projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvLayout {
    /// Three matrices.
    Separate,
    /// One matrix with all query rows, then key rows, then value rows.
    Fused,
    /// Falcon's groups: per KV head, its query heads, then its key, then its value.
    FalconGrouped,
}

/// Rotary position embedding scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_context: f64,
    },
    /// Per-dimension divisors (Phi-3's LongRoPE, or llama.cpp's `rope_freqs` tensor); the
    /// long factors apply past `original_context`. `attention_factor` scales cos and sin.
    Factors {
        short: Vec<f64>,
        long: Vec<f64>,
        original_context: usize,
        attention_factor: f64,
    },
    /// YaRN (gpt-oss): frequencies blended between interpolated (`/ factor`) and original by a
    /// ramp over the dimensions that turn `beta_fast`..`beta_slow` times within
    /// `original_context`; cos and sin scaled by `attention_factor`.
    Yarn {
        factor: f64,
        beta_fast: f64,
        beta_slow: f64,
        original_context: f64,
        truncate: bool,
        attention_factor: f64,
    },
}

/// Rotary position embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Base for sliding-window layers when it differs (Gemma 3's local layers use 10,000).
    pub local_theta: Option<f64>,
    /// Dimensions rotated (Phi-2 rotates 40% of each head).
    pub rotary_dim: usize,
    /// Rotate adjacent pairs (GGUF LLaMA/Mistral) rather than the two halves.
    pub interleaved: bool,
    pub scaling: RopeScaling,
}

/// Everything the model code needs.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub family: Family,
    pub format: WeightFormat,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub norm: NormKind,
    pub activation: Activation,
    pub gated_mlp: bool,
    pub block: BlockKind,
    pub qkv: QkvLayout,
    pub qkv_bias: bool,
    pub out_bias: bool,
    pub mlp_bias: bool,
    pub head_bias: bool,
    /// RMSNorm on queries and keys per head (Gemma 3, Qwen 3).
    pub qk_norm: bool,
    pub rope: Option<RopeConfig>,
    /// Learned absolute positions (GPT-2).
    pub learned_positions: Option<usize>,
    /// Multiplier of attention scores.
    pub attn_scale: f64,
    /// `tanh(x / cap) * cap` on attention scores (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// `tanh(x / cap) * cap` on the final logits (Gemma 2).
    pub final_softcap: Option<f64>,
    /// Embeddings are multiplied by this (Gemma: √hidden).
    pub embed_scale: Option<f64>,
    /// Window of the sliding-window layers.
    pub sliding_window: Option<usize>,
    /// Which layers use it.
    pub sliding_layers: Vec<bool>,
    pub tied_embeddings: bool,
    /// Trained context length.
    pub context_length: usize,
    /// Mixture-of-experts layers.
    pub moe: Option<MoeConfig>,
    /// A learned logit per query head that joins each attention softmax (gpt-oss's sinks).
    pub attn_sinks: bool,
}

impl EngineConfig {
    /// Whether layer `i` attends through the sliding window.
    pub fn is_sliding(&self, i: usize) -> bool {
        self.sliding_layers.get(i).copied().unwrap_or(false)
    }

    /// Reads the config of a Hugging Face model folder (`config.json` contents).
    pub fn from_hf(config_json: &str) -> Result<EngineConfig, EngineError> {
        let value: Value = serde_json::from_str(config_json)
            .map_err(|e| EngineError::Config(format!("config.json is not valid JSON: {e}")))?;
        let parsed = gantry_core::hf::parse_config_value(&value)?;
        let arch = &parsed.architecture;
        // Multimodal configs nest the text model.
        let text = value.get("text_config").unwrap_or(&value);
        let get = |k: &str| text.get(k).or_else(|| value.get(k)).filter(|v| !v.is_null());
        let f64_of = |k: &str| get(k).and_then(Value::as_f64);
        let bool_of = |k: &str, d: bool| get(k).and_then(Value::as_bool).unwrap_or(d);
        let family = arch.family;
        let head_dim = usize_of(arch.head_dim)?;
        let context = parsed.context.map(|(n, _)| n).unwrap_or(2048);

        let rms_eps = f64_of("rms_norm_eps").unwrap_or(1e-6);
        let ln_eps = f64_of("layer_norm_eps").or(f64_of("layer_norm_epsilon")).unwrap_or(1e-5);
        let norm = match family {
            Family::Gpt2 | Family::Phi | Family::Falcon => NormKind::Layer { eps: ln_eps },
            Family::Gemma | Family::Gemma2 | Family::Gemma3 => NormKind::Rms { eps: rms_eps, unit_offset: true },
            _ => NormKind::Rms { eps: rms_eps, unit_offset: false },
        };
        let act_name = ["hidden_activation", "hidden_act", "activation_function", "activation"]
            .iter()
            .find_map(|k| get(k).and_then(Value::as_str))
            .unwrap_or("silu");
        let activation = match (family, act_name) {
            // transformers' Falcon ignores the key and uses exact GELU.
            (Family::Falcon, _) => Activation::GeluErf,
            (_, "silu" | "swish") => Activation::Silu,
            (_, "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "gelu_tanh") => Activation::GeluTanh,
            // Gemma (v1) configs say `gelu` but the model uses the tanh approximation.
            (Family::Gemma, "gelu") => Activation::GeluTanh,
            (_, "gelu") => Activation::GeluErf,
            (_, other) => return Err(EngineError::Config(format!("unsupported activation `{other}`"))),
        };
        let block = match family {
            Family::Phi => BlockKind::Parallel { shared_norm: true },
            Family::Falcon => {
                if bool_of("new_decoder_architecture", false) {
                    BlockKind::Parallel { shared_norm: false }
                } else if bool_of("parallel_attn", true) {
                    BlockKind::Parallel { shared_norm: true }
                } else {
                    BlockKind::Sequential
                }
            }
            Family::Gemma2 | Family::Gemma3 => BlockKind::Sandwich,
            _ => BlockKind::Sequential,
        };
        let qkv = match family {
            Family::Phi3 | Family::Gpt2 => QkvLayout::Fused,
            Family::Falcon => QkvLayout::FalconGrouped,
            _ => QkvLayout::Separate,
        };
        let theta = f64_of("rope_theta").unwrap_or(10_000.0);
        let rope = match family {
            Family::Gpt2 => None,
            _ => {
                let partial = f64_of("partial_rotary_factor").unwrap_or(1.0);
                let rotary_dim = ((head_dim as f64) * partial).round() as usize;
                Some(RopeConfig {
                    theta,
                    local_theta: (family == Family::Gemma3).then(|| f64_of("rope_local_base_freq").unwrap_or(10_000.0)),
                    rotary_dim,
                    interleaved: false,
                    scaling: hf_rope_scaling(get("rope_scaling"), context, head_dim)?,
                })
            }
        };
        let attn_scale = match f64_of("query_pre_attn_scalar") {
            Some(s) if matches!(family, Family::Gemma2 | Family::Gemma3) => 1.0 / s.sqrt(),
            _ => 1.0 / (head_dim as f64).sqrt(),
        };
        let shape = arch.shape;
        let moe = arch
            .moe
            .map(|m| -> Result<MoeConfig, EngineError> {
                let n = usize_of(arch.num_layers)?;
                let only: Vec<u64> = get("mlp_only_layers")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default();
                let step = get("decoder_sparse_step").and_then(Value::as_u64).unwrap_or(1).max(1);
                let sparse_layers = (0..n as u64).map(|i| !only.contains(&i) && (i + 1) % step == 0).collect();
                let routing = match family {
                    Family::GptOss => Routing::TopKSoftmax,
                    Family::Mixtral => Routing::SoftmaxTopK { renormalize: true },
                    _ => Routing::SoftmaxTopK { renormalize: bool_of("norm_topk_prob", false) },
                };
                let act = match family {
                    Family::GptOss => {
                        Activation::ClampedSwiglu { alpha: 1.702, limit: f64_of("swiglu_limit").unwrap_or(7.0) as f32 }
                    }
                    _ => activation,
                };
                moe_config(m, routing, sparse_layers, act, family == Family::GptOss)
            })
            .transpose()?;
        assemble(
            arch,
            Conventions {
                moe,
                attn_sinks: family == Family::GptOss,
                format: WeightFormat::Safetensors,
                norm,
                activation,
                block,
                qkv,
                biases: [shape.qkv_bias, shape.out_bias, shape.mlp_bias, shape.head_bias],
                qk_norm: shape.qk_norm,
                rope,
                attn_scale,
                attn_softcap: f64_of("attn_logit_softcapping").filter(|_| family == Family::Gemma2),
                final_softcap: f64_of("final_logit_softcapping"),
                context_length: usize_of(context)?,
            },
        )
    }

    /// Reads the config from a GGUF file's metadata (and, for a few conventions, its tensor
    /// table).
    pub fn from_gguf(file: &GgufFile, spec: &gantry_core::ModelSpec) -> Result<EngineConfig, EngineError> {
        let arch = &spec.architecture;
        let a = file.architecture().unwrap_or_default().to_string();
        let f = |k: &str| file.get(&format!("{a}.{k}")).and_then(MetaValue::as_f64);
        let has = |name: &str| file.tensors.iter().any(|t| t.name == name);
        let family = arch.family;
        let head_dim = usize_of(arch.head_dim)?;
        let rms_eps = f("attention.layer_norm_rms_epsilon").unwrap_or(1e-6);
        let ln_eps = f("attention.layer_norm_epsilon").unwrap_or(1e-5);
        let norm = match family {
            Family::Gpt2 | Family::Phi | Family::Falcon => NormKind::Layer { eps: ln_eps },
            // llama.cpp's converter already added Gemma's +1 to the norm weights.
            _ => NormKind::Rms { eps: rms_eps, unit_offset: false },
        };
        let activation = match family {
            Family::Gemma | Family::Gemma2 | Family::Gemma3 | Family::Gpt2 | Family::Phi | Family::Falcon => {
                Activation::GeluTanh
            }
            _ => Activation::Silu,
        };
        let block = match family {
            Family::Phi => BlockKind::Parallel { shared_norm: true },
            Family::Falcon if has("blk.0.attn_norm_2.weight") => BlockKind::Parallel { shared_norm: false },
            Family::Falcon => BlockKind::Parallel { shared_norm: true },
            Family::Gemma2 | Family::Gemma3 => BlockKind::Sandwich,
            _ => BlockKind::Sequential,
        };
        let qkv = if has("blk.0.attn_qkv.weight") { QkvLayout::Fused } else { QkvLayout::Separate };
        let context = usize_of(spec.context.length)?;
        let rotary_dim = f("rope.dimension_count").map_or(head_dim, |d| d as usize);
        let scaling = match file.get(&format!("{a}.rope.scaling.type")).and_then(MetaValue::as_str) {
            Some("linear") => RopeScaling::Linear { factor: f("rope.scaling.factor").unwrap_or(1.0) },
            Some("yarn") => {
                let factor = f("rope.scaling.factor").unwrap_or(1.0);
                RopeScaling::Yarn {
                    factor,
                    beta_fast: f("rope.scaling.yarn_beta_fast").unwrap_or(32.0),
                    beta_slow: f("rope.scaling.yarn_beta_slow").unwrap_or(1.0),
                    original_context: f("rope.scaling.original_context_length").unwrap_or(context as f64),
                    // gpt-oss's own config turns truncation off.
                    truncate: family != Family::GptOss,
                    attention_factor: if factor <= 1.0 { 1.0 } else { 0.1 * factor.ln() + 1.0 },
                }
            }
            _ => RopeScaling::None,
        };
        let rope = (family != Family::Gpt2).then(|| RopeConfig {
            theta: f("rope.freq_base").unwrap_or(10_000.0),
            // llama.cpp fixes Gemma 3's local base at 10,000.
            local_theta: (family == Family::Gemma3).then_some(10_000.0),
            rotary_dim,
            // llama.cpp permutes LLaMA-family Q/K for its "normal" (adjacent pairs) rope.
            interleaved: matches!(family, Family::Llama | Family::Mistral | Family::Mixtral),
            scaling,
        });
        // Gemma 2/3 27B scale by hidden/heads; the others by the head size (llama.cpp's rule).
        let attn_scale = match family {
            Family::Gemma2 | Family::Gemma3 if arch.num_layers == 46 || arch.num_layers == 62 => {
                1.0 / ((arch.hidden_size / arch.num_heads) as f64).sqrt()
            }
            _ => 1.0 / (head_dim as f64).sqrt(),
        };
        let moe = arch
            .moe
            .map(|m| {
                let n = usize_of(arch.num_layers)?;
                // llama.cpp's rules: Mixtral and Qwen3-MoE renormalize the top k, Qwen2-MoE
                // does not; gpt-oss takes the softmax of the top k.
                let routing = match family {
                    Family::GptOss => Routing::TopKSoftmax,
                    Family::Qwen2Moe => Routing::SoftmaxTopK { renormalize: false },
                    _ => Routing::SoftmaxTopK { renormalize: true },
                };
                let sparse = (0..n).map(|i| has(&format!("blk.{i}.ffn_gate_inp.weight"))).collect();
                let act = match family {
                    Family::GptOss => {
                        Activation::ClampedSwiglu { alpha: 1.702, limit: f("swiglu_limit").unwrap_or(7.0) as f32 }
                    }
                    _ => activation,
                };
                moe_config(m, routing, sparse, act, has("blk.0.ffn_gate_inp.bias"))
            })
            .transpose()?;
        assemble(
            arch,
            Conventions {
                moe,
                attn_sinks: has("blk.0.attn_sinks.weight"),
                format: WeightFormat::Gguf,
                norm,
                activation,
                block,
                qkv,
                biases: [
                    has("blk.0.attn_q.bias") || has("blk.0.attn_qkv.bias"),
                    has("blk.0.attn_output.bias"),
                    has("blk.0.ffn_up.bias"),
                    has("output.bias"),
                ],
                qk_norm: has("blk.0.attn_q_norm.weight"),
                rope,
                attn_scale,
                attn_softcap: f("attn_logit_softcapping").filter(|_| family == Family::Gemma2),
                final_softcap: f("final_logit_softcapping"),
                context_length: context,
            },
        )
    }
}

/// What differs between the formats a model can be stored in; the rest comes from the
/// architecture.
struct Conventions {
    moe: Option<MoeConfig>,
    attn_sinks: bool,
    format: WeightFormat,
    norm: NormKind,
    activation: Activation,
    block: BlockKind,
    qkv: QkvLayout,
    /// Bias on the QKV projections, the attention output, the MLP, the head.
    biases: [bool; 4],
    qk_norm: bool,
    rope: Option<RopeConfig>,
    attn_scale: f64,
    attn_softcap: Option<f64>,
    final_softcap: Option<f64>,
    context_length: usize,
}

fn assemble(arch: &Architecture, c: Conventions) -> Result<EngineConfig, EngineError> {
    let family = arch.family;
    let [qkv_bias, out_bias, mlp_bias, head_bias] = c.biases;
    Ok(EngineConfig {
        family,
        format: c.format,
        vocab_size: usize_of(arch.vocab_size)?,
        hidden_size: usize_of(arch.hidden_size)?,
        intermediate_size: usize_of(arch.intermediate_size)?,
        num_layers: usize_of(arch.num_layers)?,
        num_heads: usize_of(arch.num_heads)?,
        num_kv_heads: usize_of(arch.num_kv_heads)?,
        head_dim: usize_of(arch.head_dim)?,
        norm: c.norm,
        activation: c.activation,
        gated_mlp: arch.shape.gated_mlp,
        block: c.block,
        qkv: c.qkv,
        qkv_bias,
        out_bias,
        mlp_bias,
        head_bias,
        qk_norm: c.qk_norm,
        rope: c.rope,
        learned_positions: arch.learned_positions.map(usize_of).transpose()?,
        attn_scale: c.attn_scale,
        attn_softcap: c.attn_softcap,
        final_softcap: c.final_softcap,
        embed_scale: matches!(family, Family::Gemma | Family::Gemma2 | Family::Gemma3)
            .then(|| (arch.hidden_size as f64).sqrt()),
        sliding_window: arch.sliding_window.as_ref().map(|sw| sw.window as usize),
        sliding_layers: sliding_flags(arch),
        tied_embeddings: arch.tied_embeddings,
        context_length: c.context_length,
        moe: c.moe,
        attn_sinks: c.attn_sinks,
    })
}

fn moe_config(
    m: gantry_core::arch::Moe,
    routing: Routing,
    sparse_layers: Vec<bool>,
    act: Activation,
    biases: bool,
) -> Result<MoeConfig, EngineError> {
    Ok(MoeConfig {
        experts: usize_of(m.experts)?,
        top_k: usize_of(m.experts_per_token)?,
        expert_size: usize_of(m.expert_intermediate_size)?,
        routing,
        shared_size: m.shared_expert_intermediate_size.map(usize_of).transpose()?,
        sparse_layers,
        act,
        biases,
    })
}

fn usize_of(n: u64) -> Result<usize, EngineError> {
    usize::try_from(n).map_err(|_| EngineError::Config(format!("{n} does not fit this machine's address size")))
}

fn sliding_flags(arch: &Architecture) -> Vec<bool> {
    (0..arch.num_layers).map(|i| arch.is_sliding(i)).collect()
}

fn hf_rope_scaling(value: Option<&Value>, context: u64, head_dim: usize) -> Result<RopeScaling, EngineError> {
    let Some(obj) = value.and_then(Value::as_object) else { return Ok(RopeScaling::None) };
    let kind = obj.get("rope_type").or_else(|| obj.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |k: &str| obj.get(k).and_then(Value::as_f64);
    Ok(match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor").unwrap_or(1.0) },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor").unwrap_or(8.0),
            low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
            original_context: num("original_max_position_embeddings").unwrap_or(8192.0),
        },
        "longrope" | "su" => {
            let list = |k: &str| -> Vec<f64> {
                obj.get(k)
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default()
            };
            let (short, long) = (list("short_factor"), list("long_factor"));
            if short.len() * 2 != head_dim || long.len() * 2 != head_dim {
                return Err(EngineError::Config(format!(
                    "longrope factors must have head_dim/2 = {} entries",
                    head_dim / 2
                )));
            }
            let original = num("original_max_position_embeddings").map_or(4096, |n| n as usize);
            let scale = context as f64 / original as f64;
            let attention_factor = if scale <= 1.0 { 1.0 } else { (1.0 + scale.ln() / (original as f64).ln()).sqrt() };
            RopeScaling::Factors { short, long, original_context: original, attention_factor }
        }
        "yarn" => {
            let factor = num("factor").unwrap_or(1.0);
            let mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
            let attention_factor = match (num("attention_factor"), num("mscale"), num("mscale_all_dim")) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(factor, m) / mscale(factor, all),
                _ => mscale(factor, 1.0),
            };
            RopeScaling::Yarn {
                factor,
                beta_fast: num("beta_fast").filter(|&b| b != 0.0).unwrap_or(32.0),
                beta_slow: num("beta_slow").filter(|&b| b != 0.0).unwrap_or(1.0),
                original_context: num("original_max_position_embeddings").unwrap_or(context as f64),
                truncate: obj.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                attention_factor,
            }
        }
        other => return Err(EngineError::Config(format!("unsupported rope scaling `{other}`"))),
    })
}
