//! The sampler alone, one thread: the time to pick one token from a vocabulary's logits, for
//! greedy decoding and the usual sampled settings, beside the pick as it was before (every
//! token ranked by a comparison sort and weighed by `f64::exp`) and the ranking alone
//! (`--vocab 49152` is SmolLM2's vocabulary, 262144 Gemma 3's). The logits have a model's kind
//! of spread: a few tokens far ahead of a long tail. Reports the median of `--reps` timed
//! picks, in microseconds.
//!
//!     cargo run --release -p gantry-engine --example sampling_bench -- [--vocab 49152] [--reps 200]

#![allow(clippy::unwrap_used)] // a benchmark: any failure is fatal

use std::time::Instant;

use gantry_engine::sampling::{Sampler, SamplingParams, ranked};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.into())
}

/// Logits like a model's: a deterministic xorshift's normal-ish tail, and a few strong tokens.
fn logits(vocab: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..vocab)
        .map(|_| {
            let u: f32 = (0..4).map(|_| next()).sum::<f32>() - 2.0;
            if next() < 0.001 { 12.0 + 6.0 * u } else { 4.0 * u }
        })
        .collect()
}

/// The sampled pick before the vectorised weights and the radix ranking.
fn pick_before(p: &SamplingParams, rng: &mut StdRng, logits: &[f32]) -> u32 {
    let scores = logits.to_vec();
    let mut cand: Vec<(u32, f32)> = scores.iter().enumerate().map(|(i, &s)| (i as u32, s)).collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|(_, s)| f64::from((s - max) / p.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|x| *x /= total);
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|x| {
            acc += x;
            acc >= f64::from(p.top_p)
        });
        probs.truncate(keep.map_or(probs.len(), |i| i + 1));
    }
    let total: f64 = probs.iter().sum();
    let mut r = rng.random::<f64>() * total;
    for (i, x) in probs.iter().enumerate() {
        r -= x;
        if r <= 0.0 {
            return cand[i].0;
        }
    }
    cand[probs.len() - 1].0
}

fn median_us(reps: usize, mut f: impl FnMut(usize)) -> f64 {
    let mut t: Vec<f64> = (0..reps)
        .map(|i| {
            let start = Instant::now();
            f(i);
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let vocab: usize = arg(&args, "--vocab", "49152").parse().unwrap();
    let reps: usize = arg(&args, "--reps", "200").parse().unwrap();
    let inputs: Vec<Vec<f32>> = (0..16).map(|i| logits(vocab, 7 + i)).collect();
    let settings: [(&str, SamplingParams); 4] = [
        ("greedy", SamplingParams::default()),
        ("temperature 0.8", SamplingParams { temperature: 0.8, ..SamplingParams::default() }),
        ("temperature 0.8, top_p 0.95", SamplingParams { temperature: 0.8, top_p: 0.95, ..SamplingParams::default() }),
        ("temperature 0.8, top_k 40", SamplingParams { temperature: 0.8, top_k: 40, ..SamplingParams::default() }),
    ];
    println!("vocabulary {vocab}, median of {reps} picks, one thread");
    println!("| setting | µs a token |");
    println!("|---|---|");
    for (name, params) in settings {
        let mut s = Sampler::new(SamplingParams { seed: Some(1), ..params }).unwrap();
        let us = median_us(reps, |i| {
            std::hint::black_box(s.sample(&inputs[i % inputs.len()], &[]).unwrap());
        });
        println!("| {name} | {us:.1} |");
    }
    // The pick as it was before (2026-12-07): every token sorted by comparisons, weighed by
    // `f64::exp`, summed in one chain.
    for (name, params) in [
        ("temperature 0.8, as before", SamplingParams { temperature: 0.8, ..SamplingParams::default() }),
        (
            "temperature 0.8, top_p 0.95, as before",
            SamplingParams { temperature: 0.8, top_p: 0.95, ..SamplingParams::default() },
        ),
    ] {
        let mut rng = StdRng::seed_from_u64(1);
        let us = median_us(reps, |i| {
            std::hint::black_box(pick_before(&params, &mut rng, &inputs[i % inputs.len()]));
        });
        println!("| {name} | {us:.1} |");
    }
    let rank = median_us(reps, |i| {
        std::hint::black_box(ranked(&inputs[i % inputs.len()], 0));
    });
    let sorted = median_us(reps, |i| {
        let mut cand: Vec<(u32, f32)> =
            inputs[i % inputs.len()].iter().enumerate().map(|(i, &s)| (i as u32, s)).collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        std::hint::black_box(cand);
    });
    println!("| ranking the whole vocabulary (radix) | {rank:.1} |");
    println!("| ranking it by a comparison sort (before) | {sorted:.1} |");
}
