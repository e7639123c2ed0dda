//! Load through one controller: a thousand concurrent streams to stand-in workers (a
//! deterministic engine behind the real worker protocols, see `common/standin.rs`) complete
//! with the right tokens and bounded controller memory, and the request past the controller's
//! bound is refused at once; against the real SmolLM2, 32 concurrent chats complete and the
//! chat past the worker's queue is refused at once.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::controller::{RunningController, ready, spec, wait_for, wait_for_workers};
use crate::common::standin::{Engine, StandIn, reply};
use crate::common::worker::RunningWorker;
use gantry_proto::v1 as pb;
use pb::inference_client::InferenceClient;
use tonic::transport::Channel;

/// A process's memory from `/proc/PID/status`: (resident now, peak resident), in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// One generation through the controller: the token ids, or the error.
async fn generate(
    channel: Channel,
    model: &str,
    prompt: String,
    max_tokens: u32,
    started: Arc<AtomicUsize>,
) -> Result<Vec<u32>, tonic::Status> {
    let mut client = InferenceClient::new(channel);
    let req = pb::InferenceRequest {
        model: model.into(),
        prompt,
        sampling: Some(pb::SamplingParams { max_tokens: Some(max_tokens), ..Default::default() }),
        request_id: String::new(),
    };
    let mut stream = client.generate(req).await?.into_inner();
    let mut tokens = Vec::new();
    let mut first = true;
    while let Some(ev) = stream.message().await? {
        if let Some(pb::generate_event::Event::Token(t)) = ev.event {
            if first {
                started.fetch_add(1, Ordering::Relaxed);
                first = false;
            }
            tokens.extend(t.token_id);
        }
    }
    Ok(tokens)
}

