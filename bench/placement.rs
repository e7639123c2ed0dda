//! The replica placement planner at cluster scale: how fast it places, and how well it packs.
//!
//! A simulated cluster of `--nodes` workers with a fixed mix of GPUs (by a fixed-seed LCG:
//! 10% 8×80 GiB H100, 20% 4×48 GiB L40S, 30% 2×24 GiB A10G, 40% 1×16 GiB T4) takes
//! `--replicas` replicas of six catalog models, from 135M to a 70B model in bf16 that needs
//! two 80 GiB GPUs or four 48 GiB ones, in a shuffled order. Each replica is placed with
//! `placement::place` against the cluster as it stands, then its plan's bytes are taken off
//! its GPUs' free memory, as the controller reserves them. Reported: placements per second
//! (time spent in `place` only) with latency percentiles, what was placed and how, GPUs used,
//! VRAM needed, VRAM left free on the GPUs in use ("stranded"), and a lower bound: the fewest
//! GPUs whose memory could hold all of it, filled largest first by volume alone.
//!
//!     cargo run --release -p gantry-core --example placement_bench -- --nodes 10000 --replicas 10000 --strategy binpack
//!
//! `--allow-multi-node` lets replicas span nodes; `--seed N` changes the cluster and order.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use gantry_core::placement::{GpuView, NodeView, Plan, Policy, ReplicaRequest, Strategy, place};
use gantry_core::units::{GIB, format_bytes};
use gantry_core::{Catalog, ModelSpec, ServeOptions};

/// GPU kinds of the simulated cluster: name, count per node, GiB each, share of nodes in %.
const NODE_KINDS: [(&str, usize, u64, u64); 4] = [
    ("NVIDIA H100 80GB HBM3", 8, 80, 10),
    ("NVIDIA L40S", 4, 48, 20),
    ("NVIDIA A10G", 2, 24, 30),
    ("Tesla T4", 1, 16, 40),
];

/// Models deployed and their share of the replicas in %.
const MODELS: [(&str, u64); 6] = [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 30),
    ("meta-llama/Llama-3.2-1B-Instruct", 25),
    ("meta-llama/Llama-3.2-3B-Instruct", 15),
    ("meta-llama/Meta-Llama-3-8B-Instruct", 15),
    ("google/gemma-2-27b-it", 5),
    ("meta-llama/Meta-Llama-3-70B-Instruct", 10),
];

/// Served context: 8K tokens, or the model's own when shorter.
const CONTEXT: u64 = 8192;
const MARGIN_PERCENT: u64 = 5;

struct Args {
    nodes: usize,
    replicas: usize,
    strategy: Strategy,
    allow_multi_node: bool,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args =
        Args { nodes: 10_000, replicas: 10_000, strategy: Strategy::Binpack, allow_multi_node: false, seed: 42 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|_| format!("{flag}: `{v}` is not a number"));
        match flag.as_str() {
            "--nodes" => args.nodes = number(value()?)? as usize,
            "--replicas" => args.replicas = number(value()?)? as usize,
            "--strategy" => args.strategy = Strategy::parse(&value()?).map_err(|e| e.to_string())?,
            "--seed" => args.seed = number(value()?)?,
            "--allow-multi-node" => args.allow_multi_node = true,
            _ => {
                return Err(format!(
                    "unknown flag `{flag}` (use --nodes N --replicas N --strategy binpack|spread --allow-multi-node --seed N)"
                ));
            }
        }
    }
    if args.nodes == 0 {
        return Err("--nodes must be at least 1".into());
    }
    Ok(args)
}

/// Knuth's MMIX linear congruential generator: deterministic and dependency-free.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn cluster(n: usize, rng: &mut Lcg) -> Vec<NodeView> {
    (0..n)
        .map(|i| {
            let mut roll = rng.below(100);
            let &(name, count, gib, _) = NODE_KINDS
                .iter()
                .find(|k| {
                    let hit = roll < k.3;
                    roll = roll.saturating_sub(k.3);
                    hit
                })
                .expect("the shares add up to 100");
            let gpus = (0..count as u32)
                .map(|index| GpuView { index, name: name.into(), total_bytes: gib * GIB, free_bytes: gib * GIB })
                .collect();
            let zone = ["a", "b", "c"][i % 3];
            NodeView {
                id: format!("n{i:05}"),
                labels: BTreeMap::from([("zone".into(), zone.into())]),
                gpus,
                gpus_linked: false,
                host_free_bytes: 0,
            }
        })
        .collect()
}

