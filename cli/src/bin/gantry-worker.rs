//! `gantry-worker`: the worker alone, for container images (the same as `gantry worker`).

use std::process::ExitCode;

use clap::Parser;
use gantry_cli::args::WorkerCli;
use gantry_cli::cmd::worker;
use gantry_cli::error::CliError;
use gantry_cli::process;

fn main() -> ExitCode {
    // A chat-template renderer child of a worker serves here and never returns.
    gantry_engine::chat_child::serve_renderer_if_child();
    process::install_panic_hook("gantry-worker");
    let args = match WorkerCli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { CliError::USAGE } else { 0 });
        }
    };
    process::init_logging("info", true);
    let result = process::set_threads(args.worker.threads).and_then(|_| worker::run_worker(args.worker));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.code())
        }
    }
}
