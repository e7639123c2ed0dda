//! Where a replica goes: nodes and GPUs are filtered (each refusal with its reason), then the
//! replica is placed on one GPU, else on several GPUs of one node, else (when the policy
//! allows it) on GPUs of several nodes — the first of those that fits anywhere wins.
//!
//! Decisions are made on a fixed snapshot: each GPU's free memory is already net of loaded
//! models and reservations. The caller reserves the plan's bytes and places the next replica
//! against the updated snapshot. The safety margin applies to every stage of every plan, and a
//! stage's bytes never exceed the free memory of its GPU, so reserving plan after plan never
//! promises more than a GPU has.
//!
//! Scoring (ties always break by node id, then GPU index):
//!
//! | plan | binpack | spread |
//! |---|---|---|
//! | one GPU | the GPU with the least free memory that fits | fewest replicas of the deployment on the node, then the GPU with the most free memory |
//! | GPUs of one node | fewest GPUs, then least free memory on them | fewest replicas on the node, then the most free memory on the node |
//! | GPUs of several nodes | the fewest GPUs, largest first, each node's stages contiguous | same |

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::hardware::{Gpu, describe_gpus};
#[cfg(test)]
use crate::shard::fit;
use crate::shard::{Fit, Stage, fit_on};
use crate::spec::ModelSpec;
use crate::units::format_bytes;
use crate::vram::{MemoryModel, ServeOptions, estimate_vram, memory_model};

/// How replicas of a deployment are scored against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Fill the tightest GPU that fits, keeping large GPUs free for large models.
    #[default]
    Binpack,
    /// Put replicas on the nodes that have the fewest of them, on the emptiest GPU.
    Spread,
}

impl Strategy {
    /// Parses `binpack` or `spread` (any case).
    pub fn parse(s: &str) -> Result<Strategy> {
        match s.trim().to_ascii_lowercase().as_str() {
            "binpack" => Ok(Strategy::Binpack),
            "spread" => Ok(Strategy::Spread),
            _ => Err(Error::InvalidInput {
                what: format!("placement strategy `{s}`"),
                problem: "use binpack or spread".into(),
            }),
        }
    }

    /// The spelling [`Strategy::parse`] reads.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Binpack => "binpack",
            Strategy::Spread => "spread",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a deployment's replicas may go.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Policy {
    pub strategy: Strategy,
    /// Worker labels that must all match (`zone=a`).
    pub node_selector: BTreeMap<String, String>,
    /// Case-insensitive substring the GPU's name must contain (`H100`); empty: any.
    pub gpu_name: String,
    /// Whether one replica may span several nodes (pipeline stages over the network).
    pub allow_multi_node: bool,
}

/// A node (worker) as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub gpus: Vec<GpuView>,
    /// The GPUs are linked to each other (NVLink, reported by NVML or declared): a model too big
    /// for one is split tensor-parallel over several rather than layer by layer.
    #[serde(default)]
    pub gpus_linked: bool,
    /// Host memory the node can still give (0: not reported): where a mixture-of-experts
    /// model's experts may go when no GPU plan fits.
    #[serde(default)]
    pub host_free_bytes: u64,
}

/// One GPU of a node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuView {
    /// The worker's device index (`gpu:N`).
    pub index: u32,
    pub name: String,
    pub total_bytes: u64,
    /// What can still be promised: already net of loaded models and reservations.
    pub free_bytes: u64,
}

/// One replica to place.
#[derive(Debug, Clone)]
pub struct ReplicaRequest<'a> {
    pub spec: &'a ModelSpec,
    pub options: ServeOptions,
    pub policy: &'a Policy,
    /// Safety margin on top of the estimate, in percent (the controller default is 5).
    pub margin_percent: u64,
    /// Replicas of the same deployment already on each node id (spread prefers nodes with fewer).
    pub replicas_on_node: &'a BTreeMap<String, u32>,
    /// What a measurement of the model says it needs on one device at these options
    /// (`gantry_core::measured::Measurement::need`): the one-device need instead of the
    /// estimate. A split plan is sized from the estimate's per-layer terms, scaled up by the
    /// measured-to-estimated ratio when it is above one.
    pub measured_bytes: Option<u64>,
}

