//! What a deployment asks for, as the controller stores it, and how big one replica is.

use std::sync::Arc;

use gantry_core::WireDtype;
use gantry_core::autoscale::Policy as AutoscalePolicy;
use gantry_core::catalog::Catalog;
use gantry_core::placement::{Policy, Strategy};
use gantry_core::quant::WeightDtype;
use gantry_core::spec::ModelSpec;
use gantry_core::vram::{ServeOptions, estimate_vram};
use gantry_model::read_spec;
use gantry_proto::convert::{metric_from_proto, metric_to_proto, sampling_from_proto};
use gantry_proto::v1 as pb;
use gantry_store::Source;
use serde::{Deserialize, Serialize};

use crate::error::ClusterError;

/// The most replicas one deployment may ask for.
pub const MAX_REPLICAS: u32 = 1024;

/// A deployment's desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentSpec {
    pub source: String,
    #[serde(default)]
    pub dtype: String,
    #[serde(default)]
    pub context_length: u32,
    pub replicas: u32,
    #[serde(default)]
    pub policy: Policy,
    /// `f16`/`bf16` for split replicas' hidden states; empty: f32.
    #[serde(default)]
    pub stage_wire_dtype: String,
    /// Sampling for the values a request leaves unset.
    #[serde(default)]
    pub sampling: SamplingDefaults,
    /// Replicas that follow the load; `None`: `replicas` as Apply and Scale set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalePolicy>,
}

/// Sampling values a deployment gives requests that leave them unset.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingDefaults {
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
}

// Sampling values are finite (checked), so the derived `PartialEq` is an equivalence.
impl Eq for SamplingDefaults {}

impl SamplingDefaults {
    fn from_proto(p: &pb::SamplingParams) -> Result<SamplingDefaults, ClusterError> {
        // Checked as a request carrying only these values would be.
        sampling_from_proto(Some(p))
            .validate()
            .map_err(|e| ClusterError::Invalid(format!("sampling defaults: invalid sampling: {e}")))?;
        Ok(SamplingDefaults {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            max_tokens: p.max_tokens,
        })
    }

    pub fn to_proto(&self) -> pb::SamplingParams {
        pb::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            max_tokens: self.max_tokens,
            ..Default::default()
        }
    }

    /// `request` with these values where it leaves them unset.
    pub fn apply(&self, request: Option<pb::SamplingParams>) -> Option<pb::SamplingParams> {
        if *self == SamplingDefaults::default() {
            return request;
        }
        let mut p = request.unwrap_or_default();
        p.temperature = p.temperature.or(self.temperature);
        p.top_k = p.top_k.or(self.top_k);
        p.top_p = p.top_p.or(self.top_p);
        p.min_p = p.min_p.or(self.min_p);
        p.repetition_penalty = p.repetition_penalty.or(self.repetition_penalty);
        p.max_tokens = p.max_tokens.or(self.max_tokens);
        Some(p)
    }
}

/// A deployment as stored under `deployments/NAME`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub name: String,
    pub spec: DeploymentSpec,
    /// Bumped when anything but `replicas` changes.
    pub generation: u64,
    pub created_ms: u64,
}

/// A model sized for a deployment: its facts and the options its replicas are estimated with.
#[derive(Debug, Clone)]
pub struct SizedModel {
    pub spec: Arc<ModelSpec>,
    pub options: ServeOptions,
    /// The estimate for the whole model on one device (before the placement margin).
    pub bytes: u64,
}

/// Checks a deployment name: a DNS label, so it is also a valid Kubernetes name.
pub fn check_name(name: &str) -> Result<(), ClusterError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ClusterError::Invalid(format!(
            "deployment name `{name}`: use 1 to 63 lowercase letters, digits and `-`, not starting or ending with `-`"
        )))
    }
}

