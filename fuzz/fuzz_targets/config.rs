//! The config.json parsers: the model spec (family, sizes, context) and the engine's config.
#![no_main]

use gantry_core::spec::{HfFiles, ModelSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Up to three files in one input, split by NUL: config, tokenizer_config, generation_config.
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
    let _ = gantry_worker::engine::config::EngineConfig::from_hf(config);
});
