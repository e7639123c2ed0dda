//! `gantry`: the command-line front of Gantry (its arguments are `gantry_cli::args::Cli`).

use std::process::ExitCode;

use clap::Parser;

use gantry_cli::args::{Cli, Command};
use gantry_cli::cmd::{bench, client, generate, inspect, pull, select, up, worker};
use gantry_cli::error::CliError;
use gantry_cli::process::{self, set_threads};

fn main() -> ExitCode {
    // A chat-template renderer child of a worker serves here and never returns.
    gantry_engine::chat_child::serve_renderer_if_child();
    process::install_panic_hook("gantry");
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
    process::init_logging(default, serving);
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
        Command::Bench(args) => set_threads(args.threads).and_then(|_| bench::run(args)),
        Command::Worker(args) => set_threads(args.threads).and_then(|_| worker::run_worker(args)),
        Command::Pull(args) => pull::run_pull(args),
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
