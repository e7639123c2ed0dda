//! Autoscaling decisions: from a deployment's policy and the signals sampled over a window,
//! how many replicas it should have. Pure: the controller samples (in-flight requests, queues,
//! KV blocks, requests waiting for a cold start), keeps the window and applies the answer
//! through the same path as `Scale`.
//!
//! The rule is the one Kubernetes' HPA made familiar, made for LLM signals:
//! - each sample recommends `ceil(load / target)` replicas, where `load` is the deployment's
//!   total of the policy's metric; within 10% of the current count it recommends the current
//!   count (no churn on noise);
//! - scaling up follows the lowest recommendation over the scale-up window (default: the
//!   newest sample, so bursts are met at once); scaling down follows the highest recommendation
//!   over the scale-down delay, and only once the window holds samples that old, so a short lull,
//!   a restart or a fresh deployment never scales down;
//! - with `min_replicas = 0`, the last replica goes only after the deployment has been idle
//!   (nothing in flight, queued or waiting) for the whole scale-to-zero period, and any demand
//!   while at zero asks for a replica at once.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// The most replicas an autoscaled deployment may reach.
pub const MAX_REPLICAS: u32 = 1024;

/// The longest window a policy may ask for (one hour), which bounds the samples kept.
pub const MAX_WINDOW_MS: u64 = 3_600_000;

/// A recommendation within this fraction of the current count keeps the current count.
pub const TOLERANCE: f64 = 0.1;

/// What a replica's share of the load is measured in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Requests sent to a replica and not finished, plus requests waiting for a cold start.
    #[default]
    InFlight,
    /// Requests queued at the workers (not yet running), plus requests waiting for a cold start.
    Queue,
    /// The fraction of a replica's KV cache blocks in use (target in (0, 1]).
    KvUtilization,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::InFlight => "in_flight",
            Metric::Queue => "queue",
            Metric::KvUtilization => "kv_utilization",
        }
    }

    pub fn parse(s: &str) -> Result<Metric, String> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "" | "in_flight" | "inflight" => Ok(Metric::InFlight),
            "queue" => Ok(Metric::Queue),
            "kv_utilization" | "kv" => Ok(Metric::KvUtilization),
            other => Err(format!("autoscaling metric `{other}`: use in_flight, queue or kv_utilization")),
        }
    }
}

/// A deployment's autoscaling policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub min_replicas: u32,
    pub max_replicas: u32,
    #[serde(default)]
    pub metric: Metric,
    /// The metric's value one replica should carry.
    pub target: f64,
    /// Scaling up follows the lowest recommendation over this window (0: the newest sample).
    #[serde(default)]
    pub scale_up_window_ms: u64,
    /// Scaling down follows the highest recommendation over this window.
    #[serde(default = "default_down_ms")]
    pub scale_down_delay_ms: u64,
    /// With `min_replicas = 0`: idle this long before the last replica goes.
    #[serde(default = "default_down_ms")]
    pub scale_to_zero_after_ms: u64,
}

fn default_down_ms() -> u64 {
    300_000
}

// Targets are finite (checked), so the derived `PartialEq` is an equivalence.
impl Eq for Policy {}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            min_replicas: 1,
            max_replicas: 1,
            metric: Metric::InFlight,
            target: 8.0,
            scale_up_window_ms: 0,
            scale_down_delay_ms: default_down_ms(),
            scale_to_zero_after_ms: default_down_ms(),
        }
    }
}

impl Policy {
    /// Checks the bounds, the target and the windows.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_replicas == 0 {
            return Err("autoscaling: max_replicas must be at least 1".into());
        }
        if self.max_replicas > MAX_REPLICAS {
            return Err(format!("autoscaling: max_replicas {} is past the limit of {MAX_REPLICAS}", self.max_replicas));
        }
        if self.min_replicas > self.max_replicas {
            return Err(format!(
                "autoscaling: min_replicas {} is above max_replicas {}",
                self.min_replicas, self.max_replicas
            ));
        }
        if !self.target.is_finite() || self.target <= 0.0 {
            return Err(format!("autoscaling: the target must be a number above 0, not {}", self.target));
        }
        if self.metric == Metric::KvUtilization && self.target > 1.0 {
            return Err(format!(
                "autoscaling: a kv_utilization target is a fraction of the KV blocks in (0, 1], not {}",
                self.target
            ));
        }
        for (name, ms) in [
            ("scale_up_window", self.scale_up_window_ms),
            ("scale_down_delay", self.scale_down_delay_ms),
            ("scale_to_zero_after", self.scale_to_zero_after_ms),
        ] {
            if ms > MAX_WINDOW_MS {
                return Err(format!("autoscaling: {name} of {} s is past the limit of 3600 s", ms / 1000));
            }
        }
        Ok(())
    }

    /// `replicas` within the policy's bounds.
    pub fn clamp(&self, replicas: u32) -> u32 {
        replicas.clamp(self.min_replicas, self.max_replicas)
    }

    /// How far back decisions look: samples older than this can be dropped.
    pub fn window_ms(&self) -> u64 {
        self.scale_up_window_ms.max(self.scale_down_delay_ms).max(self.scale_to_zero_after_ms)
    }
}

