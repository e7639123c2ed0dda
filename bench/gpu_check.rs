//! The GPU path against the CPU runtime, for a lent GPU machine (`scripts/gpu-check.sh` runs
//! it; here it dry-runs with Candle on the CPU). For each model:
//! - logits of a fixed text (about 50 tokens) at every position on the device against the CPU
//!   runtime: the largest difference, and at how many positions the top token agrees;
//! - 32 greedy tokens on both: how many are equal before the first difference;
//! - prefill tokens/s of a 512-token prompt in one pass and decode tokens/s of 128 tokens
//!   (best of 3, after one warm-up), and decode tokens/s of 16 sequences stepped together
//!   (`forward_batch`: one pass a step, the paged KV store on the device), against one;
//! - memory: the GPU's used memory (`nvidia-smi`) before and after loading, against the
//!   estimate's terms (weights, KV cache, activations, overhead) for the same context.
//!
//! Devices: `cuda:N`; `cuda:0,cuda:1` (or more) for a tensor-parallel group; `candle-cpu` (or
//! `candle-cpu×N` for N ranks) for the dry run. Prints one JSON object.
//!
//!   cargo run --release -p gantry-engine --example gpu_check -- --device candle-cpu models/SmolLM2-135M-Instruct.Q4_1.gguf
//!   cargo run --release -p gantry-engine --features cuda --example gpu_check -- --device cuda:0 MODEL…

use std::time::Instant;

use candle_core::Device;
use gantry_core::vram::{ServeOptions, estimate_vram};
use gantry_engine::files::ModelFiles;
use gantry_engine::generate::{Session, generate};
use gantry_engine::model::{Backend, BatchInput, BatchStep, LogitsFor, ModelPart, StageInput, StageOutput};
use gantry_engine::sampling::SamplingParams;
use serde_json::{Value, json};

/// The text whose logits are compared, position by position.
const TEXT: &str = "The history of the bicycle begins in the early nineteenth century, when inventors in \
Germany and France built wooden machines that riders pushed along with their feet. Pedals came later, \
and with them the familiar shape of the modern bicycle, which spread across the world.";

/// The context the memory check sizes the KV cache for (the engine's Candle caches grow with use).
const CONTEXT: u64 = 4096;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut device = "candle-cpu".to_string();
    let mut models = Vec::new();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--device" => {
                device = args.get(i + 1).ok_or("--device DEVICE")?.clone();
                i += 2;
            }
            other => {
                models.push(other.to_string());
                i += 1;
            }
        }
    }
    if models.is_empty() {
        return Err("usage: gpu_check [--device cuda:0|cuda:0,cuda:1|candle-cpu|candle-cpu×2] MODEL…".into());
    }
    let backend = backend(&device)?;
    let mut results = Vec::new();
    for path in &models {
        results.push(check(path, &device, &backend)?);
    }
    println!("{}", serde_json::to_string_pretty(&json!({ "device": device, "models": results }))?);
    Ok(())
}

fn backend(device: &str) -> Result<Backend, Box<dyn std::error::Error>> {
    if let Some(n) = device.strip_prefix("candle-cpu×").or_else(|| device.strip_prefix("candle-cpux")) {
        return Ok(Backend::TensorParallel(vec![Device::Cpu; n.parse()?]));
    }
    if device == "candle-cpu" {
        return Ok(Backend::Candle(Device::Cpu));
    }
    let devices: Vec<Device> = device.split(',').map(gantry_engine::device).collect::<Result<_, _>>()?;
    Ok(match devices.len() {
        1 => Backend::Candle(devices.into_iter().next().ok_or("no device")?),
        _ => Backend::TensorParallel(devices),
    })
}

/// The GPU memory in use now (MiB summed over every GPU `nvidia-smi` lists), if it can say.
fn gpu_used_mib() -> Option<u64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.used", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.lines().map(|l| l.trim().parse::<u64>().ok()).sum()
}

fn logits(model: &ModelPart, ids: &[u32], which: LogitsFor) -> Result<Vec<Vec<f32>>, Box<dyn std::error::Error>> {
    let mut cache = model.new_cache();
    let StageOutput::Logits(l) = model.forward(StageInput::Tokens(ids), &mut cache, which)? else {
        return Err("the model returned hidden states".into());
    };
    Ok(l.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?)
}

/// One step of every sequence together (`ModelPart::forward_batch`).
fn step_all(
    model: &ModelPart,
    caches: &mut [gantry_engine::model::PartCache],
    inputs: &[Vec<u32>],
) -> Result<(), Box<dyn std::error::Error>> {
    let mut steps: Vec<BatchStep<'_>> = caches
        .iter_mut()
        .zip(inputs)
        .map(|(cache, ids)| BatchStep { cache, input: BatchInput::Tokens(ids), logits_for: LogitsFor::Last })
        .collect();
    model.forward_batch(&mut steps)?;
    Ok(())
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0
}

