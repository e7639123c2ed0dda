//! The commands that talk to a running controller: `deploy`, `scale`, `get`, `delete`, `chat`.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Duration;

use gantry_controller::auth::Bearer;
use gantry_core::units::format_bytes;
use gantry_proto::v1 as pb;
use pb::cluster_client::ClusterClient;
use pb::deployments_client::DeploymentsClient;
use pb::inference_client::InferenceClient;
use pb::models_client::ModelsClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::cmd::table::Table;
use crate::error::CliError;

/// The default controller address (`gantry up`'s).
pub const DEFAULT_CONTROLLER: &str = "http://127.0.0.1:50051";

/// Where the controller is.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArg {
    /// The controller's gRPC address; several, comma-separated, for controllers sharing an etcd
    /// (the one that leads answers: the others do not listen)
    #[arg(long, env = "GANTRY_CONTROLLER", default_value = DEFAULT_CONTROLLER)]
    pub controller: String,
    /// The API key, when the controller requires one
    #[arg(long, env = "GANTRY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The CA that signed the controller's TLS certificate (PEM); the connection then uses TLS
    #[arg(long, env = "GANTRY_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
}

/// A connection to the controller that sends the API key with every call.
pub type Conn = InterceptedService<Channel, Bearer>;

pub const DEPLOY_EXAMPLES: &str = "\
Examples:
  gantry deploy smollm2 --model models/SmolLM2-135M-Instruct.Q4_1.gguf
  gantry deploy llama --model meta-llama/Llama-3.1-8B-Instruct --replicas 2 --strategy spread
  gantry deploy big --model ./Llama-3-70B --gpu-name H100 --selector zone=a --context 8K
  gantry deploy chat --model models/SmolLM2-135M-Instruct.Q4_1.gguf --min-replicas 0 --max-replicas 4 --target-in-flight 8";

/// Arguments of `gantry deploy`.
#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The deployment's name (lowercase letters, digits and `-`); requests use it as the model name
    name: String,
    /// The model: a folder or .gguf file the workers can read, or a Hub id `org/name[@rev][:file]`
    #[arg(long)]
    model: String,
    /// Replicas to run [default: 1; with autoscaling, --min-replicas]
    #[arg(long)]
    replicas: Option<u32>,
    #[command(flatten)]
    autoscaling: AutoscalingArgs,
    /// Size the weights at this precision (f16, q8_0, q4_k_m …) [default: as stored]
    #[arg(long, default_value = "")]
    dtype: String,
    /// Tokens per sequence [default: the model's trained context]
    #[arg(long, value_parser = crate::process::parse_tokens_arg)]
    context: Option<u64>,
    /// binpack (fill the fullest GPU that fits) or spread (one replica per node first)
    #[arg(long, default_value = "binpack")]
    strategy: String,
    /// Only workers with this label (repeatable): KEY=VALUE
    #[arg(long = "selector", value_name = "KEY=VALUE")]
    selectors: Vec<String>,
    /// Only GPUs whose name contains this (case-insensitive), e.g. H100
    #[arg(long, default_value = "")]
    gpu_name: String,
    /// Let one replica span several nodes
    #[arg(long)]
    allow_multi_node: bool,
    /// How split replicas' stages send hidden states: f32 (exact), f16 or bf16 (half the bytes)
    #[arg(long, default_value = "f32")]
    stage_wire_dtype: String,
    /// Temperature for requests that give none (0: greedy)
    #[arg(long)]
    temperature: Option<f32>,
    /// max_tokens for requests that give none
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Print the deployment as JSON
    #[arg(short = 'o', long = "output", value_parser = ["table", "json"], default_value = "table")]
    output: String,
    #[command(flatten)]
    controller: ControllerArg,
}

