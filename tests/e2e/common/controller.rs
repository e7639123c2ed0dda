//! A real controller process for end-to-end tests, and the small gRPC helpers the tests use
//! to drive it.

use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gantry_proto::v1 as pb;
use pb::cluster_client::ClusterClient;
use pb::deployments_client::DeploymentsClient;
use pb::inference_client::InferenceClient;
use tonic::transport::Channel;

#[derive(Debug)]
pub struct RunningController {
    child: Child,
    /// The state file's folder when the test named no store (never the user's own).
    _store: Option<tempfile::TempDir>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The HTTP address, when it serves HTTP.
    pub http: Option<String>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
}

impl RunningController {
    /// Starts `gantry controller --listen 127.0.0.1:0 --http off ARGS…` and waits until it
    /// prints the address it serves on.
    pub fn start(args: &[&str]) -> RunningController {
        RunningController::start_on("127.0.0.1:0", args)
    }

    /// The same on a given address (a restart keeps its port so workers find it again).
    pub fn start_on(listen: &str, args: &[&str]) -> RunningController {
        let mut cmd = super::gantry();
        cmd.args(["controller", "--listen", listen, "--http", "off"]).args(args);
        RunningController::spawn(cmd, None)
    }

    /// `gantry up --listen 127.0.0.1:0 --http 127.0.0.1:0 ARGS…`, once it prints `ready:`.
    pub fn up(args: &[&str]) -> RunningController {
        let mut cmd = super::gantry();
        cmd.args(["up", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"]).args(args);
        RunningController::spawn(cmd, Some("ready:"))
    }

    /// Runs a prepared command until it prints its address (and then a line starting with
    /// `ready_line`, when given).
    pub fn spawn(mut cmd: std::process::Command, ready_line: Option<&str>) -> RunningController {
        cmd.env("GANTRY_LOG", "info,gantry_controller=debug");
        // A controller started without a store of the test's own gets a fresh one, so that no
        // test reads what another (or an earlier run) left in the default state file.
        let named = cmd.get_args().any(|a| a == "--store" || a == "--etcd");
        let store = (!named).then(|| tempfile::tempdir().expect("a temporary folder"));
        if let Some(dir) = &store {
            cmd.env("GANTRY_STORE", dir.path().join("state.redb"));
        }
        let mut child: Child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("gantry starts");
        let super::Captured { stderr, stdout, lines: rx } = super::capture(&mut child);
        let mut addr = None;
        let mut http = None;
        loop {
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("gantry controller listening on ") {
                        addr = rest.split_whitespace().next().map(str::to_string);
                        http =
                            rest.split_once(" and ").and_then(|(_, h)| h.split_whitespace().next()).map(str::to_string);
                        if ready_line.is_none() {
                            break;
                        }
                    }
                    if ready_line.is_some_and(|r| line.starts_with(r)) {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    std::thread::sleep(Duration::from_millis(100));
                    panic!("gantry did not get ready (exit: {status:?}); stderr:\n{}", stderr.lock().unwrap());
                }
            }
        }
        // A standby (`ready_line` "gantry controller standby") has no address yet.
        let addr = addr.unwrap_or_default();
        RunningController { child, _store: store, addr, http, stdout, stderr }
    }

    /// Waits until it prints `gantry controller listening on ADDR` (a standby, once it leads).
    pub fn wait_listening(&mut self, timeout: Duration) {
        let started = std::time::Instant::now();
        loop {
            let line = self.stdout().into_iter().find(|l| l.starts_with("gantry controller listening on "));
            if let Some(line) = line {
                let rest = line.trim_start_matches("gantry controller listening on ");
                self.addr = rest.split_whitespace().next().unwrap_or_default().to_string();
                return;
            }
            assert!(started.elapsed() < timeout, "no `listening on` within {timeout:?}; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id (to read its memory from `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url()).unwrap().connect().await.expect("the controller accepts connections")
    }

    pub async fn deployments(&self) -> DeploymentsClient<Channel> {
        DeploymentsClient::new(self.channel().await)
    }

    pub async fn cluster(&self) -> ClusterClient<Channel> {
        ClusterClient::new(self.channel().await)
    }

    pub async fn inference(&self) -> InferenceClient<Channel> {
        InferenceClient::new(self.channel().await)
    }

    /// Sends SIGTERM and waits (at most 15 s) for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting on gantry") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "gantry did not stop within 15 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunningController {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A deployment spec with the given strategy.
pub fn spec(source: &str, replicas: u32, strategy: pb::PlacementStrategy) -> pb::DeploymentSpec {
    pb::DeploymentSpec {
        source: source.into(),
        replicas,
        context_length: 2048,
        placement: Some(pb::PlacementPolicy { strategy: strategy as i32, ..Default::default() }),
        ..Default::default()
    }
}

/// Polls `Get` until `check` accepts the deployment (or panics after `timeout` with the last view).
pub async fn wait_for(
    client: &mut DeploymentsClient<Channel>,
    name: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&pb::Deployment) -> bool,
) -> pb::Deployment {
    let started = Instant::now();
    loop {
        let d = client.get(pb::GetDeploymentRequest { name: name.into() }).await.map(|r| r.into_inner());
        if let Ok(d) = &d
            && check(d)
        {
            return d.clone();
        }
        assert!(started.elapsed() < timeout, "{name}: {what} did not happen within {timeout:?}; last: {d:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn status(d: &pb::Deployment) -> pb::DeploymentStatus {
    d.status.clone().unwrap_or_default()
}

pub fn ready(d: &pb::Deployment) -> bool {
    let s = status(d);
    let want = d.spec.as_ref().map_or(0, |s| s.replicas);
    s.ready_replicas == want && s.replica_status.len() as u32 == want
}

/// `worker/gpu:N` of each replica, by replica index.
pub fn placements(d: &pb::Deployment) -> Vec<String> {
    status(d)
        .replica_status
        .iter()
        .map(|r| r.stages.iter().map(|s| format!("{}/gpu:{}", s.worker_id, s.gpu_index)).collect::<Vec<_>>().join(","))
        .collect()
}

/// Waits until `n` workers are connected and ready.
pub async fn wait_for_workers(client: &mut ClusterClient<Channel>, n: usize) -> Vec<pb::WorkerInfo> {
    let started = Instant::now();
    loop {
        let workers = client.list_workers(pb::ListWorkersRequest {}).await.expect("ListWorkers").into_inner().workers;
        if workers.iter().filter(|w| w.state == "ready").count() >= n {
            return workers;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{n} workers did not register: {workers:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A greedy chat through the controller: the streamed text and token ids.
pub async fn chat(
    client: &mut InferenceClient<Channel>,
    model: &str,
    user: &str,
    max_tokens: u32,
) -> Result<(String, Vec<u32>), tonic::Status> {
    let req = pb::ChatRequest {
        model: model.into(),
        messages: vec![pb::ChatMessage { role: "user".into(), content: user.into() }],
        sampling: Some(pb::SamplingParams { max_tokens: Some(max_tokens), ..Default::default() }),
        request_id: String::new(),
    };
    let mut stream = client.chat(req).await?.into_inner();
    let (mut text, mut tokens) = (String::new(), Vec::new());
    while let Some(ev) = stream.message().await? {
        if let Some(pb::generate_event::Event::Token(t)) = ev.event {
            text.push_str(&t.text);
            tokens.extend(t.token_id);
        }
    }
    Ok((text, tokens))
}
