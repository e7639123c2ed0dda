//! Discovery through gRPC server reflection, by a client that has none of Gantry's .proto
//! files: the official Python `grpcio-reflection` client (`ProtoReflectionDescriptorDatabase`,
//! which speaks `grpc.reflection.v1alpha`) learns `Inference/Chat` from the controller and
//! `Worker/Generate` from a worker of `gantry up` serving SmolLM2, and calls each.

#![allow(clippy::unwrap_used)]

use crate::common;

use crate::common::controller::RunningController;
use serde_json::{Value, json};

const MODEL: &str = "smollm2-135m-instruct";

/// Runs the reflection client against `addr`, calling `service/method` with `request`.
fn discover_and_call(addr: &str, service: &str, method: &str, request: &Value) -> Value {
    let python = common::repo_root().join(".venv-clients/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/setup.sh", python.display());
    let script = common::repo_root().join("tests/python/reflection_client.py");
    let (code, out, err) =
        common::run(std::process::Command::new(python).arg(script).args([addr, service, method, &request.to_string()]));
    assert_eq!(code, 0, "the reflection client failed against {addr}:\n{err}");
    serde_json::from_str(out.trim()).unwrap()
}

/// The text of the streamed token events, and the last event.
fn text_and_done(replies: &Value) -> (String, Value) {
    let replies = replies.as_array().unwrap();
    let text = replies.iter().filter_map(|r| r["token"]["text"].as_str()).collect::<String>();
    (text, replies.last().unwrap().clone())
}

#[test]
fn grpcio_reflection_discovers_and_calls_the_controller_and_a_worker() {
    let up = RunningController::up(&["--threads", "1", "--context", "1K"]);
    let worker_addr = up
        .stdout()
        .iter()
        .find_map(|l| l.strip_prefix("gantry worker ")?.split_once(" listening on ").map(|(_, a)| a.trim().to_string()))
        .unwrap();
    let messages = json!([{"role": "user", "content": "What is the capital of France?"}]);
    let sampling = json!({"maxTokens": 12, "temperature": 0});

    let c = discover_and_call(
        &up.addr,
        "gantry.v1.Inference",
        "Chat",
        &json!({"model": MODEL, "messages": messages, "sampling": sampling}),
    );
    let services: Vec<&str> = c["services"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    for want in ["gantry.v1.Inference", "gantry.v1.Deployments", "gantry.v1.Models", "grpc.health.v1.Health"] {
        assert!(services.contains(&want), "the controller lists {want}: {services:?}");
    }
    assert_eq!(
        (c["input_type"].as_str(), c["output_type"].as_str()),
        (Some("gantry.v1.ChatRequest"), Some("gantry.v1.GenerateEvent"))
    );
    let (controller_text, done) = text_and_done(&c["replies"]);
    assert!(controller_text.contains("Paris"), "{controller_text:?}");
    assert_eq!(done["done"]["usage"]["completionTokens"], c["replies"].as_array().unwrap().len() - 1, "{done}");

    let w = discover_and_call(
        &worker_addr,
        "gantry.v1.Worker",
        "Generate",
        &json!({"modelId": format!("{MODEL}/0"), "chat": {"messages": messages}, "sampling": sampling}),
    );
    let services: Vec<&str> = w["services"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    for want in ["gantry.v1.Worker", "gantry.v1.StageLink", "grpc.health.v1.Health"] {
        assert!(services.contains(&want), "the worker lists {want}: {services:?}");
    }
    assert_eq!(w["input_type"], "gantry.v1.GenerateRequest");
    let (worker_text, _) = text_and_done(&w["replies"]);
    assert_eq!(worker_text, controller_text, "the worker, called directly, answers as through the controller");
}
