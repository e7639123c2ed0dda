//! A model named by a URL: the controller sizes it from its GGUF header, read with HTTP range
//! requests (not the weights), and the worker downloads it once into its cache and serves it.
//! The server is a small HTTP/1.1 file server in the test (ranges supported, bytes counted).

#![allow(clippy::unwrap_used)]

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::common::controller::{RunningController, chat, placements, ready, spec, status, wait_for};
use crate::common::worker::RunningWorker;
use gantry_proto::v1 as pb;

/// Serves `file` at `/models/NAME` until the test ends; counts the bytes it sent.
fn serve(file: Vec<u8>, name: &'static str) -> (String, Arc<AtomicU64>, Arc<AtomicU64>) {
    serve_until_silent(file, name, Arc::new(AtomicBool::new(false)))
}

/// [`serve`], answering nothing (holding each connection) once `silent` is set.
fn serve_until_silent(
    file: Vec<u8>,
    name: &'static str,
    silent: Arc<AtomicBool>,
) -> (String, Arc<AtomicU64>, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (sent, whole) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (s, w) = (sent.clone(), whole.clone());
    let file = Arc::new(file);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let (file, s, w, silent) = (file.clone(), s.clone(), w.clone(), silent.clone());
            std::thread::spawn(move || {
                if silent.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(120));
                    return;
                }
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or_default().to_string();
                let mut range = None;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        let (a, b) = v.trim().split_once('-').unwrap();
                        range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
                    }
                }
                if path != format!("/models/{name}") {
                    let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    return;
                }
                let (head, body) = match range {
                    Some((a, b)) => {
                        let b = b.min(file.len() - 1);
                        (
                            format!(
                                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                file.len(),
                                b + 1 - a
                            ),
                            &file[a..=b],
                        )
                    }
                    None => {
                        w.fetch_add(1, Ordering::Relaxed);
                        (
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", file.len()),
                            &file[..],
                        )
                    }
                };
                if conn.write_all(head.as_bytes()).is_ok() && conn.write_all(body).is_ok() {
                    s.fetch_add(body.len() as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (format!("http://{addr}/models/{name}"), sent, whole)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_from_a_url_is_sized_from_its_header_downloaded_once_and_served() {
    let real = std::fs::read(common::smollm2()).unwrap();
    let size = real.len() as u64;
    let (url, sent, whole) = serve(real, "SmolLM2-135M-Instruct.Q4_1.gguf");
    // The server is on loopback, inside the network: both must name it to fetch from it.
    let control = RunningController::start(&["--allow-url-hosts", "127.0.0.1"]);
    let cache = tempfile::tempdir().unwrap();
    let _worker = RunningWorker::join(
        &control.url(),
        "w1",
        &["--cache-dir", cache.path().to_str().unwrap(), "--allow-url-hosts", "127.0.0.1"],
    );
    let mut deployments = control.deployments().await;

    // Sized from the header alone: the controller read a few MiB, not the 94 MiB of weights.
    deployments
        .apply(pb::ApplyRequest { name: "chat".into(), spec: Some(spec(&url, 1, pb::PlacementStrategy::Binpack)) })
        .await
        .unwrap();
    let d = wait_for(&mut deployments, "chat", Duration::from_secs(120), "ready", ready).await;
    assert_eq!(placements(&d), ["w1/gpu:0"]);
    assert!(status(&d).replica_bytes > 100 << 20, "{:?}", status(&d));
    assert_eq!(whole.load(Ordering::Relaxed), 1, "one whole download, by the worker");
    let header_bytes = sent.load(Ordering::Relaxed) - size;
    assert!(header_bytes < 16 << 20, "the controller read {header_bytes} bytes of the header");
    let mut inference = control.inference().await;
    let (text, _) = chat(&mut inference, "chat", "What is the capital of France?", 24).await.unwrap();
    assert!(text.contains("Paris"), "{text}");

    // Scaled to two on the same worker: the file comes from the cache, not the server.
    deployments.scale(pb::ScaleRequest { name: "chat".into(), replicas: 2 }).await.unwrap();
    wait_for(&mut deployments, "chat", Duration::from_secs(120), "2 ready", |d| status(d).ready_replicas == 2).await;
    assert_eq!(whole.load(Ordering::Relaxed), 1, "downloaded once");

    // A URL that is not there, and one that names no .gguf file: refused with the reason.
    let missing = url.replace("SmolLM2", "Nope");
    let e = deployments
        .apply(pb::ApplyRequest { name: "nope".into(), spec: Some(spec(&missing, 1, pb::PlacementStrategy::Binpack)) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains(&missing) && e.message().contains("the server answered 404 Not Found"), "{e:?}");
    let folder = url.rsplit_once('/').unwrap().0.to_string() + "/";
    let e = deployments
        .apply(pb::ApplyRequest { name: "folder".into(), spec: Some(spec(&folder, 1, pb::PlacementStrategy::Binpack)) })
        .await
        .unwrap_err();
    assert!(e.message().contains("a URL source must name one .gguf file"), "{e:?}");
}

/// The operator's allow-list of sources, as an API caller meets it: paths outside the model
/// roots (`/etc/passwd`, a `../` escape, a link out of a root) and URLs inside the network
/// (loopback, the link-local metadata address) are refused by the controller with the setting
/// to change, and by a worker's own `LoadModel`; no byte of them is read (the loopback server
/// counts none), and nothing is deployed. With no `--model-roots` the roots are `./models` and
/// the Hugging Face cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_outside_the_operators_allow_list_are_refused() {
    let (url, sent, _) = serve(b"GGUF".to_vec(), "model.gguf");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(dir.path().join("secret.gguf"), b"GGUF").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret.gguf"), root.join("link.gguf")).unwrap();
    let roots = root.display().to_string();
    let control = RunningController::start(&["--model-roots", &roots]);
    let mut deployments = control.deployments().await;
    let escape = root.join("../secret.gguf").display().to_string();
    let link = root.join("link.gguf").display().to_string();
    for (source, expected) in [
        ("/etc/passwd".to_string(), "model path /etc/passwd is outside the model roots".to_string()),
        (escape, "once links and `..` are resolved) is outside the model roots".into()),
        (link, "once links and `..` are resolved) is outside the model roots".into()),
        (url.clone(), "127.0.0.1 is a loopback address: model URLs may point inside the network only to hosts named on --allow-url-hosts".into()),
        ("http://169.254.169.254/latest/meta-data/model.gguf".into(), "169.254.169.254 is a link-local address".into()),
    ] {
        let e = deployments
            .apply(pb::ApplyRequest { name: "x".into(), spec: Some(spec(&source, 1, pb::PlacementStrategy::Binpack)) })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{source}: {e:?}");
        assert!(e.message().contains(&expected), "{source}: {}", e.message());
    }
    assert!(deployments.list(pb::ListDeploymentsRequest {}).await.unwrap().into_inner().deployments.is_empty());
    assert_eq!(sent.load(Ordering::Relaxed), 0, "nothing was fetched from the refused URL");

    // A worker checks its own loads the same way (a caller that reaches it directly).
    let mut cmd = common::gantry();
    cmd.env_remove("GANTRY_MODEL_ROOTS").args(["worker", "--listen", "127.0.0.1:0", "--gpus", "1x24GiB"]);
    let worker = RunningWorker::spawn(cmd);
    let mut client = worker.client().await;
    // The load's first event, or its error.
    let mut load = async |source: &str| -> Result<(), tonic::Status> {
        let req = pb::LoadModelRequest { model_id: "x".into(), source: source.into(), ..Default::default() };
        client.load_model(req).await?.into_inner().message().await.map(|_| ())
    };
    for source in ["/etc/passwd", url.as_str()] {
        let e = load(source).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{source}: {e:?}");
    }
    // Its default roots: ./models (the repository's, as it runs there) and the Hub cache.
    let models = std::fs::canonicalize(common::repo_root().join("models")).unwrap();
    let e = load("/etc/passwd").await.unwrap_err();
    assert!(e.message().contains(&models.display().to_string()), "{}", e.message());
    assert_eq!(sent.load(Ordering::Relaxed), 0);
}

/// A restored deployment whose URL's server has stopped answering does not hold up the
/// controller's start: it is sized after the start (within its deadline), its replicas waiting
/// with the reason meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_that_stopped_answering_does_not_hold_up_a_restart() {
    let silent = Arc::new(AtomicBool::new(false));
    let (url, _, _) = serve_until_silent(std::fs::read(common::smollm2()).unwrap(), "SmolLM2.gguf", silent.clone());
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("state.redb").display().to_string();
    let args = ["--store", store.as_str(), "--allow-url-hosts", "127.0.0.1"];
    let mut control = RunningController::start(&args);
    let mut deployments = control.deployments().await;
    deployments
        .apply(pb::ApplyRequest { name: "u".into(), spec: Some(spec(&url, 1, pb::PlacementStrategy::Binpack)) })
        .await
        .unwrap();
    control.terminate();
    silent.store(true, Ordering::Relaxed);
    let started = std::time::Instant::now();
    let control = RunningController::start(&args);
    assert!(started.elapsed() < Duration::from_secs(20), "the start waited on the URL: {:?}", started.elapsed());
    let mut deployments = control.deployments().await;
    let d = deployments.get(pb::GetDeploymentRequest { name: "u".into() }).await.unwrap().into_inner();
    let reason = status(&d).replica_status.first().map(|r| r.reason.clone()).unwrap_or_default();
    assert!(reason.contains("(after the controller's start)"), "{reason}");
}
