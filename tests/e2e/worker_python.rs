//! A real Python gRPC client (`grpcio`, stubs generated from `proto/` by `grpcio-tools`) calls
//! a real worker serving SmolLM2: a streamed chat with logprobs, a cancel, and an error code.

#![allow(clippy::unwrap_used)]

use crate::common;

use crate::common::worker::RunningWorker;

#[test]
fn python_grpcio_streams_cancels_and_sees_error_codes() {
    let python = common::repo_root().join(".venv-clients/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/setup.sh (the README's test command does)", python.display());
    let worker = RunningWorker::start(&["--model", &format!("smol={}", common::smollm2().display())]);
    let script = common::repo_root().join("tests/python/worker_client.py");
    let (code, out, err) = common::run(std::process::Command::new(python).arg(script).args([&worker.addr, "smol"]));
    assert_eq!(code, 0, "the client failed:\n{err}\nworker log:\n{}", worker.stderr());
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();

    let chat = &r["chat"];
    assert!(chat["text"].as_str().unwrap().contains("Paris"), "{chat}");
    let tokens = chat["tokens"].as_array().unwrap().len();
    assert_eq!(chat["completion_tokens"].as_u64().unwrap() as usize, tokens);
    let logprobs = chat["logprobs"].as_array().unwrap();
    assert_eq!(logprobs.len(), tokens, "asked for logprobs: one per token");
    assert!(logprobs.iter().all(|l| l.as_f64().unwrap() <= 0.0));
    assert!(matches!(
        chat["finish_reason"].as_str().unwrap(),
        "FINISH_REASON_LENGTH" | "FINISH_REASON_END_OF_SEQUENCE"
    ));

    let cancel = &r["cancel"];
    let generated = cancel["tokens_generated"].as_u64().unwrap() - tokens as u64;
    assert_eq!(cancel["read"], 3);
    assert!(generated <= 3 + 8 + 1, "a cancel after 3 tokens stopped at {generated}");

    assert_eq!(r["error"]["code"], "NOT_FOUND");
    assert_eq!(r["error"]["details"], "model `missing` is not loaded on this worker; loaded: smol");
}
