//! The controller's autoscaler: every `autoscale_interval` it samples each autoscaled
//! deployment's signals (requests in flight and queued, requests waiting for a cold start, KV
//! blocks), asks `gantry_core::autoscale::decide` for a count, and applies it through the same
//! path as `Scale`, with an `Autoscaled` event that carries the reason and the numbers. Where
//! another owner holds the replica count (the operator: a resource's `spec.replicas`), the
//! count goes to that owner's [`Scaler`] instead, so `kubectl get md` shows it.
//!
//! A request for a deployment with no ready replica waits here ([`Cluster::wait_for_replica`])
//! while one is placed and loaded, bounded by its deadline, `cold_start_timeout` and
//! `max_waiting`; it is refused with the reason at once if no GPU has room.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use gantry_core::autoscale::{Decision, Signals, decide};
use tokio::sync::broadcast::error::RecvError;
use tracing::{info, warn};

use super::Cluster;
use super::events::EventKind;
use super::state::{ReplicaState, State, replica_model_id};
use super::view;
use crate::clock::unix_ms;
use crate::error::ClusterError;

/// How long a count asked of another owner may take to come back before it is asked again.
const ASK_TIMEOUT: Duration = Duration::from_secs(15);

/// Another owner of deployments' replica counts (the operator writes a resource's
/// `spec.replicas` through its scale subresource).
pub trait Scaler: Send + Sync + std::fmt::Debug {
    /// Whether it owns `name`'s replica count.
    fn manages(&self, name: &str) -> bool;
    /// Sets `name`'s replica count.
    fn scale<'a>(
        &'a self,
        name: &'a str,
        replicas: u32,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
}

/// The signals of deployment `name` now: replicas ready, requests in flight (the router's
/// count), queued and KV blocks (what each replica's first worker reports), requests waiting.
pub fn signals(st: &State, name: &str, at_ms: u64) -> Option<Signals> {
    let d = st.deployments.get(name)?;
    let mut s = Signals { at_ms, waiting: d.autoscaler.waiting.load(Ordering::Relaxed), ..Signals::default() };
    for (&i, r) in &d.replicas {
        s.in_flight += r.inflight.load(Ordering::Relaxed);
        if r.state != ReplicaState::Ready {
            continue;
        }
        s.ready += 1;
        let Some(first) = r.placement.as_ref().and_then(|p| p.stages.first()) else { continue };
        let id = replica_model_id(name, i);
        let loaded = st.workers.get(&first.node).and_then(|w| w.model(&id));
        if let Some(m) = loaded {
            s.queued += m.queued;
            s.kv_used_blocks += m.kv_blocks_used;
            s.kv_total_blocks += m.kv_blocks_total;
        }
    }
    Some(s)
}

/// Samples the autoscaled deployments (or only `only`) and returns the decisions to apply,
/// marking each as asked so the next round waits for it.
pub fn sample_and_decide(st: &mut State, now_ms: u64, now: Instant, only: Option<&str>) -> Vec<(String, Decision)> {
    let names: Vec<String> = match only {
        Some(n) => vec![n.to_string()],
        None => st.deployments.keys().cloned().collect(),
    };
    let mut out = Vec::new();
    for name in names {
        let Some(policy) = st.deployments.get(&name).and_then(|d| d.record.spec.autoscaling.clone()) else {
            if let Some(d) = st.deployments.get_mut(&name) {
                d.autoscaler.samples.clear();
            }
            continue;
        };
        let Some(sample) = signals(st, &name, now_ms) else { continue };
        let Some(d) = st.deployments.get_mut(&name) else { continue };
        let a = &mut d.autoscaler;
        a.samples.push_back(sample);
        let keep = policy.window_ms() + 1000;
        while a.samples.front().is_some_and(|s| now_ms.saturating_sub(s.at_ms) > keep) {
            a.samples.pop_front();
        }
        let current = d.record.spec.replicas;
        if let Some((to, at)) = a.asked {
            if to != current && now.duration_since(at) < ASK_TIMEOUT {
                continue;
            }
            a.asked = None;
        }
        let samples: Vec<Signals> = a.samples.iter().copied().collect();
        if let Some(decision) = decide(&policy, current, &samples, now_ms) {
            a.asked = Some((decision.to, now));
            a.last_decision = decision.reason.clone();
            a.last_decision_ms = unix_ms();
            out.push((name, decision));
        }
    }
    out
}