/// One stage of a plan: a GPU of a node and the layers it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedStage {
    pub node: String,
    pub gpu: u32,
    pub layers: Range<u64>,
    /// Memory reserved for this stage (estimate for its layers incl. margin).
    pub bytes: u64,
    /// Ranks of the tensor-parallel group this stage is one rank of (0: not split so). A group
    /// is that many consecutive stages on one node with the same layers, in rank order.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tp: u32,
    /// Bytes of the model's routed experts this stage keeps in the node's host memory (0: all
    /// on the GPU).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub experts_on_host: u64,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// The pipeline segments of a plan's stages: runs of consecutive stages of one tensor-parallel
/// group, or single stages.
pub fn segments(stages: &[PlacedStage]) -> Vec<&[PlacedStage]> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < stages.len() {
        let n = (stages[i].tp as usize).clamp(1, stages.len() - i);
        out.push(&stages[i..i + n]);
        i += n;
    }
    out
}

/// Where a replica goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Plan {
    OneGpu {
        stage: PlacedStage,
    },
    /// Layers split over GPUs of one node.
    MultiGpu {
        node: String,
        stages: Vec<PlacedStage>,
    },
    /// Layers split over GPUs of several nodes.
    MultiNode {
        stages: Vec<PlacedStage>,
    },
}

impl Plan {
    /// The stages in pipeline order (layer ranges ascending and contiguous).
    pub fn stages(&self) -> &[PlacedStage] {
        match self {
            Plan::OneGpu { stage } => std::slice::from_ref(stage),
            Plan::MultiGpu { stages, .. } | Plan::MultiNode { stages } => stages,
        }
    }

    /// The memory the plan reserves over all its GPUs.
    pub fn total_bytes(&self) -> u64 {
        self.stages().iter().map(|s| s.bytes).sum()
    }

    /// Builds the plan kind that matches the stages: one stage, one node, or several nodes.
    fn from_stages(mut stages: Vec<PlacedStage>) -> Option<Plan> {
        let first = stages.first()?.node.clone();
        Some(if stages.len() == 1 {
            Plan::OneGpu { stage: stages.remove(0) }
        } else if stages.iter().all(|s| s.node == first) {
            Plan::MultiGpu { node: first, stages }
        } else {
            Plan::MultiNode { stages }
        })
    }
}

/// Why a replica fits nowhere: the need, and one reason per node (in node-id order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unschedulable {
    /// Estimate (or measurement) plus margin for the whole model on one device.
    pub needs_bytes: u64,
    /// With a measurement: the estimate plus margin, for the reason's second number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_bytes: Option<u64>,
    pub reasons: Vec<NodeReason>,
    /// A plan over GPUs of several nodes exists, but the policy does not allow one.
    #[serde(default)]
    pub fits_across_nodes: bool,
}

/// Why one node cannot take the replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReason {
    pub node: String,
    pub reason: String,
}

impl fmt::Display for Unschedulable {
    /// `needs 143.2 GiB; w1, w3: 1×24.0 GiB, …; w2: …` — nodes with the same reason share it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "needs {}", format_bytes(self.needs_bytes))?;
        if let Some(e) = self.estimated_bytes {
            write!(f, " as measured (estimated {})", format_bytes(e))?;
        }
        if self.reasons.is_empty() {
            f.write_str("; no nodes")?;
        }
        // Group identical reasons (in order of first appearance) so a large uniform cluster
        // still reads as one line per kind of node.
        let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
        let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for r in &self.reasons {
            let i = *index.entry(r.reason.as_str()).or_insert_with(|| {
                groups.push((r.reason.as_str(), Vec::new()));
                groups.len() - 1
            });
            groups[i].1.push(r.node.as_str());
        }
        for (reason, nodes) in groups {
            write!(f, "; {}: {reason}", nodes.join(", "))?;
        }
        if self.fits_across_nodes {
            f.write_str(" (fits across nodes; allow_multi_node is off)")?;
        }
        Ok(())
    }
}

