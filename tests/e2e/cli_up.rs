//! The README's main job as a user runs it: `gantry up` serving the real SmolLM2, then
//! `gantry chat`, `deploy`, `scale`, `get` and `delete` against it, and what each says when
//! something is wrong.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::io::Write;
use std::process::Stdio;

use crate::common::controller::RunningController;
use crate::common::{gantry, http_get, run};

fn at(controller: &RunningController, args: &[&str]) -> (i32, String, String) {
    run(gantry().args(args).args(["--controller", &controller.url()]))
}

#[test]
fn gantry_up_serves_smollm2_and_the_cli_drives_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("state.redb");
    let up = RunningController::up(&["--store", store.to_str().unwrap(), "--threads", "1", "--context", "2048"]);
    let out = up.stdout().join("\n");
    assert!(out.contains("deployment smollm2-135m-instruct: 1 replica(s) of"), "{out}");
    assert!(out.contains("ready: smollm2-135m-instruct (1/1 replicas)"), "{out}");

    // One deployment: chat picks it.
    let (code, answer, err) = at(&up, &["chat", "What is the capital of France?", "--max-tokens", "24"]);
    assert_eq!(code, 0, "{err}");
    assert!(answer.contains("Paris"), "{answer}");

    // Interactive mode reads messages from stdin and keeps the conversation.
    let mut child = gantry()
        .args(["chat", "--controller", &up.url(), "--max-tokens", "16"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let script = "What is the capital of France?\n/reset\n/model nope\n/model smollm2-135m-instruct\n/model\n/frobnicate\n/exit\n";
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("Paris"));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("(conversation forgotten)"), "{err}");
    assert!(err.contains("error: no deployment named `nope`; deployed: smollm2-135m-instruct"), "{err}");
    assert!(err.contains("(now talking to smollm2-135m-instruct; conversation forgotten)"), "{err}");
    assert!(err.contains("(talking to smollm2-135m-instruct)"), "{err}");
    assert!(err.contains("unknown command /frobnicate; /model NAME talks to another deployment"), "{err}");

    // get -o json is the API's message, with enum names.
    let (code, json, err) = at(&up, &["get", "deployments", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v[0]["name"], "smollm2-135m-instruct");
    assert_eq!(v[0]["status"]["replica_status"][0]["state"], "READY");
    assert_eq!(v[0]["spec"]["placement"]["strategy"], "BINPACK");
    assert_eq!(v[0]["spec"]["context_length"], 2048);
    let (_, table, _) = at(&up, &["get", "workers"]);
    assert!(
        table.starts_with("WORKER") && table.contains("-local") && table.contains("smollm2-135m-instruct/0"),
        "{table}"
    );

    // A second deployment from the CLI, scaled and deleted.
    let model = common::smollm2();
    let (code, out, err) = at(&up, &["deploy", "second", "--model", model.to_str().unwrap(), "--context", "1K"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deployment second applied (generation 1)"), "{out}");
    let (code, _, err) = at(&up, &["chat", "Hi"]);
    assert_eq!(code, 64);
    assert!(
        err.contains("several models are deployed (second, smollm2-135m-instruct); pick one with --model"),
        "{err}"
    );
    let (code, out, _) = at(&up, &["scale", "second", "--replicas", "2", "-o", "json"]);
    assert_eq!(code, 0);
    let scaled: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((&scaled["name"], &scaled["spec"]["replicas"]), (&serde_json::json!("second"), &serde_json::json!(2)));
    let (code, out, _) = at(&up, &["scale", "second", "--replicas", "0"]);
    assert_eq!((code, out.trim()), (0, "deployment second scaled to 0 replica(s)"));
    let (code, _, err) = at(&up, &["chat", "Hi", "--model", "second"]);
    assert_eq!(code, 69);
    assert!(err.contains("`second` is scaled to 0 replicas"), "{err}");
    let (code, out, _) = at(&up, &["delete", "second"]);
    assert_eq!((code, out.trim()), (0, "deployment second deleted; its replicas are unloaded"));
    let (code, _, err) = at(&up, &["delete", "second"]);
    assert_eq!(code, 66);
    assert!(err.contains("no deployment named `second`; deployed: smollm2-135m-instruct"), "{err}");
    let (code, _, err) = at(&up, &["deploy", "Bad", "--model", "x"]);
    assert_eq!(code, 64);
    assert!(err.contains("deployment name `Bad`"), "{err}");

    // HTTP: health and the deployed models.
    let http = up.http.clone().expect("gantry up serves HTTP");
    assert!(http_get(&http, "/healthz").ends_with("ok\n"));
    let models = http_get(&http, "/v1/models");
    assert!(models.contains(r#""id":"smollm2-135m-instruct""#), "{models}");

    // SIGTERM with an OpenAI stream in flight: the stream is finished (its last event and
    // `[DONE]`) before the process exits, within the 20 s grace, not cut off.
    let (first, first_rx) = std::sync::mpsc::channel();
    let addr = http.clone();
    let reader = std::thread::spawn(move || {
        let body = r#"{"model":"smollm2-135m-instruct","prompt":"Tell a long story:","max_tokens":64,"stream":true}"#;
        let mut conn = std::net::TcpStream::connect(&addr).unwrap();
        let head = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).unwrap();
        conn.write_all(body.as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let mut told = false;
        loop {
            match std::io::Read::read(&mut conn, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if !told && String::from_utf8_lossy(&got).contains("data: {") {
                told = first.send(()).is_ok();
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    });
    first_rx.recv_timeout(std::time::Duration::from_secs(30)).expect("the stream's first event");
    let mut up = up;
    let started = std::time::Instant::now();
    assert!(up.terminate().success());
    assert!(started.elapsed() < std::time::Duration::from_secs(21), "took {:?}", started.elapsed());
    let streamed = reader.join().unwrap();
    // It ends as the model ends it (its length, or end-of-sequence), not cut off.
    assert!(
        streamed.contains(r#""finish_reason":"length""#) || streamed.contains(r#""finish_reason":"stop""#),
        "the stream was cut: {streamed}"
    );
    // The last event, then the chunked body's end: nothing cut mid-way.
    assert!(streamed.contains("data: [DONE]") && streamed.ends_with("\r\n0\r\n\r\n"), "the stream was cut: {streamed}");
}

#[test]
fn gantry_up_stops_promptly_when_nothing_is_streaming() {
    // Ctrl-C / SIGTERM stops it promptly, worker link and all.
    let mut up = RunningController::up(&[]);
    let started = std::time::Instant::now();
    assert!(up.terminate().success());
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "took {:?}", started.elapsed());
}

#[test]
fn without_a_controller_the_cli_says_how_to_start_one() {
    let (code, _, err) = run(gantry().args(["chat", "Hi", "--controller", "http://127.0.0.1:9"]));
    assert_eq!(code, 69);
    assert!(
        err.starts_with("error: cannot reach the controller at http://127.0.0.1:9:") && err.contains("gantry up"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("state.redb");
    let store = store.to_str().unwrap();
    let (code, _, err) = run(gantry()
        .args(["up", "--model", "/nonexistent.gguf", "--listen", "127.0.0.1:0"])
        .args(["--http", "off", "--store", store]));
    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent.gguf"), "{err}");
    // A taken port is named with the flag that changes it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, err) = run(gantry().args(["controller", "--listen", &addr, "--http", "off", "--store", store]));
    assert_eq!(code, 69);
    assert!(err.contains(&format!("cannot listen on {addr} (--listen)")), "{err}");
}