/// `gantry deploy`'s autoscaling flags: --max-replicas turns autoscaling on.
#[derive(Debug, clap::Args)]
pub struct AutoscalingArgs {
    /// Autoscale: the fewest replicas (0: scale to zero when idle; a request then waits while one loads)
    #[arg(long, requires = "max_replicas")]
    min_replicas: Option<u32>,
    /// Autoscale up to this many replicas
    #[arg(long)]
    max_replicas: Option<u32>,
    /// Autoscale on requests in flight per replica [default: 8]
    #[arg(long, group = "autoscale_target", requires = "max_replicas")]
    target_in_flight: Option<f64>,
    /// Autoscale on requests queued at the workers per replica
    #[arg(long, group = "autoscale_target", requires = "max_replicas")]
    target_queue: Option<f64>,
    /// Autoscale on the fraction of KV cache blocks in use per replica, in (0, 1]
    #[arg(long, group = "autoscale_target", requires = "max_replicas")]
    target_kv_utilization: Option<f64>,
    /// Seconds: scale up to the lowest recommendation over this window [default: 0, at once]
    #[arg(long, requires = "max_replicas")]
    scale_up_window: Option<u32>,
    /// Seconds: scale down to the highest recommendation over this window [default: 300]
    #[arg(long, requires = "max_replicas")]
    scale_down_delay: Option<u32>,
    /// Seconds idle before the last replica goes, with --min-replicas 0 [default: 300]
    #[arg(long, requires = "max_replicas")]
    scale_to_zero_after: Option<u32>,
}

impl AutoscalingArgs {
    /// The policy these flags ask for, if any.
    fn policy(&self) -> Option<pb::AutoscalingPolicy> {
        let max = self.max_replicas?;
        let (metric, target) = match (self.target_in_flight, self.target_queue, self.target_kv_utilization) {
            (_, Some(q), _) => (pb::AutoscalingMetric::Queue, q),
            (_, _, Some(kv)) => (pb::AutoscalingMetric::KvUtilization, kv),
            (t, _, _) => (pb::AutoscalingMetric::InFlight, t.unwrap_or(8.0)),
        };
        Some(pb::AutoscalingPolicy {
            min_replicas: self.min_replicas.unwrap_or(1),
            max_replicas: max,
            metric: metric as i32,
            target,
            scale_up_window_s: self.scale_up_window.unwrap_or(0),
            scale_down_delay_s: self.scale_down_delay,
            scale_to_zero_after_s: self.scale_to_zero_after,
        })
    }
}

/// Arguments of `gantry scale`.
#[derive(Debug, clap::Args)]
pub struct ScaleArgs {
    name: String,
    #[arg(long)]
    replicas: u32,
    /// Print the deployment as JSON
    #[arg(short = 'o', long = "output", value_parser = ["table", "json"], default_value = "table")]
    output: String,
    #[command(flatten)]
    controller: ControllerArg,
}

pub const SCALE_EXAMPLES: &str = "\
Examples:
  gantry scale chat --replicas 3
  gantry scale chat --replicas 0                  # unload every replica, keep the deployment";

pub const GET_EXAMPLES: &str = "\
Examples:
  gantry get deployments                          # one line each
  gantry get deployments chat                     # replicas, stages and events
  gantry get workers                              # GPUs with free and reserved memory
  gantry get models -o json";

pub const DELETE_EXAMPLES: &str = "\
Examples:
  gantry delete chat
  gantry delete chat -o json";

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Kind {
    #[value(alias = "deployment", alias = "deploy", alias = "md")]
    Deployments,
    #[value(alias = "worker", alias = "nodes")]
    Workers,
    #[value(alias = "model")]
    Models,
}

/// Arguments of `gantry get`.
#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// What to list
    kind: Kind,
    /// One deployment (with its replicas and events)
    name: Option<String>,
    #[arg(short = 'o', long = "output", value_parser = ["table", "json"], default_value = "table")]
    output: String,
    #[command(flatten)]
    controller: ControllerArg,
}

/// Arguments of `gantry delete`.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    name: String,
    /// Print the result as JSON
    #[arg(short = 'o', long = "output", value_parser = ["table", "json"], default_value = "table")]
    output: String,
    #[command(flatten)]
    controller: ControllerArg,
}

pub const CHAT_EXAMPLES: &str = "\
Examples:
  gantry chat \"What is the capital of France?\"
  gantry chat \"Write a haiku about GPUs\" --temperature 0.8 --max-tokens 64
  gantry chat --model llama                  # interactive: type messages, /reset, /exit";

/// Arguments of `gantry chat`.
#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    /// The message; without it, an interactive chat reads messages from the terminal
    message: Option<String>,
    /// The deployment to talk to [default: the only one deployed]
    #[arg(long)]
    model: Option<String>,
    /// A system message
    #[arg(long)]
    system: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// 0 is greedy
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Give up after this many seconds
    #[arg(long)]
    timeout: Option<u64>,
    #[command(flatten)]
    controller: ControllerArg,
}

