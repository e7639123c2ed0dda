//! The Kubernetes operator: `ModelDeployment` resources feed the same desired state as the
//! gRPC `Deployments` API, and their status shows what the controller did with them.
//!
//! * [`reconcile`] puts a finalizer on each resource, reads its Hugging Face token Secret,
//!   applies its spec to the [`Cluster`] (the same call `gantry deploy` makes), publishes the
//!   cluster's events for it as Kubernetes events (placement, loss, failure), and writes the
//!   status (replicas, ready replicas, stages per replica, conditions, observed generation,
//!   the label selector the scale subresource reports).
//! * Deleting a resource unloads its replicas and frees their memory before the finalizer is
//!   removed, so nothing is left running.
//! * Errors are retried with an exponential backoff per resource (1 s doubling to 5 min).
//! * [`lease`] elects one active controller among several pods with a `Lease`.
//!
//! Tested against a scripted API server (`controller/tests/operator.rs`, `tower-test`).

pub mod crd;
pub mod lease;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use gantry_proto::v1 as pb;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalized, finalizer};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::cluster::Cluster;
use crate::cluster::events::EventKind;
use crate::error::ClusterError;
use crate::spec::{DeploymentSpec, SamplingDefaults, check_name};
use crd::{
    AutoscalingMetric, ModelDeployment, ModelDeploymentStatus, ModelSource, ReplicaStatus, StageStatus, Strategy,
    WireDtype,
};

/// The finalizer that holds a resource until its replicas are unloaded.
pub const FINALIZER: &str = "gantry.dev/unload";

/// Whom events and status patches come from.
pub const MANAGER: &str = "gantry-controller";

/// The owner of autoscaled resources' replica counts: the autoscaler's decisions are written to
/// `spec.replicas` through the scale subresource (as `kubectl scale` does), and the change comes
/// back to the cluster through [`reconcile`], so the resource and the cluster never disagree.
pub struct KubeScaler {
    client: Client,
    /// The resources this operator applied: name → namespace.
    managed: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for KubeScaler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeScaler").field("managed", &self.managed).finish_non_exhaustive()
    }
}

impl KubeScaler {
    fn manage(&self, name: &str, namespace: Option<&str>) {
        if let Ok(mut m) = self.managed.lock() {
            match namespace {
                Some(ns) => m.insert(name.to_string(), ns.to_string()),
                None => m.remove(name),
            };
        }
    }
}

impl crate::cluster::autoscale::Scaler for KubeScaler {
    fn manages(&self, name: &str) -> bool {
        self.managed.lock().is_ok_and(|m| m.contains_key(name))
    }

    fn scale<'a>(
        &'a self,
        name: &'a str,
        replicas: u32,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let ns = self.managed.lock().ok().and_then(|m| m.get(name).cloned()).unwrap_or_else(|| "default".into());
            let api: Api<ModelDeployment> = Api::namespaced(self.client.clone(), &ns);
            let patch = Patch::Merge(json!({ "spec": { "replicas": replicas } }));
            api.patch_scale(name, &PatchParams::default(), &patch)
                .await
                .map(
                    |_| info!(resource = %name, replicas, "autoscaler set spec.replicas through the scale subresource"),
                )
                .map_err(|e| format!("patching {ns}/{name}'s scale subresource: {e}"))
        })
    }
}

/// What the reconciler needs.
pub struct Context {
    pub client: Client,
    pub cluster: Arc<Cluster>,
    pub recorder: Recorder,
    /// Writes the autoscaler's counts to the resources.
    pub scaler: Arc<KubeScaler>,
    /// The Secrets `hfTokenSecret` may name (`--hf-token-secrets`); `None`: any in the namespace
    /// (the Role's RBAC is then the only bound).
    pub allowed_secrets: Option<Vec<String>>,
    /// Consecutive failures per resource, for the backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("cluster", &self.cluster).finish_non_exhaustive()
    }
}

