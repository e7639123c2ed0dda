//! `gantry`: the command-line front of Gantry.

mod error;
mod generate;
mod inspect;
mod select;
mod table;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::CliError;

const EXAMPLES: &str = "\
Examples:
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
}

/// Parses `8192`, `8K`, `128K` for clap.
fn parse_tokens_arg(s: &str) -> Result<u64, String> {
    gantry_core::units::parse_tokens(s).map_err(|e| e.to_string())
}

/// Parses `13B`, `500M` for clap.
fn parse_params_arg(s: &str) -> Result<u64, String> {
    gantry_core::units::parse_params(s).map_err(|e| e.to_string())
}

/// Sizes the CPU thread pool (Candle's kernels run on rayon's global pool); returns the count.
fn set_threads(threads: Option<usize>) -> Result<usize, CliError> {
    let n = match threads {
        Some(0) => return Err(CliError::usage("--threads must be at least 1")),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // Candle sizes its matmul parallelism from RAYON_NUM_THREADS.
    #[allow(unsafe_code)]
    // SAFETY: called once from `main`'s thread before any other thread exists (the pool is
    // built just below), so nothing reads the environment concurrently.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| CliError::usage(format!("cannot set up {n} threads: {e}")))?;
    Ok(n)
}

fn main() -> ExitCode {
    // A panic is a bug in Gantry: say so in one line instead of a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("gantry: internal error{at}: {info}; please report it");
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are not errors; everything else is a usage error (EX_USAGE).
            return ExitCode::from(if e.use_stderr() { CliError::USAGE } else { 0 });
        }
    };
    // Logs go to stderr. `GANTRY_LOG` (e.g. `info`, `gantry_worker=debug`) sets the level;
    // by default `generate` shows its load log (kernels used, repacking) and the rest warnings.
    let default = if matches!(cli.command, Command::Generate(_)) { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("GANTRY_LOG").unwrap_or_else(|_| default.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .compact()
        .init();
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Select(args) => select::run(args),
        Command::Generate(args) => generate::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.code())
        }
    }
}
