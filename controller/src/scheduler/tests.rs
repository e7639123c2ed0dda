//! The scheduler's decisions on states built by hand: no processes, no store, no links — the
//! placements and reasons it records and the effects it asks for.

use std::time::{Duration, Instant};

use gantry_proto::v1 as pb;
use pb::controller_message::Message as ToWorker;

use super::{Effect, expire, reconcile};
use crate::cluster::persist::StoreOp;
use crate::cluster::state::{Deployment, ReplicaState, State, Worker};
use crate::config::ControllerConfig;
use crate::spec::{DeploymentRecord, DeploymentSpec, size_model};

const GIB: u64 = 1 << 30;

fn config() -> ControllerConfig {
    ControllerConfig { lease: Duration::from_secs(6), ..ControllerConfig::default() }
}

/// A connected worker with one declared GPU of `total` bytes, all free.
fn worker(st: &mut State, id: &str, total: u64, now: Instant) {
    let gpu = pb::GpuStatus {
        index: 0,
        name: "gpu0".into(),
        total_bytes: total,
        free_bytes: total,
        source: "declared".into(),
        ..Default::default()
    };
    st.workers.insert(
        id.into(),
        Worker {
            id: id.into(),
            address: format!("{id}:50052"),
            version: "test".into(),
            labels: Default::default(),
            status: pb::StatusResponse { gpus: vec![gpu], ..Default::default() },
            connected: true,
            session: 1,
            last_seen: now,
            lost: false,
            credential: None,
            trusted: true,
        },
    );
}

/// Llama 3 8B from the catalog at 8K context: ~18.5 GiB a replica with the margin.
fn llama_8b(st: &mut State, name: &str, replicas: u32) {
    let spec = DeploymentSpec {
        source: "meta-llama/Meta-Llama-3-8B-Instruct".into(),
        context_length: 8192,
        replicas,
        ..Default::default()
    };
    let sized = size_model(&spec);
    assert!(sized.is_ok(), "{sized:?}");
    let record = DeploymentRecord { name: name.into(), spec, generation: 1, created_ms: 0 };
    st.deployments.insert(name.into(), Deployment::new(record, sized));
}

/// The load commands among `effects`: (worker, model id, device).
fn loads(effects: &[Effect]) -> Vec<(String, String, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { worker, message: ToWorker::Load(cmd) } => {
                let r = cmd.request.as_ref()?;
                Some((worker.clone(), r.model_id.clone(), r.device.clone()))
            }
            _ => None,
        })
        .collect()
}

/// The unload commands among `effects`: (worker, model id).
fn unloads(effects: &[Effect]) -> Vec<(String, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { worker, message: ToWorker::Unload(cmd) } => {
                Some((worker.clone(), cmd.request.as_ref()?.model_id.clone()))
            }
            _ => None,
        })
        .collect()
}

fn replica<'a>(st: &'a State, name: &str, i: u32) -> &'a crate::cluster::state::Replica {
    &st.deployments[name].replicas[&i]
}

#[test]
fn a_pending_replica_is_placed_recorded_and_sent_to_its_worker() {
    let now = Instant::now();
    let mut st = State::default();
    worker(&mut st, "w1", 24 * GIB, now);
    llama_8b(&mut st, "a", 1);
    let effects = reconcile(&mut st, &config(), now);

    let r = replica(&st, "a", 0);
    assert_eq!(r.state, ReplicaState::Loading);
    let stage = &r.placement.as_ref().unwrap().stages[0];
    assert_eq!((stage.node.as_str(), stage.gpu), ("w1", 0));
    assert!(stage.bytes > 12 * GIB && stage.bytes < 24 * GIB, "{}", stage.bytes);
    assert_eq!(r.reason, "loading on w1 gpu:0");
    assert_eq!(loads(&effects), [("w1".into(), "a/0".into(), "gpu:0".into())]);
    assert!(
        effects.iter().any(|e| matches!(e, Effect::Persist(StoreOp::Put(k, _)) if k == "placements/a/0")),
        "the placement is written: {effects:?}"
    );
    assert_eq!(st.commands.len(), 1, "the load is in flight");
    let events: Vec<&str> = st.deployments["a"].events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(events, ["Placed"]);
}

#[test]
fn memory_is_promised_once_before_the_worker_reports_it_used() {
    let now = Instant::now();
    let mut st = State::default();
    worker(&mut st, "w1", 24 * GIB, now);
    llama_8b(&mut st, "a", 1);
    llama_8b(&mut st, "b", 1);
    let effects = reconcile(&mut st, &config(), now);
    // The worker still reports 24 GiB free, yet only `a` (first by name) gets it.
    assert_eq!(loads(&effects).len(), 1);
    let b = replica(&st, "b", 0);
    assert_eq!(b.state, ReplicaState::Pending);
    assert!(b.reason.starts_with("unschedulable: ") && b.reason.contains("w1: 1×24.0 GiB"), "{}", b.reason);
    assert!(effects.contains(&Effect::PlacementFailed("unschedulable")));
    // Checked again, the same reason is not counted or told again.
    let again = reconcile(&mut st, &config(), now);
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(st.deployments["b"].events.len(), 1);
}