impl Context {
    /// `instance`: this pod's name, on the events it publishes.
    pub fn new(client: Client, cluster: Arc<Cluster>, instance: &str) -> Arc<Context> {
        let reporter = Reporter { controller: MANAGER.into(), instance: Some(instance.to_string()) };
        let recorder = Recorder::new(client.clone(), reporter);
        let scaler = Arc::new(KubeScaler { client: client.clone(), managed: Mutex::default() });
        cluster.set_scaler(scaler.clone());
        Arc::new(Context { client, cluster, recorder, scaler, allowed_secrets: None, failures: Mutex::default() })
    }

    /// This context, letting `hfTokenSecret` name only `names`.
    pub fn with_allowed_secrets(self: Arc<Context>, names: Vec<String>) -> Arc<Context> {
        let mut ctx = Arc::into_inner(self).expect("set before the context is shared");
        ctx.allowed_secrets = Some(names);
        Arc::new(ctx)
    }
}

/// What went wrong reconciling a resource (retried with a backoff).
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the controller: {0}")]
    Cluster(String),
    #[error("{0}")]
    Finalizer(String),
}

impl From<ClusterError> for OperatorError {
    fn from(e: ClusterError) -> OperatorError {
        OperatorError::Cluster(e.to_string())
    }
}

/// The gantry spec a resource asks for, or why it cannot be one.
pub fn to_spec(md: &ModelDeployment) -> Result<DeploymentSpec, String> {
    let s = &md.spec;
    let source = match &s.model {
        ModelSource::Hub(h) => {
            let mut id = h.id.trim().to_string();
            if let Some(rev) = h.revision.as_deref().filter(|r| !r.is_empty()) {
                id = format!("{id}@{rev}");
            }
            if let Some(file) = h.file.as_deref().filter(|f| !f.is_empty()) {
                id = format!("{id}:{file}");
            }
            id
        }
        ModelSource::Url(u) => u.trim().to_string(),
        ModelSource::Path(p) => p.trim().to_string(),
    };
    let placement = s.placement.clone().unwrap_or_default();
    let spec = pb::DeploymentSpec {
        source,
        dtype: s.dtype.clone().unwrap_or_default(),
        context_length: s.context_length.unwrap_or(0),
        replicas: s.replicas,
        placement: Some(pb::PlacementPolicy {
            strategy: match placement.strategy {
                Some(Strategy::Spread) => pb::PlacementStrategy::Spread,
                _ => pb::PlacementStrategy::Binpack,
            } as i32,
            node_selector: placement.node_selector.into_iter().collect(),
            gpu_name: placement.gpu_name.unwrap_or_default(),
            allow_multi_node: placement.allow_multi_node,
        }),
        stage_wire_dtype: match s.stage_wire_dtype {
            None | Some(WireDtype::F32) => String::new(),
            Some(WireDtype::F16) => "f16".into(),
            Some(WireDtype::Bf16) => "bf16".into(),
        },
        sampling_defaults: s.sampling.as_ref().map(|d| {
            SamplingDefaults {
                temperature: d.temperature,
                top_k: d.top_k,
                top_p: d.top_p,
                min_p: None,
                repetition_penalty: d.repetition_penalty,
                max_tokens: d.max_tokens,
            }
            .to_proto()
        }),
        autoscaling: s.autoscaling.as_ref().map(|a| pb::AutoscalingPolicy {
            min_replicas: a.min_replicas,
            max_replicas: a.max_replicas,
            metric: match a.metric {
                None | Some(AutoscalingMetric::InFlight) => pb::AutoscalingMetric::InFlight,
                Some(AutoscalingMetric::Queue) => pb::AutoscalingMetric::Queue,
                Some(AutoscalingMetric::KvUtilization) => pb::AutoscalingMetric::KvUtilization,
            } as i32,
            target: a.target,
            scale_up_window_s: a.scale_up_window_seconds.unwrap_or(0),
            scale_down_delay_s: a.scale_down_delay_seconds,
            scale_to_zero_after_s: a.scale_to_zero_after_seconds,
        }),
    };
    DeploymentSpec::from_proto(Some(spec)).map_err(|e| e.to_string())
}

