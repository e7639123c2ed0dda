//! Real faults on real processes: the controller and a worker each in a network namespace the
//! test makes, joined by a veth pair (traffic never leaves the two namespaces), with the link
//! degraded by `tc` (netem latency and loss where the kernel has it; else a `tbf` rate limit),
//! then cut (the worker's end down: a partition) and healed, while chats run through the
//! controller. Chats over the degraded link answer exactly what they answer without; a
//! partition is detected within the lease and the replica serves again once the link heals.
//! And a model split over two workers whose link to each other (not to the controller) is
//! cut: a chat fails with a clear error in bounded time, and answers the same after the heal.
//! The figures (detection, failure and recovery times) are printed.
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

/// Namespaces joined by a bridge: `c`, the controller's (10.231.0.1 on the bridge, which
/// lives there), and one per worker (`w[i]`, 10.231.0.(i+2)), each joined to the bridge by a
/// veth pair. Deleted on drop.
struct Net {
    c: String,
    w: Vec<String>,
    tag: u32,
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
    fn make(workers: usize) -> Result<Net, String> {
        // Unique among this run's tests (they run at once) and other runs on the machine.
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tag = std::process::id() % 10_000 * 10 + MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
        let w = (0..workers).map(|i| format!("gantry-w{tag}-{i}")).collect();
        let net = Net { c: format!("gantry-c{tag}"), w, tag };
        sh(&["ip", "netns", "add", &net.c])?;
        let bridge = format!("gb{tag}");
        sh(&["ip", "-n", &net.c, "link", "add", &bridge, "type", "bridge"])?;
        sh(&["ip", "-n", &net.c, "addr", "add", "10.231.0.1/24", "dev", &bridge])?;
        sh(&["ip", "-n", &net.c, "link", "set", &bridge, "up"])?;
        sh(&["ip", "-n", &net.c, "link", "set", "lo", "up"])?;
        for (i, ns) in net.w.iter().enumerate() {
            let (port, dev) = (net.controller_dev(i), net.worker_dev(i));
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "link", "add", &port, "netns", &net.c, "type", "veth", "peer", "name", &dev, "netns", ns])?;
            sh(&["ip", "-n", &net.c, "link", "set", &port, "master", &bridge])?;
            sh(&["ip", "-n", &net.c, "link", "set", &port, "up"])?;
            sh(&["ip", "-n", ns, "addr", "add", &format!("{}/24", net.worker_ip(i)), "dev", &dev])?;
            sh(&["ip", "-n", ns, "link", "set", &dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn worker_ip(&self, i: usize) -> String {
        format!("10.231.0.{}", i + 2)
    }

    /// Worker `i`'s end of its veth pair.
    fn worker_dev(&self, i: usize) -> String {
        format!("gw{}x{i}", self.tag)
    }

    /// The bridge's end of worker `i`'s veth pair.
    fn controller_dev(&self, i: usize) -> String {
        format!("gc{}x{i}", self.tag)
    }

    /// Degrades the link to worker 0 both ways: `tc netem` latency and loss where the kernel
    /// has netem, else (`Specified qdisc kind is unknown`: no `sch_netem` module) a `tbf` rate
    /// limit that starves it; returns what was applied. `false` removes it.
    fn degrade(&self, on: bool) -> Option<&'static str> {
        const NETEM: &str = "netem delay 40ms 10ms loss 3%";
        const TBF: &str = "tbf rate 256kbit burst 16kbit latency 400ms";
        let mut applied = None;
        for (ns, dev) in [(&self.c, self.controller_dev(0)), (&self.w[0], self.worker_dev(0))] {
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

    /// Cuts worker 0 off (its end of the link down: every packet dropped) or restores it.
    fn partition(&self, cut: bool) {
        sh(&["ip", "-n", &self.w[0], "link", "set", &self.worker_dev(0), if cut { "down" } else { "up" }]).unwrap();
    }

    /// Cuts workers `a` and `b` off from each other only (each drops what it would send the
    /// other: a blackhole route), both still reaching the controller; or restores it.
    fn partition_workers(&self, a: usize, b: usize, cut: bool) {
        for (from, to) in [(a, b), (b, a)] {
            let verb = if cut { "add" } else { "del" };
            let target = format!("{}/32", self.worker_ip(to));
            sh(&["ip", "-n", &self.w[from], "route", verb, "blackhole", &target]).unwrap();
        }
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
        for w in &self.w {
            let _ = sh(&["ip", "netns", "del", w]);
        }
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

/// Each worker's state as the controller lists it, in the controller's order.
fn worker_states(net: &Net) -> Vec<String> {
    let out = net
        .gantry(
            &net.c,
            &["get", "workers", "--controller", "http://10.231.0.1:50051", "--api-key", ADMIN, "-o", "json"],
        )
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array().into_iter().flatten().map(|w| w["state"].as_str().unwrap_or("").to_string()).collect()
}

fn worker_state(net: &Net) -> String {
    worker_states(net).into_iter().next().unwrap_or_default()
}

/// The test's namespaces, or `None` (printed SKIPPED) where this user may not make them.
fn network(workers: usize) -> Option<Net> {
    match Net::make(workers) {
        Ok(n) => Some(n),
        // Only where the machine forbids namespaces (an unprivileged user); any other failure fails.
        Err(e) if e.contains("Operation not permitted") || e.contains("Permission denied") => {
            eprintln!(
                "faults_netns: SKIPPED, this user may not make network namespaces (root with CAP_NET_ADMIN can): {e}"
            );
            None
        }
        Err(e) => panic!("making the test's network namespaces: {e}"),
    }
}

/// The controller in its namespace (lease 2 s, API keys, its own store in `dir`).
fn controller(net: &Net, dir: &std::path::Path) -> RunningController {
    let keys = dir.join("keys");
    std::fs::write(&keys, format!("{ADMIN} admin ops\n{WORKER} worker workers\n")).unwrap();
    let store = dir.join("state.redb");
    RunningController::spawn(
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
    )
}

/// Worker `i` in its namespace with one declared GPU of `gpu`, one thread, one sequence.
fn worker(net: &Net, i: usize, gpu: &str) -> RunningWorker {
    let listen = format!("{}:50052", net.worker_ip(i));
    let (id, gpus) = (format!("w{}", i + 1), format!("1x{gpu}"));
    RunningWorker::spawn(net.gantry(
        &net.w[i],
        &[
            "worker",
            "--listen",
            &listen,
            "--controller",
            "http://10.231.0.1:50051",
            "--api-key",
            WORKER,
            "--worker-id",
            &id,
            "--gpus",
            &gpus,
            "--parallel",
            "1",
            "--threads",
            "1",
        ],
    ))
}

/// `gantry deploy chat --model SmolLM2 ARGS…` through the controller.
fn deploy(net: &Net, args: &[&str]) {
    let model = common::smollm2().display().to_string();
    let mut all =
        vec!["deploy", "chat", "--model", &model, "--controller", "http://10.231.0.1:50051", "--api-key", ADMIN];
    all.extend_from_slice(args);
    let out = net.gantry(&net.c, &all).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The first answer once the replica serves.
fn first_answer(net: &Net) -> String {
    let mut answer = Err(String::new());
    wait("the replica", Duration::from_secs(180), || {
        answer = chat(net);
        answer.is_ok()
    });
    answer.unwrap()
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
    let Some(net) = network(1) else { return };
    let dir = tempfile::tempdir().unwrap();
    let _controller = controller(&net, dir.path());
    let _worker = worker(&net, 0, "24GiB");
    wait("the worker's registration", Duration::from_secs(30), || worker_state(&net) == "ready");
    deploy(&net, &["--context", "1K"]);
    let reference = first_answer(&net);
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

/// A model split over two workers (pipeline stages, hidden states streamed between them) when
/// the two workers lose each other but not the controller: a chat in the cut ends with a clear
/// error in bounded time (none hangs, none answers wrongly), and once the link heals the
/// replica answers exactly as before.
#[test]
fn a_partition_between_pipeline_stages() {
    let Some(net) = network(2) else { return };
    let dir = tempfile::tempdir().unwrap();
    let _controller = controller(&net, dir.path());
    // SmolLM2 at 2K context needs 657 MiB + 5% on one GPU: two of 662 MiB must share it.
    let _w1 = worker(&net, 0, "662MiB");
    let _w2 = worker(&net, 1, "662MiB");
    wait("both workers' registration", Duration::from_secs(30), || worker_states(&net) == ["ready", "ready"]);
    deploy(&net, &["--context", "2K", "--allow-multi-node"]);
    let reference = first_answer(&net);
    assert!(reference.contains("Paris"), "{reference}");

    net.partition_workers(0, 1, true);
    let started = Instant::now();
    let e = chat(&net).expect_err("a chat whose stages cannot reach each other cannot answer");
    let failed_after = started.elapsed();
    assert!(!e.is_empty(), "the error says why");
    // The stages' pings (every 5 s, 10 s to answer) find the cut well before the chat's 60 s.
    assert!(failed_after < Duration::from_secs(30), "the failing chat took {failed_after:?}: {e}");
    assert_eq!(worker_states(&net), ["ready", "ready"], "both workers still reach the controller");

    net.partition_workers(0, 1, false);
    let recovered = wait("the recovery", Duration::from_secs(90), || chat(&net).as_deref() == Ok(reference.as_str()));
    println!(
        "fault figures: a chat across cut stages failed after {:.1} s with `{}`; the same answer again {:.1} s after the heal",
        failed_after.as_secs_f64(),
        e.lines().last().unwrap_or_default(),
        recovered.as_secs_f64()
    );
}
