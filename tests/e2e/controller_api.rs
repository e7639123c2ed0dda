//! The controller's API against real processes: health and reflection, the model services
//! with the live cluster as hardware, the deployment watch, deadlines and cancellation
//! passed on to the worker, failed loads releasing their reservation, pending replicas
//! placed as soon as a matching worker appears, and the errors for bad requests.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::{Duration, Instant};

use crate::common::controller::{RunningController, placements, ready, spec, status, wait_for, wait_for_workers};
use crate::common::worker::RunningWorker;
use gantry_proto::v1 as pb;
use pb::PlacementStrategy::Binpack;
use tonic::Code;

const LOAD: Duration = Duration::from_secs(120);

fn smollm2() -> String {
    common::smollm2().to_str().unwrap().to_string()
}

async fn running_on(worker: &RunningWorker, model_id: &str) -> u32 {
    let mut client = worker.client().await;
    let st = common::worker::status(&mut client).await;
    st.models.iter().find(|m| m.info.as_ref().is_some_and(|i| i.model_id == model_id)).map_or(0, |m| m.running)
}

fn long_chat(model: &str, max_tokens: u32) -> pb::ChatRequest {
    pb::ChatRequest {
        model: model.into(),
        messages: vec![pb::ChatMessage { role: "user".into(), content: "Tell me a very long story.".into() }],
        sampling: Some(pb::SamplingParams { max_tokens: Some(max_tokens), ignore_eos: true, ..Default::default() }),
        request_id: "long-story".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_api_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("state.redb");
    let control = RunningController::start(&["--store", store.to_str().unwrap(), "--lease", "3"]);
    let w1 = RunningWorker::start(&[
        "--controller",
        &control.url(),
        "--worker-id",
        "w1",
        "--gpus",
        "1x24GiB",
        "--threads",
        "1",
        "--label",
        "zone=a",
    ]);
    let mut cluster = control.cluster().await;
    let workers = wait_for_workers(&mut cluster, 1).await;
    assert_eq!(workers[0].labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(workers[0].gpus[0].total_bytes, 24 << 30);

    // Standard health checking and reflection answer without the .proto files.
    let channel = control.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let h = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(h.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let h = health.check(tonic_health::pb::HealthCheckRequest { service: "gantry.v1.Inference".into() }).await.unwrap();
    assert_eq!(h.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let services = common::reflection_services(channel.clone()).await;
    for s in ["gantry.v1.Inference", "gantry.v1.Deployments", "gantry.v1.Cluster", "gantry.v1.Models"] {
        assert!(services.contains(&s.to_string()), "reflection lists {s}: {services:?}");
    }

    // A watch sees the deployments that exist, then each change.
    let mut deployments = control.deployments().await;
    let mut watch = deployments.watch(pb::WatchDeploymentsRequest {}).await.unwrap().into_inner();
    deployments
        .apply(pb::ApplyRequest { name: "chat".into(), spec: Some(spec(&smollm2(), 1, Binpack)) })
        .await
        .unwrap();
    let d = wait_for(&mut deployments, "chat", LOAD, "ready", ready).await;
    assert_eq!(placements(&d), ["w1/gpu:0"]);
    let mut seen = Vec::new();
    while !seen.iter().any(|(_, s): &(i32, String)| s == "Ready") {
        let ev = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap().unwrap().unwrap();
        let d = ev.deployment.unwrap();
        assert_eq!(d.name, "chat");
        seen.push((ev.kind, d.status.unwrap_or_default().phase));
    }
    assert!(seen.iter().all(|(k, _)| *k == pb::deployment_event::Kind::Changed as i32), "{seen:?}");
    assert!(seen.iter().any(|(_, p)| p == "Progressing"), "the watch saw the load: {seen:?}");

    // Models: the deployed list, and Inspect/Select with the cluster's GPUs as hardware.
    let mut models = pb::models_client::ModelsClient::new(channel.clone());
    let list = models.list(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].name.as_str(), list[0].ready_replicas, list[0].context_length), ("chat", 1, 2048));
    assert_eq!(list[0].parameters, 134_515_008);
    // The room Inspect counts is w1's GPU net of what is promised: the smaller of its total
    // less the controller's reservations and what the worker reports free.
    wait_until(Duration::from_secs(5), "a heartbeat shows chat/0 loaded", || async {
        let w = cluster.clone().list_workers(pb::ListWorkersRequest {}).await.unwrap().into_inner().workers;
        w[0].loaded_models == ["chat/0"]
    })
    .await;
    let inspect = models
        .inspect(pb::InspectRequest {
            model: "meta-llama/Meta-Llama-3-8B-Instruct".into(),
            context: 8192,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inspect.stages.len(), 1, "8B fits w1's 24 GiB: {inspect:?}");
    let w = cluster.list_workers(pb::ListWorkersRequest {}).await.unwrap().into_inner().workers;
    let gpu = &w[0].gpus[0];
    assert_eq!(gpu.reserved_bytes, status(&d).replica_bytes);
    assert!(gpu.free_bytes < 24 << 30, "the worker counts the loaded replica: {gpu:?}");
    assert_eq!(inspect.stages[0].free_bytes, (gpu.total_bytes - gpu.reserved_bytes).min(gpu.free_bytes));
    let inspect = models
        .inspect(pb::InspectRequest { model: "meta-llama/Meta-Llama-3-70B-Instruct".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(inspect.stages.is_empty());
    assert!(inspect.no_fit_reason.contains("the largest has"), "{}", inspect.no_fit_reason);
    // On GPUs given in the request and declared linked, a tensor-parallel plan.
    let gpu80 = pb::Gpu { name: "H100".into(), memory_bytes: 80 << 30 };
    let inspect = models
        .inspect(pb::InspectRequest {
            model: "meta-llama/Meta-Llama-3-70B-Instruct".into(),
            context: 8192,
            gpus: vec![gpu80.clone(), gpu80.clone(), gpu80],
            gpus_linked: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ranks: Vec<(u32, u64, u64, u32)> =
        inspect.stages.iter().map(|s| (s.gpu_index, s.layer_start, s.layer_end, s.tensor_parallel)).collect();
    assert_eq!(ranks, [(0, 0, 80, 2), (1, 0, 80, 2)], "{inspect:?}");
    let select = models
        .select(pb::SelectRequest { task: "chat".into(), latency: "realtime".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(!select.candidates.is_empty());
    assert!(select.candidates.iter().all(|c| c.memory_bytes <= 24 << 30), "all fit the cluster's one 24 GiB GPU");
    assert!(select.rejected.iter().any(|r| r.id.contains("70B")), "70B models are rejected on this cluster");

    // A deadline ends the stream with DEADLINE_EXCEEDED and stops the worker's generation.
    let mut inference = control.inference().await;
    let mut req = tonic::Request::new(long_chat("chat", 2000));
    req.set_timeout(Duration::from_millis(800));
    let started = Instant::now();
    let result: Result<(), tonic::Status> = async {
        let mut s = inference.chat(req).await?.into_inner();
        while s.message().await?.is_some() {}
        Ok(())
    }
    .await;
    let err = result.expect_err("2000 tokens do not fit in 800 ms");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    wait_until(Duration::from_secs(5), "the worker stops after the deadline", || async {
        running_on(&w1, "chat/0").await == 0
    })
    .await;

    // A client that goes away stops the worker within a token or so.
    let mut s = inference.chat(long_chat("chat", 2000)).await.unwrap().into_inner();
    for _ in 0..3 {
        s.message().await.unwrap().unwrap();
    }
    assert_eq!(running_on(&w1, "chat/0").await, 1);
    drop(s);
    wait_until(Duration::from_secs(5), "the worker stops after the client left", || async {
        running_on(&w1, "chat/0").await == 0
    })
    .await;
    assert!(w1.stderr().contains("long-story"), "the request id reaches the worker's log");

    // Bad requests get INVALID_ARGUMENT with what is wrong, whether the controller or the
    // worker finds it.
    let bad = pb::ChatRequest {
        model: "chat".into(),
        messages: vec![pb::ChatMessage { role: "user".into(), content: "Hi".into() }],
        sampling: Some(pb::SamplingParams { temperature: Some(-1.0), ..Default::default() }),
        request_id: String::new(),
    };
    let err = inference.chat(bad).await.map(|_| ()).unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("-1"), "{err:?}");
    let empty = pb::ChatRequest { model: "chat".into(), ..Default::default() };
    let err = inference.chat(empty).await.map(|_| ()).unwrap_err();
    assert_eq!((err.code(), err.message()), (Code::InvalidArgument, "the chat has no messages"));
    // A missing path inside the model roots (the tests' include the temporary folder).
    let missing = std::env::temp_dir().join("gantry-missing-model.gguf").display().to_string();
    let cases: Vec<(&str, pb::DeploymentSpec, &str)> = vec![
        ("Bad_Name", spec(&smollm2(), 1, Binpack), "deployment name `Bad_Name`"),
        ("many", spec(&smollm2(), 5000, Binpack), "5000 replicas: at most 1024"),
        ("nosrc", spec("", 1, Binpack), "names no model source"),
        ("missing", spec(&missing, 1, Binpack), "gantry-missing-model.gguf"),
        ("unknown", spec("someone/not-a-catalog-model", 1, Binpack), "not a path this controller can read"),
        ("long", pb::DeploymentSpec { context_length: 100_000, ..spec(&smollm2(), 1, Binpack) }, "past"),
        ("dtype", pb::DeploymentSpec { dtype: "q3_z".into(), ..spec(&smollm2(), 1, Binpack) }, "q3_z"),
        (
            "wire",
            pb::DeploymentSpec { stage_wire_dtype: "fp8".into(), ..spec(&smollm2(), 1, Binpack) },
            "stage_wire_dtype: wire dtype `fp8`: use f32, f16 or bf16",
        ),
    ];
    for (name, spec, want) in cases {
        let err = deployments.apply(pb::ApplyRequest { name: name.into(), spec: Some(spec) }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
        assert!(err.message().contains(want), "{name}: {}", err.message());
    }
    let err = deployments.scale(pb::ScaleRequest { name: "nope".into(), replicas: 1 }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("deployed: chat"), "{err:?}");

    // A replica whose selector matches no worker waits, and is placed as soon as one appears.
    let mut zone_b = spec(&smollm2(), 1, Binpack);
    zone_b.placement.as_mut().unwrap().node_selector.insert("zone".into(), "b".into());
    deployments.apply(pb::ApplyRequest { name: "zone-b".into(), spec: Some(zone_b) }).await.unwrap();
    let d = wait_for(&mut deployments, "zone-b", Duration::from_secs(10), "pending", |d| {
        status(d).replica_status.first().is_some_and(|r| r.reason.contains("labels do not match"))
    })
    .await;
    assert!(status(&d).replica_status[0].reason.contains("w1: labels do not match zone=b"), "{d:?}");
    let _w2 = RunningWorker::start(&[
        "--controller",
        &control.url(),
        "--worker-id",
        "w2",
        "--gpus",
        "1x16GiB",
        "--threads",
        "1",
        "--label",
        "zone=b",
    ]);
    let d = wait_for(&mut deployments, "zone-b", LOAD, "placed on w2", ready).await;
    assert_eq!(placements(&d), ["w2/gpu:0"]);

    // Deleting unloads: the worker no longer holds the replica and the memory is free.
    deployments.delete(pb::DeleteDeploymentRequest { name: "zone-b".into() }).await.unwrap();
    let err = deployments.get(pb::GetDeploymentRequest { name: "zone-b".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    wait_until(Duration::from_secs(10), "w2 unloads zone-b/0", || async {
        let w = cluster.clone().list_workers(pb::ListWorkersRequest {}).await.unwrap().into_inner().workers;
        let w2 = w.iter().find(|w| w.worker_id == "w2").unwrap();
        w2.loaded_models.is_empty() && w2.gpus[0].reserved_bytes == 0 && w2.gpus[0].free_bytes == 16 << 30
    })
    .await;
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.unwrap().unwrap().unwrap();
        if ev.kind == pb::deployment_event::Kind::Deleted as i32 {
            assert_eq!(ev.deployment.unwrap().name, "zone-b");
            break;
        }
    }

    // SIGTERM stops a controller with workers linked and a watch open, and a linked worker.
    let mut control = control;
    let started = Instant::now();
    assert!(control.terminate().success(), "{}", control.stderr());
    assert!(started.elapsed() < Duration::from_secs(5), "the controller took {:?}", started.elapsed());
    let err = tokio::time::timeout(Duration::from_secs(5), watch.message()).await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let mut w1 = w1;
    assert!(w1.terminate().success(), "{}", w1.stderr());
}

/// A load that fails on the worker (here: the Hub cannot be reached) releases the memory
/// reserved for it, says why in the replica's status and events, and is tried again later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_releases_its_reservation_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("state.redb");
    let control = RunningController::start(&["--store", store.to_str().unwrap()]);
    let mut cmd = common::gantry();
    cmd.args(["worker", "--listen", "127.0.0.1:0", "--controller", &control.url(), "--worker-id", "w1"])
        .args(["--gpus", "1x24GiB"])
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HUB_CACHE", dir.path().join("hub"));
    let _w1 = RunningWorker::spawn(cmd);
    let mut cluster = control.cluster().await;
    wait_for_workers(&mut cluster, 1).await;
    let mut deployments = control.deployments().await;
    // A catalog model, so the controller can size it; the worker must fetch it from the Hub.
    deployments
        .apply(pb::ApplyRequest {
            name: "hub".into(),
            spec: Some(spec("HuggingFaceTB/SmolLM2-135M-Instruct", 1, Binpack)),
        })
        .await
        .unwrap();
    let d = wait_for(&mut deployments, "hub", Duration::from_secs(60), "a failed load", |d| {
        status(d).replica_status.first().is_some_and(|r| r.state == pb::ReplicaState::Failed as i32)
    })
    .await;
    let r = &status(&d).replica_status[0];
    assert!(r.stages.is_empty(), "a failed replica holds no reservation: {r:?}");
    assert!(r.reason.contains("failed to load on w1") && r.reason.contains("127.0.0.1:9"), "{}", r.reason);
    let events: Vec<String> = status(&d).events.iter().map(|e| e.kind.clone()).collect();
    assert!(events.ends_with(&["Placed".to_string(), "LoadFailed".to_string()]), "{events:?}");
}

async fn wait_until<F, Fut>(timeout: Duration, what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
