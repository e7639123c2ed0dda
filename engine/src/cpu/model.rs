//! A model (or a range of its layers) loaded for the CPU runtime: every projection a
//! [`QMatrix`] with its bias, fused projections split at load (Falcon's grouped heads put back
//! in query/key/value order, GPT-2's `Conv1D` transposed), norms and rotary tables ready.

use std::ops::Range;
use std::sync::Arc;

use gantry_core::Family;

use crate::EngineError;
use crate::config::{Activation, BlockKind, EngineConfig, MoeConfig, RopeConfig, RopeScaling, WeightFormat};
use crate::cpu::kernels::QMatrix;
use crate::cpu::kv::{KvDtype, KvPool, KvShape};
use crate::cpu::ops::Norm;
use crate::experts::ExpertMat;
use crate::layers::Rope;
use crate::weights::{LoadStats, Part, Role, WeightSource};

/// `x·Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub w: QMatrix,
    pub b: Option<Vec<f32>>,
}

impl Linear {
    fn split(&self, rows: Range<usize>) -> Linear {
        let ids: Vec<usize> = rows.clone().collect();
        Linear { w: self.w.select_rows(&ids), b: self.b.as_ref().map(|b| b[rows].to_vec()) }
    }
}

/// The feed-forward network: gated (`down(act(gate(x))·up(x))`) or plain (`down(act(up(x)))`).
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate: Option<Linear>,
    pub up: Linear,
    pub down: Linear,
    pub act: Activation,
}

/// A mixture-of-experts layer's router and experts.
#[derive(Debug, Clone)]
pub struct Moe {
    pub cfg: MoeConfig,
    /// `[experts, hidden]`, f32.
    pub router: Vec<f32>,
    pub router_bias: Option<Vec<f32>>,
    /// Gated MLPs.
    pub experts: Vec<Mlp>,
    /// The shared expert's scalar gate `[hidden]` (the shared expert is the layer's `mlp`).
    pub shared_gate: Option<Vec<f32>>,
}

impl Moe {
    /// The router's picks for one normalized row.
    pub fn route(&self, x: &[f32]) -> Vec<(usize, f32)> {
        let h = x.len();
        let logits: Vec<f32> = self
            .router
            .chunks_exact(h)
            .enumerate()
            .map(|(e, w)| {
                let dot: f32 = w.iter().zip(x).map(|(a, b)| a * b).sum();
                dot + self.router_bias.as_ref().map_or(0.0, |b| b[e])
            })
            .collect();
        self.cfg.route(&logits)
    }

    /// `σ(gate · x)`, the shared expert's weight for a row (1 without a gate).
    pub fn shared_scale(&self, x: &[f32]) -> f32 {
        self.shared_gate.as_ref().map_or(1.0, |g| {
            let dot: f32 = g.iter().zip(x).map(|(a, b)| a * b).sum();
            1.0 / (1.0 + (-dot).exp())
        })
    }
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: Norm,
    /// The MLP's input norm (`None`: it shares `attn_norm`'s output).
    pub ffn_norm: Option<Norm>,
    pub post_attn_norm: Option<Norm>,
    pub post_ffn_norm: Option<Norm>,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    pub out: Linear,
    /// The dense MLP; in a mixture-of-experts layer, its shared expert if it has one.
    pub mlp: Option<Mlp>,
    pub moe: Option<Moe>,
    pub window: Option<usize>,
    /// Uses the local rotary table (Gemma 3's sliding layers).
    pub local_rope: bool,
    /// One logit per query head joining the attention softmax (gpt-oss).
    pub sinks: Option<Vec<f32>>,
}

/// Layers `range` of a model, for the CPU runtime.
#[derive(Debug)]
pub struct CpuModel {
    pub config: Arc<EngineConfig>,
    pub range: Range<usize>,
    pub embed: Option<QMatrix>,
    /// Learned absolute positions `[max, hidden]` (GPT-2).
    pub pos_embed: Option<(usize, Vec<f32>)>,
    pub layers: Vec<Layer>,
    /// The final norm and output head (the last part).
    pub head: Option<(Norm, Linear)>,
    /// The global rotary table and, for Gemma 3, the local one.
    pub ropes: Option<(Rope, Option<Rope>)>,
    pub kv: Arc<KvPool>,
}

