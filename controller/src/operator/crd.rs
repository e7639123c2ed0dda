//! The `ModelDeployment` custom resource (group `gantry.dev`, version `v1alpha1`, short name
//! `md`): Rust types from which the CRD is generated (`gantry crd` writes it; the copies in
//! `deploy/crds/` and the Helm chart are checked against it by a test).

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A model served by Gantry on the cluster: where it comes from, how many replicas, and where
/// they may go. Its name is the model name clients ask for.
// The printer columns repeat `type_`, which clippy takes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "gantry.dev",
    version = "v1alpha1",
    kind = "ModelDeployment",
    doc = "A model Gantry serves on this cluster; its name is the model name clients ask for.",
    plural = "modeldeployments",
    shortname = "md",
    namespaced,
    status = "ModelDeploymentStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".status.model", description = "The model source"),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Replicas asked for"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Replicas serving"
    ),
    printcolumn(
        name = "VRAM",
        type_ = "string",
        json_path = ".status.vramPerReplica",
        description = "GPU memory per replica"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.phase",
        description = "Ready, Progressing, Degraded, Pending or ScaledToZero"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentSpec {
    /// Where the model comes from: exactly one of `hub`, `url` or `path`.
    pub model: ModelSource,
    /// Precision to size the replicas for (`f16`, `bf16`, `q8_0`, `q4_k_m` …); default: as stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Tokens per sequence; default: the model's trained context (`max_position_embeddings`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub context_length: Option<u32>,
    /// Replicas to run; `kubectl scale` sets it.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1024))]
    pub replicas: u32,
    /// Sampling used when a request leaves a value unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingDefaults>,
    /// Which GPUs the replicas may use and how they are spread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<PlacementSpec>,
    /// How a replica split over several GPUs passes hidden states between its stages: `f32`
    /// (exact, the default), `f16` or `bf16` (half the bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_wire_dtype: Option<WireDtype>,
    /// A Secret in this namespace holding a Hugging Face token, for gated or private models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_token_secret: Option<SecretKeyRef>,
    /// Replicas that follow the load: the controller's autoscaler then sets `replicas` (through
    /// the scale subresource, as `kubectl scale` does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

/// How replicas follow the load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Fewest replicas; 0 scales to zero after `scaleToZeroAfterSeconds` idle (a request then
    /// waits while a replica loads).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1024))]
    pub min_replicas: u32,
    #[schemars(range(min = 1, max = 1024))]
    pub max_replicas: u32,
    /// What a replica's share of the load is measured in; default `InFlight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<AutoscalingMetric>,
    /// The metric's value per replica: requests in flight or queued, or a fraction of the KV
    /// cache blocks in (0, 1].
    pub target: f64,
    /// Scaling up follows the lowest recommendation over this window; default 0 (at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_up_window_seconds: Option<u32>,
    /// Scaling down follows the highest recommendation over this window; default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_delay_seconds: Option<u32>,
    /// With `minReplicas: 0`, idle this long before the last replica goes; default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_to_zero_after_seconds: Option<u32>,
}

/// An autoscaling signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AutoscalingMetric {
    /// Requests sent to a replica and not finished (plus those waiting for a cold start).
    InFlight,
    /// Requests queued at the workers (plus those waiting for a cold start).
    Queue,
    /// The fraction of a replica's KV cache blocks in use.
    KvUtilization,
}

fn one() -> u32 {
    1
}

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ModelSource {
    /// A Hugging Face Hub repository.
    Hub(HubModel),
    /// One `.gguf` file the workers download from this `http(s)` URL (once, into their cache);
    /// the controller reads only its header (range requests) to size a replica.
    Url(String),
    /// A `.gguf` file or a model folder on the workers' nodes (a host path or a shared volume).
    Path(String),
}

/// A Hugging Face Hub repository.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HubModel {
    /// `organization/name`.
    #[schemars(length(min = 3))]
    pub id: String,
    /// A branch, tag or commit; default: `main`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// One `.gguf` file of the repository, for repositories of GGUF files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// Defaults for requests' sampling values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SamplingDefaults {
    /// 0 picks the most likely token; up to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f32>,
    /// Nucleus sampling, in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens (0: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Tokens to generate when a request does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_tokens: Option<u32>,
    /// Penalty on tokens already in the sequence (1: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub repetition_penalty: Option<f32>,
}

/// Where replicas may go.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// `Binpack` fills the fullest GPU that fits (keeps big GPUs free); `Spread` puts replicas
    /// on different nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// Worker labels (`gantry worker --label`) that must all match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Part of the GPU's name (`H100`), case-insensitive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_name: Option<String>,
    /// Whether one replica may span several nodes (pipeline stages over the network).
    #[serde(default)]
    pub allow_multi_node: bool,
}

/// A placement strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Strategy {
    Binpack,
    Spread,
}

/// How hidden states travel between pipeline stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WireDtype {
    F32,
    F16,
    Bf16,
}

/// A key of a Secret in the resource's namespace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1))]
    pub name: String,
    /// Default: `token`.
    #[serde(default = "token_key")]
    pub key: String,
}

fn token_key() -> String {
    "token".into()
}

/// What the operator reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// Replicas that exist (placed or waiting), for the scale subresource.
    pub replicas: u32,
    pub ready_replicas: u32,
    /// The label selector of this resource's replicas, for the scale subresource (HPA, KEDA).
    pub selector: String,
    /// The `metadata.generation` this status describes.
    pub observed_generation: i64,
    /// `Ready`, `Progressing`, `Degraded`, `Pending` or `ScaledToZero`.
    pub phase: String,
    /// The model source, as placed.
    pub model: String,
    /// GPU memory one replica reserves (estimate plus margin), e.g. `18.6 GiB`.
    pub vram_per_replica: String,
    /// Every replica: state, stages (node, GPU, layers, memory) and why it waits.
    #[serde(default)]
    pub replica_status: Vec<ReplicaStatus>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// When the last event from the controller was published (Unix ms), so none is sent twice.
    #[serde(default)]
    pub last_event_ms: u64,
}

/// One replica.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub index: u32,
    /// `Pending`, `Loading`, `Ready` or `Failed`.
    pub state: String,
    #[serde(default)]
    pub stages: Vec<StageStatus>,
    /// Why it is pending or failed, or the load's progress.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// One pipeline stage of a replica (a whole replica on one GPU is one stage).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StageStatus {
    /// The worker (node).
    pub node: String,
    pub gpu: u32,
    /// Layers it runs, as `0-39`.
    pub layers: String,
    pub vram: String,
    /// The ranks of the tensor-parallel group this stage is one rank of (every layer of
    /// `layers` split over that many GPUs of the node); absent for a pipeline stage of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor_parallel: Option<u32>,
}

/// A condition, as Kubernetes conditions go.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Progressing` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    /// RFC 3339.
    pub last_transition_time: String,
}

/// The CRD as YAML, as `kubectl apply -f` takes it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = ModelDeployment::crd();
    let body = serde_yaml::to_string(&crd).unwrap_or_default();
    format!(
        "# Generated from controller/src/operator/crd.rs by `gantry crd`; do not edit.\n# Regenerate: gantry crd > deploy/crds/gantry.dev_modeldeployments.yaml (and the chart's copy).\n{body}"
    )
}