/// One sample of a deployment's signals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signals {
    /// When it was taken (any monotonic millisecond clock).
    pub at_ms: u64,
    /// Replicas ready to serve.
    pub ready: u32,
    /// Requests sent to replicas and not finished.
    pub in_flight: u32,
    /// Requests the workers hold queued, not yet running.
    pub queued: u32,
    /// Requests waiting for a replica to come up (a cold start).
    pub waiting: u32,
    /// KV cache blocks in use and in all, over the ready replicas.
    pub kv_used_blocks: u64,
    pub kv_total_blocks: u64,
}

impl Signals {
    /// Whether anything asks for the deployment.
    pub fn active(&self) -> bool {
        self.in_flight > 0 || self.queued > 0 || self.waiting > 0
    }

    /// The deployment's total of `metric`: in-flight or queued requests, or KV utilisation
    /// summed over the ready replicas (their mean times their number).
    pub fn load(&self, metric: Metric) -> f64 {
        match metric {
            Metric::InFlight => f64::from(self.in_flight) + f64::from(self.waiting),
            Metric::Queue => f64::from(self.queued) + f64::from(self.waiting),
            Metric::KvUtilization if self.kv_total_blocks == 0 => 0.0,
            Metric::KvUtilization => {
                self.kv_used_blocks as f64 / self.kv_total_blocks as f64 * f64::from(self.ready)
                    + f64::from(self.waiting)
            }
        }
    }
}

/// What one sample recommends for a deployment that now has `current` replicas, before
/// stabilisation: `ceil(load / target)`, the current count within the tolerance, at least one
/// replica while anything asks for it, within `[max(min, 1), max]` (zero is decided apart).
pub fn recommend(policy: &Policy, current: u32, s: &Signals) -> u32 {
    let load = s.load(policy.metric);
    let ratio = load / policy.target;
    let mut want = if current > 0 && (ratio / f64::from(current) - 1.0).abs() <= TOLERANCE {
        current
    } else {
        ratio.ceil().min(f64::from(MAX_REPLICAS)) as u32
    };
    if s.active() {
        want = want.max(1);
    }
    want.clamp(policy.min_replicas.max(1), policy.max_replicas)
}

/// A change of replica count and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub from: u32,
    pub to: u32,
    /// The newest sample's load (the policy's metric, summed).
    pub load: f64,
    /// What a person reads: the signal, the target, the windows.
    pub reason: String,
}

