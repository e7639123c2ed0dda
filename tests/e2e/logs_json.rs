//! `GANTRY_LOG_FORMAT=json`: every log line of `gantry up` is a JSON object, and a request's
//! id (given over gRPC, or as `X-Request-Id` over HTTP) appears in both the controller's
//! routing line and the worker's line for the same generation.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::{Duration, Instant};

use crate::common::controller::RunningController;
use gantry_proto::v1 as pb;

const MODEL: &str = "smollm2-135m-instruct";

/// The messages of the JSON log lines that carry `request_id`.
fn messages_for(up: &RunningController, request_id: &str) -> Vec<String> {
    up.stderr()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v| v["fields"]["request_id"] == request_id)
        .map(|v| v["fields"]["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn wait_for_messages(up: &RunningController, request_id: &str, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = messages_for(up, request_id);
        if want.iter().all(|w| got.iter().any(|m| m == w)) {
            return;
        }
        assert!(Instant::now() < deadline, "{request_id}: wanted {want:?}, logged {got:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_the_request_id_through_controller_and_worker() {
    let mut cmd = common::gantry();
    cmd.args(["up", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--threads", "1", "--context", "1K"])
        .env("GANTRY_LOG_FORMAT", "json");
    let up = RunningController::spawn(cmd, Some("ready:"));

    let req = pb::ChatRequest {
        model: MODEL.into(),
        messages: vec![pb::ChatMessage { role: "user".into(), content: "Hi".into() }],
        sampling: Some(pb::SamplingParams { max_tokens: Some(4), ..Default::default() }),
        request_id: "req-grpc-42".into(),
    };
    let mut stream = up.inference().await.chat(req).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}
    wait_for_messages(&up, "req-grpc-42", &["routing", "generated"]);

    let body = format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"Hi"}}],"max_tokens":4}}"#);
    let out = common::http_request(
        &up.http.clone().unwrap(),
        "POST",
        "/v1/chat/completions",
        "X-Request-Id: req-http-7\r\n",
        Some(&body),
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"id\":\"chatcmpl-req-http-7\""), "{out}");
    wait_for_messages(&up, "req-http-7", &["routing", "generated"]);
}
