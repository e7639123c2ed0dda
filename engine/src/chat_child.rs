//! Chat templates rendered in a child process.
//!
//! A chat template ships with the model, so it is untrusted code. minijinja bounds its steps
//! (fuel) and what it writes (the output cap), but not everything a template can do: text built
//! up without being written (a string doubled in a capture block), a sequence repeated in Rust
//! (`[] * 10**12`, iterated outside fuel) and nesting deep enough to overflow the stack each stop
//! the process that renders. So a worker renders in a child process of its own executable, one
//! per model, with an address-space limit and a deadline: such a template costs that one render
//! a clear error, the child is started again for the next, and the worker goes on.
//!
//! The child is the same binary started with [`RENDERER_ENV`] set; every binary that renders
//! this way calls [`serve_renderer_if_child`] first thing in `main`. It reads one JSON request
//! per line on stdin and answers one JSON line on stdout.

use std::borrow::Cow;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::EngineError;
use crate::chat::{ChatTemplate, Message};

/// Set (to the address-space limit in bytes) in a renderer child's environment.
pub const RENDERER_ENV: &str = "GANTRY_CHAT_TEMPLATE_RENDERER";

/// Where chat templates are rendered.
#[derive(Debug, Clone, Default)]
pub enum TemplateIsolation {
    /// In the calling process. A hostile template can stop it: for tests and tools that render
    /// templates they trust.
    #[default]
    InProcess,
    /// In a child process per template, restarted when it dies.
    Child(ChildLimits),
}

/// How a renderer child is started and bounded.
#[derive(Debug, Clone)]
pub struct ChildLimits {
    /// The executable to start: one that calls [`serve_renderer_if_child`] first in `main`.
    pub program: PathBuf,
    /// The child's address-space limit (`RLIMIT_AS`), in bytes.
    pub memory_bytes: u64,
    /// How long one render (or the compile when the child starts) may take.
    pub deadline: Duration,
}

impl ChildLimits {
    /// 1 GiB: the 32 MiB a render may write, many times over, and the executable's own mappings.
    pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;
    /// Past any real template (they take well under a millisecond) and past the time the step
    /// budget allows a runaway loop, so that the budget's clearer error comes first.
    pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

    /// This executable, with the default limits. On Linux it is named through `/proc/self/exe`,
    /// which still starts this binary after it was replaced or deleted on disk (an upgrade).
    pub fn this_executable() -> Result<ChildLimits, String> {
        let proc_self = PathBuf::from("/proc/self/exe");
        let program = if proc_self.exists() {
            proc_self
        } else {
            std::env::current_exe().map_err(|e| format!("cannot tell which executable this is: {e}"))?
        };
        Ok(ChildLimits { program, memory_bytes: Self::DEFAULT_MEMORY_BYTES, deadline: Self::DEFAULT_DEADLINE })
    }
}

/// One request to a renderer child.
#[derive(Debug, Serialize, Deserialize)]
enum Request<'a> {
    Compile {
        source: String,
        origin: String,
        bos_token: String,
        eos_token: String,
    },
    /// Borrowed when the worker writes it (no copy of the conversation), owned when read.
    Render {
        messages: Cow<'a, [Message]>,
        add_generation_prompt: bool,
        extra: Cow<'a, serde_json::Map<String, serde_json::Value>>,
    },
}

/// A renderer child's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    /// The rendered text (empty for a compile).
    Ok(String),
    /// The template's own error (it does not compile, ran out of fuel, raised an exception…).
    Err(String),
    /// minijinja panicked: a bug there (or here), reported rather than taken down with.
    Panic(String),
}

/// If this process was started as a renderer child, serves requests until stdin closes and
/// exits; otherwise returns at once. Call it first thing in `main`.
pub fn serve_renderer_if_child() {
    let Some(limit) = std::env::var_os(RENDERER_ENV) else { return };
    let code = match limit.to_str().and_then(|s| s.parse::<u64>().ok()) {
        Some(bytes) => serve(bytes),
        None => {
            eprintln!("{RENDERER_ENV} must be a byte count, not {limit:?}");
            2
        }
    };
    std::process::exit(code);
}

