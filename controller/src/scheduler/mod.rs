//! The scheduler's decisions: from the state, what to do so the actual replicas follow the
//! desired ones. [`reconcile`] drops replicas past the desired count or of an older
//! generation, places pending ones with `gantry_core::placement` against each GPU's memory net
//! of reservations, and records the placements; [`expire`] declares workers lost whose lease
//! ran out. Both change the state (reservations, reasons, events) and return the [`Effect`]s
//! for the cluster to carry out — commands on worker links, store writes, metrics — so they
//! run without processes in tests.

mod commands;
mod place;
mod snapshot;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

use gantry_proto::v1 as pb;

pub use commands::worker_lost;
pub use snapshot::nodes;

use crate::cluster::events::EventKind;
use crate::cluster::persist::StoreOp;
use crate::cluster::state::{Replica, ReplicaState, State};
use crate::config::ControllerConfig;

/// Extra time a restored placement's worker has to reconnect after a controller restart
/// (the worker link's longest backoff, plus a little).
pub const RESTORE_GRACE: Duration = Duration::from_secs(12);

/// Something the cluster must do after a decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send a command on a worker's link.
    Send { worker: String, message: pb::controller_message::Message },
    /// Close a worker's link (it was declared lost): the worker reconnects and registers again.
    CloseLink(String),
    /// Write to the state store (in order, in the background).
    Persist(StoreOp),
    /// A replica could not be placed, for this reason (`unschedulable`, `no_workers` …): a
    /// metric, counted once per new reason.
    PlacementFailed(&'static str),
}

/// Makes the actual state follow the desired one: replicas past the desired count go (highest
/// first) and are unloaded, replicas placed for an older generation are replaced, missing
/// replicas are created, and pending ones (failed ones once their retry time has come) are
/// placed — deployments in name order, replicas in index order.
pub fn reconcile(st: &mut State, config: &ControllerConfig, now: Instant) -> Vec<Effect> {
    let mut effects = Vec::new();
    let names: Vec<String> = st.deployments.keys().cloned().collect();
    for name in &names {
        let Some(d) = st.deployments.get_mut(name) else { continue };
        let want = d.record.spec.replicas;
        let generation = d.record.generation;
        let extra: Vec<u32> = d.replicas.keys().copied().filter(|&i| i >= want).rev().collect();
        // A new generation replaces replicas placed for an older one.
        let stale: Vec<u32> = d
            .replicas
            .iter()
            .filter(|(_, r)| r.placement.as_ref().is_some_and(|p| p.generation != generation))
            .map(|(&i, _)| i)
            .collect();
        let mut removed: Vec<(u32, Replica)> = Vec::new();
        for i in extra.into_iter().chain(stale) {
            if let Some(r) = d.replicas.remove(&i) {
                removed.push((i, r));
            }
        }
        for i in 0..want {
            d.replicas.entry(i).or_insert_with(|| Replica::pending("waiting to be placed"));
        }
        for (i, r) in &removed {
            effects.extend(commands::unload_replica(st, name, *i, r));
        }
    }
    for name in &names {
        let pending: Vec<u32> = match st.deployments.get(name) {
            Some(d) => d
                .replicas
                .iter()
                .filter(|(_, r)| {
                    matches!(r.state, ReplicaState::Pending | ReplicaState::Failed)
                        && r.placement.is_none()
                        && r.retry_at.is_none_or(|t| now >= t)
                })
                .map(|(&i, _)| i)
                .collect(),
            None => continue,
        };
        for i in pending {
            effects.extend(place::place_replica(st, config, name, i));
        }
    }
    effects
}

/// Time-driven decisions: workers silent past their lease are lost (their replicas placed
/// again), and placements restored from the store whose worker never came back are released
/// once the worker has had its lease and the reconnect backoff to return.
pub fn expire(st: &mut State, config: &ControllerConfig, now: Instant, started: Instant) -> Vec<Effect> {
    let mut effects = Vec::new();
    let lost: Vec<String> = st
        .workers
        .values()
        .filter(|w| !w.lost && now.duration_since(w.last_seen) > config.lease)
        .map(|w| w.id.clone())
        .collect();
    for id in lost {
        effects.extend(worker_lost(st, config, &id, now));
    }
    if now.duration_since(started) > config.lease + RESTORE_GRACE {
        let known: Vec<String> = st.workers.iter().filter(|(_, w)| !w.lost).map(|(k, _)| k.clone()).collect();
        let mut orphaned = Vec::new();
        for (name, d) in &st.deployments {
            for (&i, r) in &d.replicas {
                if let Some(p) = &r.placement
                    && let Some(s) = p.stages.iter().find(|s| !known.contains(&s.node))
                {
                    orphaned.push((name.clone(), i, s.node.clone()));
                }
            }
        }
        for (name, i, worker) in orphaned {
            let msg = format!("worker {worker} did not come back within its lease; replica {i} is placed again");
            effects.extend(commands::release(st, &name, i, ReplicaState::Pending, &msg));
            st.event(&name, EventKind::WorkerLost, msg);
        }
    }
    effects
}

pub(crate) use commands::{load_replica, release, unload_model, unload_replica, unload_stages};
