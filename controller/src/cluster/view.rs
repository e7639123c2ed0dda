//! What the API reports of the state: a deployment's view (spec, replicas, phase, events),
//! the workers with their GPUs and reservations, and why a request finds no replica.

use std::collections::HashMap;

use gantry_core::placement::with_margin;
use gantry_proto::v1 as pb;

use super::Cluster;
use super::state::{Deployment, ReplicaState, State, replica_model_id};
use crate::config::ControllerConfig;
use crate::error::ClusterError;
use crate::scheduler;

/// Deployment `name` as the API shows it.
pub fn deployment(st: &State, name: &str, config: &ControllerConfig) -> Option<pb::Deployment> {
    let d = st.deployments.get(name)?;
    let replica_status: Vec<pb::Replica> = d
        .replicas
        .iter()
        .map(|(&index, r)| pb::Replica {
            index,
            state: r.state.to_proto() as i32,
            stages: r
                .placement
                .iter()
                .flat_map(|p| &p.stages)
                .map(|s| pb::ReplicaStage {
                    worker_id: s.node.clone(),
                    gpu_index: s.gpu,
                    layer_start: s.layers.start,
                    layer_end: s.layers.end,
                    reserved_bytes: s.bytes,
                    tensor_parallel: s.tp,
                    experts_on_host_bytes: s.experts_on_host,
                })
                .collect(),
            reason: r.reason.clone(),
            progress: r.progress.clone(),
        })
        .collect();
    let ready = d.ready();
    let loading = d.replicas.values().any(|r| r.state == ReplicaState::Loading);
    let phase = if d.record.spec.replicas == 0 && d.record.spec.autoscaling.is_some() && d.replicas.is_empty() {
        "ScaledToZero"
    } else if ready >= d.record.spec.replicas {
        "Ready"
    } else if loading {
        "Progressing"
    } else if ready > 0 {
        "Degraded"
    } else {
        "Pending"
    };
    let replica_bytes = d.sized.as_ref().map_or(0, |s| with_margin(s.bytes, config.margin_percent));
    Some(pb::Deployment {
        name: name.to_string(),
        spec: Some(d.record.spec.to_proto()),
        status: Some(pb::DeploymentStatus {
            replicas: d.replicas.len() as u32,
            ready_replicas: ready,
            replica_status,
            observed_generation: d.record.generation,
            events: d.events.iter().cloned().collect(),
            replica_bytes,
            phase: phase.into(),
            autoscaler: d.record.spec.autoscaling.as_ref().map(|_| {
                let a = &d.autoscaler;
                let last = a.samples.back().copied().unwrap_or_default();
                let policy = d.record.spec.autoscaling.as_ref().map(|p| p.metric).unwrap_or_default();
                pb::AutoscalerStatus {
                    load: last.load(policy),
                    in_flight: last.in_flight,
                    queued: last.queued,
                    waiting: last.waiting,
                    kv_used_blocks: last.kv_used_blocks,
                    kv_total_blocks: last.kv_total_blocks,
                    last_decision: a.last_decision.clone(),
                    last_decision_ms: a.last_decision_ms,
                }
            }),
        }),
        generation: d.record.generation,
        created_ms: d.record.created_ms,
    })
}

/// A deployment as `Models/List` shows it.
pub fn deployed_model(d: &Deployment) -> pb::DeployedModel {
    let mut m = pb::DeployedModel {
        name: d.record.name.clone(),
        source: d.record.spec.source.clone(),
        replicas: d.record.spec.replicas,
        ready_replicas: d.ready(),
        ..Default::default()
    };
    if let Ok(s) = &d.sized {
        m.family = s.spec.family.to_string();
        m.parameters = s.spec.parameters.total;
        m.context_length = s.options.context.unwrap_or(s.spec.context.length);
        m.instruct = s.spec.tuning.instruct;
    }
    m
}

/// No deployment is called `name`: the error lists those there are.
pub fn not_found(st: &State, name: &str) -> ClusterError {
    ClusterError::NotFound { name: name.to_string(), known: st.deployment_names() }
}