impl DeploymentSpec {
    /// Reads and checks the spec of an `Apply`.
    pub fn from_proto(spec: Option<pb::DeploymentSpec>) -> Result<DeploymentSpec, ClusterError> {
        let spec = spec.ok_or_else(|| ClusterError::Invalid("the deployment has no spec".into()))?;
        if spec.source.trim().is_empty() {
            return Err(ClusterError::Invalid("the deployment's spec names no model source".into()));
        }
        check_replicas(spec.replicas)?;
        let placement = spec.placement.unwrap_or_default();
        let strategy = match pb::PlacementStrategy::try_from(placement.strategy) {
            Ok(pb::PlacementStrategy::Unspecified | pb::PlacementStrategy::Binpack) => Strategy::Binpack,
            Ok(pb::PlacementStrategy::Spread) => Strategy::Spread,
            Err(_) => {
                return Err(ClusterError::Invalid(format!(
                    "placement strategy {}: use binpack or spread",
                    placement.strategy
                )));
            }
        };
        if !spec.dtype.is_empty() {
            WeightDtype::parse(&spec.dtype).map_err(|e| ClusterError::Invalid(e.to_string()))?;
        }
        let wire = WireDtype::parse(&spec.stage_wire_dtype)
            .map_err(|e| ClusterError::Invalid(format!("stage_wire_dtype: {e}")))?;
        Ok(DeploymentSpec {
            source: spec.source.trim().to_string(),
            dtype: spec.dtype.trim().to_string(),
            context_length: spec.context_length,
            replicas: spec.replicas,
            policy: Policy {
                strategy,
                node_selector: placement.node_selector.into_iter().collect(),
                gpu_name: placement.gpu_name.trim().to_string(),
                allow_multi_node: placement.allow_multi_node,
            },
            stage_wire_dtype: match wire {
                WireDtype::F32 => String::new(),
                other => other.name().to_string(),
            },
            sampling: match &spec.sampling_defaults {
                Some(p) => SamplingDefaults::from_proto(p)?,
                None => SamplingDefaults::default(),
            },
            autoscaling: spec.autoscaling.as_ref().map(autoscaling_from_proto).transpose()?,
        }
        .with_replicas_in_bounds())
    }

    /// `replicas` within the autoscaling bounds, if there are any.
    pub fn with_replicas_in_bounds(mut self) -> DeploymentSpec {
        if let Some(p) = &self.autoscaling {
            self.replicas = p.clamp(self.replicas);
        }
        self
    }

    pub fn to_proto(&self) -> pb::DeploymentSpec {
        pb::DeploymentSpec {
            source: self.source.clone(),
            dtype: self.dtype.clone(),
            context_length: self.context_length,
            replicas: self.replicas,
            placement: Some(pb::PlacementPolicy {
                strategy: match self.policy.strategy {
                    Strategy::Binpack => pb::PlacementStrategy::Binpack,
                    Strategy::Spread => pb::PlacementStrategy::Spread,
                } as i32,
                node_selector: self.policy.node_selector.clone().into_iter().collect(),
                gpu_name: self.policy.gpu_name.clone(),
                allow_multi_node: self.policy.allow_multi_node,
            }),
            stage_wire_dtype: self.stage_wire_dtype.clone(),
            sampling_defaults: (self.sampling != SamplingDefaults::default()).then(|| self.sampling.to_proto()),
            autoscaling: self.autoscaling.as_ref().map(autoscaling_to_proto),
        }
    }

    /// Whether `other` differs in more than the replica count and the autoscaling policy (a
    /// new generation: its replicas are loaded again).
    pub fn differs_beyond_replicas(&self, other: &DeploymentSpec) -> bool {
        DeploymentSpec { replicas: other.replicas, autoscaling: other.autoscaling.clone(), ..self.clone() } != *other
    }
}

/// Reads and checks an autoscaling policy.
pub fn autoscaling_from_proto(p: &pb::AutoscalingPolicy) -> Result<AutoscalePolicy, ClusterError> {
    let metric = metric_from_proto(p.metric).ok_or_else(|| {
        ClusterError::Invalid(format!("autoscaling metric {}: use in_flight, queue or kv_utilization", p.metric))
    })?;
    let defaults = AutoscalePolicy::default();
    let policy = AutoscalePolicy {
        min_replicas: p.min_replicas,
        max_replicas: p.max_replicas,
        metric,
        target: p.target,
        scale_up_window_ms: u64::from(p.scale_up_window_s) * 1000,
        scale_down_delay_ms: p.scale_down_delay_s.map_or(defaults.scale_down_delay_ms, |s| u64::from(s) * 1000),
        scale_to_zero_after_ms: p
            .scale_to_zero_after_s
            .map_or(defaults.scale_to_zero_after_ms, |s| u64::from(s) * 1000),
    };
    policy.validate().map_err(ClusterError::Invalid)?;
    Ok(policy)
}

pub fn autoscaling_to_proto(p: &AutoscalePolicy) -> pb::AutoscalingPolicy {
    pb::AutoscalingPolicy {
        min_replicas: p.min_replicas,
        max_replicas: p.max_replicas,
        metric: metric_to_proto(p.metric) as i32,
        target: p.target,
        scale_up_window_s: (p.scale_up_window_ms / 1000) as u32,
        scale_down_delay_s: Some((p.scale_down_delay_ms / 1000) as u32),
        scale_to_zero_after_s: Some((p.scale_to_zero_after_ms / 1000) as u32),
    }
}

