//! The worker's command line — `gantry worker` and the `gantry-worker` binary share it — and
//! `gantry pull`, plus the process set-up both binaries do (threads, logs, panics).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use gantry_core::units::format_bytes;
use gantry_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::engine::chat::{ChildLimits, TemplateIsolation};
use crate::gpu::{self, GpuInfo};
use crate::link::{self, LinkOptions};
use crate::server;
use crate::service::{WorkerOptions, WorkerState};
use crate::store::hub::Fetched;
use crate::store::{DownloadProgress, Hub, HubConfig, HubError, HubRef, Source};

/// A failed command: its message and exit code (BSD `sysexits.h`).
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl Failure {
    /// Bad flags or values (`EX_USAGE`).
    pub const USAGE: u8 = 64;
    /// A model whose files are wrong (`EX_DATAERR`).
    pub const DATA: u8 = 65;
    /// A path or model that does not exist (`EX_NOINPUT`).
    pub const NO_INPUT: u8 = 66;
    /// A service (the Hub, the controller, a port) is not there (`EX_UNAVAILABLE`).
    pub const UNAVAILABLE: u8 = 69;
    /// A bug or an unexpected failure (`EX_SOFTWARE`).
    pub const SOFTWARE: u8 = 70;
    /// Reading or writing failed (`EX_IOERR`).
    pub const IO: u8 = 74;
    /// Refused: a token is missing or may not read it (`EX_NOPERM`).
    pub const NO_PERMISSION: u8 = 77;

    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure { message: message.into(), code }
    }
}

impl From<HubError> for Failure {
    fn from(e: HubError) -> Failure {
        let code = match &e {
            HubError::Gated { .. } | HubError::Unauthorized { .. } => Failure::NO_PERMISSION,
            HubError::RepoNotFound { .. } | HubError::RevisionNotFound { .. } | HubError::FileNotFound { .. } => {
                Failure::NO_INPUT
            }
            HubError::BadId(_) | HubError::AmbiguousGguf { .. } => Failure::USAGE,
            HubError::Checksum { .. } | HubError::NothingToServe { .. } | HubError::UnsafePath(_) => Failure::DATA,
            HubError::Unreachable { .. }
            | HubError::Http { .. }
            | HubError::Transfer { .. }
            | HubError::OfflineMiss { .. } => Failure::UNAVAILABLE,
            HubError::Io { .. } => Failure::IO,
        };
        Failure::new(code, e.to_string())
    }
}

/// A panic is a bug: one line naming it instead of a backtrace.
pub fn install_panic_hook(program: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("{program}: internal error{at}: {info}; please report it");
    }));
}

/// Logs to stderr; `GANTRY_LOG` (e.g. `debug`, `gantry_worker=debug`) overrides `default`.
/// Servers stamp each line with the time; one-shot commands do not. `GANTRY_LOG_FORMAT=json`
/// writes one JSON object per line (for log collectors), fields included.
pub fn init_logging(default: &str, timestamps: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GANTRY_LOG").unwrap_or_else(|_| default.into());
    if std::env::var("GANTRY_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_current_span(false)
            .init();
        return;
    }
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .compact();
    if timestamps {
        fmt.init();
    } else {
        fmt.without_time().init();
    }
}

