//! Splitting a model's layers over several devices when one cannot hold it.
//!
//! Each stage holds a contiguous range of layers with their KV cache, plus the activations of
//! one step and the per-device overhead; the first stage also holds the embeddings (and any
//! vision tower), the last the final norm and output head (with a copy of the embeddings when
//! the head is tied). Ranges are sized in proportion to what each device can hold, so a
//! 12 GiB + 8 GiB pair is filled 60/40 rather than split evenly, and the fewest devices that
//! fit are used, largest first.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::spec::ModelSpec;
use crate::units::format_bytes;
use crate::vram::{MemoryModel, ServeOptions, estimate_vram, memory_model};

/// Layers `start..end` as people write them: `0-7` (inclusive), `5` for one layer.
pub fn layer_span(layers: &Range<u64>) -> String {
    match layers.end.saturating_sub(1) {
        last if last <= layers.start => layers.start.to_string(),
        last => format!("{}-{last}", layers.start),
    }
}

/// One pipeline stage: a device and the layers it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// Index into the device list the plan was made for.
    pub device: usize,
    /// The layers it runs, `start..end`.
    pub layers: Range<u64>,
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    pub activation_bytes: u64,
    pub overhead_bytes: u64,
    pub total_bytes: u64,
    /// Memory the device has for it.
    pub free_bytes: u64,
}

/// How a model fits a set of devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fit {
    /// The whole model on one device (the one with the least room that still fits).
    OneDevice { stage: Stage },
    /// Layers split over several devices.
    Split { stages: Vec<Stage> },
    /// Every layer split over several devices of one node (tensor parallelism): one stage per
    /// rank, each with all the layers and its share of their bytes.
    TensorParallel { ranks: Vec<Stage> },
    /// A mixture-of-experts model on one device with its routed experts in host memory (the
    /// experts' `host_bytes` there): when no device, and no split, holds the whole model.
    ExpertsOnHost { stage: Stage, host_bytes: u64 },
    /// It does not fit, and why.
    NoFit { reason: String },
}

impl Fit {
    /// The stages of the plan (none when it does not fit).
    pub fn stages(&self) -> &[Stage] {
        match self {
            Fit::OneDevice { stage } => std::slice::from_ref(stage),
            Fit::Split { stages } => stages,
            Fit::TensorParallel { ranks } => ranks,
            Fit::ExpertsOnHost { stage, .. } => std::slice::from_ref(stage),
            Fit::NoFit { .. } => &[],
        }
    }
}

/// Finds how `spec` served with `options` fits devices with `free` bytes each: one device if
/// any can hold it (the smallest such, to keep big ones free), else the fewest devices,
/// largest first, with layers in proportion to their room.
pub fn fit(spec: &ModelSpec, options: &ServeOptions, free: &[u64]) -> Result<Fit> {
    fit_on(spec, options, free, false)
}

/// Like [`fit`], for devices that are `linked` (NVLink, or declared so): a model too big for
/// one device is then split tensor-parallel over the fewest that hold it (every layer's
/// all-reduces want the fast link), and only when no such split exists (the heads do not
/// divide, or the ranks do not fit) layer by layer. Unlinked devices get the pipeline split
/// only: over PCIe or the network, activations cross once per stage rather than twice a layer.
///
/// A mixture-of-experts model that fits none of those ways is placed on one device with its
/// routed experts in host memory ([`Fit::ExpertsOnHost`]) when the device holds the rest.
pub fn fit_on(spec: &ModelSpec, options: &ServeOptions, free: &[u64], linked: bool) -> Result<Fit> {
    let fitted = fit_pipeline(spec, options, free)?;
    if matches!(fitted, Fit::OneDevice { .. }) {
        return Ok(fitted);
    }
    if linked && let Some(ranks) = tensor_parallel(spec, options, free)? {
        return Ok(Fit::TensorParallel { ranks });
    }
    if let Fit::NoFit { reason } = &fitted
        && let Some(host) = experts_on_host(spec, options)?
    {
        // The device with the least room that holds the rest.
        let pick = (0..free.len()).filter(|&d| free[d] >= host.stage.total_bytes).min_by_key(|&d| (free[d], d));
        return Ok(match pick {
            Some(device) => Fit::ExpertsOnHost {
                stage: Stage { device, free_bytes: free[device], ..host.stage },
                host_bytes: host.host_bytes,
            },
            None => Fit::NoFit {
                reason: format!(
                    "{reason}; with its experts in host memory ({}) it needs {} on one device",
                    format_bytes(host.host_bytes),
                    format_bytes(host.stage.total_bytes)
                ),
            },
        });
    }
    Ok(fitted)
}