/// The child's loop.
fn serve(memory_bytes: u64) -> i32 {
    let limit = rustix::process::Rlimit { current: Some(memory_bytes), maximum: Some(memory_bytes) };
    if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::As, limit) {
        eprintln!("cannot limit the renderer's memory: {e}");
        return 2;
    }
    // Panics are answered as `Reply::Panic`; the hook keeps the message instead of printing it.
    let last_panic = Arc::new(Mutex::new(String::new()));
    let kept = last_panic.clone();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut m) = kept.lock() {
            *m = info.to_string();
        }
    }));
    let mut template: Option<ChatTemplate> = None;
    let mut input = std::io::stdin().lock();
    let mut output = std::io::stdout().lock();
    let mut line = String::new();
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) => return 0,
            Ok(_) => {}
            Err(e) => {
                eprintln!("renderer: cannot read a request: {e}");
                return 1;
            }
        }
        let reply = match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::Err(format!("renderer: a request it cannot read: {e}")),
            Ok(request) => {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| answer(&mut template, request)));
                outcome.unwrap_or_else(|_| {
                    Reply::Panic(last_panic.lock().map(|m| m.clone()).unwrap_or_else(|_| "a panic".into()))
                })
            }
        };
        let written = serde_json::to_writer(&mut output, &reply)
            .map_err(std::io::Error::other)
            .and_then(|_| output.write_all(b"\n"))
            .and_then(|_| output.flush());
        if written.is_err() {
            return 1; // the worker is gone
        }
    }
}

fn answer(template: &mut Option<ChatTemplate>, request: Request<'_>) -> Reply {
    match request {
        Request::Compile { source, origin, bos_token, eos_token } => {
            match ChatTemplate::new(&source, &origin, &bos_token, &eos_token) {
                Ok(t) => {
                    *template = Some(t);
                    Reply::Ok(String::new())
                }
                Err(e) => {
                    *template = None;
                    Reply::Err(message(e))
                }
            }
        }
        Request::Render { messages, add_generation_prompt, extra } => match template {
            None => Reply::Err("renderer: no template was compiled".into()),
            Some(t) => match t.render(&messages, add_generation_prompt, &extra) {
                Ok(text) => Reply::Ok(text),
                Err(e) => Reply::Err(message(e)),
            },
        },
    }
}

/// An error's own words, without the kind the worker adds again.
fn message(e: EngineError) -> String {
    match e {
        EngineError::Template(m) => m,
        other => other.to_string(),
    }
}

impl Reply {
    /// The text, or the template's error (a panic reported as one).
    pub fn into_result(self) -> Result<String, EngineError> {
        match self {
            Reply::Ok(text) => Ok(text),
            Reply::Err(e) => Err(EngineError::Template(e)),
            Reply::Panic(p) => Err(EngineError::Template(format!("the chat template's renderer panicked: {p}"))),
        }
    }
}

/// The worker's side: one template's renderer child, started when needed (and again after
/// one dies).
#[derive(Debug)]
pub struct ChildRenderer {
    limits: ChildLimits,
    /// The compile request, sent to every child this renderer starts.
    compile: String,
    running: Option<Running>,
}

