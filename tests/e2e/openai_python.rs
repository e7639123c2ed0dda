//! OpenAI's official Python client (`openai`, pinned in scripts/clients/requirements.txt)
//! against `gantry up` serving SmolLM2 over the OpenAI-compatible HTTP API: the model list,
//! a streamed chat with usage in its last chunk (the same text as the gRPC API answers), a
//! whole chat, completions cut by length and by a stop sequence, seeded sampling, and errors
//! with OpenAI's status codes and shape.

#![allow(clippy::unwrap_used)]

use crate::common;

use crate::common::controller::{RunningController, chat};

const MODEL: &str = "smollm2-135m-instruct";

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_python_client_lists_streams_completes_and_gets_errors() {
    let python = common::repo_root().join(".venv-clients/bin/python");
    assert!(python.is_file(), "{} is missing: run scripts/setup.sh (the README's test command does)", python.display());
    let up = RunningController::up(&["--threads", "1", "--context", "1K"]);
    let base = format!("http://{}/v1", up.http.clone().unwrap());
    // The gRPC API's greedy answer, to compare with; its first token id is banned below.
    let (grpc_text, grpc_tokens) =
        chat(&mut up.inference().await, MODEL, "What is the capital of France?", 24).await.unwrap();
    let script = common::repo_root().join("tests/python/openai_client.py");
    let first_id = grpc_tokens[0].to_string();
    let (code, out, err) = common::run(std::process::Command::new(python).arg(script).args([&base, MODEL, &first_id]));
    assert_eq!(code, 0, "the client failed:\n{err}\ncontroller log:\n{}", up.stderr());
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();

    assert_eq!(r["models"], serde_json::json!([MODEL]));

    // Streamed: the gRPC API's greedy answer, chunk by chunk, the role once, usage at the end.
    let s = &r["stream"];
    assert_eq!(s["text"], grpc_text.as_str(), "{s}");
    assert!(grpc_text.contains("Paris"), "{grpc_text}");
    assert_eq!(s["roles"], serde_json::json!(["assistant"]));
    assert_eq!(s["object"], "chat.completion.chunk");
    let usage = &s["usage"];
    assert_eq!(usage["completion_tokens"].as_u64().unwrap() as usize, grpc_tokens.len(), "{usage}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    // One chunk per token, the finishing chunk, and the usage chunk.
    assert_eq!(s["chunks"].as_u64().unwrap() as usize, grpc_tokens.len() + 2, "{s}");
    let finish = if grpc_tokens.len() == 24 { "length" } else { "stop" };
    assert_eq!(s["finish_reason"], finish);

    // Whole: the same answer and usage.
    let c = &r["chat"];
    assert_eq!((c["text"].as_str().unwrap(), c["role"].as_str().unwrap()), (grpc_text.as_str(), "assistant"));
    assert_eq!(
        (&c["usage"], &c["object"], &c["finish_reason"]),
        (usage, &serde_json::json!("chat.completion"), &s["finish_reason"])
    );
    assert!(c["id"].as_str().unwrap().starts_with("chatcmpl-"), "{c}");

    let p = &r["completion"];
    assert_eq!((p["finish_reason"].as_str().unwrap(), p["object"].as_str().unwrap()), ("length", "text_completion"));
    assert_eq!(p["usage"]["completion_tokens"], 8);
    assert!(!p["text"].as_str().unwrap().is_empty());
    let stopped = &r["stopped"];
    assert_eq!(stopped["finish_reason"], "stop", "{stopped}");
    assert!(!stopped["text"].as_str().unwrap().contains(" 7"), "the stop sequence is not sent: {stopped}");
    assert_eq!(r["seeded_equal"], true);

    let e = &r["bad_temperature"];
    assert_eq!((e["status"].as_u64(), e["type"].as_str()), (Some(400), Some("BadRequestError")), "{e}");
    assert!(e["message"].as_str().unwrap().contains("temperature 5 is out of range: use 0 to 2"), "{e}");
    let e = &r["unknown_model"];
    assert_eq!((e["status"].as_u64(), e["type"].as_str()), (Some(404), Some("NotFoundError")), "{e}");
    assert!(e["message"].as_str().unwrap().contains("no deployment named `nope`"), "{e}");
    let e = &r["empty_messages"];
    assert_eq!(e["status"], 400, "{e}");
    assert!(e["message"].as_str().unwrap().contains("messages is empty"), "{e}");
    let e = &r["too_long"];
    assert_eq!(e["status"], 400, "{e}");
    assert!(e["message"].as_str().unwrap().contains("has a context of 1024 tokens"), "{e}");

    // Log-probabilities, chat: one entry per token, each token's text adding up to the answer,
    // the chosen token first among its alternatives, log-probabilities ≤ 0 and best first.
    let c = &r["chat_logprobs"];
    let entries = c["content"].as_array().unwrap();
    // At most max_tokens entries; the end-of-sequence token, when it comes, is not one.
    assert!(!entries.is_empty() && entries.len() <= 8, "{c}");
    let joined: Vec<u8> =
        entries.iter().flat_map(|e| e["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8)).collect();
    assert_eq!(String::from_utf8(joined).unwrap(), c["text"].as_str().unwrap(), "the tokens' bytes are the text");
    for e in entries {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{e}");
        assert_eq!((&top[0]["token"], &top[0]["logprob"]), (&e["token"], &e["logprob"]), "greedy picks the best: {e}");
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0, "{e}");
    }
    assert_eq!(&r["chat_logprobs_streamed"], &c["content"], "streamed, the same entries");
    // Completions: the legacy lists, aligned with the text.
    let p = &r["completion_logprobs"];
    let tokens: Vec<&str> = p["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens.concat(), p["text"].as_str().unwrap(), "{p}");
    let offsets: Vec<u64> = p["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    assert_eq!(offsets[0], 0);
    assert_eq!(offsets[1], tokens[0].len() as u64, "{p}");
    assert!(p["top_logprobs"].as_array().unwrap().iter().all(|t| t.as_object().unwrap().len() == 2), "{p}");
    // Penalties change a greedy answer that repeats itself: fewer repeated tokens.
    let repeats = |v: &serde_json::Value| {
        let t: Vec<&str> = v.as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        t.len() - t.iter().collect::<std::collections::BTreeSet<_>>().len()
    };
    let pen = &r["penalties"];
    assert!(repeats(&pen["penalised"]) < repeats(&pen["plain"]), "{pen}");
    // A logit bias of -100 on the greedy first token: the second best comes first instead.
    let b = &r["logit_bias"];
    assert_ne!(b["biased"], b["first"], "{b}");
    assert_eq!(b["biased"], b["second_best"], "{b}");
    // Fields Gantry does not do: a 400 naming them, in OpenAI's shape, never ignored.
    let refused = &r["refused"];
    for (case, param, says) in [
        ("tools", "tools", "`tools` is not supported: Gantry does not call tools"),
        ("response_format", "response_format", "JSON mode and JSON schemas are not enforced"),
        ("echo", "echo", "echoing the prompt is not supported"),
        ("unknown", "frobnicate", "Unrecognized request argument supplied: frobnicate"),
    ] {
        let e = &refused[case];
        assert_eq!(
            (e["status"].as_u64(), e["param"].as_str(), e["code"].as_str()),
            (Some(400), Some(param), Some("unsupported_parameter")),
            "{case}: {e}"
        );
        assert!(e["message"].as_str().unwrap().contains(says), "{case}: {e}");
    }
    let e = &refused["top_logprobs_alone"];
    assert_eq!((e["status"].as_u64(), e["param"].as_str()), (Some(400), Some("top_logprobs")), "{e}");
}