/// The replica count `policy` asks for at `now_ms`, given `current` replicas and the samples of
/// the last `policy.window_ms()` (oldest first); `None` to keep `current`. Samples newer than
/// `now_ms` are ignored.
pub fn decide(policy: &Policy, current: u32, samples: &[Signals], now_ms: u64) -> Option<Decision> {
    let samples: Vec<&Signals> = samples.iter().filter(|s| s.at_ms <= now_ms).collect();
    let newest = *samples.last()?;
    let load = newest.load(policy.metric);
    let within = |ms: u64| samples.iter().filter(move |s| now_ms - s.at_ms <= ms);
    // Whether the samples reach back over a whole window (a decision to go down needs that).
    let covers = |ms: u64| samples.first().is_some_and(|s| now_ms - s.at_ms >= ms);
    let describe = |to: u32, why: &str| {
        let mut r = format!(
            "{} {:.2} over {} ready replica(s) (target {} per replica)",
            policy.metric.name(),
            load,
            newest.ready,
            policy.target
        );
        if newest.waiting > 0 {
            let _ = write!(r, ", {} request(s) waiting for a replica", newest.waiting);
        }
        let _ = write!(r, ": {current} → {to} replica(s), {why}");
        Decision { from: current, to, load, reason: r }
    };

    // Below the minimum or above the maximum (the policy changed, or `Scale` was called).
    if current < policy.min_replicas {
        return Some(describe(policy.min_replicas, "the policy's minimum"));
    }
    if current > policy.max_replicas {
        return Some(describe(policy.max_replicas, "the policy's maximum"));
    }
    if current == 0 {
        return newest.active().then(|| {
            let to = recommend(policy, 0, newest);
            describe(to, "a request arrived while scaled to zero")
        });
    }
    let now_wants = recommend(policy, current, newest);
    if now_wants > current {
        let up = within(policy.scale_up_window_ms).map(|s| recommend(policy, current, s)).min().unwrap_or(now_wants);
        return (up > current).then(|| {
            let why = if policy.scale_up_window_ms == 0 {
                "scaling up".to_string()
            } else {
                format!("the lowest recommendation over {} s", policy.scale_up_window_ms / 1000)
            };
            describe(up, &why)
        });
    }
    // Down to zero: idle over the whole scale-to-zero period.
    if policy.min_replicas == 0 && covers(policy.scale_to_zero_after_ms) {
        let idle = within(policy.scale_to_zero_after_ms).all(|s| !s.active());
        if idle {
            return Some(describe(0, &format!("idle for {} s (scale to zero)", policy.scale_to_zero_after_ms / 1000)));
        }
    }
    if now_wants < current && covers(policy.scale_down_delay_ms) {
        let down = within(policy.scale_down_delay_ms).map(|s| recommend(policy, current, s)).max().unwrap_or(current);
        if down < current {
            return Some(describe(
                down,
                &format!("the highest recommendation over {} s", policy.scale_down_delay_ms / 1000),
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(min: u32, max: u32, target: f64) -> Policy {
        Policy {
            min_replicas: min,
            max_replicas: max,
            metric: Metric::InFlight,
            target,
            scale_up_window_ms: 0,
            scale_down_delay_ms: 60_000,
            scale_to_zero_after_ms: 120_000,
        }
    }

    fn at(at_ms: u64, ready: u32, in_flight: u32) -> Signals {
        Signals { at_ms, ready, in_flight, ..Signals::default() }
    }

    /// Runs `policy` over a trace of (in-flight per second), applying each decision at once
    /// (replicas ready the moment they are asked for); returns the count after each second and
    /// the decisions.
    fn run(policy: &Policy, start: u32, load: &[u32]) -> (Vec<u32>, Vec<Decision>) {
        let mut current = start;
        let mut samples: Vec<Signals> = Vec::new();
        let (mut counts, mut decisions) = (Vec::new(), Vec::new());
        for (t, &l) in load.iter().enumerate() {
            let now = t as u64 * 1000;
            samples.push(at(now, current, l));
            samples.retain(|s| now - s.at_ms <= policy.window_ms());
            if let Some(d) = decide(policy, current, &samples, now) {
                current = d.to;
                decisions.push(d);
            }
            counts.push(current);
        }
        (counts, decisions)
    }

    /// Direction changes among consecutive decisions.
    fn flaps(decisions: &[Decision]) -> usize {
        decisions.windows(2).filter(|w| (w[0].to > w[0].from) != (w[1].to > w[1].from)).count()
    }

    #[test]
    fn scales_up_at_once_to_the_load_over_the_target() {
        let p = policy(1, 10, 4.0);
        let (counts, decisions) = run(&p, 1, &[2, 2, 17, 17]);
        assert_eq!(counts, [1, 1, 5, 5]);
        assert_eq!(decisions.len(), 1);
        assert_eq!(
            decisions[0].reason,
            "in_flight 17.00 over 1 ready replica(s) (target 4 per replica): 1 → 5 replica(s), scaling up"
        );
    }

    #[test]
    fn holds_within_the_tolerance() {
        let p = policy(1, 10, 4.0);
        // 4 replicas × 4 = 16; 17 is 6% over, 15 is 6% under: both hold.
        let (counts, decisions) = run(&p, 4, &[17, 15, 17, 15, 17]);
        assert_eq!(counts, [4; 5]);
        assert!(decisions.is_empty());
    }

    #[test]
    fn scales_down_only_after_the_delay_and_to_the_highest_recommendation_in_it() {
        let p = policy(1, 10, 4.0);
        // 20 in flight for 10 s (5 replicas), then 8 (2 replicas) with one 12 (3) at second 40.
        let mut load = vec![20u32; 10];
        load.extend(std::iter::repeat_n(8, 120));
        load[40] = 12;
        let (counts, decisions) = run(&p, 5, &load);
        // Nothing goes down before the window covers 60 s of lower load.
        assert!(counts[..69].iter().all(|&c| c == 5), "{counts:?}");
        // 60 s after second 10 the window still holds second 40's 12: down to 3 first.
        assert_eq!(counts[70], 3);
        // Then once second 40 has left the window: down to 2.
        assert_eq!(counts[100], 3);
        assert_eq!(counts[101], 2);
        assert_eq!(counts[129], 2);
        assert_eq!(decisions.len(), 2);
        assert!(
            decisions[0].reason.ends_with("5 → 3 replica(s), the highest recommendation over 60 s"),
            "{}",
            decisions[0].reason
        );
    }

    #[test]
    fn stays_within_the_bounds() {
        let p = policy(2, 3, 1.0);
        let (counts, _) = run(&p, 2, &[0, 100, 100, 0]);
        assert_eq!(counts, [2, 3, 3, 3]);
        // Started outside the bounds (a `Scale` call, a new policy): back within at once.
        assert_eq!(decide(&p, 7, &[at(0, 7, 0)], 0).map(|d| d.to), Some(3));
        assert_eq!(decide(&p, 0, &[at(0, 0, 0)], 0).map(|d| d.to), Some(2));
        let long = (0..200).map(|t| at(t * 1000, 3, 0)).collect::<Vec<_>>();
        assert_eq!(decide(&p, 3, &long, 199_000).map(|d| d.to), Some(2), "never below the minimum");
    }

    #[test]
    fn scales_to_zero_only_after_the_idle_period_and_back_on_the_first_request() {
        let p = policy(0, 4, 4.0);
        let mut load = vec![3u32; 5];
        load.extend(std::iter::repeat_n(0, 200));
        load[60] = 1; // one request in the lull restarts the idle clock
        load.push(1);
        let (counts, decisions) = run(&p, 1, &load);
        assert!(counts[..180].iter().all(|&c| c == 1), "{counts:?}");
        assert_eq!(counts[181], 0);
        assert!(decisions[0].reason.ends_with("1 → 0 replica(s), idle for 120 s (scale to zero)"), "{decisions:?}");
        assert_eq!(*counts.last().unwrap(), 1);
        assert!(decisions[1].reason.ends_with("0 → 1 replica(s), a request arrived while scaled to zero"));
    }

    #[test]
    fn a_cold_burst_asks_for_what_it_needs_and_waiting_requests_count() {
        let p = policy(0, 8, 2.0);
        let s = Signals { at_ms: 0, waiting: 9, ..Signals::default() };
        let d = decide(&p, 0, &[s], 0).unwrap();
        assert_eq!(d.to, 5);
        assert!(d.reason.contains("9 request(s) waiting for a replica"), "{}", d.reason);
        // A queue-driven policy with an empty queue still keeps one replica for running requests.
        let q = Policy { metric: Metric::Queue, ..p };
        assert_eq!(recommend(&q, 2, &Signals { in_flight: 3, ..Signals::default() }), 1);
    }

    #[test]
    fn kv_utilization_is_summed_over_ready_replicas() {
        let p = Policy { metric: Metric::KvUtilization, target: 0.5, ..policy(1, 10, 0.5) };
        // Two replicas at 90% of their blocks: 1.8 / 0.5 → 4 replicas.
        let s = Signals { ready: 2, in_flight: 20, kv_used_blocks: 1800, kv_total_blocks: 2000, ..Default::default() };
        assert_eq!(recommend(&p, 2, &s), 4);
        // Unknown blocks (a worker that does not report them) recommend the minimum.
        let s = Signals { ready: 2, in_flight: 0, ..Default::default() };
        assert_eq!(recommend(&p, 2, &s), 1);
    }

    #[test]
    fn a_restart_or_a_short_history_never_scales_down() {
        let p = policy(1, 10, 4.0);
        let fresh: Vec<Signals> = (0..30).map(|t| at(1_000_000 + t * 1000, 6, 0)).collect();
        assert_eq!(decide(&p, 6, &fresh, 1_029_000), None);
    }

    #[test]
    fn a_steady_noisy_load_does_not_flap() {
        // 30 minutes of a load around 24 in flight (±30%, a deterministic jitter), target 4.
        let p = policy(1, 16, 4.0);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let load: Vec<u32> = (0..1800)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                17 + (x % 15) as u32
            })
            .collect();
        let (counts, decisions) = run(&p, 1, &load);
        assert_eq!(flaps(&decisions), 0, "{decisions:#?}");
        // It settles on the peak of the noise and stays there.
        let settled = counts[120];
        assert_eq!(settled, 8);
        assert!(counts[120..].iter().all(|&c| c == settled));
    }

    #[test]
    fn a_ramp_up_and_down_follows_the_load_without_reversals() {
        let p = policy(0, 10, 4.0);
        let mut load: Vec<u32> = (0..60).map(|t| t / 2).collect(); // 0 → 29
        load.extend(std::iter::repeat_n(30, 60));
        load.extend((0..60).map(|t| 30 - t / 2)); // 30 → 1
        load.extend(std::iter::repeat_n(0, 300));
        let (counts, decisions) = run(&p, 0, &load);
        // The peak of 30 in flight wants 7.5 replicas: 7 holds within the tolerance.
        assert_eq!(counts.iter().max(), Some(&7));
        assert_eq!(*counts.last().unwrap(), 0);
        // Up steps, then down steps: one reversal at the peak, none elsewhere.
        assert_eq!(flaps(&decisions), 1, "{decisions:#?}");
    }

    /// Requests in flight every 0.5 s as the controller saw them in `bench/autoscale_ramp.py
    /// --down-s 30 --peak-rps 6` (`bench/results/autoscale-20261206T121857Z.json`): a Poisson
    /// ramp of 0.3 s chats on real SmolLM2 workers, 0 → 6 req/s over 30 s, held 40 s, back to 0.
    const RECORDED_IN_FLIGHT: [u32; 259] = [
        0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 1, 0, 3, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2, 0, 0, 0,
        0, 3, 2, 4, 1, 2, 0, 1, 4, 4, 1, 0, 3, 4, 3, 3, 6, 8, 9, 4, 1, 5, 7, 7, 10, 9, 7, 1, 1, 1, 5, 5, 4, 2, 2, 3, 2,
        3, 0, 1, 4, 0, 2, 6, 2, 2, 0, 0, 7, 5, 2, 1, 1, 3, 0, 3, 4, 6, 4, 1, 3, 1, 2, 1, 0, 3, 2, 4, 7, 1, 2, 2, 4, 2,
        0, 2, 8, 6, 1, 2, 2, 0, 2, 1, 3, 0, 0, 3, 3, 0, 3, 1, 4, 6, 3, 2, 2, 3, 0, 1, 3, 1, 1, 1, 3, 7, 6, 7, 3, 7, 4,
        0, 1, 0, 1, 4, 2, 1, 5, 5, 3, 0, 0, 0, 1, 1, 2, 1, 0, 1, 0, 0, 0, 2, 5, 4, 2, 0, 1, 1, 1, 1, 0, 0, 0, 2, 0, 0,
        0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];

    #[test]
    fn the_recorded_ramp_goes_up_once_and_down_once() {
        let p = Policy { scale_down_delay_ms: 30_000, scale_to_zero_after_ms: 30_000, ..policy(0, 3, 1.0) };
        let (mut current, mut samples, mut decisions) = (0u32, Vec::new(), Vec::new());
        let mut trace = RECORDED_IN_FLIGHT.to_vec();
        trace.extend([0; 40]); // then nothing for 20 s
        for (i, &in_flight) in trace.iter().enumerate() {
            let now = i as u64 * 500;
            samples.push(Signals { at_ms: now, ready: current, in_flight, ..Signals::default() });
            if let Some(d) = decide(&p, current, &samples, now) {
                current = d.to;
                decisions.push(d);
            }
        }
        let path: Vec<u32> = decisions.iter().map(|d| d.to).collect();
        // From zero on the first request, up to the maximum, then down step by step to zero.
        assert_eq!(path, [1, 2, 3, 2, 1, 0], "{decisions:#?}");
        assert_eq!(flaps(&decisions), 1, "one turn, at the peak");
    }

    #[test]
    fn invalid_policies_say_what_to_change() {
        let bad = [
            (policy(3, 2, 1.0), "autoscaling: min_replicas 3 is above max_replicas 2"),
            (policy(0, 0, 1.0), "autoscaling: max_replicas must be at least 1"),
            (policy(0, 2, 0.0), "autoscaling: the target must be a number above 0, not 0"),
            (policy(0, 2, f64::NAN), "autoscaling: the target must be a number above 0, not NaN"),
            (
                Policy { metric: Metric::KvUtilization, ..policy(0, 2, 80.0) },
                "autoscaling: a kv_utilization target is a fraction of the KV blocks in (0, 1], not 80",
            ),
            (
                Policy { scale_down_delay_ms: 7_200_000, ..policy(0, 2, 1.0) },
                "autoscaling: scale_down_delay of 7200 s is past the limit of 3600 s",
            ),
            (policy(0, 5000, 1.0), "autoscaling: max_replicas 5000 is past the limit of 1024"),
        ];
        for (p, want) in bad {
            assert_eq!(p.validate().unwrap_err(), want);
        }
        assert!(policy(0, 1, 1.0).validate().is_ok());
        assert_eq!(Metric::parse("kv-utilization"), Ok(Metric::KvUtilization));
        assert!(Metric::parse("gpu").unwrap_err().contains("use in_flight, queue or kv_utilization"));
    }
}
