//! Every input the fuzzers kept (`fuzz/corpus/TARGET/`) and the inputs of the findings fixed
//! since (`fuzz/regressions/TARGET/`, written by `fuzz/regressions.py`), replayed through the
//! fuzz targets' own entry points (`fuzz/fuzz_targets/entries.rs`, `chat_input.rs`) in a normal
//! `cargo test`: no nightly, no libFuzzer. A reader that panics again fails the test naming the
//! file; chat templates render in a renderer child (this binary), as a worker renders them, so
//! the hostile ones cost their child, not the test.

#![allow(clippy::unwrap_used)]

mod support;

#[path = "../../fuzz/fuzz_targets/chat_input.rs"]
mod chat_input;
#[path = "../../fuzz/fuzz_targets/entries.rs"]
mod entries;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use gantry_engine::chat_child::ChildLimits;

/// The files of `fuzz/corpus/TARGET` and `fuzz/regressions/TARGET`, in name order.
fn inputs(target: &str) -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        files.extend(entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()));
    }
    files.sort();
    files
}

/// Replays every input of `target` through `entry`, naming each one that panics.
fn replay(target: &str, entry: fn(&[u8])) {
    let files = inputs(target);
    assert!(!files.is_empty(), "no inputs for {target}: fuzz/corpus/{target} is missing");
    let mut panicked = Vec::new();
    for path in &files {
        let data = std::fs::read(path).unwrap();
        if catch_unwind(AssertUnwindSafe(|| entry(&data))).is_err() {
            panicked.push(path.display().to_string());
        }
    }
    assert!(
        panicked.is_empty(),
        "{} of {} {target} inputs panicked:\n{}",
        panicked.len(),
        files.len(),
        panicked.join("\n")
    );
    println!("  {target}: {} inputs replayed", files.len());
}

fn gguf_inputs_replay_without_a_panic() {
    replay("gguf", entries::gguf);
}

fn safetensors_header_inputs_replay_without_a_panic() {
    replay("safetensors_header", entries::safetensors_header);
}

fn config_inputs_replay_without_a_panic() {
    replay("config", entries::config);
}

fn chat_template_inputs_render_in_a_renderer_child_without_a_panic() {
    let files = inputs("chat_template");
    assert!(files.len() > 1000, "{} chat template inputs: the corpus is missing", files.len());
    // The fuzzing deadline and memory (docs/fuzzing.md), under the worker's.
    let limits =
        ChildLimits { program: support::this_binary(), memory_bytes: 512 << 20, deadline: Duration::from_secs(2) };
    let mut renderer = None;
    let mut failed = Vec::new();
    for path in &files {
        let data = std::fs::read(path).unwrap();
        let Ok(input) = chat_input::Input::arbitrary_take_rest(Unstructured::new(&data)) else { continue };
        if let Err(e) = chat_input::render_in_child(&mut renderer, &limits, &input) {
            failed.push(format!("{}: {e}", path.display()));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs panicked the renderer:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
    println!("  chat_template: {} inputs rendered in a child", files.len());
}

fn main() {
    support::main(&[
        ("gguf_inputs_replay_without_a_panic", gguf_inputs_replay_without_a_panic),
        ("safetensors_header_inputs_replay_without_a_panic", safetensors_header_inputs_replay_without_a_panic),
        ("config_inputs_replay_without_a_panic", config_inputs_replay_without_a_panic),
        (
            "chat_template_inputs_render_in_a_renderer_child_without_a_panic",
            chat_template_inputs_render_in_a_renderer_child_without_a_panic,
        ),
    ]);
}
