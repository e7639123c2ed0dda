//! `GET /metrics` on `gantry up` serving SmolLM2, after a chat, a request for a deployment
//! that does not exist, and a bad request: Prometheus' own `promtool check metrics` accepts
//! the output, and the series say what happened (the requests, the worker's KV cache, the
//! router's prefix index holding the key of every block the worker's prefix cache keeps).

#![allow(clippy::unwrap_used)]

use crate::common;

use crate::common::controller::{RunningController, chat};
use gantry_proto::v1 as pb;

const MODEL: &str = "smollm2-135m-instruct";

/// The value of the series that starts with `series` (name and labels, exactly).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_pass_promtool_and_count_what_happened() {
    let promtool = which("promtool").expect("promtool is missing: run scripts/setup.sh (Debian's prometheus)");
    let up = RunningController::up(&["--threads", "1", "--context", "1K"]);
    let http = up.http.clone().unwrap();
    let mut inference = up.inference().await;
    let (_, tokens) = chat(&mut inference, MODEL, "What is the capital of France?", 12).await.unwrap();
    chat(&mut inference, "nope", "Hi", 4).await.unwrap_err();
    let bad = pb::ChatRequest {
        model: MODEL.into(),
        messages: vec![pb::ChatMessage { role: "user".into(), content: "Hi".into() }],
        sampling: Some(pb::SamplingParams { temperature: Some(-1.0), ..Default::default() }),
        request_id: String::new(),
    };
    let e = match inference.chat(bad).await {
        Ok(s) => s.into_inner().message().await.unwrap_err(),
        Err(e) => e,
    };
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // The worker's KV cache as its heartbeats report it: 4 sequences (`up`'s --parallel) of
    // 1,024 tokens, in blocks of 16. The chat's full blocks stay in its prefix cache, and the
    // heartbeats' key changes put each of their keys in the controller's prefix index.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let series = |text: &str, state: &str| {
        text.lines()
            .find(|l| l.starts_with("gantry_kv_cache_blocks{") && l.contains(&format!("state=\"{state}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    let index_keys = |text: &str| {
        text.lines().find_map(|l| l.strip_prefix("gantry_prefix_index_keys ")).and_then(|v| v.parse::<f64>().ok())
    };
    let response = loop {
        let response = common::http_get(&http, "/metrics");
        let kv_total = series(&response, "total") == Some(256.0);
        let cached = series(&response, "cached").unwrap_or(0.0);
        let indexed = cached > 0.0 && index_keys(&response) == Some(cached);
        if (kv_total && indexed) || std::time::Instant::now() > deadline {
            assert!(kv_total, "no KV cache of 256 blocks in\n{response}");
            assert!(indexed, "the index does not hold the {cached} cached blocks' keys:\n{response}");
            break response;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");

    let mut check = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), body.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let m = format!("model=\"{MODEL}\"");
    assert_eq!(value(body, &format!("gantry_requests_total{{{m},outcome=\"ok\"}}")), 1.0);
    assert_eq!(value(body, &format!("gantry_requests_total{{{m},outcome=\"invalid_argument\"}}")), 1.0);
    assert_eq!(value(body, "gantry_requests_total{model=\"(unknown)\",outcome=\"not_found\"}"), 1.0);
    assert_eq!(value(body, "gantry_prefix_index_replicas"), 1.0);
    assert_eq!(value(body, "gantry_prefix_index_forgotten_total"), 0.0);
    assert_eq!(value(body, &format!("gantry_generated_tokens_total{{{m}}}")), tokens.len() as f64);
    assert_eq!(value(body, &format!("gantry_time_to_first_token_seconds_count{{{m}}}")), 1.0);
    assert_eq!(value(body, &format!("gantry_inter_token_latency_seconds_count{{{m}}}")), (tokens.len() - 1) as f64);
    assert_eq!(value(body, &format!("gantry_replicas{{deployment=\"{MODEL}\",state=\"ready\"}}")), 1.0);
    let worker = body.lines().find(|l| l.starts_with("gantry_worker_up{")).unwrap();
    assert!(worker.ends_with(" 1"), "{worker}");
    let reserved = body.lines().find(|l| l.starts_with("gantry_gpu_memory_reserved_bytes{")).unwrap();
    let reserved: f64 = reserved.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(reserved > 100e6, "SmolLM2's replica reserves its estimate: {reserved}");
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| std::path::Path::new(d).join(name)).find(|p| p.is_file())
}