/// KV blocks a pool may take before the worker sizes it (taken as first needed).
pub(crate) const DEFAULT_KV_BLOCKS: usize = 1 << 20;

impl CpuModel {
    /// Loads layers `range` from `source`, reporting each layer done.
    pub fn load(
        source: &WeightSource,
        config: Arc<EngineConfig>,
        range: Range<usize>,
        stats: &mut LoadStats,
        progress: &mut dyn FnMut(usize),
    ) -> Result<CpuModel, EngineError> {
        let cfg = &*config;
        let first = range.start == 0;
        let last = range.end == cfg.num_layers;
        let embed = if first || (last && cfg.tied_embeddings) {
            Some(source.cpu_matrix(Role::TokenEmbd, None, false, stats)?)
        } else {
            None
        };
        let pos_embed = match cfg.learned_positions {
            Some(max) if first => {
                let v = source
                    .cpu_vec(Role::PosEmbd, None, Part::Weight)?
                    .ok_or(EngineError::MissingTensor("position embeddings".into()))?;
                Some((max.min(v.len() / cfg.hidden_size.max(1)), v))
            }
            _ => None,
        };
        let divisors = source.cpu_vec(Role::RopeFreqs, None, Part::Weight)?;
        let ropes = cfg.rope.as_ref().map(|r| rope_pair(r, divisors.as_deref()));
        let mut layers = Vec::with_capacity(range.len());
        for (done, i) in range.clone().enumerate() {
            layers.push(load_layer(source, cfg, i, stats)?);
            progress(done + 1);
        }
        let head = if last {
            let norm = norm(source, cfg, Role::OutputNorm, None)?;
            let out = if source.has(Role::Output, None, Part::Weight) {
                Linear {
                    w: source.cpu_matrix(Role::Output, None, false, stats)?,
                    b: source.cpu_vec(Role::Output, None, Part::Bias)?,
                }
            } else if let Some(e) = &embed {
                Linear { w: e.clone(), b: None }
            } else {
                return Err(EngineError::MissingTensor("output.weight".into()));
            };
            Some((norm, out))
        } else {
            None
        };
        // Quantized models keep keys and values in f16 (as llama.cpp does); f32 models in f32,
        // so that they match their reference exactly.
        let quantized = layers.first().is_some_and(|l| l.q.w.kind() != crate::cpu::quant::Kind::F32);
        let shape = KvShape {
            layers: range.len(),
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            dtype: if quantized { KvDtype::F16 } else { KvDtype::F32 },
        };
        let embed = if first { embed } else { None };
        Ok(CpuModel { config, range, embed, pos_embed, layers, head, ropes, kv: KvPool::new(shape, DEFAULT_KV_BLOCKS) })
    }

    /// Bytes of the weights.
    pub fn weight_bytes(&self) -> usize {
        let lin = |l: &Linear| l.w.size_in_bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let mlp = |m: &Mlp| m.gate.as_ref().map_or(0, lin) + lin(&m.up) + lin(&m.down);
                lin(&l.q)
                    + lin(&l.k)
                    + lin(&l.v)
                    + lin(&l.out)
                    + l.mlp.as_ref().map_or(0, mlp)
                    + l.moe.as_ref().map_or(0, |m| m.experts.iter().map(mlp).sum::<usize>() + m.router.len() * 4)
            })
            .sum();
        layers + self.embed.as_ref().map_or(0, QMatrix::size_in_bytes) + self.head.as_ref().map_or(0, |(_, h)| lin(h))
    }
}

/// The global rope and, for Gemma 3, the local one (its own base, no scaling).
fn rope_pair(cfg: &RopeConfig, divisors: Option<&[f32]>) -> (Rope, Option<Rope>) {
    let global = Rope::new(cfg, cfg.theta, divisors);
    let local =
        cfg.local_theta.map(|theta| Rope::new(&RopeConfig { scaling: RopeScaling::None, ..cfg.clone() }, theta, None));
    (global, local)
}

fn norm(source: &WeightSource, cfg: &EngineConfig, role: Role, layer: Option<usize>) -> Result<Norm, EngineError> {
    let w = source
        .cpu_vec(role, layer, Part::Weight)?
        .ok_or_else(|| EngineError::MissingTensor(format!("{role:?} weight")))?;
    let b = source.cpu_vec(role, layer, Part::Bias)?;
    Ok(Norm::new(cfg.norm, w, b))
}

