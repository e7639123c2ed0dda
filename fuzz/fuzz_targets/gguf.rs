//! The GGUF reader: whole files (summarising long arrays, and keeping the tokenizer's whole as
//! the worker's tokenizer does), prefixes with a claimed file length (as a header read from
//! disk or over HTTP is), and the spec and engine config built from what parses.
#![no_main]

use gantry_core::gguf::{GgufFile, parse_gguf, parse_gguf_keeping, parse_gguf_prefix};
use gantry_core::spec::ModelSpec;
use libfuzzer_sys::fuzz_target;

fn use_file(file: &GgufFile) {
    if let Ok(spec) = ModelSpec::from_gguf("fuzz.gguf", file) {
        let _ = gantry_worker::engine::config::EngineConfig::from_gguf(file, &spec);
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

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = parse_gguf(data) {
        use_file(&file);
    }
    if let Ok(file) = parse_gguf_keeping(data, data.len() as u64, &keep_tokenizer) {
        use_file(&file);
    }
    // The first 8 bytes claim how long the file is; the rest is the prefix read.
    if data.len() >= 8 {
        let claimed = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
        let prefix = &data[8..];
        let file_len = claimed.max(prefix.len() as u64);
        let _ = parse_gguf_prefix(prefix, file_len);
        let _ = parse_gguf_keeping(prefix, file_len, &keep_all);
    }
});
