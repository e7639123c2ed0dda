//! A mixture-of-experts layer on Candle: the router picks each token's experts
//! ([`MoeConfig::route`]), the tokens are grouped by expert so that each expert runs once per
//! step on all its tokens, and the weighted outputs are added back per token. The experts may
//! live on another device than the rest of the layer (host memory when a GPU is short: the
//! tokens go there and back).

use candle_core::{DType, Device, Tensor};

use crate::EngineError;
use crate::config::MoeConfig;
use crate::experts::ExpertMat;
use crate::layers::{Linear, Mlp, gated};
use crate::weights::{LoadStats, Part, Role, WeightSource};

/// One expert: a gated MLP.
#[derive(Debug, Clone)]
struct Expert {
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A layer's router, experts and (Qwen2-MoE) shared expert.
#[derive(Debug, Clone)]
pub struct MoeLayer {
    cfg: MoeConfig,
    router: Linear,
    experts: Vec<Expert>,
    /// The shared expert and its scalar gate.
    shared: Option<(Mlp, Linear)>,
    /// Where the experts are (the layer's device, or the host).
    expert_device: Device,
    /// The experts were put in host memory: each step's tokens go there and back (also when a
    /// CPU device stands in for the GPU, so that this path is what tests run).
    on_host: bool,
}

impl MoeLayer {
    /// Loads layer `i`'s experts onto `expert_device` and the rest onto `device`; `on_host`:
    /// the experts were asked to go to host memory.
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        source: &WeightSource,
        cfg: &MoeConfig,
        i: usize,
        device: &Device,
        expert_device: &Device,
        on_host: bool,
        dtype: DType,
        stats: &mut LoadStats,
    ) -> Result<MoeLayer, EngineError> {
        let linear = |role: Role, stats: &mut LoadStats| -> Result<Linear, EngineError> {
            Ok(Linear::new(
                source.matrix(role, Some(i), device, dtype, false, stats)?,
                source.dense_opt(role, Some(i), Part::Bias, device, dtype)?,
            ))
        };
        let router = linear(Role::MoeRouter, stats)?;
        let n = cfg.experts;
        let mut mats = Vec::with_capacity(3);
        for which in [ExpertMat::Gate, ExpertMat::Up, ExpertMat::Down] {
            let raws = source.experts(i, which, n)?;
            let biases = source.expert_biases(i, which, n)?;
            let mut ls = Vec::with_capacity(n);
            for (e, raw) in raws.into_iter().enumerate() {
                stats.tensors += 1;
                let weight = raw.into_candle(expert_device, dtype, stats)?;
                let bias = match &biases {
                    Some(b) => Some(Tensor::new(b[e].as_slice(), expert_device)?.to_dtype(dtype)?),
                    None => None,
                };
                ls.push(Linear::new(weight, bias));
            }
            mats.push(ls);
        }
        let down = mats.pop().unwrap_or_default();
        let up = mats.pop().unwrap_or_default();
        let gate = mats.pop().unwrap_or_default();
        let experts = gate.into_iter().zip(up).zip(down).map(|((gate, up), down)| Expert { gate, up, down }).collect();
        let shared = if cfg.shared_size.is_some() {
            let mlp = Mlp::Gated {
                gate: linear(Role::SharedGate, stats)?,
                up: linear(Role::SharedUp, stats)?,
                down: linear(Role::SharedDown, stats)?,
                act: cfg.act,
            };
            Some((mlp, linear(Role::SharedExpertGate, stats)?))
        } else {
            None
        };
        let layer =
            MoeLayer { cfg: cfg.clone(), router, experts, shared, expert_device: expert_device.clone(), on_host };
        stats.bytes += layer.expert_bytes() as u64;
        Ok(layer)
    }

    /// `x` `[b, t, hidden]` through the layer.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let xs = x.reshape((b * t, h))?;
        let logits = self.router.forward(&xs)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        // Per expert: its tokens and their weights, in token order.
        let mut groups: Vec<(Vec<u32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (tok, l) in logits.iter().enumerate() {
            for (e, w) in self.cfg.route(l) {
                groups[e].0.push(tok as u32);
                groups[e].1.push(w);
            }
        }
        let on_host = self.on_host || !x.device().same_device(&self.expert_device);
        let xe = if on_host { xs.to_device(&self.expert_device)? } else { xs.clone() };
        let mut out = xs.zeros_like()?;
        for (expert, (tokens, weights)) in self.experts.iter().zip(&groups) {
            if tokens.is_empty() {
                continue;
            }
            let n = tokens.len();
            let idx = Tensor::new(tokens.as_slice(), &self.expert_device)?;
            let rows = xe.index_select(&idx, 0)?;
            let y =
                expert.down.forward(&gated(&expert.gate.forward(&rows)?, &expert.up.forward(&rows)?, self.cfg.act)?)?;
            let w = Tensor::from_vec(weights.clone(), (n, 1), &self.expert_device)?.to_dtype(y.dtype())?;
            let y = y.broadcast_mul(&w)?;
            let (y, idx) = if on_host {
                (y.to_device(x.device())?, Tensor::new(tokens.as_slice(), x.device())?)
            } else {
                (y, idx)
            };
            out = out.index_add(&idx, &y, 0)?;
        }
        if let Some((mlp, gate)) = &self.shared {
            let s = candle_nn::ops::sigmoid(&gate.forward(&xs)?)?;
            out = (out + mlp.forward(&xs)?.broadcast_mul(&s)?)?;
        }
        out.reshape((b, t, h))
    }

    /// Bytes of the experts' weights (what offloading moves to the host).
    pub fn expert_bytes(&self) -> usize {
        self.experts
            .iter()
            .flat_map(|e| [&e.gate, &e.up, &e.down])
            .map(|l| match &l.weight {
                candle_core::quantized::QMatMul::QTensor(q) => q.storage_size_in_bytes(),
                candle_core::quantized::QMatMul::Tensor(t) | candle_core::quantized::QMatMul::TensorF16(t) => {
                    t.elem_count() * t.dtype().size_in_bytes()
                }
            })
            .sum()
    }

    /// Whether the experts were put in host memory.
    pub fn on_host(&self) -> bool {
        self.on_host
    }
}
