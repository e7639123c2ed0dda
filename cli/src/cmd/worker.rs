//! `gantry worker` and the `gantry-worker` binary: serve this machine's GPUs (or CPU) and its
//! models over gRPC, alone or joined to a controller.

use std::net::SocketAddr;
use std::path::PathBuf;

use gantry_core::units::format_bytes;
use gantry_engine::chat::{ChildLimits, TemplateIsolation};
use gantry_proto::v1 as pb;
use gantry_store::{Hub, HubConfig};
use gantry_worker::gpu::{self, GpuInfo};
use gantry_worker::link::{self, LinkOptions};
use gantry_worker::server;
use gantry_worker::{WorkerOptions, WorkerState};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::error::CliError;
use crate::process::{host_name, runtime, wait_for_signal};

pub const WORKER_EXAMPLES: &str = "\
Examples:
  gantry worker --model models/SmolLM2-135M-Instruct.Q4_1.gguf
  gantry worker --listen 0.0.0.0:50052 --controller http://controller:50051 --api-key $WORKER_KEY
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
    /// Declare the GPUs linked by NVLink (NVML reports it for real GPUs): a model too big for
    /// one GPU is then split tensor-parallel over several of them
    #[arg(long, env = "GANTRY_NVLINK")]
    pub nvlink: bool,
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
    /// Sequences at the full context each model's KV cache is sized for (its memory holds
    /// parallel × context tokens); more, shorter ones run at once while their blocks fit
    #[arg(long, env = "GANTRY_PARALLEL", default_value_t = 4)]
    pub parallel: usize,
    /// Generations running at once on one model, batched into each forward pass; beyond it
    /// requests queue
    #[arg(long, env = "GANTRY_MAX_RUNNING", default_value_t = 64)]
    pub max_running: usize,
    /// Prompt tokens one forward pass takes beside the decoding tokens: a long prompt is
    /// split into chunks of this many, so that running streams wait at most one chunk
    #[arg(long, env = "GANTRY_STEP_TOKENS", default_value_t = gantry_engine::batch::DEFAULT_STEP_TOKENS)]
    pub step_tokens: usize,
    /// Requests that may wait for a slot; beyond this they are refused (RESOURCE_EXHAUSTED)
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Seconds a client may leave its stream unread before its generation is cancelled and
    /// its slot given back
    #[arg(long, env = "GANTRY_STALL_TIMEOUT", default_value_t = 60.0, value_parser = crate::process::parse_seconds)]
    pub stall_timeout: f64,
    /// CPU threads [default: the CPUs this process may use (affinity mask, cgroup CPU quota)]
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
    #[command(flatten)]
    pub sources: super::sources::SourceArgs,
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
    pub fn isolation(&self) -> Result<TemplateIsolation, CliError> {
        let mut limits = ChildLimits::this_executable().map_err(|e| CliError::with_code(e, CliError::SOFTWARE))?;
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

pub fn hub(cache_dir: Option<PathBuf>) -> Result<Hub, CliError> {
    let mut config = HubConfig::from_env()?;
    if let Some(dir) = cache_dir {
        config.cache_dir = dir;
    }
    Ok(Hub::new(config)?)
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
pub fn run_worker(args: WorkerArgs) -> Result<(), CliError> {
    let inventory =
        gpu::detect(args.gpus.as_deref()).map_err(|e| CliError::with_code(format!("--gpus: {e}"), CliError::USAGE))?;
    let gpus =
        inventory.gpus().map_err(|e| CliError::with_code(format!("reading the GPUs: {e}"), CliError::UNAVAILABLE))?;
    if args.print_gpus {
        print_gpus(&gpus, inventory.note(), inventory.driver_version());
        return Ok(());
    }
    for (flag, v) in
        [("--parallel", args.parallel), ("--max-running", args.max_running), ("--step-tokens", args.step_tokens)]
    {
        if v == 0 {
            return Err(CliError::with_code(format!("{flag} must be at least 1"), CliError::USAGE));
        }
    }
    let hub = hub(args.cache_dir.clone())?;
    // The operator's own --model sources join the roots; API callers' loads are checked.
    let own: Vec<&str> = args
        .models
        .iter()
        .map(|m| m.split_once('=').filter(|(id, _)| !id.contains('/')).map_or(m.as_str(), |(_, s)| s))
        .collect();
    args.sources.install(hub.cache_dir(), &own);
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
                .map_err(|e| CliError::with_code(e, CliError::NO_INPUT))?,
        ),
    };
    // Beyond loopback, a worker's port is guarded: by TLS (callers need a certificate), else by
    // the cluster's worker token, which only an authenticated link to a controller brings.
    let loopback = args.listen.rsplit_once(':').is_some_and(|(host, _)| {
        let host = host.trim_matches(['[', ']']);
        host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
    });
    let require_token = !loopback && tls.is_none();
    if require_token && (args.controller.is_none() || args.api_key.is_none()) {
        return Err(CliError::with_code(
            format!(
                "gantry worker listens beyond loopback (--listen {}) only with TLS (--tls-cert, --tls-key and --tls-ca: callers then need a certificate), or with --controller and --api-key (its port then takes only the cluster's worker token, which the controller hands over that authenticated link); or listen on 127.0.0.1",
                args.listen
            ),
            CliError::USAGE,
        ));
    }
    let options = WorkerOptions {
        worker_id: worker_id.clone(),
        parallel: args.parallel,
        max_running: args.max_running,
        step_tokens: args.step_tokens,
        queue: args.queue,
        labels: args.labels.iter().cloned().collect(),
        stage_tls: tls.as_ref().and(client_tls.clone()),
        templates: args.templates.isolation()?,
        stall_timeout: std::time::Duration::from_secs_f64(args.stall_timeout),
        gpus_linked: args.nvlink,
        require_token,
    };
    let note = inventory.note().to_string();
    let state = WorkerState::new(options, inventory, hub);

    runtime()?.block_on(async move {
        let listener = TcpListener::bind(&args.listen).await.map_err(|e| {
            CliError::with_code(format!("cannot listen on {}: {e}", args.listen), CliError::UNAVAILABLE)
        })?;
        let addr = listener.local_addr().map_err(|e| CliError::with_code(e.to_string(), CliError::IO))?;
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
            let info = loaded.map_err(|e| CliError::with_code(format!("--model {spec}: {e}"), CliError::DATA))?;
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
        // The server's health task drops its receiver once health says SERVING: `ready` is
        // printed after that, so whoever waits for the line finds the worker healthy.
        ready_tx.closed().await;
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
            Ok(Err(e)) => Err(CliError::with_code(format!("serving: {e}"), CliError::UNAVAILABLE)),
            Err(e) => Err(CliError::with_code(format!("serving: {e}"), CliError::SOFTWARE)),
        }
    })
}

/// The worker's server TLS: its certificate, and callers must present one the CA signed.
fn worker_tls(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tonic::transport::ServerTlsConfig, CliError> {
    let read = |p: &std::path::Path, flag: &str| {
        std::fs::read(p).map_err(|e| CliError::with_code(format!("{flag} {}: {e}", p.display()), CliError::NO_INPUT))
    };
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?))
        .client_ca_root(tonic::transport::Certificate::from_pem(read(ca, "--tls-ca")?)))
}

/// The listen address, with the host name in place of an unspecified IP.
fn advertise_address(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() { format!("{}:{}", host_name(), addr.port()) } else { addr.to_string() }
}
