//! Choosing a replica for a request: two ready replicas at random, the less loaded of them
//! (power of two choices), leaving out those that already failed the request. A request of a
//! session (a multi-turn chat: `X-Session-Id`, or OpenAI's `user`) goes back to the replica that
//! served the session last, where its earlier turns are in the prefix cache, unless that
//! replica is overloaded ([`overloaded`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use crate::cluster::Cluster;
use crate::cluster::state::{ReplicaState, replica_model_id};
use crate::cluster::view::{no_replica_reason, not_found};
use crate::error::ClusterError;

/// A ready replica the router may send a request to.
#[derive(Debug, Clone)]
pub struct Target {
    pub worker: String,
    pub model_id: String,
    pub channel: Channel,
    pub inflight: Arc<AtomicU32>,
}

/// Sessions remembered at most; past it, sessions idle longer than [`SESSION_IDLE`] are
/// forgotten, and new ones are not remembered until there is room.
pub const MAX_SESSIONS: usize = 100_000;
/// A session idle this long is forgotten when room is needed.
pub const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);

/// The replica each session was last routed to: (deployment, session) → (worker, replica id,
/// when).
#[derive(Debug, Default)]
pub struct Sessions {
    last: HashMap<(String, String), (String, String, Instant)>,
}

impl Sessions {
    fn get(&self, model: &str, session: &str) -> Option<&(String, String, Instant)> {
        self.last.get(&(model.to_string(), session.to_string()))
    }

    fn record(&mut self, model: &str, session: &str, target: &Target, now: Instant) {
        let key = (model.to_string(), session.to_string());
        if !self.last.contains_key(&key) && self.last.len() >= MAX_SESSIONS {
            self.last.retain(|_, (_, _, at)| now.saturating_duration_since(*at) < SESSION_IDLE);
            if self.last.len() >= MAX_SESSIONS {
                return;
            }
        }
        self.last.insert(key, (target.worker.clone(), target.model_id.clone(), now));
    }

    /// Sessions remembered.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

/// Whether a replica with `load` requests (in flight and queued) is too busy to keep its
/// sessions, when the least loaded ready replica has `least`: more than twice as many, and at
/// least two more.
pub fn overloaded(load: u64, least: u64) -> bool {
    load > least.saturating_mul(2).max(least + 2)
}

impl Cluster {
    /// Two ready replicas of `model` at random, the less loaded of them (power of two choices),
    /// leaving out `avoid` (replicas that failed this request, as worker and replica id); for a
    /// `session`, the replica it last went to unless that one is [`overloaded`].
    pub fn pick(&self, model: &str, avoid: &[(String, String)], session: Option<&str>) -> Result<Target, ClusterError> {
        let target = self.pick_ready(model, avoid, session)?;
        if let Some(s) = session {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sessions.record(model, s, &target, Instant::now());
        }
        Ok(target)
    }

    fn pick_ready(
        &self,
        model: &str,
        avoid: &[(String, String)],
        session: Option<&str>,
    ) -> Result<Target, ClusterError> {
        let inner = self.lock();
        let st = &inner.state;
        let d = st.deployments.get(model).ok_or_else(|| not_found(st, model))?;
        let mut ready: Vec<Target> = Vec::new();
        let mut load: Vec<u64> = Vec::new();
        let mut failed_here = Vec::new();
        for (&i, r) in &d.replicas {
            if r.state != ReplicaState::Ready {
                continue;
            }
            let Some(stage) = r.placement.as_ref().and_then(|p| p.stages.first()) else { continue };
            let Some(w) = st.workers.get(&stage.node).filter(|w| !w.lost) else { continue };
            let Some(link) = inner.links.get(&w.id) else { continue };
            let model_id = replica_model_id(model, i);
            if avoid.iter().any(|(worker, id)| *worker == w.id && *id == model_id) {
                failed_here.push(i);
                continue;
            }
            let queued = w.model(&model_id).map_or(0, |m| u64::from(m.queued));
            load.push(u64::from(r.inflight.load(Ordering::Relaxed)) + queued);
            ready.push(Target {
                worker: w.id.clone(),
                model_id,
                channel: link.channel.clone(),
                inflight: r.inflight.clone(),
            });
        }
        if let Some(s) = session
            && let Some(i) = self.session_target(model, s, &ready)
        {
            let least = load.iter().copied().min().unwrap_or(0);
            if !overloaded(load[i], least) {
                return Ok(ready.swap_remove(i));
            }
        }
        match ready.len() {
            0 => Err(ClusterError::NoReadyReplica(no_replica_reason(model, d, &failed_here))),
            1 => Ok(ready.swap_remove(0)),
            n => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let pick = if load[b] < load[a] { b } else { a };
                Ok(ready.swap_remove(pick))
            }
        }
    }

    /// Where in `ready` the replica `session` last went to is (the sessions' lock is taken
    /// under the cluster's, never the other way round).
    fn session_target(&self, model: &str, session: &str, ready: &[Target]) -> Option<usize> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let (worker, id, _) = sessions.get(model, session)?;
        ready.iter().position(|t| t.worker == *worker && t.model_id == *id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_keeps_its_replica_until_it_is_overloaded() {
        // Twice the least loaded and two more: 0 → 3, 1 → 4, 4 → 9.
        assert!(!overloaded(2, 0) && overloaded(3, 0));
        assert!(!overloaded(3, 1) && overloaded(4, 1));
        assert!(!overloaded(8, 4) && overloaded(9, 4));
        assert!(!overloaded(0, 0));
    }

    #[test]
    fn a_client_id_is_printable_and_bounded() {
        use crate::router::client_id;
        assert_eq!(client_id(" chat-7 ").as_deref(), Some("chat-7"));
        assert_eq!(client_id(""), None);
        assert_eq!(client_id("two words"), None);
        assert_eq!(client_id("é"), None);
        assert_eq!(client_id(&"x".repeat(129)), None);
        assert_eq!(client_id(&"x".repeat(128)).map(|s| s.len()), Some(128));
    }

    #[tokio::test]
    async fn sessions_are_bounded_and_idle_ones_make_room() {
        let (channel, inflight) =
            (tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy(), Arc::default());
        let t = Target { worker: "w".into(), model_id: "m-0".into(), channel, inflight };
        let mut s = Sessions::default();
        let start = Instant::now();
        for i in 0..MAX_SESSIONS {
            s.record("m", &format!("s{i}"), &t, start);
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        // Full: a new session is not remembered while every one is fresh…
        s.record("m", "new", &t, start + Duration::from_secs(1));
        assert!(s.get("m", "new").is_none() && s.len() == MAX_SESSIONS);
        // …and a known one is still updated.
        s.record("m", "s1", &t, start + Duration::from_secs(2));
        assert_eq!(s.get("m", "s1").map(|x| x.2), Some(start + Duration::from_secs(2)));
        // Once they have been idle past SESSION_IDLE, they make room.
        s.record("m", "new", &t, start + SESSION_IDLE + Duration::from_secs(1));
        assert!(s.get("m", "new").is_some());
        assert_eq!(s.len(), 2, "only s1 (used later) and the new one stay");
    }
}
