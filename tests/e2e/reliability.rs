//! Faults with real processes and the real SmolLM2: a request resumed after the tokens it
//! already delivered gives the text an unbroken run gives; twenty streams survive a worker
//! killed under them; a stream with no replica left ends with the reason after its tokens; a
//! worker that comes back after being declared lost is told what to drop, and the memory
//! accounting stays exact; with etcd gone the controller keeps serving, refuses changes, and
//! catches up when etcd returns.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use crate::common::controller::{RunningController, placements, ready, spec, status, wait_for, wait_for_workers};
use crate::common::worker::{RunningWorker, Streamed, chat_request, collect};
use gantry_proto::v1 as pb;

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

/// A `prefill_only` request on a fresh worker generates nothing and leaves the prompt and the
/// resumed tokens in its prefix cache: a request resumed there after them finds their blocks
/// and goes on with the unbroken run's tokens. Bad resume lists are refused as for `Generate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_only_request_fills_the_prefix_cache_that_a_resume_then_finds() {
    let model = format!("{MODEL}={}", common::smollm2().display());
    let prompt = "Write three sentences about the sea.";
    let request = || {
        let mut req = chat_request(MODEL, prompt, 80);
        req.sampling = Some(pb::SamplingParams { max_tokens: Some(80), ignore_eos: true, ..Default::default() });
        req
    };
    let whole = {
        let first = RunningWorker::start(&["--model", &model, "--threads", "2"]);
        collect(&mut first.client().await, request()).await.unwrap()
    };
    assert_eq!(whole.tokens.len(), 80, "{whole:?}");
    let p = whole.done.as_ref().unwrap().usage.unwrap().prompt_tokens as u64;

    let standby = RunningWorker::start(&["--model", &model, "--threads", "2"]);
    let mut client = standby.client().await;
    let status = |m: pb::StatusResponse| m.models.into_iter().next().unwrap();
    let before = status(client.status(pb::StatusRequest {}).await.unwrap().into_inner());
    assert_eq!((before.kv_blocks_cached, before.prefix_blocks_hit), (0, 0), "a fresh worker: {before:?}");

    let mut warm = request();
    warm.resume_tokens = whole.tokens[..64].to_vec();
    warm.prefill_only = true;
    let prefilled = collect(&mut client, warm.clone()).await.unwrap();
    assert!(prefilled.tokens.is_empty() && prefilled.text.is_empty(), "nothing generated: {prefilled:?}");
    let usage = prefilled.done.unwrap().usage.unwrap();
    assert_eq!((usage.prompt_tokens as u64, usage.completion_tokens), (p, 64));
    let full_blocks = (p + 64) / 16;
    let after = status(client.status(pb::StatusRequest {}).await.unwrap().into_inner());
    assert_eq!(after.kv_blocks_used, 0, "no sequence holds blocks: {after:?}");
    assert!(after.kv_blocks_cached >= full_blocks, "{full_blocks} full blocks cached: {after:?}");
    assert_eq!(after.tokens_generated, 0, "{after:?}");

    let mut resumed = request();
    resumed.resume_tokens = whole.tokens[..70].to_vec();
    let rest = collect(&mut client, resumed).await.unwrap();
    assert_eq!(rest.tokens, whole.tokens[70..], "the resumed run goes on as the unbroken one");
    let found = status(client.status(pb::StatusRequest {}).await.unwrap().into_inner());
    assert!(
        found.prefix_blocks_hit - after.prefix_blocks_hit >= full_blocks,
        "the resume found the {full_blocks} prefilled blocks: {after:?} then {found:?}"
    );

    warm.resume_tokens = vec![1, 2, 99_999_999];
    let e = collect(&mut client, warm).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("resume token 99999999 is not in the vocabulary"), "{e:?}");
}

