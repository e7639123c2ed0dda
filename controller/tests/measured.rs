//! Measured truth in the controller, in process: a load's measurement (as a worker reports it in
//! its load result) is kept in the store and outlives a restart, with the embedded store and
//! with etcd (a real server); a deployment that fits by its estimate but not by its measurement
//! waits, its reason giving both numbers; `List` shows the error per term. The worker here is
//! the link's message stream itself (as in `scheduler.rs`): the real worker's measurement is
//! tested end to end in `tests/e2e/measured.rs`.

#![allow(clippy::unwrap_used)]

#[path = "../../tests/e2e/common/certs.rs"]
mod certs;
#[path = "../../tests/e2e/common/etcd.rs"]
mod etcd;

use std::sync::Arc;
use std::time::Duration;

use gantry_controller::spec::DeploymentSpec;
use gantry_controller::statestore::StateStore;
use gantry_controller::statestore::embedded::EmbeddedStore;
use gantry_controller::statestore::etcd::{EtcdSecurity, EtcdStore};
use gantry_controller::{Cluster, ControllerConfig};
use gantry_proto::v1 as pb;
use pb::controller_message::Message as ToWorker;
use tokio::sync::mpsc;

type Link = mpsc::UnboundedReceiver<Result<pb::ControllerMessage, tonic::Status>>;

const GIB: u64 = 1 << 30;
const SOURCE: &str = "meta-llama/Meta-Llama-3-8B-Instruct";

fn register(cluster: &Cluster, id: &str) -> (u64, Link) {
    let (tx, rx) = mpsc::unbounded_channel();
    let status = pb::StatusResponse {
        gpus: vec![pb::GpuStatus {
            index: 0,
            name: "gpu0".into(),
            total_bytes: 24 * GIB,
            free_bytes: 24 * GIB,
            source: "declared".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let reg = pb::WorkerRegistration {
        worker_id: id.into(),
        address: "127.0.0.1:9".into(),
        version: "test".into(),
        status: Some(status),
        ..Default::default()
    };
    (cluster.register(reg, tx).unwrap(), rx)
}

async fn next_load(link: &mut Link) -> pb::LoadCommand {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), link.recv()).await.unwrap().unwrap().unwrap();
        if let ToWorker::Load(cmd) = msg.message.unwrap() {
            return cmd;
        }
    }
}

fn llama_8b() -> DeploymentSpec {
    DeploymentSpec { source: SOURCE.into(), context_length: 8192, replicas: 1, ..Default::default() }
}

fn replica(cluster: &Cluster, name: &str) -> pb::Replica {
    cluster.get(name).unwrap().status.unwrap().replica_status[0].clone()
}

/// What the worker measured: the weights took 22 GiB, where the estimate says 15.
fn measured(estimate: u64) -> pb::ModelMeasurement {
    pb::ModelMeasurement {
        digest: "sha256s:0123".into(),
        device_kind: "NVIDIA L4".into(),
        model: "Meta-Llama-3-8B-Instruct".into(),
        sources: vec![SOURCE.into()],
        context: 8192,
        batch: 1,
        estimated: Some(pb::MemoryTerms {
            weights: 15 * GIB,
            kv_cache: GIB,
            activations: 0,
            overhead: estimate - 16 * GIB,
        }),
        measured: Some(pb::MemoryTerms { weights: 22 * GIB, kv_cache: GIB, activations: 0, overhead: 0 }),
        method: "nvml".into(),
        measured_at_ms: 1,
        by: "w1".into(),
        ..Default::default()
    }
}

