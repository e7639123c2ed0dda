//! The scheduler's promises, in process: memory is reserved before the load is sent, so two
//! deployments are never promised the same memory even while the worker still reports it
//! free; a failed load releases it and the waiting replica takes it; a lost worker's
//! replicas are placed again. The worker here is the link's message stream itself: what the
//! controller sends is read from the channel, what the worker would answer is fed back.
//! A split replica gets one load per worker, chained by the next stage's address, and is
//! ready only when every stage is loaded; a failed or lost stage unloads the others.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use gantry_controller::spec::DeploymentSpec;
use gantry_controller::statestore::embedded::EmbeddedStore;
use gantry_controller::{Cluster, ControllerConfig};
use gantry_proto::v1 as pb;
use pb::controller_message::Message as ToWorker;
use tokio::sync::mpsc;

type Link = mpsc::UnboundedReceiver<Result<pb::ControllerMessage, tonic::Status>>;

fn gpu_status(total: u64, free: u64) -> pb::StatusResponse {
    pb::StatusResponse {
        gpus: vec![pb::GpuStatus {
            index: 0,
            name: "gpu0".into(),
            total_bytes: total,
            free_bytes: free,
            source: "declared".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn register(cluster: &Cluster, id: &str, total: u64) -> (u64, Link) {
    let (tx, rx) = mpsc::unbounded_channel();
    let reg = pb::WorkerRegistration {
        worker_id: id.into(),
        address: "127.0.0.1:9".into(),
        version: "test".into(),
        status: Some(gpu_status(total, total)),
        ..Default::default()
    };
    (cluster.register(reg, tx).unwrap(), rx)
}

/// The next load command on a link (skipping `Registered`).
async fn next_load(link: &mut Link) -> pb::LoadCommand {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), link.recv()).await.unwrap().unwrap().unwrap();
        match msg.message.unwrap() {
            ToWorker::Load(cmd) => return cmd,
            ToWorker::Registered(_) => continue,
            ToWorker::Unload(u) => panic!("unexpected unload {u:?}"),
        }
    }
}

fn llama_8b(replicas: u32) -> DeploymentSpec {
    DeploymentSpec {
        source: "meta-llama/Meta-Llama-3-8B-Instruct".into(),
        dtype: String::new(),
        context_length: 8192,
        replicas,
        ..Default::default()
    }
}

fn replica(cluster: &Cluster, name: &str) -> pb::Replica {
    cluster.get(name).unwrap().status.unwrap().replica_status[0].clone()
}

async fn start() -> (tempfile::TempDir, Arc<Cluster>) {
    start_with(ControllerConfig { lease: Duration::from_millis(600), ..ControllerConfig::default() }).await
}

/// A cluster with `config` on a fresh embedded store (kept while the directory lives).
async fn start_with(config: ControllerConfig) -> (tempfile::TempDir, Arc<Cluster>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
    (dir, Cluster::start(store, config).await.unwrap())
}

#[tokio::test]
async fn memory_is_promised_once_and_released_when_a_load_fails() {
    let (_dir, cluster) = start().await;
    let (session, mut link) = register(&cluster, "w1", 24 << 30);

    // Llama 3 8B at 8K needs ~18.5 GiB with the margin: one fits a 24 GiB GPU, two do not.
    let a = cluster.apply("a", llama_8b(1)).await.unwrap();
    let need = a.status.unwrap().replica_bytes;
    assert!(need > 12 << 30 && need < 24 << 30, "{need}");
    let load = next_load(&mut link).await;
    let req = load.request.clone().unwrap();
    assert_eq!((req.model_id.as_str(), req.device.as_str(), req.context_length), ("a/0", "gpu:0", 8192));
    assert_eq!(replica(&cluster, "a").state, pb::ReplicaState::Loading as i32);

    // The worker still reports all 24 GiB free (the load has not finished), yet `b` waits.
    cluster.heartbeat("w1", session, gpu_status(24 << 30, 24 << 30));
    cluster.apply("b", llama_8b(1)).await.unwrap();
    let b = replica(&cluster, "b");
    assert_eq!(b.state, pb::ReplicaState::Pending as i32);
    assert!(b.reason.contains("unschedulable") && b.reason.contains("w1: 1×24.0 GiB"), "{}", b.reason);
    let workers = cluster.workers();
    assert_eq!(workers[0].gpus[0].reserved_bytes, need);
    assert_eq!(workers[0].gpus[0].replicas, ["a/0"]);

    // `a` fails to load: its reservation goes, and `b` is placed in the memory it frees.
    cluster.command_result(
        "w1",
        pb::CommandResult {
            command_id: load.command_id,
            error: "out of memory".into(),
            code: tonic::Code::ResourceExhausted as i32,
            model: None,
        },
    );
    let a = replica(&cluster, "a");
    assert_eq!(a.state, pb::ReplicaState::Failed as i32);
    assert!(a.stages.is_empty());
    assert!(a.reason.contains("replica 0 failed to load on w1: out of memory"), "{}", a.reason);
    let load_b = next_load(&mut link).await;
    assert_eq!(load_b.request.unwrap().model_id, "b/0");
    assert_eq!(cluster.workers()[0].gpus[0].replicas, ["b/0"]);

    // `b` loads; the heartbeat now shows it, and the worker's free memory is what counts.
    let info = pb::ModelInfo { model_id: "b/0".into(), ..Default::default() };
    cluster.command_result(
        "w1",
        pb::CommandResult { command_id: load_b.command_id, model: Some(info.clone()), ..Default::default() },
    );
    assert_eq!(replica(&cluster, "b").state, pb::ReplicaState::Ready as i32);
    let mut st = gpu_status(24 << 30, (24 << 30) - need);
    st.models.push(pb::LoadedModel { info: Some(info), ..Default::default() });
    cluster.heartbeat("w1", session, st);
    // After its backoff `a` is tried again and still does not fit beside `b`.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    cluster.heartbeat("w1", session, gpu_status(24 << 30, (24 << 30) - need));
    let a = replica(&cluster, "a");
    assert!(a.stages.is_empty(), "{a:?}");
}

#[tokio::test]
async fn a_lost_worker_gives_its_replicas_to_another() {
    let (_dir, cluster) = start().await;
    let (_s1, mut l1) = register(&cluster, "w1", 24 << 30);
    cluster.apply("a", llama_8b(1)).await.unwrap();
    let load = next_load(&mut l1).await;
    let info = pb::ModelInfo { model_id: "a/0".into(), ..Default::default() };
    cluster.command_result(
        "w1",
        pb::CommandResult { command_id: load.command_id, model: Some(info), ..Default::default() },
    );
    assert_eq!(cluster.get("a").unwrap().status.unwrap().ready_replicas, 1);
    let (s2, mut l2) = register(&cluster, "w2", 48 << 30);

    // w1 stays silent past its 600 ms lease; w2 keeps beating.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        cluster.heartbeat("w2", s2, gpu_status(48 << 30, 48 << 30));
    }
    let load = next_load(&mut l2).await;
    assert_eq!(load.request.unwrap().model_id, "a/0");
    let d = cluster.get("a").unwrap();
    let r = &d.status.as_ref().unwrap().replica_status[0];
    assert_eq!(r.stages[0].worker_id, "w2");
    let events: Vec<String> = d.status.unwrap().events.into_iter().map(|e| e.kind).collect();
    assert!(events.contains(&"WorkerLost".to_string()), "{events:?}");
    let w1 = cluster.workers().into_iter().find(|w| w.worker_id == "w1").unwrap();
    assert_eq!(w1.state, "lost");
    assert_eq!(w1.gpus[0].reserved_bytes, 0);
}

