//! The controller's deterministic simulation from the command line, for long runs and for
//! reproducing a failing seed (`controller/src/sim.rs`):
//!
//!   cargo run --release -p gantry-controller --example sim -- --seeds 1000 --steps 100000
//!   cargo run --release -p gantry-controller --example sim -- --seed 4242 --steps 100000

use std::time::Instant;

use gantry_controller::sim::Sim;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let steps = arg("--steps", 100_000);
    let (first, seeds) = match args.iter().any(|a| a == "--seed") {
        true => (arg("--seed", 1), 1),
        false => (1, arg("--seeds", 100)),
    };
    let started = Instant::now();
    let mut total = 0u64;
    for seed in first..first + seeds {
        match Sim::run(seed, steps) {
            Ok(r) => total += r.steps,
            Err(e) => {
                eprintln!(
                    "FAILED: {e}\nreproduce: cargo run --release -p gantry-controller --example sim -- --seed {seed} --steps {steps}"
                );
                std::process::exit(1);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{seeds} seed(s) from {first}, {total} steps, every invariant held: {secs:.1} s, {:.0} steps/s",
        total as f64 / secs
    );
}