/// A started child.
#[derive(Debug)]
struct Running {
    child: Child,
    stdin: ChildStdin,
    /// Reply lines, read by a thread; disconnected when the child's stdout closes.
    replies: Receiver<String>,
    /// The end of what the child wrote to stderr (why it died), read by a thread.
    stderr: Option<JoinHandle<String>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The most of a dead child's stderr kept for its error.
const STDERR_TAIL: usize = 4096;

impl ChildRenderer {
    /// Starts a child and compiles `source` in it, so that a template that does not compile (or
    /// a renderer that cannot start) is known at once (when the model loads).
    pub fn start(
        limits: &ChildLimits,
        source: &str,
        origin: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChildRenderer, EngineError> {
        let mut renderer = ChildRenderer { limits: limits.clone(), compile: String::new(), running: None };
        renderer.recompile(source, origin, bos_token, eos_token)?;
        Ok(renderer)
    }

    /// Compiles another template in this renderer (its child stays, if it runs).
    pub fn recompile(
        &mut self,
        source: &str,
        origin: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<(), EngineError> {
        let compile = Request::Compile {
            source: source.into(),
            origin: origin.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        };
        self.compile = serde_json::to_string(&compile).map_err(|e| EngineError::Template(e.to_string()))?;
        if self.running.is_none() {
            return self.ensure_running();
        }
        let compile = self.compile.clone();
        self.call(&compile)?.into_result().map(|_| ())
    }

    /// The running child's process id, if one runs.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.child.id())
    }

    /// Renders in the child, starting one first when none runs.
    pub fn render(
        &mut self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, EngineError> {
        self.render_reply(messages, add_generation_prompt, extra)?.into_result()
    }

    /// Renders in the child and returns its reply as it is; `Err` when the renderer failed (it
    /// died, passed its deadline, or could not start).
    pub fn render_reply(
        &mut self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Reply, EngineError> {
        let request =
            Request::Render { messages: Cow::Borrowed(messages), add_generation_prompt, extra: Cow::Borrowed(extra) };
        let line = serde_json::to_string(&request).map_err(|e| EngineError::Template(e.to_string()))?;
        self.ensure_running()?;
        self.call(&line)
    }

    fn ensure_running(&mut self) -> Result<(), EngineError> {
        if self.running.is_some() {
            return Ok(());
        }
        let mut child = Command::new(&self.limits.program)
            // What `ps` shows, instead of `/proc/self/exe`.
            .arg0("gantry chat-template renderer")
            .env(RENDERER_ENV, self.limits.memory_bytes.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                EngineError::Template(format!(
                    "cannot start the chat-template renderer ({}): {e}",
                    self.limits.program.display()
                ))
            })?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(EngineError::Template("the chat-template renderer started without its pipes".into()));
        };
        let (tx, replies) = mpsc::channel();
        std::thread::Builder::new()
            .name("template-replies".into())
            .spawn(move || {
                let mut lines = BufReader::new(stdout);
                loop {
                    let mut line = String::new();
                    match lines.read_line(&mut line) {
                        Ok(n) if n > 0 && tx.send(line).is_ok() => {}
                        _ => return,
                    }
                }
            })
            .map_err(|e| EngineError::Template(format!("cannot start a thread for the renderer: {e}")))?;
        let stderr = std::thread::Builder::new()
            .name("template-stderr".into())
            .spawn(move || tail(stderr))
            .map_err(|e| EngineError::Template(format!("cannot start a thread for the renderer: {e}")))?;
        self.running = Some(Running { child, stdin, replies, stderr: Some(stderr) });
        let compile = self.compile.clone();
        self.call(&compile)?.into_result().map(|_| ())
    }

    /// Sends one request line and waits for its reply, within the deadline.
    fn call(&mut self, line: &str) -> Result<Reply, EngineError> {
        let Some(running) = self.running.as_mut() else {
            return Err(EngineError::Template("the chat-template renderer is not running".into()));
        };
        let sent = running
            .stdin
            .write_all(line.as_bytes())
            .and_then(|_| running.stdin.write_all(b"\n"))
            .and_then(|_| running.stdin.flush());
        let received = match sent {
            Ok(()) => running.replies.recv_timeout(self.limits.deadline),
            Err(_) => Err(RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(reply) => match serde_json::from_str::<Reply>(&reply) {
                Ok(reply) => Ok(reply),
                Err(e) => {
                    self.running = None;
                    Err(EngineError::Template(format!("the chat-template renderer answered something unreadable: {e}")))
                }
            },
            Err(RecvTimeoutError::Timeout) => {
                self.running = None; // killed by its drop
                Err(EngineError::Template(format!(
                    "the chat template did not finish within {} s (a loop the step budget does not see?); its renderer was stopped",
                    self.limits.deadline.as_secs_f64()
                )))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let (mut status, mut stderr) = (None, String::new());
                if let Some(mut dead) = self.running.take() {
                    status = dead.child.wait().ok();
                    stderr = dead.stderr.take().and_then(|t| t.join().ok()).unwrap_or_default();
                }
                Err(EngineError::Template(death_message(status, &stderr, self.limits.memory_bytes)))
            }
        }
    }
}

/// Reads a pipe to its end, keeping the last [`STDERR_TAIL`] bytes.
fn tail(mut pipe: impl Read) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = pipe.read(&mut buf) {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * STDERR_TAIL {
            kept.drain(..kept.len() - STDERR_TAIL);
        }
    }
    let start = kept.len().saturating_sub(STDERR_TAIL);
    String::from_utf8_lossy(&kept[start..]).into_owned()
}

/// Why a renderer child died, in the words a model's operator needs.
fn death_message(status: Option<ExitStatus>, stderr: &str, memory_bytes: u64) -> String {
    use std::os::unix::process::ExitStatusExt;
    let how = match status {
        Some(s) => match s.signal() {
            Some(sig) => format!("signal {sig}"),
            None => format!("exit status {}", s.code().unwrap_or(-1)),
        },
        None => "unknown status".into(),
    };
    if stderr.contains("overflowed its stack") || status.and_then(|s| s.signal()) == Some(11) {
        format!(
            "the chat template nested too deeply and overflowed its renderer's stack ({how}); that render was stopped"
        )
    } else if stderr.contains("memory allocation of") {
        format!(
            "the chat template asked for more memory than its renderer may use ({} MiB; {how}); that render was stopped",
            memory_bytes >> 20
        )
    } else {
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        format!("the chat template's renderer died ({how}: {}); that render was stopped", last.trim())
    }
}
