//! What the controller keeps in its state store, and how: deployment records are written before
//! an API call returns; placements and worker records are written in order by one background
//! writer that keeps what the store refused and writes it when the store answers again.
//! [`restore`] reads it all back when a controller starts leading.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::state::{Deployment, PlacementRecord, Replica, ReplicaState, State, parse_replica_model_id};
use crate::spec::{DeploymentRecord, size_model_async};
use crate::statestore::{StateStore, StateStoreError};

/// How often writes the store refused are tried again.
const WRITE_RETRY: Duration = Duration::from_secs(1);

/// A write for the store, applied in order by the writer task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOp {
    Put(String, Vec<u8>),
    Delete(String),
    DeletePrefix(String),
}

/// A record as the store keeps it (JSON).
pub fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// Writes placements and worker records to the store in the background. A write the store
/// refuses (etcd unreachable) is kept and tried again until it lands, the latest for each key
/// winning, so the store catches up with what happened while it was away. Keys are written in
/// order, so a prefix's removal lands before later writes under it.
pub async fn write_behind(store: Arc<dyn StateStore>, mut rx: mpsc::UnboundedReceiver<StoreOp>) {
    let mut pending: BTreeMap<String, StoreOp> = BTreeMap::new();
    let mut failing = false;
    loop {
        // `None`: time to retry what is pending.
        let received = if pending.is_empty() {
            Some(rx.recv().await)
        } else {
            tokio::time::timeout(WRITE_RETRY, rx.recv()).await.ok()
        };
        match received {
            Some(None) => return,
            Some(Some(op)) => {
                queue_write(&mut pending, op);
                while let Ok(op) = rx.try_recv() {
                    queue_write(&mut pending, op);
                }
            }
            None => {}
        }
        while let Some((key, op)) = pending.pop_first() {
            let result = match &op {
                StoreOp::Put(k, value) => store.put(k, value.clone()).await,
                StoreOp::Delete(k) => store.delete(k).await.map(|_| ()),
                StoreOp::DeletePrefix(prefix) => store.delete_prefix(prefix).await.map(|_| ()),
            };
            if let Err(e) = result {
                if !failing {
                    warn!(key, error = %e, "could not write to the state store; keeping the change to write when it answers");
                    failing = true;
                }
                // The store is away: the rest would fail the same way.
                pending.insert(key, op);
                break;
            }
        }
        if failing && pending.is_empty() {
            info!("the state store answers again; the changes made meanwhile are written");
            failing = false;
        }
    }
}

/// Adds a write to those pending: the latest for a key replaces an earlier one, and a prefix's
/// removal replaces pending writes under it.
fn queue_write(pending: &mut BTreeMap<String, StoreOp>, op: StoreOp) {
    let key = match &op {
        StoreOp::Put(k, _) | StoreOp::Delete(k) => k.clone(),
        StoreOp::DeletePrefix(prefix) => {
            pending.retain(|k, _| !k.starts_with(prefix.as_str()));
            prefix.clone()
        }
    };
    pending.insert(key, op);
}

/// The deployments and placements in `store`: each restored placement waits for its workers
/// to reconnect (`Loading`); a placement of a deleted deployment is removed.
pub async fn restore(store: &dyn StateStore) -> Result<State, StateStoreError> {
    let mut state = State::default();
    for (key, value) in store.list("deployments/").await? {
        let record: DeploymentRecord = match serde_json::from_slice(&value) {
            Ok(r) => r,
            Err(e) => {
                warn!(key, error = %e, "skipping an unreadable deployment record");
                continue;
            }
        };
        // A URL source is sized over the network after start (`Cluster::size_restored`): a slow
        // or hostile server must not hold up the leader's start.
        let sized = if gantry_store::url::is_url(&record.spec.source) {
            Err(format!("sizing {} from its header (after the controller's start)", record.spec.source))
        } else {
            size_model_async(&record.spec).await
        };
        state.deployments.insert(record.name.clone(), Deployment::new(record, sized));
    }
    for (key, value) in store.list("placements/").await? {
        let Some((name, index)) = key.strip_prefix("placements/").and_then(parse_replica_model_id) else { continue };
        let Ok(placement) = serde_json::from_slice::<PlacementRecord>(&value) else { continue };
        let Some(d) = state.deployments.get_mut(name) else {
            // A placement of a deleted deployment: forget it.
            let _ = store.delete(&key).await;
            continue;
        };
        let workers: Vec<&str> = placement.stages.iter().map(|s| s.node.as_str()).collect();
        let mut r = Replica::pending(format!("waiting for {} to reconnect", workers.join(", ")));
        r.state = ReplicaState::Loading;
        r.placement = Some(placement);
        d.replicas.insert(index, r);
    }
    // The credential each worker id is bound to.
    for (key, value) in store.list("workers/").await? {
        let Some(id) = key.strip_prefix("workers/") else { continue };
        let credential = serde_json::from_slice::<serde_json::Value>(&value)
            .ok()
            .and_then(|v| v.get("credential").and_then(|c| c.as_str()).map(str::to_string));
        if let Some(c) = credential {
            state.worker_credentials.insert(id.to_string(), c);
        }
    }
    // What models really took, per (digest, device kind); the newest within the bound.
    let mut measured: Vec<gantry_core::measured::Measurement> = Vec::new();
    for (key, value) in store.list(super::measured::PREFIX).await? {
        match serde_json::from_slice(&value) {
            Ok(m) => measured.push(m),
            Err(e) => warn!(key, error = %e, "skipping an unreadable measurement"),
        }
    }
    measured.sort_by_key(|m| std::cmp::Reverse(m.measured_at_ms));
    for m in measured.into_iter().take(super::measured::MAX_MEASUREMENTS) {
        state.measurements.restore(m);
    }
    let restored: usize = state.deployments.values().map(|d| d.replicas.len()).sum();
    if !state.deployments.is_empty() {
        info!(deployments = state.deployments.len(), placements = restored, store = %store.describe(), "restored state");
    }
    Ok(state)
}

/// A retry wait that doubles per failure: 2 s, 4 s … up to a minute.
pub fn retry_after(failures: u32) -> Duration {
    const FIRST_RETRY: Duration = Duration::from_secs(2);
    const MAX_RETRY: Duration = Duration::from_secs(60);
    FIRST_RETRY.saturating_mul(1 << failures.min(5).saturating_sub(1)).min(MAX_RETRY)
}

/// When a replica that failed `failures` times may be tried again.
pub fn retry_at(now: Instant, failures: u32) -> Instant {
    now + retry_after(failures)
}