/// Sizes the CPU thread pool (Candle's kernels run on rayon's global pool); returns the count.
/// Call it first thing in `main`, before any other thread starts.
pub fn set_threads(threads: Option<usize>) -> Result<usize, Failure> {
    let n = match threads {
        Some(0) => return Err(Failure::new(Failure::USAGE, "--threads must be at least 1")),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // Candle sizes its matmul parallelism from RAYON_NUM_THREADS.
    #[allow(unsafe_code)]
    // SAFETY: called from `main`'s thread before any other thread exists (the pool is built
    // just below), so nothing reads the environment concurrently.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| Failure::new(Failure::USAGE, format!("cannot set up {n} threads: {e}")))?;
    Ok(n)
}

pub const WORKER_EXAMPLES: &str = "\
Examples:
  gantry worker --model models/SmolLM2-135M-Instruct.Q4_1.gguf
  gantry worker --listen 0.0.0.0:50052 --controller http://controller:50051
  gantry worker --gpus 2x80GiB --model chat=HuggingFaceTB/SmolLM2-135M-Instruct --context 4096
  gantry worker --print-gpus";

/// Arguments of `gantry worker` / `gantry-worker`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Address to serve gRPC on (port 0: any free port, printed at start)
    #[arg(long, default_value = "127.0.0.1:50052", env = "GANTRY_LISTEN")]
    pub listen: String,
    /// Address the controller should dial [default: the listen address, with this host's name if it listens on all]
    #[arg(long, env = "GANTRY_ADVERTISE")]
    pub advertise: Option<String>,
    /// The GPUs to offer instead of NVML's: `2x80GiB`, or a file of `NAME SIZE` lines
    #[arg(long, env = "GANTRY_GPUS")]
    pub gpus: Option<String>,
    /// The controller to register with (`http://host:port`; several, comma-separated, when controllers share an etcd); without it the worker serves alone
    #[arg(long, env = "GANTRY_CONTROLLER")]
    pub controller: Option<String>,
    /// The API key the controller requires (when it has keys)
    #[arg(long, env = "GANTRY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The CA that signed the controller's TLS certificate: the link then uses TLS
    #[arg(long, env = "GANTRY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This worker's TLS certificate (PEM, with --tls-key): presented to the controller and to
    /// other pipeline stages, and served, so that callers need a certificate from --tls-ca
    #[arg(long, env = "GANTRY_TLS_CERT", requires = "tls_key", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// This worker's TLS private key (PEM)
    #[arg(long, env = "GANTRY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A model to load at start (repeatable): a folder, a .gguf file or a Hub id, optionally named `NAME=SOURCE`
    #[arg(long = "model", value_name = "[NAME=]SOURCE")]
    pub models: Vec<String>,
    /// Where --model models run: gpu:N, cuda:N or cpu [default: the first device]
    #[arg(long, default_value = "")]
    pub device: String,
    /// Tokens per sequence for --model models [default: the model's trained context]
    #[arg(long, value_parser = parse_context)]
    pub context: Option<u32>,
    /// This worker's name for the controller [default: the host name]
    #[arg(long, env = "GANTRY_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Generations running at once on one model (each has its own KV cache)
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Requests that may wait for a slot; beyond this they are refused (RESOURCE_EXHAUSTED)
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// CPU threads [default: all cores]
    #[arg(long, env = "GANTRY_THREADS")]
    pub threads: Option<usize>,
    /// The Hugging Face cache folder [default: HF_HUB_CACHE, else ~/.cache/huggingface/hub]
    #[arg(long, env = "GANTRY_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// A label the controller's placement policies can select on (repeatable): `zone=a`
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Print the GPUs this worker would offer, and exit
    #[arg(long)]
    pub print_gpus: bool,
    #[command(flatten)]
    pub templates: TemplateArgs,
}

/// How models' own chat templates are rendered: in a child process with these bounds, so that a
/// hostile template costs one request an error instead of stopping the worker.
#[derive(Debug, Clone, clap::Args)]
pub struct TemplateArgs {
    /// Seconds one chat-template render may take before its renderer process is stopped
    #[arg(long, value_name = "SECS", default_value_t = TemplateArgs::DEFAULT_TIMEOUT_SECS, value_parser = parse_template_timeout)]
    pub chat_template_timeout: f64,
    /// Address space, in MiB, of the process that renders a model's chat template
    #[arg(long, value_name = "MIB", default_value_t = TemplateArgs::DEFAULT_MEMORY_MIB, value_parser = clap::value_parser!(u64).range(64..=1 << 20))]
    pub chat_template_memory: u64,
}

