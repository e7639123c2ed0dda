//! Autoscaling through a real controller process: with the real SmolLM2 on a real worker, a
//! deployment scaled to zero answers a cold request (the request waits while a replica loads)
//! and goes back to zero when idle, and a cold request that nothing can fit is refused at once
//! with the reason; with stand-in workers (`common/standin.rs`, the real worker protocols with a
//! deterministic engine), a deployment follows a generated load up to its maximum and back to
//! its minimum without losing a request, and a controller killed and restarted after scaling up
//! keeps the count and does not scale down before its delay (embedded store and etcd).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common;
use crate::common::controller::{RunningController, chat, spec, status, wait_for, wait_for_workers};
use crate::common::standin::{Engine, StandIn, reply};
use crate::common::worker::RunningWorker;
use gantry_proto::v1 as pb;
use pb::PlacementStrategy::Binpack;
use pb::inference_client::InferenceClient;
use tonic::transport::Channel;

fn policy(min: u32, max: u32, target: f64, down_s: u32) -> pb::AutoscalingPolicy {
    pb::AutoscalingPolicy {
        min_replicas: min,
        max_replicas: max,
        metric: pb::AutoscalingMetric::InFlight as i32,
        target,
        scale_up_window_s: 0,
        scale_down_delay_s: Some(down_s),
        scale_to_zero_after_s: Some(down_s),
    }
}

fn autoscaled_events(d: &pb::Deployment) -> Vec<String> {
    status(d).events.iter().filter(|e| e.kind == "Autoscaled").map(|e| e.message.clone()).collect()
}

fn phase(d: &pb::Deployment) -> String {
    status(d).phase
}

