//! The controller's prefix index alone (`controller/src/router/prefix.rs`): how long one lookup
//! of a prompt's block keys takes with many replicas in the index, and how long applying a
//! heartbeat's key changes takes. Replicas serve 8 tenants, each with its own system prompt of
//! `--blocks` blocks; every replica holds the prompts of 2 tenants and `--keys` other keys.
//! Reports p50/p99/max per lookup (a prompt of one tenant, half of them unseen) and per
//! heartbeat of `--changes` keys.
//!
//! Then a whole routing decision as the router makes it for a request, on a real `Cluster`
//! (embedded store in a temporary folder) with `--replicas` workers each serving one ready
//! replica — all of one deployment, then of deployments of 10 replicas each — their keys
//! reported by heartbeats as above: choosing the replica
//! to ask for the token ids (`Cluster::tokenizer_for`), hashing a prompt of `16 × --blocks`
//! tokens into its block keys, and choosing the replica (`Cluster::choose`: every ready
//! replica's cached prefix, queue and KV pressure, the best holder). The `Worker/Tokenize`
//! call itself is not in it (`gantry_routing_tokenize_seconds` measures it in a real cluster;
//! bench/prefix_routing.py reports it).
//!
//!     cargo run --release -p gantry-controller --example prefix_index_bench -- --replicas 1000 --keys 2000 --blocks 64
//!
//! With `--fill-replicas N --fill-keys K` it first fills an index to that envelope (N replicas
//! each reporting K distinct keys, in heartbeats of 10,000), and reports the fill time, the
//! tables' bytes, the process's resident set, a replica's run lookup for a 64-block prompt
//! across 1,000 of the replicas, and a heartbeat of 1,000 changes on a full replica:
//!
//!     cargo run --release -p gantry-controller --example prefix_index_bench -- --fill-replicas 10000 --fill-keys 100000

#![allow(clippy::unwrap_used)] // a benchmark: any failure is fatal

use std::sync::Arc;
use std::time::Instant;

use gantry_controller::router::pick::PrefixHint;
use gantry_controller::router::prefix::PrefixIndex;
use gantry_controller::spec::DeploymentSpec;
use gantry_controller::statestore::embedded::EmbeddedStore;
use gantry_controller::{Cluster, ControllerConfig};
use gantry_core::prefix::{block_keys, model_seed};
use gantry_proto::v1 as pb;

fn arg(args: &[String], name: &str, default: &str) -> usize {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map_or(default, |s| s.as_str()).parse().unwrap()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p / 100.0).round() as usize]
}

/// Sorts microsecond timings and says `p50 …, p99 …, max …` of them.
fn percentiles(times: &mut [f64]) -> String {
    times.sort_by(f64::total_cmp);
    format!("p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs", pct(times, 50.0), pct(times, 99.0), times[times.len() - 1])
}

/// The process's resident set, in MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// A distinct, well-spread key for `(replica, k)`.
fn spread(replica: u64, k: u64) -> u64 {
    let x = (replica << 32 | k).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 29)
}

/// Fills an index to `replicas` × `keys` and times what the router asks of it there.
fn envelope(replicas: usize, keys: usize) {
    let before = rss_mib();
    let mut ix = PrefixIndex::default();
    let started = Instant::now();
    for r in 0..replicas as u64 {
        let w = format!("w{r}");
        for chunk in (0..keys as u64).collect::<Vec<_>>().chunks(10_000) {
            let added = chunk.iter().map(|&k| spread(r, k)).collect();
            ix.apply(&w, "m/0", &pb::PrefixKeyChanges { reset: false, added, dropped: vec![] });
        }
    }
    println!(
        "an index of {replicas} replicas x {keys} keys: {} keys held ({} forgotten) in {:.1} s; tables {:.1} MiB; resident set {:.0} MiB more",
        ix.entries(),
        ix.forgotten(),
        started.elapsed().as_secs_f64(),
        ix.table_bytes() as f64 / (1 << 20) as f64,
        rss_mib() - before
    );
    // A 64-block prompt the first 64 keys of replica 0 make up, looked up in 1,000 replicas
    // (one of which holds it): what `held_runs` does for a deployment of 1,000.
    let prompt: Vec<u64> = (0..64).map(|k| spread(0, k)).collect();
    let names: Vec<String> = (0..1000.min(replicas)).map(|r| format!("w{r}")).collect();
    let mut times = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let runs: usize = names.iter().map(|w| ix.held_run(w, "m/0", &prompt)).sum();
        times.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(runs >= 64);
    }
    println!("runs of a 64-block prompt in 1,000 of them: {}", percentiles(&mut times));
    let mut beats = Vec::new();
    for i in 0..500u64 {
        let r = i % replicas as u64;
        let added: Vec<u64> = (0..500).map(|k| spread(r, keys as u64 + i * 500 + k)).collect();
        let dropped: Vec<u64> = (0..500).map(|k| spread(r, i * 500 + k)).collect();
        let t = Instant::now();
        ix.apply(&format!("w{r}"), "m/0", &pb::PrefixKeyChanges { reset: false, added, dropped });
        beats.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!("a heartbeat of 1,000 changes on a full replica: {}", percentiles(&mut beats));
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let fill = arg(&args, "--fill-replicas", "0");
    if fill > 0 {
        envelope(fill, arg(&args, "--fill-keys", "100000"));
        return;
    }
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
    println!("lookup of a {blocks}-block prompt: {}", percentiles(&mut lookups));
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
    println!("a heartbeat of {changes} key changes: {}", percentiles(&mut beats));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for deployments in [1, replicas / 10] {
        runtime.block_on(decisions(replicas, deployments.max(1), keys, blocks));
    }
}

