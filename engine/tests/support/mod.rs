//! A test runner for test binaries that must also serve as a chat-template renderer child
//! (`harness = false`): `main` first calls `serve_renderer_if_child`, then runs the tests and
//! reports them the way libtest does, so `cargo test` shows and counts them as usual.

#![allow(dead_code)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::Instant;

/// A named test.
pub type Test = (&'static str, fn());

/// Serves as a renderer child when started as one; otherwise runs `tests` (those whose name
/// contains the first non-flag argument, when given) and exits 101 if any failed.
pub fn main(tests: &[Test]) {
    gantry_engine::chat_child::serve_renderer_if_child();
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let chosen: Vec<&Test> =
        tests.iter().filter(|(name, _)| filter.as_ref().is_none_or(|f| name.contains(f.as_str()))).collect();
    println!("\nrunning {} tests", chosen.len());
    let started = Instant::now();
    let mut failed = Vec::new();
    for (name, test) in &chosen {
        let ok = catch_unwind(AssertUnwindSafe(test)).is_ok();
        println!("test {name} ... {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            failed.push(*name);
        }
    }
    let verdict = if failed.is_empty() { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {} passed; {} failed; 0 ignored; 0 measured; {} filtered out; finished in {:.2}s\n",
        chosen.len() - failed.len(),
        failed.len(),
        tests.len() - chosen.len(),
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        std::process::exit(101);
    }
}

/// This test binary, which serves as a renderer child (see [`main`]).
pub fn this_binary() -> PathBuf {
    std::env::current_exe().expect("the test binary's path")
}

/// A real model's file under `models/` (or `GANTRY_MODELS_DIR`), fetched by
/// scripts/fetch-models.sh.
pub fn model_path(file: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::var_os("GANTRY_MODELS_DIR").map_or_else(|| root.join("models"), PathBuf::from);
    let p = dir.join(file);
    assert!(p.is_file(), "{} is missing: run scripts/fetch-models.sh", p.display());
    p
}

/// The tiny random-weight fixtures of every family (`fixtures/engine/`, made by
/// `scripts/fixtures/make_engine_fixtures.py` with transformers' reference logits).
pub const ENGINE_CASES: [&str; 15] = [
    "llama",
    "llama-plain",
    "llama-f16",
    "llama-bf16",
    "llama-sharded",
    "mistral",
    "phi",
    "phi3",
    "gemma",
    "gemma2",
    "gemma3",
    "falcon",
    "falcon-new",
    "gpt2",
    "qwen2",
];

/// The mixture-of-experts fixtures in f32 (same script): Mixtral, Qwen2-MoE (a shared expert, a
/// dense layer), Qwen3-MoE, gpt-oss (sinks, YaRN, clamped SwiGLU). `gpt-oss-mxfp4` (its experts
/// in MXFP4, run with 8-bit activations like every quantized format) has tests of its own.
pub const MOE_CASES: [&str; 4] = ["mixtral", "qwen2-moe", "qwen3-moe", "gpt-oss"];

/// The folder of fixture `case`.
pub fn engine_fixture(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/engine").join(case)
}
