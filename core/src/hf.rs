//! Reading a Hugging Face `config.json` into an [`Architecture`] and the facts around it.
//!
//! Configs spell the same thing many ways (`hidden_size`, `n_embd`, `d_model`), omit keys
//! whose `transformers` default applies, and nest the text model of multimodal models under
//! `text_config`. This module knows those spellings and defaults; it takes parsed JSON, never
//! a file.

use serde_json::{Map, Value};

use crate::arch::{Architecture, LayerShape, Moe, SlidingWindow, VisionTower};
use crate::error::{Error, Result, product, sum};
use crate::family::Family;

const FILE: &str = "config.json";

/// How positions are stretched beyond the trained length (`rope_scaling`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RopeScaling {
    /// `linear`, `dynamic`, `yarn`, `llama3`, `longrope`, …
    pub kind: String,
    /// The stretch factor, where the method has one.
    pub factor: Option<f64>,
    /// The context the model was pre-trained with, where given.
    pub original_context: Option<u64>,
}

/// Everything `config.json` says that Gantry uses.
#[derive(Debug, Clone, PartialEq)]
pub struct HfConfig {
    pub architecture: Architecture,
    /// The `architectures[0]` class, or `model_type` when absent.
    pub class: String,
    /// Trained context length and the key it came from.
    pub context: Option<(u64, &'static str)>,
    pub rope_scaling: Option<RopeScaling>,
    /// `torch_dtype` / `dtype` (`bfloat16`, `float16`, `float32`).
    pub dtype: Option<String>,
    /// `quantization_config.quant_method` and bits, where the checkpoint is pre-quantized.
    pub quantization: Option<(String, Option<u64>)>,
    pub eos_token_ids: Vec<u64>,
    pub bos_token_id: Option<u64>,
}

/// Keys that hold the trained context length, in the order real configs are trusted.
pub const CONTEXT_KEYS: [&str; 6] =
    ["max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length", "n_ctx"];

/// Parses the text of a `config.json`.
pub fn parse_config(text: &str) -> Result<HfConfig> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Error::MalformedJson { file: FILE.to_string(), detail: e.to_string() })?;
    parse_config_value(&value)
}

/// Parses an already-parsed `config.json`.
pub fn parse_config_value(value: &Value) -> Result<HfConfig> {
    let root = value.as_object().ok_or_else(|| Error::BadValue {
        file: FILE.to_string(),
        key: "(top level)".to_string(),
        problem: "must be a JSON object".to_string(),
    })?;
    let class = root
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .map(str::to_string);
    let model_type = root.get("model_type").and_then(Value::as_str);
    let family = class
        .as_deref()
        .and_then(Family::from_architecture)
        .or_else(|| model_type.and_then(Family::from_model_type))
        .ok_or_else(|| Error::UnknownArchitecture {
            name: class.clone().or(model_type.map(str::to_string)).unwrap_or_else(|| "(none given)".into()),
        })?;

    // Multimodal models (Gemma 3 4B and up) keep the language model under `text_config`.
    let text = match root.get("text_config").and_then(Value::as_object) {
        Some(tc) => merged(root, tc),
        None => root.clone(),
    };
    let cfg = Keys { map: &text, family };
    let architecture = read_architecture(&cfg, root)?;
    let context = context_length(&cfg);
    Ok(HfConfig {
        class: class.unwrap_or_else(|| family.as_str().to_string()),
        context,
        rope_scaling: rope_scaling(text.get("rope_scaling")),
        dtype: ["torch_dtype", "dtype"]
            .iter()
            .find_map(|k| root.get(*k).or_else(|| text.get(*k)).and_then(Value::as_str))
            .map(str::to_string),
        quantization: root.get("quantization_config").and_then(Value::as_object).map(|q| {
            let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("unknown").to_string();
            (method, q.get("bits").and_then(Value::as_u64))
        }),
        eos_token_ids: token_ids(root.get("eos_token_id").or_else(|| text.get("eos_token_id"))),
        bos_token_id: root.get("bos_token_id").or_else(|| text.get("bos_token_id")).and_then(Value::as_u64),
        architecture,
    })
}

/// `text_config` keys win over the top level, which still supplies shared keys.
fn merged(root: &Map<String, Value>, text: &Map<String, Value>) -> Map<String, Value> {
    let mut out = root.clone();
    out.remove("text_config");
    for (k, v) in text {
        out.insert(k.clone(), v.clone());
    }
    out
}

