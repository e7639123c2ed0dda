//! Many concurrent streams through one controller: a real `gantry controller` process (its
//! memory and CPU read from `/proc`), four stand-in workers in this process
//! (`tests/e2e/common/standin.rs`: the real worker protocols, a deterministic engine, one token
//! every `--interval-ms`), and clients over 10 connections. For each level of concurrency:
//! wall time, errors, wrong streams, time to first token and gaps between tokens as clients
//! see them, the controller's peak resident memory and CPU time, and how fast the request past
//! `--max-requests` is refused.
//!
//!     cargo build --release -p gantry-cli
//!     cargo run --release -p gantry-controller --example load_bench -- --levels 100,1000,5000
//!
//! With `--real MODEL.gguf` the replica is a real `gantry worker` process serving that model
//! (`--parallel 8 --queue 24`, declared 1×24 GiB) instead of the stand-ins, and the level is
//! 32 chats; the request past the bound is the 33rd chat, refused by the worker's full queue.

#![allow(clippy::unwrap_used)] // a benchmark: any failure is fatal

#[path = "../tests/e2e/common/standin.rs"]
mod standin;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gantry_proto::v1 as pb;
use pb::inference_client::InferenceClient;
use standin::{Engine, StandIn, reply};
use tonic::transport::Channel;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.into())
}