/// Places one replica. `Err` only for a model the estimator cannot size; "does not fit" is
/// `Ok(Err(Unschedulable))`.
pub fn place(nodes: &[NodeView], req: &ReplicaRequest<'_>) -> Result<Result<Plan, Unschedulable>> {
    let estimate = estimate_vram(req.spec, &req.options)?;
    let filter = Filter::new(req.policy);
    let margin = Margin(req.margin_percent);
    let needs_bytes = margin.add(req.measured_bytes.unwrap_or(estimate.total_bytes));

    if let Some(plan) = one_gpu(nodes, req, &filter, needs_bytes) {
        return Ok(Ok(plan));
    }
    // Splits are sized from the estimate's terms: scaled up as the measurement says.
    let margin = match req.measured_bytes {
        Some(m) if m > estimate.total_bytes => {
            let scaled = (100 + u128::from(margin.0)) * u128::from(m);
            Margin(u64::try_from(scaled.div_ceil(u128::from(estimate.total_bytes.max(1))) - 100).unwrap_or(u64::MAX))
        }
        _ => margin,
    };
    let model = memory_model(req.spec, &req.options)?;
    let floor = SplitFloor::new(&model);
    if let Some(plan) = one_node(nodes, req, &filter, margin, &floor)? {
        return Ok(Ok(plan));
    }
    // Also worked out when not allowed, so the answer can say that it would fit. Nodes with
    // linked GPUs first try one tensor-parallel group per node, the groups a pipeline.
    let across = match across_linked_nodes(nodes, req, &filter, margin, &model)? {
        Some(plan) => Some(plan),
        None => multi_node(nodes, req, &filter, margin, floor.max_devices)?,
    };
    if let Some(plan) = across.as_ref().filter(|_| req.policy.allow_multi_node) {
        return Ok(Ok(plan.clone()));
    }
    if let Some(plan) = experts_on_host(nodes, req, &filter, margin)? {
        return Ok(Ok(plan));
    }
    Ok(Err(Unschedulable {
        needs_bytes,
        estimated_bytes: req.measured_bytes.map(|_| Margin(req.margin_percent).add(estimate.total_bytes)),
        reasons: reasons(nodes, &filter, needs_bytes),
        fits_across_nodes: across.is_some(),
    }))
}

/// (d) A mixture of experts on one GPU with its routed experts in the host memory of the GPU's
/// node: when no plan on GPUs alone fits. The GPU is picked as for one GPU, among the nodes
/// whose reported host memory holds the experts (with the margin).
fn experts_on_host(
    nodes: &[NodeView],
    req: &ReplicaRequest<'_>,
    filter: &Filter<'_>,
    margin: Margin,
) -> Result<Option<Plan>> {
    let Some(host) = crate::shard::experts_on_host(req.spec, &req.options)? else { return Ok(None) };
    let host_need = margin.add(host.host_bytes);
    let roomy: Vec<NodeView> = nodes.iter().filter(|n| n.host_free_bytes >= host_need).cloned().collect();
    Ok(one_gpu(&roomy, req, filter, margin.add(host.stage.total_bytes)).map(|plan| match plan {
        Plan::OneGpu { stage } => Plan::OneGpu { stage: PlacedStage { experts_on_host: host.host_bytes, ..stage } },
        other => other,
    }))
}

/// `bytes` plus `percent`, rounded up: the memory placement reserves for an estimate.
pub fn with_margin(bytes: u64, percent: u64) -> u64 {
    Margin(percent).add(bytes)
}

/// The safety margin, in percent on top of every estimate.
#[derive(Debug, Clone, Copy)]
struct Margin(u64);

impl Margin {
    /// `bytes` plus the margin, rounded up: `add(x) <= free` exactly when `x <= room(free)`.
    fn add(self, bytes: u64) -> u64 {
        let v = (bytes as u128 * (100 + self.0 as u128)).div_ceil(100);
        u64::try_from(v).unwrap_or(u64::MAX)
    }

    /// What `free` bytes can hold once the margin is kept back.
    fn room(self, free: u64) -> u64 {
        // At most `free`, so it fits in u64.
        (free as u128 * 100 / (100 + self.0 as u128)) as u64
    }
}

/// The policy's filters.
struct Filter<'p> {
    policy: &'p Policy,
    /// The trimmed GPU name to look for; empty: any GPU.
    gpu_name: &'p str,
}

