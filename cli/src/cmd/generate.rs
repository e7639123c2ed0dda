//! `gantry generate`: run a model on this machine's CPU (or a GPU in a CUDA build) and stream
//! its answer — the same engine a worker serves.

use std::io::{IsTerminal, Write};
use std::ops::ControlFlow;
use std::time::Instant;

use gantry_engine::EngineError;
use gantry_engine::chat::Message;
use gantry_engine::files::ModelFiles;
use gantry_engine::generate::{Session, Summary, generate};
use gantry_engine::sampling::SamplingParams;
use serde::Serialize;

use crate::error::CliError;

pub const EXAMPLES: &str = "\
Examples:
  gantry generate --model models/SmolLM2-135M-Instruct.Q4_1.gguf --chat --prompt 'What is the capital of France?'
  gantry generate --model models/gemma-3-270m-q4_k_m.gguf --prompt 'Once upon a time,' --max-tokens 64
  gantry generate --model ./my-model --prompt 'def fib(n):' --temperature 0.7 --top-p 0.9 --seed 42
  gantry generate --model HuggingFaceTB/SmolLM2-135M-Instruct --chat --prompt 'Hi'   # fetched from the Hub first
  gantry generate --model models/SmolLM2-135M-Instruct.Q4_1.gguf --prompt 'Hi' --json";

/// Arguments of `gantry generate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model folder (safetensors), its config.json, a .gguf file, or a Hugging Face Hub id (org/name[@rev][:file.gguf])
    #[arg(long, env = "GANTRY_MODEL")]
    model: String,
    /// The prompt (with --chat, the user's message)
    #[arg(long, required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// The prompt as token ids, comma-separated (for benchmarks and tests: no tokenization)
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["prompt", "chat", "system"])]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt in the model's chat template as a user message
    #[arg(long)]
    chat: bool,
    /// A system message (implies --chat)
    #[arg(long)]
    system: Option<String>,
    /// Tokens to generate at most
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy; higher is more random
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Sample from the k most likely tokens only (0 = all)
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample from the smallest set of tokens with this much probability
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    min_p: f32,
    /// Penalise tokens already in the text (1 = off)
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repeat_penalty: f32,
    /// Seed for sampling (same seed, same tokens)
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this string (repeatable)
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens
    #[arg(long)]
    ignore_eos: bool,
    /// CPU threads [default: the CPUs this process may use (affinity mask, cgroup CPU quota)]
    #[arg(long, env = "GANTRY_THREADS")]
    threads: Option<usize>,
    /// Where to run: cpu, or cuda:N in a build with the `cuda` feature
    #[arg(long, default_value = "cpu", env = "GANTRY_DEVICE")]
    device: String,
    /// Print token ids, text and timings as JSON instead of streaming text
    #[arg(long)]
    json: bool,
    /// Untimed generations first (benchmarks: warm caches and thread pools)
    #[arg(long, default_value_t = 0, hide = true)]
    warmup: usize,
}

impl From<EngineError> for CliError {
    fn from(e: EngineError) -> CliError {
        let code = match &e {
            EngineError::InvalidSampling(_)
            | EngineError::PromptTooLong { .. }
            | EngineError::ContextExceeded { .. } => CliError::USAGE,
            EngineError::Files(_) | EngineError::Io { .. } => CliError::NO_INPUT,
            _ => CliError::DATA,
        };
        CliError::with_code(e.to_string(), code)
    }
}

/// `--json` output.
#[derive(Serialize)]
struct JsonOutput<'a> {
    model: &'a str,
    prompt: &'a str,
    prompt_ids: &'a [u32],
    tokens: &'a [u32],
    text: &'a str,
    finish_reason: gantry_engine::generate::FinishReason,
    usage: Usage,
    timings: JsonTimings,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    completion_tokens: usize,
}