pub fn check_replicas(replicas: u32) -> Result<(), ClusterError> {
    if replicas > MAX_REPLICAS {
        return Err(ClusterError::Invalid(format!("{replicas} replicas: at most {MAX_REPLICAS}")));
    }
    Ok(())
}

/// Reads what the model of `spec` is and how much memory a replica needs: a path the
/// controller can read (workers on the same machine or a shared volume), or a model of
/// Gantry's catalog (Hub ids of catalog models included, with any `@revision`/`:file`).
pub fn size_model(spec: &DeploymentSpec) -> Result<SizedModel, String> {
    let model = match Source::parse(&spec.source) {
        Source::Url(u) => {
            return Err(format!("{u}: a URL source is sized from its header over the network (size_model_async)"));
        }
        Source::Local(path) => read_spec(&path).map_err(|e| e.to_string())?,
        Source::Hub(r) => {
            let catalog = Catalog::builtin().map_err(|e| e.to_string())?;
            match catalog.get(&r.repo) {
                Ok(entry) => entry.spec().map_err(|e| e.to_string())?,
                Err(_) => {
                    return Err(format!(
                        "cannot size `{}`: it is not a path this controller can read nor a model of Gantry's catalog \
                         (`gantry select --task chat --latency batch` lists them); deploy it from a path on a shared volume",
                        spec.source
                    ));
                }
            }
        }
    };
    size_with(model, spec)
}

/// [`size_model`], and for a URL source its GGUF header read with range requests.
pub async fn size_model_async(spec: &DeploymentSpec) -> Result<SizedModel, String> {
    match Source::parse(&spec.source) {
        Source::Url(u) => {
            let model = gantry_store::url::read_remote_spec(&u).await.map_err(|e| e.to_string())?;
            size_with(model, spec)
        }
        _ => size_model(spec),
    }
}

/// The memory a replica of `model` needs as `spec` asks for it.
fn size_with(model: ModelSpec, spec: &DeploymentSpec) -> Result<SizedModel, String> {
    let options = ServeOptions {
        context: (spec.context_length > 0).then_some(u64::from(spec.context_length)),
        dtype: if spec.dtype.is_empty() {
            None
        } else {
            Some(WeightDtype::parse(&spec.dtype).map_err(|e| e.to_string())?)
        },
        ..ServeOptions::default()
    };
    if let Some(ctx) = options.context
        && ctx > model.context.length
    {
        return Err(format!(
            "context {ctx} is past {}'s trained context of {} tokens",
            model.name, model.context.length
        ));
    }
    let bytes = estimate_vram(&model, &options).map_err(|e| e.to_string())?.total_bytes;
    Ok(SizedModel { spec: Arc::new(model), options, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_core::autoscale::Metric;

    fn with_policy(replicas: u32, policy: pb::AutoscalingPolicy) -> Result<DeploymentSpec, ClusterError> {
        DeploymentSpec::from_proto(Some(pb::DeploymentSpec {
            source: "meta-llama/Meta-Llama-3-8B-Instruct".into(),
            replicas,
            autoscaling: Some(policy),
            ..Default::default()
        }))
    }

    #[test]
    fn an_autoscaling_policy_is_checked_and_bounds_the_count() {
        let p = pb::AutoscalingPolicy {
            min_replicas: 2,
            max_replicas: 4,
            metric: pb::AutoscalingMetric::KvUtilization as i32,
            target: 0.7,
            ..Default::default()
        };
        let spec = with_policy(9, p).unwrap();
        assert_eq!(spec.replicas, 4, "the count is kept within the bounds");
        let policy = spec.autoscaling.clone().unwrap();
        assert_eq!(
            (policy.metric, policy.scale_down_delay_ms, policy.scale_to_zero_after_ms),
            (Metric::KvUtilization, 300_000, 300_000)
        );
        assert_eq!(with_policy(0, p).unwrap().replicas, 2);
        // It round-trips, and changing it (or the count) is not a new generation.
        let again = DeploymentSpec::from_proto(Some(spec.to_proto())).unwrap();
        assert_eq!(again, spec);
        let other = with_policy(3, pb::AutoscalingPolicy { max_replicas: 8, ..p }).unwrap();
        assert!(!spec.differs_beyond_replicas(&other));

        let e = with_policy(1, pb::AutoscalingPolicy { target: 70.0, ..p }).unwrap_err();
        assert_eq!(
            e.to_string(),
            "autoscaling: a kv_utilization target is a fraction of the KV blocks in (0, 1], not 70"
        );
        let e = with_policy(1, pb::AutoscalingPolicy { metric: 9, ..p }).unwrap_err();
        assert_eq!(e.to_string(), "autoscaling metric 9: use in_flight, queue or kv_utilization");
    }
}
