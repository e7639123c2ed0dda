//! Models from the Hugging Face Hub, end to end: `gantry pull` and a worker's `LoadModel`
//! against a stand-in Hub on loopback (`hub_stub`; the real Hub cannot be reached from here)
//! that serves the real SmolLM2 GGUF, a gated copy of it, and the Hub's errors.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::process::Command;

use crate::common::worker::{RunningWorker, chat_request, collect};
use gantry_proto::v1 as pb;
use gantry_store::hub_stub::{Access, HubStub, StubFile, StubRepo};
use tonic::Code;

const FILE: &str = "SmolLM2-135M-Instruct-Q4_1.gguf";

fn stub() -> HubStub {
    let data = std::fs::read(common::smollm2()).unwrap();
    let file = StubFile::new(FILE, data, true);
    HubStub::start(vec![
        StubRepo::new("HuggingFaceTB/SmolLM2-GGUF", vec![file.clone()]),
        StubRepo::new("meta/gated-GGUF", vec![file]).with_access(Access::Gated { token: "hf_granted".into() }),
    ])
}

fn pull(stub: &HubStub, cache: &std::path::Path, model: &str) -> Command {
    let mut cmd = common::gantry();
    cmd.args(["pull", model]).env("HF_ENDPOINT", stub.endpoint()).env("HF_HUB_CACHE", cache);
    cmd
}

#[test]
fn gantry_pull_downloads_into_the_cache_and_says_where() {
    let stub = stub();
    let cache = tempfile::tempdir().unwrap();
    let (code, out, err) = common::run(&mut pull(&stub, cache.path(), "HuggingFaceTB/SmolLM2-GGUF"));
    assert_eq!(code, 0, "{err}");
    let path = std::path::PathBuf::from(out.trim());
    assert!(path.starts_with(cache.path().join("models--HuggingFaceTB--SmolLM2-GGUF/snapshots")), "{out}");
    assert_eq!(std::fs::read(&path).unwrap(), std::fs::read(common::smollm2()).unwrap());
    assert!(err.contains("downloaded in"), "{err}");
    // The pulled file is a model the other commands take.
    let spec = common::gantry_json(&["inspect", path.to_str().unwrap(), "--json"]);
    assert_eq!(spec["model"]["family"], "llama", "{spec}");

    let (code, _, err) = common::run(&mut pull(&stub, cache.path(), "HuggingFaceTB/SmolLM2-GGUF"));
    assert_eq!(code, 0);
    assert!(err.contains("(everything was in the cache)"), "{err}");
}

#[test]
fn a_gated_model_needs_a_token_from_the_environment_or_the_token_file() {
    let stub = stub();
    let cache = tempfile::tempdir().unwrap();
    let (code, _, err) = common::run(&mut pull(&stub, cache.path(), "meta/gated-GGUF"));
    assert_eq!(code, 77, "EX_NOPERM: {err}");
    assert_eq!(
        err.trim(),
        format!(
            "error: meta/gated-GGUF is gated: accept its terms on {}/meta/gated-GGUF while logged in, then set HF_TOKEN to a token of that account (or put it in the file HF_TOKEN_PATH names, default ~/.cache/huggingface/token)",
            stub.endpoint()
        )
    );
    let (code, _, err) = common::run(pull(&stub, cache.path(), "meta/gated-GGUF").env("HF_TOKEN", "hf_granted"));
    assert_eq!(code, 0, "{err}");

    let other_cache = tempfile::tempdir().unwrap();
    let token_file = other_cache.path().join("token");
    std::fs::write(&token_file, "hf_granted\n").unwrap();
    let (code, _, err) =
        common::run(pull(&stub, other_cache.path(), "meta/gated-GGUF").env("HF_TOKEN_PATH", &token_file));
    assert_eq!(code, 0, "{err}");
    assert!(stub.requests().iter().any(|r| r.authorization.as_deref() == Some("Bearer hf_granted")));

    let (code, _, err) = common::run(&mut pull(&stub, cache.path(), "./not-a-hub-id"));
    assert_eq!(
        (code, err.trim()),
        (64, "error: `./not-a-hub-id` is not a Hub model id: expected `org/name`, optionally `@revision` and `:file`")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_loads_a_hub_model_with_download_progress_and_serves_it() {
    let stub = stub();
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = common::gantry();
    cmd.args(["worker", "--listen", "127.0.0.1:0"])
        .env("HF_ENDPOINT", stub.endpoint())
        .env("HF_HUB_CACHE", cache.path());
    let worker = RunningWorker::spawn(cmd);
    let mut client = worker.client().await;

    let req = pb::LoadModelRequest { source: "HuggingFaceTB/SmolLM2-GGUF".into(), ..Default::default() };
    let mut stream = client.load_model(req).await.unwrap().into_inner();
    let (mut stages, mut info) = (Vec::new(), None);
    while let Some(ev) = stream.message().await.unwrap() {
        match ev.event.unwrap() {
            pb::load_model_event::Event::Progress(p) => {
                if stages.last() != Some(&p.stage) {
                    stages.push(p.stage.clone());
                }
                if p.stage == "download" {
                    assert_eq!((p.item.as_str(), p.total), (FILE, std::fs::metadata(common::smollm2()).unwrap().len()));
                }
            }
            pb::load_model_event::Event::Done(i) => info = Some(i),
        }
    }
    assert_eq!(stages, ["download", "load"]);
    let info = info.unwrap();
    assert_eq!((info.model_id.as_str(), info.source.as_str()), ("SmolLM2-GGUF", "HuggingFaceTB/SmolLM2-GGUF"));
    let out = collect(&mut client, chat_request("SmolLM2-GGUF", "What is the capital of France?", 16)).await.unwrap();
    assert!(out.text.contains("Paris"), "{:?}", out.text);

    // A gated model without a token: UNAUTHENTICATED, with what to do.
    let req = pb::LoadModelRequest { source: "meta/gated-GGUF".into(), ..Default::default() };
    let mut stream = client.load_model(req).await.unwrap().into_inner();
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a gated load must fail"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().starts_with("meta/gated-GGUF is gated: accept its terms on "), "{}", err.message());
}