/// A chat through the controller, counting tokens into `seen` as they arrive: the text, the
/// token ids and the final usage, or the error with the tokens delivered before it.
async fn stream_chat(
    channel: tonic::transport::Channel,
    prompt: String,
    sampling: pb::SamplingParams,
    seen: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> (String, Vec<u32>, Result<pb::Usage, tonic::Status>) {
    let mut client = pb::inference_client::InferenceClient::new(channel);
    let req = pb::ChatRequest {
        model: "chat".into(),
        messages: vec![pb::ChatMessage { role: "user".into(), content: prompt }],
        sampling: Some(sampling),
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
            tokio::spawn(stream_chat(channel.clone(), prompt, sampling(32, i % 2 == 1), seen.clone()))
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
    let worker = |id: &str| RunningWorker::join(&control.url(), id, &["--threads", "1"]);
    let mut w1 = worker("w1");
    let mut w2 = worker("w2");
    // A worker prints `ready` before its link registers: spread needs both registered.
    wait_for_workers(&mut control.cluster().await, 2).await;
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

    // Early (20 of ~640 tokens), so that w1 still has streams to lose even when this process lags
    // behind the relays on a busy machine.
    let broken = twenty_streams(&channel, 20, || w1.kill()).await;
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
    let task = tokio::spawn(stream_chat(channel.clone(), PROMPTS[0].into(), sampling(200, false), seen.clone()));
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

/// `--standby-prefill 32`: as a long request goes on, the replica on the other worker prefills
/// its tokens every 32; its worker killed mid-stream, the request resumes on that standby, which
/// finds the prefilled blocks in its prefix cache, and the client gets the unbroken run's
/// tokens. The metrics count the standby prefills and the move by standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_over_request_resumes_on_its_standby_from_the_prefilled_tokens() {
    let prompt = PROMPTS[2].to_string();
    let max_tokens = 240;
    let long = pb::SamplingParams { max_tokens: Some(max_tokens), ignore_eos: true, ..Default::default() };
    let unbroken = {
        let model = format!("chat={}", common::smollm2().display());
        let alone = RunningWorker::start(&["--model", &model, "--threads", "2"]);
        let mut req = chat_request("chat", &prompt, max_tokens);
        req.sampling = Some(long.clone());
        collect(&mut alone.client().await, req).await.unwrap()
    };
    assert_eq!(unbroken.tokens.len(), max_tokens as usize);

    let mut cmd = common::gantry();
    cmd.args(["controller", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--lease", "2"]);
    cmd.args(["--standby-prefill", "32"]);
    let control = RunningController::spawn(cmd, None);
    let http = control.http.clone().unwrap();
    let mut workers = [
        RunningWorker::join(&control.url(), "w1", &["--threads", "1"]),
        RunningWorker::join(&control.url(), "w2", &["--threads", "1"]),
    ];
    wait_for_workers(&mut control.cluster().await, 2).await;
    let mut deployments = control.deployments().await;
    let mut s = spec(common::smollm2().to_str().unwrap(), 2, pb::PlacementStrategy::Spread);
    s.context_length = 2048;
    deployments.apply(pb::ApplyRequest { name: "chat".into(), spec: Some(s) }).await.unwrap();
    wait_for(&mut deployments, "chat", LOAD, "2 replicas ready", ready).await;

    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let task = tokio::spawn(stream_chat(control.channel().await, prompt, long, seen.clone()));
    while seen.load(std::sync::atomic::Ordering::Relaxed) < 8 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The worker generating its tokens (the standby's prefills generate none).
    let mut serving = Vec::new();
    for (i, w) in workers.iter().enumerate() {
        let st = w.client().await.status(pb::StatusRequest {}).await.unwrap().into_inner();
        if st.models.iter().any(|m| m.tokens_generated > 0) {
            serving.push(i);
        }
    }
    assert_eq!(serving.len(), 1, "one worker serves the request");
    let (dead, survivor) = (serving[0], 1 - serving[0]);
    // Past a few standby prefills (every 32 tokens), well before the end.
    while seen.load(std::sync::atomic::Ordering::Relaxed) < 140 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    workers[dead].kill();
    let (_, tokens, usage) = task.await.unwrap();
    let usage = usage.unwrap_or_else(|e| panic!("the request failed: {e:?}"));
    assert_eq!(tokens, unbroken.tokens, "the unbroken run's tokens");
    assert_eq!(usage.completion_tokens, max_tokens);

    let metrics = common::http_get(&http, "/metrics");
    assert!(metric(&metrics, "gantry_standby_prefills_total{model=\"chat\",outcome=\"ok\"}") >= 1.0, "{metrics}");
    assert_eq!(metric(&metrics, "gantry_routing_decisions_total{model=\"chat\",by=\"standby\"}"), 1.0, "{metrics}");
    assert_eq!(metric(&metrics, "gantry_request_migrations_total{model=\"chat\",outcome=\"resumed\"}"), 1.0);
    // The resume found at least the first standby prefill's blocks (prompt and 32 tokens).
    let st = workers[survivor].client().await.status(pb::StatusRequest {}).await.unwrap().into_inner();
    let m = st.models.into_iter().next().unwrap();
    let prompt_tokens = unbroken.done.as_ref().unwrap().usage.unwrap().prompt_tokens as u64;
    assert!(m.prefix_blocks_hit >= (prompt_tokens + 32) / 16, "{m:?}");
    assert!(
        control.stderr().contains("by=standby") || control.stderr().contains("by=\"standby\""),
        "{}",
        control.stderr()
    );
}

fn gpu_of<'a>(workers: &'a [pb::WorkerInfo], id: &str) -> &'a pb::GpuUsage {
    &workers.iter().find(|w| w.worker_id == id).unwrap_or_else(|| panic!("no worker {id}: {workers:#?}")).gpus[0]
}

async fn list_workers(control: &RunningController) -> Vec<pb::WorkerInfo> {
    control.cluster().await.list_workers(pb::ListWorkersRequest {}).await.unwrap().into_inner().workers
}

/// Waits until `check` holds for the worker list.
async fn wait_workers(control: &RunningController, what: &str, check: impl Fn(&[pb::WorkerInfo]) -> bool) {
    let started = std::time::Instant::now();
    loop {
        let workers = list_workers(control).await;
        if check(&workers) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "not {what}: {workers:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A worker frozen (SIGSTOP) past its lease is declared lost; thawed, it registers again and
/// is told what to keep and what to drop. Alone, it keeps its replica (adopted, not loaded
/// twice); once the replica was placed on another worker meanwhile, it is told to unload it,
/// and the reserved memory is exactly one replica's, on the worker that serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_back_from_the_dead_is_told_what_to_keep_and_what_to_drop() {
    let control = RunningController::start(&["--lease", "2"]);
    let worker = |id: &str| RunningWorker::join(&control.url(), id, &["--threads", "1"]);
    let w1 = worker("w1");
    let mut deployments = control.deployments().await;
    let s = spec(common::smollm2().to_str().unwrap(), 1, pb::PlacementStrategy::Binpack);
    deployments.apply(pb::ApplyRequest { name: "chat".into(), spec: Some(s) }).await.unwrap();
    let d = wait_for(&mut deployments, "chat", LOAD, "ready", ready).await;
    assert_eq!(placements(&d), ["w1/gpu:0"]);
    let reserved = status(&d).replica_status[0].stages[0].reserved_bytes;
    let mut inference = control.inference().await;
    let (answer, _) = common::controller::chat(&mut inference, "chat", "Name a planet.", 12).await.unwrap();

    // Alone: lost, nowhere else to go, back: it keeps what it holds.
    w1.signal("STOP");
    wait_workers(&control, "w1 lost", |w| w.iter().any(|w| w.worker_id == "w1" && w.state == "lost")).await;
    w1.signal("CONT");
    let d = wait_for(&mut deployments, "chat", Duration::from_secs(30), "adopted", |d| {
        ready(d) && status(d).events.iter().any(|e| e.kind == "Adopted")
    })
    .await;
    assert_eq!(placements(&d), ["w1/gpu:0"]);
    let (again, _) = common::controller::chat(&mut inference, "chat", "Name a planet.", 12).await.unwrap();
    assert_eq!(again, answer);
    let loads = w1.stderr().lines().filter(|l| l.contains("serving") && l.contains("model=chat/0")).count();
    assert_eq!(loads, 1, "kept, not loaded again:\n{}", w1.stderr());
    assert_eq!(gpu_of(&list_workers(&control).await, "w1").reserved_bytes, reserved);

    // With another worker: lost, the replica moves, back: it is told to unload it.
    let w2 = worker("w2");
    wait_for_workers(&mut control.cluster().await, 2).await;
    w1.signal("STOP");
    let d =
        wait_for(&mut deployments, "chat", LOAD, "moved to w2", |d| ready(d) && placements(d) == ["w2/gpu:0"]).await;
    assert!(status(&d).events.iter().any(|e| e.kind == "WorkerLost"), "{:?}", status(&d).events);
    w1.signal("CONT");
    let mut w1_client = w1.client().await;
    let started = std::time::Instant::now();
    loop {
        let st = common::worker::status(&mut w1_client).await;
        if st.models.is_empty() {
            // Its memory is all free again.
            assert_eq!(st.gpus[0].free_bytes, st.gpus[0].total_bytes, "{st:#?}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "w1 still holds {:?}", st.models);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_workers(&control, "w1 ready again", |w| w.iter().any(|w| w.worker_id == "w1" && w.state == "ready")).await;
    let workers = list_workers(&control).await;
    assert_eq!(gpu_of(&workers, "w1").reserved_bytes, 0, "{workers:#?}");
    assert!(gpu_of(&workers, "w1").replicas.is_empty(), "{workers:#?}");
    assert_eq!(gpu_of(&workers, "w2").reserved_bytes, reserved, "{workers:#?}");
    assert_eq!(gpu_of(&workers, "w2").replicas, ["chat/0"]);
    assert!(control.stderr().contains("unloading a replica the controller no longer wants"));
    let (moved, _) = common::controller::chat(&mut inference, "chat", "Name a planet.", 12).await.unwrap();
    assert_eq!(moved, answer);
    drop(w2);
}

/// etcd goes away under a serving controller: requests are still answered, changes are refused
/// with the reason, a lost worker's replica is still placed again on another; when etcd comes
/// back, the controller writes what changed meanwhile (a controller started afresh on that
/// etcd finds the new placement) and takes changes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_gone_the_controller_serves_refuses_changes_and_catches_up() {
    let mut etcd = common::etcd::EtcdServer::start();
    let url = etcd.url();
    let args = ["--etcd", url.as_str(), "--etcd-prefix", "/reliability/", "--lease", "2"];
    let addr = format!("127.0.0.1:{}", common::etcd::free_port());
    let mut control = RunningController::start_on(&addr, &args);
    let worker = |id: &str| RunningWorker::join(&format!("http://{addr}"), id, &[]);
    let mut w1 = worker("w1");
    let mut deployments = control.deployments().await;
    let s = spec(common::smollm2().to_str().unwrap(), 1, pb::PlacementStrategy::Binpack);
    deployments.apply(pb::ApplyRequest { name: "chat".into(), spec: Some(s) }).await.unwrap();
    wait_for(&mut deployments, "chat", LOAD, "ready", ready).await;
    let mut inference = control.inference().await;
    let (answer, _) = common::controller::chat(&mut inference, "chat", "Name a planet.", 12).await.unwrap();

    etcd.stop();
    // Past the controller's etcd lease: it still leads and serves.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (during, _) = common::controller::chat(&mut inference, "chat", "Name a planet.", 12).await.unwrap();
    assert_eq!(during, answer);
    let e = deployments.scale(pb::ScaleRequest { name: "chat".into(), replicas: 2 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("the state store is unreachable, so changes are refused until it answers"), "{e:?}");
    assert!(e.message().contains(&url), "{e:?}");
    // A worker lost meanwhile: its replica is placed again on another, in memory.
    let w2 = worker("w2");
    w1.kill();
    let d =
        wait_for(&mut deployments, "chat", LOAD, "moved to w2", |d| ready(d) && placements(d) == ["w2/gpu:0"]).await;
    assert_eq!(status(&d).replica_status.len(), 1);
    let (moved, _) = common::controller::chat(&mut inference, "chat", "Name a planet.", 12).await.unwrap();
    assert_eq!(moved, answer);

    etcd.restart();
    let started = std::time::Instant::now();
    // Both the writes kept meanwhile and the leadership lease's keep-alive reconnect; each
    // says so in the log, in either order.
    let caught_up = |log: &str| {
        log.contains("the state store answers again")
            && log.contains("etcd answers again; the leadership lease is intact")
    };
    while !caught_up(&control.stderr()) {
        assert!(started.elapsed() < Duration::from_secs(30), "no catch-up:\n{}", control.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = deployments.scale(pb::ScaleRequest { name: "chat".into(), replicas: 1 }).await.expect("changes work again");
    assert_eq!(d.into_inner().spec.unwrap().replicas, 1);

    // What changed while etcd was away is in etcd: a fresh controller restores it.
    control.kill();
    let control = RunningController::start_on(&addr, &args);
    let mut deployments = control.deployments().await;
    let d = wait_for(&mut deployments, "chat", Duration::from_secs(30), "ready after restart", ready).await;
    assert_eq!(placements(&d), ["w2/gpu:0"]);
    let loads = w2.stderr().lines().filter(|l| l.contains("serving") && l.contains("model=chat/0")).count();
    assert_eq!(loads, 1, "w2 loaded chat/0 {loads} times");
}