fn replicas(d: &pb::Deployment) -> u32 {
    d.spec.as_ref().map_or(0, |s| s.replicas)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaled_to_zero_a_cold_request_is_answered_and_one_nothing_fits_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("state.redb");
    let control =
        RunningController::start(&["--store", store.to_str().unwrap(), "--lease", "2", "--autoscale-interval", "0.2"]);
    let url = control.url();
    let _w1 = RunningWorker::start(&["--controller", &url, "--worker-id", "w1", "--gpus", "1x24GiB", "--threads", "1"]);
    let _tiny = RunningWorker::start(&[
        "--controller",
        &url,
        "--worker-id",
        "tiny",
        "--gpus",
        "1x64MiB",
        "--label",
        "size=tiny",
        "--threads",
        "1",
    ]);
    let mut cluster = control.cluster().await;
    wait_for_workers(&mut cluster, 2).await;
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let mut deployments = control.deployments().await;

    let mut s = spec(model, 0, Binpack);
    s.context_length = 512;
    s.autoscaling = Some(policy(0, 2, 4.0, 2));
    let d = deployments.apply(pb::ApplyRequest { name: "chat".into(), spec: Some(s) }).await.unwrap().into_inner();
    assert_eq!((replicas(&d), phase(&d).as_str()), (0, "ScaledToZero"), "{d:#?}");
    assert!(status(&d).replica_status.is_empty());

    // A request while at zero waits for a replica to load, then is answered.
    let mut inference = control.inference().await;
    let started = Instant::now();
    let (text, _) = chat(&mut inference, "chat", "What is the capital of France?", 16).await.expect("a cold chat");
    let cold = started.elapsed();
    assert!(text.contains("Paris"), "{text}");
    println!("cold start to the whole answer: {cold:?}");
    let d = deployments.get(pb::GetDeploymentRequest { name: "chat".into() }).await.unwrap().into_inner();
    assert_eq!(replicas(&d), 1);
    let events = autoscaled_events(&d);
    assert!(
        events.iter().any(|e| e.ends_with("0 → 1 replica(s), a request arrived while scaled to zero")
            && e.contains("1 request(s) waiting for a replica")),
        "{events:#?}"
    );
    // The request waited on `tiny`'s neighbour, never on `tiny` (64 MiB holds no replica).
    assert_eq!(status(&d).replica_status[0].stages[0].worker_id, "w1");

    // Idle for the scale-to-zero period: the replica goes and its worker holds nothing.
    let d = wait_for(&mut deployments, "chat", Duration::from_secs(20), "back to zero", |d| phase(d) == "ScaledToZero")
        .await;
    assert!(autoscaled_events(&d).last().unwrap().ends_with("1 → 0 replica(s), idle for 2 s (scale to zero)"));
    let started = Instant::now();
    loop {
        let workers = cluster.list_workers(pb::ListWorkersRequest {}).await.unwrap().into_inner().workers;
        let w1 = workers.iter().find(|w| w.worker_id == "w1").unwrap();
        if w1.gpus.iter().all(|g| g.replicas.is_empty() && g.reserved_bytes == 0) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "w1 still holds a replica: {w1:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // And from zero again.
    let (text, _) =
        chat(&mut inference, "chat", "What is the capital of France?", 16).await.expect("a second cold chat");
    assert!(text.contains("Paris"), "{text}");

    // A deployment that fits no GPU: its cold request is refused with the placement's reason
    // (UNAVAILABLE), not left to wait out its deadline.
    let mut s = spec(model, 0, Binpack);
    s.context_length = 512;
    s.placement.as_mut().unwrap().node_selector.insert("size".into(), "tiny".into());
    s.autoscaling = Some(policy(0, 1, 4.0, 2));
    deployments.apply(pb::ApplyRequest { name: "cramped".into(), spec: Some(s) }).await.unwrap();
    let mut req = tonic::Request::new(pb::ChatRequest {
        model: "cramped".into(),
        messages: vec![pb::ChatMessage { role: "user".into(), content: "Hi".into() }],
        sampling: Some(pb::SamplingParams { max_tokens: Some(4), ..Default::default() }),
        request_id: String::new(),
    });
    req.set_timeout(Duration::from_secs(60));
    let err = match inference.chat(req).await {
        Err(e) => e,
        Ok(r) => {
            let mut stream = r.into_inner();
            loop {
                match stream.message().await {
                    Err(e) => break e,
                    Ok(None) => panic!("a request nothing can fit was answered"),
                    Ok(Some(_)) => {}
                }
            }
        }
    };
    println!("refused: {}", err.message());
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("no ready replica of `cramped`"), "{}", err.message());
    assert!(err.message().contains("tiny"), "the reason names the GPU that is too small: {}", err.message());
}

/// One generation through the controller: its token ids, or the error.
async fn generate(channel: Channel, prompt: String, max_tokens: u32) -> Result<Vec<u32>, tonic::Status> {
    let mut client = InferenceClient::new(channel);
    let req = pb::InferenceRequest {
        model: "ramp".into(),
        prompt,
        sampling: Some(pb::SamplingParams { max_tokens: Some(max_tokens), ..Default::default() }),
        request_id: String::new(),
    };
    let mut stream = client.generate(req).await?.into_inner();
    let mut tokens = Vec::new();
    while let Some(ev) = stream.message().await? {
        if let Some(pb::generate_event::Event::Token(t)) = ev.event {
            tokens.extend(t.token_id);
        }
    }
    Ok(tokens)
}