fn linear(
    source: &WeightSource,
    role: Role,
    i: usize,
    transpose: bool,
    stats: &mut LoadStats,
) -> Result<Linear, EngineError> {
    Ok(Linear { w: source.cpu_matrix(role, Some(i), transpose, stats)?, b: source.cpu_vec(role, Some(i), Part::Bias)? })
}

fn load_layer(
    source: &WeightSource,
    cfg: &EngineConfig,
    i: usize,
    stats: &mut LoadStats,
) -> Result<Layer, EngineError> {
    // GPT-2 checkpoints from transformers store Conv1D matrices as [in, out].
    let transpose = cfg.family == Family::Gpt2 && cfg.format == WeightFormat::Safetensors;
    let (h, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let (q, k, v) = if source.has(Role::AttnQkv, Some(i), Part::Weight) {
        let qkv = linear(source, Role::AttnQkv, i, transpose, stats)?;
        if cfg.family == Family::Falcon && cfg.format == WeightFormat::Safetensors {
            // [kvh groups][h/kvh query heads, a key, a value] × d rows: back to [q; k; v].
            let per = h / kvh;
            let rows = |pick: &dyn Fn(usize) -> Range<usize>| -> Vec<usize> {
                (0..kvh).flat_map(pick).flat_map(|r| r * d..(r + 1) * d).collect()
            };
            let q_rows = rows(&|g| g * (per + 2)..g * (per + 2) + per);
            let k_rows = rows(&|g| g * (per + 2) + per..g * (per + 2) + per + 1);
            let v_rows = rows(&|g| g * (per + 2) + per + 1..g * (per + 2) + per + 2);
            let pick = |ids: &[usize]| Linear {
                w: qkv.w.select_rows(ids),
                b: qkv.b.as_ref().map(|b| ids.iter().map(|&r| b[r]).collect()),
            };
            (pick(&q_rows), pick(&k_rows), pick(&v_rows))
        } else {
            (qkv.split(0..h * d), qkv.split(h * d..h * d + kvh * d), qkv.split(h * d + kvh * d..h * d + 2 * kvh * d))
        }
    } else {
        (
            linear(source, Role::AttnQ, i, false, stats)?,
            linear(source, Role::AttnK, i, false, stats)?,
            linear(source, Role::AttnV, i, false, stats)?,
        )
    };
    let (q_norm, k_norm) = if cfg.qk_norm {
        (Some(norm(source, cfg, Role::AttnQNorm, Some(i))?), Some(norm(source, cfg, Role::AttnKNorm, Some(i))?))
    } else {
        (None, None)
    };
    let ffn = cfg.intermediate_size;
    let moe_cfg = cfg.moe.as_ref().filter(|m| m.is_sparse(i));
    let moe = moe_cfg.map(|m| load_moe(source, cfg, m, i, stats)).transpose()?;
    let mlp = if let Some(m) = moe_cfg {
        match m.shared_size {
            Some(_) => Some(Mlp {
                gate: Some(linear(source, Role::SharedGate, i, false, stats)?),
                up: linear(source, Role::SharedUp, i, false, stats)?,
                down: linear(source, Role::SharedDown, i, false, stats)?,
                act: m.act,
            }),
            None => None,
        }
    } else if cfg.family == Family::Phi3 && source.has(Role::FfnGateUp, Some(i), Part::Weight) {
        let gu = linear(source, Role::FfnGateUp, i, false, stats)?;
        Some(Mlp {
            gate: Some(gu.split(0..ffn)),
            up: gu.split(ffn..2 * ffn),
            down: linear(source, Role::FfnDown, i, false, stats)?,
            act: cfg.activation,
        })
    } else if cfg.gated_mlp {
        Some(Mlp {
            gate: Some(linear(source, Role::FfnGate, i, false, stats)?),
            up: linear(source, Role::FfnUp, i, false, stats)?,
            down: linear(source, Role::FfnDown, i, false, stats)?,
            act: cfg.activation,
        })
    } else {
        Some(Mlp {
            gate: None,
            up: linear(source, Role::FfnUp, i, transpose, stats)?,
            down: linear(source, Role::FfnDown, i, transpose, stats)?,
            act: cfg.activation,
        })
    };
    let attn_norm = norm(source, cfg, Role::AttnNorm, Some(i))?;
    let (ffn_norm, post_attn_norm, post_ffn_norm) = match cfg.block {
        BlockKind::Parallel { shared_norm: true } => (None, None, None),
        BlockKind::Parallel { shared_norm: false } => (Some(norm(source, cfg, Role::AttnNorm2, Some(i))?), None, None),
        BlockKind::Sequential => (Some(norm(source, cfg, Role::FfnNorm, Some(i))?), None, None),
        BlockKind::Sandwich => (
            Some(norm(source, cfg, Role::FfnNorm, Some(i))?),
            Some(norm(source, cfg, Role::AttnPostNorm, Some(i))?),
            Some(norm(source, cfg, Role::FfnPostNorm, Some(i))?),
        ),
    };
    let sliding = cfg.is_sliding(i);
    Ok(Layer {
        attn_norm,
        ffn_norm,
        post_attn_norm,
        post_ffn_norm,
        q,
        k,
        v,
        q_norm,
        k_norm,
        out: linear(source, Role::AttnOut, i, transpose, stats)?,
        mlp,
        moe,
        sinks: if cfg.attn_sinks {
            Some(
                source
                    .cpu_vec(Role::AttnSinks, Some(i), Part::Weight)?
                    .ok_or_else(|| EngineError::MissingTensor(format!("layer {i}'s attention sinks")))?,
            )
        } else {
            None
        },
        window: if sliding { cfg.sliding_window } else { None },
        local_rope: sliding && cfg.rope.as_ref().is_some_and(|r| r.local_theta.is_some()),
    })
}

/// Layer `i`'s router and experts.
fn load_moe(
    source: &WeightSource,
    cfg: &EngineConfig,
    m: &MoeConfig,
    i: usize,
    stats: &mut LoadStats,
) -> Result<Moe, EngineError> {
    if cfg.block != BlockKind::Sequential {
        return Err(EngineError::Unsupported("experts in a block that is not sequential".into()));
    }
    let h = cfg.hidden_size;
    let router = source
        .cpu_vec(Role::MoeRouter, Some(i), Part::Weight)?
        .ok_or_else(|| EngineError::MissingTensor(format!("layer {i}'s expert router")))?;
    if router.len() != m.experts * h {
        return Err(EngineError::Config(format!(
            "layer {i}'s router has {} values, not {} experts × {h}",
            router.len(),
            m.experts
        )));
    }
    let router_bias = source.cpu_vec(Role::MoeRouter, Some(i), Part::Bias)?;
    let mut mats = Vec::with_capacity(3);
    for which in [ExpertMat::Gate, ExpertMat::Up, ExpertMat::Down] {
        let raws = source.experts(i, which, m.experts)?;
        let biases = source.expert_biases(i, which, m.experts)?;
        let mut ls = Vec::with_capacity(m.experts);
        for (e, raw) in raws.into_iter().enumerate() {
            ls.push(Linear { w: raw.into_cpu(stats)?, b: biases.as_ref().map(|b| b[e].clone()) });
        }
        mats.push(ls);
    }
    let down = mats.pop().unwrap_or_default();
    let up = mats.pop().unwrap_or_default();
    let gate = mats.pop().unwrap_or_default();
    let experts: Vec<Mlp> = gate
        .into_iter()
        .zip(up)
        .zip(down)
        .map(|((gate, up), down)| Mlp { gate: Some(gate), up, down, act: m.act })
        .collect();
    if let Some(bad) =
        experts.iter().find(|e| e.up.w.cols() != h || e.down.w.rows() != h || e.down.w.cols() != e.up.w.rows())
    {
        return Err(EngineError::Config(format!(
            "layer {i}'s experts are [{}, {}] and [{}, {}], not hidden {h} in and out",
            bad.up.w.rows(),
            bad.up.w.cols(),
            bad.down.w.rows(),
            bad.down.w.cols()
        )));
    }
    let shared_gate =
        if m.shared_size.is_some() { source.cpu_vec(Role::SharedExpertGate, Some(i), Part::Weight)? } else { None };
    Ok(Moe { cfg: m.clone(), router, router_bias, experts, shared_gate })
}
