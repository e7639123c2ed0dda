//! `gantry controller` (a controller alone) and `gantry up` (a controller and a local worker
//! in one process, serving a model).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::cmd::worker::hub;
use crate::process::{host_name, runtime, wait_for_signal};
use gantry_controller::ControllerConfig;
use gantry_controller::auth::ApiKeys;
use gantry_controller::config::DEFAULT_STANDBY_PREFILL;
use gantry_controller::server::{Controller, bind};
use gantry_controller::spec::DeploymentSpec;
use gantry_controller::statestore::StateStore;
use gantry_controller::statestore::embedded::EmbeddedStore;
use gantry_controller::statestore::etcd::{EtcdSecurity, EtcdStore};
use gantry_core::units::format_bytes;
use gantry_proto::v1 as pb;
use gantry_worker::link::{LinkOptions, run as run_link};
use gantry_worker::{WorkerOptions, WorkerState};
use tokio::sync::watch;
use tracing::info;

use crate::error::CliError;
use gantry_controller::operator::lease::mark_leader;

pub const CONTROLLER_EXAMPLES: &str = "\
Examples:
  gantry controller                                   # embedded store in ~/.local/share/gantry
  gantry controller --listen 0.0.0.0:50051 --store /var/lib/gantry/state.redb
  gantry controller --etcd http://etcd-0:2379,http://etcd-1:2379 --lease 10
Workers join with: gantry worker --controller http://HOST:50051";

pub const UP_EXAMPLES: &str = "\
Examples:
  gantry up                                           # SmolLM2-135M-Instruct from models/
  gantry up --model models/gemma-3-270m-q4_k_m.gguf --name gemma
  gantry up --model HuggingFaceTB/SmolLM2-135M-Instruct --gpus 1x24GiB
Then: gantry chat \"What is the capital of France?\"";

/// The model `gantry up` serves when given none (fetched by `scripts/fetch-models.sh`).
const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// What every controller takes.
#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// Address to serve the gRPC API on (port 0: any free port)
    #[arg(long, default_value = "127.0.0.1:50051", env = "GANTRY_CONTROLLER_LISTEN")]
    listen: String,
    /// Address to serve HTTP on (health, models; the OpenAI API lands here); `off` to disable
    #[arg(long, default_value = "127.0.0.1:8080", env = "GANTRY_HTTP_LISTEN")]
    http: String,
    /// The embedded state file [default: ~/.local/share/gantry/state.redb]
    #[arg(long, env = "GANTRY_STORE", conflicts_with = "etcd")]
    store: Option<PathBuf>,
    /// Keep state in etcd instead (comma-separated endpoints); several controllers may share it
    #[arg(long, env = "GANTRY_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Key prefix in etcd
    #[arg(long, default_value = "/gantry/")]
    etcd_prefix: String,
    /// The CA (PEM) that signed etcd's certificate; makes the connection TLS (https:// endpoints)
    #[arg(long, env = "GANTRY_ETCD_CA", requires = "etcd")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) shown to etcd, for etcd's --client-cert-auth; with --etcd-key
    #[arg(long, env = "GANTRY_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM)
    #[arg(long, env = "GANTRY_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user for etcd's role-based auth; the password is read from --etcd-password-file
    #[arg(long, env = "GANTRY_ETCD_USER", requires_all = ["etcd", "etcd_password_file"])]
    etcd_user: Option<String>,
    /// File holding the etcd user's password (its first line)
    #[arg(long, env = "GANTRY_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
    /// Seconds a worker may stay silent before its replicas are placed elsewhere
    #[arg(long, default_value_t = 6.0)]
    lease: f64,
    /// Percent of VRAM kept free on top of each replica's estimate
    #[arg(long, default_value_t = 5)]
    vram_margin: u64,
    /// Requests relayed at once; past this, new ones are refused at once (RESOURCE_EXHAUSTED)
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_requests: u32,
    /// Seconds between the autoscaler's rounds (each samples every autoscaled deployment)
    #[arg(long, default_value_t = 1.0)]
    autoscale_interval: f64,
    /// Seconds a request waits at most for a replica of an autoscaled deployment to come up
    /// (scaled to zero, or scaling up); its own deadline may be shorter
    #[arg(long, default_value_t = 300.0)]
    cold_start_timeout: f64,
    /// Requests that may wait for a cold start per deployment; past this, RESOURCE_EXHAUSTED
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    max_waiting: u32,
    /// Seconds a client may leave its stream unread before its request is cancelled (its relay
    /// and the worker's slot given back)
    #[arg(long, env = "GANTRY_STALL_TIMEOUT", default_value_t = 60.0, value_parser = crate::process::parse_seconds)]
    stall_timeout: f64,
    /// Seconds an HTTP client may take to send a request's headers before its connection is
    /// closed (a client trickling bytes cannot hold connections open)
    #[arg(long, default_value_t = 30.0, value_parser = crate::process::parse_seconds)]
    http_header_timeout: f64,
    /// How requests choose among a deployment's ready replicas: `prefix` (where the prompt's
    /// prefix is cached, weighed against queue and KV pressure; load alone for a prompt no
    /// replica holds) or `p2c` (power of two choices on load alone)
    #[arg(long, env = "GANTRY_ROUTING", default_value = "prefix")]
    routing: gantry_controller::config::Routing,
    /// Every N tokens a request delivers, an idle replica of its deployment on another worker
    /// prefills them into its prefix cache, so that should the request's worker fail, the
    /// request resumes there after computing only the tokens since; 0: off
    #[arg(long, env = "GANTRY_STANDBY_PREFILL", default_value_t = DEFAULT_STANDBY_PREFILL as u32, value_name = "N")]
    standby_prefill: u32,
    /// Let a replica that is serving requests be a standby too (its prefills share its worker
    /// with them: about one more prefill of every long request's tokens) [default: idle
    /// replicas only]
    #[arg(long, env = "GANTRY_STANDBY_BUSY")]
    standby_busy: bool,
    /// A file of API keys, one per line: every API but health checks then needs
    /// `Authorization: Bearer <key>` [default: no keys]
    #[arg(long, env = "GANTRY_API_KEYS_FILE")]
    api_keys: Option<PathBuf>,
    #[command(flatten)]
    sources: super::sources::SourceArgs,
}

