//! `gantry bench MODEL`: measures what a model really takes and how fast it runs on this
//! machine, and records it where `inspect`, `select` and placement read it.
//!
//! It loads the model through a worker's own load path (in this process), so memory is measured
//! as a serving worker measures it (`gantry_worker::measure`); then it runs one stream, and
//! `--streams` streams at once, of a `--prompt-tokens` prompt and `--tokens` generated tokens
//! (greedy, end-of-sequence ignored), timing them from outside as a client would, while the
//! engine times its passes per batch size. The measurement goes to this machine's
//! measurements file and, with `--controller`, to the controller's store.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_core::measured::{Measurement, PerTerm, Terms};
use gantry_core::units::{format_bytes, format_count};
use gantry_proto::convert::{measurement_from_proto, measurement_to_proto};
use gantry_proto::v1 as pb;
use gantry_worker::state::{WorkerOptions, WorkerState};
use serde::Serialize;

use crate::cmd::client::ControllerArg;
use crate::cmd::table::Table;
use crate::error::CliError;

pub const EXAMPLES: &str = "\
Examples:
  gantry bench models/SmolLM2-135M-Instruct.Q4_1.gguf
  gantry bench models/gemma-3-270m-q4_k_m.gguf --streams 8 --tokens 128 --json
  gantry bench models/SmolLM2-135M-Instruct.Q4_1.gguf --controller 127.0.0.1:50051";

/// The model id the bench loads its model under.
const MODEL_ID: &str = "bench";
/// The context the KV cache is sized for when none is given (at most the model's).
const DEFAULT_CONTEXT: u64 = 4096;
/// A sentence prompts are built from.
const SENTENCE: &str = " The river carried small stones from the mountains down to the valley, where farmers used them to build low walls around their fields.";

/// Arguments of `gantry bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model folder, its config.json, a .gguf file, or a Hub id (downloaded first)
    model: String,
    /// Streams run at once in the second run (the KV cache is sized for this many)
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    streams: u32,
    /// Prompt tokens per stream
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65536))]
    prompt_tokens: u32,
    /// Tokens generated per stream
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(2..=65536))]
    tokens: u32,
    /// Context the KV cache is sized for [default: 4096, at most the model's]
    #[arg(long, value_parser = crate::process::parse_tokens_arg)]
    context: Option<u64>,
    /// CPU threads for the engine [default: the machine's cores]
    #[arg(long, env = "GANTRY_THREADS")]
    pub threads: Option<usize>,
    /// Also record the measurement on this controller (its gRPC address)
    #[arg(long)]
    controller: Option<String>,
    /// The API key, when the controller requires one (a key with write permission)
    #[arg(long, env = "GANTRY_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The CA that signed the controller's TLS certificate (PEM)
    #[arg(long, env = "GANTRY_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Do not write this machine's measurements file
    #[arg(long)]
    no_record: bool,
    /// Where Hub models are cached
    #[arg(long, env = "GANTRY_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

/// One run's figures, as a client sees them.
#[derive(Debug, Clone, Serialize)]
struct Run {
    streams: u32,
    prompt_tokens: u64,
    generated_tokens: u64,
    /// Mean time to the first token.
    ttft_ms: f64,
    /// Prompt tokens of all streams over the mean time to first token.
    prefill_tokens_per_sec: f64,
    /// Tokens after the first, all streams, over the time from the first token to the end.
    decode_tokens_per_sec: f64,
    decode_tokens_per_sec_per_stream: f64,
    wall_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    path: String,
    device_kind: String,
    threads: u32,
    digest: String,
    load_ms: u64,
    context: u64,
    streams: u32,
    estimated: Terms,
    measured: Terms,
    error_percent: PerTerm,
    runs: Vec<Run>,
    measurement: Measurement,
    recorded_in: Vec<String>,
}

/// Runs `gantry bench`.
pub fn run(args: Args) -> Result<(), CliError> {
    let path = crate::cmd::pull::local_path(&args.model, args.cache_dir.clone())?;
    let spec = gantry_model::read_spec(&path)?;
    let context = args.context.unwrap_or(DEFAULT_CONTEXT).min(spec.context.length);
    if context <= u64::from(args.prompt_tokens) + u64::from(args.tokens) {
        return Err(CliError::usage(format!(
            "--prompt-tokens {} + --tokens {} do not fit a context of {context} tokens; give a larger --context",
            args.prompt_tokens, args.tokens
        )));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| CliError::with_code(format!("cannot start the async runtime: {e}"), CliError::SOFTWARE))?;
    let report = rt.block_on(bench(&args, path, context))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

fn failed(what: &str) -> impl Fn(gantry_worker::error::WorkerError) -> CliError + '_ {
    move |e| CliError::with_code(format!("{what}: {e}"), CliError::SOFTWARE)
}