#[tokio::test]
async fn a_returning_worker_keeps_the_replica_it_still_holds() {
    let (_dir, cluster) = start().await;
    let (_s1, mut l1) = register(&cluster, "w1", 24 << 30);
    cluster.apply("a", llama_8b(1)).await.unwrap();
    let load = next_load(&mut l1).await;
    let info = pb::ModelInfo {
        model_id: "a/0".into(),
        source: "meta-llama/Meta-Llama-3-8B-Instruct".into(),
        device: "gpu:0".into(),
        layer_end: 32,
        num_layers: 32,
        ..Default::default()
    };
    cluster.command_result(
        "w1",
        pb::CommandResult { command_id: load.command_id, model: Some(info.clone()), ..Default::default() },
    );
    // Silent past its lease: lost, and with no other worker the replica waits.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = replica(&cluster, "a");
    assert_eq!(r.state, pb::ReplicaState::Pending as i32);
    assert!(r.stages.is_empty());

    // It comes back still holding a/0: the controller takes it as is, sends no load, and
    // reserves its memory again.
    let (tx, mut link) = mpsc::unbounded_channel();
    let mut status = gpu_status(24 << 30, 4 << 30);
    status.models.push(pb::LoadedModel { info: Some(info), ..Default::default() });
    let reg = pb::WorkerRegistration {
        worker_id: "w1".into(),
        address: "127.0.0.1:9".into(),
        status: Some(status),
        ..Default::default()
    };
    cluster.register(reg, tx).unwrap();
    let r = replica(&cluster, "a");
    assert_eq!(r.state, pb::ReplicaState::Ready as i32, "{r:?}");
    assert_eq!((r.stages[0].worker_id.as_str(), r.stages[0].gpu_index, r.stages[0].layer_end), ("w1", 0, 32));
    let events: Vec<String> = cluster.get("a").unwrap().status.unwrap().events.into_iter().map(|e| e.kind).collect();
    assert!(events.ends_with(&["WorkerLost".to_string(), "Pending".to_string(), "Adopted".to_string()]), "{events:?}");
    // Only `Registered` went down the new link.
    let first = link.recv().await.unwrap().unwrap();
    assert!(matches!(first.message, Some(ToWorker::Registered(_))));
    assert!(link.try_recv().is_err(), "no load or unload was sent");
    assert_eq!(cluster.workers()[0].gpus[0].reserved_bytes, cluster.get("a").unwrap().status.unwrap().replica_bytes);
}

