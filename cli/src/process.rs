//! What both binaries set up before a command runs, and what the serving commands share:
//! logging, the panic hook, the thread pool, the runtime, signals.

use crate::error::CliError;

/// A panic is a bug: one line naming it instead of a backtrace.
pub fn install_panic_hook(program: &'static str) {
    std::panic::set_hook(Box::new(move |info| {
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("{program}: internal error{at}: {info}; please report it");
    }));
}

/// Logs to stderr; `GANTRY_LOG` (e.g. `debug`, `gantry_worker=debug`) overrides `default`.
/// Servers stamp each line with the time; one-shot commands do not. `GANTRY_LOG_FORMAT=json`
/// writes one JSON object per line (for log collectors), fields included.
pub fn init_logging(default: &str, timestamps: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GANTRY_LOG").unwrap_or_else(|_| default.into());
    if std::env::var("GANTRY_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_current_span(false)
            .init();
        return;
    }
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .compact();
    if timestamps {
        fmt.init();
    } else {
        fmt.without_time().init();
    }
}

/// Sizes the CPU runtime's thread pool (and rayon's, which Candle uses); returns the count.
/// The default is the CPUs the process may use: its affinity mask, capped by its cgroup's CPU
/// quota. Call it first thing in `main`, before any other thread starts.
pub fn set_threads(threads: Option<usize>) -> Result<usize, CliError> {
    let n = match threads {
        Some(0) => return Err(CliError::with_code("--threads must be at least 1", CliError::USAGE)),
        Some(n) => n,
        None => gantry_engine::cpu::pool::default_threads(),
    };
    gantry_engine::cpu::pool::set_global_threads(n);
    // Candle sizes its matmul parallelism from RAYON_NUM_THREADS.
    #[allow(unsafe_code)]
    // SAFETY: called from `main`'s thread before any other thread exists (the pool is built
    // just below), so nothing reads the environment concurrently.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| CliError::with_code(format!("cannot set up {n} threads: {e}"), CliError::USAGE))?;
    Ok(n)
}

/// The multi-threaded runtime the serving commands run on.
pub fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::with_code(format!("cannot start the runtime: {e}"), CliError::SOFTWARE))
}

pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// This machine's host name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".into())
}

/// Parses `8192`, `8K`, `128K` for clap.
pub fn parse_tokens_arg(s: &str) -> Result<u64, String> {
    gantry_core::units::parse_tokens(s).map_err(|e| e.to_string())
}

/// Parses `13B`, `500M` for clap.
pub fn parse_params_arg(s: &str) -> Result<u64, String> {
    gantry_core::units::parse_params(s).map_err(|e| e.to_string())
}

/// Parses a number of seconds for clap: finite, above 0, at most a day.
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("`{s}`: give a number of seconds above 0 and at most 86400")),
    }
}