async fn bench(args: &Args, path: PathBuf, context: u64) -> Result<Report, CliError> {
    let inventory = gantry_worker::gpu::detect(None).map_err(|e| CliError::with_code(e, CliError::UNAVAILABLE))?;
    let options =
        WorkerOptions { worker_id: "gantry bench".into(), parallel: args.streams as usize, ..WorkerOptions::default() };
    let state = WorkerState::new(options, inventory, crate::cmd::worker::hub(args.cache_dir.clone())?);
    let (tx, mut progress) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move { while progress.recv().await.is_some() {} });
    let request = pb::LoadModelRequest {
        model_id: MODEL_ID.into(),
        source: path.display().to_string(),
        context_length: u32::try_from(context).unwrap_or(u32::MAX),
        ..Default::default()
    };
    let info = state.load(request, tx).await.map_err(failed("loading the model"))?;
    if info.measurement.is_none() {
        return Err(CliError::with_code(
            "the load was not measured (the process's resident set or the GPU's memory could not be read)",
            CliError::SOFTWARE,
        ));
    }
    // Every request its own prompt: none is served from another's prefix cache.
    let prompts = |from: u32, n: u32| {
        (from..from + n).map(|i| prompt(&state, i, args.prompt_tokens)).collect::<Result<Vec<_>, _>>()
    };
    // A short first request: the first pass's one-time costs are not in the timed runs.
    run_streams(&state, &prompts(0, 1)?, 4).await?;
    let mut runs = vec![run_streams(&state, &prompts(1, 1)?, args.tokens).await?];
    if args.streams > 1 {
        runs.push(run_streams(&state, &prompts(2, args.streams)?, args.tokens).await?);
    }
    let status = state.status().map_err(failed("reading the worker's status"))?;
    let proto =
        status.models.iter().find_map(|m| m.measurement.clone()).ok_or_else(|| {
            CliError::with_code("the worker reported no measurement for the model", CliError::SOFTWARE)
        })?;
    let mut measurement = measurement_from_proto(&proto);
    measurement.by = "gantry bench".into();
    let mut recorded_in = Vec::new();
    if !args.no_record {
        let file = crate::cmd::measurements::path();
        crate::cmd::measurements::record(&file, measurement.clone())?;
        recorded_in.push(file.display().to_string());
    }
    if let Some(controller) = &args.controller {
        let arg = ControllerArg {
            controller: controller.clone(),
            api_key: args.api_key.clone(),
            tls_ca: args.tls_ca.clone(),
        };
        let conn = crate::cmd::client::connect(&arg).await?;
        pb::models_client::ModelsClient::new(conn)
            .record(measurement_to_proto(&measurement))
            .await
            .map_err(crate::cmd::client::status_error)?;
        recorded_in.push(format!("the controller at {controller}"));
    }
    Ok(Report {
        model: measurement.model.clone(),
        path: path.display().to_string(),
        device_kind: measurement.device_kind.clone(),
        threads: measurement.threads,
        digest: measurement.digest.clone(),
        load_ms: info.load_ms,
        context,
        streams: args.streams,
        estimated: measurement.estimated,
        measured: measurement.measured,
        error_percent: measurement.error_percent(),
        runs,
        measurement,
        recorded_in,
    })
}

/// A prompt of at least `tokens` tokens, its first words unique to stream `i` (so no stream's
/// prompt is served from another's prefix cache).
fn prompt(state: &Arc<WorkerState>, i: u32, tokens: u32) -> Result<String, CliError> {
    let mut text = format!("Report {i}.");
    loop {
        let req = pb::GenerateRequest {
            model_id: MODEL_ID.into(),
            input: Some(pb::generate_request::Input::Prompt(text.clone())),
            ..Default::default()
        };
        let n = state.tokenize(&req).map_err(failed("tokenizing the prompt"))?.token_ids.len();
        if n >= tokens as usize {
            return Ok(text);
        }
        // Words one at a time near the end, so the prompt overshoots by little.
        let missing = tokens as usize - n;
        if missing > 40 {
            text.push_str(SENTENCE);
        } else {
            text.push_str(" stone");
        }
    }
}