/// Whole routing decisions on a real `Cluster` with `replicas` ready replicas.
async fn decisions(replicas: usize, deployments: usize, keys: usize, blocks: usize) {
    use gantry_proto::v1::controller_message::Message as ToWorker;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).unwrap());
    let config = ControllerConfig { lease: std::time::Duration::from_secs(3600), ..ControllerConfig::default() };
    let cluster = Cluster::start(store, config).await.unwrap();
    let status = |models: Vec<pb::LoadedModel>| pb::StatusResponse {
        gpus: vec![pb::GpuStatus {
            name: "gpu0".into(),
            total_bytes: 24 << 30,
            free_bytes: 24 << 30,
            source: "declared".into(),
            ..Default::default()
        }],
        models,
        ..Default::default()
    };
    let mut links = Vec::new();
    for r in 0..replicas {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let reg = pb::WorkerRegistration {
            worker_id: format!("w{r}"),
            address: "127.0.0.1:9".into(),
            version: "bench".into(),
            status: Some(status(Vec::new())),
            ..Default::default()
        };
        links.push((format!("w{r}"), cluster.register(reg, tx).unwrap(), rx));
    }
    let filled = Instant::now();
    let names: Vec<String> = (0..deployments).map(|d| format!("d{d}")).collect();
    for name in &names {
        let spec = DeploymentSpec {
            source: "meta-llama/Meta-Llama-3-8B-Instruct".into(),
            context_length: 8192,
            replicas: (replicas / deployments) as u32,
            ..Default::default()
        };
        cluster.apply(name, spec).await.unwrap();
    }
    let tenants: Vec<Vec<u32>> =
        (0..8u32).map(|t| (0..16 * blocks as u32).map(|i| t * 1_000_000 + i).collect()).collect();
    // Each deployment's replicas key the same tokens in its own namespace.
    let tenant_keys: Vec<Vec<Vec<u64>>> =
        names.iter().map(|n| tenants.iter().map(|t| block_keys(model_seed(n), t, 16)).collect()).collect();
    let mut next = 1u64 << 41;
    for (r, (worker, session, rx)) in links.iter_mut().enumerate() {
        let load = loop {
            match rx.recv().await.unwrap().unwrap().message.unwrap() {
                ToWorker::Load(cmd) => break cmd,
                _ => continue,
            }
        };
        let id = load.request.unwrap().model_id;
        let d: usize = id.split('/').next().unwrap()[1..].parse().unwrap();
        let tenant_keys = &tenant_keys[d];
        let info = pb::ModelInfo { model_id: id.clone(), ..Default::default() };
        cluster.command_result(
            worker,
            pb::CommandResult { command_id: load.command_id, model: Some(info.clone()), ..Default::default() },
        );
        let mut added: Vec<u64> = tenant_keys[r % 8].iter().chain(&tenant_keys[(r + 3) % 8]).copied().collect();
        added.extend((0..keys as u64).map(|k| next + k));
        next += keys as u64;
        let m = pb::LoadedModel {
            info: Some(info),
            queued: (r % 3) as u32,
            kv_block_tokens: 16,
            kv_blocks_total: 4096,
            kv_blocks_used: (r as u64 * 37) % 4096,
            prefix_keys: Some(pb::PrefixKeyChanges { reset: true, added, dropped: vec![] }),
            ..Default::default()
        };
        cluster.heartbeat(worker, *session, status(vec![m]));
    }
    for name in &names {
        assert_eq!(cluster.get(name).unwrap().status.unwrap().ready_replicas, (replicas / deployments) as u32);
    }
    println!(
        "a cluster of {replicas} ready replicas ({deployments} deployments of {}), keys reported, in {:.2} s",
        replicas / deployments,
        filled.elapsed().as_secs_f64()
    );
    let mut times = Vec::new();
    let mut parts: [Vec<f64>; 3] = Default::default();
    let mut by_prefix = 0;
    for i in 0..2000 {
        // A tenant's system prompt and a question of its own (some tokens past the last full block).
        let mut prompt = tenants[i % 8].clone();
        prompt.extend((0..40).map(|k| 5_000_000 + (i * 40 + k) as u32));
        let name = &names[i % deployments];
        let t = Instant::now();
        let asked = cluster.tokenizer_for(name, &[], None);
        let t1 = Instant::now();
        let hint = PrefixHint {
            keys: block_keys(model_seed(name), &prompt, 16),
            block_tokens: 16,
            prompt_tokens: prompt.len(),
        };
        let t2 = Instant::now();
        let routed = cluster.choose(name, &[], None, Some(&hint)).unwrap();
        let t3 = Instant::now();
        times.push(t.elapsed().as_secs_f64() * 1e6);
        parts[0].push((t1 - t).as_secs_f64() * 1e6);
        parts[1].push((t2 - t1).as_secs_f64() * 1e6);
        parts[2].push((t3 - t2).as_secs_f64() * 1e6);
        assert!(asked.is_some());
        by_prefix += usize::from(routed.score.is_some_and(|s| s.cached >= 16 * blocks as u64));
    }
    println!(
        "a routing decision ({} ready replicas of its deployment, a {}-token prompt): {}; {by_prefix} of 2000 to a replica holding the whole system prompt",
        replicas / deployments,
        16 * blocks + 40,
        percentiles(&mut times)
    );
    for (name, mut p) in ["tokenizer_for", "block_keys", "choose"].into_iter().zip(parts) {
        p.sort_by(f64::total_cmp);
        println!("  of which {name}: p50 {:.1} µs, p99 {:.1} µs", pct(&p, 50.0), pct(&p, 99.0));
    }
    cluster.shutdown();
}