/// Registers `id` at `address` with declared GPUs of `sizes` bytes.
fn register_gpus(cluster: &Cluster, id: &str, sizes: &[u64], address: &str) -> (u64, Link) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut status = gpu_status(0, 0);
    status.gpus = sizes
        .iter()
        .enumerate()
        .map(|(i, &b)| pb::GpuStatus {
            index: i as u32,
            name: format!("gpu{i}"),
            total_bytes: b,
            free_bytes: b,
            source: "declared".into(),
            ..Default::default()
        })
        .collect();
    let reg = pb::WorkerRegistration {
        worker_id: id.into(),
        address: address.into(),
        version: "test".into(),
        status: Some(status),
        ..Default::default()
    };
    (cluster.register(reg, tx).unwrap(), rx)
}

fn llama_70b(allow_multi_node: bool) -> DeploymentSpec {
    DeploymentSpec {
        source: "meta-llama/Meta-Llama-3-70B-Instruct".into(),
        context_length: 8192,
        replicas: 1,
        policy: gantry_core::placement::Policy { allow_multi_node, ..Default::default() },
        ..Default::default()
    }
}

fn segments(req: &pb::LoadModelRequest) -> Vec<(String, u32, u32)> {
    req.segments.iter().map(|s| (s.device.clone(), s.layer_start, s.layer_end)).collect()
}

fn loaded(cluster: &Cluster, worker: &str, command_id: u64) {
    let info = pb::ModelInfo { model_id: "big/0".into(), ..Default::default() };
    cluster.command_result(worker, pb::CommandResult { command_id, model: Some(info), ..Default::default() });
}

/// The next unload command on a link.
async fn next_unload(link: &mut Link) -> pb::UnloadModelRequest {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), link.recv()).await.unwrap().unwrap().unwrap();
        match msg.message.unwrap() {
            ToWorker::Unload(u) => return u.request.unwrap(),
            ToWorker::Registered(_) => continue,
            ToWorker::Load(l) => panic!("unexpected load {l:?}"),
        }
    }
}

#[tokio::test]
async fn two_gpus_of_one_worker_get_one_load_with_two_segments() {
    let (_dir, cluster) = start().await;
    let (_s, mut link) = register_gpus(&cluster, "w1", &[80 << 30, 80 << 30], "10.0.0.1:7000");
    cluster.apply("big", llama_70b(false)).await.unwrap();
    let load = next_load(&mut link).await;
    let req = load.request.unwrap();
    assert_eq!(segments(&req), [("gpu:0".to_string(), 0, 40), ("gpu:1".to_string(), 40, 80)]);
    assert_eq!((req.model_id.as_str(), req.next_stage.as_str(), req.context_length), ("big/0", "", 8192));
    assert!(link.try_recv().is_err(), "one command for both GPUs");
    let r = replica(&cluster, "big");
    assert!(r.reason.starts_with("loading 2 stages: w1 gpu:0 layers 0-39, w1 gpu:1 layers 40-79"), "{}", r.reason);
    loaded(&cluster, "w1", load.command_id);
    assert_eq!(replica(&cluster, "big").state, pb::ReplicaState::Ready as i32);
}

