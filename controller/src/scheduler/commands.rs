//! The commands a decision sends: a placed replica's loads (one per worker, each with its layer
//! segments and the next stage's address), unloads, and releasing a replica's reservation.

use std::time::Instant;

use gantry_core::shard::layer_span;
use gantry_proto::v1 as pb;
use pb::controller_message::Message as ToWorker;
use tracing::warn;

use super::Effect;
use crate::cluster::events::EventKind;
use crate::cluster::persist::StoreOp;
use crate::cluster::state::{Command, Replica, ReplicaState, State, replica_model_id};
use crate::config::ControllerConfig;

/// An unload of `model_id` for `worker`.
pub fn unload_model(st: &mut State, worker: &str, model_id: &str) -> Effect {
    let command_id = st.command_id();
    let request = Some(pb::UnloadModelRequest { model_id: model_id.to_string() });
    Effect::Send { worker: worker.to_string(), message: ToWorker::Unload(pb::UnloadCommand { command_id, request }) }
}

/// Unloads a removed replica from every worker of its placement and forgets the placement.
pub fn unload_replica(st: &mut State, name: &str, index: u32, r: &Replica) -> Vec<Effect> {
    let id = replica_model_id(name, index);
    let mut effects: Vec<Effect> = r.workers().iter().map(|w| unload_model(st, w, &id)).collect();
    effects.push(Effect::Persist(StoreOp::Delete(format!("placements/{name}/{index}"))));
    effects
}

/// Unloads a placed replica's stages from its workers other than `except` (a split replica
/// losing one stage cannot serve with the others).
pub fn unload_stages(st: &mut State, name: &str, index: u32, except: Option<&str>) -> Vec<Effect> {
    let Some(r) = st.deployments.get(name).and_then(|d| d.replicas.get(&index)) else { return Vec::new() };
    let workers: Vec<String> = r.workers().into_iter().filter(|w| Some(w.as_str()) != except).collect();
    if workers.len() + usize::from(except.is_some()) < 2 {
        return Vec::new(); // a whole-model replica: nothing else holds it
    }
    let id = replica_model_id(name, index);
    workers.iter().map(|w| unload_model(st, w, &id)).collect()
}

/// Forgets a replica's placement and reservation and sets its state.
pub fn release(st: &mut State, name: &str, index: u32, state: ReplicaState, reason: &str) -> Vec<Effect> {
    let Some(r) = st.replica_mut(name, index) else { return Vec::new() };
    r.placement = None;
    r.clear_loads();
    r.state = state;
    r.reason = reason.to_string();
    vec![Effect::Persist(StoreOp::Delete(format!("placements/{name}/{index}")))]
}

