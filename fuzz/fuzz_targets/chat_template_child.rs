//! The chat-template renderer the way a worker runs it: the template compiled and rendered in a
//! renderer child process (this same binary, started with the renderer variable set) with a
//! memory limit and a deadline. A template that hangs, runs out of memory or overflows the
//! stack costs its child, which the renderer starts again; what must never happen is the caller
//! stopping, or minijinja panicking (a panic in the child is reported back and fails this
//! target).
//!
//! libFuzzer sees no coverage from the child, so this target is for replaying inputs (the
//! corpus, and whatever `chat_template` — the same inputs in-process, coverage-guided — stopped
//! on), not for exploring; see docs/fuzzing.md.
#![no_main]

#[path = "chat_input.rs"]
mod chat_input;

use std::sync::Mutex;
use std::time::Duration;

use chat_input::{Input, render_in_child};
use gantry_engine::chat_child::{ChildLimits, ChildRenderer, serve_renderer_if_child};
use libfuzzer_sys::fuzz_target;

/// One renderer for the whole run: each input compiles its template in it.
static RENDERER: Mutex<Option<ChildRenderer>> = Mutex::new(None);

fn limits() -> ChildLimits {
    let mut limits = ChildLimits::this_executable().expect("this executable");
    // Under libFuzzer's -timeout (10 s in docs/fuzzing.md) and -rss_limit_mb, with room.
    limits.deadline = Duration::from_secs(2);
    limits.memory_bytes = 512 << 20;
    limits
}

fuzz_target!(init: serve_renderer_if_child(), |input: Input| {
    let mut renderer = RENDERER.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = render_in_child(&mut renderer, &limits(), &input) {
        panic!("{e}");
    }
});
