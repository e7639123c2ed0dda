//! The safetensors header reader (length, JSON, shapes and offsets against the file's size)
//! and the shard index.
#![no_main]

#[path = "entries.rs"]
mod entries;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| entries::safetensors_header(data));
