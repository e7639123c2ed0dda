//! Placing one replica: ask `gantry_core::placement` for a plan on the current snapshot,
//! reserve it (the placement is the reservation), record it, and send its loads; or say why it
//! waits.

use std::collections::BTreeMap;

use gantry_core::placement::{Plan, ReplicaRequest, place};
use gantry_core::units::format_bytes;
use tracing::info;

use super::{Effect, commands, snapshot};
use crate::cluster::events::EventKind;
use crate::cluster::persist::{StoreOp, to_json};
use crate::cluster::state::{PlacementRecord, ReplicaState, State};
use crate::config::ControllerConfig;

/// Why a replica waits: what `gantry get` says, and its metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PendingReason {
    /// The model's size could not be worked out.
    CannotSize(String),
    /// No worker is connected.
    NoWorkers,
    /// No node has room (every node's reason).
    Unschedulable(String),
}

impl PendingReason {
    /// The metric label of the reason.
    pub fn label(&self) -> &'static str {
        match self {
            PendingReason::CannotSize(_) => "cannot_size",
            PendingReason::NoWorkers => "no_workers",
            PendingReason::Unschedulable(_) => "unschedulable",
        }
    }
}

impl std::fmt::Display for PendingReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PendingReason::CannotSize(e) => write!(f, "cannot size the model: {e}"),
            PendingReason::NoWorkers => f.write_str("no workers are connected"),
            PendingReason::Unschedulable(e) => write!(f, "unschedulable: {e}"),
        }
    }
}

/// Places replica `index` of `name`, or records why it cannot be placed now.
pub fn place_replica(st: &mut State, config: &ControllerConfig, name: &str, index: u32) -> Vec<Effect> {
    let nodes = snapshot::nodes(st);
    let Some(d) = st.deployments.get(name) else { return Vec::new() };
    let sized = match &d.sized {
        Ok(s) => s.clone(),
        Err(e) => {
            let reason = PendingReason::CannotSize(e.clone());
            return set_pending(st, name, index, &reason);
        }
    };
    let mut replicas_on_node: BTreeMap<String, u32> = BTreeMap::new();
    for r in d.replicas.values() {
        if let Some(p) = &r.placement
            && let Some(s) = p.stages.first()
        {
            *replicas_on_node.entry(s.node.clone()).or_default() += 1;
        }
    }
    let policy = d.record.spec.policy.clone();
    let generation = d.record.generation;
    let class = crate::cluster::measured::placement_class(&nodes);
    let measured_bytes = st.measured_need(&d.record.spec.source, &sized, class);
    let request = ReplicaRequest {
        spec: &sized.spec,
        options: sized.options.clone(),
        policy: &policy,
        margin_percent: config.margin_percent,
        replicas_on_node: &replicas_on_node,
        measured_bytes,
    };
    if nodes.is_empty() {
        return set_pending(st, name, index, &PendingReason::NoWorkers);
    }
    let plan = match place(&nodes, &request) {
        Err(e) => return set_pending(st, name, index, &PendingReason::CannotSize(e.to_string())),
        Ok(Err(unschedulable)) => {
            return set_pending(st, name, index, &PendingReason::Unschedulable(unschedulable.to_string()));
        }
        Ok(Ok(plan)) => plan,
    };
    let stages = plan.stages().to_vec();
    let msg = match &plan {
        Plan::OneGpu { stage } => {
            format!(
                "replica {index} placed on {} gpu:{} ({} reserved)",
                stage.node,
                stage.gpu,
                format_bytes(stage.bytes)
            )
        }
        _ => {
            let segments = gantry_core::placement::segments(&stages);
            let list: Vec<String> = segments
                .iter()
                .map(|ranks| {
                    let each = if ranks.len() > 1 { " each" } else { "" };
                    format!("{} ({}{each})", super::commands::describe_segment(ranks), format_bytes(ranks[0].bytes))
                })
                .collect();
            let plural = if segments.len() == 1 { "" } else { "s" };
            format!("replica {index} split into {} stage{plural}: {}", segments.len(), list.join(", "))
        }
    };
    let record = PlacementRecord { generation, stages };
    let mut effects = vec![Effect::Persist(StoreOp::Put(format!("placements/{name}/{index}"), to_json(&record)))];
    if let Some(r) = st.replica_mut(name, index) {
        r.placement = Some(record);
        r.clear_loads();
        r.retry_at = None;
    }
    info!(deployment = name, "{msg}");
    st.event(name, EventKind::Placed, msg);
    effects.extend(commands::load_replica(st, name, index, None));
    effects
}

/// Records why replica `index` waits; a new reason is logged, counted and an event.
fn set_pending(st: &mut State, name: &str, index: u32, reason: &PendingReason) -> Vec<Effect> {
    let text = reason.to_string();
    let Some(r) = st.replica_mut(name, index) else { return Vec::new() };
    let changed = r.reason != text;
    r.state = ReplicaState::Pending;
    r.reason = text.clone();
    if !changed {
        return Vec::new();
    }
    info!(deployment = name, replica = index, "{text}");
    st.event(name, EventKind::Pending, format!("replica {index}: {text}"));
    vec![Effect::PlacementFailed(reason.label())]
}