/// Why no replica of `name` can take a request (`failed_here`: ready replicas that already
/// failed this one).
pub fn no_replica_reason(name: &str, d: &Deployment, failed_here: &[u32]) -> String {
    if d.record.spec.replicas == 0 {
        return format!("`{name}` is scaled to 0 replicas");
    }
    let mut parts: Vec<String> = Vec::new();
    for (i, r) in &d.replicas {
        let state = match r.state {
            _ if failed_here.contains(i) => "failed this request",
            ReplicaState::Pending => "pending",
            ReplicaState::Loading => "loading",
            ReplicaState::Ready => "ready",
            ReplicaState::Failed => "failed",
        };
        let detail = if !r.progress.is_empty() { &r.progress } else { &r.reason };
        parts.push(if detail.is_empty() {
            format!("replica {i} {state}")
        } else {
            format!("replica {i} {state}: {detail}")
        });
    }
    format!("no ready replica of `{name}`: {}", parts.join("; "))
}

impl Cluster {
    /// Every worker with its GPUs, reservations and replicas.
    pub fn workers(&self) -> Vec<pb::WorkerInfo> {
        let inner = self.lock();
        let st = &inner.state;
        let mut per_gpu: HashMap<(&str, u32), (u64, Vec<String>)> = HashMap::new();
        for (name, d) in &st.deployments {
            for (&i, r) in &d.replicas {
                for s in r.placement.iter().flat_map(|p| &p.stages) {
                    let e = per_gpu.entry((s.node.as_str(), s.gpu)).or_default();
                    e.0 += s.bytes;
                    e.1.push(replica_model_id(name, i));
                }
            }
        }
        st.workers
            .values()
            .map(|w| pb::WorkerInfo {
                worker_id: w.id.clone(),
                address: w.address.clone(),
                version: w.version.clone(),
                labels: w.labels.clone().into_iter().collect(),
                gpus: w
                    .status
                    .gpus
                    .iter()
                    .map(|g| {
                        let (reserved, replicas) = per_gpu.get(&(w.id.as_str(), g.index)).cloned().unwrap_or_default();
                        pb::GpuUsage {
                            index: g.index,
                            name: g.name.clone(),
                            total_bytes: g.total_bytes,
                            free_bytes: g.free_bytes,
                            reserved_bytes: reserved,
                            replicas,
                        }
                    })
                    .collect(),
                state: if w.lost {
                    "lost".into()
                } else if !w.connected {
                    "disconnected".into()
                } else {
                    "ready".into()
                },
                last_seen_ms_ago: w.last_seen.elapsed().as_millis() as u64,
                queue_depth: w.status.queue_depth,
                loaded_models: w.loaded_ids(),
                gpu_note: w.status.gpu_note.clone(),
                kv_cache: w
                    .status
                    .models
                    .iter()
                    .filter(|m| m.kv_blocks_total > 0)
                    .map(|m| pb::KvCacheUsage {
                        model_id: m.info.as_ref().map(|i| i.model_id.clone()).unwrap_or_default(),
                        block_tokens: m.kv_block_tokens,
                        blocks_total: m.kv_blocks_total,
                        blocks_used: m.kv_blocks_used,
                        blocks_cached: m.kv_blocks_cached,
                        prefix_blocks_looked_up: m.prefix_blocks_looked_up,
                        prefix_blocks_hit: m.prefix_blocks_hit,
                        preemptions: m.preemptions,
                    })
                    .collect(),
            })
            .collect()
    }

    /// The GPUs of the connected workers with their free memory net of reservations, for
    /// `Inspect` and `Select` when the request names none.
    pub fn cluster_gpus(&self) -> Vec<gantry_core::Gpu> {
        let inner = self.lock();
        scheduler::nodes(&inner.state)
            .into_iter()
            .flat_map(|n| {
                n.gpus
                    .into_iter()
                    .map(move |g| gantry_core::Gpu { name: format!("{}/{}", n.id, g.name), memory_bytes: g.free_bytes })
            })
            .collect()
    }
}