/// Typed access to config keys with aliases and family defaults.
struct Keys<'a> {
    map: &'a Map<String, Value>,
    family: Family,
}

impl Keys<'_> {
    fn raw(&self, names: &[&str]) -> Option<&Value> {
        names.iter().find_map(|n| self.map.get(*n).filter(|v| !v.is_null()))
    }

    fn u64_opt(&self, names: &[&str]) -> Result<Option<u64>> {
        match self.raw(names) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| Error::BadValue {
                file: FILE.to_string(),
                key: names[0].to_string(),
                problem: format!("must be a non-negative integer, found {v}"),
            }),
        }
    }

    fn u64_or(&self, names: &[&str], default: Option<u64>) -> Result<u64> {
        self.u64_opt(names)?.or(default).ok_or_else(|| Error::MissingKey {
            file: FILE.to_string(),
            key: names[0].to_string(),
            family: self.family.to_string(),
        })
    }

    fn bool_or(&self, names: &[&str], default: bool) -> bool {
        self.raw(names).and_then(Value::as_bool).unwrap_or(default)
    }
}

/// `transformers`' defaults for keys that real configs leave out. Only Gemma 3's text config
/// relies on them in practice (its multimodal configs give a handful of keys).
struct Defaults {
    vocab: Option<u64>,
    hidden: Option<u64>,
    intermediate: Option<u64>,
    layers: Option<u64>,
    heads: Option<u64>,
    kv_heads: Option<u64>,
    head_dim: Option<u64>,
    tied: bool,
}

fn defaults(family: Family) -> Defaults {
    let none = Defaults {
        vocab: None,
        hidden: None,
        intermediate: None,
        layers: None,
        heads: None,
        kv_heads: None,
        head_dim: None,
        tied: false,
    };
    match family {
        // Gemma3TextConfig's defaults.
        Family::Gemma3 => Defaults {
            vocab: Some(262_208),
            hidden: Some(2304),
            intermediate: Some(9216),
            layers: Some(26),
            heads: Some(8),
            kv_heads: Some(4),
            head_dim: Some(256),
            tied: true,
        },
        // FalconConfig's defaults are Falcon-7B.
        Family::Falcon => {
            Defaults { vocab: Some(65_024), hidden: Some(4544), layers: Some(32), heads: Some(71), tied: true, ..none }
        }
        Family::Gemma | Family::Gemma2 | Family::Gpt2 => Defaults { tied: true, ..none },
        _ => none,
    }
}

fn read_architecture(cfg: &Keys<'_>, root: &Map<String, Value>) -> Result<Architecture> {
    let family = cfg.family;
    let d = defaults(family);
    let hidden = cfg.u64_or(&["hidden_size", "n_embd", "n_embed", "d_model"], d.hidden)?;
    let layers = cfg.u64_or(&["num_hidden_layers", "n_layer", "num_layers"], d.layers)?;
    let heads = cfg.u64_or(&["num_attention_heads", "n_head", "num_heads"], d.heads)?;
    let vocab = cfg.u64_or(&["vocab_size", "padded_vocab_size"], d.vocab)?;
    if heads == 0 {
        return Err(Error::Absurd {
            what: "num_attention_heads".into(),
            value: "0".into(),
            why: "must be at least 1".into(),
        });
    }
    let head_dim = cfg.u64_or(&["head_dim"], d.head_dim.or(Some(hidden / heads)))?;

    let kv_heads = if family == Family::Falcon {
        let new_arch = cfg.bool_or(&["new_decoder_architecture"], false);
        let multi_query = cfg.bool_or(&["multi_query"], true);
        match cfg.u64_opt(&["num_kv_heads", "n_head_kv", "num_key_value_heads"])? {
            Some(n) if new_arch => n,
            _ if multi_query && !new_arch => 1,
            _ => heads,
        }
    } else {
        cfg.u64_or(&["num_key_value_heads", "num_kv_heads", "n_head_kv"], d.kv_heads.or(Some(heads)))?
    };

    let default_inter = match family {
        Family::Gpt2 | Family::Falcon => Some(4 * hidden),
        _ => d.intermediate,
    };
    let intermediate = cfg.u64_or(&["intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim"], default_inter)?;
    let tied = cfg.bool_or(&["tie_word_embeddings"], d.tied);

    let shape = layer_shape(cfg);
    let moe = read_moe(cfg, intermediate)?;
    let learned_positions = match family {
        Family::Gpt2 => Some(cfg.u64_or(&["n_positions", "max_position_embeddings"], Some(1024))?),
        _ => None,
    };
    let arch = Architecture {
        family,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        tied_embeddings: tied,
        learned_positions,
        moe,
        shape,
        sliding_window: sliding_window(cfg, layers)?,
        vision: vision_tower(root, hidden)?,
    };
    arch.validate()?;
    Ok(arch)
}

