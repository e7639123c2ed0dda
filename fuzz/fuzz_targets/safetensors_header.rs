//! The safetensors header reader (length, JSON, shapes and offsets against the file's size)
//! and the shard index.
#![no_main]

use gantry_core::safetensors::{header_len, parse_header, parse_index};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    // The first 8 bytes claim the file's length; the rest is the file's start.
    let claimed = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
    let file = &data[8..];
    let len = claimed.max(file.len() as u64);
    let _ = header_len("fuzz.safetensors", file, len);
    let _ = parse_header("fuzz.safetensors", file, len);
    if let Ok(text) = std::str::from_utf8(file) {
        let _ = parse_index(text);
    }
});
