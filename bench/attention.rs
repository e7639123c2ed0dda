//! The CPU runtime's attention alone, one thread, on one layer of a real model's shape (SmolLM2:
//! 3 kv heads of 64 values, 3 query heads each; `--heads KV,REP,DIM` for another): a prompt's
//! rows (`attend_rows`, tiles of `ATTN_TILE` rows over `--prompt` positions, as a prefill or a
//! failover resume runs them) and decoding (`attend`, `--seqs` sequences of `--context`
//! positions each, one row apiece, as a batched decode step). Keys and values are random f16.
//! Reports the fastest of `--reps` runs: milliseconds per layer and the multiply-adds per
//! second of the two products.
//!
//!     cargo run --release -p gantry-engine --example attn_bench -- [--prompt 1128] [--seqs 16] [--context 256] [--reps 5]

#![allow(clippy::unwrap_used)] // a benchmark: any failure is fatal
#![allow(unsafe_code)] // writes keys and values into its own blocks (KvPool::write)

use std::time::Instant;

use gantry_engine::cpu::kv::{BLOCK_TOKENS, KvDtype, KvPool, KvShape};
use gantry_engine::cpu::ops::{ATTN_TILE, AttnParams, attend, attend_rows};

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.into())
}

/// A deterministic xorshift's values in −1..1.
fn noise(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// A sequence of `n` positions in `pool`: its block table, every key and value written.
fn fill(pool: &KvPool, n: usize, seed: u64) -> Vec<u32> {
    let shape = pool.shape();
    let table: Vec<u32> = (0..n.div_ceil(BLOCK_TOKENS)).map(|_| pool.alloc(0).unwrap()).collect();
    let mut r = noise(seed);
    for j in 0..n {
        for h in 0..shape.kv_heads {
            for v in [false, true] {
                let x: Vec<f32> = (0..shape.head_dim).map(|_| r()).collect();
                // SAFETY: the blocks are this benchmark's alone, written before any read.
                unsafe { pool.write(0, v, table[j / BLOCK_TOKENS], h, j % BLOCK_TOKENS, &x) };
            }
        }
    }
    table
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let prompt: usize = arg(&args, "--prompt", "1128").parse().unwrap();
    let seqs: usize = arg(&args, "--seqs", "16").parse().unwrap();
    let context: usize = arg(&args, "--context", "256").parse().unwrap();
    let reps: usize = arg(&args, "--reps", "5").parse().unwrap();
    let heads: Vec<usize> = arg(&args, "--heads", "3,3,64").split(',').map(|x| x.parse().unwrap()).collect();
    let (kvh, rep, d) = (heads[0], heads[1], heads[2]);
    let shape = KvShape { layers: 1, kv_heads: kvh, head_dim: d, dtype: KvDtype::F16 };
    let blocks = prompt.div_ceil(BLOCK_TOKENS) + seqs * context.div_ceil(BLOCK_TOKENS);
    let pool = KvPool::new(shape, blocks);
    let p = AttnParams { head_dim: d, scale: 1.0 / (d as f32).sqrt(), softcap: None, window: None, sinks: None };
    let mut r = noise(7);
    let mut scores = Vec::new();
    // The fastest run: on a shared machine the others measure the neighbours too.
    let best = |t: Vec<f64>| t.into_iter().fold(f64::INFINITY, f64::min);

    // A prompt's rows: every tile of every kv head, as the forward pass's attention operation.
    let table = fill(&pool, prompt, 1);
    let qs: Vec<f32> = (0..ATTN_TILE * rep * d).map(|_| r()).collect();
    let mut out = vec![0f32; ATTN_TILE * rep * d];
    let times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            for g in 0..kvh {
                let mut pos = 0;
                while pos < prompt {
                    let m = (prompt - pos).min(ATTN_TILE);
                    let n = m * rep * d;
                    attend_rows(&pool, 0, &table, g, pos, m, &qs[..n], &p, &mut scores, &mut out[..n]);
                    pos += m;
                }
            }
            t.elapsed().as_secs_f64()
        })
        .collect();
    let t = best(times);
    // Each row's heads against every position up to its own: keys, then values.
    let macs = 2.0 * (prompt * (prompt + 1) / 2 * kvh * rep * d) as f64;
    println!(
        "prompt of {prompt} rows ({kvh} kv heads × {rep} query heads × {d}): {:.2} ms a layer, {:.1} GMAC/s",
        t * 1e3,
        macs / t / 1e9
    );

    // Decoding: one row for each of `seqs` sequences of `context` positions.
    let tables: Vec<Vec<u32>> = (0..seqs).map(|s| fill(&pool, context, 100 + s as u64)).collect();
    let q: Vec<f32> = (0..rep * d).map(|_| r()).collect();
    let mut out = vec![0f32; rep * d];
    let times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            for table in &tables {
                for g in 0..kvh {
                    attend(&pool, 0, table, g, context - 1, &q, &p, &mut scores, &mut out);
                }
            }
            t.elapsed().as_secs_f64()
        })
        .collect();
    let t = best(times);
    let macs = 2.0 * (seqs * context * kvh * rep * d) as f64;
    println!(
        "decoding {seqs} sequences of {context} positions: {:.3} ms a layer, {:.1} GMAC/s",
        t * 1e3,
        macs / t / 1e9
    );
}