impl Default for TemplateArgs {
    fn default() -> Self {
        TemplateArgs {
            chat_template_timeout: TemplateArgs::DEFAULT_TIMEOUT_SECS,
            chat_template_memory: TemplateArgs::DEFAULT_MEMORY_MIB,
        }
    }
}

impl TemplateArgs {
    /// The defaults are the renderer's own ([`ChildLimits`]).
    const DEFAULT_TIMEOUT_SECS: f64 = ChildLimits::DEFAULT_DEADLINE.as_secs_f64();
    const DEFAULT_MEMORY_MIB: u64 = ChildLimits::DEFAULT_MEMORY_BYTES >> 20;

    /// Renderer children of this executable, with these bounds.
    pub fn isolation(&self) -> Result<TemplateIsolation, Failure> {
        let mut limits = ChildLimits::this_executable().map_err(|e| Failure::new(Failure::SOFTWARE, e))?;
        limits.deadline = std::time::Duration::from_secs_f64(self.chat_template_timeout);
        limits.memory_bytes = self.chat_template_memory << 20;
        Ok(TemplateIsolation::Child(limits))
    }
}

fn parse_template_timeout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a number of seconds from 0.1 to 3600")),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("`{s}`: write labels as KEY=VALUE")),
    }
}

fn parse_context(s: &str) -> Result<u32, String> {
    let n = gantry_core::units::parse_tokens(s).map_err(|e| e.to_string())?;
    u32::try_from(n).map_err(|_| format!("{s} is more tokens than a context can hold"))
}

/// This machine's host name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".into())
}

pub fn hub(cache_dir: Option<PathBuf>) -> Result<Hub, Failure> {
    let mut config = HubConfig::from_env()?;
    if let Some(dir) = cache_dir {
        config.cache_dir = dir;
    }
    Ok(Hub::new(config)?)
}

/// The multi-threaded runtime the serving commands run on.
pub fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(Failure::SOFTWARE, format!("cannot start the runtime: {e}")))
}

/// Prints the inventory as a table.
fn print_gpus(gpus: &[GpuInfo], note: &str, driver: Option<String>) {
    println!(
        "{:<5} {:<28} {:<42} {:>10} {:>10} {:>4} {:>5}  SOURCE",
        "INDEX", "NAME", "UUID", "TOTAL", "FREE", "CC", "UTIL"
    );
    for g in gpus {
        println!(
            "{:<5} {:<28} {:<42} {:>10} {:>10} {:>4} {:>5}  {}",
            g.index,
            g.name,
            g.uuid,
            format_bytes(g.total_bytes),
            format_bytes(g.free_bytes),
            g.compute_capability.map(|(a, b)| format!("{a}.{b}")).unwrap_or_else(|| "-".into()),
            g.utilization_percent.map(|u| format!("{u}%")).unwrap_or_else(|| "-".into()),
            g.source.as_str()
        );
    }
    match driver {
        Some(d) => println!("{note}; driver {d}"),
        None => println!("{note}"),
    }
}