/// Runs one request per prompt at once; the figures of the run.
async fn run_streams(state: &Arc<WorkerState>, prompts: &[String], tokens: u32) -> Result<Run, CliError> {
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for p in prompts {
        let req = pb::GenerateRequest {
            model_id: MODEL_ID.into(),
            input: Some(pb::generate_request::Input::Prompt(p.clone())),
            sampling: Some(pb::SamplingParams {
                temperature: Some(0.0),
                max_tokens: Some(tokens),
                ignore_eos: true,
                ..Default::default()
            }),
            request_id: "bench".into(),
            ..Default::default()
        };
        let mut events = state.generate(req).map_err(failed("starting a stream"))?;
        set.spawn(async move {
            let mut first = None;
            let mut generated = 0u64;
            let mut prompt_tokens = 0u64;
            while let Some(ev) = events.recv().await {
                match ev
                    .map_err(|s| CliError::with_code(format!("a stream failed: {}", s.message()), CliError::SOFTWARE))?
                    .event
                {
                    Some(pb::generate_event::Event::Token(t)) if t.token_id.is_some() => {
                        first.get_or_insert(started.elapsed());
                        generated += 1;
                    }
                    Some(pb::generate_event::Event::Done(d)) => {
                        prompt_tokens = d.usage.map_or(0, |u| u64::from(u.prompt_tokens));
                        break;
                    }
                    _ => {}
                }
            }
            Ok::<_, CliError>((first.unwrap_or_default(), started.elapsed(), generated, prompt_tokens))
        });
    }
    let mut done = Vec::new();
    while let Some(r) = set.join_next().await {
        done.push(r.map_err(|e| CliError::with_code(format!("a stream stopped: {e}"), CliError::SOFTWARE))??);
    }
    let n = done.len().max(1) as f64;
    let secs = |d: Duration| d.as_secs_f64();
    let ttft = done.iter().map(|d| secs(d.0)).sum::<f64>() / n;
    let first_token = done.iter().map(|d| d.0).min().unwrap_or_default();
    let end = done.iter().map(|d| d.1).max().unwrap_or_default();
    let prompt_tokens: u64 = done.iter().map(|d| d.3).sum();
    let after_first: u64 = done.iter().map(|d| d.2.saturating_sub(1)).sum();
    let decode = after_first as f64 / secs(end.saturating_sub(first_token)).max(1e-9);
    Ok(Run {
        streams: prompts.len() as u32,
        prompt_tokens,
        generated_tokens: done.iter().map(|d| d.2).sum(),
        ttft_ms: ttft * 1e3,
        prefill_tokens_per_sec: prompt_tokens as f64 / ttft.max(1e-9),
        decode_tokens_per_sec: decode,
        decode_tokens_per_sec_per_stream: decode / n,
        wall_ms: secs(end) * 1e3,
    })
}

fn render(r: &Report) -> String {
    let mut out = format!(
        "{} on {}{}\n  {}\n  loaded in {} ms; KV cache sized for {} tokens × {} streams\n\n",
        r.model,
        r.device_kind,
        if r.threads > 0 { format!(" ({} threads)", r.threads) } else { String::new() },
        r.digest,
        r.load_ms,
        format_count(r.context),
        r.streams
    );
    let mut t = crate::cmd::measurements::terms_table(&r.measurement, "MEMORY");
    t.row(vec![
        "total".into(),
        format_bytes(r.estimated.total()),
        format_bytes(r.measurement.measured_total()),
        crate::cmd::measurements::percent(r.error_percent.total),
    ]);
    out.push_str(&t.render(0));
    out.push('\n');
    let mut t = Table::new(&["STREAMS", "PROMPT", "TTFT", "PREFILL TOK/S", "DECODE TOK/S", "PER STREAM"]);
    for run in &r.runs {
        t.row(vec![
            run.streams.to_string(),
            format!("{} tokens", run.prompt_tokens / u64::from(run.streams.max(1))),
            format!("{:.0} ms", run.ttft_ms),
            format!("{:.1}", run.prefill_tokens_per_sec),
            format!("{:.1}", run.decode_tokens_per_sec),
            format!("{:.1}", run.decode_tokens_per_sec_per_stream),
        ]);
    }
    out.push_str(&t.render(0));
    if r.recorded_in.is_empty() {
        out.push_str("\nnot recorded (--no-record)\n");
    } else {
        out.push_str(&format!("\nrecorded in {}\n", r.recorded_in.join(" and ")));
    }
    out
}