async fn measured_need_outlives_a_restart(store: Arc<dyn StateStore>) {
    let config = ControllerConfig::default();
    {
        let cluster = Cluster::start(store.clone(), config.clone()).await.unwrap();
        let (_s, mut link) = register(&cluster, "w1");
        // By the estimate (~16 GiB + 5%) Llama 3 8B fits a 24 GiB GPU.
        let a = cluster.apply("a", llama_8b()).await.unwrap();
        let estimate = a.status.unwrap().replica_bytes * 100 / 105;
        let load = next_load(&mut link).await;
        let info =
            pb::ModelInfo { model_id: "a/0".into(), measurement: Some(measured(estimate)), ..Default::default() };
        cluster.command_result(
            "w1",
            pb::CommandResult { command_id: load.command_id, model: Some(info), ..Default::default() },
        );
        assert_eq!(replica(&cluster, "a").state, pb::ReplicaState::Ready as i32);

        // `get models`: the digest, the source of the figure, the error per term.
        let models = cluster.models();
        let m = &models[0];
        assert_eq!(m.digest, "sha256s:0123");
        let memory = m.memory.as_ref().unwrap();
        assert_eq!(memory.source, "measured on NVIDIA L4");
        let errors = memory.error_percent.unwrap();
        assert_eq!(errors.weights.map(|e| e.round()), Some(47.0));
        assert_eq!(errors.kv_cache, Some(0.0));
        assert_eq!(errors.activations, None);
        assert_eq!(memory.calibration.unwrap().weights, Some(22.0 / 15.0));
        assert_eq!(memory.measured_need_bytes, 23 * GIB + (estimate - 16 * GIB));

        // A second deployment of the model on an empty 24 GiB GPU: it fit by the estimate, not
        // by the measurement.
        let (_s2, _link2) = register(&cluster, "w2");
        cluster.apply("b", llama_8b()).await.unwrap();
        let b = replica(&cluster, "b");
        assert_eq!(b.state, pb::ReplicaState::Pending as i32);
        assert!(b.reason.contains("as measured (estimated 17.") && b.reason.contains("w2: 1×24.0 GiB"), "{}", b.reason);
        for _ in 0..250 {
            if !store.list("measurements/").await.unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cluster.shutdown();
    }
    // A new controller on the same store: the measurement is there before any worker reports.
    let cluster = Cluster::start(store, config).await.unwrap();
    assert_eq!(cluster.all_measurements().len(), 1);
    let (_s, _link) = register(&cluster, "w3");
    cluster.apply("c", llama_8b()).await.unwrap();
    let c = replica(&cluster, "c");
    assert!(c.reason.contains("as measured (estimated"), "{}", c.reason);
    cluster.shutdown();
}

#[tokio::test]
async fn a_measured_need_places_and_outlives_a_restart_with_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
    measured_need_outlives_a_restart(store).await;
}

#[tokio::test]
async fn a_measured_need_places_and_outlives_a_restart_with_etcd() {
    let server = etcd::EtcdServer::start();
    let store = EtcdStore::connect(&[server.url()], "/gantry-measured/", 10, &EtcdSecurity::default())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test etcd: {e}\n{}", server.log()));
    measured_need_outlives_a_restart(Arc::new(store)).await;
}

#[tokio::test]
async fn a_worker_reporting_past_the_bound_keeps_the_newest_measurements() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
    let cluster = Cluster::start(store, ControllerConfig::default()).await.unwrap();
    let bound = gantry_controller::cluster::measured::MAX_MEASUREMENTS;
    for i in 0..bound + 10 {
        let m = pb::ModelMeasurement {
            digest: format!("sha256s:{i:04x}"),
            device_kind: "cpu:Test".into(),
            measured_at_ms: i as u64 + 1,
            ..Default::default()
        };
        cluster.record_measurement(&m);
    }
    let all = cluster.all_measurements();
    assert_eq!(all.len(), bound);
    assert!(all.iter().all(|m| m.measured_at_ms > 10), "the oldest ten went");
    // A report without a digest or device kind is not kept, nor one past a bound.
    assert_eq!(cluster.record_measurement(&pb::ModelMeasurement::default()), bound);
    let huge = pb::ModelMeasurement {
        digest: "sha256s:ffff".into(),
        device_kind: "cpu:Test".into(),
        sources: vec!["x".repeat(5000)],
        measured_at_ms: u64::MAX,
        ..Default::default()
    };
    cluster.record_measurement(&huge);
    assert!(cluster.all_measurements().iter().all(|m| m.digest != "sha256s:ffff"));
    cluster.shutdown();
}
