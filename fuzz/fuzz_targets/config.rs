//! The config.json parsers: the model spec (family, sizes, context) and the engine's config.
#![no_main]

#[path = "entries.rs"]
mod entries;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| entries::config(data));