impl<'p> Filter<'p> {
    fn new(policy: &'p Policy) -> Filter<'p> {
        Filter { policy, gpu_name: policy.gpu_name.trim() }
    }

    fn node_matches(&self, node: &NodeView) -> bool {
        self.policy.node_selector.iter().all(|(k, v)| node.labels.get(k) == Some(v))
    }

    fn gpu_matches(&self, gpu: &GpuView) -> bool {
        self.gpu_name.is_empty() || contains_ignore_case(&gpu.name, self.gpu_name)
    }
}

/// Whether `haystack` contains `needle`, ignoring ASCII case, without allocating (it runs for
/// every GPU of every placement).
fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

/// The best single GPU so far.
struct Pick<'a> {
    node: &'a NodeView,
    gpu: &'a GpuView,
    /// The GPU's score, lowest best: free bytes (binpack) or `u64::MAX -` free bytes (spread).
    score: u64,
    /// Replicas of the deployment on the node (spread only).
    replicas: u32,
}

/// (a) One GPU anywhere, in one pass over every GPU and without allocating: this is what
/// nearly every placement comes down to, so its common path is a few compares per GPU.
fn one_gpu(nodes: &[NodeView], req: &ReplicaRequest<'_>, filter: &Filter<'_>, need: u64) -> Option<Plan> {
    let spread = req.policy.strategy == Strategy::Spread;
    // A GPU that does not fit scores u64::MAX; one that fits never does (`need` > 0, and free
    // bytes of u64::MAX count as one less).
    let score_of = |gpu: &GpuView| {
        let fits = gpu.free_bytes >= need.max(1) && filter.gpu_matches(gpu);
        match (fits, spread) {
            (false, _) => u64::MAX,
            (true, false) => gpu.free_bytes.min(u64::MAX - 1),
            (true, true) => u64::MAX - gpu.free_bytes,
        }
    };
    let mut best: Option<Pick<'_>> = None;
    for node in nodes.iter().filter(|n| filter.node_matches(n)) {
        // This node's best GPU: the tightest (binpack) or the emptiest (spread).
        let mut pick: Option<(u64, &GpuView)> = None;
        let mut pick_key = (u64::MAX, u32::MAX);
        for gpu in &node.gpus {
            let key = (score_of(gpu), gpu.index);
            if key < pick_key && key.0 != u64::MAX {
                pick_key = key;
                pick = Some((key.0, gpu));
            }
        }
        let Some((score, gpu)) = pick else { continue };
        let here = (score, node.id.as_str(), gpu.index);
        // Only a node at least as good as the best so far needs a closer look (ties need the
        // ids, spread the replica count: both cost more than the rest).
        let replicas = match &best {
            Some(b) if score > b.score && (!spread || b.replicas == 0) => continue,
            Some(b) if !spread || b.replicas == 0 => {
                if here >= (b.score, b.node.id.as_str(), b.gpu.index) {
                    continue;
                }
                if spread { req.replicas_on_node.get(node.id.as_str()).copied().unwrap_or(0) } else { 0 }
            }
            _ => {
                if spread {
                    req.replicas_on_node.get(node.id.as_str()).copied().unwrap_or(0)
                } else {
                    0
                }
            }
        };
        if best.as_ref().is_none_or(|b| (replicas, here) < (b.replicas, (b.score, b.node.id.as_str(), b.gpu.index))) {
            best = Some(Pick { node, gpu, score, replicas });
        }
    }
    let b = best?;
    let layers = 0..req.spec.weights.layout.layer_bytes.len() as u64;
    Some(Plan::OneGpu {
        stage: PlacedStage {
            node: b.node.id.clone(),
            gpu: b.gpu.index,
            layers,
            bytes: need,
            tp: 0,
            experts_on_host: 0,
        },
    })
}

/// The least memory `k` devices must have together to hold a `k`-way split: every layer's
/// weights and KV cache (with the fragmentation allowance), each device's overhead and
/// activations, and the embeddings and head at the ends. `shard::fit` refuses any `k` devices
/// with less, so this bounds the devices a split needs without running it.
#[derive(Debug)]
struct SplitFloor {
    layers_bytes: u64,
    per_device_bytes: u64,
    ends_bytes: u64,
    /// `shard::fit` gives every device at least one layer.
    max_devices: usize,
}

impl SplitFloor {
    fn new(model: &MemoryModel) -> SplitFloor {
        let with_fragmentation = |b: u64| b.saturating_add(MemoryModel::fragmentation(b));
        let layers_bytes = model
            .layout
            .layer_bytes
            .iter()
            .zip(&model.layer_kv_bytes)
            .map(|(w, kv)| with_fragmentation(w.saturating_add(*kv)))
            .fold(0u64, u64::saturating_add);
        let l = &model.layout;
        let ends_bytes = with_fragmentation(l.embedding_bytes.saturating_add(l.other_bytes))
            .saturating_add(with_fragmentation(l.head_bytes.saturating_add(l.tied_head_bytes)));
        SplitFloor {
            layers_bytes,
            per_device_bytes: model.fixed_overhead_bytes.saturating_add(model.activation_bytes),
            ends_bytes,
            max_devices: l.layer_bytes.len(),
        }
    }