/// Arguments of `gantry controller`.
#[derive(Debug, clap::Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// Serve gRPC and HTTP over TLS with this certificate chain (PEM; with --tls-key)
    #[arg(long, env = "GANTRY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM)
    #[arg(long, env = "GANTRY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require workers to present a certificate signed by this CA (mutual TLS; API clients need none)
    #[arg(long, env = "GANTRY_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Run the ModelDeployment operator (in-cluster config, or the kubeconfig outside a
    /// cluster) and elect the active controller with a Kubernetes Lease
    #[arg(long, env = "GANTRY_KUBERNETES")]
    kubernetes: bool,
    /// The namespace whose ModelDeployments to serve, and where the Lease lives
    #[arg(long, env = "POD_NAMESPACE", default_value = "default", requires = "kubernetes")]
    namespace: String,
    /// The Lease that elects the active controller
    #[arg(long, default_value = "gantry-controller", requires = "kubernetes")]
    lease_name: String,
    /// This controller's name in the Lease and on events [default: the host name]
    #[arg(long, env = "POD_NAME", requires = "kubernetes")]
    identity: Option<String>,
    /// The only Secrets a ModelDeployment's hfTokenSecret may name (comma-separated; empty:
    /// none) [default: any in the namespace]
    #[arg(long, value_delimiter = ',', requires = "kubernetes")]
    hf_token_secrets: Option<Vec<String>>,
}

/// The operator's part of a controller on Kubernetes: the Lease is held before anything else.
struct Kubernetes {
    client: kube::Client,
    namespace: String,
    identity: String,
    lost: watch::Receiver<bool>,
}