#[tokio::test]
async fn linked_gpus_get_one_tensor_parallel_segment_and_each_reserves_a_ranks_share() {
    let (_dir, cluster) = start().await;
    let (tx, mut link) = mpsc::unbounded_channel();
    let mut status = gpu_status(0, 0);
    status.gpus = (0..3)
        .map(|i| pb::GpuStatus {
            index: i,
            name: format!("gpu{i}"),
            total_bytes: 80 << 30,
            free_bytes: 80 << 30,
            source: "nvml".into(),
            ..Default::default()
        })
        .collect();
    status.gpus_linked = true;
    let reg = pb::WorkerRegistration {
        worker_id: "w1".into(),
        address: "10.0.0.1:7000".into(),
        version: "test".into(),
        status: Some(status),
        ..Default::default()
    };
    cluster.register(reg, tx).unwrap();
    cluster.apply("big", llama_70b(false)).await.unwrap();
    let load = next_load(&mut link).await;
    let req = load.request.unwrap();
    assert_eq!(segments(&req), [("gpu:0".to_string(), 0, 80)], "one segment of every layer");
    assert_eq!(req.segments[0].tensor_parallel, ["gpu:0", "gpu:1"], "two ranks: the fewest that hold it");
    let r = replica(&cluster, "big");
    assert!(r.reason.starts_with("loading 1 stage: w1 gpu:0,1 layers 0-79 (tensor-parallel)"), "{}", r.reason);
    assert_eq!(r.stages.iter().map(|s| (s.gpu_index, s.tensor_parallel)).collect::<Vec<_>>(), [(0, 2), (1, 2)]);
    let gpus = &cluster.workers()[0].gpus;
    assert!(gpus[0].reserved_bytes == gpus[1].reserved_bytes && gpus[0].reserved_bytes > 70 << 30, "{gpus:?}");
    assert_eq!(gpus[2].reserved_bytes, 0);
    loaded(&cluster, "w1", load.command_id);
    assert_eq!(replica(&cluster, "big").state, pb::ReplicaState::Ready as i32);
}

#[tokio::test]
async fn a_replica_split_over_two_workers_is_ready_when_both_stages_are() {
    let (_dir, cluster) = start().await;
    let (_s1, mut l1) = register_gpus(&cluster, "w1", &[80 << 30], "10.0.0.1:7000");
    let (s2, mut l2) = register_gpus(&cluster, "w2", &[80 << 30], "10.0.0.2:7000");
    let mut spec = llama_70b(true);
    spec.stage_wire_dtype = "bf16".into();
    cluster.apply("big", spec).await.unwrap();
    let (first, second) = (next_load(&mut l1).await, next_load(&mut l2).await);
    let (a, b) = (first.request.clone().unwrap(), second.request.clone().unwrap());
    // w1 runs layers 0..40 and hands on to w2's address; w2 ends the model.
    assert_eq!(segments(&a), [("gpu:0".to_string(), 0, 40)]);
    assert_eq!((a.next_stage.as_str(), a.wire_dtype.as_str()), ("10.0.0.2:7000", "bf16"));
    assert_eq!(segments(&b), [("gpu:0".to_string(), 40, 80)]);
    assert_eq!(b.next_stage, "");

    loaded(&cluster, "w2", second.command_id);
    let r = replica(&cluster, "big");
    assert_eq!((r.state, r.reason.as_str()), (pb::ReplicaState::Loading as i32, "1 of 2 stages loaded"));
    assert!(cluster.pick("big", &[], None).is_err(), "no requests before every stage is loaded");
    loaded(&cluster, "w1", first.command_id);
    assert_eq!(replica(&cluster, "big").state, pb::ReplicaState::Ready as i32);
    assert_eq!(cluster.pick("big", &[], None).unwrap().worker, "w1", "requests go to the first stage");

    // w1 goes silent past its lease: the replica is released and w2 unloads its stage.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        cluster.heartbeat("w2", s2, gpu_status(80 << 30, 80 << 30));
    }
    assert_eq!(next_unload(&mut l2).await.model_id, "big/0");
    let r = replica(&cluster, "big");
    assert!(r.stages.is_empty() && r.reason.contains("unschedulable"), "{r:?}");
}

