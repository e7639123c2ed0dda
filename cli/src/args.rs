//! The command lines of both binaries, as clap parses them: `gantry` ([`Cli`]) and
//! `gantry-worker` ([`WorkerCli`]). In the library so tests parse argument lists (the Helm
//! chart's, say) with the very definitions the binaries use.

use clap::{Parser, Subcommand};

use crate::cmd::{bench, client, generate, inspect, pull, select, up, worker};

pub const EXAMPLES: &str = "\
Examples:
  gantry up                                   # a controller + local worker serving SmolLM2
  gantry chat \"What is the capital of France?\"
  gantry deploy llama --model ./Llama-3.1-8B-Instruct --replicas 2
  gantry get deployments
  gantry inspect models/SmolLM2-135M-Instruct.Q4_1.gguf
  gantry inspect meta-llama/Meta-Llama-3-70B-Instruct --gpus 2x80GiB --context 8K
  gantry inspect ./Llama-3.1-8B-Instruct --dtype q4_k_m --gpus 1x24GiB --json
  gantry select --task chat --latency realtime --gpus 1x24GiB
  gantry select --task summarization --latency batch --min-context 128K --gpus 8x80GiB --no-gated";

/// Gantry: choose, place and serve open LLMs on your own GPUs.
#[derive(Debug, Parser)]
#[command(name = "gantry", version, about, after_help = EXAMPLES, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// What a model is and what it needs: family, size, context, memory, and how it fits GPUs.
    #[command(after_help = inspect::EXAMPLES)]
    Inspect(inspect::Args),
    /// Recommend models for a task, latency class, context and hardware, with reasons.
    #[command(after_help = select::EXAMPLES)]
    Select(select::Args),
    /// Measure a model on this machine (memory, load time, prefill and decode speed) and record it.
    #[command(after_help = bench::EXAMPLES)]
    Bench(bench::Args),
    /// Run a model here and stream its answer (the engine a worker serves).
    #[command(after_help = generate::EXAMPLES)]
    Generate(generate::Args),
    /// Run a worker: serve this machine's GPUs (or CPU) and its models over gRPC.
    #[command(after_help = worker::WORKER_EXAMPLES)]
    Worker(worker::WorkerArgs),
    /// Download a model from the Hugging Face Hub into the local cache.
    #[command(after_help = pull::PULL_EXAMPLES)]
    Pull(pull::PullArgs),
    /// Run Gantry on this machine: a controller and a local worker serving a model.
    #[command(after_help = up::UP_EXAMPLES)]
    Up(up::UpArgs),
    /// Run a controller: the API, the scheduler and the router that workers join.
    #[command(after_help = up::CONTROLLER_EXAMPLES)]
    Controller(up::ControllerArgs),
    /// Chat with a deployed model through the controller (interactive without a message).
    #[command(after_help = client::CHAT_EXAMPLES)]
    Chat(client::ChatArgs),
    /// Create or update a deployment.
    #[command(after_help = client::DEPLOY_EXAMPLES)]
    Deploy(client::DeployArgs),
    /// Change a deployment's replica count.
    #[command(after_help = client::SCALE_EXAMPLES)]
    Scale(client::ScaleArgs),
    /// List deployments, workers or models (`gantry get deployments NAME` for one in full).
    #[command(after_help = client::GET_EXAMPLES)]
    Get(client::GetArgs),
    /// Delete a deployment, unloading its replicas.
    #[command(after_help = client::DELETE_EXAMPLES)]
    Delete(client::DeleteArgs),
    /// Print a shell completion script: `gantry completions bash > /etc/bash_completion.d/gantry`.
    #[command(after_help = COMPLETION_EXAMPLES)]
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Print the `ModelDeployment` CustomResourceDefinition (YAML) for `kubectl apply -f -`.
    #[command(
        after_help = "Examples:\n  gantry crd | kubectl apply -f -\n  gantry crd > deploy/crds/gantry.dev_modeldeployments.yaml"
    )]
    Crd,
}

const COMPLETION_EXAMPLES: &str = "\
Examples:
  gantry completions bash > ~/.local/share/bash-completion/completions/gantry
  gantry completions zsh > \"${fpath[1]}/_gantry\"
  gantry completions fish > ~/.config/fish/completions/gantry.fish";

/// A Gantry worker: owns this node's GPUs, loads models, streams tokens over gRPC.
#[derive(Debug, Parser)]
#[command(name = "gantry-worker", version, about, after_help = worker::WORKER_EXAMPLES)]
pub struct WorkerCli {
    #[command(flatten)]
    pub worker: worker::WorkerArgs,
}