impl ControllerArgs {
    /// Connects to the API server and waits to hold the Lease.
    async fn kubernetes(
        &self,
        tls: Option<&gantry_controller::tls::ServerTls>,
    ) -> Result<Option<Kubernetes>, CliError> {
        if !self.kubernetes {
            return Ok(None);
        }
        let client = kube::Client::try_default().await.map_err(|e| {
            CliError::with_code(format!("--kubernetes: no Kubernetes API to talk to: {e}"), CliError::UNAVAILABLE)
        })?;
        let identity = self.identity.clone().unwrap_or_else(host_name);
        let duration = std::time::Duration::from_secs_f64(self.control.lease.max(2.0) * 2.5);
        let lock = gantry_controller::operator::lease::LeaseLock::new(
            client.clone(),
            &self.namespace,
            &self.lease_name,
            &identity,
            duration,
        );
        // Not the leader until the Lease is held (a restarted container keeps its pod's labels).
        if self.identity.is_some()
            && let Err(e) = mark_leader(client.clone(), &self.namespace, &identity, false).await
        {
            tracing::warn!(pod = %identity, error = %e, "could not clear this pod's leader label");
        }
        // A standby answers health checks on the HTTP port, so it is Ready (and can be evicted
        // or rolled) while the Service, which selects the leader label, sends it nothing.
        let standby = match self.control.http.as_str() {
            h if h.eq_ignore_ascii_case("off") => None,
            h => {
                let (listener, _) = bind(h, "--http").await.map_err(unavailable)?;
                // Over TLS when the leader's HTTP is: one probe for both.
                Some(match tls {
                    Some(tls) => gantry_controller::http::standby_health(tls.http_listener(listener)),
                    None => gantry_controller::http::standby_health(listener),
                })
            }
        };
        let (ns, name) = (self.namespace.clone(), self.lease_name.clone());
        lock.acquire(|holder| {
            println!("gantry controller standby: {holder} holds the Lease {ns}/{name}; waiting to take over");
        })
        .await;
        if let Some(task) = standby {
            task.abort();
            let _ = task.await;
        }
        Ok(Some(Kubernetes { client, namespace: self.namespace.clone(), identity, lost: lock.keep() }))
    }
}

/// Arguments of `gantry up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// The model to serve: a .gguf file, a model folder, or a Hub id [default: models/SmolLM2-135M-Instruct.Q4_1.gguf]
    #[arg(long, env = "GANTRY_MODEL")]
    model: Option<String>,
    /// The deployment's name, which requests use [default: from the model's file name]
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Tokens per sequence [default: the model's trained context]
    #[arg(long, value_parser = crate::process::parse_tokens_arg)]
    context: Option<u64>,
    /// GPUs the local worker offers instead of NVML's (`1x24GiB`)
    #[arg(long, env = "GANTRY_GPUS")]
    gpus: Option<String>,
    /// Declare the local worker's GPUs linked by NVLink (NVML reports it for real GPUs)
    #[arg(long, env = "GANTRY_NVLINK")]
    nvlink: bool,
    /// Sequences at the full context each replica's KV cache is sized for (parallel × context
    /// tokens); more, shorter ones run at once while their blocks fit
    #[arg(long, env = "GANTRY_PARALLEL", default_value_t = 4)]
    parallel: usize,
    /// Generations running at once per replica, batched into each forward pass
    #[arg(long, env = "GANTRY_MAX_RUNNING", default_value_t = 64)]
    max_running: usize,
    /// Prompt tokens one forward pass takes beside the decoding tokens (chunked prefill)
    #[arg(long, env = "GANTRY_STEP_TOKENS", default_value_t = gantry_engine::batch::DEFAULT_STEP_TOKENS)]
    step_tokens: usize,
    /// Requests that may wait for a slot
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// CPU threads [default: the CPUs this process may use (affinity mask, cgroup CPU quota)]
    #[arg(long, env = "GANTRY_THREADS")]
    pub threads: Option<usize>,
    #[command(flatten)]
    templates: crate::cmd::worker::TemplateArgs,
}

fn unavailable(e: impl ToString) -> CliError {
    CliError::with_code(e.to_string(), CliError::UNAVAILABLE)
}

fn default_store() -> PathBuf {
    data_dir().join("state.redb")
}

/// Gantry's data on this machine: `$XDG_DATA_HOME/gantry`, else `~/.local/share/gantry`.
pub fn data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("gantry")
}