    /// The floor for `k >= 2` devices.
    fn at(&self, k: usize) -> u64 {
        self.layers_bytes.saturating_add(self.per_device_bytes.saturating_mul(k as u64)).saturating_add(self.ends_bytes)
    }

    /// The fewest of `rooms` (sorted largest first) that could hold a split, with their sum:
    /// `shard::fit` splits over the largest devices first, so it never needs fewer.
    fn fewest(&self, rooms: &[u64]) -> Option<(usize, u64)> {
        let mut sum = *rooms.first()?;
        for (i, &room) in rooms.iter().enumerate().take(self.max_devices).skip(1) {
            sum = sum.saturating_add(room);
            if sum >= self.at(i + 1) {
                return Some((i + 1, sum));
            }
        }
        None
    }
}

/// The best score a split on a node could have; ordered by score, then node id.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Bound<'a> {
    /// Lowest best. Binpack: (GPUs, their room); spread: (replicas of the deployment on the
    /// node, `u64::MAX -` the node's room).
    score: (u64, u64),
    id: &'a str,
    /// Position in the node list.
    node: usize,
}

/// (b) Several GPUs of one node. Each node gets a bound — the best score a split there could
/// have, from the fewest of its GPUs that could hold it — and `shard::fit` runs on the nodes
/// best bound first, stopping as soon as no node left can beat the best plan found: usually
/// after one call.
fn one_node(
    nodes: &[NodeView],
    req: &ReplicaRequest<'_>,
    filter: &Filter<'_>,
    margin: Margin,
    floor: &SplitFloor,
) -> Result<Option<Plan>> {
    let spread = req.policy.strategy == Strategy::Spread;
    let mut bounds: Vec<Reverse<Bound<'_>>> = Vec::new();
    // Only nodes whose GPUs together could hold a split are worth a closer look; checked on
    // free bytes first.
    let least_free = margin.add(floor.at(2));
    let mut rooms = Vec::new();
    for (i, node) in nodes.iter().enumerate().filter(|(_, n)| filter.node_matches(n)) {
        let (count, free) = node
            .gpus
            .iter()
            .filter(|g| filter.gpu_matches(g))
            .fold((0, 0u64), |(n, sum), g| (n + 1, sum.saturating_add(g.free_bytes)));
        // A tensor-parallel split (linked GPUs) can need less than the layer split's floor: its
        // ranks share the vocabulary, so a tied head needs no copy. Such nodes are bounded low.
        if count < 2 || (free < least_free && !node.gpus_linked) {
            continue;
        }
        rooms.clear();
        rooms.extend(node.gpus.iter().filter(|g| filter.gpu_matches(g)).map(|g| margin.room(g.free_bytes)));
        rooms.sort_unstable_by(|a, b| b.cmp(a));
        let (k, sum) = match floor.fewest(&rooms) {
            Some(found) => found,
            None if node.gpus_linked => (2, 0),
            None => continue,
        };
        let key = if spread {
            let replicas = req.replicas_on_node.get(node.id.as_str()).copied().unwrap_or(0);
            let total = rooms.iter().fold(0u64, |a, &r| a.saturating_add(r));
            (u64::from(replicas), u64::MAX - total)
        } else {
            (k as u64, sum)
        };
        bounds.push(Reverse(Bound { score: key, id: node.id.as_str(), node: i }));
    }
    let mut bounds = std::collections::BinaryHeap::from(bounds);

    let mut best: Option<((u64, u64), &str, Vec<PlacedStage>)> = None;
    while let Some(Reverse(Bound { score: bound, id, node: i })) = bounds.pop() {
        if best.as_ref().is_some_and(|(key, best_id, _)| (bound, id) >= (*key, *best_id)) {
            break;
        }
        let node = &nodes[i];
        let gpus: Vec<&GpuView> = node.gpus.iter().filter(|g| filter.gpu_matches(g)).collect();
        let rooms: Vec<u64> = gpus.iter().map(|g| margin.room(g.free_bytes)).collect();
        let Some((stages, tp)) = split(req, &rooms, node.gpus_linked)? else { continue };
        // The plan's real score: `fit` may need more GPUs than the bound.
        let key = if spread {
            bound
        } else {
            (stages.len() as u64, stages.iter().fold(0u64, |a, s| a.saturating_add(rooms[s.device])))
        };
        if best.as_ref().is_none_or(|(k, best_id, _)| (key, id) < (*k, *best_id)) {
            let placed = stages.iter().map(|s| placed_stage(s, node, gpus[s.device], margin, tp)).collect();
            best = Some((key, id, placed));
        }
    }
    Ok(best.and_then(|(_, _, stages)| Plan::from_stages(stages)))
}