#[derive(Serialize)]
struct JsonTimings {
    load_ms: f64,
    prefill_ms: f64,
    time_to_first_token_ms: f64,
    decode_ms: f64,
    prefill_tokens_per_sec: f64,
    decode_tokens_per_sec: f64,
    threads: usize,
    /// Peak resident memory of the process (Linux `VmHWM`), when known.
    peak_rss_bytes: Option<u64>,
}

/// Runs `gantry generate`.
pub fn run(args: Args) -> Result<(), CliError> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repeat_penalty,
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        ..SamplingParams::default()
    };
    params.validate().map_err(|e| CliError::usage(format!("invalid sampling: {e}")))?;
    let threads = crate::process::set_threads(args.threads)?;

    let load_started = Instant::now();
    let path = crate::cmd::pull::local_path(&args.model, None)?;
    let files = ModelFiles::open(&path)?;
    let tokenizer = files.tokenizer()?;
    let device = gantry_engine::device(&args.device).map_err(|e| CliError::usage(e.to_string()))?;
    // A progress line on terminals; one summary line otherwise.
    let show = !args.json && std::io::stderr().is_terminal();
    let model = files.load_part(0..files.config.num_layers, &device, &mut |p| {
        if show {
            eprint!("\rloading {}: layer {}/{}", files.spec.name, p.layers_done, p.layers_total);
        }
    })?;
    let load = load_started.elapsed();
    if !args.json {
        let sep = if show { "\r" } else { "" };
        eprintln!("{sep}loaded {} ({} layers) in {} ms", files.spec.name, files.config.num_layers, load.as_millis());
    }

    let user_text = args.prompt.clone().unwrap_or_default();
    let prompt_text = if args.chat || args.system.is_some() {
        let isolation = crate::cmd::worker::TemplateArgs::default().isolation()?;
        let template = files.chat_template(&tokenizer, &isolation)?;
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", &user_text));
        template.render(&messages, true, &Default::default())?
    } else {
        user_text
    };
    let prompt = match &args.prompt_ids {
        Some(ids) => ids.clone(),
        None => tokenizer.encode(&prompt_text, true, true)?,
    };
    let extra_eos: Vec<u32> = files.spec.eos_token_ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
    for _ in 0..args.warmup {
        generate(&mut Session::new(&model), &tokenizer, &prompt, &params, &extra_eos, &mut |_| {
            ControlFlow::Continue(())
        })?;
    }
    let mut session = Session::new(&model);
    let mut stdout = std::io::stdout();
    let summary: Summary = generate(&mut session, &tokenizer, &prompt, &params, &extra_eos, &mut |ev| {
        if !args.json {
            let _ = stdout.write_all(ev.text.as_bytes());
            let _ = stdout.flush();
        }
        ControlFlow::Continue(())
    })?;
    let t = summary.timings;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    if args.json {
        let out = JsonOutput {
            model: &files.spec.name,
            prompt: &prompt_text,
            prompt_ids: &prompt,
            tokens: &summary.tokens,
            text: &summary.text,
            finish_reason: summary.finish_reason,
            usage: Usage { prompt_tokens: summary.prompt_tokens, completion_tokens: summary.completion_tokens },
            timings: JsonTimings {
                load_ms: ms(load),
                prefill_ms: ms(t.prefill),
                time_to_first_token_ms: ms(t.first_token),
                decode_ms: ms(t.decode),
                prefill_tokens_per_sec: t.prefill_tokens_per_sec(summary.prompt_tokens),
                decode_tokens_per_sec: t.decode_tokens_per_sec(summary.completion_tokens),
                threads,
                peak_rss_bytes: gantry_worker::measure::resident().map(|(_, peak)| peak),
            },
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!();
        eprintln!(
            "[{} prompt + {} generated tokens; prefill {:.0} tok/s, decode {:.1} tok/s, first token {:.0} ms; {} threads; finish: {:?}]",
            summary.prompt_tokens,
            summary.completion_tokens,
            t.prefill_tokens_per_sec(summary.prompt_tokens),
            t.decode_tokens_per_sec(summary.completion_tokens),
            ms(t.first_token),
            threads,
            summary.finish_reason
        );
    }
    Ok(())
}
