//! The operator against a scripted Kubernetes API server (`tower-test`, as kube-rs recommends;
//! no cluster can be had here): every request the reconciler makes is recorded and checked.
//! The cluster behind it is the real one (embedded store), with workers on in-process links
//! whose load results the test feeds back, as in `scheduler.rs`.
//!
//! Create → finalizer, then placement events and a status with the stages; scale → replicas
//! added; a lost worker → Degraded with a Warning event, then placed again; delete → replicas
//! unloaded and memory freed, then the finalizer removed. Also: a Hugging Face token Secret is
//! passed with the loads, a missing one is reported; the Lease election.
//!
//! Tests that need a real API server are marked ignored: none is reachable from here.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_controller::operator::crd::{
    AutoscalingSpec, HubModel, ModelDeployment, ModelDeploymentSpec, ModelSource, SecretKeyRef,
};
use gantry_controller::operator::lease::{Attempt, LeaseLock, mark_leader};
use gantry_controller::operator::{Context, FINALIZER, reconcile};
use gantry_controller::statestore::embedded::EmbeddedStore;
use gantry_controller::{Cluster, ControllerConfig};
use gantry_proto::v1 as pb;
use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::controller::Action;
use pb::controller_message::Message as ToWorker;
use serde_json::{Value, json};
use tokio::sync::mpsc;

// ---- the scripted API server ----

/// A request the operator made.
#[derive(Debug, Clone)]
struct Call {
    method: String,
    path: String,
    body: Value,
}

impl Call {
    fn is(&self, method: &str, path_end: &str) -> bool {
        self.method == method && self.path.ends_with(path_end)
    }
}

#[derive(Default)]
struct World {
    calls: Vec<Call>,
    /// Secrets by name: key → value.
    secrets: HashMap<String, HashMap<String, String>>,
    /// The Lease object, when one exists.
    lease: Option<Value>,
    /// Answer the next Lease write with 409 Conflict.
    conflict_next: bool,
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})
}

/// Answers like an API server would for the calls the operator makes.
fn answer(world: &mut World, method: &str, path: &str, body: &Value) -> (StatusCode, Value) {
    let last = path.rsplit('/').next().unwrap_or_default().to_string();
    if path.contains("/secrets/") {
        return match world.secrets.get(&last) {
            Some(data) => {
                let data: HashMap<&String, String> = data.iter().map(|(k, v)| (k, base64(v.as_bytes()))).collect();
                (
                    StatusCode::OK,
                    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": last}, "data": data}),
                )
            }
            None => (StatusCode::NOT_FOUND, status_body(404, "NotFound", &format!("secrets \"{last}\" not found"))),
        };
    }
    if path.contains("/leases") {
        return match method {
            "GET" => match &world.lease {
                Some(l) => (StatusCode::OK, l.clone()),
                None => (StatusCode::NOT_FOUND, status_body(404, "NotFound", "leases not found")),
            },
            _ if world.conflict_next => {
                world.conflict_next = false;
                (StatusCode::CONFLICT, status_body(409, "Conflict", "the object has been modified"))
            }
            _ => {
                let mut l = body.clone();
                let version =
                    world.lease.as_ref().and_then(|l| l["metadata"]["resourceVersion"].as_str()).unwrap_or("0");
                l["metadata"]["resourceVersion"] = json!((version.parse::<u64>().unwrap() + 1).to_string());
                world.lease = Some(l.clone());
                (if method == "POST" { StatusCode::CREATED } else { StatusCode::OK }, l)
            }
        };
    }
    if path.contains("/pods/") {
        return (StatusCode::OK, json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": last}}));
    }
    if path.contains("/events") {
        let mut ev = body.clone();
        ev["metadata"]["name"] = json!(ev["metadata"]["name"].as_str().unwrap_or("ev"));
        return (if method == "POST" { StatusCode::CREATED } else { StatusCode::OK }, ev);
    }
    if path.ends_with("/scale") {
        let replicas = body["spec"]["replicas"].as_u64().unwrap_or(0);
        return (
            StatusCode::OK,
            json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "x"}, "spec": {"replicas": replicas}}),
        );
    }
    if path.contains("/modeldeployments/") {
        // The reconciler does not read what a patch returns: a valid object is enough.
        let name = path.split("/modeldeployments/").nth(1).unwrap_or_default().split('/').next().unwrap_or_default();
        return (
            StatusCode::OK,
            json!({
                "apiVersion": "gantry.dev/v1alpha1", "kind": "ModelDeployment",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"model": {"path": "/m"}, "replicas": 1}
            }),
        );
    }
    (StatusCode::NOT_FOUND, status_body(404, "NotFound", &format!("no route for {method} {path}")))
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A client whose every request goes to the scripted server.
fn fake_api() -> (kube::Client, Arc<Mutex<World>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let world = Arc::new(Mutex::new(World::default()));
    let w = world.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().to_string();
            let path = request.uri().path().to_string();
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (status, reply) = {
                let mut world = w.lock().unwrap();
                world.calls.push(Call { method: method.clone(), path: path.clone(), body: body.clone() });
                answer(&mut world, &method, &path, &body)
            };
            let response =
                Response::builder().status(status).body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap();
            send.send_response(response);
        }
    });
    (kube::Client::new(service, "default"), world)
}