fn layer_shape(cfg: &Keys<'_>) -> LayerShape {
    layer_shape_for(cfg.family, &|key, default| cfg.bool_or(&[key], default))
}

/// The block layout of a family; `flag(key, default)` answers the config switches that vary
/// within a family (`attention_bias`, `mlp_bias`, Falcon's `bias`, `new_decoder_architecture`,
/// `parallel_attn`). GGUF readers answer them from the tensor table.
pub(crate) fn layer_shape_for(family: Family, flag: &dyn Fn(&str, bool) -> bool) -> LayerShape {
    let attention_bias = flag("attention_bias", false);
    let mlp_bias = flag("mlp_bias", false);
    let llama = LayerShape { qkv_bias: attention_bias, out_bias: attention_bias, mlp_bias, ..LayerShape::llama() };
    let layer_norm = LayerShape {
        norms_per_layer: 2,
        norm_bias: true,
        qkv_bias: true,
        out_bias: true,
        gated_mlp: false,
        mlp_bias: true,
        qk_norm: false,
        attention_sinks: false,
        head_bias: false,
    };
    match family {
        Family::Llama | Family::Mistral | Family::Mixtral | Family::Phi3 => llama,
        Family::Qwen2 | Family::Qwen2Moe => LayerShape { qkv_bias: true, ..LayerShape::llama() },
        Family::Qwen3 | Family::Qwen3Moe => LayerShape { qk_norm: true, ..llama },
        Family::Gemma => LayerShape::llama(),
        Family::Gemma2 => LayerShape { norms_per_layer: 4, ..LayerShape::llama() },
        Family::Gemma3 => LayerShape { norms_per_layer: 4, qk_norm: true, ..LayerShape::llama() },
        Family::GptOss => {
            LayerShape { qkv_bias: true, out_bias: true, mlp_bias: true, attention_sinks: true, ..LayerShape::llama() }
        }
        Family::Gpt2 => layer_norm,
        // Phi-2: one LayerNorm feeding attention and MLP in parallel; biased head.
        Family::Phi => LayerShape { norms_per_layer: 1, head_bias: true, ..layer_norm },
        Family::Falcon => {
            let bias = flag("bias", false);
            let new_arch = flag("new_decoder_architecture", false);
            let parallel = flag("parallel_attn", true);
            LayerShape {
                norms_per_layer: if new_arch || !parallel { 2 } else { 1 },
                qkv_bias: bias,
                out_bias: bias,
                mlp_bias: bias,
                ..layer_norm
            }
        }
    }
}

fn read_moe(cfg: &Keys<'_>, intermediate: u64) -> Result<Option<Moe>> {
    let Some(experts) = cfg.u64_opt(&["num_local_experts", "num_experts", "n_routed_experts"])? else {
        return Ok(None);
    };
    let per_token = cfg.u64_or(&["num_experts_per_tok", "experts_per_token", "num_experts_per_token"], None)?;
    let expert_inter = cfg.u64_opt(&["moe_intermediate_size"])?.unwrap_or(intermediate);
    let shared = cfg.u64_opt(&["shared_expert_intermediate_size"])?.filter(|&n| n > 0);
    Ok(Some(Moe {
        experts,
        experts_per_token: per_token,
        expert_intermediate_size: expert_inter,
        shared_expert_intermediate_size: shared,
    }))
}

