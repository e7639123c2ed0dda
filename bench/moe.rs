//! A mixture of experts against a dense model of the same active size, in the engine alone.
//!
//! Two models with random weights are written to a temporary folder: a Mixtral-shaped MoE
//! (hidden 1024, 8 layers, 16 heads over 4 KV heads, 8 experts of 1024, 2 per token) and a
//! Mistral-shaped dense model with the same attention and an MLP of 2048 — the width of the two
//! experts a token uses, so both compute the same per token. For each it measures prefill
//! (one 128-token prompt), decode of one stream (64 steps after the prompt) and of 8 streams
//! batched, on the CPU runtime and on Candle (the GPU path, here on the CPU); for the MoE also
//! on Candle with its experts in host memory ([`Backend::ExpertsOnHost`]). It reports the bytes
//! of weights each way keeps on the device and in host memory, and the estimate's split.
//!
//!   cargo run --release -p gantry-engine --example moe_bench -- [--threads N] [--json FILE]

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use gantry_engine::cpu::pool;
use gantry_engine::files::ModelFiles;
use gantry_engine::model::{Backend, BatchInput, BatchStep, LogitsFor, ModelPart, StageInput};

const HIDDEN: usize = 1024;
const LAYERS: usize = 8;
const HEADS: usize = 16;
const KV_HEADS: usize = 4;
const EXPERTS: usize = 8;
const EXPERT: usize = 1024;
const TOP_K: usize = 2;
const VOCAB: usize = 8192;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut threads = pool::default_threads();
    let mut json = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--threads" => threads = args.get(i + 1).ok_or("--threads N")?.parse()?,
            "--json" => json = Some(args.get(i + 1).ok_or("--json FILE")?.clone()),
            other => return Err(format!("unknown argument {other}").into()),
        }
        i += 2;
    }
    pool::set_global_threads(threads);
    let dir = tempfile::tempdir()?;
    let moe = dir.path().join("moe");
    let dense = dir.path().join("dense");
    write_model(&moe, true)?;
    write_model(&dense, false)?;

    println!(
        "MoE: {EXPERTS} experts of {EXPERT}, {TOP_K} per token; dense: MLP {}; hidden {HIDDEN}, {LAYERS} layers, {threads} threads",
        TOP_K * EXPERT
    );
    println!(
        "| model | runtime | weights on device | in host memory | prefill tok/s | decode tok/s (1) | decode tok/s (8) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    let runs: [(&str, &Path, &str, Backend); 5] = [
        ("dense", &dense, "cpu runtime", Backend::Cpu),
        ("moe", &moe, "cpu runtime", Backend::Cpu),
        ("dense", &dense, "candle", Backend::Candle(Device::Cpu)),
        ("moe", &moe, "candle", Backend::Candle(Device::Cpu)),
        ("moe", &moe, "candle, experts on host", Backend::ExpertsOnHost(Device::Cpu)),
    ];
    for (name, path, runtime, backend) in runs {
        let files = ModelFiles::open(path)?;
        let mut stats = gantry_engine::weights::LoadStats::default();
        let model = ModelPart::load(&files.source, files.config.clone(), 0..LAYERS, &backend, &mut stats, &mut |_| {})?;
        let host = model.experts_on_host_bytes() as u64;
        let device = stats.bytes - host;
        let (prefill, one) = single_stream(&model)?;
        let eight = if matches!(backend, Backend::Cpu) { batched(&model, 8)? } else { f64::NAN };
        println!(
            "| {name} | {runtime} | {} | {} | {prefill:.1} | {one:.1} | {} |",
            mib(device),
            mib(host),
            if eight.is_nan() { "-".into() } else { format!("{eight:.1}") }
        );
        rows.push(serde_json::json!({
            "model": name, "runtime": runtime, "device_weight_bytes": device, "host_weight_bytes": host,
            "prefill_tok_s": prefill, "decode_tok_s_1": one,
            "decode_tok_s_8": if eight.is_nan() { serde_json::Value::Null } else { eight.into() },
        }));
    }
    let spec = ModelFiles::open(&moe)?.spec;
    let options = gantry_core::ServeOptions { context: Some(4096), ..Default::default() };
    let whole = gantry_core::estimate_vram(&spec, &options)?;
    let host = gantry_core::shard::experts_on_host(&spec, &options)?.ok_or("the MoE has experts")?;
    println!(
        "estimate at 4K context on a GPU: {} whole; {} on the GPU with {} of experts in host memory",
        mib(whole.total_bytes),
        mib(host.stage.total_bytes),
        mib(host.host_bytes)
    );
    if let Some(path) = json {
        let out = serde_json::json!({
            "bench": "moe", "threads": threads,
            "shape": {"hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS, "experts": EXPERTS,
                      "expert_size": EXPERT, "top_k": TOP_K, "dense_mlp": TOP_K * EXPERT, "vocab": VOCAB},
            "runs": rows,
            "estimate_4k": {"whole_bytes": whole.total_bytes, "gpu_bytes_with_experts_on_host": host.stage.total_bytes,
                            "host_bytes": host.host_bytes},
        });
        std::fs::write(&path, serde_json::to_string_pretty(&out)?)?;
        println!("wrote {path}");
    }
    Ok(())
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn prompt(seed: u32) -> Vec<u32> {
    (0..128u32).map(|t| (t * 7919 + seed * 104_729 + 3) % VOCAB as u32).collect()
}