#[tokio::test]
async fn a_stage_that_fails_to_load_unloads_the_others() {
    let (_dir, cluster) = start().await;
    let (_s1, mut l1) = register_gpus(&cluster, "w1", &[80 << 30], "10.0.0.1:7000");
    let (_s2, mut l2) = register_gpus(&cluster, "w2", &[80 << 30], "10.0.0.2:7000");
    cluster.apply("big", llama_70b(true)).await.unwrap();
    let (first, second) = (next_load(&mut l1).await, next_load(&mut l2).await);
    loaded(&cluster, "w1", first.command_id);
    cluster.command_result(
        "w2",
        pb::CommandResult {
            command_id: second.command_id,
            error: "out of memory".into(),
            code: tonic::Code::ResourceExhausted as i32,
            model: None,
        },
    );
    assert_eq!(next_unload(&mut l1).await.model_id, "big/0");
    let r = replica(&cluster, "big");
    assert_eq!(r.state, pb::ReplicaState::Failed as i32);
    assert!(r.reason.contains("replica 0 failed to load on w2: out of memory"), "{}", r.reason);
    assert!(cluster.workers().iter().all(|w| w.gpus.iter().all(|g| g.reserved_bytes == 0)));
}

/// An autoscaled Llama 3 8B at zero replicas.
fn llama_8b_from_zero() -> DeploymentSpec {
    DeploymentSpec {
        autoscaling: Some(gantry_core::autoscale::Policy {
            min_replicas: 0,
            max_replicas: 1,
            target: 4.0,
            ..Default::default()
        }),
        ..llama_8b(0)
    }
}