/// The stages `shard::fit` finds for devices that can hold `rooms`, if it fits, with the size
/// of their tensor-parallel group (0 for pipeline stages).
fn split(req: &ReplicaRequest<'_>, rooms: &[u64], linked: bool) -> Result<Option<(Vec<Stage>, u32)>> {
    Ok(match fit_on(req.spec, &req.options, rooms, linked)? {
        Fit::OneDevice { stage } => Some((vec![stage], 0)),
        Fit::Split { stages } => Some((stages, 0)),
        Fit::TensorParallel { ranks } => {
            let n = ranks.len() as u32;
            Some((ranks, n))
        }
        // Host memory is weighed by `place` itself, after every plan on the GPUs.
        Fit::ExpertsOnHost { .. } | Fit::NoFit { .. } => None,
    })
}

/// A shard stage as a placed one: the margin added back, never more than the GPU has.
fn placed_stage(stage: &Stage, node: &NodeView, gpu: &GpuView, margin: Margin, tp: u32) -> PlacedStage {
    PlacedStage {
        node: node.id.clone(),
        gpu: gpu.index,
        layers: stage.layers.clone(),
        bytes: margin.add(stage.total_bytes).min(gpu.free_bytes),
        tp,
        experts_on_host: 0,
    }
}

/// (c) GPUs of several nodes. `shard::fit` uses the fewest devices, largest first, so only the
/// largest `max_devices` GPUs matter. A pipeline should cross the network as rarely as
/// possible, so each node's stages must be contiguous: when the largest-first order mixes
/// nodes, the GPUs are given grouped by node (nodes with the largest smallest GPU first), each
/// counted at no more than the GPUs before it, which `fit` then keeps in that order. That can
/// count a GPU at less than it has; it never counts one at more.
fn multi_node(
    nodes: &[NodeView],
    req: &ReplicaRequest<'_>,
    filter: &Filter<'_>,
    margin: Margin,
    max_devices: usize,
) -> Result<Option<Plan>> {
    let mut all: Vec<(&NodeView, &GpuView, u64)> = nodes
        .iter()
        .filter(|n| filter.node_matches(n))
        .flat_map(|n| n.gpus.iter().filter(|g| filter.gpu_matches(g)).map(move |g| (n, g, margin.room(g.free_bytes))))
        .filter(|&(_, _, room)| room > 0)
        .collect();
    let largest_first = |a: &(&NodeView, &GpuView, u64), b: &(&NodeView, &GpuView, u64)| {
        (Reverse(a.2), a.0.id.as_str(), a.1.index).cmp(&(Reverse(b.2), b.0.id.as_str(), b.1.index))
    };
    if all.len() > max_devices && max_devices > 0 {
        all.select_nth_unstable_by(max_devices - 1, largest_first);
        all.truncate(max_devices);
    }
    if all.len() < 2 {
        return Ok(None);
    }
    // Grouped by node, nodes with the largest smallest GPU first, each node's GPUs largest first.
    let mut smallest: BTreeMap<&str, u64> = BTreeMap::new();
    for &(n, _, room) in &all {
        let e = smallest.entry(n.id.as_str()).or_insert(room);
        *e = (*e).min(room);
    }
    all.sort_by(|a, b| {
        let (sa, sb) = (smallest[a.0.id.as_str()], smallest[b.0.id.as_str()]);
        (Reverse(sa), a.0.id.as_str(), Reverse(a.2), a.1.index).cmp(&(
            Reverse(sb),
            b.0.id.as_str(),
            Reverse(b.2),
            b.1.index,
        ))
    });
    let rooms: Vec<u64> = all.iter().map(|x| x.2).collect();
    let mut attempts = vec![rooms.clone()];
    // The second try: never more than the GPUs before, so `fit` keeps the grouped order.
    let mut running = u64::MAX;
    attempts.push(
        rooms
            .iter()
            .map(|&r| {
                running = running.min(r);
                running
            })
            .collect(),
    );
    for rooms in attempts {
        // Across nodes, layer by layer only (one device per stage).
        let Some((stages, 0)) = split(req, &rooms, false)? else { continue };
        let placed: Vec<PlacedStage> =
            stages.iter().map(|s| placed_stage(s, all[s.device].0, all[s.device].1, margin, 0)).collect();
        if contiguous_by_node(&placed) {
            return Ok(Plan::from_stages(placed));
        }
    }
    Ok(None)
}