impl ControlArgs {
    fn config(&self) -> Result<ControllerConfig, CliError> {
        if !(self.lease.is_finite() && self.lease >= 0.2) {
            return Err(CliError::usage(format!("--lease {}: give at least 0.2 seconds", self.lease)));
        }
        let lease = Duration::from_secs_f64(self.lease);
        if !(self.autoscale_interval.is_finite() && (0.05..=60.0).contains(&self.autoscale_interval)) {
            return Err(CliError::usage(format!(
                "--autoscale-interval {}: give 0.05 to 60 seconds",
                self.autoscale_interval
            )));
        }
        if !(self.cold_start_timeout.is_finite() && (0.0..=86_400.0).contains(&self.cold_start_timeout)) {
            return Err(CliError::usage(format!(
                "--cold-start-timeout {}: give 0 to 86400 seconds",
                self.cold_start_timeout
            )));
        }
        Ok(ControllerConfig {
            lease,
            heartbeat: (lease / 4).clamp(Duration::from_millis(50), Duration::from_secs(2)),
            margin_percent: self.vram_margin,
            worker_tls: None,
            max_requests: self.max_requests as usize,
            autoscale_interval: Duration::from_secs_f64(self.autoscale_interval),
            cold_start_timeout: Duration::from_secs_f64(self.cold_start_timeout),
            max_waiting: self.max_waiting as usize,
            stall_timeout: Duration::from_secs_f64(self.stall_timeout),
            http_header_timeout: Duration::from_secs_f64(self.http_header_timeout),
            routing: self.routing,
            standby_prefill: self.standby_prefill as usize,
            standby_busy: self.standby_busy,
        })
    }

    /// The etcd TLS and auth options, their files read now so a missing one is named.
    fn etcd_security(&self) -> Result<EtcdSecurity, CliError> {
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path).map_err(|e| CliError::usage(format!("cannot read {flag} {}: {e}", path.display())))
        };
        let ca_pem = self.etcd_ca.as_ref().map(|p| read("--etcd-ca", p)).transpose()?;
        let identity_pem = match (&self.etcd_cert, &self.etcd_key) {
            (Some(cert), Some(key)) => Some((read("--etcd-cert", cert)?, read("--etcd-key", key)?)),
            _ => None,
        };
        let user = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(name), Some(file)) => {
                let text = String::from_utf8(read("--etcd-password-file", file)?)
                    .map_err(|_| CliError::usage(format!("--etcd-password-file {} is not UTF-8", file.display())))?;
                let password = text.lines().next().unwrap_or_default().to_string();
                if password.is_empty() {
                    return Err(CliError::usage(format!("--etcd-password-file {} is empty", file.display())));
                }
                Some((name.clone(), password))
            }
            _ => None,
        };
        Ok(EtcdSecurity { ca_pem, identity_pem, user })
    }

    async fn open_store(&self) -> Result<Arc<dyn StateStore>, CliError> {
        if !self.etcd.is_empty() {
            let ttl = (self.lease.ceil() as i64).max(2);
            let security = self.etcd_security()?;
            let store = EtcdStore::connect(&self.etcd, &self.etcd_prefix, ttl, &security).await.map_err(unavailable)?;
            return Ok(Arc::new(store));
        }
        let path = self.store.clone().unwrap_or_else(default_store);
        let store = EmbeddedStore::open(&path).map_err(unavailable)?;
        Ok(Arc::new(store))
    }

    /// Starts the controller: leadership, restored state, listeners. Returns what to serve.
    async fn start(
        &self,
        worker_tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Result<(Controller, tokio::net::TcpListener, Option<tokio::net::TcpListener>), CliError> {
        let config = ControllerConfig { worker_tls, ..self.config()? };
        let store = self.open_store().await?;
        let describe = store.describe();
        let candidate = format!("{} pid {} ({})", host_name(), std::process::id(), self.listen);
        // With etcd another controller may lead: wait as a standby, not listening, so
        // clients and workers (given several controller addresses) go to the leader.
        if let Ok(Some(leader)) = store.leader().await
            && leader != candidate
        {
            println!("gantry controller standby: {leader} leads; waiting to take over (store: {describe})");
        }
        let keys = match &self.api_keys {
            Some(path) => Some(ApiKeys::load(path).map_err(|e| CliError::usage(format!("--api-keys: {e}")))?),
            None => None,
        };
        let mut controller = Controller::start(store, config, &candidate).await.map_err(unavailable)?;
        let (grpc, grpc_addr) = bind(&self.listen, "--listen").await.map_err(unavailable)?;
        let http = if self.http.eq_ignore_ascii_case("off") {
            None
        } else {
            let (l, addr) = bind(&self.http, "--http").await.map_err(unavailable)?;
            Some((l, addr))
        };
        // Tests and scripts read this line to find the ports.
        match &http {
            Some((_, h)) => {
                println!("gantry controller listening on {grpc_addr} (gRPC) and {h} (HTTP); store: {describe}")
            }
            None => println!("gantry controller listening on {grpc_addr} (gRPC); store: {describe}"),
        }
        match &keys {
            Some(k) => println!("API keys: {} accepted; every API but health checks needs one", k.len()),
            None if !self.loopback_only() => {
                println!("API keys: none (--api-keys); anyone who can reach {grpc_addr} can use this controller")
            }
            None => println!("API keys: none (--api-keys); serving on loopback only"),
        }
        controller.api_keys = keys;
        Ok((controller, grpc, http.map(|(l, _)| l)))
    }

    /// Whether every address it serves on is a loopback one.
    fn loopback_only(&self) -> bool {
        let loopback = |addr: &str| {
            addr.parse::<std::net::SocketAddr>().map(|a| a.ip().is_loopback()).unwrap_or_else(|_| {
                addr.rsplit_once(':').is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost"))
            })
        };
        loopback(&self.listen) && (self.http.eq_ignore_ascii_case("off") || loopback(&self.http))
    }

    /// The first key of the key file whose role may link a worker (`admin`, the default, or
    /// `worker`), for `gantry up`'s own worker.
    fn first_key(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.api_keys.as_ref()?).ok()?;
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).find_map(|l| {
            let mut fields = l.split_whitespace();
            let key = fields.next()?;
            matches!(fields.next(), None | Some("admin" | "worker")).then(|| key.to_string())
        })
    }
}