/// A mixture-of-experts model with its routed experts in host memory: what the device holds
/// (everything else: attention, shared experts, routers, embeddings, head, the KV cache) and
/// what the host holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostExperts {
    /// The device's stage (`device` and `free_bytes` unset).
    pub stage: Stage,
    pub host_bytes: u64,
}

/// What a mixture-of-experts model needs with its experts in host memory (`None` for a dense
/// model, or one whose experts cannot be told apart in its files).
pub fn experts_on_host(spec: &ModelSpec, options: &ServeOptions) -> Result<Option<HostExperts>> {
    let model = memory_model(spec, options)?;
    let experts = model.layout.total_expert_bytes();
    if experts == 0 || spec.architecture.moe.is_none() {
        return Ok(None);
    }
    let est = estimate_vram(spec, options)?;
    let weights = est.weights_bytes.saturating_sub(experts);
    let overhead = est.overhead_bytes.saturating_sub(MemoryModel::fragmentation(experts));
    let stage = Stage {
        device: 0,
        layers: 0..model.layout.layer_bytes.len() as u64,
        weights_bytes: weights,
        kv_cache_bytes: est.kv_cache_bytes,
        activation_bytes: est.activation_bytes,
        overhead_bytes: overhead,
        total_bytes: weights + est.kv_cache_bytes + est.activation_bytes + overhead,
        free_bytes: 0,
    };
    Ok(Some(HostExperts { stage, host_bytes: experts }))
}

/// The bytes one rank of a `n`-way tensor-parallel split holds, by term.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankBytes {
    pub weights: u64,
    pub kv_cache: u64,
    pub activations: u64,
    pub overhead: u64,
}

impl RankBytes {
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.activations + self.overhead
    }
}

/// What each rank of an `n`-way tensor-parallel split needs (`None` when the model cannot be
/// split `n` ways): its share of every layer, of the vocabulary (embeddings and head), of the
/// KV heads (a whole KV head when there are fewer than ranks, whose key/value projections are
/// then repeated too), and the full activations and per-device overhead.
pub fn rank_bytes(spec: &ModelSpec, options: &ServeOptions, n: usize) -> Result<Option<RankBytes>> {
    let a = &spec.architecture;
    let shape = crate::tp::TpShape::of(a);
    if n < 2 || crate::tp::check(&shape, n).is_err() {
        return Ok(None);
    }
    let model = memory_model(spec, options)?;
    let l = &model.layout;
    let n64 = n as u64;
    // The KV heads a rank holds, as a fraction of all of them: 1/n, or one whole head.
    let kv_heads = a.num_kv_heads.max(1);
    let kv_per_rank = (kv_heads / n64).max(1);
    let layers: u64 = l.layer_bytes.iter().sum();
    // The key/value projections' part of a layer (gated MLP assumed), repeated on the ranks
    // sharing a KV head.
    let (h, kv, d, ffn) = (a.num_heads as f64, a.num_kv_heads as f64, a.head_dim as f64, a.intermediate_size as f64);
    let kv_share = 2.0 * kv * d / (2.0 * h * d + 2.0 * kv * d + 3.0 * ffn).max(1.0);
    let repeated = (layers as f64 * kv_share * (kv_per_rank as f64 / kv_heads as f64 - 1.0 / n as f64)).max(0.0) as u64;
    let weights = layers / n64 + repeated + (l.embedding_bytes + l.head_bytes) / n64 + l.other_bytes;
    let kv_cache = model.layer_kv_bytes.iter().sum::<u64>() * kv_per_rank / kv_heads;
    let overhead = model.fixed_overhead_bytes + MemoryModel::fragmentation(weights + kv_cache);
    Ok(Some(RankBytes { weights, kv_cache, activations: model.activation_bytes, overhead }))
}

