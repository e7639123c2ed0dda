//! Model families: which architecture a model is, recognised from `config.json` or GGUF metadata.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::error::{Error, Result};

/// An architecture Gantry understands (the `model_type` of Hugging Face configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Gpt2,
    GptOss,
    Llama,
    Mistral,
    Mixtral,
    Phi,
    Phi3,
    Gemma,
    Gemma2,
    Gemma3,
    Falcon,
    Qwen2,
    Qwen2Moe,
    Qwen3,
    Qwen3Moe,
}

impl Family {
    /// Every family, in display order.
    pub const ALL: [Family; 15] = [
        Family::Gpt2,
        Family::GptOss,
        Family::Llama,
        Family::Mistral,
        Family::Mixtral,
        Family::Phi,
        Family::Phi3,
        Family::Gemma,
        Family::Gemma2,
        Family::Gemma3,
        Family::Falcon,
        Family::Qwen2,
        Family::Qwen2Moe,
        Family::Qwen3,
        Family::Qwen3Moe,
    ];

    /// The `model_type` spelling (`gpt_oss`, `gemma3`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::GptOss => "gpt_oss",
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Mixtral => "mixtral",
            Family::Phi => "phi",
            Family::Phi3 => "phi3",
            Family::Gemma => "gemma",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
            Family::Falcon => "falcon",
            Family::Qwen2 => "qwen2",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3 => "qwen3",
            Family::Qwen3Moe => "qwen3_moe",
        }
    }

    /// The family group people name (`GPT`, `LLaMA`, `Mistral`, `Phi`, `Gemma`, `Falcon`, `Qwen`).
    pub fn group(self) -> &'static str {
        match self {
            Family::Gpt2 | Family::GptOss => "GPT",
            Family::Llama => "LLaMA",
            Family::Mistral | Family::Mixtral => "Mistral",
            Family::Phi | Family::Phi3 => "Phi",
            Family::Gemma | Family::Gemma2 | Family::Gemma3 => "Gemma",
            Family::Falcon => "Falcon",
            Family::Qwen2 | Family::Qwen2Moe | Family::Qwen3 | Family::Qwen3Moe => "Qwen",
        }
    }

    /// Whether the family routes each token through a few of many expert MLPs.
    pub fn is_moe(self) -> bool {
        matches!(self, Family::Mixtral | Family::GptOss | Family::Qwen2Moe | Family::Qwen3Moe)
    }

    /// Recognises a Hugging Face `model_type` (including historical spellings).
    pub fn from_model_type(model_type: &str) -> Option<Family> {
        let f = match model_type.to_ascii_lowercase().as_str() {
            "gpt2" => Family::Gpt2,
            "gpt_oss" | "gpt-oss" => Family::GptOss,
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "mixtral" => Family::Mixtral,
            "phi" | "phi-msft" => Family::Phi,
            "phi3" => Family::Phi3,
            "gemma" => Family::Gemma,
            "gemma2" => Family::Gemma2,
            "gemma3" | "gemma3_text" => Family::Gemma3,
            "falcon" | "refinedweb" | "refinedwebmodel" => Family::Falcon,
            "qwen2" => Family::Qwen2,
            "qwen2_moe" => Family::Qwen2Moe,
            "qwen3" => Family::Qwen3,
            "qwen3_moe" => Family::Qwen3Moe,
            _ => return None,
        };
        Some(f)
    }

    /// Recognises a `transformers` class name from `architectures` (`LlamaForCausalLM`, …).
    pub fn from_architecture(class: &str) -> Option<Family> {
        let f = match class {
            "GPT2LMHeadModel" | "GPT2Model" => Family::Gpt2,
            "GptOssForCausalLM" => Family::GptOss,
            "LlamaForCausalLM" => Family::Llama,
            "MistralForCausalLM" => Family::Mistral,
            "MixtralForCausalLM" => Family::Mixtral,
            "PhiForCausalLM" => Family::Phi,
            "Phi3ForCausalLM" => Family::Phi3,
            "GemmaForCausalLM" => Family::Gemma,
            "Gemma2ForCausalLM" => Family::Gemma2,
            "Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration" => Family::Gemma3,
            "FalconForCausalLM" | "RWForCausalLM" => Family::Falcon,
            "Qwen2ForCausalLM" => Family::Qwen2,
            "Qwen2MoeForCausalLM" => Family::Qwen2Moe,
            "Qwen3ForCausalLM" => Family::Qwen3,
            "Qwen3MoeForCausalLM" => Family::Qwen3Moe,
            _ => return None,
        };
        Some(f)
    }

    /// Recognises a GGUF `general.architecture` (llama.cpp's names). A `llama` GGUF with experts
    /// is Mixtral; the caller passes `has_experts`.
    pub fn from_gguf_arch(arch: &str, has_experts: bool) -> Option<Family> {
        let f = match arch {
            "gpt2" => Family::Gpt2,
            "gpt-oss" => Family::GptOss,
            "llama" if has_experts => Family::Mixtral,
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "phi2" => Family::Phi,
            "phi3" => Family::Phi3,
            "gemma" => Family::Gemma,
            "gemma2" => Family::Gemma2,
            "gemma3" => Family::Gemma3,
            "falcon" => Family::Falcon,
            "qwen2" => Family::Qwen2,
            "qwen2moe" => Family::Qwen2Moe,
            "qwen3" => Family::Qwen3,
            "qwen3moe" => Family::Qwen3Moe,
            _ => return None,
        };
        Some(f)
    }

    /// Parses the `model_type` spelling, with an error naming the unknown value.
    pub fn parse(name: &str) -> Result<Family> {
        Family::from_model_type(name).ok_or_else(|| Error::UnknownArchitecture { name: name.to_string() })
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_round_trips_through_its_model_type() {
        for family in Family::ALL {
            assert_eq!(Family::from_model_type(family.as_str()), Some(family));
        }
    }

    #[test]
    fn recognises_architecture_classes_and_gguf_names() {
        let cases = [
            (Family::from_architecture("LlamaForCausalLM"), Some(Family::Llama)),
            (Family::from_architecture("Gemma3ForConditionalGeneration"), Some(Family::Gemma3)),
            (Family::from_architecture("RWForCausalLM"), Some(Family::Falcon)),
            (Family::from_architecture("BertModel"), None),
            (Family::from_gguf_arch("llama", false), Some(Family::Llama)),
            (Family::from_gguf_arch("llama", true), Some(Family::Mixtral)),
            (Family::from_gguf_arch("phi2", false), Some(Family::Phi)),
            (Family::from_gguf_arch("gpt-oss", true), Some(Family::GptOss)),
            (Family::from_gguf_arch("mamba", false), None),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn unknown_architecture_error_names_it() {
        let err = Family::parse("mamba").unwrap_err().to_string();
        assert!(err.starts_with("unknown model architecture `mamba`"), "{err}");
    }
}
