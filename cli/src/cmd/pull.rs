//! `gantry pull`: download a model from the Hugging Face Hub into the local cache; and the
//! local path of any model source, for the commands that run a model here.

use std::path::PathBuf;
use std::time::Instant;

use gantry_core::units::format_bytes;

use gantry_store::hub::Fetched;
use gantry_store::{DownloadProgress, HubConfig, HubError, HubRef, Source};

use crate::cmd::worker::hub;
use crate::error::CliError;
use crate::process::runtime;

pub const PULL_EXAMPLES: &str = "\
Examples:
  gantry pull HuggingFaceTB/SmolLM2-135M-Instruct
  gantry pull bartowski/SmolLM2-135M-Instruct-GGUF:SmolLM2-135M-Instruct-Q4_K_M.gguf
  gantry pull meta-llama/Llama-3.2-1B-Instruct@main   # gated: needs HF_TOKEN
Environment: HF_TOKEN (or the file HF_TOKEN_PATH, default ~/.cache/huggingface/token),
HF_ENDPOINT (a mirror), HF_HUB_CACHE / HF_HOME (where files go), HF_HUB_OFFLINE=1.";

/// Arguments of `gantry pull`.
#[derive(Debug, clap::Args)]
pub struct PullArgs {
    /// `org/name`, optionally `@revision` and `:file.gguf`
    pub model: String,
    /// The Hugging Face cache folder [default: HF_HUB_CACHE, else ~/.cache/huggingface/hub]
    #[arg(long, env = "GANTRY_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// Fetches a Hub model with a progress bar per file on stderr (hidden when stderr is not a
/// terminal) and, at the end, a summary line.
pub fn fetch_with_progress(r: &HubRef, cache_dir: Option<PathBuf>) -> Result<Fetched, CliError> {
    let hub = hub(cache_dir)?;
    let started = Instant::now();
    let bars = indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr());
    let style = indicatif::ProgressStyle::with_template(
        "{msg:30!} {bar:30} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {eta:>4}",
    )
    .map_err(|e| CliError::with_code(e.to_string(), CliError::SOFTWARE))?;
    let mut current: Option<(String, indicatif::ProgressBar)> = None;
    let mut progress = |p: DownloadProgress| {
        if current.as_ref().is_none_or(|(f, _)| f != &p.file) {
            if let Some((_, bar)) = current.take() {
                bar.finish();
            }
            let bar =
                bars.add(indicatif::ProgressBar::new(p.total).with_style(style.clone()).with_message(p.file.clone()));
            current = Some((p.file.clone(), bar));
        }
        if let Some((_, bar)) = &current {
            bar.set_length(p.total.max(p.done));
            bar.set_position(p.done);
        }
    };
    let fetched = runtime()?.block_on(hub.fetch(r, &mut progress))?;
    if let Some((_, bar)) = current.take() {
        bar.finish();
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{r} at {}: {} downloaded in {secs:.1} s{}",
        &fetched.commit[..fetched.commit.len().min(12)],
        format_bytes(fetched.downloaded_bytes),
        if fetched.downloaded_bytes == 0 { " (everything was in the cache)" } else { "" }
    );
    Ok(fetched)
}

/// Where a model source's files are: a local path as given, a Hub id fetched first.
pub fn local_path(source: &str, cache_dir: Option<PathBuf>) -> Result<PathBuf, CliError> {
    match Source::parse(source) {
        Source::Local(p) => Ok(p),
        Source::Hub(r) => Ok(fetch_with_progress(&r, cache_dir)?.path),
        Source::Url(u) => {
            let config = HubConfig::from_env()?;
            let dir = cache_dir.unwrap_or(config.cache_dir);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| CliError::with_code(format!("cannot start the download: {e}"), CliError::SOFTWARE))?;
            Ok(rt.block_on(gantry_store::url::download(&u, &dir, &mut |_| {}))?)
        }
    }
}

/// Downloads a model into the cache with a progress bar; prints where it is.
pub fn run_pull(args: PullArgs) -> Result<(), CliError> {
    let r = HubRef::parse(&args.model).ok_or_else(|| HubError::BadId(args.model.clone()))?;
    let fetched = fetch_with_progress(&r, args.cache_dir)?;
    println!("{}", fetched.path.display());
    Ok(())
}
