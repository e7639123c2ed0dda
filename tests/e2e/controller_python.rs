//! A real Python gRPC client (`grpcio`, stubs generated from `proto/`) drives `gantry up`
//! serving SmolLM2: models listed, a deployment applied and waited for, a chat streamed
//! through the controller, a watch, scale to zero, delete, and an error code.

#![allow(clippy::unwrap_used)]

use crate::common;

use crate::common::controller::RunningController;

#[test]
fn python_grpcio_deploys_chats_and_watches_through_the_controller() {
    let python = common::repo_root().join(".venv-clients/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/setup.sh (the README's test command does)", python.display());
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("state.redb");
    let up = RunningController::up(&["--store", store.to_str().unwrap(), "--threads", "1", "--context", "1K"]);
    let script = common::repo_root().join("tests/python/controller_client.py");
    let model = common::smollm2();
    let (code, out, err) =
        common::run(std::process::Command::new(python).arg(script).args([&up.addr, model.to_str().unwrap()]));
    assert_eq!(code, 0, "the client failed:\n{err}\ncontroller log:\n{}", up.stderr());
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();

    assert_eq!(r["listed"], serde_json::json!(["smollm2-135m-instruct"]));
    assert_eq!(r["generation"], 1);
    assert_eq!(r["state"], "REPLICA_STATE_READY");
    let placement = r["placement"][0].as_str().unwrap();
    assert!(placement.ends_with("-local/gpu:0"), "{placement}");
    let chat = &r["chat"];
    assert!(chat["text"].as_str().unwrap().contains("Paris"), "{chat}");
    // One event per token, then the end.
    assert_eq!(chat["events"].as_u64().unwrap(), chat["completion_tokens"].as_u64().unwrap() + 1);
    assert!(matches!(
        chat["finish_reason"].as_str().unwrap(),
        "FINISH_REASON_LENGTH" | "FINISH_REASON_END_OF_SEQUENCE"
    ));
    assert_eq!(r["watch_first"], "KIND_EXISTING");
    assert_eq!(r["watch_scaled"], "KIND_CHANGED");
    assert_eq!(r["after_delete"], "NOT_FOUND");
    assert_eq!(r["error"]["code"], "NOT_FOUND");
    assert_eq!(r["error"]["details"], "no deployment named `py`; deployed: smollm2-135m-instruct");
}