/// Serves until Ctrl-C/SIGTERM.
async fn serve(
    controller: Controller,
    grpc: tokio::net::TcpListener,
    http: Option<tokio::net::TcpListener>,
    stop: watch::Sender<bool>,
) -> Result<(), CliError> {
    let mut stopped = stop.subscribe();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("stopping");
        let _ = stop.send(true);
    });
    controller
        .serve(grpc, http, async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await
        .map_err(unavailable)
}

pub fn run_controller(args: ControllerArgs) -> Result<(), CliError> {
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            gantry_controller::tls::ServerTls::load(cert, key, args.tls_client_ca.as_deref())
                .map_err(CliError::usage)?,
        ),
        _ => None,
    };
    args.control.sources.install(&super::sources::hub_cache(None), &[]);
    runtime()?.block_on(async {
        let kubernetes = args.kubernetes(tls.as_ref()).await?;
        let (mut controller, grpc, http) = args.control.start(tls.as_ref().and_then(|t| t.worker_client())).await?;
        if let Some(k) = kubernetes {
            // Leadership ends with the Lease as with the store's election.
            let mut from_store = controller.leadership.lost.clone();
            let mut from_lease = k.lost.clone();
            let (lost_tx, lost) = watch::channel(false);
            tokio::spawn(async move {
                tokio::select! {
                    _ = from_store.wait_for(|l| *l) => {}
                    _ = from_lease.wait_for(|l| *l) => tracing::error!("lost the Kubernetes Lease"),
                }
                lost_tx.send_replace(true);
            });
            controller.leadership.lost = lost.clone();
            let mut ctx =
                gantry_controller::operator::Context::new(k.client.clone(), controller.cluster.clone(), &k.identity);
            if let Some(names) = &args.hf_token_secrets {
                ctx = ctx.with_allowed_secrets(
                    names.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect(),
                );
            }
            let mut stop = lost;
            tokio::spawn(gantry_controller::operator::run(ctx, k.namespace.clone(), async move {
                let _ = stop.wait_for(|l| *l).await;
            }));
            if args.identity.is_some()
                && let Err(e) = mark_leader(k.client.clone(), &k.namespace, &k.identity, true).await
            {
                tracing::warn!(pod = %k.identity, error = %e, "could not label this pod as the leader");
            }
            println!("operator: serving ModelDeployments in namespace {} as {}", k.namespace, k.identity);
        }
        if let Some(t) = &tls {
            println!(
                "TLS: on for gRPC and HTTP{}",
                if t.workers_need_certificates {
                    "; workers must present a certificate signed by --tls-client-ca"
                } else {
                    ""
                }
            );
        }
        controller.tls = tls;
        let (stop, _) = watch::channel(false);
        serve(controller, grpc, http, stop).await
    })
}