/// `streams` clients, each sending requests one after another until `stop`; every answer is
/// checked against the stand-in's tokens. Returns (requests answered right, failures).
async fn load(channel: Channel, streams: usize, stop: Arc<AtomicBool>, tag: &'static str) -> (usize, Vec<String>) {
    let ok = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..streams)
        .map(|c| {
            let (channel, stop, ok) = (channel.clone(), stop.clone(), ok.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let prompt = format!("{tag} client {c} request {i}");
                    match generate(channel.clone(), prompt.clone(), 40).await {
                        Ok(tokens) if tokens == reply(&prompt, 40) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(tokens) => failures.push(format!("{prompt}: {} wrong tokens", tokens.len())),
                        Err(e) => failures.push(format!("{prompt}: {e:?}")),
                    }
                    i += 1;
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.unwrap());
    }
    (ok.load(Ordering::Relaxed), failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_load_scales_up_and_back_down_losing_nothing_even_across_a_controller_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("state.redb");
    up_restart_and_down(&["--store", store.to_str().unwrap()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_a_generated_load_scales_up_and_down_across_a_controller_restart() {
    let etcd = common::etcd::EtcdServer::start();
    up_restart_and_down(&["--etcd", &etcd.url()]).await;
}

/// Up to the maximum under load, a controller killed and restarted on the same store (`store`
/// flags), then back to the minimum: every request answered with the right tokens.
async fn up_restart_and_down(store: &[&str]) {
    let port = common::etcd::free_port();
    let addr = format!("127.0.0.1:{port}");
    let args = [store, &["--lease", "2", "--autoscale-interval", "0.2"]].concat();
    let mut control = RunningController::start_on(&addr, &args);
    let engine = Engine { interval: Duration::from_millis(10), ..Engine::default() };
    let _standins = [
        StandIn::start(&control.url(), "s1", engine).await,
        StandIn::start(&control.url(), "s2", engine).await,
        StandIn::start(&control.url(), "s3", engine).await,
    ];
    let mut cluster = control.cluster().await;
    wait_for_workers(&mut cluster, 3).await;
    let model = common::smollm2();
    let mut deployments = control.deployments().await;
    let mut s = spec(model.to_str().unwrap(), 1, pb::PlacementStrategy::Spread);
    s.autoscaling = Some(policy(1, 3, 2.0, 3));
    deployments.apply(pb::ApplyRequest { name: "ramp".into(), spec: Some(s) }).await.unwrap();
    wait_for(&mut deployments, "ramp", Duration::from_secs(20), "1 ready replica", |d| status(d).ready_replicas == 1)
        .await;

    // Six clients at once (target: 2 in flight per replica): up to three replicas.
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(control.channel().await, 6, stop.clone(), "peak"));
    let d = wait_for(&mut deployments, "ramp", Duration::from_secs(20), "3 ready replicas", |d| {
        replicas(d) == 3 && status(d).ready_replicas == 3
    })
    .await;
    let ups = autoscaled_events(&d);
    assert!(ups.iter().all(|e| e.contains("scaling up")), "{ups:#?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (answered, failures) = running.await.unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(answered >= 12, "{answered} requests answered at the peak");
    let d = deployments.get(pb::GetDeploymentRequest { name: "ramp".into() }).await.unwrap().into_inner();
    assert_eq!(replicas(&d), 3, "held at the peak while the load lasted: {:#?}", autoscaled_events(&d));

    // The controller dies right after scaling up and comes back: the count is the stored one,
    // and nothing scales down before a whole delay of samples says so.
    control.kill();
    let control = RunningController::start_on(&addr, &args);
    let mut deployments = control.deployments().await;
    let restarted = Instant::now();
    let d = wait_for(&mut deployments, "ramp", Duration::from_secs(30), "3 ready replicas again", |d| {
        status(d).ready_replicas == 3
    })
    .await;
    assert_eq!(replicas(&d), 3);

    // One client now (below one replica's target): back to the minimum, and every request
    // (some of them on replicas being removed) answered.
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(control.channel().await, 1, stop.clone(), "tail"));
    let d = wait_for(&mut deployments, "ramp", Duration::from_secs(30), "back to 1 replica", |d| {
        replicas(d) == 1 && status(d).replica_status.len() == 1
    })
    .await;
    assert!(restarted.elapsed() >= Duration::from_secs(3), "scaled down {:?} after the restart", restarted.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (answered, failures) = running.await.unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(answered > 0);
    let downs = autoscaled_events(&d);
    assert!(downs.iter().any(|e| e.contains("3 → 1 replica(s), the highest recommendation over 3 s")), "{downs:#?}");
}
