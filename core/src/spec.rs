//! `ModelSpec`: everything Gantry decides with, read from a model's own files.
//!
//! Three readers build one: [`ModelSpec::from_hf`] (a Hugging Face folder's JSON files and
//! safetensors headers), [`ModelSpec::from_gguf`] (a GGUF header and tensor table) and
//! `catalog` entries. They take contents, not paths: the worker and the CLI do the reading.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::arch::{Architecture, Moe, SlidingWindow};
use crate::error::{Error, Result};
use crate::family::Family;
use crate::gguf::{GgufFile, MetaValue};
use crate::hf::{self, HfConfig, RopeScaling};
use crate::quant::WeightDtype;
use crate::safetensors::{SafetensorsHeader, SafetensorsIndex};
pub use crate::weights::{WeightLayout, Weights, layer_of};
use crate::weights::{
    file_type_name, layout_from_params, layout_from_tensors, weights_from_config, weights_from_safetensors,
};

/// Where a spec was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpecSource {
    /// A GGUF file: metadata plus an exact tensor table.
    Gguf,
    /// A Hugging Face folder with safetensors headers: exact tensor table.
    Safetensors,
    /// A Hugging Face folder with only `config.json` (and maybe the shard index).
    Config,
    /// Gantry's catalog of well-known models.
    Catalog,
}

/// How the parameter count was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamSource {
    /// Summed over the tensor table (exact).
    TensorShapes,
    /// Computed from the architecture in `config.json`.
    ComputedFromConfig,
    /// The published figure recorded in the catalog.
    Catalog,
}

/// Parameter count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parameters {
    pub total: u64,
    /// Parameters used per token; less than `total` for mixture-of-experts models.
    pub active: u64,
    pub source: ParamSource,
}

/// The seed framework's size classes, by total parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SizeClass {
    /// Below 1B.
    Tiny,
    /// 1B to 7B (nominal "7B" models, up to 7.5B, count as small).
    Small,
    /// 7B to 30B (the framework says 7–13B; the 13–30B gap it leaves is counted here).
    Medium,
    /// 30B and above.
    Large,
}

impl SizeClass {
    /// Classifies a parameter count.
    pub fn of(params: u64) -> SizeClass {
        match params {
            p if p < 1_000_000_000 => SizeClass::Tiny,
            p if p < 7_500_000_000 => SizeClass::Small,
            p if p < 30_000_000_000 => SizeClass::Medium,
            _ => SizeClass::Large,
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            SizeClass::Tiny => "tiny",
            SizeClass::Small => "small",
            SizeClass::Medium => "medium",
            SizeClass::Large => "large",
        }
    }
}

/// Context length and the position tricks that change what it means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Context {
    /// Trained context length in tokens.
    pub length: u64,
    /// The key it came from (`max_position_embeddings`, `gemma3.context_length`, …).
    pub source: String,
    pub rope_scaling: Option<RopeScaling>,
    /// Window of the sliding-window layers, when some layers use one shorter than `length`.
    pub sliding_window: Option<u64>,
    /// How many layers use it.
    pub sliding_layers: u64,
}

/// Whether a model is tuned to follow instructions, and why Gantry thinks so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tuning {
    pub instruct: bool,
    pub evidence: String,
}

/// What a model is and what it needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// A display name: the folder, file or catalog id.
    pub name: String,
    pub family: Family,
    /// `transformers` class or GGUF architecture string.
    pub class: String,
    pub source: SpecSource,
    pub architecture: Architecture,
    pub parameters: Parameters,
    pub size_class: SizeClass,
    pub weights: Weights,
    pub context: Context,
    pub tuning: Tuning,
    /// The Jinja chat template, when the files carry one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    pub bos_token_id: Option<u64>,
    pub eos_token_ids: Vec<u64>,
}

