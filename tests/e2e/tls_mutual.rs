//! TLS with certificates the test makes (openssl): a controller serving gRPC and HTTPS with
//! its certificate and requiring workers to present one signed by its client CA. A worker
//! with such a certificate registers and serves (over TLS itself: the controller dials it
//! with its own certificate, and a plaintext caller is refused); one without a certificate,
//! one with a certificate from another CA, and one speaking plaintext never register. A model
//! split over two TLS workers streams hidden states between them over TLS. The CLI and an
//! HTTPS client verify the controller against the CA.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::certs::{leaf, make_ca};
use crate::common::controller::RunningController;
use crate::common::worker::RunningWorker;
use crate::common::{gantry, run};

fn p(dir: &Path, file: &str) -> String {
    dir.join(file).display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_admits_only_workers_with_a_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_ca(d, "ca");
    make_ca(d, "rogue-ca");
    leaf(d, "ca", "controller");
    leaf(d, "ca", "worker");
    leaf(d, "rogue-ca", "rogue");

    let mut cmd = gantry();
    cmd.args(["controller", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--lease", "2"]).args([
        "--tls-cert",
        &p(d, "controller.pem"),
        "--tls-key",
        &p(d, "controller.key"),
        "--tls-client-ca",
        &p(d, "ca.pem"),
    ]);
    let control = RunningController::spawn(cmd, None);
    let url = format!("https://{}", control.addr);
    let worker_on = |id: &str, gpus: &str, tls: &[String]| {
        let mut args: Vec<String> =
            ["--controller", &url, "--worker-id", id, "--gpus", gpus, "--threads", "1"].map(String::from).to_vec();
        args.extend_from_slice(tls);
        RunningWorker::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let tls_args = |cert: &str| {
        vec![
            "--tls-ca".into(),
            p(d, "ca.pem"),
            "--tls-cert".into(),
            p(d, &format!("{cert}.pem")),
            "--tls-key".into(),
            p(d, &format!("{cert}.key")),
        ]
    };
    let worker = |id: &str, tls: &[String]| worker_on(id, "1x2GiB", tls);
    let good = worker("good", &tls_args("worker"));
    let nocert = worker("nocert", &["--tls-ca".into(), p(d, "ca.pem")]);
    let rogue = worker("rogue", &tls_args("rogue"));
    let plain = RunningWorker::start(&["--controller", &format!("http://{}", control.addr), "--worker-id", "plain"]);

    // The CLI, verifying the controller against the CA: only `good` is there.
    let get = |extra: &[&str]| run(gantry().args(["get", "workers", "--controller", &url]).args(extra));
    let deadline = Instant::now() + Duration::from_secs(20);
    let listed = loop {
        let (code, out, err) = get(&["--tls-ca", &p(d, "ca.pem")]);
        assert_eq!(code, 0, "{err}");
        if out.contains("good") {
            break out;
        }
        assert!(Instant::now() < deadline, "the worker with a certificate did not register: {out}\n{}", good.stderr());
        std::thread::sleep(Duration::from_millis(100));
    };
    // Each refused worker has tried (and says why) by now, or shortly.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !nocert.stderr().contains("requires workers to present a TLS client certificate") {
        assert!(Instant::now() < deadline, "{}", nocert.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    while !(rogue.stderr().contains("controller link down") && plain.stderr().contains("controller link down")) {
        assert!(Instant::now() < deadline, "rogue: {}\nplain: {}", rogue.stderr(), plain.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, listed_again, _) = get(&["--tls-ca", &p(d, "ca.pem")]);
    for out in [&listed, &listed_again] {
        assert!(!out.contains("nocert") && !out.contains("rogue") && !out.contains("plain"), "{out}");
    }

    // Without the CA the CLI says what to give; a deployment on `good` answers through TLS.
    let (code, _, err) = get(&[]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("give --tls-ca FILE"), "{err}");
    let model = common::smollm2();
    let (code, _, err) = run(gantry()
        .args(["deploy", "smol", "--model", model.to_str().unwrap(), "--context", "1K"])
        .args(["--controller", &url, "--tls-ca", &p(d, "ca.pem")]));
    assert_eq!(code, 0, "{err}");
    // Asks `model` through TLS until its replica is ready (a minute at most).
    let ask = |model: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (code, out, err) = run(gantry()
                .args(["chat", "--model", model, "What is the capital of France?"])
                .args(["--max-tokens", "12", "--controller", &url, "--tls-ca", &p(d, "ca.pem")]));
            if code == 0 {
                break out;
            }
            assert!(Instant::now() < deadline, "{err}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let answer = ask("smol");
    assert!(answer.contains("Paris"), "{answer}");

    // The worker serves TLS: a plaintext caller gets nowhere.
    let mut plain_client = good.client().await;
    assert!(plain_client.status(gantry_proto::v1::StatusRequest {}).await.is_err(), "plaintext reached a TLS worker");

    // Split over two TLS workers (one 662 MiB GPU each cannot hold SmolLM2 at 2K alone): the
    // stages talk over TLS with their certificates, and answer the same.
    let mut split_args = tls_args("worker");
    split_args.extend(["--parallel", "1", "--label", "pool=split"].map(String::from));
    let _s1 = worker_on("s1", "1x662MiB", &split_args);
    let _s2 = worker_on("s2", "1x662MiB", &split_args);
    let (code, _, err) = run(gantry()
        .args(["deploy", "split", "--model", model.to_str().unwrap(), "--context", "2K"])
        .args(["--selector", "pool=split", "--allow-multi-node", "--controller", &url, "--tls-ca", &p(d, "ca.pem")]));
    assert_eq!(code, 0, "{err}");
    let split_answer = ask("split");
    assert_eq!(split_answer, answer, "two stages over TLS answer as one replica");
    let (_, described, _) =
        run(gantry().args(["get", "deployments", "split", "--controller", &url, "--tls-ca", &p(d, "ca.pem")]));
    assert!(described.contains("s1") && described.contains("s2") && described.contains("+head"), "{described}");

    // HTTPS with the CA: the OpenAI model list.
    let script = "import ssl, sys, urllib.request\nctx = ssl.create_default_context(cafile=sys.argv[1])\nprint(urllib.request.urlopen(sys.argv[2], context=ctx).read().decode())";
    let https = format!("https://{}/v1/models", control.http.clone().unwrap());
    // Two clients that connect and never start a handshake hold no one up (each handshake
    // has its own task; a silent one is dropped after 10 s).
    let _silent: Vec<_> =
        (0..2).map(|_| std::net::TcpStream::connect(control.http.clone().unwrap()).unwrap()).collect();
    let started = Instant::now();
    let (code, out, err) = run(Command::new("python3").args(["-c", script, &p(d, "ca.pem"), &https]));
    assert_eq!(code, 0, "{err}");
    assert!(started.elapsed() < Duration::from_secs(8), "waited behind silent clients: {:?}", started.elapsed());
    assert!(out.contains("\"smol\""), "{out}");
    let (code, _, err) = run(Command::new("python3").args(["-c", script, &p(d, "rogue-ca.pem"), &https]));
    assert_ne!(code, 0, "a client trusting another CA refuses the controller");
    assert!(err.contains("CERTIFICATE_VERIFY_FAILED"), "{err}");
}