/// (c′) Linked nodes, one tensor-parallel group each, the groups pipeline stages across the
/// network (TP within a node, PP across nodes). A node's group is the most of its GPUs that
/// split the model evenly (the KV heads divided, not shared), each counted at the room of the
/// smallest of them. A group of `n` ranks holding a stage's layers needs `1/n` of their weights
/// and KV cache on each rank plus each rank's own overhead and activations, so to the layer
/// planner it is one device of `n·room − (n−1)·(overhead + activations)`; each rank then
/// reserves its share. `None` unless at least two linked nodes take part.
fn across_linked_nodes(
    nodes: &[NodeView],
    req: &ReplicaRequest<'_>,
    filter: &Filter<'_>,
    margin: Margin,
    model: &MemoryModel,
) -> Result<Option<Plan>> {
    let a = &req.spec.architecture;
    let shape = crate::tp::TpShape::of(a);
    let fixed = model.fixed_overhead_bytes.saturating_add(model.activation_bytes);
    // (node, its group's GPUs, ranks, the group's room as one device)
    let mut groups: Vec<(&NodeView, Vec<&GpuView>, u64, u64)> = Vec::new();
    for node in nodes.iter().filter(|n| n.gpus_linked && filter.node_matches(n)) {
        let mut gpus: Vec<&GpuView> = node.gpus.iter().filter(|g| filter.gpu_matches(g)).collect();
        gpus.sort_by(|x, y| y.free_bytes.cmp(&x.free_bytes).then(x.index.cmp(&y.index)));
        let Some(n) = (2..=gpus.len())
            .rev()
            .find(|&n| crate::tp::check(&shape, n).is_ok() && shape.num_kv_heads.is_multiple_of(n))
        else {
            continue;
        };
        gpus.truncate(n);
        let room = margin.room(gpus.iter().map(|g| g.free_bytes).min().unwrap_or(0));
        let n64 = n as u64;
        let Some(as_one) = room.saturating_mul(n64).checked_sub(fixed.saturating_mul(n64 - 1)) else { continue };
        if as_one > 0 {
            gpus.sort_by_key(|g| g.index);
            groups.push((node, gpus, n64, as_one));
        }
    }
    if groups.len() < 2 {
        return Ok(None);
    }
    groups.sort_by(|x, y| y.3.cmp(&x.3).then(x.0.id.cmp(&y.0.id)));
    let rooms: Vec<u64> = groups.iter().map(|g| g.3).collect();
    let Fit::Split { stages } = crate::shard::fit(req.spec, &req.options, &rooms)? else { return Ok(None) };
    let mut placed = Vec::new();
    for stage in &stages {
        let (node, gpus, n, _) = &groups[stage.device];
        let per_rank = stage.total_bytes.saturating_sub(fixed) / n + fixed;
        for g in gpus {
            placed.push(PlacedStage {
                node: node.id.clone(),
                gpu: g.index,
                layers: stage.layers.clone(),
                bytes: margin.add(per_rank).min(g.free_bytes),
                tp: *n as u32,
                experts_on_host: 0,
            });
        }
    }
    Ok(Plan::from_stages(placed))
}

/// Whether each node's stages follow one another.
fn contiguous_by_node(stages: &[PlacedStage]) -> bool {
    let mut seen: Vec<&str> = Vec::new();
    for s in stages {
        if seen.last() != Some(&s.node.as_str()) {
            if seen.contains(&s.node.as_str()) {
                return false;
            }
            seen.push(&s.node);
        }
    }
    true
}

