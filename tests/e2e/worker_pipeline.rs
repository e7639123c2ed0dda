//! SmolLM2 split into pipeline stages over separate real worker processes: 2 and 3 stages,
//! and two segments in one process, give exactly the unsharded model's tokens (greedy and
//! seeded sampling, a prompt longer than one prefill chunk); miswired and broken chains fail
//! with a clear status; a cancel and a killed stage travel along the chain.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::{Duration, Instant};

use crate::common::worker::{RunningWorker, Streamed, chat_request, collect, load, status};
use gantry_proto::v1 as pb;
use gantry_proto::v1::worker_client::WorkerClient;
use tonic::Code;
use tonic::transport::Channel;

fn address(w: &RunningWorker) -> String {
    w.url().trim_start_matches("http://").to_string()
}

fn segment(start: u32, end: u32) -> pb::LayerSegment {
    pb::LayerSegment { device: "cpu".into(), layer_start: start, layer_end: end, ..Default::default() }
}

/// Loads `id` as the stage running `segments`, handing on to `next`.
async fn load_stage(
    client: &mut WorkerClient<Channel>,
    id: &str,
    segments: Vec<pb::LayerSegment>,
    next: Option<&RunningWorker>,
) -> Result<pb::ModelInfo, tonic::Status> {
    let req = pb::LoadModelRequest {
        model_id: id.into(),
        source: common::smollm2().display().to_string(),
        context_length: 2048,
        segments,
        next_stage: next.map(address).unwrap_or_default(),
        ..Default::default()
    };
    load(client, req).await.map(|(_, info)| info)
}

fn seeded(mut req: pb::GenerateRequest) -> pb::GenerateRequest {
    let s = req.sampling.as_mut().unwrap();
    s.temperature = Some(0.9);
    s.top_p = Some(0.95);
    s.seed = Some(7);
    s.repetition_penalty = Some(1.1);
    s.logprobs = true;
    req
}

