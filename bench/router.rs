//! What the controller's router adds to a token stream: time to first token and latency per
//! token, through the controller against calling the worker directly, in the same run.
//!
//! A stand-in worker (`tests/e2e/common/standin.rs`: in this process, on its own loopback port,
//! registered over the real `WorkerLink`) answers `Generate` with N tokens, one every
//! `--interval-us`, each carrying the moment it was sent; the client reads the moment each arrives. Both clocks are this
//! process's, so the difference is the one-way latency of that token. The controller is the
//! real one (embedded store in a temporary folder), routing over loopback TCP as in
//! production.
//!
//!     cargo run --release -p gantry-controller --example router_bench -- --requests 200 --tokens 64

#![allow(clippy::unwrap_used)] // a benchmark: any failure is fatal

#[path = "../tests/e2e/common/standin.rs"]
mod standin;

use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_controller::ControllerConfig;
use gantry_controller::server::Controller;
use gantry_controller::statestore::embedded::EmbeddedStore;
use gantry_proto::v1 as pb;
use pb::inference_client::InferenceClient;
use pb::worker_client::WorkerClient;
use standin::{Engine, StandIn, now_ns};

#[derive(Default)]
struct Sample {
    ttft_us: Vec<f64>,
    token_us: Vec<f64>,
}

/// Reads one stream: time to first token (from the call), and each token's one-way latency.
async fn read(stream: &mut tonic::Streaming<pb::GenerateEvent>, started: Instant, s: &mut Sample) {
    let mut first = true;
    while let Some(ev) = stream.message().await.expect("stream") {
        if let Some(pb::generate_event::Event::Token(t)) = ev.event {
            let arrived = now_ns();
            if first {
                s.ttft_us.push(started.elapsed().as_secs_f64() * 1e6);
                first = false;
            }
            let sent: u64 = t.text.parse().expect("a send time");
            s.token_us.push(arrived.saturating_sub(sent) as f64 / 1e3);
        }
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let requests = arg(&args, "--requests", 200) as usize;
    let tokens = arg(&args, "--tokens", 64) as u32;
    let interval = Duration::from_micros(arg(&args, "--interval-us", 500));
    // The real controller.
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
    let controller = Controller::start(store, ControllerConfig::default(), "bench").await.unwrap();
    let cluster = controller.cluster.clone();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    tokio::spawn(controller.serve(grpc, None, std::future::pending()));
    // The stand-in worker: each token's text is the moment it was sent.
    let engine = Engine { interval, stamp: true, ..Engine::default() };
    let worker = StandIn::start(&format!("http://{grpc_addr}"), "bench", engine).await;
    let worker_addr = worker.addr;

    // A deployment the stand-in "loads": the real SmolLM2 file when fetched, else a catalog id.
    let source = ["models/SmolLM2-135M-Instruct.Q4_1.gguf"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .unwrap_or("HuggingFaceTB/SmolLM2-135M-Instruct")
        .to_string();
    let spec = gantry_controller::spec::DeploymentSpec {
        source,
        dtype: String::new(),
        context_length: 2048,
        replicas: 1,
        ..Default::default()
    };
    cluster.apply("bench", spec).await.expect("apply");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.get("bench").unwrap().status.unwrap().ready_replicas < 1 {
        assert!(Instant::now() < deadline, "the stand-in replica did not become ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut direct = WorkerClient::connect(format!("http://{worker_addr}")).await.unwrap();
    let mut routed = InferenceClient::connect(format!("http://{grpc_addr}")).await.unwrap();
    let sampling = Some(pb::SamplingParams { max_tokens: Some(tokens), ..Default::default() });
    let (mut d, mut r) = (Sample::default(), Sample::default());
    // Warm both paths, then alternate so noise hits both alike.
    for i in 0..requests + 10 {
        let started = Instant::now();
        let req = pb::GenerateRequest {
            model_id: "bench/0".into(),
            input: Some(pb::generate_request::Input::Prompt("x".into())),
            sampling: sampling.clone(),
            ..Default::default()
        };
        let mut s = direct.generate(req).await.unwrap().into_inner();
        let mut sample = Sample::default();
        read(&mut s, started, &mut sample).await;
        if i >= 10 {
            d.ttft_us.extend(sample.ttft_us);
            d.token_us.extend(sample.token_us);
        }
        let started = Instant::now();
        let req = pb::InferenceRequest {
            model: "bench".into(),
            prompt: "x".into(),
            sampling: sampling.clone(),
            ..Default::default()
        };
        let mut s = routed.generate(req).await.unwrap().into_inner();
        let mut sample = Sample::default();
        read(&mut s, started, &mut sample).await;
        if i >= 10 {
            r.ttft_us.extend(sample.ttft_us);
            r.token_us.extend(sample.token_us);
        }
    }
    let row = |name: &str, s: &mut Sample| {
        let (t50, t99) = (percentile(&mut s.ttft_us, 0.5), percentile(&mut s.ttft_us, 0.99));
        let (k50, k99) = (percentile(&mut s.token_us, 0.5), percentile(&mut s.token_us, 0.99));
        println!(
            "{name:<18} ttft p50 {t50:>8.1} µs  p99 {t99:>8.1} µs   token latency p50 {k50:>7.1} µs  p99 {k99:>7.1} µs"
        );
        (t50, t99, k50, k99)
    };
    println!("{requests} requests × {tokens} tokens, one token every {} µs, loopback TCP", interval.as_micros());
    let dd = row("worker directly", &mut d);
    let rr = row("through controller", &mut r);
    println!(
        "added by the controller: first token {:+.1} µs (p50), per token {:+.1} µs (p50), {:+.1} µs (p99)",
        rr.0 - dd.0,
        rr.2 - dd.2,
        rr.3 - dd.3
    );
    let json = serde_json::json!({
        "requests": requests, "tokens": tokens, "interval_us": interval.as_micros() as u64,
        "direct": {"ttft_p50_us": dd.0, "ttft_p99_us": dd.1, "token_p50_us": dd.2, "token_p99_us": dd.3},
        "controller": {"ttft_p50_us": rr.0, "ttft_p99_us": rr.1, "token_p50_us": rr.2, "token_p99_us": rr.3},
        "added": {"ttft_p50_us": rr.0 - dd.0, "token_p50_us": rr.2 - dd.2, "token_p99_us": rr.3 - dd.3},
    });
    println!("{json}");
}