/// A model's memory for `get models`: `468.3 MiB (measured here; estimated 536.0 MiB)`, or
/// the estimate alone.
fn memory_cell(m: &pb::MeasuredMemory) -> String {
    use gantry_core::units::format_bytes;
    let e = m.estimated.as_ref().map_or(0, |t| t.weights + t.kv_cache + t.activations + t.overhead);
    if m.measured_need_bytes > 0 {
        format!("{} ({}; estimated {})", format_bytes(m.measured_need_bytes), m.source, format_bytes(e))
    } else {
        format!("{} (estimated)", format_bytes(e))
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::with_code(format!("cannot start the async runtime: {e}"), 71))
}

/// Connects to the controller, saying how to start one when nothing answers.
pub async fn connect(arg: &ControllerArg) -> Result<Conn, CliError> {
    let bearer = Bearer::new(arg.api_key.as_deref()).map_err(|e| CliError::usage(format!("--api-key: {e}")))?;
    Ok(InterceptedService::new(connect_channel(&arg.controller, arg.tls_ca.as_deref()).await?, bearer))
}

/// Connects to the first of the comma-separated controllers that answers: with several
/// controllers on one etcd only the leader listens, so this finds it, and after a takeover
/// the same command finds the new one.
async fn connect_channel(controllers: &str, tls_ca: Option<&std::path::Path>) -> Result<Channel, CliError> {
    let all: Vec<&str> = controllers.split(',').map(str::trim).filter(|c| !c.is_empty()).collect();
    let mut last = None;
    for controller in &all {
        match connect_one(controller, tls_ca).await {
            Ok(channel) => return Ok(channel),
            Err(e) if e.code() == CliError::UNAVAILABLE && all.len() > 1 => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(match (last, all.len()) {
        (Some(e), n) if n > 1 => CliError::with_code(
            format!("none of the {n} controllers answers ({controllers}); the last: {}", e.message()),
            CliError::UNAVAILABLE,
        ),
        (Some(e), _) => e,
        (None, _) => CliError::usage("--controller is empty: give the controller's address"),
    })
}

async fn connect_one(controller: &str, tls_ca: Option<&std::path::Path>) -> Result<Channel, CliError> {
    let scheme = if tls_ca.is_some() { "https" } else { "http" };
    let url = if controller.contains("://") { controller.to_string() } else { format!("{scheme}://{controller}") };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| CliError::usage(format!("--controller {controller}: {e}")))?
        .connect_timeout(Duration::from_secs(5));
    if url.starts_with("https://") {
        let Some(ca) = tls_ca else {
            return Err(CliError::usage(format!(
                "--controller {url}: give --tls-ca FILE (GANTRY_TLS_CA), the CA that signed the controller's certificate"
            )));
        };
        let pem = std::fs::read(ca).map_err(|e| CliError::usage(format!("--tls-ca {}: {e}", ca.display())))?;
        let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem));
        endpoint = endpoint.tls_config(tls).map_err(|e| CliError::usage(format!("--tls-ca: {e}")))?;
    }
    endpoint.connect().await.map_err(|e| {
        CliError::with_code(
            format!(
                "cannot reach the controller at {url}: {}; start one with `gantry up`, or point --controller (GANTRY_CONTROLLER) at yours",
                gantry_store::hub::error_chain(&e)
            ),
            CliError::UNAVAILABLE,
        )
    })
}

/// A gRPC failure as a one-line error with an exit code that says what kind it is.
pub fn status_error(s: tonic::Status) -> CliError {
    let code = match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => CliError::USAGE,
        tonic::Code::NotFound => CliError::NO_INPUT,
        tonic::Code::Unavailable | tonic::Code::ResourceExhausted | tonic::Code::DeadlineExceeded => {
            CliError::UNAVAILABLE
        }
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => CliError::NO_PERMISSION,
        _ => CliError::SOFTWARE,
    };
    CliError::with_code(s.message().to_string(), code)
}

fn parse_selectors(selectors: &[String]) -> Result<std::collections::HashMap<String, String>, CliError> {
    selectors
        .iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            _ => Err(CliError::usage(format!("--selector `{s}`: write KEY=VALUE"))),
        })
        .collect()
}