/// The label selector the scale subresource reports (`app.kubernetes.io/instance=NAME`).
pub fn selector(name: &str) -> String {
    format!("app.kubernetes.io/managed-by={MANAGER},gantry.dev/deployment={name}")
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// The status for `d` as the cluster has it, keeping transition times of conditions that did
/// not change.
pub fn status_of(md: &ModelDeployment, d: &pb::Deployment, last_event_ms: u64) -> ModelDeploymentStatus {
    let st = d.status.clone().unwrap_or_default();
    let spec = d.spec.clone().unwrap_or_default();
    let name = md.name_any();
    let replicas: Vec<ReplicaStatus> = st
        .replica_status
        .iter()
        .map(|r| ReplicaStatus {
            index: r.index,
            state: gantry_proto::replica_state_name(r.state).into(),
            stages: r
                .stages
                .iter()
                .map(|s| StageStatus {
                    node: s.worker_id.clone(),
                    gpu: s.gpu_index,
                    layers: gantry_core::shard::layer_span(&(s.layer_start..s.layer_end)),
                    vram: gib(s.reserved_bytes),
                    tensor_parallel: (s.tensor_parallel > 1).then_some(s.tensor_parallel),
                })
                .collect(),
            reason: if r.reason.is_empty() { r.progress.clone() } else { r.reason.clone() },
        })
        .collect();
    let waiting: Vec<String> = replicas
        .iter()
        .filter(|r| r.state != "Ready" && !r.reason.is_empty())
        .map(|r| format!("replica {}: {}", r.index, r.reason))
        .collect();
    let previous = md.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    let condition = |type_: &str, on: bool, reason: &str, message: String| {
        let status = if on { "True" } else { "False" };
        let since = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or_else(now_rfc3339, |c| c.last_transition_time.clone());
        crd::Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: since,
        }
    };
    let ready = st.ready_replicas;
    let want = spec.replicas;
    let phase = if st.phase.is_empty() { "Pending".to_string() } else { st.phase.clone() };
    let summary = if waiting.is_empty() { format!("{ready} of {want} replicas ready") } else { waiting.join("; ") };
    let conditions = vec![
        if phase == "ScaledToZero" {
            condition(
                "Ready",
                false,
                "ScaledToZero",
                "scaled to zero while idle; the next request starts a replica".into(),
            )
        } else {
            condition(
                "Ready",
                want > 0 && ready >= want,
                if ready >= want { "AllReplicasReady" } else { "ReplicasNotReady" },
                format!("{ready} of {want} replicas ready"),
            )
        },
        condition(
            "Progressing",
            replicas.iter().any(|r| r.state == "Loading"),
            if replicas.iter().any(|r| r.state == "Loading") { "Loading" } else { "Settled" },
            summary.clone(),
        ),
        condition(
            "Degraded",
            phase == "Degraded" || phase == "Pending" && want > 0,
            match phase.as_str() {
                "Degraded" => "ReplicasLost",
                "Pending" => "Pending",
                _ => "AsExpected",
            },
            summary,
        ),
    ];
    ModelDeploymentStatus {
        replicas: replicas.len() as u32,
        ready_replicas: ready,
        selector: selector(&name),
        observed_generation: md.metadata.generation.unwrap_or(0),
        phase,
        model: spec.source,
        vram_per_replica: if st.replica_bytes > 0 { gib(st.replica_bytes) } else { String::new() },
        replica_status: replicas,
        conditions,
        last_event_ms,
    }
}

/// Whether a cluster event (by its kind's name) means something went wrong.
fn warning(kind: &str) -> bool {
    EventKind::from_name(kind).is_some_and(EventKind::is_warning)
}

async fn publish(ctx: &Context, md: &ModelDeployment, type_: EventType, reason: &str, note: String) {
    let ev = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &md.object_ref(&())).await {
        warn!(resource = %md.name_any(), error = %e, "could not publish an event");
    }
}

