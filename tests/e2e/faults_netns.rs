//! Real faults on real processes: the controller and a worker each in a network namespace the
//! test makes, joined by a veth pair (traffic never leaves the two namespaces), with the link
//! degraded by `tc` (netem latency and loss where the kernel has it; else a `tbf` rate limit),
//! then cut (the worker's end down: a partition) and healed, while chats run through the
//! controller. Chats over the degraded link answer exactly what they answer without; a
//! partition is detected within the lease and the replica serves again once the link heals.
//! The figures (detection and recovery times) are printed.
//!
//! Needs root (CAP_NET_ADMIN) and `ip`/`tc`; a user who may not make namespaces gets a printed
//! SKIPPED (the development machine runs the tests as root).

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::controller::RunningController;
use crate::common::worker::RunningWorker;

const ADMIN: &str = "k-admin-0123456789abcdef";
const WORKER: &str = "k-worker-0123456789abcde";

/// Two namespaces joined by a veth pair: `c` (10.231.0.1, the controller's) and `w`
/// (10.231.0.2, the worker's). Deleted on drop.
struct Net {
    c: String,
    w: String,
}

fn sh(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Net {
    fn make() -> Result<Net, String> {
        let tag = std::process::id() % 100_000;
        let net = Net { c: format!("gantry-c{tag}"), w: format!("gantry-w{tag}") };
        let (va, vb) = (format!("gc{tag}"), format!("gw{tag}"));
        sh(&["ip", "netns", "add", &net.c])?;
        sh(&["ip", "netns", "add", &net.w])?;
        sh(&["ip", "link", "add", &va, "netns", &net.c, "type", "veth", "peer", "name", &vb, "netns", &net.w])?;
        for (ns, dev, addr) in [(&net.c, &va, "10.231.0.1/24"), (&net.w, &vb, "10.231.0.2/24")] {
            sh(&["ip", "-n", ns, "addr", "add", addr, "dev", dev])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// The worker side's veth.
    fn worker_dev(&self) -> String {
        self.w.replace("gantry-w", "gw")
    }

    fn controller_dev(&self) -> String {
        self.c.replace("gantry-c", "gc")
    }

    /// Degrades the link both ways: `tc netem` latency and loss where the kernel has netem,
    /// else (`Specified qdisc kind is unknown`: no `sch_netem` module) a `tbf` rate limit that
    /// starves it; returns what was applied. `None` removes it.
    fn degrade(&self, on: bool) -> Option<&'static str> {
        const NETEM: &str = "netem delay 40ms 10ms loss 3%";
        const TBF: &str = "tbf rate 256kbit burst 16kbit latency 400ms";
        let mut applied = None;
        for (ns, dev) in [(&self.c, self.controller_dev()), (&self.w, self.worker_dev())] {
            let _ = sh(&["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", &dev, "root"]);
            if !on {
                continue;
            }
            let add = |spec: &str| {
                let mut args =
                    vec!["ip", "netns", "exec", ns.as_str(), "tc", "qdisc", "add", "dev", dev.as_str(), "root"];
                args.extend(spec.split_whitespace());
                sh(&args)
            };
            applied = Some(match add(NETEM) {
                Ok(()) => NETEM,
                Err(e) if e.contains("qdisc kind is unknown") => {
                    add(TBF).unwrap();
                    TBF
                }
                Err(e) => panic!("{e}"),
            });
        }
        applied
    }

    /// Cuts the link (the worker's end down: every packet dropped) or restores it.
    fn partition(&self, cut: bool) {
        sh(&["ip", "-n", &self.w, "link", "set", &self.worker_dev(), if cut { "down" } else { "up" }]).unwrap();
    }

    /// `gantry ARGS` inside namespace `ns`, with the tests' environment.
    fn gantry(&self, ns: &str, args: &[&str]) -> Command {
        let base = common::gantry();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_gantry")]).args(args);
        cmd.current_dir(common::repo_root());
        for (k, v) in base.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.c]);
        let _ = sh(&["ip", "netns", "del", &self.w]);
    }
}

