//! The controller's prefix index alone (`controller/src/router/prefix.rs`): how long one lookup
//! of a prompt's block keys takes with many replicas in the index, and how long applying a
//! heartbeat's key changes takes. Replicas serve 8 tenants, each with its own system prompt of
//! `--blocks` blocks; every replica holds the prompts of 2 tenants and `--keys` other keys.
//! Reports p50/p99/max per lookup (a prompt of one tenant, half of them unseen) and per
//! heartbeat of `--changes` keys.
//!
//!     cargo run --release -p gantry-controller --example prefix_index_bench -- --replicas 1000 --keys 2000 --blocks 64

#![allow(clippy::unwrap_used)] // a benchmark: any failure is fatal

use std::time::Instant;

use gantry_controller::router::prefix::PrefixIndex;
use gantry_core::prefix::{block_keys, model_seed};
use gantry_proto::v1 as pb;

fn arg(args: &[String], name: &str, default: &str) -> usize {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map_or(default, |s| s.as_str()).parse().unwrap()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p / 100.0).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let replicas = arg(&args, "--replicas", "1000");
    let keys = arg(&args, "--keys", "2000");
    let blocks = arg(&args, "--blocks", "64");
    let changes = arg(&args, "--changes", "1000");
    let seed = model_seed("m");
    // Tenant t's system prompt: `blocks` full blocks of its own tokens.
    let tenants: Vec<Vec<u64>> = (0..8u32)
        .map(|t| block_keys(seed, &(0..16 * blocks as u32).map(|i| t * 1_000_000 + i).collect::<Vec<_>>(), 16))
        .collect();
    let mut ix = PrefixIndex::default();
    let mut next = 1u64 << 40;
    let started = Instant::now();
    for r in 0..replicas {
        let mut added: Vec<u64> = tenants[r % 8].iter().chain(&tenants[(r + 3) % 8]).copied().collect();
        added.extend((0..keys as u64).map(|k| next + k));
        next += keys as u64;
        ix.apply(&format!("w{r}"), "m-0", &pb::PrefixKeyChanges { reset: true, added, dropped: vec![] });
    }
    println!(
        "{replicas} replicas, {} keys in the index, filled in {:.2} s",
        ix.entries(),
        started.elapsed().as_secs_f64()
    );
    let mut lookups = Vec::new();
    for i in 0..2000 {
        let prompt = &tenants[i % 8][..blocks - (i % 2) * blocks / 2];
        let t = Instant::now();
        let found = ix.cached_prefixes(prompt);
        lookups.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(!found.is_empty());
    }
    lookups.sort_by(f64::total_cmp);
    println!(
        "lookup of a {blocks}-block prompt: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        pct(&lookups, 50.0),
        pct(&lookups, 99.0),
        lookups[lookups.len() - 1]
    );
    let mut beats = Vec::new();
    for i in 0..500 {
        let w = format!("w{}", i % replicas);
        let added: Vec<u64> = (0..changes as u64 / 2).map(|k| next + k).collect();
        next += added.len() as u64;
        let dropped: Vec<u64> = (0..changes as u64 / 2).map(|k| (1u64 << 40) + (i as u64 * 7919 + k) % next).collect();
        let c = pb::PrefixKeyChanges { reset: false, added, dropped };
        let t = Instant::now();
        ix.apply(&w, "m-0", &c);
        beats.push(t.elapsed().as_secs_f64() * 1e6);
    }
    beats.sort_by(f64::total_cmp);
    println!(
        "a heartbeat of {changes} key changes: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        pct(&beats, 50.0),
        pct(&beats, 99.0),
        beats[beats.len() - 1]
    );
}
