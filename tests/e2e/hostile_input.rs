//! The hostile-input table: bad model files, bad configs and bad requests, each with the exact
//! error a user gets. Model files go through `gantry inspect` under a 1 GiB address-space
//! limit (a parser that allocated what a file claims — billions of entries — would die
//! instead of answering); requests go to `gantry up` serving the real SmolLM2 over gRPC and
//! the OpenAI HTTP API, with API keys on. Every case must fail cleanly: the right code, the
//! expected words, no panic; the server answers the next case as before.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::{Path, PathBuf};

use crate::common::controller::RunningController;
use crate::common::run;
use gantry_proto::v1 as pb;
use tonic::Code;

const KEY: &str = "k-hostile-table-0123456789";

// ---- model files ----

fn s(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

fn kv_str(key: &str, value: &str) -> Vec<u8> {
    [s(key.as_bytes()), 8u32.to_le_bytes().to_vec(), s(value.as_bytes())].concat()
}

fn kv_u32(key: &str, value: u32) -> Vec<u8> {
    [s(key.as_bytes()), 4u32.to_le_bytes().to_vec(), value.to_le_bytes().to_vec()].concat()
}

fn header(tensors: u64, kvs: u64) -> Vec<u8> {
    [b"GGUF".to_vec(), 3u32.to_le_bytes().to_vec(), tensors.to_le_bytes().to_vec(), kvs.to_le_bytes().to_vec()].concat()
}

fn tensor(name: &[u8], dims: &[u64], ggml_type: u32, offset: u64) -> Vec<u8> {
    let mut out = s(name);
    out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        out.extend_from_slice(&d.to_le_bytes());
    }
    out.extend_from_slice(&ggml_type.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out
}

/// A small llama GGUF header whose one tensor is `t`, padded, with `data` bytes after it.
fn llama_with(t: Vec<u8>, data: usize) -> Vec<u8> {
    let kvs = [
        kv_str("general.architecture", "llama"),
        kv_u32("llama.block_count", 1),
        kv_u32("llama.context_length", 64),
        kv_u32("llama.embedding_length", 8),
        kv_u32("llama.attention.head_count", 2),
    ];
    let mut out = header(1, kvs.len() as u64);
    out.extend(kvs.concat());
    out.extend(t);
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.resize(out.len() + data, 0);
    out
}

fn safetensors(header_len: u64, rest: &[u8]) -> Vec<u8> {
    [header_len.to_le_bytes().to_vec(), rest.to_vec()].concat()
}

fn safetensors_json(json: &str, data: usize) -> Vec<u8> {
    let mut out = safetensors(json.len() as u64, json.as_bytes());
    out.resize(out.len() + data, 0);
    out
}

const TINY_CONFIG: &str = r#"{"model_type":"llama","hidden_size":8,"num_hidden_layers":1,"num_attention_heads":2,"vocab_size":10,"intermediate_size":16,"max_position_embeddings":64}"#;

/// What a file case is: a GGUF file, a safetensors file beside a good config, or a config.
#[derive(Clone, PartialEq)]
enum File {
    Gguf(Vec<u8>),
    Safetensors(Vec<u8>),
    Config(String),
}

fn file_cases(real: &[u8]) -> Vec<(&'static str, File, &'static str)> {
    use File::*;
    let config = |c: &str| Config(c.to_string());
    vec![
        ("empty file", Gguf(vec![]), "not a GGUF file"),
        ("wrong magic", Gguf(b"GGML\x03\0\0\0 not really".to_vec()), "not a GGUF file"),
        ("magic only", Gguf(b"GGUF".to_vec()), "truncated GGUF file: the version"),
        (
            "unsupported version",
            Gguf([b"GGUF".to_vec(), 9u32.to_le_bytes().to_vec(), vec![0; 16]].concat()),
            "version 9 is not supported",
        ),
        ("real file cut in its metadata", Gguf(real[..1 << 20].to_vec()), "but the file has 1048576 bytes"),
        ("real file cut in its tensor data", Gguf(real[..real.len() - 4096].to_vec()), "truncated GGUF file: tensor `"),
        ("2^62 tensors claimed", Gguf(header(1 << 62, 0)), "tensor entries (4611686018427387904 of them)"),
        ("2^62 metadata entries claimed", Gguf(header(0, 1 << 62)), "metadata entries (4611686018427387904 of them)"),
        (
            "a metadata array claiming 5 billion strings",
            Gguf(
                [
                    header(0, 1),
                    s(b"tokenizer.ggml.tokens"),
                    9u32.to_le_bytes().to_vec(),
                    8u32.to_le_bytes().to_vec(),
                    5_000_000_000u64.to_le_bytes().to_vec(),
                ]
                .concat(),
            ),
            "the elements of `tokenizer.ggml.tokens` (5000000000 of them) would end at byte 40000000069, but the file has 69 bytes",
        ),
        (
            "a string claiming 2^60 bytes",
            Gguf(
                [header(0, 1), s(b"general.name"), 8u32.to_le_bytes().to_vec(), (1u64 << 60).to_le_bytes().to_vec()]
                    .concat(),
            ),
            "truncated GGUF file",
        ),
        (
            "an unknown metadata value type",
            Gguf([header(0, 1), s(b"general.x"), 77u32.to_le_bytes().to_vec(), vec![0; 8]].concat()),
            "`general.x` has unknown value type 77",
        ),
        (
            "a non-UTF-8 metadata key",
            Gguf([header(0, 1), s(b"general.\xff\xfe"), 4u32.to_le_bytes().to_vec(), vec![1, 0, 0, 0]].concat()),
            "metadata key #0 is not UTF-8",
        ),
        (
            "a non-UTF-8 tensor name",
            Gguf(llama_with(tensor(b"tok\xffen", &[8, 10], 0, 0), 320)),
            "the name of tensor #0 is not UTF-8",
        ),
        (
            "a tensor offset past the end",
            Gguf(llama_with(tensor(b"token_embd.weight", &[8, 10], 0, 1 << 40), 320)),
            "tensor `token_embd.weight` would end at byte 1099511628384, but the file has 608 bytes",
        ),
        (
            "a shape whose product overflows",
            Gguf(llama_with(tensor(b"token_embd.weight", &[1 << 40, 1 << 40], 0, 0), 64)),
            "tensor `token_embd.weight` has absurd shape [1099511627776, 1099511627776]",
        ),
        (
            "nine dimensions",
            Gguf(llama_with(tensor(b"t", &[1; 9], 0, 0), 64)),
            "tensor `t` has 9 dimensions (1 to 4 allowed)",
        ),
        (
            "an unknown tensor type",
            Gguf(llama_with(tensor(b"token_embd.weight", &[8, 10], 99, 0), 640)),
            "tensor `token_embd.weight` has unknown GGML type 99",
        ),
        (
            "an unknown GGUF architecture",
            Gguf([header(0, 2), kv_str("general.architecture", "mamba9"), kv_u32("mamba9.block_count", 1)].concat()),
            "unknown model architecture `mamba9`",
        ),
        (
            "a safetensors header longer than the file",
            Safetensors(safetensors(1 << 20, b"{}")),
            "header of 1048576 bytes runs past the end of the 10-byte file",
        ),
        (
            "a safetensors header length of 2^62",
            Safetensors(safetensors(1 << 62, b"{}")),
            "header length 4611686018427387904 is outside 1..=100000000",
        ),
        ("a safetensors header that is not JSON", Safetensors(safetensors(5, b"hello")), "header is not valid JSON"),
        ("a non-UTF-8 safetensors header", Safetensors(safetensors(4, b"{\xff} ")), "header is not valid JSON"),
        (
            "safetensors offsets past the data",
            Safetensors(safetensors_json(
                r#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[10,8],"data_offsets":[0,1099511627776]}}"#,
                16,
            )),
            "data_offsets [0, 1099511627776] do not hold 320 bytes of F32 [10, 8]",
        ),
        (
            "a safetensors shape whose product overflows",
            Safetensors(safetensors_json(
                r#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,16]}}"#,
                16,
            )),
            "`model.embed_tokens.weight` has absurd shape [1099511627776, 1099511627776]",
        ),
        ("a config that is not JSON", config("{\"model_type\": \"llama\", "), "config.json is not valid JSON"),
        (
            "an unknown config architecture",
            config(r#"{"architectures":["MambaForCausalLM"],"model_type":"mamba"}"#),
            "unknown model architecture `MambaForCausalLM`",
        ),
        (
            "a zero hidden_size",
            config(&TINY_CONFIG.replace("\"hidden_size\":8", "\"hidden_size\":0")),
            "absurd hidden_size: 0 (must be at least 1)",
        ),
        (
            "a negative layer count",
            config(&TINY_CONFIG.replace("\"num_hidden_layers\":1", "\"num_hidden_layers\":-2")),
            "`num_hidden_layers` must be a non-negative integer, found -2",
        ),
        (
            "an absurd hidden_size",
            config(&TINY_CONFIG.replace("\"hidden_size\":8", "\"hidden_size\":1000000000000")),
            "absurd hidden_size",
        ),
        (
            "a config without a layer count",
            config(r#"{"model_type":"llama","hidden_size":64}"#),
            "config.json has no `num_hidden_layers`",
        ),
    ]
}

/// Every case must test something of its own: a name or a file given twice is a copy that
/// adds nothing (and hides that the case meant to be there is missing).
fn distinct(cases: &[(&str, File, &str)]) -> Result<(), String> {
    for (i, (name, file, _)) in cases.iter().enumerate() {
        if let Some((other, _, _)) = cases[..i].iter().find(|(n, f, _)| n == name || f == file) {
            return Err(format!("`{name}` repeats `{other}`"));
        }
    }
    Ok(())
}

#[test]
fn the_case_list_check_refuses_a_copied_case() {
    let real = std::fs::read(common::smollm2()).unwrap();
    let mut cases = file_cases(&real);
    assert_eq!(distinct(&cases), Ok(()));
    let (file, want) = (cases[3].1.clone(), cases[3].2);
    cases.push(("a renamed copy", file, want));
    assert_eq!(distinct(&cases), Err(format!("`a renamed copy` repeats `{}`", cases[3].0)));
}

/// Writes the case where `gantry inspect` can read it: a file, or a folder for a config.
fn materialize(dir: &Path, i: usize, file: &File) -> PathBuf {
    match file {
        File::Gguf(bytes) => {
            let p = dir.join(format!("case{i}.gguf"));
            std::fs::write(&p, bytes).unwrap();
            p
        }
        File::Safetensors(bytes) => {
            let d = dir.join(format!("case{i}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("config.json"), TINY_CONFIG).unwrap();
            std::fs::write(d.join("model.safetensors"), bytes).unwrap();
            d
        }
        File::Config(text) => {
            let d = dir.join(format!("case{i}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("config.json"), text).unwrap();
            d
        }
    }
}

#[test]
fn bad_model_files_each_get_their_error_and_allocate_nothing_they_claim() {
    let real = std::fs::read(common::smollm2()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = file_cases(&real);
    assert_eq!(distinct(&cases), Ok(()));
    let mut wrong = Vec::new();
    for (i, (name, file, want)) in cases.iter().enumerate() {
        let path = materialize(dir.path(), i, file);
        // 1 GiB of address space: enough for the binary and a header, far from what the
        // hostile files claim.
        let mut cmd = std::process::Command::new("prlimit");
        cmd.args(["--as=1073741824", "--"]).arg(env!("CARGO_BIN_EXE_gantry")).arg("inspect").arg(&path);
        cmd.env("RUST_BACKTRACE", "1");
        let (code, out, err) = run(&mut cmd);
        let ok = code == 65
            && out.is_empty()
            && err.lines().count() == 1
            && err.starts_with("error: ")
            && err.contains(want);
        if !ok || err.contains("panicked") {
            wrong.push(format!("{name}: exit {code}, stderr {err:?}, want {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{} of {} cases went wrong:\n{}", wrong.len(), cases.len(), wrong.join("\n"));
}

// ---- requests ----

fn chat_req(messages: &[(&str, &str)], sampling: pb::SamplingParams) -> pb::ChatRequest {
    pb::ChatRequest {
        model: "smollm2".into(),
        messages: messages.iter().map(|(r, c)| pb::ChatMessage { role: (*r).into(), content: (*c).into() }).collect(),
        sampling: Some(sampling),
        request_id: String::new(),
    }
}

fn with_key<T>(msg: T, key: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(k) = key {
        req.metadata_mut().insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    req
}

/// A chat to its end: the error, if any.
async fn chat_error(
    channel: &tonic::transport::Channel,
    req: pb::ChatRequest,
    key: Option<&str>,
) -> Option<tonic::Status> {
    let mut client = pb::inference_client::InferenceClient::new(channel.clone()).max_encoding_message_size(64 << 20);
    let mut stream = match client.chat(with_key(req, key)).await {
        Ok(s) => s.into_inner(),
        Err(e) => return Some(e),
    };
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return None,
            Err(e) => return Some(e),
        }
    }
}

fn sp(f: impl FnOnce(&mut pb::SamplingParams)) -> pb::SamplingParams {
    let mut p = pb::SamplingParams { max_tokens: Some(4), ..Default::default() };
    f(&mut p);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_each_get_their_error_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{KEY}\n")).unwrap();
    let up = RunningController::up(&[
        "--api-keys",
        keys.to_str().unwrap(),
        "--threads",
        "1",
        "--context",
        "256",
        "--name",
        "smollm2",
    ]);
    let channel = up.channel().await;
    let k = Some(KEY);
    let long = "word ".repeat(400);
    let huge = "x".repeat(5 << 20);
    let hi = [("user", "Hi")];
    let grpc: Vec<(&str, pb::ChatRequest, Option<&str>, Code, String)> = vec![
        (
            "a prompt past the context",
            chat_req(&[("user", &long)], sp(|_| {})),
            k,
            Code::InvalidArgument,
            "model `smollm2/0` has a context of 256 tokens, so at most 255 prompt tokens fit".into(),
        ),
        (
            "an empty message list",
            chat_req(&[], sp(|_| {})),
            k,
            Code::InvalidArgument,
            "the chat has no messages".into(),
        ),
        (
            "an unknown role",
            chat_req(&[("wizard", "Hi")], sp(|_| {})),
            k,
            Code::InvalidArgument,
            "message #1 has unknown role `wizard`: use system, user, assistant, tool".into(),
        ),
        (
            "max_tokens 0",
            chat_req(&hi, sp(|p| p.max_tokens = Some(0))),
            k,
            Code::InvalidArgument,
            "max_tokens must be at least 1".into(),
        ),
        (
            "max_tokens 4 billion",
            chat_req(&hi, sp(|p| p.max_tokens = Some(4_000_000_000))),
            k,
            Code::InvalidArgument,
            "max_tokens 4000000000 is more than model `smollm2/0` can hold: its context is 256 tokens".into(),
        ),
        (
            "a NaN temperature",
            chat_req(&hi, sp(|p| p.temperature = Some(f32::NAN))),
            k,
            Code::InvalidArgument,
            "temperature must be between 0 and 100, got NaN".into(),
        ),
        (
            "a negative temperature",
            chat_req(&hi, sp(|p| p.temperature = Some(-1.0))),
            k,
            Code::InvalidArgument,
            "temperature must be between 0 and 100, got -1".into(),
        ),
        (
            "top_p above 1",
            chat_req(&hi, sp(|p| p.top_p = Some(1.5))),
            k,
            Code::InvalidArgument,
            "top_p must be in (0, 1], got 1.5".into(),
        ),
        (
            "a 5 MiB request",
            chat_req(&[("user", &huge)], sp(|_| {})),
            k,
            Code::OutOfRange,
            "decoded message length too large".into(),
        ),
        (
            "an unknown model",
            pb::ChatRequest { model: "nope".into(), ..chat_req(&hi, sp(|_| {})) },
            k,
            Code::NotFound,
            "no deployment named `nope`".into(),
        ),
        (
            "no API key",
            chat_req(&hi, sp(|_| {})),
            None,
            Code::Unauthenticated,
            "this controller needs an API key".into(),
        ),
        (
            "a wrong API key",
            chat_req(&hi, sp(|_| {})),
            Some("k-wrong-wrong-wrong-wrong"),
            Code::Unauthenticated,
            "the API key is not valid".into(),
        ),
    ];
    let mut wrong = Vec::new();
    let count = grpc.len();
    for (name, req, key, code, want) in grpc {
        match chat_error(&channel, req, key).await {
            Some(e) if e.code() == code && e.message().contains(&want) => {}
            other => wrong.push(format!("{name}: got {other:?}, want {code:?} with {want:?}")),
        }
    }

    let http = up.http.clone().unwrap();
    let auth = format!("Authorization: Bearer {KEY}\r\n");
    let too_big = format!(r#"{{"model":"smollm2","prompt":"{}"}}"#, "x".repeat(9 << 20));
    let cases: Vec<(&str, &str, String, &str, u16, &str)> = vec![
        (
            "HTTP: no key",
            "/v1/chat/completions",
            r#"{"model":"smollm2","messages":[{"role":"user","content":"Hi"}]}"#.into(),
            "",
            401,
            "invalid_api_key",
        ),
        (
            "HTTP: invalid JSON",
            "/v1/chat/completions",
            "{\"model\": ".into(),
            &auth,
            400,
            "the request body is not valid",
        ),
        (
            "HTTP: temperature 3",
            "/v1/chat/completions",
            r#"{"model":"smollm2","temperature":3,"messages":[{"role":"user","content":"Hi"}]}"#.into(),
            &auth,
            400,
            "temperature",
        ),
        (
            "HTTP: an unknown role",
            "/v1/chat/completions",
            r#"{"model":"smollm2","messages":[{"role":"wizard","content":"Hi"}]}"#.into(),
            &auth,
            400,
            "unknown role `wizard`",
        ),
        ("HTTP: a body over 8 MiB", "/v1/completions", too_big, &auth, 413, "the request body is larger than 8 MiB"),
    ];
    let http_count = cases.len();
    for (name, path, body, headers, status, want) in cases {
        let response = common::http_request(&http, "POST", path, headers, Some(&body));
        let ok = response.starts_with(&format!("HTTP/1.1 {status}")) && response.contains(want);
        if !ok {
            wrong.push(format!(
                "{name}: got {}, want {status} with {want:?}",
                response.chars().take(400).collect::<String>()
            ));
        }
    }
    // The server is fine after all that.
    assert!(chat_error(&channel, chat_req(&hi, sp(|_| {})), k).await.is_none(), "a good chat after the bad ones");
    assert!(!up.stderr().contains("panicked"), "{}", up.stderr());
    assert!(wrong.is_empty(), "{} of {} cases went wrong:\n{}", wrong.len(), count + http_count, wrong.join("\n"));
}

// ---- hostile chat templates ----

/// A copy of the tiny llama fixture whose tokenizer_config.json carries `template`.
fn model_with_template(dir: &Path, name: &str, template: &str) -> PathBuf {
    let from = common::repo_root().join("fixtures/engine/llama");
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("tokenizer_config.json")).unwrap()).unwrap();
    config["chat_template"] = template.into();
    std::fs::write(to.join("tokenizer_config.json"), config.to_string()).unwrap();
    to
}

fn prompt_request(model: &str) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model_id: model.into(),
        input: Some(pb::generate_request::Input::Prompt("hello there".into())),
        sampling: Some(pb::SamplingParams { max_tokens: Some(4), ..Default::default() }),
        ..Default::default()
    }
}

/// Templates that stop an in-process renderer (minijinja 2.24 bounds none of these; see
/// docs/fuzzing.md) cost the chat that hits them an error: the worker renders a model's own
/// template in a child process with a memory limit and a deadline, started again for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_chat_template_costs_its_chat_an_error_and_the_worker_goes_on() {
    use common::worker::{RunningWorker, chat_request, collect};
    let dir = tempfile::tempdir().unwrap();
    let fixture =
        std::fs::read_to_string(common::repo_root().join("fixtures/engine/llama/tokenizer_config.json")).unwrap();
    let good: serde_json::Value = serde_json::from_str(&fixture).unwrap();
    let models = [
        ("good", good["chat_template"].as_str().unwrap().to_string()),
        ("hang", "{% set n = 1000000000000 %}{{ ([] * n) ~ '' }}".into()),
        ("hang-at-compile", "{{ ([] * 1000000000000) ~ '' }}".into()),
        (
            "memory",
            "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}".into(),
        ),
        ("stack", "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = [ns.l] %}{% endfor %}{{ ns.l }}".into()),
    ];
    let mut args: Vec<String> =
        ["--chat-template-timeout", "2", "--chat-template-memory", "256", "--threads", "1"].map(String::from).into();
    for (name, template) in &models {
        let path = model_with_template(dir.path(), name, template);
        args.extend(["--model".into(), format!("{name}={}", path.display())]);
    }
    let worker = RunningWorker::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut client = worker.client().await;

    let expected = [
        (
            "hang",
            Code::InvalidArgument,
            "chat template: the chat template did not finish within 2 s (a loop the step budget does not see?); its renderer was stopped",
        ),
        (
            "hang-at-compile",
            Code::FailedPrecondition,
            "model `hang-at-compile` has no usable chat template: chat template: the chat template did not finish within 2 s (a loop the step budget does not see?); its renderer was stopped",
        ),
        (
            "memory",
            Code::InvalidArgument,
            "chat template: the chat template asked for more memory than its renderer may use (256 MiB; signal 6); that render was stopped",
        ),
        (
            "stack",
            Code::InvalidArgument,
            "chat template: the chat template nested too deeply and overflowed its renderer's stack (signal 6); that render was stopped",
        ),
    ];
    let good_text = collect(&mut client, chat_request("good", "Hi", 6)).await.unwrap().text;
    assert!(!good_text.is_empty());
    for (model, code, message) in expected {
        // Twice: the second chat gets a fresh renderer and the same answer.
        for round in 0..2 {
            // The hostile render runs off the worker's async threads: the good model answers
            // while it is under way.
            let mut hostile_client = client.clone();
            let hostile = tokio::spawn(async move { collect(&mut hostile_client, chat_request(model, "Hi", 6)).await });
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let other = collect(&mut client, chat_request("good", "Hi", 6)).await.unwrap();
            assert_eq!(other.text, good_text, "{model} round {round}: the good model's chat");
            if model == "hang" {
                assert!(!hostile.is_finished(), "round {round}: the good chat waited for the hanging render");
            }
            let e = hostile.await.unwrap().unwrap_err();
            assert_eq!((e.code(), e.message()), (code, message), "{model} round {round}");
            // A plain prompt to the same model needs no template: it is served.
            let plain = collect(&mut client, prompt_request(model)).await.unwrap();
            assert_eq!(plain.tokens.len(), 4, "{model} round {round}");
        }
    }
    let status = common::worker::status(&mut client).await;
    assert_eq!(status.models.len(), 5);
    let log = worker.stderr();
    assert!(!log.contains("panicked"), "{log}");
}

/// A connection to `url` whose HTTP/2 windows hold about a kilobyte: a stream not read fills
/// them after a few dozen tokens.
async fn small_window(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .initial_stream_window_size(1024)
        .initial_connection_window_size(1024)
        .connect()
        .await
        .unwrap()
}

/// A client that stops reading its stream (its HTTP/2 window full) holds neither the
/// controller's relay nor the worker's generation slot past `--stall-timeout`: with one slot
/// and no queue, the next request would otherwise be refused for as long as the stalled client
/// stayed connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_gives_its_slot_back_after_the_stall_timeout() {
    let up = RunningController::up(&[
        "--threads",
        "1",
        "--context",
        "2048",
        "--name",
        "smollm2",
        "--max-running",
        "1",
        "--queue",
        "0",
        "--stall-timeout",
        "1",
    ]);
    let long = |max| pb::InferenceRequest {
        model: "smollm2".into(),
        prompt: "Count from one to one thousand.".into(),
        sampling: Some(pb::SamplingParams { max_tokens: Some(max), ignore_eos: true, ..Default::default() }),
        request_id: String::new(),
    };
    // A connection whose window holds about a kilobyte, never read after the first token.
    let mut stalled = pb::inference_client::InferenceClient::new(small_window(&up.url()).await);
    // 2,000 tokens: about 20 s of generating on one thread, were it read to the end.
    let mut held = stalled.generate(long(2000)).await.expect("the first request starts").into_inner();
    held.message().await.expect("a first event").expect("a token");

    // While it holds the only slot, another request is refused (no queue) ...
    let mut inference = up.inference().await;
    let started = std::time::Instant::now();
    let mut answered = None;
    while started.elapsed() < std::time::Duration::from_secs(15) {
        match inference.generate(long(8)).await {
            Ok(r) => {
                let mut stream = r.into_inner();
                let mut tokens = 0;
                let mut error = None;
                loop {
                    match stream.message().await {
                        Ok(Some(ev)) => {
                            tokens += usize::from(matches!(ev.event, Some(pb::generate_event::Event::Token(_))))
                        }
                        Ok(None) => break,
                        Err(e) => {
                            error = Some(e);
                            break;
                        }
                    }
                }
                match error {
                    None => {
                        answered = Some((tokens, started.elapsed()));
                        break;
                    }
                    Some(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
                }
            }
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // ... until the stalled one is cancelled: then the slot is free again.
    let (tokens, after) = answered.expect("the slot came back within 15 s");
    assert!(tokens >= 8, "{tokens} tokens");
    println!("slot given back {after:?} after the stalled client stopped reading");
    let log = up.stderr();
    assert!(log.contains("the client stopped reading its stream"), "{log}");
    drop(held);
}

/// The same against a worker called directly: its own bound cancels the generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_a_worker_that_stops_reading_gives_its_slot_back() {
    use common::worker::RunningWorker;
    let model = format!("smollm2={}", common::smollm2().display());
    let worker = RunningWorker::start(&[
        "--model",
        &model,
        "--context",
        "2048",
        "--threads",
        "1",
        "--max-running",
        "1",
        "--queue",
        "0",
        "--stall-timeout",
        "1",
    ]);
    let request = |max| pb::GenerateRequest {
        model_id: "smollm2".into(),
        input: Some(pb::generate_request::Input::Prompt("Count from one to one thousand.".into())),
        sampling: Some(pb::SamplingParams { max_tokens: Some(max), ignore_eos: true, ..Default::default() }),
        ..Default::default()
    };
    let mut held = pb::worker_client::WorkerClient::new(small_window(&worker.url()).await)
        .generate(request(2000))
        .await
        .unwrap()
        .into_inner();
    held.message().await.expect("a first event").expect("a token");
    let mut client = worker.client().await;
    let started = std::time::Instant::now();
    let tokens = loop {
        assert!(started.elapsed() < std::time::Duration::from_secs(15), "the slot did not come back within 15 s");
        match client.generate(request(8)).await {
            Ok(r) => {
                let mut stream = r.into_inner();
                let mut tokens = 0;
                while let Some(ev) = stream.message().await.expect("the second request runs to its end") {
                    tokens += usize::from(matches!(ev.event, Some(pb::generate_event::Event::Token(_))));
                }
                break tokens;
            }
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(tokens >= 8, "{tokens} tokens");
    let log = worker.stderr();
    assert!(
        log.contains("the client stopped reading its stream; generation cancelled and its slot given back"),
        "{log}"
    );
    drop(held);
}

/// A client that trickles a request's headers (slowloris) has its HTTP connection closed after
/// `--http-header-timeout`; other clients are served meanwhile.
#[test]
fn an_http_client_trickling_its_headers_is_cut_off() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("state.redb");
    let mut cmd = common::gantry();
    cmd.args(["controller", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--http-header-timeout", "1"])
        .args(["--store", store.to_str().unwrap()]);
    let control = RunningController::spawn(cmd, None);
    let http = control.http.clone().expect("an HTTP address");
    let mut slow = std::net::TcpStream::connect(&http).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: gantry\r\n").unwrap();
    slow.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let started = std::time::Instant::now();
    // Another client is served while the slow one holds its connection.
    assert!(common::http_get(&http, "/healthz").contains("ok"));
    let mut buf = [0u8; 256];
    let n = match slow.read(&mut buf) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
        Err(e) => panic!("the slow connection was still open after 10 s ({e})"),
    };
    let took = started.elapsed();
    // Closed without an answer (hyper may write a 408 first).
    let reply = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(n == 0 || reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(took < std::time::Duration::from_secs(5), "closed after {took:?}");
}

/// The longest `grpc-timeout` a header can carry (99,999,999 hours) is a deadline like any
/// other, through the controller to the worker; one it cannot parse is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_longest_grpc_timeout_is_served_like_any_other() {
    let up = RunningController::up(&["--threads", "1", "--context", "256", "--name", "smollm2"]);
    let mut inference = up.inference().await;
    for timeout in ["99999999H", "99999999n", "1X", "H"] {
        let mut req = tonic::Request::new(chat_req(&[("user", "Hi")], sp(|p| p.max_tokens = Some(4))));
        req.metadata_mut().insert("grpc-timeout", timeout.parse().unwrap());
        let result = async {
            let mut stream = inference.chat(req).await?.into_inner();
            let mut tokens = 0;
            while let Some(ev) = stream.message().await? {
                tokens += usize::from(matches!(ev.event, Some(pb::generate_event::Event::Token(_))));
            }
            Ok::<_, tonic::Status>(tokens)
        }
        .await;
        match timeout {
            // 99,999,999 ns is 0.1 s: enough for 4 tokens here, or a clean DEADLINE_EXCEEDED.
            "99999999n" => assert!(
                result.as_ref().is_ok_and(|&t| t > 0)
                    || result.as_ref().is_err_and(|e| e.code() == Code::DeadlineExceeded),
                "{timeout}: {result:?}"
            ),
            _ => assert!(result.as_ref().is_ok_and(|&t| t > 0), "{timeout}: {result:?}"),
        }
    }
    assert!(!up.stderr().contains("panicked"), "{}", up.stderr());
}
