//! Routing by prefix with real processes and the real SmolLM2: two workers, one replica each;
//! a tenant's requests (a long system prompt, then its own question) all go to the worker
//! whose prefix cache holds the system prompt, which reuses it, while the other worker serves
//! none of them; the worker's `Tokenize` gives the token ids `Generate` processes.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use crate::common::controller::{RunningController, ready, spec, wait_for, wait_for_workers};
use crate::common::worker::RunningWorker;
use gantry_proto::v1 as pb;

const LOAD: Duration = Duration::from_secs(120);

/// A system prompt of a few hundred tokens, different for each tenant.
fn system_prompt(tenant: &str) -> String {
    (0..40).map(|i| format!("Rule {i} of {tenant}: answer briefly and politely. ")).collect()
}

fn chat(tenant: &str, question: &str) -> pb::ChatRequest {
    pb::ChatRequest {
        model: "chat".into(),
        messages: vec![
            pb::ChatMessage { role: "system".into(), content: system_prompt(tenant) },
            pb::ChatMessage { role: "user".into(), content: question.into() },
        ],
        sampling: Some(pb::SamplingParams { max_tokens: Some(2), ..Default::default() }),
        request_id: String::new(),
    }
}

/// Each worker's (prefix blocks hit, tokens generated) for its replica of `chat`.
async fn counters(workers: &[&RunningWorker]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for w in workers {
        let status = w.client().await.status(pb::StatusRequest {}).await.unwrap().into_inner();
        let m = status.models.iter().find(|m| m.info.as_ref().is_some_and(|i| i.model_id.starts_with("chat/")));
        out.push(m.map_or((0, 0), |m| (m.prefix_blocks_hit, m.tokens_generated)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_requests_go_to_the_worker_holding_its_system_prompt() {
    let control = RunningController::start(&["--lease", "2"]);
    let url = control.url();
    let w1 = RunningWorker::join(&url, "w1", &["--threads", "1", "--parallel", "2"]);
    let w2 = RunningWorker::join(&url, "w2", &["--threads", "1", "--parallel", "2"]);
    wait_for_workers(&mut control.cluster().await, 2).await;
    let mut deployments = control.deployments().await;
    let s = spec(common::smollm2().to_str().unwrap(), 2, pb::PlacementStrategy::Spread);
    deployments.apply(pb::ApplyRequest { name: "chat".into(), spec: Some(s) }).await.unwrap();
    wait_for(&mut deployments, "chat", LOAD, "ready", ready).await;
    let workers = [&w1, &w2];

    // The worker's own token ids: as many as `Generate` counts for the same input.
    let replica = |w: &RunningWorker| {
        let w = w.url();
        async move {
            let mut c = pb::worker_client::WorkerClient::connect(w).await.unwrap();
            let st = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
            let id = st.models[0].info.as_ref().unwrap().model_id.clone();
            (c, id)
        }
    };
    let (mut c1, id1) = replica(&w1).await;
    let input = pb::generate_request::Input::Chat(pb::Conversation { messages: chat("t0", "Hi").messages });
    let req = pb::GenerateRequest { model_id: id1.clone(), input: Some(input), ..Default::default() };
    let t = c1.tokenize(req.clone()).await.unwrap().into_inner();
    assert_eq!((t.kv_block_tokens, t.prefix_seed), (16, gantry_core::prefix::model_seed("chat")));
    let one =
        pb::GenerateRequest { sampling: Some(pb::SamplingParams { max_tokens: Some(1), ..Default::default() }), ..req };
    let done = common::worker::collect(&mut c1, one).await.unwrap().done.unwrap();
    assert_eq!(done.usage.unwrap().prompt_tokens as usize, t.token_ids.len());
    assert!(t.token_ids.len() > 300, "{} tokens", t.token_ids.len());
    // A prompt past the context: at most the context's ids (Generate refuses it outright).
    let long = pb::GenerateRequest {
        model_id: id1.clone(),
        input: Some(pb::generate_request::Input::Prompt("word ".repeat(5000))),
        ..Default::default()
    };
    assert_eq!(c1.tokenize(long).await.unwrap().into_inner().token_ids.len(), 2048);
    // A bad request is refused with Generate's words.
    let bad = pb::GenerateRequest {
        model_id: id1,
        input: Some(pb::generate_request::Input::Chat(pb::Conversation {
            messages: vec![pb::ChatMessage { role: "robot".into(), content: "x".into() }],
        })),
        ..Default::default()
    };
    let e = c1.tokenize(bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("message #1 has unknown role `robot`"), "{}", e.message());

    // Tenant t1's first request goes where power of two choices sends it; every later one of
    // t1's goes to the same worker and reuses the system prompt's blocks there.
    let inference = control.inference().await;
    let before = counters(&workers).await;
    let run = |req: pb::ChatRequest| {
        let mut client = inference.clone();
        async move {
            let mut s = client.chat(req).await.unwrap().into_inner();
            while s.message().await.unwrap().is_some() {}
        }
    };
    run(chat("t1", "Question 0?")).await;
    let after_first = counters(&workers).await;
    let home = (0..2).find(|&i| after_first[i].1 > before[i].1).expect("one worker served it");
    let other = 1 - home;
    for q in 1..5 {
        run(chat("t1", &format!("Question {q}?"))).await;
    }
    let end = counters(&workers).await;
    assert_eq!(end[other].1, after_first[other].1, "the other worker served none of t1's requests: {end:?}");
    assert_eq!(end[home].1, after_first[home].1 + 4 * 2, "t1's worker generated 2 tokens for each: {end:?}");
    assert!(end[home].0 >= after_first[home].0 + 4 * 20, "each reused the system prompt's blocks: {end:?}");
    // The controller says why: by prefix, with the cached tokens in the routing line.
    let lines = control.stdout().into_iter().chain(control.stderr().lines().map(String::from)).collect::<Vec<_>>();
    let by_prefix = lines.iter().filter(|l| l.contains("routing") && l.contains("by=\"prefix\"")).count();
    assert!(by_prefix >= 4, "{} routing lines by prefix:\n{}", by_prefix, lines.join("\n"));
}
