//! Faults with real processes and the real SmolLM2: a request resumed after the tokens it
//! already delivered gives the text an unbroken run gives; twenty streams survive a worker
//! killed under them; a stream with no replica left ends with the reason after its tokens; a
//! worker that comes back after being declared lost is told what to drop, and the memory
//! accounting stays exact; with etcd gone the controller keeps serving, refuses changes, and
//! catches up when etcd returns.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

#[allow(unused_imports)]
use common::controller::{RunningController, placements, ready, spec, status, wait_for, wait_for_workers};
use common::worker::{RunningWorker, Streamed, chat_request, collect};
use gantry_proto::v1 as pb;
use pb::PlacementStrategy::Binpack;

const MODEL: &str = "smollm2";
const LOAD: Duration = Duration::from_secs(120);

fn sampling(max_tokens: u32, seeded: bool) -> pb::SamplingParams {
    if seeded {
        pb::SamplingParams {
            max_tokens: Some(max_tokens),
            temperature: Some(0.9),
            top_p: Some(0.95),
            repetition_penalty: Some(1.1),
            seed: Some(7),
            ..Default::default()
        }
    } else {
        pb::SamplingParams { max_tokens: Some(max_tokens), ..Default::default() }
    }
}

/// Tokens the first run delivered, then the resumed run's events: together they must be the
/// unbroken run, text and usage included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_request_goes_on_exactly_where_the_first_run_stopped() {
    let model = format!("{MODEL}={}", common::smollm2().display());
    let worker = RunningWorker::start(&["--model", &model, "--threads", "2"]);
    let mut client = worker.client().await;
    let prompt = "Write three sentences about the sea.";
    for seeded in [false, true] {
        let mut whole_req = chat_request(MODEL, prompt, 40);
        whole_req.sampling = Some(sampling(40, seeded));
        let whole = collect(&mut client, whole_req.clone()).await.unwrap();
        assert_eq!(whole.tokens.len(), 40, "{whole:?}");
        for cut in [1, 9, 23, 39, 40] {
            let mut req = whole_req.clone();
            req.resume_tokens = whole.tokens[..cut].to_vec();
            let rest: Streamed = collect(&mut client, req).await.unwrap();
            assert_eq!(rest.tokens, whole.tokens[cut..], "seeded {seeded}, resumed after {cut}");
            assert!(whole.text.ends_with(&rest.text), "the resumed text is the whole's tail: {rest:?}");
            let done = rest.done.unwrap();
            assert_eq!(done.usage, whole.done.as_ref().unwrap().usage, "usage counts the resumed tokens");
            assert_eq!(done.finish_reason, pb::FinishReason::Length as i32);
        }
    }

    // A stop string split by the cut: the resumed run still stops at it and never sends it.
    let mut stop_req = chat_request(MODEL, prompt, 60);
    stop_req.sampling = Some(pb::SamplingParams { max_tokens: Some(60), ..Default::default() });
    let whole = collect(&mut client, stop_req.clone()).await.unwrap();
    let word = whole.text.split_whitespace().nth(5).unwrap().to_string();
    stop_req.sampling.as_mut().unwrap().stop = vec![word.clone()];
    let stopped = collect(&mut client, stop_req.clone()).await.unwrap();
    assert_eq!(stopped.done.as_ref().unwrap().finish_reason, pb::FinishReason::StopString as i32);
    let n = stopped.tokens.len();
    for cut in 1..n {
        let mut req = stop_req.clone();
        req.resume_tokens = stopped.tokens[..cut].to_vec();
        let rest = collect(&mut client, req).await.unwrap();
        assert_eq!(rest.tokens, stopped.tokens[cut..], "resumed after {cut}");
        assert!(!rest.text.contains(&word), "{rest:?}");
        assert_eq!(rest.done.unwrap().finish_reason, pb::FinishReason::StopString as i32);
    }

    // Resume lists that cannot be: a token past the vocabulary, more tokens than max_tokens.
    let mut bad = chat_request(MODEL, prompt, 8);
    bad.resume_tokens = vec![1, 2, 99_999_999];
    let e = collect(&mut client, bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("resume token 99999999 is not in the vocabulary of `smollm2` (49152 tokens)"),
        "{e:?}"
    );
    let mut bad = chat_request(MODEL, prompt, 8);
    bad.resume_tokens = vec![1; 9];
    let e = collect(&mut client, bad).await.unwrap_err();
    assert!(e.message().contains("9 tokens to resume after, but the request can generate at most 8"), "{e:?}");
}