/// The fewest of the largest devices that hold an even tensor-parallel split, one stage per rank.
fn tensor_parallel(spec: &ModelSpec, options: &ServeOptions, free: &[u64]) -> Result<Option<Vec<Stage>>> {
    let mut order: Vec<usize> = (0..free.len()).collect();
    order.sort_by(|&a, &b| free[b].cmp(&free[a]).then(a.cmp(&b)));
    let layers = spec.weights.layout.layer_bytes.len() as u64;
    for n in 2..=free.len() {
        let Some(rank) = rank_bytes(spec, options, n)? else { continue };
        let chosen = &order[..n];
        if chosen.iter().all(|&d| free[d] >= rank.total()) {
            let mut devices = chosen.to_vec();
            devices.sort_unstable();
            return Ok(Some(
                devices
                    .into_iter()
                    .map(|device| Stage {
                        device,
                        layers: 0..layers,
                        weights_bytes: rank.weights,
                        kv_cache_bytes: rank.kv_cache,
                        activation_bytes: rank.activations,
                        overhead_bytes: rank.overhead,
                        total_bytes: rank.total(),
                        free_bytes: free[device],
                    })
                    .collect(),
            ));
        }
    }
    Ok(None)
}

fn fit_pipeline(spec: &ModelSpec, options: &ServeOptions, free: &[u64]) -> Result<Fit> {
    let estimate = estimate_vram(spec, options)?;
    let model = memory_model(spec, options)?;
    if free.is_empty() {
        return Ok(Fit::NoFit { reason: "no devices given".into() });
    }
    let mut order: Vec<usize> = (0..free.len()).collect();
    // Largest first; equal sizes keep their given order.
    order.sort_by(|&a, &b| free[b].cmp(&free[a]).then(a.cmp(&b)));

    let layers = model.layout.layer_bytes.len() as u64;
    if let Some(&device) = order.iter().rev().find(|&&d| free[d] >= estimate.total_bytes) {
        let stage = Stage {
            device,
            layers: 0..layers,
            weights_bytes: estimate.weights_bytes,
            kv_cache_bytes: estimate.kv_cache_bytes,
            activation_bytes: estimate.activation_bytes,
            overhead_bytes: estimate.overhead_bytes,
            total_bytes: estimate.total_bytes,
            free_bytes: free[device],
        };
        return Ok(Fit::OneDevice { stage });
    }
    for k in 2..=order.len().min(layers as usize) {
        let chosen = &order[..k];
        if let Some(stages) = split_over(&model, chosen, free) {
            return Ok(Fit::Split { stages });
        }
    }
    let total_free: u64 = free.iter().sum();
    let largest = free[order[0]];
    let mut reason = format!(
        "needs {} on one device, the largest has {}",
        format_bytes(estimate.total_bytes),
        format_bytes(largest)
    );
    if free.len() > 1 {
        reason.push_str(&format!(
            "; split over all {} devices ({} in all) it still does not fit",
            free.len(),
            format_bytes(total_free)
        ));
    }
    Ok(Fit::NoFit { reason })
}

/// Per-stage cost of layer `j`: its weights and KV cache, with the fragmentation allowance.
fn layer_cost(model: &MemoryModel, j: usize) -> u64 {
    let raw = model.layout.layer_bytes[j] + model.layer_kv_bytes[j];
    raw + MemoryModel::fragmentation(raw)
}

/// Fixed costs of a stage whatever its layers: overhead, activations, and the embeddings or
/// head at the ends of the pipeline.
fn fixed_cost(model: &MemoryModel, first: bool, last: bool) -> u64 {
    let mut extra = 0;
    if first {
        extra += model.layout.embedding_bytes + model.layout.other_bytes;
    }
    if last {
        extra += model.layout.head_bytes + model.layout.tied_head_bytes;
    }
    model.fixed_overhead_bytes + model.activation_bytes + extra + MemoryModel::fragmentation(extra)
}

