//! `gantry-model`: models on local disk — a Hugging Face folder, its `config.json`, or a `.gguf`
//! file: where their files are ([`locate`]) and what their headers say ([`read_spec`]).
//!
//! Only headers are read — a GGUF file's metadata and tensor table (a few MiB), safetensors
//! JSON headers (kilobytes) — never the weights, so inspecting a 140 GB model takes
//! milliseconds.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use gantry_core::gguf::{GgufFile, parse_gguf_prefix};
use gantry_core::safetensors::{self, SafetensorsHeader};
use gantry_core::spec::{HfFiles, ModelSpec};
use thiserror::Error;

mod digest;
pub use digest::digest;

/// First read of a GGUF file; most headers fit (SmolLM2's is 2 MiB, Gemma 3's 6 MiB).
const FIRST_READ_BYTES: u64 = 4 << 20;
/// No real GGUF header comes near this; a file claiming more is refused.
const MAX_HEADER_BYTES: u64 = 512 << 20;
/// Shards beyond this are not a real checkpoint.
const MAX_SHARDS: usize = 4096;

/// Why a local model could not be read.
#[derive(Debug, Error)]
pub enum FilesError {
    #[error("{}: no such file or directory", path.display())]
    NotFound { path: PathBuf },

    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{}: {source}", path.display())]
    Model {
        path: PathBuf,
        #[source]
        source: gantry_core::Error,
    },

    #[error("{} holds several GGUF files ({}); name one of them", dir.display(), files.join(", "))]
    Ambiguous { dir: PathBuf, files: Vec<String> },

    #[error(
        "{} is not a model: expected a folder with config.json, a config.json file, or a .gguf file",
        path.display()
    )]
    NotAModel { path: PathBuf },

    #[error("{}: the index names {missing}, which is not in the folder (incomplete download?)", dir.display())]
    MissingShard { dir: PathBuf, missing: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FilesError + '_ {
    move |source| match source.kind() {
        io::ErrorKind::NotFound => FilesError::NotFound { path: path.to_path_buf() },
        _ => FilesError::Io { path: path.to_path_buf(), source },
    }
}

fn model_err(path: &Path) -> impl FnOnce(gantry_core::Error) -> FilesError + '_ {
    move |source| FilesError::Model { path: path.to_path_buf(), source }
}

/// Reads what a local model is: `path` is a model folder, a `config.json`, or a `.gguf` file.
pub fn read_spec(path: &Path) -> Result<ModelSpec, FilesError> {
    match locate(path)? {
        ModelLocation::Folder(dir) => read_hf_folder(&dir),
        ModelLocation::Gguf(file) => read_gguf(&file),
    }
}

fn starts_with_gguf_magic(path: &Path) -> Result<bool, FilesError> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path).map_err(io_err(path))?;
    Ok(f.read_exact(&mut magic).is_ok() && &magic == b"GGUF")
}

fn list_with_extension(dir: &Path, ext: &str) -> Result<Vec<PathBuf>, FilesError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let p = entry.map_err(io_err(dir))?.path();
        if p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case(ext)) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Reads the first `n` bytes of a file (fewer if it is shorter).
fn read_prefix(file: &mut File, path: &Path, n: u64) -> Result<Vec<u8>, FilesError> {
    let mut buf = Vec::new();
    file.take(n).read_to_end(&mut buf).map_err(io_err(path))?;
    Ok(buf)
}

/// Reads a GGUF file's metadata and tensor table, growing the read until the header fits.
pub fn read_gguf(path: &Path) -> Result<ModelSpec, FilesError> {
    read_gguf_header(path).map(|(_, spec)| spec)
}

/// Reads a GGUF file's parsed header and the spec built from it.
pub fn read_gguf_header(path: &Path) -> Result<(GgufFile, ModelSpec), FilesError> {
    let file_len = std::fs::metadata(path).map_err(io_err(path))?.len();
    let mut want = FIRST_READ_BYTES.min(file_len);
    let parsed = loop {
        let mut f = File::open(path).map_err(io_err(path))?;
        let prefix = read_prefix(&mut f, path, want)?;
        match parse_gguf_prefix(&prefix, file_len) {
            Ok(p) => break p,
            Err(gantry_core::Error::NeedMoreBytes { needed }) if needed <= MAX_HEADER_BYTES => {
                want = needed.max(want.saturating_mul(2)).min(file_len).min(MAX_HEADER_BYTES);
            }
            Err(gantry_core::Error::NeedMoreBytes { needed }) => {
                return Err(model_err(path)(gantry_core::Error::InvalidGguf {
                    reason: format!("its header claims {needed} bytes; no real GGUF header exceeds {MAX_HEADER_BYTES}"),
                }));
            }
            Err(e) => return Err(model_err(path)(e)),
        }
    };
    let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    let spec = ModelSpec::from_gguf(&name, &parsed).map_err(model_err(path))?;
    Ok((parsed, spec))
}

/// Where a model's files are, once found: one GGUF file, or a folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    Gguf(PathBuf),
    Folder(PathBuf),
}