fn take_calls(world: &Arc<Mutex<World>>) -> Vec<Call> {
    std::mem::take(&mut world.lock().unwrap().calls)
}

// ---- the cluster and its workers ----

type Link = mpsc::UnboundedReceiver<Result<pb::ControllerMessage, tonic::Status>>;

fn gpu_status(total: u64) -> pb::StatusResponse {
    pb::StatusResponse {
        gpus: vec![pb::GpuStatus {
            index: 0,
            name: "gpu0".into(),
            total_bytes: total,
            free_bytes: total,
            source: "declared".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn register(cluster: &Cluster, id: &str) -> (u64, Link) {
    let (tx, rx) = mpsc::unbounded_channel();
    let reg = pb::WorkerRegistration {
        worker_id: id.into(),
        address: "127.0.0.1:9".into(),
        version: "test".into(),
        status: Some(gpu_status(24 << 30)),
        ..Default::default()
    };
    (cluster.register(reg, tx).unwrap(), rx)
}

/// The next command on a link, skipping `Registered`.
async fn next_command(link: &mut Link) -> ToWorker {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), link.recv()).await.unwrap().unwrap().unwrap();
        match msg.message.unwrap() {
            ToWorker::Registered(_) => continue,
            other => return other,
        }
    }
}

/// Answers a load as a worker that loaded it.
fn loaded(cluster: &Cluster, worker: &str, session: u64, cmd: &pb::LoadCommand) {
    let id = cmd.request.as_ref().unwrap().model_id.clone();
    let info = pb::ModelInfo { model_id: id.clone(), device: "gpu:0".into(), ..Default::default() };
    cluster.command_result(
        worker,
        pb::CommandResult { command_id: cmd.command_id, model: Some(info.clone()), ..Default::default() },
    );
    let mut status = gpu_status(24 << 30);
    status.models.push(pb::LoadedModel { info: Some(info), ..Default::default() });
    cluster.heartbeat(worker, session, status);
}

async fn start_cluster() -> (tempfile::TempDir, Arc<Cluster>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
    let config = ControllerConfig { lease: Duration::from_secs(2), ..ControllerConfig::default() };
    (dir, Cluster::start(store, config).await.unwrap())
}

fn model_deployment(name: &str, replicas: u32) -> ModelDeployment {
    let mut md = ModelDeployment::new(
        name,
        ModelDeploymentSpec {
            model: ModelSource::Hub(HubModel {
                id: "meta-llama/Meta-Llama-3-8B-Instruct".into(),
                revision: None,
                file: None,
            }),
            dtype: None,
            context_length: Some(8192),
            replicas,
            sampling: None,
            placement: None,
            stage_wire_dtype: None,
            hf_token_secret: None,
            autoscaling: None,
        },
    );
    md.metadata.namespace = Some("default".into());
    md.metadata.generation = Some(1);
    md.metadata.uid = Some("uid-1".into());
    md.metadata.finalizers = Some(vec![FINALIZER.into()]);
    md
}

/// The status the reconciler last wrote.
fn written_status(calls: &[Call]) -> Value {
    calls.iter().rev().find(|c| c.is("PATCH", "/status")).map(|c| c.body["status"].clone()).unwrap_or(Value::Null)
}

fn events(calls: &[Call]) -> Vec<(String, String)> {
    calls
        .iter()
        .filter(|c| c.path.contains("/events"))
        .map(|c| {
            (
                c.body["type"].as_str().unwrap_or_default().to_string(),
                c.body["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The resource as the API server would now return it, with the status written.
fn with_status(mut md: ModelDeployment, calls: &[Call]) -> ModelDeployment {
    md.status = serde_json::from_value(written_status(calls)).ok();
    md
}

#[tokio::test]
async fn create_scale_worker_loss_and_delete() {
    let (_dir, cluster) = start_cluster().await;
    let (client, world) = fake_api();
    let ctx = Context::new(client, cluster.clone(), "gantry-controller-0");
    let (s1, mut w1) = register(&cluster, "w1");

    // Created without the finalizer: the first round only adds it (JSON patch with a test).
    let mut fresh = model_deployment("chat", 1);
    fresh.metadata.finalizers = None;
    let action = reconcile(Arc::new(fresh), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::await_change());
    let calls = take_calls(&world);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].is("PATCH", "/namespaces/default/modeldeployments/chat"), "{calls:?}");
    assert_eq!(
        calls[0].body,
        json!([{"op": "test", "path": "/metadata/finalizers", "value": null}, {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}])
    );
    assert!(cluster.get("chat").is_err(), "nothing is applied before the finalizer is on");

    // With the finalizer: applied to the cluster, the load sent, events and status written.
    let md = model_deployment("chat", 1);
    let action = reconcile(Arc::new(md.clone()), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(5)), "not ready yet: looked at again soon");
    let ToWorker::Load(load) = next_command(&mut w1).await else { panic!("a load") };
    assert_eq!(load.request.as_ref().unwrap().model_id, "chat/0");
    let calls = take_calls(&world);
    assert!(
        calls.iter().all(|c| c.path.contains("/events") || c.is("PATCH", "/modeldeployments/chat/status")),
        "{calls:?}"
    );
    let evs = events(&calls);
    assert!(
        evs.contains(&("Normal".into(), "Created".into())) && evs.contains(&("Normal".into(), "Placed".into())),
        "{evs:?}"
    );
    let status = written_status(&calls);
    assert_eq!(status["replicas"], 1);
    assert_eq!(status["readyReplicas"], 0);
    assert_eq!(status["phase"], "Progressing");
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["selector"], "app.kubernetes.io/managed-by=gantry-controller,gantry.dev/deployment=chat");
    assert_eq!(status["model"], "meta-llama/Meta-Llama-3-8B-Instruct");
    assert_eq!(status["replicaStatus"][0]["state"], "Loading");
    assert_eq!(
        status["replicaStatus"][0]["stages"][0],
        json!({"node": "w1", "gpu": 0, "layers": "0-31", "vram": status["vramPerReplica"]})
    );
    assert!(status["vramPerReplica"].as_str().unwrap().ends_with(" GiB"), "{status}");

    // The load finishes: Ready, a Loaded event (published once), and a slow requeue.
    loaded(&cluster, "w1", s1, &load);
    let md = with_status(md, &calls);
    let action = reconcile(Arc::new(md.clone()), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    let calls = take_calls(&world);
    assert_eq!(events(&calls), [("Normal".to_string(), "Loaded".to_string())], "only the new event: {calls:?}");
    let status = written_status(&calls);
    assert_eq!((status["readyReplicas"].clone(), status["phase"].clone()), (json!(1), json!("Ready")));
    let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap().clone();
    assert_eq!((ready["status"].clone(), ready["reason"].clone()), (json!("True"), json!("AllReplicasReady")));

    // Nothing changed: no write at all.
    let md = with_status(md, &calls);
    reconcile(Arc::new(md.clone()), ctx.clone()).await.unwrap();
    assert!(take_calls(&world).is_empty(), "an unchanged resource writes nothing");

    // `kubectl scale md/chat --replicas=2`: a second worker takes the second replica.
    let (s2, mut w2) = register(&cluster, "w2");
    let mut md2 = md.clone();
    md2.spec.replicas = 2;
    reconcile(Arc::new(md2.clone()), ctx.clone()).await.unwrap();
    let ToWorker::Load(load2) = next_command(&mut w2).await else { panic!("a load on w2") };
    assert_eq!(load2.request.as_ref().unwrap().model_id, "chat/1");
    loaded(&cluster, "w2", s2, &load2);
    let calls = take_calls(&world);
    let md2 = with_status(md2, &calls);
    reconcile(Arc::new(md2.clone()), ctx.clone()).await.unwrap();
    let calls = take_calls(&world);
    let status = written_status(&calls);
    assert_eq!((status["replicas"].clone(), status["readyReplicas"].clone()), (json!(2), json!(2)), "{status}");
    assert_eq!(status["replicaStatus"][1]["stages"][0]["node"], "w2");
    let md2 = with_status(md2, &calls);

    // w2 stops heartbeating: lost; Degraded with a Warning event; then placed again on w3.
    // (w1 keeps beating, with its replica.)
    let mut alive = gpu_status(24 << 30);
    alive.models.push(pb::LoadedModel {
        info: Some(pb::ModelInfo { model_id: "chat/0".into(), device: "gpu:0".into(), ..Default::default() }),
        ..Default::default()
    });
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.heartbeat("w1", s1, alive.clone());
    }
    reconcile(Arc::new(md2.clone()), ctx.clone()).await.unwrap();
    let calls = take_calls(&world);
    let status = written_status(&calls);
    assert_eq!(status["phase"], "Degraded", "{status}");
    assert_eq!(status["readyReplicas"], 1);
    assert!(events(&calls).contains(&("Warning".into(), "WorkerLost".into())), "{calls:?}");
    let degraded = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Degraded").unwrap().clone();
    assert_eq!((degraded["status"].clone(), degraded["reason"].clone()), (json!("True"), json!("ReplicasLost")));
    let md2 = with_status(md2, &calls);
    let (s3, mut w3) = register(&cluster, "w3");
    let ToWorker::Load(load3) = next_command(&mut w3).await else { panic!("a load on w3") };
    assert_eq!(load3.request.as_ref().unwrap().model_id, "chat/1");
    loaded(&cluster, "w3", s3, &load3);
    reconcile(Arc::new(md2.clone()), ctx.clone()).await.unwrap();
    let calls = take_calls(&world);
    let status = written_status(&calls);
    assert_eq!((status["phase"].clone(), status["readyReplicas"].clone()), (json!("Ready"), json!(2)), "{status}");
    assert_eq!(status["replicaStatus"][1]["stages"][0]["node"], "w3");
    let md2 = with_status(md2, &calls);

    // Deleted: every replica unloaded and its memory freed, then the finalizer removed.
    let mut gone = md2.clone();
    gone.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    let action = reconcile(Arc::new(gone), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::await_change());
    for (link, id) in [(&mut w1, "chat/0"), (&mut w3, "chat/1")] {
        let ToWorker::Unload(u) = next_command(link).await else { panic!("an unload") };
        assert_eq!(u.request.unwrap().model_id, id);
    }
    assert!(cluster.get("chat").is_err());
    assert!(cluster.workers().iter().all(|w| w.gpus.iter().all(|g| g.reserved_bytes == 0)), "{:?}", cluster.workers());
    let calls = take_calls(&world);
    let last = calls.last().unwrap();
    assert!(last.is("PATCH", "/modeldeployments/chat"), "{calls:?}");
    assert_eq!(
        last.body,
        json!([{"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER}, {"op": "remove", "path": "/metadata/finalizers/0"}])
    );
    assert!(events(&calls).contains(&("Normal".into(), "Deleted".into())), "{calls:?}");
}

/// Waits for the operator to have made a call that `pick` accepts.
async fn wait_for_call(world: &Arc<Mutex<World>>, what: &str, pick: impl Fn(&Call) -> bool) -> Call {
    let started = std::time::Instant::now();
    loop {
        if let Some(c) = world.lock().unwrap().calls.iter().find(|c| pick(c)) {
            return c.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no {what} within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_autoscaled_resource_gets_the_autoscalers_count_through_its_scale_subresource() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
    let config = ControllerConfig {
        lease: Duration::from_secs(2),
        autoscale_interval: Duration::from_millis(100),
        ..ControllerConfig::default()
    };
    let cluster = Cluster::start(store, config).await.unwrap();
    let (client, world) = fake_api();
    let ctx = Context::new(client, cluster.clone(), "gantry-controller-0");
    let (s1, mut w1) = register(&cluster, "w1");

    let mut md = model_deployment("auto", 1);
    md.spec.autoscaling = Some(AutoscalingSpec {
        min_replicas: 0,
        max_replicas: 2,
        metric: None,
        target: 1.0,
        scale_up_window_seconds: None,
        scale_down_delay_seconds: Some(1),
        scale_to_zero_after_seconds: Some(1),
    });
    reconcile(Arc::new(md.clone()), ctx.clone()).await.unwrap();
    let ToWorker::Load(cmd) = next_command(&mut w1).await else { panic!("a load") };
    loaded(&cluster, "w1", s1, &cmd);
    assert_eq!(cluster.spec("auto").unwrap().autoscaling.unwrap().max_replicas, 2);

    // Idle past scale_to_zero_after: the count goes to the resource, not straight to the cluster.
    let patch = wait_for_call(&world, "PATCH of the scale subresource", |c| {
        c.is("PATCH", "/namespaces/default/modeldeployments/auto/scale")
    })
    .await;
    assert_eq!(patch.body, json!({"spec": {"replicas": 0}}));
    assert_eq!(cluster.spec("auto").unwrap().replicas, 1, "the resource owns the count until it comes back");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let patches = world.lock().unwrap().calls.iter().filter(|c| c.path.ends_with("/scale")).count();
    assert_eq!(patches, 1, "asked once while the resource catches up");

    // The resource comes back with spec.replicas 0: the replica is unloaded, and the decision is
    // published as an event with its reason.
    let mut scaled = with_status(md, &take_calls(&world));
    scaled.spec.replicas = 0;
    reconcile(Arc::new(scaled), ctx.clone()).await.unwrap();
    let ToWorker::Unload(u) = next_command(&mut w1).await else { panic!("an unload") };
    assert_eq!(u.request.unwrap().model_id, "auto/0");
    let calls = take_calls(&world);
    assert!(events(&calls).contains(&("Normal".into(), "Autoscaled".into())), "{:?}", events(&calls));
    let note = calls
        .iter()
        .find(|c| c.path.contains("/events") && c.body["reason"] == "Autoscaled")
        .map(|c| c.body["note"].as_str().unwrap_or_default().to_string())
        .unwrap();
    assert!(note.ends_with("1 → 0 replica(s), idle for 1 s (scale to zero)"), "{note}");
    let d = cluster.get("auto").unwrap();
    assert_eq!(d.status.unwrap().phase, "ScaledToZero");
    let status = written_status(&calls);
    assert_eq!(status["phase"], json!("ScaledToZero"), "{status}");
    let ready = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap().clone();
    assert_eq!((ready["status"].clone(), ready["reason"].clone()), (json!("False"), json!("ScaledToZero")));
}

#[tokio::test]
async fn a_token_secret_goes_with_the_loads_and_a_missing_one_is_reported() {
    let (_dir, cluster) = start_cluster().await;
    let (client, world) = fake_api();
    world
        .lock()
        .unwrap()
        .secrets
        .insert("hf".into(), HashMap::from([("token".to_string(), "hf_secret_value".to_string())]));
    let ctx = Context::new(client, cluster.clone(), "gantry-controller-0");
    let (_s1, mut w1) = register(&cluster, "w1");

    let mut missing = model_deployment("gated", 1);
    missing.spec.hf_token_secret = Some(SecretKeyRef { name: "nope".into(), key: "token".into() });
    let action = reconcile(Arc::new(missing), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let calls = take_calls(&world);
    assert!(calls[0].is("GET", "/namespaces/default/secrets/nope"), "{calls:?}");
    assert_eq!(events(&calls), [("Warning".to_string(), "SecretNotFound".to_string())]);
    let status = written_status(&calls);
    assert_eq!(status["phase"], "Pending");
    assert_eq!(
        status["conditions"][0]["message"],
        "Secret `nope` (hfTokenSecret) does not exist in namespace `default`"
    );
    assert!(cluster.get("gated").is_err(), "nothing applied without its token");

    let mut md = model_deployment("gated", 1);
    md.spec.hf_token_secret = Some(SecretKeyRef { name: "hf".into(), key: "token".into() });
    reconcile(Arc::new(md), ctx.clone()).await.unwrap();
    let ToWorker::Load(load) = next_command(&mut w1).await else { panic!("a load") };
    assert_eq!(load.request.unwrap().hf_token, "hf_secret_value");
    // The token is not in the store nor in what the API shows.
    let shown = format!("{:?}", cluster.get("gated").unwrap());
    assert!(!shown.contains("hf_secret_value"));
}

/// A worker whose link nothing authenticated (no key, no certificate, not from this host) is
/// sent its loads without the Hugging Face token: a secret goes only to a worker that proved who
/// it is.
#[tokio::test]
async fn the_token_is_withheld_from_a_worker_whose_link_is_not_authenticated() {
    let (_dir, cluster) = start_cluster().await;
    let (client, world) = fake_api();
    world
        .lock()
        .unwrap()
        .secrets
        .insert("hf".into(), HashMap::from([("token".to_string(), "hf_secret_value".to_string())]));
    let ctx = Context::new(client, cluster.clone(), "gantry-controller-0");
    let (tx, mut w1) = mpsc::unbounded_channel();
    let reg = pb::WorkerRegistration {
        worker_id: "w1".into(),
        address: "127.0.0.1:9".into(),
        version: "test".into(),
        status: Some(gpu_status(24 << 30)),
        ..Default::default()
    };
    cluster
        .register_as(reg, tx, gantry_controller::cluster::workers::LinkAuth { credential: None, trusted: false })
        .unwrap();
    let mut md = model_deployment("gated", 1);
    md.spec.hf_token_secret = Some(SecretKeyRef { name: "hf".into(), key: "token".into() });
    reconcile(Arc::new(md), ctx.clone()).await.unwrap();
    let ToWorker::Load(load) = next_command(&mut w1).await else { panic!("a load") };
    let request = load.request.unwrap();
    assert_eq!((request.model_id.as_str(), request.hf_token.as_str()), ("gated/0", ""));
}

#[tokio::test]
async fn a_token_secret_outside_the_allowed_names_is_never_read() {
    let (_dir, cluster) = start_cluster().await;
    let (client, world) = fake_api();
    world
        .lock()
        .unwrap()
        .secrets
        .insert("db-password".into(), HashMap::from([("token".to_string(), "s3cret".to_string())]));
    let ctx = Context::new(client, cluster.clone(), "gantry-controller-0").with_allowed_secrets(vec!["hf".into()]);
    let mut md = model_deployment("nosy", 1);
    md.spec.hf_token_secret = Some(SecretKeyRef { name: "db-password".into(), key: "token".into() });
    assert_eq!(reconcile(Arc::new(md), ctx.clone()).await.unwrap(), Action::await_change());
    let calls = take_calls(&world);
    assert!(!calls.iter().any(|c| c.path.contains("/secrets/")), "the Secret was read: {calls:?}");
    assert_eq!(events(&calls), [("Warning".to_string(), "SecretNotAllowed".to_string())]);
    assert_eq!(
        written_status(&calls)["conditions"][0]["message"],
        "Secret `db-password` (hfTokenSecret) is not one this controller may read: add it to its --hf-token-secrets (the Helm chart's rbac.hfTokenSecrets)"
    );
    assert!(cluster.get("nosy").is_err());
}

#[tokio::test]
async fn an_invalid_spec_is_reported_not_retried() {
    let (_dir, cluster) = start_cluster().await;
    let (client, world) = fake_api();
    let ctx = Context::new(client, cluster.clone(), "gantry-controller-0");
    let mut md = model_deployment("big", 1);
    md.spec.context_length = Some(1_000_000);
    let action = reconcile(Arc::new(md), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::await_change());
    let calls = take_calls(&world);
    assert_eq!(events(&calls), [("Warning".to_string(), "InvalidSpec".to_string())]);
    let status = written_status(&calls);
    assert!(status["conditions"][0]["message"].as_str().unwrap().contains("past"), "{status}");
}

#[tokio::test]
async fn the_lease_is_taken_when_free_or_expired_and_never_by_two() {
    let (client, world) = fake_api();
    let a_client = client.clone();
    let a = LeaseLock::new(client.clone(), "default", "gantry-controller", "pod-a", Duration::from_secs(15));
    let b = LeaseLock::new(client, "default", "gantry-controller", "pod-b", Duration::from_secs(15));
    // No Lease: a creates it.
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Attempt::Held);
    let calls = take_calls(&world);
    assert!(calls[0].is("GET", "/apis/coordination.k8s.io/v1/namespaces/default/leases/gantry-controller"));
    assert!(calls[1].is("POST", "/apis/coordination.k8s.io/v1/namespaces/default/leases"), "{calls:?}");
    assert_eq!(calls[1].body["spec"]["holderIdentity"], "pod-a");
    assert_eq!(calls[1].body["spec"]["leaseDurationSeconds"], 15);
    // b sees it held and renewed: it waits.
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Attempt::HeldBy("pod-a".into()));
    // a renews (a PUT with the resourceVersion it read).
    assert_eq!(a.try_acquire_or_renew().await.unwrap(), Attempt::Held);
    let calls = take_calls(&world);
    let put = calls.iter().find(|c| c.method == "PUT").unwrap();
    assert_eq!(put.body["metadata"]["resourceVersion"], "1");
    assert_eq!(put.body["spec"]["leaseTransitions"], 0);
    // a stops renewing: renewed 14 s ago, the 15 s Lease still holds and b waits; once the
    // renew time is a whole duration old, b takes over.
    let renewed_ago = |secs: i64| {
        let t = k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(secs);
        json!(t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
    };
    world.lock().unwrap().lease.as_mut().unwrap()["spec"]["renewTime"] = renewed_ago(14);
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Attempt::HeldBy("pod-a".into()), "not expired yet");
    world.lock().unwrap().lease.as_mut().unwrap()["spec"]["renewTime"] = renewed_ago(16);
    assert_eq!(b.try_acquire_or_renew().await.unwrap(), Attempt::Held);
    let lease = world.lock().unwrap().lease.clone().unwrap();
    assert_eq!(
        (lease["spec"]["holderIdentity"].clone(), lease["spec"]["leaseTransitions"].clone()),
        (json!("pod-b"), json!(1))
    );
    // Two racing for an expired Lease: the API server takes one write, refuses the other (409).
    {
        let mut w = world.lock().unwrap();
        w.lease.as_mut().unwrap()["spec"]["renewTime"] = renewed_ago(16);
        w.conflict_next = true;
    }
    assert!(matches!(a.try_acquire_or_renew().await.unwrap(), Attempt::HeldBy(_)), "the refused writer does not lead");

    // The leader labels its pod (the Service selects the label); a starting pod clears it.
    take_calls(&world);
    let client = a_client.clone();
    mark_leader(client.clone(), "default", "pod-b", true).await.unwrap();
    mark_leader(client, "default", "pod-a", false).await.unwrap();
    let calls = take_calls(&world);
    assert!(calls[0].is("PATCH", "/api/v1/namespaces/default/pods/pod-b"), "{calls:?}");
    assert_eq!(calls[0].body, json!({"metadata": {"labels": {"gantry.dev/leader": "true"}}}));
    assert_eq!(calls[1].body, json!({"metadata": {"labels": {"gantry.dev/leader": null}}}));
}

#[tokio::test]
#[ignore = "needs a real Kubernetes API server (kind, k3d): none can be reached from this machine"]
async fn against_a_real_cluster_the_crd_installs_and_a_resource_gets_a_status() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
    use kube::{CustomResourceExt, ResourceExt};

    let client = kube::Client::try_default().await.expect("a kubeconfig or in-cluster config");
    // The CRD, installed as `kubectl apply --server-side` would, and established.
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    let crd = ModelDeployment::crd();
    let apply = PatchParams::apply("gantry-tests").force();
    crds.patch(&crd.name_any(), &apply, &Patch::Apply(&crd)).await.expect("the CRD installs");
    let established = |c: &CustomResourceDefinition| {
        c.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !established(&crds.get(&crd.name_any()).await.unwrap()) {
        assert!(tokio::time::Instant::now() < deadline, "the CRD was not established within 30 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The operator over a cluster with no workers: the resource is taken, sized and reported
    // Pending with the reason, on the status subresource.
    let (_dir, cluster) = start_cluster().await;
    let ctx = Context::new(client.clone(), cluster.clone(), "gantry-tests");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(gantry_controller::operator::run(ctx, "default".into(), async move {
        let _ = stop_rx.await;
    }));
    let api: kube::Api<ModelDeployment> = kube::Api::namespaced(client, "default");
    let name = format!("gantry-test-{}", std::process::id());
    let mut md = model_deployment(&name, 1);
    md.metadata =
        kube::api::ObjectMeta { name: Some(name.clone()), namespace: Some("default".into()), ..Default::default() };
    api.create(&PostParams::default(), &md).await.expect("the resource is created");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        let got = api.get(&name).await.unwrap();
        if let Some(status) =
            got.status.clone().filter(|s| s.observed_generation == got.metadata.generation.unwrap_or(0))
        {
            assert!(got.finalizers().contains(&FINALIZER.to_string()), "the finalizer is set first");
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "no status within 60 s: {got:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!((status.replicas, status.ready_replicas, status.phase.as_str()), (1, 0, "Pending"));
    assert!(status.vram_per_replica.ends_with("GiB"), "{status:?}");
    assert!(status.replica_status[0].reason.contains("no workers are connected"), "{status:?}");
    assert!(status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "False"), "{status:?}");

    // Deleted: the finalizer runs (the deployment leaves the cluster) and the resource goes.
    api.delete(&name, &DeleteParams::default()).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while api.get_opt(&name).await.unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the resource was not deleted within 30 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(cluster.get(&name).is_err(), "the cluster forgot the deployment");
    let _ = stop_tx.send(());
    let _ = operator.await;
}

/// A tensor-parallel replica's ranks each show in the status with the group's size.
#[test]
fn a_tensor_parallel_replica_shows_its_ranks_in_the_status() {
    let md = model_deployment("big", 1);
    let stage = |gpu: u32| pb::ReplicaStage {
        worker_id: "w1".into(),
        gpu_index: gpu,
        layer_start: 0,
        layer_end: 80,
        reserved_bytes: 70 << 30,
        tensor_parallel: 2,
        experts_on_host_bytes: 0,
    };
    let d = pb::Deployment {
        name: "big".into(),
        status: Some(pb::DeploymentStatus {
            replica_status: vec![pb::Replica { index: 0, stages: vec![stage(0), stage(1)], ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let status = serde_json::to_value(gantry_controller::operator::status_of(&md, &d, 0)).unwrap();
    assert_eq!(
        status["replicaStatus"][0]["stages"],
        json!([
            {"node": "w1", "gpu": 0, "layers": "0-79", "vram": "70.0 GiB", "tensorParallel": 2},
            {"node": "w1", "gpu": 1, "layers": "0-79", "vram": "70.0 GiB", "tensorParallel": 2},
        ])
    );
}
