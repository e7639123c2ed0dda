//! `gantry-worker`: the worker alone, for container images (the same as `gantry worker`).

use std::process::ExitCode;

use clap::Parser;
use gantry_worker::cli::{self, WorkerArgs};

/// A Gantry worker: owns this node's GPUs, loads models, streams tokens over gRPC.
#[derive(Debug, Parser)]
#[command(name = "gantry-worker", version, about, after_help = cli::WORKER_EXAMPLES)]
struct Args {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> ExitCode {
    // A chat-template renderer child of a worker serves here and never returns.
    gantry_worker::engine::chat_child::serve_renderer_if_child();
    cli::install_panic_hook("gantry-worker");
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { cli::Failure::USAGE } else { 0 });
        }
    };
    cli::init_logging("info", true);
    let result = cli::set_threads(args.worker.threads).and_then(|_| cli::run_worker(args.worker));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}
