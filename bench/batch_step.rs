//! The engine alone, no server: how the time of one decoding step grows with the number of
//! sequences in it. For each batch size it prefills that many distinct 128-token prompts, then
//! times --steps steps of one token for every sequence together (ModelPart::forward_batch),
//! and prints tokens/s in all and per step, against one sequence alone.
//!
//!   cargo run --release -p gantry-engine --example batch_bench -- models/SmolLM2-135M-Instruct.Q4_1.gguf
//!   cargo run --release -p gantry-engine --example batch_bench -- models/gemma-3-270m-q4_k_m.gguf --threads 2 --sizes 1 4 16 32

use std::time::Instant;

use gantry_engine::cpu::pool;
use gantry_engine::files::ModelFiles;
use gantry_engine::model::{Backend, BatchInput, BatchStep, LogitsFor, StageOutput};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().ok_or("usage: batch_bench MODEL.gguf [--threads N] [--steps N] [--sizes N…]")?;
    let mut threads = pool::default_threads();
    let mut steps = 16;
    let mut sizes = vec![1, 2, 4, 8, 16, 32];
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--threads" => threads = args.get(i + 1).ok_or("--threads N")?.parse()?,
            "--steps" => steps = args.get(i + 1).ok_or("--steps N")?.parse()?,
            "--sizes" => {
                sizes = args[i + 1..].iter().map_while(|a| a.parse().ok()).collect();
                i += sizes.len();
                i += 1;
                continue;
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
        i += 2;
    }
    pool::set_global_threads(threads);
    let files = ModelFiles::open(std::path::Path::new(path))?;
    let model = files.load_part_on(0..files.config.num_layers, &Backend::Cpu, &mut |_| {})?;
    let vocab = model.config.vocab_size as u32;
    println!("{path}, {threads} threads, {steps} steps per size");
    println!("| sequences | ms per step | tokens/s | × one sequence |");
    println!("|---|---|---|---|");
    let mut one = None;
    for &n in &sizes {
        let mut caches: Vec<_> = (0..n).map(|_| model.new_cache()).collect();
        let prompts: Vec<Vec<u32>> =
            (0..n).map(|s| (0..128u32).map(|t| (t * 7919 + s as u32 * 104_729 + 1) % vocab).collect()).collect();
        {
            let mut batch: Vec<BatchStep<'_>> = caches
                .iter_mut()
                .zip(&prompts)
                .map(|(c, p)| BatchStep { cache: c, input: BatchInput::Tokens(p), logits_for: LogitsFor::Last })
                .collect();
            model.forward_batch(&mut batch)?;
        }
        let mut next: Vec<u32> = vec![1; n];
        let started = Instant::now();
        for _ in 0..steps {
            let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let mut batch: Vec<BatchStep<'_>> = caches
                .iter_mut()
                .zip(&tokens)
                .map(|(c, t)| BatchStep { cache: c, input: BatchInput::Tokens(t), logits_for: LogitsFor::Last })
                .collect();
            let outs = model.forward_batch(&mut batch)?;
            for (o, nx) in outs.into_iter().zip(next.iter_mut()) {
                let StageOutput::Logits(l) = o else { return Err("no logits".into()) };
                let l: Vec<f32> = l.flatten_all()?.to_vec1()?;
                *nx = l.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32;
            }
        }
        let per_step = started.elapsed().as_secs_f64() / steps as f64;
        let tps = n as f64 / per_step;
        let base = *one.get_or_insert(tps);
        println!("| {n} | {:.1} | {tps:.1} | {:.2} |", per_step * 1000.0, tps / base);
    }
    Ok(())
}