pub fn run_deploy(args: DeployArgs) -> Result<(), CliError> {
    let strategy = match args.strategy.to_ascii_lowercase().as_str() {
        "binpack" => pb::PlacementStrategy::Binpack,
        "spread" => pb::PlacementStrategy::Spread,
        other => return Err(CliError::usage(format!("--strategy {other}: use binpack or spread"))),
    };
    let context = match args.context {
        Some(c) => u32::try_from(c).map_err(|_| CliError::usage(format!("--context {c} is too large")))?,
        None => 0,
    };
    // A path that exists here is sent absolute, so a controller and workers started from
    // another folder find the same file.
    let source = match std::path::Path::new(&args.model).canonicalize() {
        Ok(p) => p.display().to_string(),
        Err(_) => args.model.clone(),
    };
    let autoscaling = args.autoscaling.policy();
    let replicas = args.replicas.unwrap_or(autoscaling.as_ref().map_or(1, |p| p.min_replicas));
    let spec = pb::DeploymentSpec {
        source,
        dtype: args.dtype.clone(),
        context_length: context,
        replicas,
        placement: Some(pb::PlacementPolicy {
            strategy: strategy as i32,
            node_selector: parse_selectors(&args.selectors)?,
            gpu_name: args.gpu_name.clone(),
            allow_multi_node: args.allow_multi_node,
        }),
        stage_wire_dtype: args.stage_wire_dtype.clone(),
        sampling_defaults: (args.temperature.is_some() || args.max_tokens.is_some()).then(|| pb::SamplingParams {
            temperature: args.temperature,
            max_tokens: args.max_tokens,
            ..Default::default()
        }),
        autoscaling,
    };
    runtime()?.block_on(async {
        let mut client = DeploymentsClient::new(connect(&args.controller).await?);
        let d = client
            .apply(pb::ApplyRequest { name: args.name.clone(), spec: Some(spec) })
            .await
            .map_err(status_error)?
            .into_inner();
        if args.output == "json" {
            println!("{}", serde_json::to_string_pretty(&d)?);
        } else {
            println!("deployment {} applied (generation {})", d.name, d.generation);
            print!("{}", describe(&d));
        }
        Ok(())
    })
}

pub fn run_scale(args: ScaleArgs) -> Result<(), CliError> {
    runtime()?.block_on(async {
        let mut client = DeploymentsClient::new(connect(&args.controller).await?);
        let d = client
            .scale(pb::ScaleRequest { name: args.name.clone(), replicas: args.replicas })
            .await
            .map_err(status_error)?
            .into_inner();
        if args.output == "json" {
            println!("{}", serde_json::to_string_pretty(&d)?);
        } else {
            println!("deployment {} scaled to {} replica(s)", d.name, args.replicas);
        }
        Ok(())
    })
}

pub fn run_delete(args: DeleteArgs) -> Result<(), CliError> {
    runtime()?.block_on(async {
        let mut client = DeploymentsClient::new(connect(&args.controller).await?);
        client.delete(pb::DeleteDeploymentRequest { name: args.name.clone() }).await.map_err(status_error)?;
        if args.output == "json" {
            println!("{}", serde_json::json!({ "deleted": args.name }));
        } else {
            println!("deployment {} deleted; its replicas are unloaded", args.name);
        }
        Ok(())
    })
}