/// Runs a worker until SIGINT or SIGTERM. Call [`set_threads`] first.
pub fn run_worker(args: WorkerArgs) -> Result<(), Failure> {
    let inventory =
        gpu::detect(args.gpus.as_deref()).map_err(|e| Failure::new(Failure::USAGE, format!("--gpus: {e}")))?;
    let gpus = inventory.gpus().map_err(|e| Failure::new(Failure::UNAVAILABLE, format!("reading the GPUs: {e}")))?;
    if args.print_gpus {
        print_gpus(&gpus, inventory.note(), inventory.driver_version());
        return Ok(());
    }
    if args.parallel == 0 {
        return Err(Failure::new(Failure::USAGE, "--parallel must be at least 1"));
    }
    let hub = hub(args.cache_dir.clone())?;
    let worker_id = args.worker_id.clone().unwrap_or_else(host_name);
    // With a certificate the worker serves TLS too, and wants callers (the controller, other
    // stages) to present certificates from the same CA; it dials other stages the same way.
    let tls = match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (Some(ca), Some(cert), Some(key)) => Some(worker_tls(ca, cert, key)?),
        _ => None,
    };
    let client_tls = match &args.tls_ca {
        None => None,
        Some(ca) => Some(
            link::client_tls(ca, args.tls_cert.as_deref().zip(args.tls_key.as_deref()))
                .map_err(|e| Failure::new(Failure::NO_INPUT, e))?,
        ),
    };
    let options = WorkerOptions {
        worker_id: worker_id.clone(),
        parallel: args.parallel,
        queue: args.queue,
        labels: args.labels.iter().cloned().collect(),
        stage_tls: tls.as_ref().and(client_tls.clone()),
        templates: args.templates.isolation()?,
    };
    let note = inventory.note().to_string();
    let state = WorkerState::new(options, inventory, hub);

    runtime()?.block_on(async move {
        let listener = TcpListener::bind(&args.listen)
            .await
            .map_err(|e| Failure::new(Failure::UNAVAILABLE, format!("cannot listen on {}: {e}", args.listen)))?;
        let addr = listener.local_addr().map_err(|e| Failure::new(Failure::IO, e.to_string()))?;
        let total: u64 = gpus.iter().map(|g| g.total_bytes).sum();
        if gpus.first().is_some_and(|g| g.source == gpu::InventorySource::Cpu) {
            warn!(worker = %worker_id, memory = %format_bytes(total), "{note}");
        } else {
            info!(worker = %worker_id, devices = gpus.len(), memory = %format_bytes(total), "{note}");
        }
        // Tests and scripts read this line to find the port.
        println!("gantry worker {worker_id} listening on {addr}");

        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            info!("stopping: finishing running requests");
            let _ = stop_tx.send(true);
        });
        let (ready_tx, ready_rx) = watch::channel(false);
        let mut stop = stop_rx.clone();
        let server = tokio::spawn(server::serve(listener, state.clone(), ready_rx, tls.clone(), async move {
            let _ = stop.wait_for(|s| *s).await;
        }));

        for spec in &args.models {
            let (id, source) = match spec.split_once('=') {
                Some((id, src)) if !id.contains('/') => (id.to_string(), src.to_string()),
                _ => (String::new(), spec.clone()),
            };
            let req = pb::LoadModelRequest {
                model_id: id,
                source,
                device: args.device.clone(),
                context_length: args.context.unwrap_or(0),
                ..Default::default()
            };
            let (tx, mut rx) = mpsc::channel(64);
            let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
            let loaded = state.load(req, tx).await;
            let _ = drain.await;
            let info = loaded.map_err(|e| Failure::new(Failure::DATA, format!("--model {spec}: {}", e.message())))?;
            println!(
                "loaded {} ({} {} on {}, {} tokens of context) in {} ms",
                info.model_id,
                info.family,
                gantry_core::units::format_params(info.parameters),
                info.device,
                info.context_length,
                info.load_ms
            );
        }
        let _ = ready_tx.send(true);
        println!("ready");

        if let Some(controller) = args.controller.clone() {
            // `link::run` adds `http://` (or `https://`) to each address that lacks a scheme.
            let advertise = args.advertise.clone().unwrap_or_else(|| advertise_address(addr));
            tokio::spawn(link::run(
                LinkOptions {
                    controller,
                    advertise,
                    api_key: args.api_key.clone(),
                    tls: client_tls.clone(),
                    serves_tls: tls.is_some(),
                },
                state.clone(),
                stop_rx.clone(),
            ));
        }
        match server.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Failure::new(Failure::UNAVAILABLE, format!("serving: {e}"))),
            Err(e) => Err(Failure::new(Failure::SOFTWARE, format!("serving: {e}"))),
        }
    })
}

/// The worker's server TLS: its certificate, and callers must present one the CA signed.
fn worker_tls(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tonic::transport::ServerTlsConfig, Failure> {
    let read = |p: &std::path::Path, flag: &str| {
        std::fs::read(p).map_err(|e| Failure::new(Failure::NO_INPUT, format!("{flag} {}: {e}", p.display())))
    };
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?))
        .client_ca_root(tonic::transport::Certificate::from_pem(read(ca, "--tls-ca")?)))
}