/// Percentile `p` (0..=100) of sorted nanoseconds, in microseconds.
fn percentile_us(sorted_ns: &[u64], p: usize) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    sorted_ns[(sorted_ns.len() - 1) * p / 100] as f64 / 1e3
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let mut rng = Lcg(args.seed);
    let mut nodes = cluster(args.nodes, &mut rng);
    let position: HashMap<String, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id.clone(), i)).collect();

    let catalog = Catalog::builtin()?;
    let specs: Vec<ModelSpec> = MODELS.iter().map(|(id, _)| catalog.get(id)?.spec()).collect::<Result<_, _>>()?;
    let options: Vec<ServeOptions> = specs
        .iter()
        .map(|s| ServeOptions { context: Some(s.context.length.min(CONTEXT)), ..ServeOptions::default() })
        .collect();
    // Replica counts by share, the rounding remainder to the first model; then shuffled.
    let mut counts: Vec<usize> = MODELS.iter().map(|(_, share)| args.replicas * *share as usize / 100).collect();
    counts[0] += args.replicas - counts.iter().sum::<usize>();
    let mut order: Vec<usize> = counts.iter().enumerate().flat_map(|(m, &c)| std::iter::repeat_n(m, c)).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }

    let policy = Policy { strategy: args.strategy, allow_multi_node: args.allow_multi_node, ..Policy::default() };
    let mut replicas_on_node: Vec<BTreeMap<String, u32>> = vec![BTreeMap::new(); MODELS.len()];
    let mut latencies_ns = Vec::with_capacity(order.len());
    let (mut one_gpu, mut multi_gpu, mut multi_node) = (0u64, 0u64, 0u64);
    let mut unschedulable = vec![0u64; MODELS.len()];
    let mut needed_bytes = 0u64;
    let started = Instant::now();
    for &m in &order {
        let req = ReplicaRequest {
            spec: &specs[m],
            options: options[m].clone(),
            policy: &policy,
            margin_percent: MARGIN_PERCENT,
            replicas_on_node: &replicas_on_node[m],
            measured_bytes: None,
        };
        let t = Instant::now();
        let answer = place(&nodes, &req)?;
        latencies_ns.push(t.elapsed().as_nanos() as u64);
        let plan = match answer {
            Ok(plan) => plan,
            Err(_) => {
                unschedulable[m] += 1;
                continue;
            }
        };
        match plan {
            Plan::OneGpu { .. } => one_gpu += 1,
            Plan::MultiGpu { .. } => multi_gpu += 1,
            Plan::MultiNode { .. } => multi_node += 1,
        }
        for s in plan.stages() {
            let node = &mut nodes[position[&s.node]];
            let gpu = node.gpus.iter_mut().find(|g| g.index == s.gpu).ok_or("plan names an unknown GPU")?;
            gpu.free_bytes = gpu
                .free_bytes
                .checked_sub(s.bytes)
                .ok_or_else(|| format!("{} gpu:{} overcommitted by {}", s.node, s.gpu, s.bytes - gpu.free_bytes))?;
        }
        needed_bytes += plan.total_bytes();
        *replicas_on_node[m].entry(plan.stages()[0].node.clone()).or_insert(0) += 1;
    }
    let wall_s = started.elapsed().as_secs_f64();
    let place_s = latencies_ns.iter().sum::<u64>() as f64 / 1e9;
    latencies_ns.sort_unstable();

    let gpus: Vec<&GpuView> = nodes.iter().flat_map(|n| &n.gpus).collect();
    let used: Vec<&&GpuView> = gpus.iter().filter(|g| g.free_bytes < g.total_bytes).collect();
    let used_capacity: u64 = used.iter().map(|g| g.total_bytes).sum();
    let stranded: u64 = used.iter().map(|g| g.free_bytes).sum();
    let nodes_used = nodes.iter().filter(|n| n.gpus.iter().any(|g| g.free_bytes < g.total_bytes)).count();
    // Lower bound: the fewest GPUs whose memory adds up to what was placed, largest first.
    let mut sizes: Vec<u64> = gpus.iter().map(|g| g.total_bytes).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let (mut bound_gpus, mut bound_capacity) = (0usize, 0u64);
    for s in sizes {
        if bound_capacity >= needed_bytes {
            break;
        }
        bound_gpus += 1;
        bound_capacity += s;
    }
    let placed = one_gpu + multi_gpu + multi_node;
    let unplaced: u64 = unschedulable.iter().sum();
    let per_sec = order.len() as f64 / place_s.max(1e-9);
    let stranded_fraction = stranded as f64 / used_capacity.max(1) as f64;
    let bound_stranded_fraction =
        (bound_capacity - needed_bytes.min(bound_capacity)) as f64 / bound_capacity.max(1) as f64;

    println!(
        "cluster: {} nodes, {} GPUs, {} of GPU memory; strategy {}, margin {MARGIN_PERCENT}%, multi-node {}",
        nodes.len(),
        gpus.len(),
        format_bytes(gpus.iter().map(|g| g.total_bytes).sum()),
        args.strategy,
        if args.allow_multi_node { "allowed" } else { "off" }
    );
    for (i, (id, _)) in MODELS.iter().enumerate() {
        println!("  {:>5} × {id} ({} unschedulable)", counts[i], unschedulable[i]);
    }
    println!(
        "placed {placed} of {} replicas ({one_gpu} on one GPU, {multi_gpu} split in a node, {multi_node} across nodes), \
         {unplaced} unschedulable",
        order.len()
    );
    println!(
        "place(): {:.3} s for {} calls = {per_sec:.0} placements/s; p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs (loop {wall_s:.3} s)",
        place_s,
        order.len(),
        percentile_us(&latencies_ns, 50),
        percentile_us(&latencies_ns, 99),
        percentile_us(&latencies_ns, 100)
    );
    println!(
        "GPUs used: {} on {nodes_used} nodes ({} of memory); VRAM needed {}; stranded on used GPUs {} ({:.1}%)",
        used.len(),
        format_bytes(used_capacity),
        format_bytes(needed_bytes),
        format_bytes(stranded),
        100.0 * stranded_fraction
    );
    println!(
        "lower bound by volume: {bound_gpus} GPUs ({} of memory, {:.1}% stranded); used/bound = {:.2}× GPUs, {:.2}× memory",
        format_bytes(bound_capacity),
        100.0 * bound_stranded_fraction,
        used.len() as f64 / bound_gpus.max(1) as f64,
        used_capacity as f64 / bound_capacity.max(1) as f64
    );
    let json = serde_json::json!({
        "bench": "placement",
        "strategy": args.strategy.as_str(),
        "allow_multi_node": args.allow_multi_node,
        "nodes": nodes.len(),
        "gpus": gpus.len(),
        "replicas": order.len(),
        "placed": placed,
        "one_gpu": one_gpu,
        "multi_gpu": multi_gpu,
        "multi_node": multi_node,
        "unschedulable": unplaced,
        "place_s": place_s,
        "placements_per_sec": per_sec,
        "p50_us": percentile_us(&latencies_ns, 50),
        "p99_us": percentile_us(&latencies_ns, 99),
        "max_us": percentile_us(&latencies_ns, 100),
        "gpus_used": used.len(),
        "nodes_used": nodes_used,
        "used_capacity_bytes": used_capacity,
        "vram_needed_bytes": needed_bytes,
        "stranded_bytes": stranded,
        "stranded_fraction": stranded_fraction,
        "bound_gpus": bound_gpus,
        "bound_capacity_bytes": bound_capacity,
        "bound_stranded_fraction": bound_stranded_fraction,
    });
    println!("{json}");
    Ok(())
}