/// A DNS-label name from a model source: `models/SmolLM2-135M-Instruct.Q4_1.gguf` →
/// `smollm2-135m-instruct`.
fn name_from_source(source: &str) -> String {
    let base = source.rsplit(['/', ':']).next().unwrap_or(source);
    let base = base.split('.').next().unwrap_or(base);
    let mut name = String::new();
    for c in base.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            name.push(c);
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    let name: String = name.trim_matches('-').chars().take(63).collect();
    let name = name.trim_end_matches('-').to_string();
    if name.is_empty() { "model".into() } else { name }
}

fn default_model() -> Result<String, CliError> {
    let mut tried = Vec::new();
    let dirs = std::env::var_os("GANTRY_MODELS_DIR").map(PathBuf::from).into_iter().chain([PathBuf::from("models")]);
    for dir in dirs {
        let p = dir.join(DEFAULT_MODEL_FILE);
        if p.is_file() {
            return Ok(p.display().to_string());
        }
        tried.push(p.display().to_string());
    }
    Err(CliError::with_code(
        format!(
            "no --model given and {} is not there; fetch it with `scripts/fetch-models.sh`, or pass --model PATH|HUB_ID",
            tried.join(" nor ")
        ),
        CliError::NO_INPUT,
    ))
}

pub fn run_up(args: UpArgs) -> Result<(), CliError> {
    let model = match &args.model {
        Some(m) => m.clone(),
        None => default_model()?,
    };
    // An absolute path, so the worker and the stored deployment agree whatever the cwd.
    let source = match Path::new(&model).canonicalize() {
        Ok(p) if Path::new(&model).exists() => p.display().to_string(),
        _ => model.clone(),
    };
    let name = args.name.clone().unwrap_or_else(|| name_from_source(&model));
    let context = match args.context {
        Some(c) => u32::try_from(c).map_err(|_| CliError::usage(format!("--context {c} is too large")))?,
        None => 0,
    };
    for (flag, v) in
        [("--parallel", args.parallel), ("--max-running", args.max_running), ("--step-tokens", args.step_tokens)]
    {
        if v == 0 {
            return Err(CliError::usage(format!("{flag} must be at least 1")));
        }
    }
    if args.control.api_keys.is_none() && !args.control.loopback_only() {
        return Err(CliError::usage(format!(
            "gantry up without API keys serves on loopback only, and --listen {} / --http {} is not: give --api-keys FILE (one key per line), or listen on 127.0.0.1",
            args.control.listen, args.control.http
        )));
    }
    let worker_key = args.control.first_key();
    let inventory =
        gantry_worker::gpu::detect(args.gpus.as_deref()).map_err(|e| CliError::usage(format!("--gpus: {e}")))?;
    let hub = hub(None)?;
    // `up`'s own model is the operator's: its folder joins the roots.
    args.control.sources.install(hub.cache_dir(), &[source.as_str()]);
    runtime()?.block_on(async move {
        let (controller, grpc, http) = args.control.start(None).await?;
        let grpc_addr = grpc.local_addr().map_err(|e| unavailable(e.to_string()))?;
        let cluster = controller.cluster.clone();
        let (stop, _) = watch::channel(false);

        // The local worker, on a loopback port of its own, linked like any other.
        let worker_id = format!("{}-local", host_name());
        let options = WorkerOptions {
            worker_id: worker_id.clone(),
            parallel: args.parallel,
            max_running: args.max_running,
            step_tokens: args.step_tokens,
            queue: args.queue,
            labels: [("gantry.dev/local".to_string(), "true".to_string())].into(),
            stage_tls: None,
            templates: args.templates.isolation()?,
            stall_timeout: Duration::from_secs_f64(args.control.stall_timeout),
            gpus_linked: args.nvlink,
            // On loopback: this host's callers only.
            require_token: false,
        };
        let state = WorkerState::new(options, inventory, hub);
        let (listener, worker_addr) = bind("127.0.0.1:0", "the local worker").await.map_err(unavailable)?;
        let (ready_tx, ready_rx) = watch::channel(true);
        // The local worker stops after the controller: streams the controller is still
        // finishing in its grace period are generated here.
        let (worker_stop_tx, worker_stop_rx) = watch::channel(false);
        let mut worker_stop = worker_stop_rx.clone();
        let worker_server =
            tokio::spawn(gantry_worker::server::serve(listener, state.clone(), ready_rx, None, async move {
                let _ = worker_stop.wait_for(|s| *s).await;
            }));
        drop(ready_tx);
        let controller_url = format!("http://{}", loopback(grpc_addr));
        tokio::spawn(run_link(
            LinkOptions {
                controller: controller_url,
                advertise: worker_addr.to_string(),
                api_key: worker_key,
                tls: None,
                serves_tls: false,
            },
            state,
            worker_stop_rx,
        ));
        println!("gantry worker {worker_id} listening on {worker_addr}");

        let spec = DeploymentSpec {
            source: source.clone(),
            dtype: String::new(),
            context_length: context,
            replicas: args.replicas,
            ..Default::default()
        };
        let applied = cluster.apply(&name, spec).await.map_err(|e| crate::cmd::client::status_error(e.into()))?;
        println!(
            "deployment {name}: {} replica(s) of {source}, {} each",
            args.replicas,
            format_bytes(applied.status.as_ref().map_or(0, |s| s.replica_bytes))
        );
        tokio::spawn(announce_ready(cluster, name, grpc_addr));
        let served = serve(controller, grpc, http, stop).await;
        worker_stop_tx.send_replace(true);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), worker_server).await;
        served
    })
}