/// The load commands of a placed replica: one per worker of its placement (or only to `only`),
/// each with the worker's layer segments and the address of the next stage. Workers not
/// connected now are waited for (the replica says so); they get their load when they return.
pub fn load_replica(st: &mut State, name: &str, index: u32, only: Option<&str>) -> Vec<Effect> {
    let Some(d) = st.deployments.get(name) else { return Vec::new() };
    let source = d.record.spec.source.clone();
    let context = d.record.spec.context_length;
    let wire = d.record.spec.stage_wire_dtype.clone();
    let Some(placement) = d.replicas.get(&index).and_then(|r| r.placement.clone()) else { return Vec::new() };
    // Consecutive stages on one worker run in one process: one command for them. The ranks of
    // a tensor-parallel group are one segment.
    let mut groups: Vec<(String, Vec<pb::LayerSegment>)> = Vec::new();
    for ranks in gantry_core::placement::segments(&placement.stages) {
        let s = &ranks[0];
        let cpu = st
            .workers
            .get(&s.node)
            .and_then(|w| w.status.gpus.iter().find(|g| g.index == s.gpu))
            .is_some_and(|g| g.source == "cpu");
        let segment = pb::LayerSegment {
            device: if cpu { "cpu".into() } else { format!("gpu:{}", s.gpu) },
            layer_start: s.layers.start as u32,
            layer_end: s.layers.end as u32,
            tensor_parallel: if ranks.len() > 1 {
                ranks.iter().map(|r| format!("gpu:{}", r.gpu)).collect()
            } else {
                Vec::new()
            },
        };
        match groups.last_mut() {
            Some((node, segments)) if *node == s.node => segments.push(segment),
            _ => groups.push((s.node.clone(), vec![segment])),
        }
    }
    let split = groups.len() > 1
        || groups.first().is_some_and(|(_, segs)| segs.len() > 1 || segs.iter().any(|s| !s.tensor_parallel.is_empty()));
    let hf_token = st.hub_tokens.get(name).cloned().unwrap_or_default();
    let mut effects = Vec::new();
    let mut sent = Vec::new();
    let mut waiting = Vec::new();
    for (k, (node, segments)) in groups.iter().enumerate() {
        if only.is_some_and(|o| o != node) {
            continue;
        }
        let next_stage = match groups.get(k + 1) {
            Some((next, _)) => match st.workers.get(next) {
                Some(w) => w.address.clone(),
                None => {
                    waiting.push(next.clone());
                    continue;
                }
            },
            None => String::new(),
        };
        if !st.workers.get(node).is_some_and(|w| w.connected) {
            waiting.push(node.clone());
            continue;
        }
        // A secret goes only over a link that was authenticated (or one from this host to a
        // controller that authenticates no one).
        let trusted = st.workers.get(node).is_some_and(|w| w.trusted);
        if !trusted && !hf_token.is_empty() {
            warn!(deployment = name, worker = %node, "not sending the Hugging Face token over an unauthenticated worker link");
        }
        let base = pb::LoadModelRequest {
            model_id: replica_model_id(name, index),
            source: source.clone(),
            context_length: context,
            hf_token: if trusted { hf_token.clone() } else { String::new() },
            // The replicas share their prefix-cache keys, for the router to compare.
            prefix_namespace: name.to_string(),
            ..Default::default()
        };
        let request = if split {
            pb::LoadModelRequest { segments: segments.clone(), next_stage, wire_dtype: wire.clone(), ..base }
        } else {
            let experts_on_host = placement.stages[0].experts_on_host > 0;
            pb::LoadModelRequest { device: segments[0].device.clone(), experts_on_host, ..base }
        };
        let command_id = st.command_id();
        st.commands.insert(command_id, Command { worker: node.clone(), deployment: name.to_string(), replica: index });
        sent.push((node.clone(), command_id));
        let cmd = pb::LoadCommand { command_id, request: Some(request) };
        effects.push(Effect::Send { worker: node.clone(), message: ToWorker::Load(cmd) });
    }
    let Some(r) = st.replica_mut(name, index) else { return effects };
    r.state = ReplicaState::Loading;
    r.commands.extend(sent);
    r.reason = if !waiting.is_empty() {
        format!("waiting for {} to reconnect", waiting.join(", "))
    } else if split {
        let stages = gantry_core::placement::segments(&placement.stages);
        let where_: Vec<String> = stages.iter().map(|ranks| describe_segment(ranks)).collect();
        let plural = if stages.len() == 1 { "" } else { "s" };
        format!("loading {} stage{plural}: {}", stages.len(), where_.join(", "))
    } else {
        let s = &placement.stages[0];
        if s.experts_on_host > 0 {
            format!(
                "loading on {} gpu:{}, experts ({}) in its host memory",
                s.node,
                s.gpu,
                gantry_core::units::format_bytes(s.experts_on_host)
            )
        } else {
            format!("loading on {} gpu:{}", s.node, s.gpu)
        }
    };
    effects
}

/// `id` missed its lease: it is lost, and every replica with a stage on it is released (its
/// other stages unloaded) to be placed again.
pub fn worker_lost(st: &mut State, config: &ControllerConfig, id: &str, now: Instant) -> Vec<Effect> {
    let Some(w) = st.workers.get_mut(id) else { return Vec::new() };
    w.lost = true;
    st.prefix.remove_worker(id);
    w.connected = false;
    let silent = now.saturating_duration_since(w.last_seen);
    warn!(worker = id, silent_ms = silent.as_millis() as u64, "worker lost: its lease ran out");
    let affected = st.replicas_on(id);
    st.commands.retain(|_, c| c.worker != id);
    let mut effects = vec![Effect::CloseLink(id.to_string())];
    for (name, i) in affected {
        effects.extend(unload_stages(st, &name, i, Some(id)));
        let msg = format!(
            "worker {id} lost (silent for {:.1} s, lease {:.1} s); replica {i} is placed again",
            silent.as_secs_f64(),
            config.lease.as_secs_f64()
        );
        effects.extend(release(st, &name, i, ReplicaState::Pending, &msg));
        st.event(&name, EventKind::WorkerLost, msg);
    }
    effects
}

/// A pipeline segment as people read it: `w1 gpu:0 layers 0-39`, or for a tensor-parallel
/// group `w1 gpu:0,1 layers 0-79 (tensor-parallel)`.
pub fn describe_segment(ranks: &[gantry_core::placement::PlacedStage]) -> String {
    let s = &ranks[0];
    if ranks.len() > 1 {
        let gpus: Vec<String> = ranks.iter().map(|r| r.gpu.to_string()).collect();
        format!("{} gpu:{} layers {} (tensor-parallel)", s.node, gpus.join(","), layer_span(&s.layers))
    } else {
        format!("{} gpu:{} layers {}", s.node, s.gpu, layer_span(&s.layers))
    }
}