/// The contents of a Hugging Face model folder that Gantry reads.
#[derive(Debug, Clone, Copy)]
pub struct HfFiles<'a> {
    /// Repository id or folder name (instruct markers are looked for here).
    pub name: &'a str,
    pub config: &'a str,
    pub tokenizer_config: Option<&'a str>,
    pub generation_config: Option<&'a str>,
    /// Parsed headers of the safetensors files present, if any.
    pub safetensors: &'a [SafetensorsHeader],
    /// Parsed `model.safetensors.index.json`, if present.
    pub index: Option<&'a SafetensorsIndex>,
}

impl ModelSpec {
    /// Builds a spec from a Hugging Face model folder's files.
    pub fn from_hf(files: HfFiles<'_>) -> Result<ModelSpec> {
        let cfg = hf::parse_config(files.config)?;
        let tok = parse_optional_json(files.tokenizer_config, "tokenizer_config.json")?;
        let gen_cfg = parse_optional_json(files.generation_config, "generation_config.json")?;
        let arch = cfg.architecture.clone();
        let counted = arch.count_params()?;

        let chat_template = tok.as_ref().and_then(chat_template_of);
        let context = hf_context(&cfg, tok.as_ref(), &arch)?;

        let (parameters, weights, source) = if files.safetensors.is_empty() {
            let weights = weights_from_config(&cfg, &arch, &counted, files.index)?;
            let p =
                Parameters { total: counted.total, active: counted.active, source: ParamSource::ComputedFromConfig };
            (p, weights, SpecSource::Config)
        } else {
            let (p, w) = weights_from_safetensors(files.safetensors, &arch, &counted)?;
            (p, w, SpecSource::Safetensors)
        };

        // generation_config.json's EOS list is what generation actually stops on.
        let mut eos = gen_cfg.as_ref().map(|g| hf::token_ids(g.get("eos_token_id"))).unwrap_or_default();
        if eos.is_empty() {
            eos = cfg.eos_token_ids.clone();
        }
        let bos = gen_cfg.as_ref().and_then(|g| g.get("bos_token_id")).and_then(Value::as_u64).or(cfg.bos_token_id);

        Ok(ModelSpec {
            name: files.name.to_string(),
            family: arch.family,
            class: cfg.class.clone(),
            source,
            size_class: SizeClass::of(parameters.total),
            tuning: detect_tuning(&[files.name], chat_template.is_some()),
            architecture: arch,
            parameters,
            weights,
            context,
            chat_template,
            bos_token_id: bos,
            eos_token_ids: eos,
        })
    }