/// Takes a waiting request off its deployment's count when it stops waiting.
struct Waiting(Arc<AtomicU32>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a waiting request may expect of a deployment.
enum Outlook {
    /// A ready replica it has not failed on.
    Ready,
    /// A replica is on its way (placed and loading, or a count asked and not seen back).
    ComingUp,
    /// Nothing is on its way: the reason says why (no GPU has room, a load failed …).
    Stuck(String),
}

fn outlook(st: &State, name: &str, avoid: &[(String, String)]) -> Result<Outlook, ClusterError> {
    let d = st.deployments.get(name).ok_or_else(|| view::not_found(st, name))?;
    let usable = d.replicas.iter().any(|(&i, r)| {
        r.state == ReplicaState::Ready && {
            let id = replica_model_id(name, i);
            !avoid.iter().any(|(_, failed)| *failed == id)
        }
    });
    if usable {
        return Ok(Outlook::Ready);
    }
    let placed = d.replicas.values().any(|r| r.state == ReplicaState::Loading || r.placement.is_some());
    if placed || d.record.spec.replicas == 0 || d.autoscaler.asked.is_some_and(|(to, _)| to > d.replicas.len() as u32) {
        return Ok(Outlook::ComingUp);
    }
    Ok(Outlook::Stuck(view::no_replica_reason(name, d, &[])))
}

impl Cluster {
    /// Lets another owner (the operator) hold the replica counts it [`Scaler::manages`].
    pub fn set_scaler(&self, scaler: Arc<dyn Scaler>) {
        *self.scaler.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(scaler);
    }

    fn scaler_for(&self, name: &str) -> Option<Arc<dyn Scaler>> {
        let s = self.scaler.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        s.as_ref().filter(|s| s.manages(name)).cloned()
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Starts the autoscaler's rounds (one every `autoscale_interval`) for as long as the
    /// cluster lives.
    pub(super) fn start_autoscaler(self: &Arc<Cluster>) {
        let weak: Weak<Cluster> = Arc::downgrade(self);
        let every = self.config.autoscale_interval.max(Duration::from_millis(20));
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(c) = weak.upgrade() else { return };
                c.autoscale(None).await;
            }
        });
    }

    /// One round of the autoscaler (for every autoscaled deployment, or only `only`).
    pub async fn autoscale(&self, only: Option<&str>) {
        let decisions = {
            let mut inner = self.lock();
            sample_and_decide(&mut inner.state, self.now_ms(), Instant::now(), only)
        };
        for (name, d) in decisions {
            self.apply_decision(&name, d).await;
        }
    }

    async fn apply_decision(&self, name: &str, d: Decision) {
        info!(deployment = name, from = d.from, to = d.to, load = d.load, reason = %d.reason, "autoscaling");
        crate::metrics::autoscaled(name, if d.to > d.from { "up" } else { "down" });
        let result = match self.scaler_for(name) {
            Some(scaler) => {
                {
                    let mut inner = self.lock();
                    inner.state.event(name, EventKind::Autoscaled, d.reason.clone());
                    self.publish(&mut inner);
                }
                scaler.scale(name, d.to).await.map_err(ClusterError::Internal)
            }
            None => self.scale_with(name, d.to, Some((EventKind::Autoscaled, d.reason.clone()))).await.map(|_| ()),
        };
        if let Err(e) = result {
            warn!(deployment = name, to = d.to, error = %e, "could not apply the autoscaler's decision; asking again next round");
            if let Some(dep) = self.lock().state.deployments.get_mut(name) {
                dep.autoscaler.asked = None;
            }
        }
    }

    /// Whether requests for `name` may wait for a replica to come up (it autoscales).
    pub fn autoscaled(&self, name: &str) -> bool {
        self.lock().state.deployments.get(name).is_some_and(|d| d.record.spec.autoscaling.is_some())
    }

    /// Waits until `name` has a ready replica the request has not failed on (`avoid`), asking
    /// the autoscaler for one at once. Refused when `max_waiting` requests wait already, with
    /// the reason when nothing can come up (no GPU has room), and when `deadline` or
    /// `cold_start_timeout` passes first.
    pub async fn wait_for_replica(
        &self,
        name: &str,
        avoid: &[(String, String)],
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), ClusterError> {
        let start = tokio::time::Instant::now();
        let (_waiting, mut changes) = {
            let inner = self.lock();
            let d = inner.state.deployments.get(name).ok_or_else(|| view::not_found(&inner.state, name))?;
            let counter = d.autoscaler.waiting.clone();
            let max = self.config.max_waiting;
            if counter.fetch_add(1, Ordering::Relaxed) as usize >= max {
                counter.fetch_sub(1, Ordering::Relaxed);
                return Err(ClusterError::Exhausted(format!(
                    "{max} requests already wait for a replica of `{name}` to come up (the controller's --max-waiting); retry later"
                )));
            }
            (Waiting(counter), self.changes.subscribe())
        };
        self.autoscale(Some(name)).await;
        let limit = start + self.config.cold_start_timeout;
        let until = deadline.map_or(limit, |d| d.min(limit));
        loop {
            let now_outlook = {
                let inner = self.lock();
                outlook(&inner.state, name, avoid)?
            };
            match now_outlook {
                Outlook::Ready => return Ok(()),
                Outlook::Stuck(reason) => return Err(ClusterError::NoReadyReplica(reason)),
                Outlook::ComingUp => {}
            }
            let sleep = tokio::time::sleep_until(until);
            tokio::select! {
                r = changes.recv() => {
                    if let Err(RecvError::Closed) = r {
                        return Err(ClusterError::NoReadyReplica("the controller is stopping".into()));
                    }
                }
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                () = sleep => {
                    let waited = start.elapsed().as_secs_f64();
                    let reason = {
                        let inner = self.lock();
                        match inner.state.deployments.get(name) {
                            Some(d) => view::no_replica_reason(name, d, &[]),
                            None => String::new(),
                        }
                    };
                    return Err(if deadline.is_some_and(|d| d <= limit) {
                        ClusterError::DeadlineExceeded(format!(
                            "the request's deadline passed after {waited:.1} s waiting for a replica of `{name}` to come up: {reason}"
                        ))
                    } else {
                        ClusterError::NoReadyReplica(format!(
                            "no replica of `{name}` came up within {waited:.0} s (the controller's --cold-start-timeout): {reason}"
                        ))
                    });
                }
            }
        }
    }
}

impl Cluster {
    /// Each deployment's replica count and signals now (for `/metrics`).
    pub fn signals(&self) -> Vec<(String, u32, Signals)> {
        let inner = self.lock();
        let st = &inner.state;
        let at = self.now_ms();
        st.deployments
            .iter()
            .filter_map(|(n, d)| signals(st, n, at).map(|s| (n.clone(), d.record.spec.replicas, s)))
            .collect()
    }
}
