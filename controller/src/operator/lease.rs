//! Leader election with a `coordination.k8s.io/v1` Lease, so several controller pods can run
//! and one acts. The holder renews the Lease every third of its duration; a candidate takes it
//! over once the holder has not renewed it for a whole duration. Every write carries the
//! Lease's `resourceVersion`, so two candidates racing for it cannot both win: the API server
//! accepts one write and refuses the other with 409 Conflict.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, Error};
use tokio::sync::watch;
use tracing::{info, warn};

/// One candidate for a Lease.
#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

/// Who holds the Lease, when it is not this candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This candidate holds it now.
    Held,
    /// Another does (its identity), and renewed it within the Lease's duration.
    HeldBy(String),
}

fn is_conflict(e: &Error) -> bool {
    matches!(e, Error::Api(s) if s.code == 409)
}

impl std::fmt::Debug for LeaseLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseLock").field("name", &self.name).field("identity", &self.identity).finish_non_exhaustive()
    }
}

impl LeaseLock {
    /// `identity`: this pod (its name); `duration`: how long the Lease lasts unrenewed.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> LeaseLock {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration: duration.max(Duration::from_secs(2)),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Takes the Lease if it is free or expired, renews it if held: one round.
    pub async fn try_acquire_or_renew(&self) -> Result<Attempt, Error> {
        let now = Timestamp::now();
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                spec: Some(self.spec(now, None, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(e) if is_conflict(&e) => Ok(Attempt::HeldBy("another candidate (it was just created)".into())),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.identity.as_str());
        let lasts = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15).max(1)));
        let expired = spec.renew_time.as_ref().is_none_or(|t| t.0.checked_add(lasts).is_ok_and(|end| end < now));
        if !ours
            && !expired
            && let Some(h) = holder
        {
            return Ok(Attempt::HeldBy(h));
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours { spec.acquire_time.clone() } else { None };
        let renewed = Lease { metadata: lease.metadata.clone(), spec: Some(self.spec(now, acquired, transitions)) };
        match self.api.replace(&self.name, &PostParams::default(), &renewed).await {
            Ok(_) => Ok(Attempt::Held),
            Err(e) if is_conflict(&e) => Ok(Attempt::HeldBy("another candidate (it renewed first)".into())),
            Err(e) => Err(e),
        }
    }

    /// Waits until this candidate holds the Lease; `waiting` is called once with the holder
    /// when another holds it.
    pub async fn acquire(&self, mut waiting: impl FnMut(&str)) {
        let mut told = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Held) => {
                    info!(lease = %self.name, identity = %self.identity, "holding the Lease");
                    return;
                }
                Ok(Attempt::HeldBy(holder)) if !told => {
                    waiting(&holder);
                    told = true;
                }
                Ok(Attempt::HeldBy(_)) => {}
                Err(e) => warn!(lease = %self.name, error = %e, "could not read or take the Lease; retrying"),
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Renews the Lease in the background; `lost` turns true when another candidate holds it,
    /// or when it could not be renewed for a whole duration (another may have taken it).
    pub fn keep(self) -> watch::Receiver<bool> {
        let (lost_tx, lost) = watch::channel(false);
        tokio::spawn(async move {
            let mut last = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(self.duration / 3).await;
                match self.try_acquire_or_renew().await {
                    Ok(Attempt::Held) => last = tokio::time::Instant::now(),
                    Ok(Attempt::HeldBy(holder)) => {
                        warn!(lease = %self.name, holder, "another candidate holds the Lease now");
                        break;
                    }
                    Err(e) if last.elapsed() >= self.duration => {
                        warn!(lease = %self.name, error = %e, "could not renew the Lease for its whole duration");
                        break;
                    }
                    Err(e) => warn!(lease = %self.name, error = %e, "renewing the Lease failed; retrying"),
                }
            }
            lost_tx.send_replace(true);
        });
        lost
    }
}

/// The label the leader puts on its own pod: the chart's Service selects it, so requests and
/// workers reach the leader while every controller pod, standbys included, can be Ready.
pub const LEADER_LABEL: &str = "gantry.dev/leader";

/// Labels pod `pod` as the leader (`true`), or removes the label (a pod starting, or
/// restarted after losing the Lease, is not the leader until it holds the Lease again).
pub async fn mark_leader(client: Client, namespace: &str, pod: &str, leader: bool) -> Result<(), Error> {
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let value = if leader { serde_json::json!("true") } else { serde_json::Value::Null };
    let patch = serde_json::json!({ "metadata": { "labels": { LEADER_LABEL: value } } });
    pods.patch(pod, &PatchParams::default(), &Patch::Merge(patch)).await.map(|_| ())
}