/// The answer of a greedy chat through the controller, from the CLI in its namespace.
fn chat(net: &Net) -> Result<String, String> {
    let out = net
        .gantry(
            &net.c,
            &[
                "chat",
                "--controller",
                "http://10.231.0.1:50051",
                "--api-key",
                ADMIN,
                "--model",
                "chat",
                "--max-tokens",
                "16",
                "--timeout",
                "60",
                "What is the capital of France?",
            ],
        )
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// The worker's state as the controller lists it.
fn worker_state(net: &Net) -> String {
    let out = net
        .gantry(
            &net.c,
            &["get", "workers", "--controller", "http://10.231.0.1:50051", "--api-key", ADMIN, "-o", "json"],
        )
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v[0]["state"].as_str().unwrap_or("").to_string()
}

fn wait(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what} did not happen within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}

#[test]
fn latency_loss_and_a_partition_between_controller_and_worker() {
    let net = match Net::make() {
        Ok(n) => n,
        // Only where the machine forbids namespaces (an unprivileged user); any other failure fails.
        Err(e) if e.contains("Operation not permitted") || e.contains("Permission denied") => {
            eprintln!(
                "faults_netns: SKIPPED, this user may not make network namespaces (root with CAP_NET_ADMIN can): {e}"
            );
            return;
        }
        Err(e) => panic!("making the test's network namespaces: {e}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("{ADMIN} admin ops\n{WORKER} worker workers\n")).unwrap();
    let store = dir.path().join("state.redb");
    let _controller = RunningController::spawn(
        net.gantry(
            &net.c,
            &[
                "controller",
                "--listen",
                "10.231.0.1:50051",
                "--http",
                "off",
                "--lease",
                "2",
                "--api-keys",
                keys.to_str().unwrap(),
                "--store",
                store.to_str().unwrap(),
            ],
        ),
        None,
    );
    let _worker = RunningWorker::spawn(net.gantry(
        &net.w,
        &[
            "worker",
            "--listen",
            "10.231.0.2:50052",
            "--controller",
            "http://10.231.0.1:50051",
            "--api-key",
            WORKER,
            "--worker-id",
            "w1",
            "--gpus",
            "1x24GiB",
            "--threads",
            "1",
        ],
    ));
    wait("the worker's registration", Duration::from_secs(30), || worker_state(&net) == "ready");
    let model = common::smollm2().display().to_string();
    let out = net
        .gantry(
            &net.c,
            &[
                "deploy",
                "chat",
                "--model",
                &model,
                "--context",
                "1K",
                "--controller",
                "http://10.231.0.1:50051",
                "--api-key",
                ADMIN,
            ],
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference = {
        let mut answer = Err(String::new());
        wait("the replica", Duration::from_secs(120), || {
            answer = chat(&net);
            answer.is_ok()
        });
        answer.unwrap()
    };
    assert!(reference.contains("Paris"), "{reference}");

    // A degraded link both ways: every chat answers the same, token for token.
    let applied = net.degrade(true).unwrap();
    let started = Instant::now();
    for i in 0..3 {
        assert_eq!(chat(&net).unwrap(), reference, "chat {i} under `{applied}`");
    }
    let degraded = started.elapsed() / 3;
    net.degrade(false);

    // A partition: the controller loses the worker within its lease (2 s, plus a heartbeat).
    net.partition(true);
    let detected = wait("the partition's detection", Duration::from_secs(20), || worker_state(&net) != "ready");
    let e = chat(&net).unwrap_err();
    assert!(!e.is_empty(), "a chat during the partition fails with a reason");
    // Healed: the worker registers again, still holding the replica, which serves again.
    net.partition(false);
    let recovered = wait("the recovery", Duration::from_secs(60), || chat(&net).as_deref() == Ok(reference.as_str()));
    println!(
        "fault figures: chats under `{applied}` took {:.2} s each, unchanged; partition detected after {:.1} s (lease 2 s); serving again {:.1} s after the link healed",
        degraded.as_secs_f64(),
        detected.as_secs_f64(),
        recovered.as_secs_f64()
    );
}
