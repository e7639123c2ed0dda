//! The catalog of well-known models (`catalog/models.toml`), and specs built from its entries.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::family::Family;
use crate::hf;
use crate::spec::{Context, ModelSpec, ParamSource, Parameters, SizeClass, SpecSource, Tuning};

/// The catalog shipped with Gantry.
pub const BUILTIN: &str = include_str!("../catalog/models.toml");

/// One well-known model and the facts about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    /// Hugging Face repository id.
    pub id: String,
    /// Published parameter count.
    pub parameters: u64,
    /// Usable context length per the model card.
    pub context: u64,
    pub instruct: bool,
    pub gated: bool,
    pub license: String,
    /// Precision of the published weights.
    pub dtype: String,
    /// Tasks the model card singles out (`code`, `reasoning`).
    #[serde(default)]
    pub strengths: Vec<String>,
    /// The model writes a reasoning trace before every answer (gpt-oss): more tokens, and a
    /// later first answer token.
    #[serde(default)]
    pub thinks: bool,
    /// Where the facts come from.
    pub source: String,
    /// The memory-relevant keys of the model's `config.json`.
    pub config: serde_json::Value,
}

/// The parsed catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct Catalog {
    pub entries: Vec<CatalogEntry>,
}

#[derive(Deserialize)]
struct CatalogFile {
    models: Vec<CatalogEntry>,
}

impl Catalog {
    /// Parses catalog TOML text.
    pub fn parse(text: &str) -> Result<Catalog> {
        let file: CatalogFile = toml::from_str(text).map_err(|e| Error::Catalog(e.to_string()))?;
        let mut seen = std::collections::BTreeSet::new();
        for e in &file.models {
            if !seen.insert(e.id.to_ascii_lowercase()) {
                return Err(Error::Catalog(format!("`{}` is listed twice", e.id)));
            }
        }
        Ok(Catalog { entries: file.models })
    }

    /// The catalog shipped with Gantry.
    pub fn builtin() -> Result<Catalog> {
        Catalog::parse(BUILTIN)
    }

    /// Finds an entry by id, case-insensitively.
    pub fn get(&self, id: &str) -> Result<&CatalogEntry> {
        self.entries
            .iter()
            .find(|e| e.id.eq_ignore_ascii_case(id))
            .ok_or_else(|| Error::NotInCatalog { id: id.to_string() })
    }
}

impl CatalogEntry {
    /// The model's family.
    pub fn family(&self) -> Result<Family> {
        Ok(hf::parse_config_value(&self.config)?.architecture.family)
    }

    /// Whether the model card singles out `task` (`code`, `reasoning`).
    pub fn is_strong_at(&self, task: &str) -> bool {
        self.strengths.iter().any(|s| s == task)
    }

    /// A spec built from the entry: the published count and context, the architecture from
    /// its config keys, weights costed at the published precision.
    pub fn spec(&self) -> Result<ModelSpec> {
        let cfg = hf::parse_config_value(&self.config).map_err(|e| Error::Catalog(format!("{}: {e}", self.id)))?;
        let arch = cfg.architecture.clone();
        let counted = arch.count_params()?;
        let weights = crate::weights::weights_from_config(&cfg, &arch, &counted, None)?;
        // The active share of a mixture-of-experts model, applied to the published total.
        let active = if counted.total == 0 {
            self.parameters
        } else {
            (self.parameters as u128 * counted.active as u128 / counted.total as u128) as u64
        };
        let sliding = arch.sliding_window.as_ref().filter(|sw| sw.window < self.context);
        Ok(ModelSpec {
            name: self.id.clone(),
            family: arch.family,
            class: cfg.class.clone(),
            source: SpecSource::Catalog,
            parameters: Parameters { total: self.parameters, active, source: ParamSource::Catalog },
            size_class: SizeClass::of(self.parameters),
            weights,
            context: Context {
                length: self.context,
                source: "model card, via the catalog".into(),
                rope_scaling: cfg.rope_scaling.clone(),
                sliding_window: sliding.map(|sw| sw.window),
                sliding_layers: sliding.map_or(0, |sw| sw.layers.len() as u64),
            },
            tuning: Tuning {
                instruct: self.instruct,
                evidence: if self.instruct { "instruct-tuned (catalog)".into() } else { "base model (catalog)".into() },
            },
            architecture: arch,
            chat_template: None,
            bos_token_id: cfg.bos_token_id,
            eos_token_ids: cfg.eos_token_ids,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_parses_and_has_every_family_group() {
        let c = Catalog::builtin().unwrap();
        assert!(c.entries.len() >= 25, "{} entries", c.entries.len());
        let groups: std::collections::BTreeSet<&str> = c.entries.iter().map(|e| e.family().unwrap().group()).collect();
        for g in ["GPT", "LLaMA", "Mistral", "Phi", "Gemma", "Falcon", "Qwen"] {
            assert!(groups.contains(g), "no {g} model in the catalog");
        }
        let sizes: std::collections::BTreeSet<SizeClass> =
            c.entries.iter().map(|e| SizeClass::of(e.parameters)).collect();
        assert_eq!(sizes.len(), 4, "tiny, small, medium and large models");
    }

    #[test]
    fn every_entry_computes_within_half_a_percent_of_its_published_count() {
        for e in Catalog::builtin().unwrap().entries {
            let counted = hf::parse_config_value(&e.config).unwrap().architecture.count_params().unwrap();
            let diff = (counted.total as f64 - e.parameters as f64).abs() / e.parameters as f64;
            assert!(
                diff < 0.005,
                "{}: computed {} vs published {} ({:.3}%)",
                e.id,
                counted.total,
                e.parameters,
                diff * 100.0
            );
        }
    }

    #[test]
    fn lookups_are_case_insensitive_and_misses_say_what_to_do() {
        let c = Catalog::builtin().unwrap();
        assert_eq!(c.get("meta-llama/meta-llama-3-70b-instruct").unwrap().parameters, 70_553_706_496);
        let err = c.get("acme/unknown-7b").unwrap_err().to_string();
        assert!(err.contains("`acme/unknown-7b` is not in the catalog"), "{err}");
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let one = r#"
[[models]]
id = "a/b"
parameters = 1
context = 1
instruct = false
gated = false
license = "mit"
dtype = "f32"
source = "test"
config = { model_type = "gpt2", n_embd = 8, n_head = 2, n_layer = 1, vocab_size = 10 }
"#;
        let err = Catalog::parse(&format!("{one}{one}")).unwrap_err().to_string();
        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn moe_specs_carry_active_parameters() {
        let c = Catalog::builtin().unwrap();
        let mixtral = c.get("mistralai/Mixtral-8x7B-Instruct-v0.1").unwrap().spec().unwrap();
        // 2 of 8 experts: about 12.9B of 46.7B.
        assert!((12_800_000_000..13_000_000_000).contains(&mixtral.parameters.active), "{}", mixtral.parameters.active);
        // Gantry counts the token embedding table as active; OpenAI's 3.6B figure leaves out
        // that lookup (4.19B - 0.58B of embeddings).
        let oss = c.get("openai/gpt-oss-20b").unwrap().spec().unwrap();
        assert!((4_150_000_000..4_250_000_000).contains(&oss.parameters.active), "{}", oss.parameters.active);
        let without_lookup = oss.parameters.active - 201_088 * 2880;
        assert!((3_550_000_000..3_650_000_000).contains(&without_lookup), "{without_lookup}");
    }
}