#[tokio::test]
async fn cold_requests_wait_for_the_load_within_their_bounds() {
    let (_dir, cluster) = start_with(ControllerConfig { max_waiting: 2, ..ControllerConfig::default() }).await;
    let (_session, mut link) = register(&cluster, "w1", 24 << 30);
    cluster.apply("a", llama_8b_from_zero()).await.unwrap();
    assert_eq!(cluster.get("a").unwrap().status.unwrap().phase, "ScaledToZero");
    assert!(cluster.autoscaled("a"));

    // The first request asks for a replica at once and waits while it loads.
    let c = cluster.clone();
    let first = tokio::spawn(async move { c.wait_for_replica("a", &[], None).await });
    let load = next_load(&mut link).await;
    assert_eq!(load.request.as_ref().unwrap().model_id, "a/0");
    let d = cluster.get("a").unwrap();
    assert_eq!(d.spec.unwrap().replicas, 1);
    let events = d.status.unwrap().events;
    let last = events.iter().find(|e| e.kind == "Autoscaled").unwrap();
    assert!(last.message.ends_with("0 → 1 replica(s), a request arrived while scaled to zero"), "{}", last.message);

    // A second waits too; a third is past --max-waiting and refused at once.
    let c = cluster.clone();
    let soon = tokio::time::Instant::now() + Duration::from_millis(300);
    let second = tokio::spawn(async move { c.wait_for_replica("a", &[], Some(soon)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let third = cluster.wait_for_replica("a", &[], None).await.unwrap_err();
    assert_eq!(
        third.to_string(),
        "2 requests already wait for a replica of `a` to come up (the controller's --max-waiting); retry later"
    );
    assert_eq!(tonic::Status::from(third).code(), tonic::Code::ResourceExhausted);

    // The second's deadline passes first: DEADLINE_EXCEEDED, with what the replica is doing.
    let e = second.await.unwrap().unwrap_err();
    assert_eq!(tonic::Status::from(e.clone()).code(), tonic::Code::DeadlineExceeded);
    assert!(e.to_string().starts_with("the request's deadline passed after 0.3 s waiting for a replica of `a` to come up: no ready replica of `a`: replica 0 loading"), "{e}");

    // The load finishes: the first goes on.
    let info = pb::ModelInfo { model_id: "a/0".into(), ..Default::default() };
    cluster.command_result(
        "w1",
        pb::CommandResult { command_id: load.command_id, model: Some(info), ..Default::default() },
    );
    tokio::time::timeout(Duration::from_secs(5), first).await.unwrap().unwrap().unwrap();
    // A waiting request no longer counts once it stops waiting.
    let (name, replicas, now) = cluster.signals().pop().unwrap();
    assert_eq!((name.as_str(), replicas, now.ready, now.waiting), ("a", 1, 1, 0));
}

/// A worker id stays bound to the credential that first registered it, across a restart of
/// the controller (the binding is in the store with the worker's record); an id registered by
/// an unauthenticated link is bound to nothing.
#[tokio::test]
async fn a_worker_ids_credential_survives_a_controller_restart() {
    use gantry_controller::cluster::workers::LinkAuth;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.redb");
    let reg = |id: &str| pb::WorkerRegistration {
        worker_id: id.into(),
        address: "127.0.0.1:9".into(),
        version: "test".into(),
        status: Some(gpu_status(24 << 30, 24 << 30)),
        ..Default::default()
    };
    let key = |name: &str| LinkAuth { credential: Some(format!("key {name}")), trusted: true };
    let store = Arc::new(EmbeddedStore::open(&path).unwrap());
    {
        let cluster = Cluster::start(store.clone(), ControllerConfig::default()).await.unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        cluster.register_as(reg("w1"), tx, key("node-1")).unwrap();
        let (tx, _rx2) = mpsc::unbounded_channel();
        cluster.register_as(reg("w2"), tx, LinkAuth { credential: None, trusted: false }).unwrap();
        // The records are written behind: wait for both.
        for _ in 0..100 {
            if cluster.store().list("workers/").await.unwrap().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cluster.shutdown();
    }
    // A new controller on the same store.
    let cluster = Cluster::start(store, ControllerConfig::default()).await.unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    let e = cluster.register_as(reg("w1"), tx, key("node-2")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "worker id `w1` belongs to another credential: a worker registers with the key or certificate it first registered with"
    );
    let (tx, _rx) = mpsc::unbounded_channel();
    cluster.register_as(reg("w1"), tx, key("node-1")).unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    cluster.register_as(reg("w2"), tx, key("node-2")).unwrap();
}

#[tokio::test]
async fn a_session_sticks_to_its_replica_and_yields_when_it_is_overloaded() {
    let (_dir, cluster) = start().await;
    let (_s1, mut l1) = register(&cluster, "w1", 24 << 30);
    let (_s2, mut l2) = register(&cluster, "w2", 24 << 30);
    cluster.apply("a", llama_8b(2)).await.unwrap();
    for (worker, link) in [("w1", &mut l1), ("w2", &mut l2)] {
        let load = next_load(link).await;
        let info = pb::ModelInfo { model_id: load.request.unwrap().model_id, ..Default::default() };
        cluster.command_result(
            worker,
            pb::CommandResult { command_id: load.command_id, model: Some(info), ..Default::default() },
        );
    }
    assert_eq!(cluster.get("a").unwrap().status.unwrap().ready_replicas, 2);

    // Every request of a session goes where its first went.
    let first = cluster.pick("a", &[], Some("chat-1")).unwrap();
    for _ in 0..20 {
        assert_eq!(cluster.pick("a", &[], Some("chat-1")).unwrap().worker, first.worker);
    }
    // Two requests in flight there, none on the other: still its replica (not past twice the
    // least loaded plus two).
    first.inflight.fetch_add(2, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(cluster.pick("a", &[], Some("chat-1")).unwrap().worker, first.worker);
    // A third: overloaded, so the session moves to the other replica, and stays there.
    first.inflight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let moved = cluster.pick("a", &[], Some("chat-1")).unwrap();
    assert_ne!(moved.worker, first.worker);
    first.inflight.fetch_sub(3, std::sync::atomic::Ordering::Relaxed);
    for _ in 0..20 {
        assert_eq!(cluster.pick("a", &[], Some("chat-1")).unwrap().worker, moved.worker);
    }
    // A replica that failed the request is left out even for its session.
    let avoid = [(moved.worker.clone(), moved.model_id.clone())];
    assert_eq!(cluster.pick("a", &avoid, Some("chat-1")).unwrap().worker, first.worker);
    // Without a session, requests spread over both (power of two choices on equal loads).
    let workers: std::collections::BTreeSet<String> =
        (0..64).map(|_| cluster.pick("a", &[], None).unwrap().worker).collect();
    assert_eq!(workers.len(), 2, "{workers:?}");
}

/// A ready replica of `a` on a worker: (worker, link session, replica id, link).
type ReadyReplica = (&'static str, u64, String, Link);

/// Three ready replicas of `a`, on w1, w2 and w3.
async fn three_ready(cluster: &Cluster) -> Vec<ReadyReplica> {
    let mut out = Vec::new();
    for w in ["w1", "w2", "w3"] {
        let (s, l) = register(cluster, w, 24 << 30);
        out.push((w, s, String::new(), l));
    }
    cluster.apply("a", llama_8b(3)).await.unwrap();
    for (worker, _, id, link) in &mut out {
        let load = next_load(link).await;
        let request = load.request.unwrap();
        assert_eq!(request.prefix_namespace, "a", "the replicas share their prefix-cache keys");
        *id = request.model_id;
        let info = pb::ModelInfo { model_id: id.clone(), ..Default::default() };
        cluster.command_result(
            worker,
            pb::CommandResult { command_id: load.command_id, model: Some(info), ..Default::default() },
        );
    }
    assert_eq!(cluster.get("a").unwrap().status.unwrap().ready_replicas, 3);
    out
}

/// A heartbeat from `r`'s worker whose replica reports holding `keys` (a snapshot), with
/// `kv_used` of its 100 KV blocks held by sequences and `queued` requests waiting.
fn report(cluster: &Cluster, r: &ReadyReplica, keys: &[u64], kv_used: u64, queued: u32) {
    let mut st = gpu_status(24 << 30, 24 << 30);
    st.models.push(pb::LoadedModel {
        info: Some(pb::ModelInfo { model_id: r.2.clone(), ..Default::default() }),
        queued,
        kv_block_tokens: 16,
        kv_blocks_total: 100,
        kv_blocks_used: kv_used,
        prefix_keys: Some(pb::PrefixKeyChanges { reset: true, added: keys.to_vec(), dropped: vec![] }),
        ..Default::default()
    });
    cluster.heartbeat(r.0, r.1, st);
}

#[tokio::test]
async fn a_prompt_goes_to_the_replica_holding_its_longest_prefix_unless_its_queue_outweighs_it() {
    use gantry_controller::router::pick::{ChosenBy, PrefixHint};
    use gantry_core::prefix::{block_keys, model_seed};
    // A lease long enough that no worker is lost while the test holds some silent.
    let (_dir, cluster) = start_with(ControllerConfig::default()).await;
    let r = three_ready(&cluster).await;
    // A 1,000-token prompt: 62 full blocks of 16.
    let tokens: Vec<u32> = (0..1000).collect();
    let keys = block_keys(model_seed("a"), &tokens, 16);
    let hint = PrefixHint { keys: keys.clone(), block_tokens: 16, prompt_tokens: tokens.len() };
    report(&cluster, &r[0], &keys[..10], 0, 0);
    report(&cluster, &r[1], &keys[..40], 0, 0);
    // w3 holds later blocks but not the first: none of the prompt's prefix.
    report(&cluster, &r[2], &keys[1..], 0, 0);
    assert_eq!(cluster.tokenizer_for("a", &[], None).map(|t| t.worker), Some("w1".into()), "the least loaded asked");
    let routed = cluster.choose("a", &[], None, Some(&hint)).unwrap();
    assert_eq!((routed.target.worker.as_str(), routed.by), ("w2", ChosenBy::Prefix));
    let score = routed.score.unwrap();
    assert_eq!((score.cached, score.queue, score.kv, score.total()), (640, 0, 0, 1280), "a cached prefix counts twice");

    // Its queue and KV pressure weigh against what it holds: w2 with 40 waiting and a full KV
    // cache (2×640 - 40×16 - 512 = 128) loses to w1 (2×160 cached, 2 waiting: 288).
    report(&cluster, &r[1], &keys[..40], 100, 40);
    report(&cluster, &r[0], &keys[..10], 0, 2);
    let routed = cluster.choose("a", &[], None, Some(&hint)).unwrap();
    assert_eq!((routed.target.worker.as_str(), routed.by), ("w1", ChosenBy::Prefix));
    // Routed there, w1 is expected to hold every block of the prompt now, before its worker says.
    let routed = cluster.choose("a", &[], None, Some(&hint)).unwrap();
    assert_eq!((routed.target.worker.as_str(), routed.score.unwrap().cached), ("w1", 992));

    // The prompts ahead weigh too: w1 (992 cached, 20 waiting, 2,000 prompt tokens to compute
    // first: 1,984 - 320 - 2,000) and w2 (640 cached, 5 waiting, a full KV cache, 1,000 ahead:
    // 1,280 - 80 - 512 - 1,000) both score below w3, which holds none of it (0): by load among
    // all three. The replica chosen is then expected to hold the prompt, and wins the next.
    let only = |w: &str| -> Vec<(String, String)> {
        r.iter().filter(|x| x.0 != w).map(|x| (x.0.to_string(), x.2.clone())).collect()
    };
    report(&cluster, &r[0], &keys, 0, 20);
    report(&cluster, &r[1], &keys[..40], 100, 5);
    cluster.pick("a", &only("w1"), None).unwrap().prefill.fetch_add(2000, std::sync::atomic::Ordering::Relaxed);
    cluster.pick("a", &only("w2"), None).unwrap().prefill.fetch_add(1000, std::sync::atomic::Ordering::Relaxed);
    let first = cluster.choose("a", &[], None, Some(&hint)).unwrap();
    assert_eq!(first.by, ChosenBy::P2c);
    assert_ne!(first.target.worker, "w1", "the less loaded of any two is never w1");
    let then = cluster.choose("a", &[], None, Some(&hint)).unwrap();
    assert_eq!((then.target.worker.as_str(), then.by), (first.target.worker.as_str(), ChosenBy::Prefix));
    for w in ["w1", "w2"] {
        let t = cluster.pick("a", &only(w), None).unwrap();
        t.prefill.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    // A prompt no replica holds: power of two choices, spreading over the replicas.
    report(&cluster, &r[0], &keys, 0, 0);
    report(&cluster, &r[1], &keys, 0, 0);
    report(&cluster, &r[2], &keys[1..], 0, 0);
    let cold: Vec<u32> = (5000..5100).collect();
    let cold = PrefixHint { keys: block_keys(model_seed("a"), &cold, 16), block_tokens: 16, prompt_tokens: 100 };
    let routed = cluster.choose("a", &[], None, Some(&cold)).unwrap();
    assert_eq!((routed.by, routed.score.unwrap().cached), (ChosenBy::P2c, 0));
    // Two replicas holding all of it at equal load tie: power of two choices between them.
    let tied: std::collections::BTreeSet<String> = (0..32)
        .map(|_| cluster.choose("a", &[], None, Some(&hint)).unwrap())
        .map(|r| {
            assert_eq!(r.by, ChosenBy::P2c);
            r.target.worker
        })
        .collect();
    assert_eq!(tied, ["w1".to_string(), "w2".to_string()].into(), "w3 (cold) is never chosen");

    // A replica its worker no longer reports (unloaded) leaves the index.
    cluster.heartbeat(r[0].0, r[0].1, gpu_status(24 << 30, 24 << 30));
    let routed = cluster.choose("a", &[], None, Some(&hint)).unwrap();
    assert_eq!((routed.target.worker.as_str(), routed.by), ("w2", ChosenBy::Prefix));
}

#[tokio::test]
async fn a_standby_is_an_idle_replica_on_another_worker_unless_busy_ones_may_be() {
    use gantry_controller::router::pick::NoStandby;
    use std::sync::atomic::Ordering;
    // A lease long enough that no worker is lost while the test holds some silent.
    let (_dir, cluster) = start_with(ControllerConfig::default()).await;
    let r = three_ready(&cluster).await;
    let id = |w: usize| (r[w].0.to_string(), r[w].2.clone());

    // A request runs on w1; w2 has requests queued, so the standby is w3 (never w1 itself).
    report(&cluster, &r[1], &[], 0, 3);
    let t = cluster.standby("a", "w1", &[], None, true).unwrap();
    assert_eq!((t.worker.as_str(), &t.model_id), ("w3", &r[2].2));
    let keep = id(2);
    assert_eq!(cluster.standby("a", "w1", &[], Some(&keep), true).unwrap().worker, "w3", "kept while idle");

    // A request routed to w3 through this controller makes it busy too: no idle standby now,
    // unless busy replicas may be one (then the kept one, which holds the earlier tokens).
    t.inflight.fetch_add(1, Ordering::Relaxed);
    assert_eq!(cluster.standby("a", "w1", &[], Some(&keep), true).err(), Some(NoStandby::Busy));
    assert_eq!(cluster.standby("a", "w1", &[], Some(&keep), false).unwrap().worker, "w3");
    // Without one kept, the least loaded: w3 (1 in flight) before w2 (3 queued).
    assert_eq!(cluster.standby("a", "w1", &[], None, false).unwrap().worker, "w3");

    // w2 idle again: the idle-only standby moves to it, away from the busy kept one.
    report(&cluster, &r[1], &[], 0, 0);
    assert_eq!(cluster.standby("a", "w1", &[], Some(&keep), true).unwrap().worker, "w2");
    // Replicas that failed this request are no standby; none left elsewhere is not "busy".
    assert_eq!(cluster.standby("a", "w1", &[id(1), id(2)], None, false).err(), Some(NoStandby::Elsewhere));
    t.inflight.fetch_sub(1, Ordering::Relaxed);
}