pub fn run_get(args: GetArgs) -> Result<(), CliError> {
    let json = args.output == "json";
    runtime()?.block_on(async {
        let channel = connect(&args.controller).await?;
        match args.kind {
            Kind::Deployments => {
                let mut client = DeploymentsClient::new(channel);
                if let Some(name) = &args.name {
                    let d = client
                        .get(pb::GetDeploymentRequest { name: name.clone() })
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    if json {
                        println!("{}", serde_json::to_string_pretty(&d)?);
                    } else {
                        print!("{}", describe(&d));
                    }
                    return Ok(());
                }
                let list = client.list(pb::ListDeploymentsRequest {}).await.map_err(status_error)?.into_inner();
                if json {
                    println!("{}", serde_json::to_string_pretty(&list.deployments)?);
                } else {
                    print!("{}", deployments_table(&list.deployments));
                }
            }
            Kind::Workers => {
                let mut client = ClusterClient::new(channel);
                let list = client.list_workers(pb::ListWorkersRequest {}).await.map_err(status_error)?.into_inner();
                if json {
                    println!("{}", serde_json::to_string_pretty(&list.workers)?);
                } else {
                    print!("{}", workers_table(&list.workers));
                }
            }
            Kind::Models => {
                let mut client = ModelsClient::new(channel);
                let list = client.list(pb::ListModelsRequest {}).await.map_err(status_error)?.into_inner();
                if json {
                    println!("{}", serde_json::to_string_pretty(&list.models)?);
                } else {
                    let mut t = Table::new(&["MODEL", "READY", "FAMILY", "PARAMS", "CONTEXT", "MEMORY", "SOURCE"]);
                    for m in &list.models {
                        t.row(vec![
                            m.name.clone(),
                            format!("{}/{}", m.ready_replicas, m.replicas),
                            m.family.clone(),
                            gantry_core::units::format_params(m.parameters),
                            m.context_length.to_string(),
                            m.memory.as_ref().map_or_else(|| "-".into(), memory_cell),
                            m.source.clone(),
                        ]);
                    }
                    print!("{}", t.render(0));
                }
            }
        }
        Ok(())
    })
}

