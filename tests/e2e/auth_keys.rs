//! API keys on `gantry up` serving SmolLM2: without keys it refuses to listen beyond
//! loopback; with a key file, gRPC and HTTP calls without a key or with a wrong one are
//! refused (`UNAUTHENTICATED` / 401 in OpenAI's shape), health checks stay open, the CLI and
//! workers pass their key, and no key ever appears in the logs.

#![allow(clippy::unwrap_used)]

use crate::common;

use crate::common::controller::RunningController;
use crate::common::worker::RunningWorker;
use crate::common::{gantry, run};
use gantry_proto::v1 as pb;
use tonic::Code;

const KEY_A: &str = "k-0123456789abcdef0123456789";
const KEY_B: &str = "k-fedcba9876543210fedcba9876";

fn http(addr: &str, path: &str, key: Option<&str>) -> (u16, String) {
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    let out = common::http_request(addr, "GET", path, &auth, None);
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

fn with_key<T>(msg: T, key: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    req
}

#[test]
fn without_keys_gantry_up_stays_on_loopback() {
    let (code, _, err) = run(gantry().args(["up", "--listen", "0.0.0.0:0", "--http", "off"]));
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("gantry up without API keys serves on loopback only, and --listen 0.0.0.0:0 / --http off is not"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_guard_grpc_http_the_cli_and_the_worker_link() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("# the team's keys\n{KEY_A}\n\n{KEY_B}\n")).unwrap();
    let up = RunningController::up(&["--api-keys", keys.to_str().unwrap(), "--threads", "1", "--context", "1K"]);
    assert!(up.stdout().iter().any(|l| l == "API keys: 2 accepted; every API but health checks needs one"));
    let channel = up.channel().await;

    // gRPC: missing and wrong keys are told apart; the right one works; health stays open.
    let mut models = pb::models_client::ModelsClient::new(channel.clone());
    let e = models.list(pb::ListModelsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("this controller needs an API key"), "{}", e.message());
    let e = models.list(with_key(pb::ListModelsRequest {}, "k-wrong-wrong-wrong-wrong")).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::Unauthenticated, "the API key is not valid"));
    let listed = models.list(with_key(pb::ListModelsRequest {}, KEY_B)).await.unwrap().into_inner();
    assert_eq!(listed.models[0].ready_replicas, 1, "the local worker linked with its key and loaded the model");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let h = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(h.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // HTTP: /healthz open; the API needs the key, refused in OpenAI's shape.
    let addr = up.http.clone().unwrap();
    assert_eq!(http(&addr, "/healthz", None).0, 200);
    let (status, body) = http(&addr, "/v1/models", None);
    assert_eq!(status, 401);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(http(&addr, "/metrics", Some("k-wrong-wrong-wrong-wrong")).0, 401);
    let (status, body) = http(&addr, "/v1/models", Some(KEY_A));
    assert_eq!(status, 200);
    assert!(body.contains("smollm2-135m-instruct"), "{body}");

    // The CLI: refused without a key (exit 77), fine with --api-key or GANTRY_API_KEY.
    let (code, _, err) = run(gantry().args(["get", "deployments", "--controller", &up.url()]));
    assert_eq!(code, 77, "{err}");
    assert!(err.contains("needs an API key"), "{err}");
    let (code, out, err) = run(gantry().args(["get", "deployments", "--controller", &up.url(), "--api-key", KEY_A]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("smollm2-135m-instruct"), "{out}");
    let (code, _, err) = run(gantry().args(["get", "workers", "--controller", &up.url()]).env("GANTRY_API_KEY", KEY_B));
    assert_eq!(code, 0, "{err}");

    // A worker without the key cannot register; with it, it can.
    let stranger = RunningWorker::start(&["--controller", &up.url(), "--worker-id", "stranger", "--gpus", "1x1GiB"]);
    let friend = RunningWorker::start(&[
        "--controller",
        &up.url(),
        "--worker-id",
        "friend",
        "--gpus",
        "1x1GiB",
        "--api-key",
        KEY_A,
    ]);
    let mut cluster = pb::cluster_client::ClusterClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", format!("Bearer {KEY_A}").parse().unwrap());
        Ok(r)
    });
    let mut workers = Vec::new();
    for _ in 0..100 {
        workers = cluster.list_workers(pb::ListWorkersRequest {}).await.unwrap().into_inner().workers;
        if workers.iter().any(|w| w.worker_id == "friend") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let ids: Vec<&str> = workers.iter().map(|w| w.worker_id.as_str()).collect();
    assert!(ids.contains(&"friend") && !ids.contains(&"stranger"), "{ids:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !stranger.stderr().contains("needs an API key") {
        assert!(std::time::Instant::now() < deadline, "the refusal is not in its log: {}", stranger.stderr());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(friend);

    // No key is ever written to a log.
    let logs = format!("{}\n{}\n{}", up.stderr(), up.stdout().join("\n"), stranger.stderr());
    assert!(!logs.contains(KEY_A) && !logs.contains(KEY_B), "a key leaked into the logs");
}

/// Roles: a key file line `KEY ROLE NAME`. `admin` does everything (the first key, which
/// `gantry up`'s own worker links with); `user` infers and lists models; `viewer` reads
/// deployments, workers and metrics but neither infers nor changes anything; `worker` only
/// links. Enforced on gRPC and HTTP, refused with PERMISSION_DENIED / 403 naming the key's
/// name and role, never the key.
#[tokio::test(flavor = "multi_thread")]
async fn roles_limit_each_key_to_what_it_is_for() {
    const ADMIN: &str = "k-admin-0123456789abcdef";
    const USER: &str = "k-user-0123456789abcdef0";
    const VIEWER: &str = "k-viewer-0123456789abcde";
    const WORKER: &str = "k-worker-0123456789abcde";
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(
        &keys,
        format!("{ADMIN} admin ops\n{USER} user app\n{VIEWER} viewer grafana\n{WORKER} worker gpu-nodes\n"),
    )
    .unwrap();
    let up = RunningController::up(&[
        "--api-keys",
        keys.to_str().unwrap(),
        "--threads",
        "1",
        "--context",
        "1K",
        "--name",
        "chat",
    ]);
    let channel = up.channel().await;
    let mut deployments = pb::deployments_client::DeploymentsClient::new(channel.clone());
    let mut inference = pb::inference_client::InferenceClient::new(channel.clone());
    let mut models = pb::models_client::ModelsClient::new(channel.clone());
    let mut cluster = pb::cluster_client::ClusterClient::new(channel.clone());
    let chat = || pb::ChatRequest {
        model: "chat".into(),
        messages: vec![pb::ChatMessage { role: "user".into(), content: "Hi".into() }],
        sampling: Some(pb::SamplingParams { max_tokens: Some(2), ..Default::default() }),
        request_id: String::new(),
    };
    let scale = || pb::ScaleRequest { name: "chat".into(), replicas: 1 };

    // viewer: reads, nothing else.
    assert!(deployments.list(with_key(pb::ListDeploymentsRequest {}, VIEWER)).await.is_ok());
    assert!(cluster.list_workers(with_key(pb::ListWorkersRequest {}, VIEWER)).await.is_ok());
    assert!(models.list(with_key(pb::ListModelsRequest {}, VIEWER)).await.is_ok());
    let e = deployments.scale(with_key(scale(), VIEWER)).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::PermissionDenied,
            "the API key `grafana` has the role `viewer`, which does not allow changing deployments (Deployments/Scale)"
        )
    );
    let e = inference.chat(with_key(chat(), VIEWER)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("does not allow inference (Inference)"), "{}", e.message());

    // user: inference and the model list.
    let mut stream = inference.chat(with_key(chat(), USER)).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}
    assert!(models.list(with_key(pb::ListModelsRequest {}, USER)).await.is_ok());
    let e = deployments.list(with_key(pb::ListDeploymentsRequest {}, USER)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(
        cluster.list_workers(with_key(pb::ListWorkersRequest {}, USER)).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // worker: its link only.
    let e = models.list(with_key(pb::ListModelsRequest {}, WORKER)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // admin: everything.
    assert!(deployments.scale(with_key(scale(), ADMIN)).await.is_ok());

    // HTTP: the same table.
    let addr = up.http.clone().unwrap();
    let post_chat = |key: &str| {
        let auth = format!("Authorization: Bearer {key}\r\n");
        let body = r#"{"model":"chat","messages":[{"role":"user","content":"Hi"}],"max_tokens":2}"#;
        let out = common::http_request(&addr, "POST", "/v1/chat/completions", &auth, Some(body));
        out.split_whitespace().nth(1).unwrap().parse::<u16>().unwrap()
    };
    assert_eq!(post_chat(USER), 200);
    assert_eq!(post_chat(VIEWER), 403);
    assert_eq!(http(&addr, "/metrics", Some(VIEWER)).0, 200);
    assert_eq!(http(&addr, "/api/v1/cluster", Some(VIEWER)).0, 200);
    let (status, body) = http(&addr, "/metrics", Some(USER));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("the API key `app` has the role `user`"), "{body}");
    assert_eq!(http(&addr, "/v1/models", Some(USER)).0, 200);
    assert_eq!(http(&addr, "/v1/models", Some(WORKER)).0, 403);

    // No key appears in the logs.
    let logs = format!("{}{}", up.stderr(), up.stdout().join("\n"));
    for k in [ADMIN, USER, VIEWER, WORKER] {
        assert!(!logs.contains(k), "a key in the logs");
    }
}

/// An attacker's registration on the worker link, as raw gRPC: the registration, then nothing.
/// `Ok(())` when the controller accepted it (its first answer is `Registered`).
async fn register_as_worker(url: &str, id: &str, key: &str) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string()).unwrap().connect().await.unwrap();
    let mut link = pb::worker_link_client::WorkerLinkClient::new(channel);
    let reg = pb::WorkerMessage {
        message: Some(pb::worker_message::Message::Register(pb::WorkerRegistration {
            worker_id: id.into(),
            address: "127.0.0.1:1".into(),
            version: "attacker".into(),
            ..Default::default()
        })),
    };
    // The stream stays open (as a worker's does) until the first answer is read.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(reg).await.unwrap();
    let mut answers = link.attach(with_key(tokio_stream::wrappers::ReceiverStream::new(rx), key)).await?.into_inner();
    let first = answers.message().await?;
    assert!(
        matches!(first.and_then(|m| m.message), Some(pb::controller_message::Message::Registered(_))),
        "an accepted link answers Registered first"
    );
    drop(tx);
    Ok(())
}

