//! End to end: a controller and three real worker processes with declared inventories
//! (1×24 GiB; 2×80 GiB; 4×16 GiB — declared because this machine has no GPU; the models run
//! on its CPU with their memory counted against the declared GPU) serving the real SmolLM2.
//! Deployments land where the policy says, chat streams through the controller, scaling
//! moves replicas, a killed worker's replicas are placed again, an unschedulable deployment
//! shows its reasons, and a controller restart (embedded store and etcd) loses nothing.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::time::Duration;

use crate::common::controller::{RunningController, chat, placements, ready, spec, status, wait_for, wait_for_workers};
use crate::common::worker::{RunningWorker, chat_request, collect};
use gantry_proto::v1 as pb;
use pb::PlacementStrategy::{Binpack, Spread};

const LOAD: Duration = Duration::from_secs(120);

fn worker(controller: &RunningController, id: &str, gpus: &str) -> RunningWorker {
    RunningWorker::start(&["--controller", &controller.url(), "--worker-id", id, "--gpus", gpus, "--threads", "1"])
}

fn events(d: &pb::Deployment) -> Vec<String> {
    status(d).events.iter().map(|e| format!("{}: {}", e.kind, e.message)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_place_route_scale_and_survive_a_lost_worker() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("state.redb");
    let control = RunningController::start(&["--store", store.to_str().unwrap(), "--lease", "2"]);
    let _w1 = worker(&control, "w1", "1x24GiB");
    let w2 = worker(&control, "w2", "2x80GiB");
    let mut w3 = worker(&control, "w3", "4x16GiB");
    let mut cluster = control.cluster().await;
    let workers = wait_for_workers(&mut cluster, 3).await;
    let gpus: Vec<(String, usize)> = workers.iter().map(|w| (w.worker_id.clone(), w.gpus.len())).collect();
    assert_eq!(gpus, [("w1".to_string(), 1), ("w2".to_string(), 2), ("w3".to_string(), 4)]);

    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let mut deployments = control.deployments().await;

    // Binpack fills the fullest GPU that fits: all are empty, so the smallest (16 GiB).
    let d = deployments
        .apply(pb::ApplyRequest { name: "chat".into(), spec: Some(spec(model, 1, Binpack)) })
        .await
        .expect("Apply")
        .into_inner();
    assert_eq!(d.generation, 1);
    let d = wait_for(&mut deployments, "chat", LOAD, "1 ready replica", ready).await;
    assert_eq!(placements(&d), ["w3/gpu:0"]);
    let reserved = status(&d).replica_status[0].stages[0].reserved_bytes;
    assert!(reserved > 100 << 20 && reserved < 2 << 30, "SmolLM2 at 2K context reserves {reserved} bytes");

    // A chat through the controller streams exactly what the worker itself answers.
    let mut inference = control.inference().await;
    let (text, tokens) = chat(&mut inference, "chat", "What is the capital of France?", 24).await.expect("chat");
    assert!(text.contains("Paris"), "answer: {text}");
    let mut direct = w3.client().await;
    let want = collect(&mut direct, chat_request("chat/0", "What is the capital of France?", 24)).await.unwrap();
    assert_eq!(tokens, want.tokens, "through the controller: {text:?}; direct: {:?}", want.text);

    // Spread puts one replica on each node, on each node's emptiest GPU.
    deployments
        .apply(pb::ApplyRequest { name: "spread".into(), spec: Some(spec(model, 3, Spread)) })
        .await
        .expect("Apply spread");
    let d = wait_for(&mut deployments, "spread", LOAD, "3 ready replicas", ready).await;
    let mut got = placements(&d);
    got.sort();
    assert_eq!(got, ["w1/gpu:0", "w2/gpu:0", "w3/gpu:1"], "spread: {:?}", events(&d));

    // Scaling up binpacks the new replica onto a 16 GiB GPU of w3; scaling down unloads it.
    let d = deployments.scale(pb::ScaleRequest { name: "chat".into(), replicas: 2 }).await.unwrap().into_inner();
    assert_eq!(d.spec.as_ref().unwrap().replicas, 2);
    let d = wait_for(&mut deployments, "chat", LOAD, "2 ready replicas", ready).await;
    let second = &placements(&d)[1];
    assert!(second.starts_with("w3/gpu:"), "second replica on {second}");
    deployments.scale(pb::ScaleRequest { name: "chat".into(), replicas: 1 }).await.unwrap();
    let started = std::time::Instant::now();
    loop {
        let w = cluster.list_workers(pb::ListWorkersRequest {}).await.unwrap().into_inner().workers;
        let on_w3 = &w.iter().find(|w| w.worker_id == "w3").unwrap().loaded_models;
        if !on_w3.contains(&"chat/1".to_string()) {
            assert!(on_w3.contains(&"chat/0".to_string()), "w3 has {on_w3:?}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "chat/1 was not unloaded from w3: {on_w3:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = deployments.get(pb::GetDeploymentRequest { name: "chat".into() }).await.unwrap().into_inner();
    assert_eq!(placements(&d), ["w3/gpu:0"]);

    // Too big for any node (Llama 3.3 70B at 128K tokens in f16): pending, with every node's reason.
    let mut huge = spec("meta-llama/Llama-3.3-70B-Instruct", 1, Binpack);
    huge.context_length = 131_072;
    deployments.apply(pb::ApplyRequest { name: "huge".into(), spec: Some(huge) }).await.expect("Apply huge");
    let d = wait_for(&mut deployments, "huge", Duration::from_secs(10), "a pending reason", |d| {
        status(d).replica_status.first().is_some_and(|r| r.reason.contains("unschedulable"))
    })
    .await;
    let r = &status(&d).replica_status[0];
    assert_eq!(r.state, pb::ReplicaState::Pending as i32);
    for node in ["w1: 1×24.0 GiB", "w2: 2×80.0 GiB", "w3: 4×16.0 GiB"] {
        assert!(r.reason.contains(node), "reason names {node}: {}", r.reason);
    }
    assert!(r.reason.contains("needs"), "{}", r.reason);
    assert_eq!(status(&d).phase, "Pending");
    // Requests for it say why there is no replica.
    let err = chat(&mut inference, "huge", "Hi", 4).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("no ready replica of `huge`") && err.message().contains("unschedulable"), "{err:?}");
    let err = chat(&mut inference, "nope", "Hi", 4).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(err.message().contains("no deployment named `nope`"), "{err:?}");

    // 70B at 8K fits two 80 GiB GPUs of w2 only by splitting its layers: it is placed so, and
    // its load fails here (the workers cannot reach the Hub).
    let mut split = spec("meta-llama/Meta-Llama-3-70B-Instruct", 1, Binpack);
    split.context_length = 8192;
    deployments.apply(pb::ApplyRequest { name: "split".into(), spec: Some(split) }).await.expect("Apply split");
    let d = wait_for(&mut deployments, "split", Duration::from_secs(10), "a split plan", |d| {
        status(d).events.iter().any(|e| e.kind == "LoadFailed")
    })
    .await;
    let placed = status(&d).events.iter().find(|e| e.kind == "Placed").unwrap().message.clone();
    // Two stages on w2's two GPUs (the one with more room first), covering all 80 layers.
    assert!(
        placed.contains("split into 2 stages: w2 gpu:1 layers 0-39") && placed.contains("w2 gpu:0 layers 40-79"),
        "{placed}"
    );
    deployments.delete(pb::DeleteDeploymentRequest { name: "split".into() }).await.unwrap();
    deployments.delete(pb::DeleteDeploymentRequest { name: "huge".into() }).await.unwrap();

    // w3 dies: after its 2 s lease, its replicas are placed again elsewhere.
    w3.kill();
    let d = wait_for(&mut deployments, "chat", Duration::from_secs(60), "chat re-placed off w3", |d| {
        ready(d) && !placements(d)[0].starts_with("w3")
    })
    .await;
    assert_eq!(placements(&d), ["w1/gpu:0"], "binpack takes the 24 GiB GPU: {:?}", events(&d));
    assert!(events(&d).iter().any(|e| e.starts_with("WorkerLost: worker w3 lost")), "{:?}", events(&d));
    let d = wait_for(&mut deployments, "spread", Duration::from_secs(60), "spread re-placed off w3", |d| {
        ready(d) && placements(d).iter().all(|p| !p.starts_with("w3"))
    })
    .await;
    let mut got = placements(&d);
    got.sort();
    assert_eq!(got, ["w1/gpu:0", "w2/gpu:0", "w2/gpu:1"], "{:?}", events(&d));
    let w = cluster.list_workers(pb::ListWorkersRequest {}).await.unwrap().into_inner().workers;
    assert_eq!(w.iter().find(|w| w.worker_id == "w3").unwrap().state, "lost");
    let (text, _) = chat(&mut inference, "chat", "What is the capital of France?", 24).await.expect("chat after loss");
    assert!(text.contains("Paris"), "{text}");
    drop(w2);
}

/// Deploys on one worker, kills the controller with SIGKILL, starts it again on the same
/// port and store: the deployment and its placement come back, the worker re-registers,
/// the replica is served again without being loaded twice.
async fn restart_loses_nothing(store_args: &[&str]) {
    let mut control = RunningController::start(&[store_args, &["--lease", "3"]].concat());
    let addr = control.addr.clone();
    let worker = worker(&control, "w1", "2x80GiB");
    let model = common::smollm2();
    let mut deployments = control.deployments().await;
    deployments
        .apply(pb::ApplyRequest { name: "chat".into(), spec: Some(spec(model.to_str().unwrap(), 1, Binpack)) })
        .await
        .expect("Apply");
    let before = wait_for(&mut deployments, "chat", LOAD, "ready", ready).await;
    let mut inference = control.inference().await;
    let (answer, _) = chat(&mut inference, "chat", "Name a primary color.", 12).await.expect("chat");

    control.kill();
    let control = RunningController::start_on(&addr, &[store_args, &["--lease", "3"]].concat());
    let mut deployments = control.deployments().await;
    let after = wait_for(&mut deployments, "chat", Duration::from_secs(30), "ready after restart", ready).await;
    assert_eq!(placements(&after), placements(&before));
    assert_eq!(after.generation, before.generation);
    assert_eq!(after.created_ms, before.created_ms);
    let mut inference = control.inference().await;
    let (again, _) = chat(&mut inference, "chat", "Name a primary color.", 12).await.expect("chat after restart");
    assert_eq!(again, answer);
    // Loaded once: the worker logged one load, and holds one copy.
    let loads = worker.stderr().matches("model=chat/0").filter(|_| true).count();
    let serving = worker.stderr().lines().filter(|l| l.contains("serving") && l.contains("model=chat/0")).count();
    assert_eq!(serving, 1, "the worker loaded chat/0 {serving} times ({loads} log lines):\n{}", worker.stderr());
    let mut client = worker.client().await;
    let st = common::worker::status(&mut client).await;
    let ids: Vec<String> = st.models.iter().filter_map(|m| m.info.as_ref().map(|i| i.model_id.clone())).collect();
    assert_eq!(ids, ["chat/0"]);
    assert!(control.stderr().contains("restored state"), "{}", control.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restart_loses_nothing_with_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("state.redb");
    restart_loses_nothing(&["--store", store.to_str().unwrap()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_restart_loses_nothing_with_etcd() {
    let etcd = common::etcd::EtcdServer::start();
    let prefix = "/gantry-restart-test/";
    restart_loses_nothing(&["--etcd", &etcd.url(), "--etcd-prefix", prefix]).await;
}

/// Two controllers on one etcd: one leads and listens, the other waits as a standby. When
/// the leader is killed, the standby takes over once its etcd lease runs out, restores the
/// deployments, and the worker (given both addresses) registers with it; the replica it
/// already holds is served again without a second load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_a_standby_controller_takes_over_when_the_leader_dies() {
    let etcd = common::etcd::EtcdServer::start();
    let url = etcd.url();
    let args = ["--etcd", url.as_str(), "--etcd-prefix", "/gantry-ha/", "--lease", "3"];
    let (pa, pb) = (common::etcd::free_port(), common::etcd::free_port());
    let mut leader = RunningController::start_on(&format!("127.0.0.1:{pa}"), &args);
    let mut cmd = common::gantry();
    cmd.args(["controller", "--listen", &format!("127.0.0.1:{pb}"), "--http", "off"]).args(args);
    let mut standby = RunningController::spawn(cmd, Some("gantry controller standby"));
    let said = standby.stdout().join("\n");
    assert!(said.contains("leads; waiting to take over"), "{said}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", pb)).is_err(), "a standby does not listen");

    let controllers = format!("http://127.0.0.1:{pa},http://127.0.0.1:{pb}");
    let worker = RunningWorker::start(&["--controller", &controllers, "--worker-id", "w1", "--gpus", "1x24GiB"]);
    let mut deployments = leader.deployments().await;
    let model = common::smollm2();
    deployments
        .apply(pb::ApplyRequest { name: "chat".into(), spec: Some(spec(model.to_str().unwrap(), 1, Binpack)) })
        .await
        .unwrap();
    let before = wait_for(&mut deployments, "chat", LOAD, "ready", ready).await;

    leader.kill();
    standby.wait_listening(Duration::from_secs(30));
    assert_eq!(standby.addr, format!("127.0.0.1:{pb}"));
    let mut deployments = standby.deployments().await;
    let after = wait_for(&mut deployments, "chat", Duration::from_secs(60), "ready on the new leader", ready).await;
    assert_eq!(placements(&after), placements(&before));
    let mut inference = standby.inference().await;
    let (text, _) = chat(&mut inference, "chat", "What is the capital of France?", 24).await.unwrap();
    assert!(text.contains("Paris"), "{text}");
    // The CLI given both addresses finds the new leader (the old one is gone, a standby does
    // not listen).
    let (code, out, err) = common::run(common::gantry().args(["get", "deployments", "--controller", &controllers]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("chat") && out.contains("1/1"), "{out}");
    let loads = worker.stderr().lines().filter(|l| l.contains("serving") && l.contains("model=chat/0")).count();
    assert_eq!(loads, 1, "chat/0 was loaded {loads} times");
}

/// Split brain: the leader is paused (SIGSTOP) past its etcd lease, the standby takes over, and
/// the old leader is resumed still believing it leads. A change sent to it then is refused —
/// its writes are conditioned on its election key, which is gone — and never reaches the
/// state the new leader serves; the old leader notices and stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_cannot_write_when_it_resumes() {
    let etcd = common::etcd::EtcdServer::start();
    let url = etcd.url();
    let args = ["--etcd", url.as_str(), "--etcd-prefix", "/gantry-fence/", "--lease", "2"];
    let (pa, pb) = (common::etcd::free_port(), common::etcd::free_port());
    let old = RunningController::start_on(&format!("127.0.0.1:{pa}"), &args);
    let mut cmd = common::gantry();
    cmd.args(["controller", "--listen", &format!("127.0.0.1:{pb}"), "--http", "off"]).args(args);
    let mut new = RunningController::spawn(cmd, Some("gantry controller standby"));
    let model = common::smollm2();
    let apply =
        |name: &str| pb::ApplyRequest { name: name.into(), spec: Some(spec(model.to_str().unwrap(), 1, Binpack)) };
    let mut to_old = old.deployments().await;
    to_old.apply(apply("before")).await.expect("the leader takes changes");

    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill").args([sig, &old.pid().to_string()]).status().unwrap();
        assert!(ok.success(), "kill {sig}");
    };
    signal("-STOP");
    new.wait_listening(Duration::from_secs(30));
    let mut to_new = new.deployments().await;
    to_new.apply(apply("after")).await.expect("the new leader takes changes");
    signal("-CONT");
    // At once, before its lease keeper can tell it: the old leader still answers, and refuses.
    let stale = to_old.apply(apply("stale")).await;
    let e = stale.expect_err("a change to the paused leader");
    eprintln!("the paused leader answered: {:?}: {}", e.code(), e.message());
    assert!(
        e.message().contains("no longer leads") || e.code() == tonic::Code::Unavailable,
        "{:?}: {}",
        e.code(),
        e.message()
    );
    let names: Vec<String> = to_new
        .list(pb::ListDeploymentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .deployments
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, ["after", "before"]);
    let started = std::time::Instant::now();
    while !old.stderr().contains("lost leadership") {
        assert!(started.elapsed() < Duration::from_secs(20), "the old leader did not step down:\n{}", old.stderr());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
