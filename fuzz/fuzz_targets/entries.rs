//! What each fuzz target does with an input, shared by the cargo-fuzz targets (`fuzz/`, nightly)
//! and the replay of their corpora in the normal test suite (`engine/tests/fuzz_replay.rs`), so
//! a corpus replays through exactly the code it was found with.

#![allow(dead_code)]

use gantry_core::gguf::{GgufFile, parse_gguf, parse_gguf_keeping, parse_gguf_prefix};
use gantry_core::safetensors::{header_len, parse_header, parse_index};
use gantry_core::spec::{HfFiles, ModelSpec};

fn use_gguf(file: &GgufFile) {
    if let Ok(spec) = ModelSpec::from_gguf("fuzz.gguf", file) {
        let _ = gantry_engine::config::EngineConfig::from_gguf(file, &spec);
        let _ = gantry_core::vram::estimate_vram(&spec, &gantry_core::vram::ServeOptions::default());
    }
    let _ = (file.tensor_bytes(), file.tensor_elements(), file.architecture());
}

fn keep_tokenizer(key: &str) -> bool {
    key.starts_with("tokenizer.ggml.")
}

fn keep_all(_: &str) -> bool {
    true
}

/// The GGUF reader: whole files (long arrays summarised, and with the tokenizer's arrays kept
/// whole as the worker's tokenizer reads them), and a prefix with a claimed file length (the
/// first 8 bytes), as a header read from disk or over HTTP arrives.
pub fn gguf(data: &[u8]) {
    if let Ok(file) = parse_gguf(data) {
        use_gguf(&file);
    }
    if let Ok(file) = parse_gguf_keeping(data, data.len() as u64, &keep_tokenizer) {
        use_gguf(&file);
    }
    if data.len() >= 8 {
        let claimed = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
        let prefix = &data[8..];
        let file_len = claimed.max(prefix.len() as u64);
        let _ = parse_gguf_prefix(prefix, file_len);
        let _ = parse_gguf_keeping(prefix, file_len, &keep_all);
    }
}

/// The safetensors header reader (length, JSON, shapes and offsets against the file's size,
/// the first 8 bytes claiming it) and the shard index.
pub fn safetensors_header(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let claimed = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
    let file = &data[8..];
    let len = claimed.max(file.len() as u64);
    let _ = header_len("fuzz.safetensors", file, len);
    let _ = parse_header("fuzz.safetensors", file, len);
    if let Ok(text) = std::str::from_utf8(file) {
        let _ = parse_index(text);
    }
}

/// The config.json parsers: the model spec (family, sizes, context) and the engine's config.
/// Up to three files in one input, split by NUL: config, tokenizer_config, generation_config.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut parts = text.splitn(3, '\0');
    let config = parts.next().unwrap_or_default();
    let files = HfFiles {
        name: "fuzz/model-Instruct",
        config,
        tokenizer_config: parts.next(),
        generation_config: parts.next(),
        safetensors: &[],
        index: None,
    };
    if let Ok(spec) = ModelSpec::from_hf(files) {
        let _ = gantry_core::vram::estimate_vram(&spec, &gantry_core::vram::ServeOptions::default());
    }
    let _ = gantry_engine::config::EngineConfig::from_hf(config);
}