/// The address to dial for a listen address (`0.0.0.0` → loopback).
fn loopback(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    if addr.ip().is_unspecified() { std::net::SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr }
}

/// Prints `ready` once the deployment has its replicas (or why it waits).
async fn announce_ready(cluster: Arc<gantry_controller::cluster::Cluster>, name: String, grpc: std::net::SocketAddr) {
    let (_, mut changes) = cluster.watch();
    let mut last_reason = String::new();
    let started = std::time::Instant::now();
    loop {
        if let Ok(d) = cluster.get(&name) {
            let status = d.status.unwrap_or_default();
            let want = d.spec.map_or(0, |s| s.replicas);
            if status.ready_replicas >= want {
                let flag = if grpc.port() == 50051 {
                    String::new()
                } else {
                    format!(" --controller http://{}", loopback(grpc))
                };
                println!(
                    "ready: {name} ({}/{want} replicas). Try: gantry chat \"Hello!\"{flag}",
                    status.ready_replicas
                );
                return;
            }
            let pending: Vec<String> = status
                .replica_status
                .iter()
                .filter(|r| r.state == pb::ReplicaState::Pending as i32 && !r.reason.is_empty())
                .map(|r| format!("replica {}: {}", r.index, r.reason))
                .collect();
            let reason = pending.join("; ");
            // The local worker registers within milliseconds: only a wait that lasts is news.
            if !reason.is_empty() && reason != last_reason && started.elapsed() > Duration::from_secs(2) {
                println!("waiting: {reason}");
                last_reason = reason;
            }
        }
        match tokio::time::timeout(Duration::from_secs(2), changes.recv()).await {
            Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => return,
            _ => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_names_come_from_file_names() {
        assert_eq!(name_from_source("models/SmolLM2-135M-Instruct.Q4_1.gguf"), "smollm2-135m-instruct");
        assert_eq!(name_from_source("HuggingFaceTB/SmolLM2-135M-Instruct"), "smollm2-135m-instruct");
        assert_eq!(name_from_source("org/repo:gemma-3-270m-q4_k_m.gguf"), "gemma-3-270m-q4-k-m");
        assert_eq!(name_from_source("___"), "model");
    }
}