/// Which layers use a sliding window, from `layer_types` when given, else the family's rule.
fn sliding_window(cfg: &Keys<'_>, layers: u64) -> Result<Option<SlidingWindow>> {
    let family = cfg.family;
    let default_window = match family {
        Family::Gemma2 => Some(4096),
        Family::Gemma3 => Some(4096),
        _ => None,
    };
    let Some(window) = cfg.u64_opt(&["sliding_window", "sliding_window_size"])?.or(default_window) else {
        return Ok(None);
    };
    // Checked before any per-layer list is built (found by fuzzing: a Gemma 3 config claiming
    // 3 billion layers built a 13 GB list before the architecture's own checks ran).
    if layers > crate::arch::MAX_LAYERS {
        return Err(Error::Absurd {
            what: "num_hidden_layers".into(),
            value: layers.to_string(),
            why: format!("the largest plausible value is {}", crate::arch::MAX_LAYERS),
        });
    }
    let layers32 = layers as u32; // fits: at most MAX_LAYERS
    let sliding: Vec<u32> = if let Some(types) = cfg.raw(&["layer_types"]).and_then(Value::as_array) {
        types
            .iter()
            .enumerate()
            .filter(|(_, t)| t.as_str() == Some("sliding_attention"))
            .filter_map(|(i, _)| u32::try_from(i).ok())
            .filter(|&i| i < layers32)
            .collect()
    } else {
        match family {
            Family::Qwen2 | Family::Qwen2Moe | Family::Qwen3 | Family::Qwen3Moe => {
                if !cfg.bool_or(&["use_sliding_window"], false) {
                    return Ok(None);
                }
                let from = cfg.u64_opt(&["max_window_layers"])?.unwrap_or(0);
                (0..layers32).filter(|&i| u64::from(i) >= from).collect()
            }
            _ => {
                let pattern = cfg.u64_opt(&["sliding_window_pattern", "_sliding_window_pattern"])?;
                match default_sliding_layers(family, layers32, pattern) {
                    Some(layers) => layers,
                    None => return Ok(None),
                }
            }
        }
    };
    if sliding.is_empty() {
        return Ok(None);
    }
    Ok(Some(SlidingWindow { window, layers: sliding }))
}

/// The family rule for which layers slide when a config or GGUF file does not list them.
pub(crate) fn default_sliding_layers(family: Family, layers: u32, pattern: Option<u64>) -> Option<Vec<u32>> {
    Some(match family {
        // Gemma 2 and gpt-oss alternate: even layers slide, odd ones are global.
        Family::Gemma2 | Family::GptOss => (0..layers).filter(|i| i % 2 == 0).collect(),
        // Gemma 3: every n-th layer is global (5 local : 1 global by default).
        Family::Gemma3 => {
            let n = pattern.unwrap_or(6).max(1);
            (0..layers).filter(|&i| (u64::from(i) + 1) % n != 0).collect()
        }
        Family::Mistral | Family::Mixtral | Family::Phi3 => (0..layers).collect(),
        _ => return None,
    })
}

/// The SigLIP vision tower and projector of Gemma 3 multimodal configs.
fn vision_tower(root: &Map<String, Value>, text_hidden: u64) -> Result<Option<VisionTower>> {
    let Some(vc) = root.get("vision_config").and_then(Value::as_object) else {
        return Ok(None);
    };
    let cfg = Keys { map: vc, family: Family::Gemma3 };
    // SiglipVisionConfig's defaults.
    let h = cfg.u64_or(&["hidden_size"], Some(768))?;
    let inter = cfg.u64_or(&["intermediate_size"], Some(3072))?;
    let layers = cfg.u64_or(&["num_hidden_layers"], Some(12))?;
    let image = cfg.u64_or(&["image_size"], Some(224))?;
    let patch = cfg.u64_or(&["patch_size"], Some(16))?.max(1);
    let channels = cfg.u64_or(&["num_channels"], Some(3))?;
    let with_head = cfg.bool_or(&["vision_use_head"], true);
    if h > 1 << 16 || inter > 1 << 18 || layers > 1 << 10 || image > 1 << 16 || channels > 64 {
        return Err(Error::Absurd {
            what: "vision_config".into(),
            value: format!("hidden {h}, layers {layers}, image {image}"),
            why: "beyond any published vision tower".into(),
        });
    }
    let w = "the vision tower";
    let patches = (image / patch) * (image / patch);
    let patch_embed = sum(&[product(&[channels, patch, patch, h], w)?, h], w)?;
    let positions = product(&[patches, h], w)?;
    let mlp = sum(&[product(&[2, h, inter], w)?, inter, h], w)?;
    let attention = product(&[4, h * h + h], w)?;
    let block = sum(&[attention, mlp, 4 * h], w)?;
    let head = if with_head {
        // Attention-pooling head: probe, attention in/out projections, LayerNorm, MLP.
        sum(&[h, product(&[3, h * h + h], w)?, h * h + h, 2 * h, mlp], w)?
    } else {
        0
    };
    let encoder = sum(&[patch_embed, positions, product(&[block, layers], w)?, 2 * h, head], w)?;
    // Gemma 3's projector: a vision→text matrix and an RMSNorm over the vision features.
    let projector = sum(&[product(&[h, text_hidden], w)?, h], w)?;
    Ok(Some(VisionTower { encoder_params: encoder, projector_params: projector }))
}