/// The listen address, with the host name in place of an unspecified IP.
fn advertise_address(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() { format!("{}:{}", host_name(), addr.port()) } else { addr.to_string() }
}

pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

pub const PULL_EXAMPLES: &str = "\
Examples:
  gantry pull HuggingFaceTB/SmolLM2-135M-Instruct
  gantry pull bartowski/SmolLM2-135M-Instruct-GGUF:SmolLM2-135M-Instruct-Q4_K_M.gguf
  gantry pull meta-llama/Llama-3.2-1B-Instruct@main   # gated: needs HF_TOKEN
Environment: HF_TOKEN (or the file HF_TOKEN_PATH, default ~/.cache/huggingface/token),
HF_ENDPOINT (a mirror), HF_HUB_CACHE / HF_HOME (where files go), HF_HUB_OFFLINE=1.";

/// Arguments of `gantry pull`.
#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// `org/name`, optionally `@revision` and `:file.gguf`
    pub model: String,
    /// The Hugging Face cache folder [default: HF_HUB_CACHE, else ~/.cache/huggingface/hub]
    #[arg(long, env = "GANTRY_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// Fetches a Hub model with a progress bar per file on stderr (hidden when stderr is not a
/// terminal) and, at the end, a summary line.
pub fn fetch_with_progress(r: &HubRef, cache_dir: Option<PathBuf>) -> Result<Fetched, Failure> {
    let hub = hub(cache_dir)?;
    let started = Instant::now();
    let bars = indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr());
    let style = indicatif::ProgressStyle::with_template(
        "{msg:30!} {bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {eta:>4}",
    )
    .map_err(|e| Failure::new(Failure::SOFTWARE, e.to_string()))?;
    let mut current: Option<(String, indicatif::ProgressBar)> = None;
    let mut progress = |p: DownloadProgress| {
        if current.as_ref().is_none_or(|(f, _)| f != &p.file) {
            if let Some((_, bar)) = current.take() {
                bar.finish();
            }
            let bar =
                bars.add(indicatif::ProgressBar::new(p.total).with_style(style.clone()).with_message(p.file.clone()));
            current = Some((p.file.clone(), bar));
        }
        if let Some((_, bar)) = &current {
            bar.set_length(p.total.max(p.done));
            bar.set_position(p.done);
        }
    };
    let fetched = runtime()?.block_on(hub.fetch(r, &mut progress))?;
    if let Some((_, bar)) = current.take() {
        bar.finish();
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{r} at {}: {} downloaded in {secs:.1} s{}",
        &fetched.commit[..fetched.commit.len().min(12)],
        format_bytes(fetched.downloaded_bytes),
        if fetched.downloaded_bytes == 0 { " (everything was in the cache)" } else { "" }
    );
    Ok(fetched)
}

/// Where a model source's files are: a local path as given, a Hub id fetched first.
pub fn local_path(source: &str, cache_dir: Option<PathBuf>) -> Result<PathBuf, Failure> {
    match Source::parse(source) {
        Source::Local(p) => Ok(p),
        Source::Hub(r) => Ok(fetch_with_progress(&r, cache_dir)?.path),
        Source::Url(u) => {
            let config = HubConfig::from_env()?;
            let dir = cache_dir.unwrap_or(config.cache_dir);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| Failure::new(Failure::SOFTWARE, format!("cannot start the download: {e}")))?;
            Ok(rt.block_on(crate::store::url::download(&u, &dir, &mut |_| {}))?)
        }
    }
}

/// Downloads a model into the cache with a progress bar; prints where it is.
pub fn run_pull(args: PullArgs) -> Result<(), Failure> {
    let r = HubRef::parse(&args.model).ok_or_else(|| HubError::BadId(args.model.clone()))?;
    let fetched = fetch_with_progress(&r, args.cache_dir)?;
    println!("{}", fetched.path.display());
    Ok(())
}