/// Resolves a model path (folder, `config.json`, `.gguf` file) to where its files are.
pub fn locate(path: &Path) -> Result<ModelLocation, FilesError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if meta.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(ModelLocation::Folder(path.to_path_buf()));
        }
        let ggufs = list_with_extension(path, "gguf")?;
        return match ggufs.as_slice() {
            [one] => Ok(ModelLocation::Gguf(one.clone())),
            [] => Err(FilesError::NotAModel { path: path.to_path_buf() }),
            many => Err(FilesError::Ambiguous {
                dir: path.to_path_buf(),
                files: many.iter().filter_map(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).collect(),
            }),
        };
    }
    let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
    if name == "config.json" {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        return Ok(ModelLocation::Folder(dir.to_path_buf()));
    }
    if name.ends_with(".gguf") || starts_with_gguf_magic(path)? {
        return Ok(ModelLocation::Gguf(path.to_path_buf()));
    }
    Err(FilesError::NotAModel { path: path.to_path_buf() })
}

/// The safetensors files of a folder, sorted.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, FilesError> {
    list_with_extension(dir, "safetensors")
}

fn read_optional(path: &Path) -> Result<Option<String>, FilesError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(FilesError::Io { path: path.to_path_buf(), source: e }),
    }
}

fn read_safetensors_header(path: &Path) -> Result<SafetensorsHeader, FilesError> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let file_len = std::fs::metadata(path).map_err(io_err(path))?.len();
    let mut f = File::open(path).map_err(io_err(path))?;
    let first8 = read_prefix(&mut f, path, 8)?;
    let n = safetensors::header_len(&file_name, &first8, file_len).map_err(model_err(path))?;
    let mut prefix = first8;
    prefix.extend(read_prefix(&mut f, path, n)?);
    safetensors::parse_header(&file_name, &prefix, file_len).map_err(model_err(path))
}

/// A display name for a folder: `org/name` inside a Hugging Face cache
/// (`models--org--name/snapshots/<rev>`), else the folder's own name.
pub fn folder_display_name(dir: &Path) -> String {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let parts: Vec<String> = canonical.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    if let Some(i) = parts.iter().rposition(|p| p == "snapshots")
        && let Some(repo) = i.checked_sub(1).and_then(|j| parts[j].strip_prefix("models--"))
    {
        return repo.replacen("--", "/", 1);
    }
    parts.last().cloned().unwrap_or_else(|| dir.display().to_string())
}

