//! `gantry`: the command-line front of Gantry.

mod client;
mod error;
mod generate;
mod inspect;
mod select;
mod table;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::CliError;

const EXAMPLES: &str = "\
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
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// What a model is and what it needs: family, size, context, memory, and how it fits GPUs.
    #[command(after_help = inspect::EXAMPLES)]
    Inspect(inspect::Args),
    /// Recommend models for a task, latency class, context and hardware, with reasons.
    #[command(after_help = select::EXAMPLES)]
    Select(select::Args),
    /// Run a model here and stream its answer (the engine a worker serves).
    #[command(after_help = generate::EXAMPLES)]
    Generate(generate::Args),
    /// Run a worker: serve this machine's GPUs (or CPU) and its models over gRPC.
    #[command(after_help = gantry_worker::cli::WORKER_EXAMPLES)]
    Worker(gantry_worker::cli::WorkerArgs),
    /// Download a model from the Hugging Face Hub into the local cache.
    #[command(after_help = gantry_worker::cli::PULL_EXAMPLES)]
    Pull(gantry_worker::cli::PullArgs),
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

/// Parses `8192`, `8K`, `128K` for clap.
fn parse_tokens_arg(s: &str) -> Result<u64, String> {
    gantry_core::units::parse_tokens(s).map_err(|e| e.to_string())
}

/// Parses `13B`, `500M` for clap.
fn parse_params_arg(s: &str) -> Result<u64, String> {
    gantry_core::units::parse_params(s).map_err(|e| e.to_string())
}

/// Sizes the CPU thread pool (see `gantry_worker::cli::set_threads`).
fn set_threads(threads: Option<usize>) -> Result<usize, CliError> {
    Ok(gantry_worker::cli::set_threads(threads)?)
}

fn main() -> ExitCode {
    // A chat-template renderer child of a worker serves here and never returns.
    gantry_worker::engine::chat_child::serve_renderer_if_child();
    gantry_worker::cli::install_panic_hook("gantry");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; everything else is a usage error (EX_USAGE).
            return ExitCode::from(if e.use_stderr() { CliError::USAGE } else { 0 });
        }
    };
    // Logs go to stderr. `GANTRY_LOG` (e.g. `info`, `gantry_worker=debug`) sets the level;
    // by default `generate` shows its load log (kernels used, repacking), a worker its
    // requests, and the rest warnings.
    let serving = matches!(cli.command, Command::Worker(_) | Command::Up(_) | Command::Controller(_));
    let default = if serving || matches!(cli.command, Command::Generate(_)) { "info" } else { "warn" };
    gantry_worker::cli::init_logging(default, serving);
    let result = match cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "gantry", &mut std::io::stdout());
            Ok(())
        }
        Command::Crd => {
            print!("{}", gantry_controller::operator::crd::crd_yaml());
            Ok(())
        }
        Command::Inspect(args) => inspect::run(args),
        Command::Select(args) => select::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Worker(args) => set_threads(args.threads).and_then(|_| Ok(gantry_worker::cli::run_worker(args)?)),
        Command::Pull(args) => gantry_worker::cli::run_pull(args).map_err(CliError::from),
        Command::Up(args) => set_threads(args.threads).and_then(|_| up::run_up(args)),
        Command::Controller(args) => up::run_controller(args),
        Command::Chat(args) => client::run_chat(args),
        Command::Deploy(args) => client::run_deploy(args),
        Command::Scale(args) => client::run_scale(args),
        Command::Get(args) => client::run_get(args),
        Command::Delete(args) => client::run_delete(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.code())
        }
    }
}