fn context_length(cfg: &Keys<'_>) -> Option<(u64, &'static str)> {
    for key in CONTEXT_KEYS {
        if let Some(n) = cfg.raw(&[key]).and_then(Value::as_u64).filter(|&n| n > 0) {
            return Some((n, key));
        }
    }
    // Gemma3TextConfig's default, which the multimodal Gemma 3 configs rely on.
    (cfg.family == Family::Gemma3).then_some((131_072, "max_position_embeddings (transformers default)"))
}

fn rope_scaling(value: Option<&Value>) -> Option<RopeScaling> {
    let obj = value?.as_object()?;
    let kind = obj.get("rope_type").or_else(|| obj.get("type")).and_then(Value::as_str)?.to_string();
    Some(RopeScaling {
        kind,
        factor: obj.get("factor").and_then(Value::as_f64),
        original_context: obj.get("original_max_position_embeddings").and_then(Value::as_u64),
    })
}

/// A token id or a list of them (`eos_token_id: [1, 106]`).
pub fn token_ids(value: Option<&Value>) -> Vec<u64> {
    match value {
        Some(Value::Number(n)) => n.as_u64().into_iter().collect(),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_u64).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_gpt2_spellings() {
        let cfg = parse_config(
            r#"{"architectures":["GPT2LMHeadModel"],"model_type":"gpt2","n_embd":768,"n_head":12,
                "n_layer":12,"n_positions":1024,"vocab_size":50257}"#,
        )
        .unwrap();
        let a = &cfg.architecture;
        assert_eq!((a.hidden_size, a.num_heads, a.num_layers, a.intermediate_size), (768, 12, 12, 3072));
        assert_eq!(cfg.context, Some((1024, "n_positions")));
        assert_eq!(a.count_params().unwrap().total, 124_439_808);
    }

    #[test]
    fn unknown_model_type_is_named() {
        let err = parse_config(r#"{"model_type":"mamba","hidden_size":8}"#).unwrap_err();
        assert_eq!(err, Error::UnknownArchitecture { name: "mamba".into() });
        let err = parse_config(r#"{"architectures":["BertForMaskedLM"]}"#).unwrap_err();
        assert!(err.to_string().contains("`BertForMaskedLM`"), "{err}");
    }

    #[test]
    fn malformed_and_wrongly_typed_configs_get_clear_errors() {
        let cases = [
            ("{not json", "config.json is not valid JSON"),
            ("[1,2]", "must be a JSON object"),
            (r#"{"model_type":"llama","hidden_size":"big"}"#, "`hidden_size` must be a non-negative integer"),
            (r#"{"model_type":"llama","hidden_size":64}"#, "has no `num_hidden_layers`"),
            (
                r#"{"model_type":"llama","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":0,"vocab_size":10,"intermediate_size":8}"#,
                "num_attention_heads",
            ),
            (
                r#"{"model_type":"llama","hidden_size":64,"num_hidden_layers":99999999999,"num_attention_heads":4,"vocab_size":10,"intermediate_size":8}"#,
                "absurd num_hidden_layers",
            ),
            // Found by fuzzing: a family with sliding layers used to list them all first.
            (
                r#"{"architectures":["Gemma3ForCausalLM"],"attntn_size":2,"num_hidden_layers":3238038144}"#,
                "absurd num_hidden_layers: 3238038144 (the largest plausible value is 16384)",
            ),
        ];
        for (text, want) in cases {
            let err = parse_config(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn eos_ids_accept_a_number_or_a_list() {
        assert_eq!(token_ids(Some(&serde_json::json!(2))), vec![2]);
        assert_eq!(token_ids(Some(&serde_json::json!([1, 106]))), vec![1, 106]);
        assert!(token_ids(Some(&serde_json::json!(null))).is_empty());
    }
}
