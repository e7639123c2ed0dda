//! Opening a model's files for the engine: the spec, the engine config, the weights.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use gantry_core::{Family, ModelSpec};
use tracing::info;

use crate::EngineError;
use crate::chat::{ChatTemplate, TemplateIsolation};
use crate::config::EngineConfig;
use crate::model::{Backend, LoadProgress, ModelPart};
use crate::tokenizer::Tokenizer;
use crate::weights::{LoadStats, WeightSource, log_stats};
use gantry_model::{ModelLocation, locate, read_gguf_header, read_hf_folder, safetensors_files};

/// A model's files, opened (headers read, weights memory-mapped, nothing loaded yet).
#[derive(Debug)]
pub struct ModelFiles {
    pub location: ModelLocation,
    pub spec: ModelSpec,
    pub config: Arc<EngineConfig>,
    pub source: WeightSource,
}

/// Families the engine runs.
pub fn supported(family: Family) -> bool {
    matches!(
        family,
        Family::Llama
            | Family::Mistral
            | Family::Phi
            | Family::Phi3
            | Family::Gemma
            | Family::Gemma2
            | Family::Gemma3
            | Family::Falcon
            | Family::Gpt2
            | Family::Qwen2
            | Family::Qwen3
            | Family::Mixtral
            | Family::Qwen2Moe
            | Family::Qwen3Moe
            | Family::GptOss
    )
}

impl ModelFiles {
    /// Opens a model folder, `config.json` or `.gguf` file.
    pub fn open(path: &Path) -> Result<ModelFiles, EngineError> {
        let location = locate(path)?;
        let (spec, config, source) = match &location {
            ModelLocation::Gguf(p) => {
                let (file, spec) = read_gguf_header(p)?;
                check_supported(&spec)?;
                let config = EngineConfig::from_gguf(&file, &spec)?;
                (spec, config, WeightSource::open_gguf(p, file)?)
            }
            ModelLocation::Folder(dir) => {
                let spec = read_hf_folder(dir)?;
                check_supported(&spec)?;
                let text = std::fs::read_to_string(dir.join("config.json"))
                    .map_err(|e| EngineError::Io { path: dir.join("config.json"), source: e })?;
                let config = EngineConfig::from_hf(&text)?;
                let files = safetensors_files(dir)?;
                if files.is_empty() {
                    return Err(EngineError::Config(format!(
                        "{} has a config.json but no .safetensors weights; Gantry loads safetensors or GGUF",
                        dir.display()
                    )));
                }
                let source = WeightSource::open_safetensors(config.family, &files)?;
                (spec, config, source)
            }
        };
        Ok(ModelFiles { location, spec, config: Arc::new(config), source })
    }

    /// The folder holding the model's files (the GGUF file's folder for GGUF).
    pub fn folder(&self) -> PathBuf {
        match &self.location {
            ModelLocation::Gguf(p) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
            ModelLocation::Folder(d) => d.clone(),
        }
    }

    /// Loads layers `range` onto `device` (the CPU runtime on the CPU, Candle on a GPU).
    pub fn load_part(
        &self,
        range: Range<usize>,
        device: &Device,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<ModelPart, EngineError> {
        self.load_part_on(range, &Backend::for_device(device), progress)
    }

    /// Loads layers `range` for `backend`.
    pub fn load_part_on(
        &self,
        range: Range<usize>,
        backend: &Backend,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<ModelPart, EngineError> {
        let mut stats = LoadStats::default();
        let started = std::time::Instant::now();
        let mut part =
            ModelPart::load(&self.source, self.config.clone(), range.clone(), backend, &mut stats, progress)?;
        part.weight_bytes = stats.bytes;
        log_stats(&stats);
        info!(
            model = %self.spec.name,
            layers = %format!("{}..{}", range.start, range.end),
            tensors = stats.tensors,
            load_ms = started.elapsed().as_millis() as u64,
            "loaded"
        );
        Ok(part)
    }

    /// The model's tokenizer: `tokenizer.json` in a folder, else built from the GGUF
    /// vocabulary.
    pub fn tokenizer(&self) -> Result<Tokenizer, EngineError> {
        let mut tok = match &self.location {
            ModelLocation::Gguf(p) => Tokenizer::from_gguf(p)?,
            ModelLocation::Folder(d) => Tokenizer::from_hf_folder(d, &self.spec.eos_token_ids)?,
        };
        // generation_config's and the GGUF's end-of-sequence ids both stop generation.
        for id in &self.spec.eos_token_ids {
            if let Ok(id) = u32::try_from(*id)
                && !tok.eos.contains(&id)
            {
                tok.eos.push(id);
            }
        }
        Ok(tok)
    }

    /// The chat template: the model's own (rendered where `isolation` says), else the default
    /// for its vocabulary.
    pub fn chat_template(&self, tok: &Tokenizer, isolation: &TemplateIsolation) -> Result<ChatTemplate, EngineError> {
        let text_of = |id: Option<u32>| id.and_then(|i| tok.id_to_token(i)).unwrap_or_default();
        let bos = text_of(tok.bos);
        let eos = text_of(tok.eos.first().copied());
        match &self.spec.chat_template {
            Some(source) => ChatTemplate::isolated(source, "model", &bos, &eos, isolation),
            None => ChatTemplate::default_for(&|t| tok.token_to_id(t).is_some(), &bos, &eos),
        }
    }

    /// Loads the whole model onto `device`.
    pub fn load(&self, device: &Device) -> Result<ModelPart, EngineError> {
        self.load_part(0..self.config.num_layers, device, &mut |_| {})
    }
}

fn check_supported(spec: &ModelSpec) -> Result<(), EngineError> {
    if supported(spec.family) {
        Ok(())
    } else {
        Err(EngineError::Unsupported(format!(
            "the engine does not run {} models yet (it runs llama, mistral, phi, phi3, gemma, gemma2, gemma3, falcon, gpt2, qwen2, qwen3, and the mixtures of experts mixtral, qwen2_moe, qwen3_moe and gpt_oss)",
            spec.family
        )))
    }
}