fn placement_of(r: &pb::Replica) -> String {
    if r.stages.is_empty() {
        return "-".into();
    }
    r.stages
        .iter()
        .map(|s| match s.experts_on_host_bytes {
            0 => format!("{}/gpu:{}", s.worker_id, s.gpu_index),
            host => format!("{}/gpu:{}+host ({} of experts)", s.worker_id, s.gpu_index, format_bytes(host)),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn deployments_table(list: &[pb::Deployment]) -> String {
    let mut t = Table::new(&["NAME", "READY", "PHASE", "VRAM/REPLICA", "PLACEMENT", "MODEL"]);
    for d in list {
        let status = d.status.clone().unwrap_or_default();
        let spec = d.spec.clone().unwrap_or_default();
        let placements: Vec<String> = status.replica_status.iter().map(placement_of).collect();
        t.row(vec![
            d.name.clone(),
            format!("{}/{}", status.ready_replicas, spec.replicas),
            status.phase.clone(),
            format_bytes(status.replica_bytes),
            if placements.is_empty() { "-".into() } else { placements.join(" ") },
            spec.source.clone(),
        ]);
    }
    t.render(0)
}

/// A deployment in full: replicas with their placement or reason, then recent events.
pub fn describe(d: &pb::Deployment) -> String {
    let status = d.status.clone().unwrap_or_default();
    let spec = d.spec.clone().unwrap_or_default();
    let mut out = format!(
        "{}: {} of {} replica(s) ready ({}), {} per replica, model {}\n",
        d.name,
        status.ready_replicas,
        spec.replicas,
        status.phase,
        format_bytes(status.replica_bytes),
        spec.source
    );
    if let (Some(p), Some(a)) = (&spec.autoscaling, &status.autoscaler) {
        out.push_str(&autoscaling_line(p, a));
    }
    let mut t = Table::new(&["REPLICA", "STATE", "PLACEMENT", "RESERVED", "DETAIL"]);
    for r in &status.replica_status {
        let reserved: u64 = r.stages.iter().map(|s| s.reserved_bytes).sum();
        t.row(vec![
            r.index.to_string(),
            gantry_proto::replica_state_name(r.state).into(),
            placement_of(r),
            if reserved > 0 { format_bytes(reserved) } else { "-".into() },
            if r.progress.is_empty() { r.reason.clone() } else { r.progress.clone() },
        ]);
    }
    out.push_str(&t.render(2));
    // A split replica's pipeline, stage by stage.
    for r in status.replica_status.iter().filter(|r| r.stages.len() > 1) {
        out.push_str(&format!("  stages of replica {}:\n", r.index));
        let mut t = Table::new(&["STAGE", "WORKER", "GPU", "LAYERS", "RESERVED"]);
        // A tensor-parallel group is one pipeline stage of several ranks.
        let mut stage = 0;
        let mut rank = 0;
        for (i, s) in r.stages.iter().enumerate() {
            let mut layers = gantry_core::shard::layer_span(&(s.layer_start..s.layer_end));
            let tp = s.tensor_parallel as usize;
            if tp > 1 {
                layers.push_str(&format!(" (tensor-parallel rank {rank} of {tp})"));
            } else {
                if i == 0 {
                    layers.push_str(" +embed");
                }
                if i + 1 == r.stages.len() {
                    layers.push_str(" +head");
                }
            }
            t.row(vec![
                stage.to_string(),
                s.worker_id.clone(),
                format!("gpu:{}", s.gpu_index),
                layers,
                format_bytes(s.reserved_bytes),
            ]);
            rank += 1;
            if tp <= 1 || rank == tp {
                stage += 1;
                rank = 0;
            }
        }
        out.push_str(&t.render(4));
    }
    if !status.events.is_empty() {
        out.push_str("  events (latest last):\n");
        for e in status.events.iter().rev().take(8).rev() {
            out.push_str(&format!("    {:<14} {}\n", e.kind, e.message));
        }
    }
    out
}

/// The autoscaling policy, what the autoscaler sees now and its last decision.
fn autoscaling_line(p: &pb::AutoscalingPolicy, a: &pb::AutoscalerStatus) -> String {
    let metric = gantry_proto::convert::metric_from_proto(p.metric).unwrap_or_default().name();
    let mut out = format!(
        "  autoscaling: {}..{} replicas, target {metric} {} per replica (down after {} s{}); now {metric} {:.2}, {} in flight, {} queued, {} waiting\n",
        p.min_replicas,
        p.max_replicas,
        p.target,
        p.scale_down_delay_s.unwrap_or(300),
        if p.min_replicas == 0 {
            format!(", to zero after {} s idle", p.scale_to_zero_after_s.unwrap_or(300))
        } else {
            String::new()
        },
        a.load,
        a.in_flight,
        a.queued,
        a.waiting,
    );
    if !a.last_decision.is_empty() {
        out.push_str(&format!("  last decision: {}\n", a.last_decision));
    }
    out
}

fn workers_table(list: &[pb::WorkerInfo]) -> String {
    let mut t = Table::new(&["WORKER", "STATE", "GPU", "NAME", "TOTAL", "FREE", "RESERVED", "REPLICAS"]);
    for w in list {
        for (i, g) in w.gpus.iter().enumerate() {
            t.row(vec![
                if i == 0 { w.worker_id.clone() } else { String::new() },
                if i == 0 { w.state.clone() } else { String::new() },
                format!("gpu:{}", g.index),
                g.name.clone(),
                format_bytes(g.total_bytes),
                format_bytes(g.free_bytes),
                format_bytes(g.reserved_bytes),
                if g.replicas.is_empty() { "-".into() } else { g.replicas.join(",") },
            ]);
        }
        if w.gpus.is_empty() {
            t.row(vec![w.worker_id.clone(), w.state.clone(), "-".into()]);
        }
    }
    t.render(0)
}

/// The interactive chat's commands.
const CHAT_COMMANDS: &str =
    "/model NAME talks to another deployment, /reset forgets the conversation, /exit (or Ctrl-D) ends";

/// Checks that `name` is deployed, naming what is when it is not.
async fn known_model(channel: &Conn, name: &str) -> Result<(), CliError> {
    let list =
        ModelsClient::new(channel.clone()).list(pb::ListModelsRequest {}).await.map_err(status_error)?.into_inner();
    if list.models.iter().any(|m| m.name == name) {
        return Ok(());
    }
    let names: Vec<&str> = list.models.iter().map(|m| m.name.as_str()).collect();
    Err(CliError::usage(format!("no deployment named `{name}`; deployed: {}", names.join(", "))))
}

/// Which deployment to chat with: the one named, else the only one.
async fn chat_model(channel: Conn, named: Option<String>) -> Result<String, CliError> {
    if let Some(m) = named {
        return Ok(m);
    }
    let list = ModelsClient::new(channel).list(pb::ListModelsRequest {}).await.map_err(status_error)?.into_inner();
    match list.models.as_slice() {
        [] => Err(CliError::with_code(
            "nothing is deployed; deploy a model with `gantry deploy NAME --model M` (or start `gantry up`)",
            CliError::UNAVAILABLE,
        )),
        [one] => Ok(one.name.clone()),
        many => Err(CliError::usage(format!(
            "several models are deployed ({}); pick one with --model",
            many.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Streams one answer to stdout; returns its text.
async fn stream_answer(
    client: &mut InferenceClient<Conn>,
    request: pb::ChatRequest,
    timeout: Option<u64>,
) -> Result<String, CliError> {
    let mut req = tonic::Request::new(request);
    if let Some(t) = timeout {
        req.set_timeout(Duration::from_secs(t));
    }
    let mut stream = client.chat(req).await.map_err(status_error)?.into_inner();
    let mut text = String::new();
    let mut out = std::io::stdout();
    while let Some(event) = stream.message().await.map_err(status_error)? {
        match event.event {
            Some(pb::generate_event::Event::Token(t)) => {
                text.push_str(&t.text);
                let _ = out.write_all(t.text.as_bytes());
                let _ = out.flush();
            }
            Some(pb::generate_event::Event::Done(d)) => {
                let _ = writeln!(out);
                if let Some(u) = d.usage {
                    tracing::info!(
                        prompt_tokens = u.prompt_tokens,
                        completion_tokens = u.completion_tokens,
                        ttft_ms = d.time_to_first_token_ms,
                        "done"
                    );
                }
            }
            None => {}
        }
    }
    Ok(text)
}

pub fn run_chat(args: ChatArgs) -> Result<(), CliError> {
    if args.temperature.is_nan() || args.temperature < 0.0 {
        return Err(CliError::usage(format!("--temperature {}: must be 0 or more", args.temperature)));
    }
    runtime()?.block_on(async {
        let channel = connect(&args.controller).await?;
        let mut model = chat_model(channel.clone(), args.model.clone()).await?;
        let channel_for_models = channel.clone();
        let mut client = InferenceClient::new(channel);
        let sampling = pb::SamplingParams {
            temperature: Some(args.temperature),
            top_p: args.top_p,
            seed: args.seed,
            max_tokens: Some(args.max_tokens),
            ..Default::default()
        };
        let mut history: Vec<pb::ChatMessage> = Vec::new();
        if let Some(s) = &args.system {
            history.push(pb::ChatMessage { role: "system".into(), content: s.clone() });
        }
        let request = |model: &str, messages: Vec<pb::ChatMessage>| pb::ChatRequest {
            model: model.to_string(),
            messages,
            sampling: Some(sampling.clone()),
            request_id: String::new(),
        };
        if let Some(message) = &args.message {
            history.push(pb::ChatMessage { role: "user".into(), content: message.clone() });
            stream_answer(&mut client, request(&model, history), args.timeout).await?;
            return Ok(());
        }
        let interactive = std::io::stdin().is_terminal();
        if interactive {
            eprintln!("chatting with {model}; {CHAT_COMMANDS}");
        }
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        loop {
            if interactive {
                eprint!("> ");
            }
            let Some(line) = lines.next() else { break };
            let line = line.map_err(|e| CliError::with_code(format!("reading the terminal: {e}"), CliError::IO))?;
            let line = line.trim();
            match line {
                "" => continue,
                "/exit" | "/quit" => break,
                "/reset" => {
                    history.retain(|m| m.role == "system");
                    eprintln!("(conversation forgotten)");
                    continue;
                }
                "/help" => {
                    eprintln!("{CHAT_COMMANDS}");
                    continue;
                }
                "/model" => {
                    eprintln!("(talking to {model})");
                    continue;
                }
                _ if line.starts_with("/model ") => {
                    // Another deployment: checked to exist, and a fresh conversation with it.
                    let name = line["/model ".len()..].trim().to_string();
                    match known_model(&channel_for_models, &name).await {
                        Ok(()) => {
                            model = name;
                            history.retain(|m| m.role == "system");
                            eprintln!("(now talking to {model}; conversation forgotten)");
                        }
                        Err(e) => eprintln!("error: {e}"),
                    }
                    continue;
                }
                _ if line.starts_with('/') => {
                    eprintln!("unknown command {line}; {CHAT_COMMANDS}");
                    continue;
                }
                _ => {}
            }
            history.push(pb::ChatMessage { role: "user".into(), content: line.to_string() });
            match stream_answer(&mut client, request(&model, history.clone()), args.timeout).await {
                Ok(answer) => history.push(pb::ChatMessage { role: "assistant".into(), content: answer }),
                Err(e) => {
                    history.pop();
                    eprintln!("error: {e}");
                }
            }
        }
        Ok(())
    })
}