/// Splits the layers over `devices` (in pipeline order) in proportion to their room; falls
/// back to filling each device in turn. `None` when they cannot hold it.
fn split_over(model: &MemoryModel, devices: &[usize], free: &[u64]) -> Option<Vec<Stage>> {
    let k = devices.len();
    let n = model.layout.layer_bytes.len();
    let room: Vec<u64> = devices
        .iter()
        .enumerate()
        .map(|(i, &d)| free[d].checked_sub(fixed_cost(model, i == 0, i == k - 1)))
        .collect::<Option<_>>()?;
    let costs: Vec<u64> = (0..n).map(|j| layer_cost(model, j)).collect();
    let need: u64 = costs.iter().sum();
    let have: u64 = room.iter().sum();
    if need > have {
        return None;
    }
    let proportional = |i: usize| (need as u128 * room[i] as u128 / have.max(1) as u128) as u64;
    let bounds = assign(&costs, &room, &proportional).or_else(|| assign(&costs, &room, &|i| room[i]))?;

    let mut stages = Vec::with_capacity(k);
    for (i, range) in bounds.into_iter().enumerate() {
        let first = i == 0;
        let last = i == k - 1;
        let mut weights: u64 = model.layout.layer_bytes[range.clone()].iter().sum();
        if first {
            weights += model.layout.embedding_bytes + model.layout.other_bytes;
        }
        if last {
            weights += model.layout.head_bytes + model.layout.tied_head_bytes;
        }
        let kv: u64 = model.layer_kv_bytes[range.clone()].iter().sum();
        let overhead = model.fixed_overhead_bytes + MemoryModel::fragmentation(weights + kv);
        let total = weights + kv + model.activation_bytes + overhead;
        let device = devices[i];
        if total > free[device] {
            return None;
        }
        stages.push(Stage {
            device,
            layers: range.start as u64..range.end as u64,
            weights_bytes: weights,
            kv_cache_bytes: kv,
            activation_bytes: model.activation_bytes,
            overhead_bytes: overhead,
            total_bytes: total,
            free_bytes: free[device],
        });
    }
    Some(stages)
}

/// Walks the layers giving device `i` layers up to `target(i)` bytes (rounded to the nearest
/// layer, never past its room); the last device takes the rest. Every device gets at least
/// one layer.
fn assign(costs: &[u64], room: &[u64], target: &dyn Fn(usize) -> u64) -> Option<Vec<Range<usize>>> {
    let k = room.len();
    let n = costs.len();
    let mut out = Vec::with_capacity(k);
    let mut start = 0;
    #[allow(clippy::needless_range_loop)] // `i` also decides "last device" and the target
    for i in 0..k {
        let devices_after = k - i - 1;
        let mut end = start;
        let mut used = 0u64;
        if i == k - 1 {
            end = n;
            used = costs[start..].iter().sum();
        } else {
            while end < n - devices_after {
                let c = costs[end];
                let within_room = used + c <= room[i];
                let nearer_target = used + c / 2 <= target(i);
                if end > start && !(within_room && nearer_target) {
                    break;
                }
                if !within_room {
                    return None;
                }
                used += c;
                end += 1;
            }
        }
        if end == start || used > room[i] {
            return None;
        }
        out.push(start..end);
        start = end;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assign_fills_in_proportion_to_room() {
        let costs = vec![10; 10];
        let room = vec![60, 40];
        let ranges = assign(&costs, &room, &|i| 100 * room[i] / 100).unwrap();
        assert_eq!(ranges, vec![0..6, 6..10]);
    }

    #[test]
    fn assign_gives_every_device_a_layer_or_fails() {
        assert!(assign(&[10, 10], &[100, 100, 100], &|_| 50).is_none());
        assert_eq!(assign(&[10, 10], &[100, 100], &|_| 1000).unwrap(), vec![0..1, 1..2]);
    }

    #[test]
    fn assign_refuses_when_a_device_overflows() {
        assert!(assign(&[10, 10, 10], &[15, 15], &|i| [15, 15][i]).is_none());
    }
}