/// A status that says why the resource cannot be served, with an event.
async fn refuse(
    ctx: &Context,
    api: &Api<ModelDeployment>,
    md: &ModelDeployment,
    reason: &str,
    message: String,
) -> Result<(), OperatorError> {
    publish(ctx, md, EventType::Warning, reason, message.clone()).await;
    let status = ModelDeploymentStatus {
        selector: selector(&md.name_any()),
        observed_generation: md.metadata.generation.unwrap_or(0),
        phase: "Pending".into(),
        conditions: vec![crd::Condition {
            type_: "Ready".into(),
            status: "False".into(),
            reason: reason.into(),
            message,
            last_transition_time: now_rfc3339(),
        }],
        last_event_ms: md.status.as_ref().map_or(0, |s| s.last_event_ms),
        ..ModelDeploymentStatus::default()
    };
    api.patch_status(&md.name_any(), &PatchParams::default(), &Patch::Merge(json!({ "status": status }))).await?;
    Ok(())
}

/// Makes the cluster serve what `md` asks for, then reports.
async fn apply(md: Arc<ModelDeployment>, ctx: &Context, api: &Api<ModelDeployment>) -> Result<Action, OperatorError> {
    let name = md.name_any();
    if let Err(e) = check_name(&name) {
        refuse(ctx, api, &md, "InvalidName", e.to_string()).await?;
        return Ok(Action::await_change());
    }
    // The token first: a load sent without it would fail on a gated model.
    let token = match &md.spec.hf_token_secret {
        None => None,
        Some(r) if ctx.allowed_secrets.as_ref().is_some_and(|names| !names.contains(&r.name)) => {
            refuse(
                ctx,
                api,
                &md,
                "SecretNotAllowed",
                format!(
                    "Secret `{}` (hfTokenSecret) is not one this controller may read: add it to its --hf-token-secrets (the Helm chart's rbac.hfTokenSecrets)",
                    r.name
                ),
            )
            .await?;
            return Ok(Action::await_change());
        }
        Some(r) => {
            let ns = md.namespace().unwrap_or_default();
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            match secrets.get_opt(&r.name).await? {
                None => {
                    refuse(
                        ctx,
                        api,
                        &md,
                        "SecretNotFound",
                        format!("Secret `{}` (hfTokenSecret) does not exist in namespace `{ns}`", r.name),
                    )
                    .await?;
                    return Ok(Action::requeue(Duration::from_secs(30)));
                }
                Some(secret) => {
                    let value = secret
                        .data
                        .as_ref()
                        .and_then(|d| d.get(&r.key))
                        .map(|b| String::from_utf8_lossy(&b.0).trim().to_string());
                    match value.filter(|v| !v.is_empty()) {
                        Some(v) => Some(v),
                        None => {
                            refuse(
                                ctx,
                                api,
                                &md,
                                "SecretKeyMissing",
                                format!("Secret `{}` has no key `{}` with a token", r.name, r.key),
                            )
                            .await?;
                            return Ok(Action::requeue(Duration::from_secs(30)));
                        }
                    }
                }
            }
        }
    };
    let spec = match to_spec(&md) {
        Ok(s) => s,
        Err(e) => {
            refuse(ctx, api, &md, "InvalidSpec", e).await?;
            return Ok(Action::await_change());
        }
    };
    ctx.cluster.set_hub_token(&name, token);
    let autoscaled = spec.autoscaling.is_some();
    ctx.scaler.manage(&name, autoscaled.then(|| md.namespace().unwrap_or_else(|| "default".into())).as_deref());
    if ctx.cluster.spec(&name).as_ref() != Some(&spec) {
        match ctx.cluster.apply(&name, spec).await {
            Ok(_) => info!(resource = %name, "applied"),
            Err(ClusterError::Invalid(message)) => {
                refuse(ctx, api, &md, "InvalidSpec", message).await?;
                return Ok(Action::await_change());
            }
            Err(e) => return Err(e.into()),
        }
    }
    let d = ctx.cluster.get(&name)?;
    // The cluster's events for this deployment that were not published yet.
    let last = md.status.as_ref().map_or(0, |s| s.last_event_ms);
    let mut newest = last;
    for e in d.status.as_ref().map(|s| s.events.as_slice()).unwrap_or_default() {
        if e.at_ms > last {
            let type_ = if warning(&e.kind) { EventType::Warning } else { EventType::Normal };
            publish(ctx, &md, type_, &e.kind, e.message.clone()).await;
            newest = newest.max(e.at_ms);
        }
    }
    let status = status_of(&md, &d, newest);
    if md.status.as_ref() != Some(&status) {
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({ "status": status }))).await?;
    }
    let settled = status.ready_replicas >= md.spec.replicas;
    Ok(Action::requeue(Duration::from_secs(if settled { 60 } else { 5 })))
}