/// A worker's id is its own. With a key per worker (`KEY worker NAME`), a holder of another key
/// — a user's, or another worker's — cannot take over a worker's id: not while it is connected,
/// and not after it left; the worker itself comes back with its own key. (Over mutual TLS the
/// certificate is the credential the id is bound to; `tls_mutual.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_id_cannot_be_taken_over_with_another_credential() {
    const ADMIN: &str = "k-admin-0123456789abcdef";
    const USER: &str = "k-user-0123456789abcdef0";
    const NODE1: &str = "k-node1-0123456789abcdef";
    const NODE2: &str = "k-node2-0123456789abcdef";
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(
        &keys,
        format!("{ADMIN} admin ops\n{USER} user app\n{NODE1} worker node-1\n{NODE2} worker node-2\n"),
    )
    .unwrap();
    let control = RunningController::start(&["--api-keys", keys.to_str().unwrap(), "--lease", "2"]);
    let url = control.url();
    let mut legit = RunningWorker::join(&url, "w1", &["--api-key", NODE1]);
    let channel = control.channel().await;
    let mut cluster = pb::cluster_client::ClusterClient::new(channel);
    let ready = |workers: &[pb::WorkerInfo]| workers.iter().any(|w| w.worker_id == "w1" && w.state == "ready");
    loop {
        let list = cluster.list_workers(with_key(pb::ListWorkersRequest {}, ADMIN)).await.unwrap().into_inner();
        if ready(&list.workers) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // A user's key may not open a worker link at all.
    let e = register_as_worker(&url, "w1", USER).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let taken = "worker id `w1` belongs to another credential: a worker registers with the key or certificate it first registered with";
    // Another worker's key: not while w1 is connected …
    let e = register_as_worker(&url, "w1", NODE2).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::PermissionDenied, taken));
    // … (nor a second link with w1's own key while w1 is live) …
    let e = register_as_worker(&url, "w1", NODE1).await.unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::AlreadyExists,
            "worker `w1` is connected already: a second link for a live worker is refused (register again once its link ends or its lease runs out)"
        )
    );
    // … nor once it has gone.
    legit.kill();
    let e = register_as_worker(&url, "w1", NODE2).await.unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::PermissionDenied, taken));
    // The worker's own key gets its id back once the controller has seen the link end.
    let started = std::time::Instant::now();
    while let Err(e) = register_as_worker(&url, "w1", NODE1).await {
        assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "w1's link never ended");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Another worker's key may register an id of its own.
    register_as_worker(&url, "w9", NODE2).await.unwrap();
    let log = control.stderr();
    for key in [ADMIN, USER, NODE1, NODE2] {
        assert!(!log.contains(key), "a key in the controller's log");
    }
}