/// 1,000 streams at once, over 10 connections; returns when every one of them has its first
/// token (then `while_running` runs) and all have ended.
async fn wave(
    channels: &[Channel],
    wave: usize,
    while_running: impl std::future::Future<Output = ()>,
) -> Vec<(String, Result<Vec<u32>, tonic::Status>)> {
    let started = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let prompt = format!("wave {wave} stream {i}");
            let channel = channels[i % channels.len()].clone();
            let p = prompt.clone();
            let started = started.clone();
            tokio::spawn(async move { (p.clone(), generate(channel, "load", p, 40, started).await) })
        })
        .collect();
    let begun = Instant::now();
    while started.load(Ordering::Relaxed) < 1000 {
        assert!(begun.elapsed() < Duration::from_secs(60), "only {} streams started", started.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while_running.await;
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_through_one_controller_to_standin_workers() {
    let control = RunningController::start(&["--max-requests", "1000"]);
    let engine = Engine { interval: Duration::from_millis(50), ..Engine::default() };
    let mut standins = Vec::new();
    for i in 0..4 {
        standins.push(StandIn::start(&control.url(), &format!("s{i}"), engine).await);
    }
    wait_for_workers(&mut control.cluster().await, 4).await;
    let mut deployments = control.deployments().await;
    let s = spec("HuggingFaceTB/SmolLM2-135M-Instruct", 4, pb::PlacementStrategy::Spread);
    deployments.apply(pb::ApplyRequest { name: "load".into(), spec: Some(s) }).await.unwrap();
    wait_for(&mut deployments, "load", Duration::from_secs(30), "4 replicas", ready).await;

    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(control.channel().await);
    }
    let (idle, _) = memory_kib(control.pid());
    let mut peaks = Vec::new();
    for w in 0..4 {
        let probe = channels[0].clone();
        let results = wave(&channels, w, async move {
            // The 1,001st request while 1,000 are relayed: refused at once.
            let asked = Instant::now();
            let e = generate(probe, "load", "one too many".into(), 4, Arc::default()).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
            assert!(
                e.message().contains("the controller is relaying 1000 requests, its limit (--max-requests)"),
                "{e:?}"
            );
            assert!(asked.elapsed() < Duration::from_secs(2), "refused after {:?}", asked.elapsed());
        })
        .await;
        for (prompt, got) in &results {
            let tokens = got.as_ref().unwrap_or_else(|e| panic!("{prompt}: {e:?}"));
            assert_eq!(*tokens, reply(prompt, 40), "{prompt}");
        }
        peaks.push(memory_kib(control.pid()).1);
    }
    let served: Vec<u64> = standins.iter().map(|s| s.served.load(Ordering::Relaxed)).collect();
    assert_eq!(served.iter().sum::<u64>(), 4000, "{served:?}");
    assert!(served.iter().all(|&n| n >= 500), "every replica takes a share: {served:?}");
    // Bounded: a thousand streams cost the controller under 64 KiB each at the peak, and
    // later waves settle near the first one's peak (seen: up to +20% by the second wave, then
    // flat to the eighth — allocator fragmentation, not memory kept per request; a leak of
    // 5 KiB per request would add 40% by the fourth wave).
    let per_stream = (peaks[0] - idle) / 1000;
    eprintln!("controller memory: idle {idle} KiB, peak after each wave {peaks:?} KiB: {per_stream} KiB per stream");
    assert!(per_stream < 64, "{per_stream} KiB per stream (idle {idle} KiB, peak {} KiB)", peaks[0]);
    assert!(peaks[3] <= peaks[0] * 13 / 10, "later waves raised the peak: {peaks:?} KiB");
}

/// 32 chats at once with the real model complete; with the worker's slots and queue full, the
/// next chat is refused at once with RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_real_chats_complete_and_the_next_is_refused_at_once() {
    let control = RunningController::start(&[]);
    let _worker = RunningWorker::join(&control.url(), "w1", &["--max-running", "8", "--queue", "24"]);
    let mut deployments = control.deployments().await;
    let s = spec(common::smollm2().to_str().unwrap(), 1, pb::PlacementStrategy::Binpack);
    deployments.apply(pb::ApplyRequest { name: "chat".into(), spec: Some(s) }).await.unwrap();
    wait_for(&mut deployments, "chat", Duration::from_secs(120), "ready", ready).await;
    let channel = control.channel().await;
    let started = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let channel = channel.clone();
            let started = started.clone();
            tokio::spawn(async move {
                let mut client = InferenceClient::new(channel);
                let req = pb::ChatRequest {
                    model: "chat".into(),
                    messages: vec![pb::ChatMessage {
                        role: "user".into(),
                        content: format!("Count from {i} to {}.", i + 5),
                    }],
                    sampling: Some(pb::SamplingParams { max_tokens: Some(24), ..Default::default() }),
                    request_id: String::new(),
                };
                let mut stream = client.chat(req).await?.into_inner();
                started.fetch_add(1, Ordering::Relaxed);
                let (mut text, mut usage) = (String::new(), None);
                while let Some(ev) = stream.message().await? {
                    match ev.event {
                        Some(pb::generate_event::Event::Token(t)) => text.push_str(&t.text),
                        Some(pb::generate_event::Event::Done(d)) => usage = d.usage,
                        None => {}
                    }
                }
                Ok::<_, tonic::Status>((text, usage))
            })
        })
        .collect();
    // All 32 accepted (8 running, 24 queued): one more is refused at once.
    let begun = Instant::now();
    while started.load(Ordering::Relaxed) < 32 {
        assert!(begun.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let asked = Instant::now();
    let e = common::controller::chat(&mut InferenceClient::new(channel.clone()), "chat", "Hi", 4).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("the worker's queue is full: 24 requests waiting, 8 running"), "{e:?}");
    assert!(asked.elapsed() < Duration::from_secs(2), "refused after {:?}", asked.elapsed());
    for (i, t) in tasks.into_iter().enumerate() {
        let (text, usage) = t.await.unwrap().unwrap_or_else(|e| panic!("chat {i}: {e:?}"));
        let usage = usage.unwrap_or_else(|| panic!("chat {i} ended without usage"));
        assert!(!text.trim().is_empty() && usage.completion_tokens > 0, "chat {i}: {text:?}");
    }
}
