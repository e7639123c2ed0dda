//! The GGUF reader: whole files, prefixes with a claimed file length (as a header read from
//! disk or over HTTP is), and the spec and engine config built from what parses.
#![no_main]

use gantry_core::gguf::{parse_gguf, parse_gguf_prefix};
use gantry_core::spec::ModelSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = parse_gguf(data) {
        if let Ok(spec) = ModelSpec::from_gguf("fuzz.gguf", &file) {
            let _ = gantry_worker::engine::config::EngineConfig::from_gguf(&file, &spec);
        }
        let _ = (file.tensor_bytes(), file.tensor_elements(), file.architecture());
    }
    // The first 8 bytes claim how long the file is; the rest is the prefix read.
    if data.len() >= 8 {
        let claimed = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
        let prefix = &data[8..];
        let _ = parse_gguf_prefix(prefix, claimed.max(prefix.len() as u64));
    }
});