/// Unloads every replica of a resource being deleted; the finalizer goes once this succeeds.
async fn cleanup(md: Arc<ModelDeployment>, ctx: &Context) -> Result<Action, OperatorError> {
    let name = md.name_any();
    let replicas = ctx.cluster.get(&name).ok().and_then(|d| d.status).map_or(0, |s| s.replica_status.len());
    match ctx.cluster.delete(&name).await {
        Ok(()) => {
            info!(resource = %name, replicas, "deleted; replicas unloaded");
            publish(
                ctx,
                &md,
                EventType::Normal,
                "Deleted",
                format!("{replicas} replica(s) unloaded and their memory freed"),
            )
            .await;
        }
        Err(ClusterError::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    ctx.cluster.set_hub_token(&name, None);
    ctx.scaler.manage(&name, None);
    Ok(Action::await_change())
}

/// Reconciles one resource (the function `Controller::run` calls; tests call it directly).
pub async fn reconcile(md: Arc<ModelDeployment>, ctx: Arc<Context>) -> Result<Action, OperatorError> {
    let ns = md.namespace().unwrap_or_else(|| "default".into());
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    let key = format!("{ns}/{}", md.name_any());
    let result = finalizer(&api, FINALIZER, md, |event| async {
        match event {
            Finalized::Apply(md) => apply(md, &ctx, &api).await,
            Finalized::Cleanup(md) => cleanup(md, &ctx).await,
        }
    })
    .await
    .map_err(|e| OperatorError::Finalizer(e.to_string()));
    if result.is_ok()
        && let Ok(mut f) = ctx.failures.lock()
    {
        f.remove(&key);
    }
    result
}

/// How long to wait after a failure: 1 s, doubling per consecutive failure, at most 5 min.
pub fn error_policy(md: Arc<ModelDeployment>, error: &OperatorError, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", md.namespace().unwrap_or_default(), md.name_any());
    let n = ctx.failures.lock().map_or(1, |mut f| {
        let n = f.entry(key.clone()).or_insert(0);
        *n += 1;
        *n
    });
    let wait = backoff(n);
    warn!(resource = %key, failures = n, retry_in_s = wait.as_secs(), error = %error, "reconcile failed");
    Action::requeue(wait)
}

/// The wait after `n` consecutive failures.
pub fn backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

/// Runs the operator on `namespace` until `stop` resolves: watches `ModelDeployment`s and
/// reconciles each when it changes, when the cluster changes its deployment, and periodically.
pub async fn run(
    ctx: Arc<Context>,
    namespace: String,
    stop: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<ModelDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    // Changes the cluster makes on its own (a load finished, a worker lost) reconcile at once
    // (every resource: there are few, and each round is cheap when nothing changed).
    let (_, changes) = ctx.cluster.watch();
    let triggers =
        tokio_stream::wrappers::BroadcastStream::new(changes).filter_map(|ev| async move { ev.ok().map(|_| ()) });
    info!(namespace, "operator watching ModelDeployments");
    Controller::new(api, watcher::Config::default())
        .reconcile_all_on(triggers)
        .graceful_shutdown_on(stop)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "reconcile round");
            }
        })
        .await;
}
