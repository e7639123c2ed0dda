//! A real worker process serving the real SmolLM2-135M-Instruct model, called over gRPC:
//! chat streaming, concurrency, cancellation, a full queue, bad requests, loading and
//! unloading, health checking and reflection, and a clean stop.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::{Duration, Instant};

use crate::common::worker::{RunningWorker, chat_request, collect, status};
use gantry_proto::v1 as pb;
use tonic::Code;

const MODEL: &str = "smollm2";

fn smollm2_arg() -> String {
    format!("{MODEL}={}", common::smollm2().display())
}

/// The same chat through `gantry generate --json`: the worker must give the same tokens.
fn generate_cli(model: &std::path::Path, prompt: &str, max_tokens: u32) -> Vec<u32> {
    let out = common::gantry_json(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "--prompt",
        prompt,
        "--max-tokens",
        &max_tokens.to_string(),
        "--json",
    ]);
    out["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_streams_a_chat_answer_token_by_token() {
    let worker = RunningWorker::start(&["--model", &smollm2_arg(), "--gpus", "1x24GiB"]);
    let mut client = worker.client().await;

    let out = collect(&mut client, chat_request(MODEL, "What is the capital of France?", 24)).await.unwrap();
    assert!(out.text.contains("Paris"), "{:?}", out.text);
    let done = out.done.expect("the stream ends with a done event");
    let usage = done.usage.unwrap();
    assert_eq!(usage.completion_tokens as usize, out.tokens.len());
    assert!(usage.prompt_tokens > 10, "the chat template wraps the question: {usage:?}");
    assert!(out.events > out.tokens.len(), "one event per token, then done");
    let cli = generate_cli(&common::smollm2(), "What is the capital of France?", 24);
    assert_eq!(out.tokens, cli, "same engine, same greedy tokens");
    assert!(done.decode_tokens_per_sec > 0.0 && done.time_to_first_token_ms > 0.0);

    // Status: the declared GPU, its memory now partly taken, and the tokens served.
    let s = status(&mut client).await;
    assert_eq!(s.gpus.len(), 1);
    let gpu = &s.gpus[0];
    assert_eq!((gpu.source.as_str(), gpu.total_bytes), ("declared", 24 << 30));
    assert!(gpu.used_bytes > 100 << 20 && gpu.free_bytes == gpu.total_bytes - gpu.used_bytes, "{gpu:?}");
    assert_eq!(s.models.len(), 1);
    let m = &s.models[0];
    let info = m.info.as_ref().unwrap();
    assert_eq!((info.model_id.as_str(), info.family.as_str(), info.context_length), (MODEL, "llama", 8192));
    assert_eq!((info.device.as_str(), info.num_layers, info.layer_end), ("gpu:0", 30, 30));
    assert!(info.instruct);
    assert_eq!(m.tokens_generated as usize, out.tokens.len());
    assert!(s.tokens_per_sec > 0.0);
    assert_eq!((s.queue_depth, s.queue_capacity), (0, 64));
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_on_one_model_keep_their_own_caches() {
    let worker = RunningWorker::start(&["--model", &smollm2_arg(), "--parallel", "3"]);
    let client = worker.client().await;
    let prompts = ["What is the capital of France?", "Name three colours.", "Write one word: hello"];
    let alone: Vec<Vec<u32>> = {
        let mut c = client.clone();
        let mut v = Vec::new();
        for p in prompts {
            v.push(collect(&mut c, chat_request(MODEL, p, 16)).await.unwrap().tokens);
        }
        v
    };
    let together = futures_all(prompts.iter().map(|p| {
        let mut c = client.clone();
        let req = chat_request(MODEL, p, 16);
        async move { collect(&mut c, req).await.unwrap().tokens }
    }))
    .await;
    assert_eq!(together, alone, "three interleaved generations give what each gives alone");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_counts_kv_blocks_and_a_repeated_prompt_comes_from_the_prefix_cache() {
    // 2 sequences of 512 tokens: 64 blocks of 16.
    let worker = RunningWorker::start(&["--model", &smollm2_arg(), "--context", "512", "--parallel", "2"]);
    let mut client = worker.client().await;
    let m = status(&mut client).await.models.remove(0);
    assert_eq!((m.kv_block_tokens, m.kv_blocks_total, m.kv_blocks_used, m.kv_blocks_cached), (16, 64, 0, 0));

    let question = "Explain in a few words why the sea is salty. ".repeat(4);
    let first = collect(&mut client, chat_request(MODEL, &question, 12)).await.unwrap();
    let prompt = first.done.as_ref().unwrap().usage.unwrap().prompt_tokens as u64;
    let m = status(&mut client).await.models.remove(0);
    // Nothing runs; the full blocks of the prompt and the 11 tokens fed back stay cached.
    assert_eq!((m.kv_blocks_used, m.kv_blocks_cached), (0, (prompt + 11) / 16), "prompt of {prompt} tokens");
    assert_eq!((m.prefix_blocks_looked_up, m.prefix_blocks_hit), ((prompt - 1) / 16, 0));
    assert!(m.batch_steps >= 12 && m.batch_rows >= prompt + 11, "{m:?}");

    // The same chat again: every full block of its prompt comes from the cache, same tokens.
    let second = collect(&mut client, chat_request(MODEL, &question, 12)).await.unwrap();
    assert_eq!(second.tokens, first.tokens);
    let m = status(&mut client).await.models.remove(0);
    assert_eq!((m.prefix_blocks_looked_up, m.prefix_blocks_hit), (2 * ((prompt - 1) / 16), (prompt - 1) / 16));
    assert_eq!(m.preemptions, 0);
}

/// Runs futures concurrently on the runtime and returns their outputs in order.
async fn futures_all<F, T>(futures: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

fn long_request(max_tokens: u32) -> pb::GenerateRequest {
    let mut req = chat_request(MODEL, "Tell me a very long story about a lighthouse.", max_tokens);
    req.sampling.as_mut().unwrap().ignore_eos = true;
    req
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_stream_stops_the_generation() {
    let worker = RunningWorker::start(&["--model", &smollm2_arg()]);
    let mut client = worker.client().await;
    let mut stream = client.generate(long_request(4000)).await.unwrap().into_inner();
    let mut read = 0;
    while read < 5 {
        if let Some(pb::GenerateEvent { event: Some(pb::generate_event::Event::Token(_)) }) =
            stream.message().await.unwrap()
        {
            read += 1;
        }
    }
    drop(stream); // the client goes away: HTTP/2 RST_STREAM

    let deadline = Instant::now() + Duration::from_secs(10);
    let stopped_at = loop {
        let s = status(&mut client).await;
        if s.models[0].running == 0 {
            break s.models[0].tokens_generated;
        }
        assert!(Instant::now() < deadline, "the generation still runs 10 s after the cancel");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // What was generated: the 5 read, the few in flight to the client when it left (a token
    // takes ~10 ms here, the cancel well under one), and at most one more once it was seen.
    assert!((5..=5 + 8 + 1).contains(&stopped_at), "generated {stopped_at} tokens for a client that read 5");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status(&mut client).await.models[0].tokens_generated, stopped_at, "nothing runs after the cancel");
    let log = worker.stderr();
    assert!(log.contains("finish=Cancelled"), "the worker logs the cancel:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_resource_exhausted() {
    let worker = RunningWorker::start(&["--model", &smollm2_arg(), "--max-running", "1", "--queue", "1"]);
    let mut client = worker.client().await;
    // One running, one waiting: the queue of one is full.
    let mut running = client.generate(long_request(2000)).await.unwrap().into_inner();
    assert!(running.message().await.unwrap().is_some());
    let mut waiting = client.clone();
    let queued = tokio::spawn(async move { collect(&mut waiting, chat_request(MODEL, "Say hi.", 4)).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&mut client).await.queue_depth < 1 {
        assert!(Instant::now() < deadline, "the second request never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = collect(&mut client, chat_request(MODEL, "Say hi.", 4)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("the worker's queue is full: 1 requests waiting, 1 running on `smollm2`"),
        "{}",
        err.message()
    );
    // The first one ends (cancelled); the queued one then runs to completion.
    drop(running);
    let out = queued.await.unwrap().unwrap();
    assert_eq!(out.tokens.len(), 4);
    let s = status(&mut client).await;
    assert_eq!((s.queue_depth, s.models[0].queued), (0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_the_right_codes_with_the_numbers() {
    let worker = RunningWorker::start(&["--model", &smollm2_arg(), "--context", "256"]);
    let mut client = worker.client().await;

    // Past the context: the prompt alone is longer than the 256 tokens served.
    let long = "word ".repeat(400);
    let err = collect(&mut client, chat_request(MODEL, &long, 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let msg = err.message();
    assert!(
        msg.starts_with("the prompt is ")
            && msg.contains("tokens; model `smollm2` has a context of 256 tokens, so at most 255 prompt tokens fit"),
        "{msg}"
    );

    let err = collect(&mut client, chat_request("llama-70b", "Hi", 8)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "model `llama-70b` is not loaded on this worker; loaded: smollm2");

    let mut bad = chat_request(MODEL, "Hi", 8);
    bad.sampling.as_mut().unwrap().temperature = Some(-0.5);
    let err = collect(&mut client, bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "invalid sampling: temperature must be between 0 and 100, got -0.5");

    let mut bad = chat_request(MODEL, "Hi", 8);
    bad.sampling.as_mut().unwrap().max_tokens = Some(0);
    assert!(collect(&mut client, bad).await.unwrap_err().message().contains("max_tokens must be at least 1"));

    let empty = pb::GenerateRequest { model_id: MODEL.into(), ..Default::default() };
    let err = collect(&mut client, empty).await.unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "the request has neither a prompt nor a chat"));

    // A generation that reaches the served context ends with CONTEXT_FULL, not an error.
    let mut req = chat_request(MODEL, &"word ".repeat(200), 200);
    req.sampling.as_mut().unwrap().ignore_eos = true;
    let out = collect(&mut client, req).await.unwrap();
    let done = out.done.unwrap();
    assert_eq!(done.finish_reason, pb::FinishReason::ContextFull as i32);
    assert_eq!(done.usage.unwrap().prompt_tokens + done.usage.unwrap().completion_tokens, 256);

    // Loading with more context than the model was trained for.
    let err = load(&mut client, "big", &common::smollm2().display().to_string(), 100_000).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("context_length 100000: SmolLM2-135M-Instruct.Q4_1.gguf was trained for 8192 tokens"),
        "{}",
        err.message()
    );
}

/// Loads a model, returning the progress events and the final info.
async fn load(
    client: &mut gantry_proto::v1::worker_client::WorkerClient<tonic::transport::Channel>,
    id: &str,
    source: &str,
    context: u32,
) -> Result<(Vec<pb::LoadProgress>, pb::ModelInfo), tonic::Status> {
    let req = pb::LoadModelRequest {
        model_id: id.into(),
        source: source.into(),
        context_length: context,
        ..Default::default()
    };
    common::worker::load(client, req).await
}

#[tokio::test(flavor = "multi_thread")]
async fn models_load_with_progress_and_unload() {
    let worker = RunningWorker::start(&["--gpus", "1x8GiB"]);
    let mut client = worker.client().await;
    assert!(status(&mut client).await.models.is_empty());

    let gemma = common::gemma3().display().to_string();
    let (progress, info) = load(&mut client, "gemma", &gemma, 2048).await.unwrap();
    let layers: Vec<(u64, u64)> = progress.iter().filter(|p| p.stage == "load").map(|p| (p.done, p.total)).collect();
    assert_eq!(layers.last(), Some(&(18, 18)), "one event per layer of Gemma 3 270M's 18: {layers:?}");
    assert_eq!((info.family.as_str(), info.context_length, info.num_layers), ("gemma3", 2048, 18));
    let out = collect(&mut client, chat_request("gemma", "What is the capital of France?", 12)).await.unwrap();
    assert_eq!(out.tokens, generate_cli(&common::gemma3(), "What is the capital of France?", 12));

    // Loading the same again is a no-op; the same name from elsewhere is refused.
    assert_eq!(load(&mut client, "gemma", &gemma, 2048).await.unwrap().1.model_id, "gemma");
    let err = load(&mut client, "gemma", &common::smollm2().display().to_string(), 0).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    // A missing path and a file that is not a model are clear errors (the missing path inside
    // the model roots: outside them it is refused before anything is looked at).
    let missing = std::env::temp_dir().join("gantry-nonexistent-model.gguf").display().to_string();
    let err = load(&mut client, "x", &missing, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("gantry-nonexistent-model.gguf: no such file or directory"), "{}", err.message());
    let junk = tempfile::NamedTempFile::with_suffix(".gguf").unwrap();
    std::fs::write(junk.path(), b"GGUF\x03\x00\x00\x00truncated").unwrap();
    let err = load(&mut client, "x", junk.path().to_str().unwrap(), 0).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    client.unload_model(pb::UnloadModelRequest { model_id: "gemma".into() }).await.unwrap();
    let err = collect(&mut client, chat_request("gemma", "Hi", 4)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client.unload_model(pb::UnloadModelRequest { model_id: "gemma".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let s = status(&mut client).await;
    assert_eq!(s.gpus[0].free_bytes, 8 << 30, "unloading gives the declared memory back");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_load_sent_twice_waits_and_an_unload_during_a_load_drops_it() {
    let worker = RunningWorker::start(&["--gpus", "1x8GiB"]);
    let mut client = worker.client().await;
    let gemma = common::gemma3().display().to_string();
    let req = pb::LoadModelRequest { model_id: "g".into(), source: gemma.clone(), ..Default::default() };

    // The same load twice at once (a controller resending after a reconnect): the second
    // waits for the first and answers with what it loaded.
    let (mut a, mut b) = (client.clone(), client.clone());
    let (ra, rb) = tokio::join!(common::worker::load(&mut a, req.clone()), common::worker::load(&mut b, req.clone()));
    assert_eq!(ra.unwrap().1, rb.unwrap().1);
    client.unload_model(pb::UnloadModelRequest { model_id: "g".into() }).await.unwrap();

    // An unload that arrives mid-load (after the first layer): the load ends ABORTED and
    // nothing stays loaded or reserved.
    let mut stream = client.load_model(req).await.unwrap().into_inner();
    loop {
        let ev = stream.message().await.unwrap().unwrap();
        if matches!(ev.event, Some(pb::load_model_event::Event::Progress(ref p)) if p.stage == "load") {
            break;
        }
    }
    client.unload_model(pb::UnloadModelRequest { model_id: "g".into() }).await.unwrap();
    let end = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the load ended without a result"),
            Err(e) => break e,
        }
    };
    assert_eq!((end.code(), end.message()), (Code::Aborted, "model `g` was unloaded while it loaded"));
    let s = status(&mut client).await;
    assert!(s.models.is_empty());
    assert_eq!(s.gpus[0].free_bytes, 8 << 30);
    // The name is free again.
    let req = pb::LoadModelRequest { model_id: "g".into(), source: gemma, ..Default::default() };
    assert_eq!(common::worker::load(&mut client, req).await.unwrap().1.model_id, "g");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_too_big_for_the_declared_gpu_is_refused_with_the_sizes() {
    let worker = RunningWorker::start(&["--gpus", "1x100MiB"]);
    let mut client = worker.client().await;
    let err = load(&mut client, "s", &common::smollm2().display().to_string(), 0).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let msg = err.message();
    assert!(
        msg.starts_with("SmolLM2-135M-Instruct.Q4_1.gguf needs ")
            && msg.contains(" on gpu:0 (")
            && msg.ends_with("; 100.0 MiB of 100.0 MiB is free"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_reflection_answer_and_sigterm_stops_cleanly() {
    let mut worker = RunningWorker::start(&["--model", &smollm2_arg()]);
    let channel = tonic::transport::Channel::from_shared(worker.url()).unwrap().connect().await.unwrap();

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "gantry.v1.Worker"] {
        let r =
            health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{service:?}");
    }

    let names = common::reflection_services(channel).await;
    for want in ["gantry.v1.Worker", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }

    let status = worker.terminate();
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
}