#[test]
fn without_workers_a_replica_waits_and_says_why() {
    let mut st = State::default();
    llama_8b(&mut st, "a", 1);
    let effects = reconcile(&mut st, &config(), Instant::now());
    assert_eq!(effects, [Effect::PlacementFailed("no_workers")]);
    assert_eq!(replica(&st, "a", 0).reason, "no workers are connected");
}

#[test]
fn scaling_down_unloads_the_highest_replicas_and_forgets_their_placements() {
    let now = Instant::now();
    let mut st = State::default();
    worker(&mut st, "w1", 80 * GIB, now);
    llama_8b(&mut st, "a", 3);
    assert_eq!(loads(&reconcile(&mut st, &config(), now)).len(), 3);
    st.deployments.get_mut("a").unwrap().record.spec.replicas = 1;
    let effects = reconcile(&mut st, &config(), now);
    assert_eq!(unloads(&effects), [("w1".into(), "a/2".into()), ("w1".into(), "a/1".into())]);
    for i in [2, 1] {
        let key = format!("placements/a/{i}");
        assert!(effects.contains(&Effect::Persist(StoreOp::Delete(key))), "{effects:?}");
    }
    assert_eq!(st.deployments["a"].replicas.keys().copied().collect::<Vec<_>>(), [0]);
}

#[test]
fn a_new_generation_replaces_replicas_placed_for_the_old_one() {
    let now = Instant::now();
    let mut st = State::default();
    worker(&mut st, "w1", 80 * GIB, now);
    llama_8b(&mut st, "a", 1);
    reconcile(&mut st, &config(), now);
    st.deployments.get_mut("a").unwrap().record.generation = 2;
    let effects = reconcile(&mut st, &config(), now);
    assert_eq!(unloads(&effects), [("w1".into(), "a/0".into())]);
    assert_eq!(loads(&effects), [("w1".into(), "a/0".into(), "gpu:0".into())], "placed again at once");
    assert_eq!(replica(&st, "a", 0).placement.as_ref().unwrap().generation, 2);
}

#[test]
fn a_disconnected_worker_is_waited_for_not_sent_to() {
    let now = Instant::now();
    let mut st = State::default();
    worker(&mut st, "w1", 24 * GIB, now);
    llama_8b(&mut st, "a", 1);
    reconcile(&mut st, &config(), now);
    // The link drops; the placement stays (the lease has not run out) and a resend waits.
    st.workers.get_mut("w1").unwrap().connected = false;
    let effects = super::load_replica(&mut st, "a", 0, Some("w1"));
    assert!(loads(&effects).is_empty());
    assert_eq!(replica(&st, "a", 0).reason, "waiting for w1 to reconnect");
}

#[test]
fn a_worker_past_its_lease_is_lost_and_its_replicas_placed_elsewhere() {
    let start = Instant::now();
    let mut st = State::default();
    worker(&mut st, "w1", 24 * GIB, start);
    llama_8b(&mut st, "a", 1);
    reconcile(&mut st, &config(), start);
    worker(&mut st, "w2", 24 * GIB, start + Duration::from_secs(7));
    let later = start + Duration::from_secs(7);
    let effects = expire(&mut st, &config(), later, start);
    assert!(effects.contains(&Effect::CloseLink("w1".into())));
    assert!(effects.contains(&Effect::Persist(StoreOp::Delete("placements/a/0".into()))));
    assert!(st.workers["w1"].lost);
    let r = replica(&st, "a", 0);
    assert_eq!(r.state, ReplicaState::Pending);
    assert!(r.reason.starts_with("worker w1 lost (silent for 7.0 s, lease 6.0 s)"), "{}", r.reason);
    assert!(st.commands.is_empty(), "the lost worker's commands are void");
    let effects = reconcile(&mut st, &config(), later);
    assert_eq!(loads(&effects), [("w2".into(), "a/0".into(), "gpu:0".into())]);
}

#[test]
fn a_failed_replica_waits_for_its_retry_time() {
    let now = Instant::now();
    let mut st = State::default();
    worker(&mut st, "w1", 24 * GIB, now);
    llama_8b(&mut st, "a", 1);
    reconcile(&mut st, &config(), now);
    let r = st.replica_mut("a", 0).unwrap();
    r.placement = None;
    r.state = ReplicaState::Failed;
    r.retry_at = Some(now + Duration::from_secs(2));
    assert!(loads(&reconcile(&mut st, &config(), now + Duration::from_secs(1))).is_empty());
    assert_eq!(loads(&reconcile(&mut st, &config(), now + Duration::from_secs(2))).len(), 1);
}