    /// Builds a spec from a GGUF file's parsed header. `name` is the file name.
    pub fn from_gguf(name: &str, file: &GgufFile) -> Result<ModelSpec> {
        let arch_name = file
            .architecture()
            .ok_or_else(|| Error::InvalidGguf { reason: "no general.architecture in the metadata".into() })?;
        let experts = file.arch_u64("expert_count").unwrap_or(0);
        let family = Family::from_gguf_arch(arch_name, experts > 0)
            .ok_or_else(|| Error::UnknownArchitecture { name: arch_name.to_string() })?;
        let architecture = gguf_architecture(family, file)?;
        let counted = architecture.count_params()?;

        let total = file.tensor_elements();
        let active = match architecture.moe {
            // Active = total minus the experts a token does not use.
            Some(moe) => {
                let expert_params: u64 =
                    file.tensors.iter().filter(|t| t.name.contains("_exps.")).map(|t| t.elements).sum();
                total - expert_params + expert_params / moe.experts * moe.experts_per_token
            }
            None => total,
        };
        let parameters = Parameters { total, active, source: ParamSource::TensorShapes };

        let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
        let mut bytes_by_type: BTreeMap<&str, u64> = BTreeMap::new();
        for t in &file.tensors {
            *by_type.entry(t.ggml_type.name.to_string()).or_default() += 1;
            *bytes_by_type.entry(t.ggml_type.name).or_default() += t.bytes;
        }
        let layout = layout_from_tensors(
            file.tensors.iter().map(|t| (t.name.as_str(), t.bytes)),
            architecture.num_layers,
            architecture.tied_embeddings,
        )?;
        let dominant = bytes_by_type.iter().max_by_key(|(_, b)| **b).map(|(n, _)| *n).unwrap_or("F32");
        let dtype = file
            .get("general.file_type")
            .and_then(MetaValue::as_u64)
            .and_then(file_type_name)
            .map_or_else(|| dominant.to_string(), str::to_string);
        let weights = Weights {
            base_dtype: WeightDtype::parse(dominant).ok(),
            dtype,
            bytes: file.tensor_bytes(),
            exact: true,
            tensors_by_type: by_type,
            layout,
        };

        let ctx_key = format!("{arch_name}.context_length");
        let length = file
            .get(&ctx_key)
            .and_then(MetaValue::as_u64)
            .ok_or_else(|| Error::InvalidGguf { reason: format!("no {ctx_key} in the metadata") })?;
        if length == 0 || length > 1 << 24 {
            return Err(Error::Absurd {
                what: ctx_key,
                value: length.to_string(),
                why: "context lengths run from 1 to 16M tokens".into(),
            });
        }
        let rope_scaling =
            file.get(&format!("{arch_name}.rope.scaling.type")).and_then(MetaValue::as_str).map(|kind| RopeScaling {
                kind: kind.to_string(),
                factor: file.get(&format!("{arch_name}.rope.scaling.factor")).and_then(MetaValue::as_f64),
                original_context: file.arch_u64("rope.scaling.original_context_length"),
            });
        let context = context_facts(length, ctx_key, rope_scaling, &architecture);

        let chat_template = file.get("tokenizer.chat_template").and_then(MetaValue::as_str).map(str::to_string);
        let names: Vec<&str> = [Some(name), file.get("general.name").and_then(MetaValue::as_str)]
            .into_iter()
            .chain(std::iter::once(file.get("general.finetune").and_then(MetaValue::as_str)))
            .flatten()
            .collect();
        let eos = match file.get("tokenizer.ggml.eos_token_id") {
            Some(MetaValue::Array(items)) => items.iter().filter_map(MetaValue::as_u64).collect(),
            Some(v) => v.as_u64().into_iter().collect(),
            None => Vec::new(),
        };
        let _ = counted; // the exact table wins; the count from the shape is a cross-check in tests
        Ok(ModelSpec {
            name: name.to_string(),
            family,
            class: arch_name.to_string(),
            source: SpecSource::Gguf,
            size_class: SizeClass::of(total),
            tuning: detect_tuning(&names, chat_template.is_some()),
            architecture,
            parameters,
            weights,
            context,
            chat_template,
            bos_token_id: file.get("tokenizer.ggml.bos_token_id").and_then(MetaValue::as_u64),
            eos_token_ids: eos,
        })
    }

    /// Weight bytes if served at `dtype` instead of as stored (layout scaled accordingly).
    pub fn weights_at(&self, dtype: WeightDtype) -> Result<WeightLayout> {
        let counted = self.architecture.count_params()?;
        layout_from_params(&self.architecture, &counted, &|p| {
            dtype.bytes_for(p).ok_or_else(|| Error::Overflow { what: "weight bytes".into() })
        })
    }
}

fn parse_optional_json(text: Option<&str>, file: &str) -> Result<Option<Value>> {
    text.map(|t| serde_json::from_str(t).map_err(|e| Error::MalformedJson { file: file.into(), detail: e.to_string() }))
        .transpose()
}

