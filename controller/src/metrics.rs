//! Prometheus metrics: what the router sees of each request (outcome, time to first token,
//! time between tokens, tokens), placement failures, and at scrape time the cluster's state
//! (GPU memory, replicas by state, worker liveness, queues), in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use crate::cluster::Cluster;

/// Upper bounds (seconds) of the time-to-first-token buckets.
const TTFT_BUCKETS: [f64; 12] = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0];
/// Upper bounds (seconds) of the buckets of the router's wait for a prompt's token ids.
const TOKENIZE_BUCKETS: [f64; 12] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0];
/// Upper bounds (seconds) of the inter-token latency buckets.
const ITL_BUCKETS: [f64; 12] = [0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5];

#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len()];
        }
        for (c, b) in self.counts.iter_mut().zip(bounds) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

#[derive(Debug, Default)]
struct Recorded {
    /// (model, outcome) → requests.
    requests: BTreeMap<(String, String), u64>,
    tokens: BTreeMap<String, u64>,
    ttft: BTreeMap<String, Histogram>,
    itl: BTreeMap<String, Histogram>,
    placement_failures: BTreeMap<String, u64>,
    /// (model, outcome) → requests moved off a failed replica.
    migrations: BTreeMap<(String, String), u64>,
    standby_prefills: BTreeMap<(String, String), u64>,
    /// (deployment, direction) → the autoscaler's decisions.
    autoscaled: BTreeMap<(String, String), u64>,
    /// Per API key name (never the key): streams admitted, refused by reason, tokens.
    key_admitted: BTreeMap<String, u64>,
    key_refused: BTreeMap<(String, String), u64>,
    key_tokens: BTreeMap<String, u64>,
    /// (model, chosen by) → routing decisions.
    routed: BTreeMap<(String, &'static str), u64>,
    /// (model, part) → the sum over routing decisions with a prompt hint of the chosen
    /// replica's score parts (`cached`, `prefill`, `queue`, `kv`) and of the prompts' tokens
    /// (`prompt`).
    route_tokens: BTreeMap<(String, &'static str), u64>,
    tokenize: BTreeMap<String, Histogram>,
}

static RECORDED: LazyLock<Mutex<Recorded>> = LazyLock::new(Mutex::default);

fn with<T>(f: impl FnOnce(&mut Recorded) -> T) -> T {
    let mut r = RECORDED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    f(&mut r)
}

/// A request's end: `ok`, `cancelled`, or the gRPC code's name (`unavailable` …).
pub fn request_finished(model: &str, outcome: &str) {
    with(|r| *r.requests.entry((model.to_string(), outcome.to_string())).or_default() += 1);
}

/// A token streamed back: the first one's delay since the request, or the gap since the last.
pub fn token(model: &str, first: Option<Duration>, gap: Option<Duration>) {
    with(|r| {
        *r.tokens.entry(model.to_string()).or_default() += 1;
        if let Some(d) = first {
            r.ttft.entry(model.to_string()).or_default().observe(&TTFT_BUCKETS, d.as_secs_f64());
        }
        if let Some(d) = gap {
            r.itl.entry(model.to_string()).or_default().observe(&ITL_BUCKETS, d.as_secs_f64());
        }
    });
}

/// A stream admitted for API key `name` (its name from the key file).
pub fn key_admitted(name: &str) {
    with(|r| *r.key_admitted.entry(name.to_string()).or_default() += 1);
}

/// A stream refused for API key `name` by one of its limits (`streams`, `tokens_per_minute`,
/// `priority`).
pub fn key_refused(name: &str, limit: &str) {
    with(|r| *r.key_refused.entry((name.to_string(), limit.to_string())).or_default() += 1);
}

/// Tokens generated for API key `name`.
pub fn key_tokens(name: &str, n: u64) {
    if n > 0 {
        with(|r| *r.key_tokens.entry(name.to_string()).or_default() += n);
    }
}

/// A request moved off a failed replica mid-stream: `resumed` on another, or `failed` when
/// none could take it.
pub fn migration(model: &str, outcome: &str) {
    with(|r| *r.migrations.entry((model.to_string(), outcome.to_string())).or_default() += 1);
}

/// A standby prefill (`--standby-prefill`) for a request of `model` ended: `ok` or `failed`;
/// or `busy`: none was sent, as every replica on another worker was serving requests.
pub fn standby_prefill(model: &str, outcome: &str) {
    with(|r| *r.standby_prefills.entry((model.to_string(), outcome.to_string())).or_default() += 1);
}

/// An autoscaler decision for `deployment`: `up` or `down`.
pub fn autoscaled(deployment: &str, direction: &str) {
    with(|r| *r.autoscaled.entry((deployment.to_string(), direction.to_string())).or_default() += 1);
}

/// A routing decision for `model`: why the replica was chosen (`only`, `session`, `prefix`,
/// `p2c`) and, for a request whose prompt the router hashed, its length and the replica's score.
pub fn routed(model: &str, by: &'static str, prompt_tokens: Option<usize>, score: Option<crate::router::pick::Score>) {
    with(|r| {
        *r.routed.entry((model.to_string(), by)).or_default() += 1;
        if let Some(p) = prompt_tokens {
            *r.route_tokens.entry((model.to_string(), "prompt")).or_default() += p as u64;
        }
        if let Some(s) = score {
            for (part, n) in [("cached", s.cached), ("prefill", s.prefill), ("queue", s.queue), ("kv", s.kv)] {
                *r.route_tokens.entry((model.to_string(), part)).or_default() += n;
            }
        }
    });
}

/// The router's wait for a prompt's token ids from a replica of `model`.
pub fn tokenized(model: &str, took: Duration) {
    with(|r| r.tokenize.entry(model.to_string()).or_default().observe(&TOKENIZE_BUCKETS, took.as_secs_f64()));
}

/// A replica that could not be placed or loaded, by kind of reason.
pub fn placement_failed(reason: &str) {
    with(|r| *r.placement_failures.entry(reason.to_string()).or_default() += 1);
}

/// Escapes a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, bounds: &[f64], series: &BTreeMap<String, Histogram>) {
    for (model, h) in series {
        let m = label(model);
        for (b, c) in bounds.iter().zip(&h.counts) {
            let _ = writeln!(out, "{name}_bucket{{model=\"{m}\",le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{model=\"{m}\",le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum{{model=\"{m}\"}} {}", h.sum);
        let _ = writeln!(out, "{name}_count{{model=\"{m}\"}} {}", h.count);
    }
}

/// A counter with two labels, `names`, one series per entry of `series`.
fn counter2<B: AsRef<str>>(
    out: &mut String,
    name: &str,
    help: &str,
    names: (&str, &str),
    series: &BTreeMap<(String, B), u64>,
) {
    header(out, name, "counter", help);
    for ((a, b), n) in series {
        let _ = writeln!(out, "{name}{{{}=\"{}\",{}=\"{}\"}} {n}", names.0, label(a), names.1, label(b.as_ref()));
    }
}

/// Everything, in the Prometheus text format.
pub fn render(cluster: &Cluster) -> String {
    let mut out = String::new();
    with(|r| {
        let requests = "Inference requests by deployment and outcome.";
        counter2(&mut out, "gantry_requests_total", requests, ("model", "outcome"), &r.requests);
        header(
            &mut out,
            "gantry_key_streams_total",
            "counter",
            "Streams admitted per API key (its name, never the key).",
        );
        for (name, n) in &r.key_admitted {
            let _ = writeln!(out, "gantry_key_streams_total{{key=\"{}\"}} {n}", label(name));
        }
        let refused = "Streams refused per API key name by the limit that refused them.";
        counter2(&mut out, "gantry_key_refused_total", refused, ("key", "limit"), &r.key_refused);
        header(&mut out, "gantry_key_tokens_total", "counter", "Tokens generated per API key name.");
        for (name, n) in &r.key_tokens {
            let _ = writeln!(out, "gantry_key_tokens_total{{key=\"{}\"}} {n}", label(name));
        }
        header(&mut out, "gantry_generated_tokens_total", "counter", "Tokens streamed to clients by deployment.");
        for (model, n) in &r.tokens {
            let _ = writeln!(out, "gantry_generated_tokens_total{{model=\"{}\"}} {n}", label(model));
        }
        header(
            &mut out,
            "gantry_time_to_first_token_seconds",
            "histogram",
            "From routing a request to its first token.",
        );
        histogram(&mut out, "gantry_time_to_first_token_seconds", &TTFT_BUCKETS, &r.ttft);
        header(&mut out, "gantry_inter_token_latency_seconds", "histogram", "Time between consecutive tokens.");
        histogram(&mut out, "gantry_inter_token_latency_seconds", &ITL_BUCKETS, &r.itl);
        header(
            &mut out,
            "gantry_placement_failures_total",
            "counter",
            "Replicas that could not be placed or loaded, by reason.",
        );
        for (reason, n) in &r.placement_failures {
            let _ = writeln!(out, "gantry_placement_failures_total{{reason=\"{}\"}} {n}", label(reason));
        }
        let migrations =
            "Requests whose replica failed mid-stream: resumed on another replica, or failed for want of one.";
        counter2(&mut out, "gantry_request_migrations_total", migrations, ("model", "outcome"), &r.migrations);
        let standby = "Standby prefills (--standby-prefill): a request's delivered tokens computed into another worker's prefix cache, by outcome (ok, failed; busy: skipped, every replica on another worker was serving requests).";
        counter2(&mut out, "gantry_standby_prefills_total", standby, ("model", "outcome"), &r.standby_prefills);
        let autoscaled = "The autoscaler's changes of a deployment's replica count, by direction (up, down).";
        counter2(&mut out, "gantry_autoscaler_decisions_total", autoscaled, ("deployment", "direction"), &r.autoscaled);
        let decisions = "Routing decisions by deployment and why the replica was chosen: only (the one ready), session, prefix (best score holding part of the prompt), p2c (power of two choices), standby (a failed-over request's standby).";
        counter2(&mut out, "gantry_routing_decisions_total", decisions, ("model", "by"), &r.routed);
        let parts = "Over requests routed with their prompt's prefix-cache keys, in prompt tokens: the prompts (part=prompt) and the chosen replicas' score parts: cached prefix (cached), prefill ahead (prefill), queue (queue) and KV pressure (kv); score = 2 x cached - prefill - queue - kv.";
        counter2(&mut out, "gantry_routing_tokens_total", parts, ("model", "part"), &r.route_tokens);
        header(
            &mut out,
            "gantry_routing_tokenize_seconds",
            "histogram",
            "The router's wait for a prompt's token ids from a replica (Worker/Tokenize), by deployment.",
        );
        histogram(&mut out, "gantry_routing_tokenize_seconds", &TOKENIZE_BUCKETS, &r.tokenize);
    });
    deployment_signals(&mut out, cluster);

    let (entries, replicas, forgotten) = {
        let inner = cluster.lock();
        let ix = &inner.state.prefix;
        (ix.entries(), ix.replicas(), ix.forgotten())
    };
    header(
        &mut out,
        "gantry_prefix_index_keys",
        "gauge",
        "Prefix-cache keys the router's index holds (per replica holding each).",
    );
    let _ = writeln!(out, "gantry_prefix_index_keys {entries}");
    header(&mut out, "gantry_prefix_index_replicas", "gauge", "Replicas with keys in the router's prefix index.");
    let _ = writeln!(out, "gantry_prefix_index_replicas {replicas}");
    header(
        &mut out,
        "gantry_prefix_index_forgotten_total",
        "counter",
        "Prefix-cache keys the index forgot or did not keep to stay within its bounds.",
    );
    let _ = writeln!(out, "gantry_prefix_index_forgotten_total {forgotten}");

    let workers = cluster.workers();
    header(&mut out, "gantry_worker_up", "gauge", "1 while a worker is connected and within its lease.");
    for w in &workers {
        let _ =
            writeln!(out, "gantry_worker_up{{worker=\"{}\"}} {}", label(&w.worker_id), u8::from(w.state == "ready"));
    }
    header(&mut out, "gantry_worker_queue_depth", "gauge", "Requests waiting in a worker's queue.");
    for w in &workers {
        let _ = writeln!(out, "gantry_worker_queue_depth{{worker=\"{}\"}} {}", label(&w.worker_id), w.queue_depth);
    }
    header(
        &mut out,
        "gantry_kv_cache_blocks",
        "gauge",
        "A served model's KV cache blocks: total, used by running sequences, cached (held only by the prefix cache).",
    );
    for w in &workers {
        for kv in &w.kv_cache {
            for (state, v) in [("total", kv.blocks_total), ("used", kv.blocks_used), ("cached", kv.blocks_cached)] {
                let _ = writeln!(
                    out,
                    "gantry_kv_cache_blocks{{worker=\"{}\",model=\"{}\",state=\"{state}\"}} {v}",
                    label(&w.worker_id),
                    label(&kv.model_id)
                );
            }
        }
    }
    for (name, help, pick) in [
        (
            "gantry_prefix_cache_lookup_blocks_total",
            "Full prompt blocks new requests looked up in a worker's prefix cache.",
            0,
        ),
        (
            "gantry_prefix_cache_hit_blocks_total",
            "Full prompt blocks found in a worker's prefix cache (not computed again).",
            1,
        ),
        ("gantry_kv_preemptions_total", "Sequences preempted (computed again later) for want of KV blocks.", 2),
    ] {
        header(&mut out, name, "counter", help);
        for w in &workers {
            for kv in &w.kv_cache {
                let v = [kv.prefix_blocks_looked_up, kv.prefix_blocks_hit, kv.preemptions][pick];
                let _ =
                    writeln!(out, "{name}{{worker=\"{}\",model=\"{}\"}} {v}", label(&w.worker_id), label(&kv.model_id));
            }
        }
    }
    for (name, help, pick) in [
        ("gantry_gpu_memory_total_bytes", "A GPU's memory.", 0),
        ("gantry_gpu_memory_used_bytes", "A GPU's memory in use, as its worker reports it.", 1),
        ("gantry_gpu_memory_reserved_bytes", "A GPU's memory the controller has promised to replicas.", 2),
    ] {
        header(&mut out, name, "gauge", help);
        for w in &workers {
            for g in &w.gpus {
                let v = match pick {
                    0 => g.total_bytes,
                    1 => g.total_bytes.saturating_sub(g.free_bytes),
                    _ => g.reserved_bytes,
                };
                let _ = writeln!(
                    out,
                    "{name}{{worker=\"{}\",gpu=\"{}\",name=\"{}\"}} {v}",
                    label(&w.worker_id),
                    g.index,
                    label(&g.name)
                );
            }
        }
    }
    header(&mut out, "gantry_replicas", "gauge", "Replicas by deployment and state.");
    for d in cluster.list() {
        let status = d.status.unwrap_or_default();
        let mut by_state: BTreeMap<&str, u64> =
            ["pending", "loading", "ready", "failed"].into_iter().map(|s| (s, 0)).collect();
        for r in &status.replica_status {
            let state = match gantry_proto::v1::ReplicaState::try_from(r.state) {
                Ok(gantry_proto::v1::ReplicaState::Loading) => "loading",
                Ok(gantry_proto::v1::ReplicaState::Ready) => "ready",
                Ok(gantry_proto::v1::ReplicaState::Failed) => "failed",
                _ => "pending",
            };
            *by_state.entry(state).or_default() += 1;
        }
        for (state, n) in by_state {
            let _ = writeln!(out, "gantry_replicas{{deployment=\"{}\",state=\"{state}\"}} {n}", label(&d.name));
        }
    }
    out
}

/// Per-deployment signals with stable names, for dashboards and for HPA or KEDA
/// (`gantry_deployment_in_flight_requests{deployment="chat"}`).
fn deployment_signals(out: &mut String, cluster: &Cluster) {
    let signals = cluster.signals();
    type Series = (&'static str, &'static str, fn(&(String, u32, gantry_core::autoscale::Signals)) -> f64);
    let series: [Series; 6] = [
        (
            "gantry_deployment_desired_replicas",
            "Replicas a deployment asks for (its spec, or the autoscaler's count).",
            |s| f64::from(s.1),
        ),
        ("gantry_deployment_ready_replicas", "Replicas of a deployment ready to serve.", |s| f64::from(s.2.ready)),
        ("gantry_deployment_in_flight_requests", "Requests sent to a deployment's replicas and not finished.", |s| {
            f64::from(s.2.in_flight)
        }),
        ("gantry_deployment_queued_requests", "Requests queued at a deployment's workers, not yet running.", |s| {
            f64::from(s.2.queued)
        }),
        (
            "gantry_deployment_waiting_requests",
            "Requests waiting for a replica of a deployment to come up (a cold start).",
            |s| f64::from(s.2.waiting),
        ),
        (
            "gantry_deployment_kv_utilization",
            "The fraction of a deployment's KV cache blocks in use, over its ready replicas (0 when not reported).",
            |s| if s.2.kv_total_blocks == 0 { 0.0 } else { s.2.kv_used_blocks as f64 / s.2.kv_total_blocks as f64 },
        ),
    ];
    for (name, help, value) in series {
        header(out, name, "gauge", help);
        for s in &signals {
            let _ = writeln!(out, "{name}{{deployment=\"{}\"}} {}", label(&s.0), value(s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let mut h = Histogram::default();
        for v in [0.001, 0.04, 3.0] {
            h.observe(&TTFT_BUCKETS, v);
        }
        assert_eq!(h.counts[..3], [1, 2, 2]);
        assert_eq!(*h.counts.last().unwrap(), 3);
        assert_eq!(h.count, 3);
        assert!((h.sum - 3.041).abs() < 1e-9);
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
