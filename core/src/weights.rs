//! Weights: how many bytes a model's tensors take and where they sit (embeddings, each layer,
//! head), from a tensor table or computed from a parameter count at a precision.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::arch::{Architecture, Moe, ParamBreakdown};
use crate::error::{Error, Result, product, sum};
use crate::hf::HfConfig;
use crate::quant::{SafetensorsDtype, WeightDtype};
use crate::safetensors::{SafetensorsHeader, SafetensorsIndex};
use crate::spec::{ParamSource, Parameters};

/// Bytes of weights and where they sit, for splitting a model into pipeline stages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightLayout {
    /// Token and position embeddings (first stage).
    pub embedding_bytes: u64,
    /// Each transformer block, in order.
    pub layer_bytes: Vec<u64>,
    /// Final norm and output head (last stage).
    pub head_bytes: u64,
    /// When the head is tied to the embeddings, the bytes a separate last stage must also
    /// hold (a copy of the embedding matrix); 0 when untied.
    pub tied_head_bytes: u64,
    /// Anything else: vision tower, projector (first stage).
    pub other_bytes: u64,
    /// Of each layer's bytes, those of its routed experts (mixture-of-experts models; empty
    /// otherwise): what can live in host memory when a GPU is short.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expert_bytes: Vec<u64>,
}

impl WeightLayout {
    /// All weight bytes on one device.
    pub fn total(&self) -> u64 {
        self.embedding_bytes + self.layer_bytes.iter().sum::<u64>() + self.head_bytes + self.other_bytes
    }

    /// Bytes of all routed experts.
    pub fn total_expert_bytes(&self) -> u64 {
        self.expert_bytes.iter().sum()
    }
}

/// Whether a tensor is a routed expert's matrix (or bias): `transformers`' `.experts.` (not a
/// shared expert), llama.cpp's `_exps` and early Mixtral GGUFs' `ffn_gate.3`.
pub fn is_expert_tensor(name: &str) -> bool {
    if name.contains(".experts.") || name.contains("_exps.") {
        return true;
    }
    // blk.N.ffn_{gate,up,down}.E.weight
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).any(|w| {
        matches!(w[0], "ffn_gate" | "ffn_up" | "ffn_down")
            && w[1].bytes().all(|b| b.is_ascii_digit())
            && !w[1].is_empty()
    })
}

/// The weights as stored: format, precision and exact (or estimated) bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    /// Human name of the precision: `bf16`, `Q4_K_M`, `Q4_1`, `mxfp4+bf16`.
    pub dtype: String,
    /// The uniform precision, when there is one that `--dtype` style costing can reuse.
    pub base_dtype: Option<WeightDtype>,
    /// Total bytes of weights.
    pub bytes: u64,
    /// True when summed from a tensor table; false when computed from a parameter count.
    pub exact: bool,
    /// Tensor count per storage type (`Q4_1: 210`, `F32: 61`).
    pub tensors_by_type: BTreeMap<String, u64>,
    pub layout: WeightLayout,
}

/// The layer a tensor belongs to, from the naming schemes of GGUF and `transformers`.
pub fn layer_of(name: &str) -> Option<u64> {
    const PREFIXES: [&str; 5] = ["blk.", "layers.", "h.", "blocks.", "layer."];
    let parts: Vec<&str> = name.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let dotted = format!("{part}.");
        if PREFIXES.contains(&dotted.as_str())
            && let Some(n) = parts.get(i + 1).and_then(|p| p.parse().ok())
        {
            return Some(n);
        }
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Embedding,
    Layer(u64),
    Head,
    Other,
}

fn slot_of(name: &str) -> Slot {
    if name.contains("vision") || name.contains("multi_modal") || name.contains("mm_") {
        return Slot::Other;
    }
    if let Some(n) = layer_of(name) {
        return Slot::Layer(n);
    }
    const EMBED: [&str; 6] = ["token_embd", "position_embd", "embed_tokens", "wte.", "wpe.", "word_embeddings"];
    const HEAD: [&str; 7] =
        ["output.", "output_norm", "lm_head", "ln_f.", "final_layernorm", "model.norm.", "norm.weight"];
    if EMBED.iter().any(|p| name.contains(p)) {
        Slot::Embedding
    } else if HEAD.iter().any(|p| name.contains(p)) {
        Slot::Head
    } else {
        Slot::Other
    }
}