/// Prefill tokens/s of one 128-token prompt, then decode tokens/s over 64 steps.
fn single_stream(model: &ModelPart) -> Result<(f64, f64)> {
    let mut cache = model.new_cache();
    let p = prompt(0);
    let t = Instant::now();
    model.forward(StageInput::Tokens(&p), &mut cache, LogitsFor::Last)?;
    let prefill = p.len() as f64 / t.elapsed().as_secs_f64();
    let steps = 64;
    let t = Instant::now();
    for s in 0..steps {
        model.forward(StageInput::Tokens(&[(s * 31 + 5) % VOCAB as u32]), &mut cache, LogitsFor::Last)?;
    }
    Ok((prefill, steps as f64 / t.elapsed().as_secs_f64()))
}

/// Decode tokens/s of `n` streams stepped together.
fn batched(model: &ModelPart, n: usize) -> Result<f64> {
    let mut caches: Vec<_> = (0..n).map(|_| model.new_cache()).collect();
    let prompts: Vec<Vec<u32>> = (0..n as u32).map(prompt).collect();
    {
        let mut batch: Vec<BatchStep<'_>> = caches
            .iter_mut()
            .zip(&prompts)
            .map(|(c, p)| BatchStep { cache: c, input: BatchInput::Tokens(p), logits_for: LogitsFor::Last })
            .collect();
        model.forward_batch(&mut batch)?;
    }
    let steps = 32;
    let t = Instant::now();
    for s in 0..steps {
        let tokens: Vec<[u32; 1]> = (0..n as u32).map(|k| [(s * 31 + k * 17 + 5) % VOCAB as u32]).collect();
        let mut batch: Vec<BatchStep<'_>> = caches
            .iter_mut()
            .zip(&tokens)
            .map(|(c, t)| BatchStep { cache: c, input: BatchInput::Tokens(t), logits_for: LogitsFor::Last })
            .collect();
        model.forward_batch(&mut batch)?;
    }
    Ok((steps as usize * n) as f64 / t.elapsed().as_secs_f64())
}

/// Writes a random-weight model folder: Mixtral-shaped (`moe`) or Mistral-shaped.
fn write_model(dir: &Path, moe: bool) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut config = serde_json::json!({
        "architectures": [if moe { "MixtralForCausalLM" } else { "MistralForCausalLM" }],
        "model_type": if moe { "mixtral" } else { "mistral" },
        "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": false, "sliding_window": null,
        "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
        "intermediate_size": if moe { EXPERT } else { TOP_K * EXPERT },
    });
    if moe {
        config["num_local_experts"] = EXPERTS.into();
        config["num_experts_per_tok"] = TOP_K.into();
    }
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    // The fixtures' tokenizer: the benchmark feeds token ids, but a model folder has one.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/engine/mixtral");
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(f), dir.join(f))?;
    }
    let dev = Device::Cpu;
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut seed = 0u64;
    let mut rand = |shape: &[usize]| -> Result<Tensor> {
        seed += 1;
        // A cheap deterministic generator: values in ±0.05, a different stream per tensor.
        let n: usize = shape.iter().product();
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, &dev)?)
    };
    let d = HIDDEN / HEADS;
    t.insert("model.embed_tokens.weight".into(), rand(&[VOCAB, HIDDEN])?);
    t.insert("lm_head.weight".into(), rand(&[VOCAB, HIDDEN])?);
    t.insert("model.norm.weight".into(), Tensor::ones(HIDDEN, DType::F32, &dev)?);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        t.insert(format!("{p}.input_layernorm.weight"), Tensor::ones(HIDDEN, DType::F32, &dev)?);
        t.insert(format!("{p}.post_attention_layernorm.weight"), Tensor::ones(HIDDEN, DType::F32, &dev)?);
        t.insert(format!("{p}.self_attn.q_proj.weight"), rand(&[HEADS * d, HIDDEN])?);
        t.insert(format!("{p}.self_attn.k_proj.weight"), rand(&[KV_HEADS * d, HIDDEN])?);
        t.insert(format!("{p}.self_attn.v_proj.weight"), rand(&[KV_HEADS * d, HIDDEN])?);
        t.insert(format!("{p}.self_attn.o_proj.weight"), rand(&[HIDDEN, HEADS * d])?);
        if moe {
            t.insert(format!("{p}.block_sparse_moe.gate.weight"), rand(&[EXPERTS, HIDDEN])?);
            for e in 0..EXPERTS {
                let q = format!("{p}.block_sparse_moe.experts.{e}");
                t.insert(format!("{q}.w1.weight"), rand(&[EXPERT, HIDDEN])?);
                t.insert(format!("{q}.w3.weight"), rand(&[EXPERT, HIDDEN])?);
                t.insert(format!("{q}.w2.weight"), rand(&[HIDDEN, EXPERT])?);
            }
        } else {
            t.insert(format!("{p}.mlp.gate_proj.weight"), rand(&[TOP_K * EXPERT, HIDDEN])?);
            t.insert(format!("{p}.mlp.up_proj.weight"), rand(&[TOP_K * EXPERT, HIDDEN])?);
            t.insert(format!("{p}.mlp.down_proj.weight"), rand(&[HIDDEN, TOP_K * EXPERT])?);
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    Ok(())
}
