//! A real worker process for end-to-end tests: started on a free loopback port, found through
//! the `listening on` line it prints, killed when dropped.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gantry_proto::v1 as pb;
use gantry_proto::v1::worker_client::WorkerClient;
use tonic::transport::Channel;

/// How long a worker may take to load its start-up models.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug)]
pub struct RunningWorker {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
}

impl RunningWorker {
    /// Starts `gantry worker --listen 127.0.0.1:0 ARGS…` and waits until it prints `ready`.
    pub fn start(args: &[&str]) -> RunningWorker {
        let mut cmd = super::gantry();
        cmd.args(["worker", "--listen", "127.0.0.1:0"]).args(args);
        RunningWorker::spawn(cmd)
    }

    /// A worker named `id` with one declared 24 GiB GPU, attached to the controller at
    /// `controller` (a URL), with `extra` flags.
    pub fn join(controller: &str, id: &str, extra: &[&str]) -> RunningWorker {
        let args = [&["--controller", controller, "--worker-id", id, "--gpus", "1x24GiB"][..], extra].concat();
        RunningWorker::start(&args)
    }

    /// Starts a prepared worker command (its own flags and environment) and waits for `ready`.
    pub fn spawn(mut cmd: Command) -> RunningWorker {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the worker starts");
        let super::Captured { stderr, stdout, lines: rx } = super::capture(&mut child);
        let started = Instant::now();
        let mut addr = None;
        loop {
            let left = READY_TIMEOUT.saturating_sub(started.elapsed());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some((_, a)) = line.split_once(" listening on ") {
                        addr = Some(a.trim().to_string());
                    }
                    if line == "ready" {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    std::thread::sleep(Duration::from_millis(100));
                    panic!("the worker did not get ready (exit: {status:?}); stderr:\n{}", stderr.lock().unwrap());
                }
            }
        }
        let addr = addr.expect("the worker printed its address before `ready`");
        RunningWorker { child, addr, stdout, stderr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> WorkerClient<Channel> {
        WorkerClient::connect(self.url()).await.expect("the worker accepts connections")
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// SIGKILL: the process dies without a word to anyone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal (`STOP` freezes the process as a hung machine would, `CONT` thaws it).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status();
        assert!(ok.is_ok_and(|s| s.success()), "kill -{name} failed");
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting on the worker") {
                return status;
            }
            assert!(Instant::now() < deadline, "the worker did not stop within 30 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A chat request with greedy sampling.
pub fn chat_request(model: &str, user: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model_id: model.into(),
        input: Some(pb::generate_request::Input::Chat(pb::Conversation {
            messages: vec![pb::ChatMessage { role: "user".into(), content: user.into() }],
        })),
        sampling: Some(pb::SamplingParams { max_tokens: Some(max_tokens), ..Default::default() }),
        ..Default::default()
    }
}

/// What a whole generation stream carried.
#[derive(Debug, Default)]
pub struct Streamed {
    pub text: String,
    pub tokens: Vec<u32>,
    pub events: usize,
    pub done: Option<pb::GenerateDone>,
}

/// Reads a generation stream to its end.
pub async fn collect(client: &mut WorkerClient<Channel>, req: pb::GenerateRequest) -> Result<Streamed, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = Streamed::default();
    while let Some(ev) = stream.message().await? {
        out.events += 1;
        match ev.event {
            Some(pb::generate_event::Event::Token(t)) => {
                out.text.push_str(&t.text);
                out.tokens.extend(t.token_id);
            }
            Some(pb::generate_event::Event::Done(d)) => out.done = Some(d),
            None => {}
        }
    }
    Ok(out)
}

/// The worker's status.
pub async fn status(client: &mut WorkerClient<Channel>) -> pb::StatusResponse {
    client.status(pb::StatusRequest {}).await.expect("Status answers").into_inner()
}

/// Loads a model, returning the progress events and the final info.
pub async fn load(
    client: &mut WorkerClient<Channel>,
    req: pb::LoadModelRequest,
) -> Result<(Vec<pb::LoadProgress>, pb::ModelInfo), tonic::Status> {
    let mut stream = client.load_model(req).await?.into_inner();
    let mut progress = Vec::new();
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(pb::load_model_event::Event::Progress(p)) => progress.push(p),
            Some(pb::load_model_event::Event::Done(info)) => return Ok((progress, info)),
            None => {}
        }
    }
    panic!("the load stream ended without a done event");
}