pub(crate) fn layout_from_tensors<'a>(
    tensors: impl Iterator<Item = (&'a str, u64)>,
    num_layers: u64,
    tied: bool,
) -> Result<WeightLayout> {
    let n = usize::try_from(num_layers).map_err(|_| Error::Overflow { what: "layer count".into() })?;
    let mut layout = WeightLayout {
        embedding_bytes: 0,
        layer_bytes: vec![0; n],
        head_bytes: 0,
        tied_head_bytes: 0,
        other_bytes: 0,
        expert_bytes: Vec::new(),
    };
    let mut token_embedding = 0;
    for (name, bytes) in tensors {
        if is_expert_tensor(name)
            && let Slot::Layer(i) = slot_of(name)
            && (i as usize) < n
        {
            layout.expert_bytes.resize(n, 0);
            layout.expert_bytes[i as usize] += bytes;
        }
        match slot_of(name) {
            Slot::Embedding => {
                layout.embedding_bytes += bytes;
                if !name.contains("position") && !name.contains("wpe") {
                    token_embedding += bytes;
                }
            }
            Slot::Layer(i) => match layout.layer_bytes.get_mut(i as usize) {
                Some(slot) => *slot += bytes,
                None => {
                    return Err(Error::Absurd {
                        what: format!("tensor `{name}`"),
                        value: format!("layer {i}"),
                        why: format!("the model declares {num_layers} layers"),
                    });
                }
            },
            Slot::Head => layout.head_bytes += bytes,
            Slot::Other => layout.other_bytes += bytes,
        }
    }
    if tied {
        layout.tied_head_bytes = token_embedding;
    }
    Ok(layout)
}

pub(crate) fn layout_from_params(
    arch: &Architecture,
    counted: &ParamBreakdown,
    bytes: &dyn Fn(u64) -> Result<u64>,
) -> Result<WeightLayout> {
    let n = usize::try_from(arch.num_layers).map_err(|_| Error::Overflow { what: "layer count".into() })?;
    let token_embedding = product(&[arch.vocab_size, arch.hidden_size], "embedding bytes")?;
    Ok(WeightLayout {
        embedding_bytes: bytes(counted.embedding)?,
        layer_bytes: vec![bytes(counted.per_layer)?; n],
        head_bytes: bytes(counted.head)?,
        tied_head_bytes: if arch.tied_embeddings { bytes(token_embedding)? } else { 0 },
        other_bytes: bytes(counted.vision)?,
        expert_bytes: match arch.moe {
            Some(_) => vec![bytes(arch.expert_matrix_params()? / arch.num_layers.max(1))?; n],
            None => Vec::new(),
        },
    })
}

pub(crate) fn weights_from_config(
    cfg: &HfConfig,
    arch: &Architecture,
    counted: &ParamBreakdown,
    index: Option<&SafetensorsIndex>,
) -> Result<Weights> {
    let torch = cfg.dtype.as_deref().and_then(WeightDtype::from_torch);
    let base = torch.unwrap_or(WeightDtype::Bf16);
    let per_param = |p: u64| base.bytes_for(p).ok_or_else(|| Error::Overflow { what: "weight bytes".into() });
    let mut layout = layout_from_params(arch, counted, &per_param)?;
    let mut dtype = cfg.dtype.clone().map_or_else(|| format!("{base} (assumed)"), |d| base_name(&d));

    match &cfg.quantization {
        // gpt-oss ships its expert matrices in MXFP4 (17 bytes per 32 weights), the rest in bf16.
        Some((method, _)) if method == "mxfp4" => {
            let experts = arch.expert_matrix_params()?;
            let per_layer_experts = experts / arch.num_layers.max(1);
            let full = base.bytes_for(per_layer_experts).unwrap_or(0);
            let packed = per_layer_experts.div_ceil(32) * 17;
            for b in &mut layout.layer_bytes {
                *b = b.saturating_sub(full) + packed;
            }
            layout.expert_bytes.iter_mut().for_each(|b| *b = packed);
            dtype = format!("mxfp4 experts + {base}");
        }
        Some((method, bits)) => {
            // GPTQ/AWQ and the like: linear layers at `bits`, the rest as stored; estimate.
            let bits = bits.unwrap_or(4);
            dtype = format!("{method} {bits}-bit (estimated)");
            let scale = |b: u64| b.saturating_mul(bits) / (8 * base.bytes_for(1).unwrap_or(2));
            layout.layer_bytes.iter_mut().chain(&mut layout.expert_bytes).for_each(|b| *b = scale(*b));
        }
        None => {}
    }
    let mut bytes = layout.total();
    let mut exact = false;
    // The shard index records the exact byte total of all tensors.
    if let Some(total) = index.and_then(|i| i.total_size) {
        bytes = total;
        exact = true;
    }
    Ok(Weights { dtype, base_dtype: torch, bytes, exact, tensors_by_type: BTreeMap::new(), layout })
}