/// One reason per node, in node-id order, with the numbers behind it.
fn reasons(nodes: &[NodeView], filter: &Filter<'_>, need: u64) -> Vec<NodeReason> {
    let mut sorted: Vec<&NodeView> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    sorted
        .into_iter()
        .map(|node| NodeReason { node: node.id.clone(), reason: node_reason(node, filter, need) })
        .collect()
}

fn node_reason(node: &NodeView, filter: &Filter<'_>, need: u64) -> String {
    if node.gpus.is_empty() {
        return "no GPUs".into();
    }
    let policy = filter.policy;
    if !filter.node_matches(node) {
        let wanted: Vec<String> = policy
            .node_selector
            .iter()
            .filter(|(k, v)| node.labels.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        return format!("labels do not match {}", wanted.join(","));
    }
    let mut gpus: Vec<&GpuView> = node.gpus.iter().filter(|g| filter.gpu_matches(g)).collect();
    if gpus.is_empty() {
        let mut names: Vec<&str> = node.gpus.iter().map(|g| g.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        return format!("no GPU named like {:?} (has {})", filter.gpu_name, names.join(", "));
    }
    gpus.sort_by(|a, b| b.total_bytes.cmp(&a.total_bytes).then(a.index.cmp(&b.index)));
    let described: Vec<Gpu> = gpus.iter().map(|g| Gpu { name: g.name.clone(), memory_bytes: g.total_bytes }).collect();
    let best = gpus.iter().map(|g| g.free_bytes).max().unwrap_or(0);
    let mut reason = format!(
        "{}, {} free on the best GPU, needs {}",
        describe_gpus(&described),
        format_bytes(best),
        format_bytes(need)
    );
    if gpus.len() > 1 {
        // Reasons are only written when nothing fits, so a split here failed too.
        let total = gpus.iter().fold(0u64, |a, g| a.saturating_add(g.free_bytes));
        reason.push_str(&format!("; {} free over {} GPUs", format_bytes(total), gpus.len()));
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::units::GIB;

    fn model(id: &str) -> (ModelSpec, MemoryModel) {
        let spec = Catalog::builtin().unwrap().get(id).unwrap().spec().unwrap();
        let model = memory_model(&spec, &ServeOptions::default()).unwrap();
        (spec, model)
    }

    #[test]
    fn split_floor_is_never_above_what_a_split_needs() {
        for id in
            ["meta-llama/Meta-Llama-3-70B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct", "google/gemma-2-27b-it"]
        {
            let (spec, m) = model(id);
            let floor = SplitFloor::new(&m);
            for k in 2..=8usize {
                // k equal devices just at the floor: if they hold a k-way split, the bound
                // would wrongly rule them out; one byte less per device must not fit k ways.
                let below = vec![floor.at(k) / k as u64 - 1; k];
                let fitted = fit(&spec, &ServeOptions::default(), &below).unwrap();
                assert!(fitted.stages().len() != k, "{id}: {k} devices below the floor split: {fitted:?}");
                // Comfortably above it (a layer's worth each) they do hold a split.
                let above = vec![floor.at(k) / k as u64 + 3 * GIB; k];
                let fitted = fit(&spec, &ServeOptions::default(), &above).unwrap();
                assert!(!fitted.stages().is_empty() && fitted.stages().len() <= k, "{id}: {k}: {fitted:?}");
            }
        }
    }

    #[test]
    fn margin_rounds_up_and_room_matches_it_exactly() {
        let m = Margin(5);
        assert_eq!(m.add(100), 105);
        assert_eq!(m.add(101), 107); // 106.05 rounds up
        for free in [0, 1, 104, 105, 106, 107, 80 * GIB, u64::MAX / 2] {
            for x in [0, 1, 100, 101, 76 * GIB, 80 * GIB] {
                assert_eq!(m.add(x) <= free, x <= m.room(free), "free {free}, x {x}");
            }
        }
    }

    #[test]
    fn finds_gpu_names_case_insensitively() {
        let cases = [("NVIDIA H100 80GB HBM3", "h100", true), ("NVIDIA A10G", "H100", false), ("Tesla T4", "", true)];
        for (name, needle, want) in cases {
            assert_eq!(contains_ignore_case(name, needle), want, "{name} / {needle}");
        }
        assert!(!contains_ignore_case("A1", "A100"));
    }
}