/// A chat through the controller, counting tokens into `seen` as they arrive: the text, the
/// token ids and the final usage, or the error with the tokens delivered before it.
async fn stream_chat(
    channel: tonic::transport::Channel,
    prompt: String,
    seeded: bool,
    max_tokens: u32,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> (String, Vec<u32>, Result<pb::Usage, tonic::Status>) {
    let mut client = pb::inference_client::InferenceClient::new(channel);
    let req = pb::ChatRequest {
        model: "chat".into(),
        messages: vec![pb::ChatMessage { role: "user".into(), content: prompt }],
        sampling: Some(sampling(max_tokens, seeded)),
        request_id: String::new(),
    };
    let (mut text, mut tokens) = (String::new(), Vec::new());
    let mut stream = match client.chat(req).await {
        Ok(s) => s.into_inner(),
        Err(e) => return (text, tokens, Err(e)),
    };
    loop {
        match stream.message().await {
            Ok(Some(ev)) => match ev.event {
                Some(pb::generate_event::Event::Token(t)) => {
                    text.push_str(&t.text);
                    if let Some(id) = t.token_id {
                        tokens.push(id);
                        seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                Some(pb::generate_event::Event::Done(d)) => return (text, tokens, Ok(d.usage.unwrap_or_default())),
                None => {}
            },
            Ok(None) => return (text, tokens, Err(tonic::Status::internal("the stream ended without `done`"))),
            Err(e) => return (text, tokens, Err(e)),
        }
    }
}

const PROMPTS: [&str; 5] = [
    "Write three sentences about the sea.",
    "List four fruits and their colors.",
    "Explain what a compiler does.",
    "Describe a sunrise in the mountains.",
    "Give two tips for learning to cook.",
];

/// Twenty streams at once, half greedy and half seeded; `kill` runs once `after` tokens have
/// arrived in all. Returns each stream's outcome, in order.
async fn twenty_streams(
    channel: &tonic::transport::Channel,
    after: usize,
    kill: impl FnOnce(),
) -> Vec<(String, Vec<u32>, Result<pb::Usage, tonic::Status>)> {
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let prompt = format!("{} (#{i})", PROMPTS[i % PROMPTS.len()]);
            tokio::spawn(stream_chat(channel.clone(), prompt, i % 2 == 1, 32, seen.clone()))
        })
        .collect();
    let mut kill = Some(kill);
    while tasks.iter().any(|t| !t.is_finished()) {
        if seen.load(std::sync::atomic::Ordering::Relaxed) >= after
            && let Some(k) = kill.take()
        {
            k();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(kill.is_none(), "the streams ended before {after} tokens arrived");
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Two replicas on two workers; twenty streams run once unbroken, then again with one worker
/// SIGKILLed under them: every stream completes with the unbroken run's text, tokens and
/// usage, and the controller's metric and log record the moves. Then the last worker dies
/// under a stream: the client gets its tokens, then UNAVAILABLE with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_streams_survive_a_killed_worker_with_the_unbroken_text() {
    let mut cmd = common::gantry();
    cmd.args(["controller", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--lease", "2"]);
    let control = RunningController::spawn(cmd, None);
    let http = control.http.clone().unwrap();
    let worker = |id: &str| {
        RunningWorker::start(&[
            "--controller",
            &control.url(),
            "--worker-id",
            id,
            "--gpus",
            "1x24GiB",
            "--threads",
            "1",
        ])
    };
    let mut w1 = worker("w1");
    let mut w2 = worker("w2");
    let mut deployments = control.deployments().await;
    let mut s = spec(common::smollm2().to_str().unwrap(), 2, pb::PlacementStrategy::Spread);
    s.context_length = 2048;
    deployments.apply(pb::ApplyRequest { name: "chat".into(), spec: Some(s) }).await.unwrap();
    let d = wait_for(&mut deployments, "chat", LOAD, "2 replicas ready", ready).await;
    let mut on = placements(&d);
    on.sort();
    assert_eq!(on, ["w1/gpu:0", "w2/gpu:0"]);

    let channel = control.channel().await;
    let unbroken = twenty_streams(&channel, 0, || {}).await;
    for (i, (_, tokens, usage)) in unbroken.iter().enumerate() {
        let usage = usage.as_ref().unwrap_or_else(|e| panic!("stream {i}: {e:?}"));
        assert_eq!(usage.completion_tokens as usize, tokens.len(), "stream {i}");
    }

    let broken = twenty_streams(&channel, 80, || w1.kill()).await;
    for (i, (got, want)) in broken.iter().zip(&unbroken).enumerate() {
        let usage = got.2.as_ref().unwrap_or_else(|e| panic!("stream {i} failed: {e:?}"));
        assert_eq!(got.1, want.1, "stream {i}: the tokens");
        assert_eq!(got.0, want.0, "stream {i}: the text");
        assert_eq!(Some(usage), want.2.as_ref().ok(), "stream {i}: the usage");
    }
    let metrics = common::http_get(&http, "/metrics");
    let moved = metric(&metrics, "gantry_request_migrations_total{model=\"chat\",outcome=\"resumed\"}");
    assert!(moved >= 1.0, "{metrics}");
    let logged = control.stderr().lines().filter(|l| l.contains("resumed on another")).count();
    assert_eq!(logged as f64, moved, "one log line per move:\n{}", control.stderr());
    assert!(control.stderr().contains("from_worker=w1") && control.stderr().contains("to_worker=w2"));

    // The last replica dies under a stream: the tokens so far, then the reason.
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let task = tokio::spawn(stream_chat(channel.clone(), PROMPTS[0].into(), false, 200, seen.clone()));
    while seen.load(std::sync::atomic::Ordering::Relaxed) < 5 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    w2.kill();
    let (_, tokens, result) = task.await.unwrap();
    let e = result.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(tokens.len() >= 5, "the tokens before the failure were delivered: {tokens:?}");
    let m = e.message();
    // w1's replica was placed again on w2 meanwhile: both are gone with it.
    assert!(m.starts_with("worker w2 serving replica chat/"), "{m}");
    assert!(m.contains(&format!("failed after {} tokens", tokens.len())), "{m}");
    assert!(m.contains("no other replica could go on with the request"), "{m}");
    let metrics = common::http_get(&http, "/metrics");
    assert_eq!(metric(&metrics, "gantry_request_migrations_total{model=\"chat\",outcome=\"failed\"}"), 1.0);
}