fn base_name(torch: &str) -> String {
    WeightDtype::from_torch(torch).map_or_else(|| torch.to_string(), |d| d.to_string())
}

/// Tensors that safetensors files store but that are not parameters (attention-mask and
/// rotary buffers of older checkpoints).
fn is_buffer(name: &str, dims: usize) -> bool {
    name.ends_with("inv_freq") || name.ends_with("attn.masked_bias") || (name.ends_with("attn.bias") && dims == 4)
}

pub(crate) fn weights_from_safetensors(
    headers: &[SafetensorsHeader],
    arch: &Architecture,
    counted: &ParamBreakdown,
) -> Result<(Parameters, Weights)> {
    let tensors: Vec<_> =
        headers.iter().flat_map(|h| &h.tensors).filter(|t| !is_buffer(&t.name, t.shape.len())).collect();
    let total: u64 = sum(&tensors.iter().map(|t| t.elements).collect::<Vec<_>>(), "the parameter count")?;
    let bytes: u64 = sum(&tensors.iter().map(|t| t.bytes).collect::<Vec<_>>(), "weight bytes")?;
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    let mut bytes_by_type: BTreeMap<SafetensorsDtype, u64> = BTreeMap::new();
    for t in &tensors {
        *by_type.entry(t.dtype.name().to_string()).or_default() += 1;
        *bytes_by_type.entry(t.dtype).or_default() += t.bytes;
    }
    let dominant = bytes_by_type.iter().max_by_key(|(_, b)| **b).map(|(d, _)| *d);
    let base = dominant.and_then(|d| WeightDtype::parse(d.name()).ok());
    let layout =
        layout_from_tensors(tensors.iter().map(|t| (t.name.as_str(), t.bytes)), arch.num_layers, arch.tied_embeddings)?;
    // Active parameters: the tensor table's total minus the unused share of the experts.
    let active = match arch.moe {
        Some(Moe { experts, experts_per_token, .. }) => {
            let expert: u64 = tensors.iter().filter(|t| t.name.contains(".experts.")).map(|t| t.elements).sum();
            total - expert + expert / experts * experts_per_token
        }
        None => total.saturating_sub(counted.total - counted.active),
    };
    Ok((
        Parameters { total, active, source: ParamSource::TensorShapes },
        Weights {
            dtype: dominant.map_or_else(|| "unknown".into(), |d| d.name().to_ascii_lowercase()),
            base_dtype: base,
            bytes,
            exact: true,
            tensors_by_type: by_type,
            layout,
        },
    ))
}

/// llama.cpp's `general.file_type` names (`LLAMA_FTYPE_MOSTLY_*`).
pub(crate) fn file_type_name(id: u64) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_are_assigned_to_layers_by_name() {
        let cases = [
            ("blk.12.attn_q.weight", Some(12)),
            ("model.layers.3.mlp.down_proj.weight", Some(3)),
            ("transformer.h.11.attn.c_attn.weight", Some(11)),
            ("language_model.model.layers.0.self_attn.q_proj.weight", Some(0)),
            ("token_embd.weight", None),
            ("lm_head.weight", None),
        ];
        for (name, want) in cases {
            assert_eq!(layer_of(name), want, "{name}");
        }
        assert_eq!(slot_of("output.weight"), Slot::Head);
        assert_eq!(slot_of("model.norm.weight"), Slot::Head);
        assert_eq!(slot_of("model.embed_tokens.weight"), Slot::Embedding);
        assert_eq!(slot_of("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"), Slot::Other);
    }
}