/// `chat_template` is a string, or a list of named templates (`default`, `tool_use`).
fn chat_template_of(tok: &Value) -> Option<String> {
    match tok.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|i| i.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| items.first())
            .and_then(|i| i.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

fn hf_context(cfg: &HfConfig, tok: Option<&Value>, arch: &Architecture) -> Result<Context> {
    // tokenizer_config's model_max_length is a last resort: transformers writes a huge
    // sentinel (1e30) there when it is unknown.
    let from_tokenizer = || {
        tok.and_then(|t| t.get("model_max_length"))
            .and_then(Value::as_u64)
            .filter(|&n| n > 0 && n <= 1 << 24)
            .map(|n| (n, "model_max_length (tokenizer_config.json)"))
    };
    let (length, source) = cfg.context.or_else(from_tokenizer).ok_or_else(|| Error::MissingKey {
        file: "config.json".into(),
        key: hf::CONTEXT_KEYS.join("` or `"),
        family: arch.family.to_string(),
    })?;
    if length > 1 << 24 {
        return Err(Error::Absurd {
            what: source.to_string(),
            value: length.to_string(),
            why: "context lengths run from 1 to 16M tokens".into(),
        });
    }
    Ok(context_facts(length, source.to_string(), cfg.rope_scaling.clone(), arch))
}

fn context_facts(length: u64, source: String, rope_scaling: Option<RopeScaling>, arch: &Architecture) -> Context {
    let sliding = arch.sliding_window.as_ref().filter(|sw| sw.window < length);
    Context {
        length,
        source,
        rope_scaling,
        sliding_window: sliding.map(|sw| sw.window),
        sliding_layers: sliding.map_or(0, |sw| sw.layers.len() as u64),
    }
}

/// Instruct markers in a name: `Instruct`, `-it`, `chat` (and the tuning recipes `sft`, `dpo`).
fn detect_tuning(names: &[&str], has_template: bool) -> Tuning {
    const MARKERS: [&str; 6] = ["instruct", "it", "chat", "sft", "dpo", "rlhf"];
    for name in names {
        // Only the last path component: a folder called `chat-models/` says nothing.
        let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
        let lower = base.to_ascii_lowercase();
        for token in lower.split(|c: char| !c.is_ascii_alphanumeric()) {
            if MARKERS.contains(&token) {
                let shown = if token == "it" { "-it".to_string() } else { format!("`{token}`") };
                return Tuning { instruct: true, evidence: format!("name `{base}` contains {shown}") };
            }
            if token == "base" {
                return Tuning { instruct: false, evidence: format!("name `{base}` says base") };
            }
        }
    }
    if has_template {
        Tuning { instruct: true, evidence: "ships a chat template".into() }
    } else {
        Tuning { instruct: false, evidence: "no instruct marker in the name and no chat template".into() }
    }
}

/// Reads the architecture from GGUF metadata, answering per-family switches from the
/// tensor table.
fn gguf_architecture(family: Family, file: &GgufFile) -> Result<Architecture> {
    let arch = file.architecture().unwrap_or_default().to_string();
    let need = |key: &str| -> Result<u64> {
        let full = format!("{arch}.{key}");
        match file.get(&full) {
            Some(MetaValue::Array(items)) => items.first().and_then(MetaValue::as_u64),
            Some(v) => v.as_u64(),
            None => None,
        }
        .ok_or_else(|| Error::InvalidGguf { reason: format!("no {full} in the metadata") })
    };
    let opt = |key: &str| -> Option<u64> {
        match file.get(&format!("{arch}.{key}")) {
            Some(MetaValue::Array(items)) => items.first().and_then(MetaValue::as_u64),
            Some(v) => v.as_u64(),
            None => None,
        }
    };
    let has = |name: &str| file.tensors.iter().any(|t| t.name == name);
    let hidden = need("embedding_length")?;
    let layers = need("block_count")?;
    let heads = need("attention.head_count")?;
    if heads == 0 {
        return Err(Error::Absurd {
            what: format!("{arch}.attention.head_count"),
            value: "0".into(),
            why: "must be at least 1".into(),
        });
    }
    let vocab = opt("vocab_size")
        .or_else(|| file.get("tokenizer.ggml.tokens").and_then(MetaValue::array_len))
        .or_else(|| file.tensors.iter().find(|t| t.name == "token_embd.weight").and_then(|t| t.dims.get(1).copied()))
        .ok_or_else(|| Error::InvalidGguf { reason: "cannot tell the vocabulary size".into() })?;
    let experts = opt("expert_count").filter(|&n| n > 0);
    let intermediate = opt("feed_forward_length").or(opt("expert_feed_forward_length")).unwrap_or(4 * hidden);
    let moe = experts.map(|n| Moe {
        experts: n,
        experts_per_token: opt("expert_used_count").unwrap_or(2),
        expert_intermediate_size: opt("expert_feed_forward_length").unwrap_or(intermediate),
        shared_expert_intermediate_size: opt("expert_shared_feed_forward_length"),
    });
    let flag = |key: &str, default: bool| match key {
        "attention_bias" => has("blk.0.attn_q.bias") || has("blk.0.attn_qkv.bias"),
        "bias" => has("blk.0.attn_qkv.bias"),
        "new_decoder_architecture" => has("blk.0.attn_norm_2.weight"),
        "mlp_bias" => has("blk.0.ffn_up.bias"),
        _ => default,
    };
    let layers32 = u32::try_from(layers).ok().filter(|&l| l <= 1 << 14).ok_or_else(|| Error::Absurd {
        what: format!("{arch}.block_count"),
        value: layers.to_string(),
        why: "too many layers".into(),
    })?;
    let sliding_window = opt("attention.sliding_window").filter(|&w| w > 0).and_then(|window| {
        hf::default_sliding_layers(family, layers32, None).map(|layers| SlidingWindow { window, layers })
    });
    let a = Architecture {
        family,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: opt("attention.head_count_kv").unwrap_or(heads),
        head_dim: opt("attention.key_length").unwrap_or(hidden / heads),
        tied_embeddings: !has("output.weight"),
        learned_positions: file
            .tensors
            .iter()
            .find(|t| t.name == "position_embd.weight")
            .and_then(|t| t.dims.get(1).copied()),
        moe,
        shape: hf::layer_shape_for(family, &flag),
        sliding_window,
        vision: None,
    };
    a.validate()?;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruct_markers_in_names() {
        let cases = [
            ("meta-llama/Llama-3.1-8B-Instruct", true),
            ("google/gemma-2-9b-it", true),
            ("meta-llama/Llama-2-7b-chat-hf", true),
            ("google/gemma-2b", false),
            ("Qwen/Qwen2-0.5B", false),
            ("models/chat/gemma-2b", false),
            ("deepseek-coder-6.7b-base", false),
            ("SmolLM2-135M-Instruct.Q4_1.gguf", true),
            ("italian-model", false),
        ];
        for (name, want) in cases {
            assert_eq!(detect_tuning(&[name], false).instruct, want, "{name}");
        }
    }

    #[test]
    fn a_chat_template_marks_an_unmarked_name_instruct_but_base_wins() {
        assert!(detect_tuning(&["my-model"], true).instruct);
        assert_eq!(detect_tuning(&["my-model"], true).evidence, "ships a chat template");
        assert!(!detect_tuning(&["Qwen2.5-7B-base"], true).instruct);
    }

    #[test]
    fn size_classes_follow_the_framework() {
        assert_eq!(SizeClass::of(134_515_008), SizeClass::Tiny);
        assert_eq!(SizeClass::of(2_779_683_840), SizeClass::Small);
        assert_eq!(SizeClass::of(6_738_415_616), SizeClass::Small);
        assert_eq!(SizeClass::of(8_030_261_248), SizeClass::Medium);
        assert_eq!(SizeClass::of(27_227_128_320), SizeClass::Medium);
        assert_eq!(SizeClass::of(70_553_706_496), SizeClass::Large);
    }
}