/// Reads a Hugging Face model folder: the JSON files and every safetensors header.
pub fn read_hf_folder(dir: &Path) -> Result<ModelSpec, FilesError> {
    let config_path = dir.join("config.json");
    let config = std::fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let tokenizer_config = read_optional(&dir.join("tokenizer_config.json"))?;
    let generation_config = read_optional(&dir.join("generation_config.json"))?;
    let index_path = dir.join("model.safetensors.index.json");
    let index = read_optional(&index_path)?
        .map(|text| safetensors::parse_index(&text))
        .transpose()
        .map_err(model_err(&index_path))?;

    let shards = list_with_extension(dir, "safetensors")?;
    if shards.len() > MAX_SHARDS {
        return Err(FilesError::NotAModel { path: dir.to_path_buf() });
    }
    if let Some(idx) = &index {
        // With an index, every shard it names must be here to read exact sizes.
        if !shards.is_empty() {
            for f in &idx.files {
                if !dir.join(f).is_file() {
                    return Err(FilesError::MissingShard { dir: dir.to_path_buf(), missing: f.clone() });
                }
            }
        }
    }
    let headers = shards.iter().map(|p| read_safetensors_header(p)).collect::<Result<Vec<_>, _>>()?;
    let name = folder_display_name(dir);
    ModelSpec::from_hf(HfFiles {
        name: &name,
        config: &config,
        tokenizer_config: tokenizer_config.as_deref(),
        generation_config: generation_config.as_deref(),
        safetensors: &headers,
        index: index.as_ref(),
    })
    .map_err(model_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_core::gguf::write::{Value, gguf};
    use gantry_core::safetensors::write_safetensors;
    use gantry_core::spec::{ParamSource, SpecSource};

    const TINY_LLAMA: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":64,
        "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
        "vocab_size":100,"max_position_embeddings":512,"torch_dtype":"bfloat16","tie_word_embeddings":false}"#;

    fn tiny_llama_tensors() -> Vec<(String, &'static str, Vec<u64>)> {
        let mut t = vec![
            ("model.embed_tokens.weight".to_string(), "BF16", vec![100, 64]),
            ("model.norm.weight".to_string(), "BF16", vec![64]),
            ("lm_head.weight".to_string(), "BF16", vec![100, 64]),
        ];
        for l in 0..2 {
            for (n, shape) in [
                ("self_attn.q_proj.weight", vec![64, 64]),
                ("self_attn.k_proj.weight", vec![32, 64]),
                ("self_attn.v_proj.weight", vec![32, 64]),
                ("self_attn.o_proj.weight", vec![64, 64]),
                ("mlp.gate_proj.weight", vec![128, 64]),
                ("mlp.up_proj.weight", vec![128, 64]),
                ("mlp.down_proj.weight", vec![64, 128]),
                ("input_layernorm.weight", vec![64]),
                ("post_attention_layernorm.weight", vec![64]),
            ] {
                t.push((format!("model.layers.{l}.{n}"), "BF16", shape));
            }
        }
        t
    }

    fn write_folder(dir: &Path, shards: usize) {
        std::fs::write(dir.join("config.json"), TINY_LLAMA).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template":"{% for m in messages %}{{ m.content }}{% endfor %}","model_max_length":512}"#,
        )
        .unwrap();
        let tensors = tiny_llama_tensors();
        let per = tensors.len().div_ceil(shards);
        for (i, chunk) in tensors.chunks(per).enumerate() {
            let refs: Vec<(&str, &str, &[u64])> =
                chunk.iter().map(|(n, d, s)| (n.as_str(), *d, s.as_slice())).collect();
            let name = if shards == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{shards:05}.safetensors", i + 1)
            };
            std::fs::write(dir.join(name), write_safetensors(&refs)).unwrap();
        }
    }

    #[test]
    fn reads_a_folder_with_safetensors_exactly() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), 1);
        let spec = read_spec(dir.path()).unwrap();
        assert_eq!(spec.source, SpecSource::Safetensors);
        assert_eq!(spec.parameters.source, ParamSource::TensorShapes);
        // The tensor table and the config-computed count agree.
        assert_eq!(spec.parameters.total, spec.architecture.count_params().unwrap().total);
        assert_eq!(spec.weights.bytes, spec.parameters.total * 2);
        assert!(spec.weights.exact);
        assert!(spec.chat_template.is_some());
        assert_eq!(spec.weights.layout.layer_bytes.len(), 2);
        assert_eq!(spec.weights.layout.total(), spec.weights.bytes);
    }

    #[test]
    fn reads_sharded_checkpoints_and_names_a_missing_shard() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), 3);
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"metadata":{"total_size":1},"weight_map":{"a":"model-00001-of-00003.safetensors","b":"model-00002-of-00003.safetensors","c":"model-00003-of-00003.safetensors"}}"#,
        )
        .unwrap();
        let spec = read_spec(&dir.path().join("config.json")).unwrap();
        assert_eq!(spec.parameters.total, spec.architecture.count_params().unwrap().total);
        std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
        let err = read_spec(dir.path()).unwrap_err().to_string();
        assert!(
            err.ends_with(
                "the index names model-00002-of-00003.safetensors, which is not in the folder (incomplete download?)"
            ),
            "{err}"
        );
    }

    #[test]
    fn reads_a_gguf_file_and_a_folder_holding_one() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = gguf(
            &[
                ("general.architecture", Value::Str("llama".into())),
                ("general.name", Value::Str("Tiny Chat".into())),
                ("llama.context_length", Value::U32(256)),
                ("llama.embedding_length", Value::U32(8)),
                ("llama.block_count", Value::U32(1)),
                ("llama.feed_forward_length", Value::U32(16)),
                ("llama.attention.head_count", Value::U32(2)),
                ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ],
            &[("token_embd.weight", &[8, 10]), ("blk.0.attn_q.weight", &[8, 8]), ("output_norm.weight", &[8])],
        );
        let file = dir.path().join("tiny.gguf");
        std::fs::write(&file, &bytes).unwrap();
        let spec = read_spec(&file).unwrap();
        assert_eq!(spec.source, SpecSource::Gguf);
        assert_eq!(spec.parameters.total, 80 + 64 + 8);
        assert_eq!(spec.context.length, 256);
        assert!(spec.tuning.instruct, "`Chat` in general.name: {}", spec.tuning.evidence);
        assert_eq!(read_spec(dir.path()).unwrap().parameters.total, 152);
        std::fs::write(dir.path().join("other.gguf"), &bytes).unwrap();
        let err = read_spec(dir.path()).unwrap_err().to_string();
        assert!(err.contains("holds several GGUF files (other.gguf, tiny.gguf)"), "{err}");
    }

    #[test]
    fn missing_and_non_model_paths_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_spec(&dir.path().join("nope.gguf")).unwrap_err().to_string();
        assert!(err.ends_with("nope.gguf: no such file or directory"), "{err}");
        let err = read_spec(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is not a model"), "{err}");
        let txt = dir.path().join("notes.txt");
        std::fs::write(&txt, "hello").unwrap();
        assert!(read_spec(&txt).unwrap_err().to_string().contains("is not a model"));
    }

    #[test]
    fn hugging_face_cache_folders_are_named_by_repository() {
        let root = tempfile::tempdir().unwrap();
        let snap = root.path().join("models--meta-llama--Llama-3.1-8B-Instruct/snapshots/0e9e39f");
        std::fs::create_dir_all(&snap).unwrap();
        assert_eq!(folder_display_name(&snap), "meta-llama/Llama-3.1-8B-Instruct");
        assert_eq!(
            folder_display_name(root.path()),
            root.path().canonicalize().unwrap().file_name().unwrap().to_string_lossy()
        );
    }
}
