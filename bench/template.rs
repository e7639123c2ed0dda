//! What rendering a chat template in a renderer child costs against rendering it in-process:
//! starting a child (spawn and compile), one render of a short and of a long conversation for
//! real templates, and a child's resident memory. A worker starts one child per loaded model
//! (at load) and renders every chat request through it.
//!
//!     cargo run --release -p gantry-worker --example template_bench -- --renders 2000
//!
//! This benchmark's own binary is the child (it calls `serve_renderer_if_child` first).

#![allow(clippy::unwrap_used)] // a benchmark: any failure is fatal

use std::path::PathBuf;
use std::time::Instant;

use gantry_engine::chat::{ChatTemplate, Message};
use gantry_engine::chat_child::{ChildLimits, ChildRenderer, serve_renderer_if_child};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.into())
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Microseconds per call of `f`, `n` times.
fn timed(n: usize, mut f: impl FnMut()) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect()
}

fn main() {
    serve_renderer_if_child();
    let args: Vec<String> = std::env::args().collect();
    let renders: usize = arg(&args, "--renders", "2000").parse().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let limits = ChildLimits::this_executable().unwrap();
    let short = vec![
        Message::new("system", "You are a helpful assistant."),
        Message::new("user", "Hello! What is 2 + 2?"),
        Message::new("assistant", "2 + 2 = 4."),
        Message::new("user", "And in French?"),
    ];
    let paragraph = "The quick brown fox jumps over the lazy dog, and then it does so again. ".repeat(28);
    let long: Vec<Message> = (0..64)
        .map(|i| Message::new(if i % 2 == 0 { "user" } else { "assistant" }, &format!("{i}: {paragraph}")))
        .collect();
    let mut rows = Vec::new();
    println!(
        "| template | conversation | in-process p50 / p99 µs | child p50 / p99 µs | child start p50 ms | child RSS |"
    );
    println!("|---|---|---|---|---|---|");
    for name in ["smollm2-135m-instruct", "llama-3.1-8b-instruct", "gemma-3-1b-it"] {
        let f: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join(format!("fixtures/chat-templates/{name}.json"))).unwrap(),
        )
        .unwrap();
        let (source, bos, eos) = (
            f["template"].as_str().unwrap(),
            f["bos_token"].as_str().unwrap_or(""),
            f["eos_token"].as_str().unwrap_or(""),
        );
        let extra = f["extra"].as_object().cloned().unwrap_or_default();
        let here = ChatTemplate::new(source, "model", bos, eos).unwrap();
        let mut starts = timed(20, || {
            ChildRenderer::start(&limits, source, "model", bos, eos).unwrap();
        });
        let start_ms = percentile(&mut starts, 0.5) / 1000.0;
        let mut child = ChildRenderer::start(&limits, source, "model", bos, eos).unwrap();
        for (label, messages) in [("4 messages", &short), ("64 messages, 128 KiB", &long)] {
            let want = here.render(messages, true, &extra).unwrap();
            assert_eq!(child.render(messages, true, &extra).unwrap(), want);
            let mut a = timed(renders, || {
                here.render(messages, true, &extra).unwrap();
            });
            let mut b = timed(renders, || {
                child.render(messages, true, &extra).unwrap();
            });
            let (a50, a99, b50, b99) =
                (percentile(&mut a, 0.5), percentile(&mut a, 0.99), percentile(&mut b, 0.5), percentile(&mut b, 0.99));
            let rss = rss_kib(child.pid().unwrap());
            println!(
                "| {name} | {label} | {a50:.0} / {a99:.0} | {b50:.0} / {b99:.0} | {start_ms:.1} | {:.1} MiB |",
                rss as f64 / 1024.0
            );
            rows.push(serde_json::json!({
                "template": name, "conversation": label, "prompt_bytes": want.len(),
                "in_process_us_p50": a50, "in_process_us_p99": a99, "child_us_p50": b50, "child_us_p99": b99,
                "child_start_ms_p50": start_ms, "child_rss_kib": rss,
            }));
        }
    }
    println!("{}", serde_json::json!({"renders": renders, "rows": rows}));
}