/// (resident KiB, peak resident KiB, CPU seconds) of a process.
fn usage(pid: u32) -> (u64, u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and 13th.
    let rest: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = rest[11].parse::<f64>().unwrap() + rest[12].parse::<f64>().unwrap();
    (field("VmRSS:"), field("VmHWM:"), ticks / 100.0)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[derive(Default)]
struct Outcome {
    ok: usize,
    errors: Vec<String>,
    wrong: usize,
    ttft_ms: Vec<f64>,
    gap_ms: Vec<f64>,
}

async fn one(
    channel: Channel,
    prompt: String,
    tokens: u32,
    started: Arc<AtomicUsize>,
) -> Result<(Vec<u32>, f64, Vec<f64>), tonic::Status> {
    let asked = Instant::now();
    let req = pb::InferenceRequest {
        model: "load".into(),
        prompt,
        sampling: Some(pb::SamplingParams { max_tokens: Some(tokens), ignore_eos: true, ..Default::default() }),
        request_id: String::new(),
    };
    let mut stream = InferenceClient::new(channel).generate(req).await?.into_inner();
    let (mut got, mut ttft, mut gaps, mut last) = (Vec::new(), 0.0, Vec::new(), None::<Instant>);
    while let Some(ev) = stream.message().await? {
        if let Some(pb::generate_event::Event::Token(t)) = ev.event {
            let now = Instant::now();
            match last {
                None => {
                    ttft = (now - asked).as_secs_f64() * 1e3;
                    started.fetch_add(1, Ordering::Relaxed);
                }
                Some(l) => gaps.push((now - l).as_secs_f64() * 1e3),
            }
            last = Some(now);
            got.extend(t.token_id);
        }
    }
    Ok((got, ttft, gaps))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let gantry = arg(&args, "--gantry", "target/release/gantry");
    let levels: Vec<usize> = arg(&args, "--levels", "100,1000,5000").split(',').map(|v| v.parse().unwrap()).collect();
    let tokens: u32 = arg(&args, "--tokens", "32").parse().unwrap();
    let interval = Duration::from_millis(arg(&args, "--interval-ms", "50").parse().unwrap());
    let real = args.iter().position(|a| a == "--real").and_then(|i| args.get(i + 1)).cloned();
    let levels = if real.is_some() { vec![32] } else { levels };
    let max_requests = *levels.iter().max().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(&gantry)
        .args(["controller", "--listen", "127.0.0.1:0", "--http", "off", "--max-requests", &max_requests.to_string()])
        .env("GANTRY_STORE", dir.path().join("state.redb"))
        .env("GANTRY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{gantry}: {e} (cargo build --release -p gantry-cli first)"));
    let pid = child.id();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("the controller prints its address").unwrap();
        if let Some(rest) = line.strip_prefix("gantry controller listening on ") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let url = format!("http://{addr}");
    let engine = Engine { interval, ..Engine::default() };
    let mut standins = Vec::new();
    let mut worker = None;
    let replicas = match &real {
        None => {
            for i in 0..4 {
                standins.push(StandIn::start(&url, &format!("s{i}"), engine).await);
            }
            4
        }
        Some(_) => {
            let w = Command::new(&gantry)
                .args(["worker", "--listen", "127.0.0.1:0", "--controller", &url, "--worker-id", "w1"])
                .args(["--gpus", "1x24GiB", "--parallel", "8", "--queue", "24"])
                .env("GANTRY_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            worker = Some(w);
            1
        }
    };
    let mut deployments = pb::deployments_client::DeploymentsClient::connect(url.clone()).await.unwrap();
    let spec = pb::DeploymentSpec {
        source: real.clone().unwrap_or_else(|| "HuggingFaceTB/SmolLM2-135M-Instruct".into()),
        replicas,
        placement: Some(pb::PlacementPolicy { strategy: pb::PlacementStrategy::Spread as i32, ..Default::default() }),
        ..Default::default()
    };
    deployments.apply(pb::ApplyRequest { name: "load".into(), spec: Some(spec) }).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let d = deployments.get(pb::GetDeploymentRequest { name: "load".into() }).await.unwrap().into_inner();
        if d.status.is_some_and(|s| s.ready_replicas == replicas) {
            break;
        }
        assert!(Instant::now() < deadline, "the stand-in replicas did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(Channel::from_shared(url.clone()).unwrap().connect().await.unwrap());
    }
    let (idle_kib, _, _) = usage(pid);
    match &real {
        None => println!(
            "controller idle: {idle_kib} KiB resident; 4 stand-in workers, {tokens} tokens per stream, one every {} ms",
            interval.as_millis()
        ),
        Some(m) => {
            println!("controller idle: {idle_kib} KiB resident; one real worker serving {m}, {tokens} tokens per chat")
        }
    }
    println!(
        "| streams | wall s | ok | errors | wrong | TTFT p50 / p99 ms | gap p50 / p99 ms | peak RSS MiB | KiB per stream | controller CPU s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (round, &n) in levels.iter().enumerate() {
        let (_, _, cpu_before) = usage(pid);
        let started = Arc::new(AtomicUsize::new(0));
        let begun = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let prompt = match real {
                    Some(_) => format!("Count from {i} to {}.", i + 50),
                    None => format!("round {round} stream {i}"),
                };
                let (channel, started) = (channels[i % channels.len()].clone(), started.clone());
                tokio::spawn(async move { (prompt.clone(), one(channel, prompt, tokens, started).await) })
            })
            .collect();
        let mut refused_ms = None;
        if n == max_requests {
            // Once all are in, the one past the bound (a real worker starts 8 at once and
            // queues the rest: they are in once the calls are accepted).
            if real.is_some() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            while real.is_none() && started.load(Ordering::Relaxed) < n && begun.elapsed() < Duration::from_secs(60) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let asked = Instant::now();
            let e = one(channels[0].clone(), "past the bound".into(), 4, Arc::default()).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
            refused_ms = Some(asked.elapsed().as_secs_f64() * 1e3);
        }
        let mut out = Outcome::default();
        for t in tasks {
            let (prompt, r) = t.await.unwrap();
            match r {
                Ok((got, ttft, gaps)) => {
                    let right = if real.is_some() { !got.is_empty() } else { got == reply(&prompt, tokens) };
                    if right {
                        out.ok += 1;
                    } else {
                        out.wrong += 1;
                    }
                    out.ttft_ms.push(ttft);
                    out.gap_ms.extend(gaps);
                }
                Err(e) => out.errors.push(format!("{}: {}", e.code(), e.message())),
            }
        }
        let wall = begun.elapsed().as_secs_f64();
        let (_, peak_kib, cpu_after) = usage(pid);
        let per_stream = peak_kib.saturating_sub(idle_kib) as f64 / n as f64;
        let (t50, t99) = (percentile(&mut out.ttft_ms, 0.5), percentile(&mut out.ttft_ms, 0.99));
        let (g50, g99) = (percentile(&mut out.gap_ms, 0.5), percentile(&mut out.gap_ms, 0.99));
        println!(
            "| {n} | {wall:.2} | {} | {} | {} | {t50:.1} / {t99:.1} | {g50:.1} / {g99:.1} | {:.1} | {per_stream:.1} | {:.2} |",
            out.ok,
            out.errors.len(),
            out.wrong,
            peak_kib as f64 / 1024.0,
            cpu_after - cpu_before
        );
        if let Some(ms) = refused_ms {
            println!("the request past --max-requests {max_requests}: RESOURCE_EXHAUSTED after {ms:.2} ms");
        }
        for e in out.errors.iter().take(3) {
            println!("  error: {e}");
        }
        rows.push(serde_json::json!({
            "streams": n, "wall_s": wall, "ok": out.ok, "errors": out.errors.len(), "wrong": out.wrong,
            "ttft_ms_p50": t50, "ttft_ms_p99": t99, "gap_ms_p50": g50, "gap_ms_p99": g99,
            "peak_rss_kib": peak_kib, "kib_per_stream": per_stream, "controller_cpu_s": cpu_after - cpu_before,
            "refused_past_bound_ms": refused_ms,
        }));
    }
    for c in worker.iter_mut().chain([&mut child]) {
        let _ = c.kill();
        let _ = c.wait();
    }
    println!(
        "{}",
        serde_json::json!({"idle_rss_kib": idle_kib, "tokens": tokens, "interval_ms": interval.as_millis() as u64, "levels": rows})
    );
}