#[tokio::test(flavor = "multi_thread")]
async fn split_models_give_the_unsharded_tokens() {
    let workers: Vec<RunningWorker> = (0..3).map(|_| RunningWorker::start(&[])).collect();
    let mut clients = Vec::new();
    for w in &workers {
        clients.push(w.client().await);
    }
    let [c1, c2, c3] = &mut clients[..] else { unreachable!() };

    // The reference: the whole model on the first worker.
    let whole = load_stage(c1, "whole", vec![segment(0, 0)], None).await.unwrap();
    assert_eq!((whole.layer_start, whole.layer_end, whole.num_layers), (0, 30, 30));

    // Two stages over two processes; three over three; two segments in one process.
    load_stage(c2, "two", vec![segment(15, 30)], None).await.unwrap();
    let head = load_stage(c1, "two", vec![segment(0, 15)], Some(&workers[1])).await.unwrap();
    assert_eq!((head.layer_start, head.layer_end, head.next_stage.as_str()), (0, 15, address(&workers[1]).as_str()));
    load_stage(c3, "three", vec![segment(20, 30)], None).await.unwrap();
    load_stage(c2, "three", vec![segment(10, 20)], Some(&workers[2])).await.unwrap();
    load_stage(c1, "three", vec![segment(0, 10)], Some(&workers[1])).await.unwrap();
    let local = load_stage(c3, "local", vec![segment(0, 12), segment(12, 30)], None).await.unwrap();
    assert_eq!(local.segments.len(), 2);
    assert_eq!((local.segments[1].layer_start, local.segments[1].layer_end), (12, 30));

    let long_question = format!(
        "Here are some numbers: {}. Which is the largest?",
        (0..260).map(|i| (i * 37 % 1000).to_string()).collect::<Vec<_>>().join(", ")
    );
    let requests = [
        chat_request("whole", "What is the capital of France?", 32),
        chat_request("whole", "Write a haiku about rivers.", 32),
        seeded(chat_request("whole", "Tell me a story about a fox.", 40)),
        seeded(chat_request("whole", &long_question, 12)),
    ];
    for (i, req) in requests.into_iter().enumerate() {
        let reference = collect(c1, req.clone()).await.unwrap();
        assert!(reference.tokens.len() >= 8, "{reference:?}");
        let usage = reference.done.as_ref().unwrap().usage.unwrap();
        for (model, on) in [("two", 0), ("three", 0), ("local", 2)] {
            let client = if on == 0 { &mut *c1 } else { &mut *c3 };
            let got = collect(client, pb::GenerateRequest { model_id: model.into(), ..req.clone() }).await.unwrap();
            assert_eq!(got.tokens, reference.tokens, "{model}: {:?} vs {:?}", got.text, reference.text);
            assert_eq!(got.text, reference.text, "{model}");
            assert_eq!(got.done.unwrap().usage.unwrap(), usage, "{model}");
        }
        if i == 3 {
            assert!(usage.prompt_tokens > 512, "the long prompt takes two prefill chunks: {usage:?}");
        }
    }

    // A standby prefill needs the whole model: a first stage's prefix cache alone would not
    // resume a request. The whole model takes it.
    let mut warm = chat_request("two", "What is the capital of France?", 32);
    warm.prefill_only = true;
    let e = collect(c1, warm.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("prefill_only: this worker holds only the first pipeline stage of `two`"), "{e:?}");
    warm.model_id = "whole".into();
    let done = collect(c1, warm).await.unwrap();
    assert!(done.tokens.is_empty() && done.done.is_some(), "{done:?}");

    // The middle and last stages are idle again: each stream ended with its sequence.
    for c in [&mut *c2, &mut *c3] {
        assert!(status(c).await.models.iter().all(|m| m.running == 0));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn broken_chains_fail_with_a_clear_status() {
    let mut workers: Vec<RunningWorker> = (0..3).map(|_| RunningWorker::start(&[])).collect();
    let mut clients = Vec::new();
    for w in &workers {
        clients.push(w.client().await);
    }
    let [c1, c2, c3] = &mut clients[..] else { unreachable!() };

    // Loads that cannot form a chain are refused.
    let e = load_stage(c1, "x", vec![segment(0, 10), segment(12, 30)], None).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("layers [12, 30) do not follow on from [0, 10)"), "{}", e.message());
    let e = load_stage(c1, "x", vec![segment(0, 15)], None).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("these layers end at 15 of 30; give the next stage's address"), "{}", e.message());
    let e = load_stage(c1, "x", vec![segment(15, 30)], Some(&workers[1])).await.unwrap_err();
    assert!(e.message().contains("these layers end the model at 30, so there can be no next stage"), "{}", e.message());

    // A chain: w1 0..10 → w2 10..20 → w3 20..30.
    load_stage(c3, "m", vec![segment(20, 30)], None).await.unwrap();
    load_stage(c2, "m", vec![segment(10, 20)], Some(&workers[2])).await.unwrap();
    load_stage(c1, "m", vec![segment(0, 10)], Some(&workers[1])).await.unwrap();

    // Requests go to the first stage.
    let e = collect(c2, chat_request("m", "Hi", 4)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("this worker runs layers 10-19 of `m`, a later pipeline stage"), "{}", e.message());

    // A chain wired to the wrong layers fails at the first request.
    load_stage(c3, "miswired", vec![segment(15, 30)], None).await.unwrap();
    load_stage(c1, "miswired", vec![segment(0, 10)], Some(&workers[2])).await.unwrap();
    let e = collect(c1, chat_request("miswired", "Hi", 4)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let want = format!(
        "the next stage ({}, from layer 10) refused the request: this worker runs layers 15-29 of `miswired`; the previous stage hands on at layer 10",
        address(&workers[2])
    );
    assert!(e.message().contains(&want), "{}", e.message());

    // A next stage nobody listens at.
    let closed = common::etcd::free_port();
    let req = pb::LoadModelRequest {
        model_id: "nowhere".into(),
        source: common::smollm2().display().to_string(),
        context_length: 2048,
        segments: vec![segment(0, 10)],
        next_stage: format!("127.0.0.1:{closed}"),
        ..Default::default()
    };
    load(c1, req).await.unwrap();
    let e = collect(c1, chat_request("nowhere", "Hi", 4)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains(&format!("the next stage (127.0.0.1:{closed}, from layer 10)")), "{}", e.message());

    // A cancel ends the sequence on every stage.
    let mut stream = c1.generate(chat_request("m", "Count from one to a hundred.", 200)).await.unwrap().into_inner();
    for _ in 0..3 {
        stream.message().await.unwrap().unwrap();
    }
    assert!(status(c3).await.models.iter().any(|m| m.running == 1), "the last stage runs the sequence");
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s2, s3) = (status(c2).await, status(c3).await);
        if s2.models.iter().chain(&s3.models).all(|m| m.running == 0) {
            break;
        }
        assert!(Instant::now() < deadline, "the later stages still run the cancelled sequence: {s2:?} {s3:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The last stage dies mid-stream: the client gets UNAVAILABLE naming the chain, not a hang.
    let mut stream = c1.generate(chat_request("m", "Count from one to a hundred.", 200)).await.unwrap().into_inner();
    let mut got = Streamed::default();
    for _ in 0..3 {
        if let Some(pb::generate_event::Event::Token(t)) = stream.message().await.unwrap().unwrap().event {
            got.tokens.extend(t.token_id);
        }
    }
    workers[2].kill();
    let e = loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.message()).await.expect("no hang") {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended cleanly without its last stage"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("the next stage ("), "{}", e.message());
    assert!(
        e.message().contains("from layer 20) is unreachable or went away mid-request"),
        "the failure names the dead stage: {}",
        e.message()
    );
    assert_eq!(got.tokens.len(), 3);
}