/// `msg` with `Authorization: Bearer key`, or without one.
fn maybe_key<T>(msg: T, key: Option<&str>) -> tonic::Request<T> {
    match key {
        Some(k) => with_key(msg, k),
        None => tonic::Request::new(msg),
    }
}

/// A worker on `0.0.0.0:port` (reached here on loopback only: `--advertise 127.0.0.1:port`)
/// linked to `controller` with `key`.
fn guarded_worker(controller: &str, id: &str, gpus: &str, key: &str) -> (RunningWorker, String) {
    let port = common::etcd::free_port();
    let mut cmd = gantry();
    cmd.args([
        "worker",
        "--listen",
        &format!("0.0.0.0:{port}"),
        "--advertise",
        &format!("127.0.0.1:{port}"),
        "--controller",
        controller,
        "--api-key",
        key,
        "--worker-id",
        id,
        "--gpus",
        gpus,
        "--threads",
        "1",
        "--parallel",
        "1",
    ]);
    (RunningWorker::spawn(cmd), format!("http://127.0.0.1:{port}"))
}

/// A worker that listens beyond loopback without TLS: it refuses to start without a controller
/// link that can bring it the cluster's worker token; with one, every method of its port
/// (`Worker/Status|LoadModel|UnloadModel|Generate|Tokenize`, `StageLink/Forward`, reflection) refuses a
/// caller without the token or with a wrong one, while the controller's calls and the stages'
/// links of a model split over two such workers carry it and work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_beyond_loopback_takes_calls_only_with_the_clusters_token() {
    const ADMIN: &str = "k-admin-0123456789abcdef";
    const NODE: &str = "k-node-0123456789abcdef0";
    let (code, _, err) = run(gantry().args(["worker", "--listen", "0.0.0.0:0", "--gpus", "1x24GiB"]));
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("gantry worker listens beyond loopback (--listen 0.0.0.0:0) only with TLS"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{ADMIN} admin ops\n{NODE} worker nodes\n")).unwrap();
    let control = RunningController::start(&["--api-keys", keys.to_str().unwrap(), "--lease", "2"]);
    let url = control.url();
    // SmolLM2 at 2K context (657 MiB) fits neither 640 MiB GPU alone: split over both workers.
    let (_a, a_url) = guarded_worker(&url, "a", "1x640MiB", NODE);
    let (_b, _) = guarded_worker(&url, "b", "1x640MiB", NODE);
    let channel = control.channel().await;
    let mut cluster = pb::cluster_client::ClusterClient::new(channel.clone());
    loop {
        let list = cluster.list_workers(with_key(pb::ListWorkersRequest {}, ADMIN)).await.unwrap().into_inner();
        if list.workers.iter().filter(|w| w.state == "ready").count() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut deployments = pb::deployments_client::DeploymentsClient::new(channel.clone());
    let spec = pb::DeploymentSpec {
        source: common::smollm2().display().to_string(),
        replicas: 1,
        context_length: 2048,
        placement: Some(pb::PlacementPolicy { allow_multi_node: true, ..Default::default() }),
        ..Default::default()
    };
    deployments.apply(with_key(pb::ApplyRequest { name: "smol".into(), spec: Some(spec) }, ADMIN)).await.unwrap();
    let started = std::time::Instant::now();
    loop {
        let d = deployments.get(with_key(pb::GetDeploymentRequest { name: "smol".into() }, ADMIN)).await.unwrap();
        let status = d.into_inner().status.unwrap_or_default();
        if status.ready_replicas == 1 {
            assert_eq!(status.replica_status[0].stages.len(), 2, "split over both workers");
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(120), "{status:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Through the controller: its call to the first stage and that stage's link to the second
    // carry the token.
    let mut inference = pb::inference_client::InferenceClient::new(channel);
    let chat = pb::ChatRequest {
        model: "smol".into(),
        messages: vec![pb::ChatMessage { role: "user".into(), content: "Hi".into() }],
        sampling: Some(pb::SamplingParams { max_tokens: Some(4), ..Default::default() }),
        request_id: String::new(),
    };
    let mut stream = inference.chat(with_key(chat, ADMIN)).await.unwrap().into_inner();
    let mut tokens = 0;
    while let Some(ev) = stream.message().await.unwrap() {
        if let Some(pb::generate_event::Event::Token(_)) = ev.event {
            tokens += 1;
        }
    }
    assert_eq!(tokens, 4);

    // Directly, as a caller on the network would: every method refused, with or without a
    // (wrong) credential.
    let worker = tonic::transport::Endpoint::from_shared(a_url).unwrap().connect().await.unwrap();
    for key in [None, Some(ADMIN)] {
        let expected = match key {
            Some(_) => "the worker token is not valid",
            None => {
                "this worker takes calls only from its cluster: send `Authorization: Bearer <the cluster's worker token>` (the controller and the other workers do)"
            }
        };
        let mut w = pb::worker_client::WorkerClient::new(worker.clone());
        let mut errors = vec![
            ("Status", w.status(maybe_key(pb::StatusRequest {}, key)).await.map(|_| ()).unwrap_err()),
            (
                "LoadModel",
                w.load_model(maybe_key(
                    pb::LoadModelRequest { model_id: "x".into(), source: "/etc/passwd".into(), ..Default::default() },
                    key,
                ))
                .await
                .map(|_| ())
                .unwrap_err(),
            ),
            (
                "UnloadModel",
                w.unload_model(maybe_key(pb::UnloadModelRequest { model_id: "smol/0".into() }, key))
                    .await
                    .map(|_| ())
                    .unwrap_err(),
            ),
            (
                "Generate",
                w.generate(maybe_key(pb::GenerateRequest { model_id: "smol/0".into(), ..Default::default() }, key))
                    .await
                    .map(|_| ())
                    .unwrap_err(),
            ),
            (
                "Tokenize",
                w.tokenize(maybe_key(pb::GenerateRequest { model_id: "smol/0".into(), ..Default::default() }, key))
                    .await
                    .map(|_| ())
                    .unwrap_err(),
            ),
        ];
        let mut stage = pb::stage_link_client::StageLinkClient::new(worker.clone());
        let open = pb::StageRequest {
            message: Some(pb::stage_request::Message::Open(pb::StageOpen {
                model_id: "smol/0".into(),
                ..Default::default()
            })),
        };
        errors.push((
            "StageLink/Forward",
            stage.forward(maybe_key(tokio_stream::iter(vec![open]), key)).await.map(|_| ()).unwrap_err(),
        ));
        let mut reflection =
            tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(worker.clone());
        let list = tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        errors.push((
            "reflection",
            reflection
                .server_reflection_info(maybe_key(tokio_stream::iter(vec![list]), key))
                .await
                .map(|_| ())
                .unwrap_err(),
        ));
        for (method, e) in errors {
            assert_eq!((method, e.code(), e.message()), (method, Code::Unauthenticated, expected));
        }
    }
    // Health checks stay open (load balancers and probes use them).
    let mut health = tonic_health::pb::health_client::HealthClient::new(worker);
    assert!(health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.is_ok());
    // The worker still serves the model: nothing a refused call did changed it.
    let s = cluster.list_workers(with_key(pb::ListWorkersRequest {}, ADMIN)).await.unwrap().into_inner();
    assert!(s.workers.iter().all(|w| w.state == "ready"), "{s:?}");
}

/// Tenants kept apart by their keys' limits (`KEY ROLE NAME streams=N tpm=N`), before a request
/// reaches a worker: a key at its stream limit is refused (`RESOURCE_EXHAUSTED` with
/// `retry-after`; 429 in OpenAI's shape with `Retry-After` over HTTP) until a stream ends; a key
/// that used its tokens per minute is refused with the wait; the metrics count both per key
/// name, never the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_keys_limits_apply_before_a_worker_is_reached() {
    const ADMIN: &str = "k-admin-0123456789abcdef";
    const ALICE: &str = "k-alice-0123456789abcdef";
    const BOB: &str = "k-bob-0123456789abcdef01";
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{ADMIN} admin ops\n{ALICE} user alice streams=1\n{BOB} user bob tpm=20\n")).unwrap();
    let up = RunningController::up(&[
        "--api-keys",
        keys.to_str().unwrap(),
        "--threads",
        "1",
        "--context",
        "1K",
        "--name",
        "chat",
    ]);
    let channel = up.channel().await;
    let mut inference = pb::inference_client::InferenceClient::new(channel);
    let chat = |max: u32| pb::ChatRequest {
        model: "chat".into(),
        messages: vec![pb::ChatMessage { role: "user".into(), content: "Tell me a long story.".into() }],
        sampling: Some(pb::SamplingParams { max_tokens: Some(max), ..Default::default() }),
        request_id: String::new(),
    };

    // alice: one stream at a time.
    let mut open = inference.chat(with_key(chat(400), ALICE)).await.unwrap().into_inner();
    assert!(open.message().await.unwrap().is_some(), "the first stream runs");
    let e = inference.chat(with_key(chat(4), ALICE)).await.map(|_| ()).unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::ResourceExhausted, "the API key `alice` has 1 streams open, its limit (streams=1); retry when one ends")
    );
    assert_eq!(e.metadata().get("retry-after").unwrap(), "1");
    let addr = up.http.clone().unwrap();
    let auth = format!("Authorization: Bearer {ALICE}\r\n");
    let body = r#"{"model":"chat","messages":[{"role":"user","content":"Hi"}],"max_tokens":2}"#;
    let out = common::http_request(&addr, "POST", "/v1/chat/completions", &auth, Some(body));
    assert!(out.starts_with("HTTP/1.1 429"), "{out}");
    assert!(out.to_ascii_lowercase().contains("retry-after: 1\r\n"), "{out}");
    assert!(out.contains(r#""type":"rate_limit_error""#), "{out}");
    // Another tenant is not held up by alice's limit.
    let mut other = inference.chat(with_key(chat(2), ADMIN)).await.unwrap().into_inner();
    while other.message().await.unwrap().is_some() {}
    drop(open);
    let started = std::time::Instant::now();
    loop {
        match inference.chat(with_key(chat(2), ALICE)).await {
            Ok(s) => {
                let mut s = s.into_inner();
                while s.message().await.unwrap().is_some() {}
                break;
            }
            Err(e) => assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}"),
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "alice's ended stream was never released");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // bob: 20 tokens a minute. 16, then 16 more (4 were left), then none.
    for _ in 0..2 {
        let mut s = inference.chat(with_key(chat(16), BOB)).await.unwrap().into_inner();
        while s.message().await.unwrap().is_some() {}
    }
    let e = inference.chat(with_key(chat(16), BOB)).await.map(|_| ()).unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().starts_with("the API key `bob` used its 20 tokens per minute (tpm=20); retry in "),
        "{}",
        e.message()
    );
    let wait: u64 = e.metadata().get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");

    let (status, metrics) = http(&addr, "/metrics", Some(ADMIN));
    assert_eq!(status, 200);
    assert!(metrics.contains(r#"gantry_key_refused_total{key="alice",limit="streams"}"#), "{metrics}");
    assert!(metrics.contains(r#"gantry_key_refused_total{key="bob",limit="tokens_per_minute"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"gantry_key_streams_total{key="bob"} 2"#), "{metrics}");
    for k in [ADMIN, ALICE, BOB] {
        assert!(!metrics.contains(k), "a key in the metrics");
    }
}