/// Best tokens/s of 3 runs of `run` (which processes `tokens` tokens), after one warm-up.
fn best_rate(
    tokens: usize,
    mut run: impl FnMut() -> Result<(), Box<dyn std::error::Error>>,
) -> Result<f64, Box<dyn std::error::Error>> {
    run()?;
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        run()?;
        best = best.max(tokens as f64 / t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn check(path: &str, device: &str, backend: &Backend) -> Result<Value, Box<dyn std::error::Error>> {
    let files = ModelFiles::open(std::path::Path::new(path))?;
    let n = files.config.num_layers;
    let vocab = files.config.vocab_size as u32;
    let tok = files.tokenizer()?;
    let reference = files.load_part_on(0..n, &Backend::Cpu, &mut |_| {})?;
    let before = gpu_used_mib();
    let started = Instant::now();
    let model = files.load_part_on(0..n, backend, &mut |_| {})?;
    let load_s = started.elapsed().as_secs_f64();
    let after = gpu_used_mib();

    // Logits at every position of a fixed text (random ids would reach tokens no text uses,
    // whose activations say little about the path).
    let prompt = tok.encode(TEXT, true, false)?;
    let (want, got) = (logits(&reference, &prompt, LogitsFor::All)?, logits(&model, &prompt, LogitsFor::All)?);
    let mut max_diff = 0f32;
    let mut top1 = 0;
    for (w, g) in want.iter().zip(&got) {
        max_diff = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(max_diff, f32::max);
        top1 += usize::from(argmax(w) == argmax(g));
    }

    // Greedy tokens.
    let text = tok.encode("The three primary colours are", true, false)?;
    let params = SamplingParams { max_tokens: 32, ..SamplingParams::default() };
    let greedy = |m: &ModelPart| -> Result<Vec<u32>, Box<dyn std::error::Error>> {
        let mut s = Session::new(m);
        Ok(generate(&mut s, &tok, &text, &params, &[], &mut |_| std::ops::ControlFlow::Continue(()))?.tokens)
    };
    let (g_want, g_got) = (greedy(&reference)?, greedy(&model)?);
    let same = g_want.iter().zip(&g_got).take_while(|(a, b)| a == b).count();

    // Speed: one 512-token prefill; 128 decode steps after a 16-token prompt.
    let long: Vec<u32> = (0..512u32).map(|t| (t * 104_729 + 7) % vocab).collect();
    let prefill = best_rate(long.len(), || logits(&model, &long, LogitsFor::Last).map(|_| ()))?;
    let decode = best_rate(128, || {
        let mut cache = model.new_cache();
        model.forward(StageInput::Tokens(&long[..16]), &mut cache, LogitsFor::Last)?;
        for t in 0..128u32 {
            model.forward(StageInput::Tokens(&[(t * 31 + 5) % vocab]), &mut cache, LogitsFor::Last)?;
        }
        Ok(())
    })?;

    // Batching on the device: 16 sequences (16-token prompts) decoding together, one pass a step.
    let batched = best_rate(16 * 64, || {
        let mut caches: Vec<_> = (0..16).map(|_| model.new_cache()).collect();
        let prompts: Vec<Vec<u32>> =
            (0..16u32).map(|s| (0..16u32).map(|t| (t * 7_919 + s * 104_729 + 3) % vocab).collect()).collect();
        step_all(&model, &mut caches, &prompts)?;
        for t in 0..64u32 {
            let next: Vec<Vec<u32>> = (0..16u32).map(|s| vec![(t * 31 + s * 17 + 5) % vocab]).collect();
            step_all(&model, &mut caches, &next)?;
        }
        Ok(())
    })?;

    let options = ServeOptions { context: Some(CONTEXT.min(files.spec.context.length)), ..ServeOptions::default() };
    let est = estimate_vram(&files.spec, &options)?;
    let measured = match (before, after) {
        (Some(b), Some(a)) => json!(a.saturating_sub(b)),
        _ => Value::Null,
    };
    Ok(json!({
        "model": path,
        "device": device,
        "load_s": load_s,
        "logits_vs_cpu_runtime": { "positions": prompt.len(), "max_abs_diff": max_diff, "top1_agree": top1 },
        "greedy": { "tokens": g_want.len(), "equal_before_first_difference": same, "cpu": g_want, "device": g_got },
        "prefill_tokens_per_s": prefill,
        "decode_tokens_per_s": decode,
        "decode_16_sequences_tokens_per_s": batched,
        "decode_16_over_1": batched / decode,
        "memory": {
            "gpu_used_mib_before": before,
            "gpu_used_mib_after_load": after,
            "measured_load_mib": measured,
            "note": "measured right after loading: weights and runtime (CUDA context, cuBLAS); the KV cache grows with use",
            "estimate_mib": {
                "context": options.context,
                "weights": est.weights_bytes >> 20,
                "kv_cache": est.kv_cache_bytes >> 20,
                "activations": est.activation_bytes >> 20,
                "overhead": est.overhead_bytes >> 20,
                "total": est.total_bytes >> 20,
            },
        },
    }))
}
