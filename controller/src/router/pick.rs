//! Choosing a replica for a request: two ready replicas at random, the less loaded of them
//! (power of two choices), leaving out those that already failed the request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

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

impl Cluster {
    /// Two ready replicas of `model` at random, the less loaded of them (power of two choices),
    /// leaving out `avoid` (replicas that failed this request, as worker and replica id).
    pub fn pick(&self, model: &str, avoid: &[(String, String)]) -> Result<Target, ClusterError> {
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
}
