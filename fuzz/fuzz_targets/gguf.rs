//! The GGUF reader: whole files (summarising long arrays, and keeping the tokenizer's whole as
//! the worker's tokenizer does), prefixes with a claimed file length (as a header read from
//! disk or over HTTP is), and the spec and engine config built from what parses.
#![no_main]

#[path = "entries.rs"]
mod entries;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| entries::gguf(data));
