//! The building blocks of a transformer block: linear maps, norms, MLPs, rotary embeddings.

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{D, DType, Device, Module, Result, Tensor};

use crate::config::{Activation, NormKind, RopeConfig, RopeScaling};
use crate::tp::Communicator;

/// A weight matrix: Candle's quantized or dense matmul (`x · Wᵀ`).
pub type Matrix = QMatMul;

/// `x · Wᵀ + b` with a quantized or dense `W`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Matrix,
    pub bias: Option<Tensor>,
    /// A row-parallel slice of a tensor-parallel model: `x · Wᵀ` is this rank's partial sum,
    /// added up over the group before the bias.
    pub reduce: Option<Arc<dyn Communicator>>,
}

impl Linear {
    /// An unsplit linear map.
    pub fn new(weight: Matrix, bias: Option<Tensor>) -> Linear {
        Linear { weight, bias, reduce: None }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = self.weight.forward(x)?;
        if let Some(comm) = &self.reduce {
            y = comm.all_reduce_sum(&y)?;
        }
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// RMSNorm or LayerNorm with its weights.
#[derive(Debug, Clone)]
pub struct Norm {
    pub kind: NormKind,
    /// For RMSNorm with a unit offset, already `1 + w`.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Norm {
    /// Builds a norm, folding Gemma's `1 + w` into the weight.
    pub fn new(kind: NormKind, weight: Tensor, bias: Option<Tensor>) -> Result<Norm> {
        let weight = match kind {
            NormKind::Rms { unit_offset: true, .. } => (weight + 1.0)?,
            _ => weight,
        };
        Ok(Norm { kind, weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.kind {
            NormKind::Rms { eps, .. } => {
                let x = x.contiguous()?;
                candle_nn::ops::rms_norm(&x, &self.weight, eps as f32)
            }
            NormKind::Layer { eps } => {
                let x = x.contiguous()?;
                match &self.bias {
                    Some(b) => candle_nn::ops::layer_norm(&x, &self.weight, b, eps as f32),
                    None => {
                        let zeros = self.weight.zeros_like()?;
                        candle_nn::ops::layer_norm(&x, &self.weight, &zeros, eps as f32)
                    }
                }
            }
        }
    }
}

/// Applies an activation function.
pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Silu => candle_nn::ops::silu(x),
        Activation::GeluTanh => x.gelu(),
        Activation::GeluErf => x.gelu_erf(),
        Activation::ClampedSwiglu { alpha, limit } => {
            let g = x.clamp(f32::NEG_INFINITY, limit)?;
            g.mul(&candle_nn::ops::sigmoid(&(&g * f64::from(alpha))?)?)
        }
    }
}

/// A gated unit: `act(gate) · up` (gpt-oss's clamps `up` and adds one).
pub fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    let g = activate(gate, act)?;
    match act {
        Activation::ClampedSwiglu { limit, .. } => g.mul(&(up.clamp(-limit, limit)? + 1.0)?),
        _ => g.mul(up),
    }
}

/// The feed-forward network: gated (`down(act(gate(x)) * up(x))`) or plain (`down(act(up(x)))`).
#[derive(Debug, Clone)]
pub enum Mlp {
    Gated {
        gate: Linear,
        up: Linear,
        down: Linear,
        act: Activation,
    },
    /// Gate and up in one matrix, gate first (Phi-3).
    GatedFused {
        gate_up: Linear,
        down: Linear,
        act: Activation,
    },
    Plain {
        up: Linear,
        down: Linear,
        act: Activation,
    },
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Mlp::Gated { gate, up, down, act } => down.forward(&gated(&gate.forward(x)?, &up.forward(x)?, *act)?),
            Mlp::GatedFused { gate_up, down, act } => {
                let gu = gate_up.forward(x)?;
                let half = gu.dim(D::Minus1)? / 2;
                let g = gu.narrow(D::Minus1, 0, half)?;
                let u = gu.narrow(D::Minus1, half, half)?;
                down.forward(&gated(&g, &u, *act)?)
            }
            Mlp::Plain { up, down, act } => down.forward(&activate(&up.forward(x)?, *act)?),
        }
    }
}

/// Rotary position embedding: inverse frequencies, and cos/sin for the positions of a step.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
    /// Inverse frequencies used past the original context (LongRoPE's long factors).
    inv_freq_long: Option<(Vec<f64>, usize)>,
    attention_factor: f64,
    rotary_dim: usize,
    interleaved: bool,
    linear_factor: f64,
}

impl Rope {
    /// Builds the tables for one base frequency `theta` (a model can have two: Gemma 3).
    pub fn new(cfg: &RopeConfig, theta: f64, freq_divisors: Option<&[f32]>) -> Rope {
        let dim = cfg.rotary_dim;
        let base: Vec<f64> = (0..dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64)).collect();
        let mut inv_freq = base.clone();
        let mut inv_freq_long = None;
        let mut attention_factor = 1.0;
        let mut linear_factor = 1.0;
        match &cfg.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => linear_factor = *factor,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_context } => {
                let low_wavelen = original_context / low_freq_factor;
                let high_wavelen = original_context / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    *f = if wavelen < high_wavelen {
                        *f
                    } else if wavelen > low_wavelen {
                        *f / factor
                    } else {
                        let smooth =
                            (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * *f / factor + smooth * *f
                    };
                }
            }
            RopeScaling::Factors { short, long, original_context, attention_factor: af } => {
                inv_freq = base.iter().zip(short).map(|(f, s)| f / s).collect();
                inv_freq_long = Some((base.iter().zip(long).map(|(f, s)| f / s).collect(), *original_context));
                attention_factor = *af;
            }
            RopeScaling::Yarn { factor, beta_fast, beta_slow, original_context, truncate, attention_factor: af } => {
                // The dimension that turns `rotations` times over the original context.
                let dim_f = dim as f64;
                let corr = |rotations: f64| {
                    dim_f * (original_context / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim_f - 1.0));
                if low == high {
                    high += 0.001;
                }
                for (i, f) in inv_freq.iter_mut().enumerate() {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    *f = *f / factor * (1.0 - extrapolation) + *f * extrapolation;
                }
                attention_factor = *af;
            }
        }
        // llama.cpp stores Llama 3's scaling as per-dimension divisors (`rope_freqs`).
        if let Some(div) = freq_divisors {
            for (f, d) in inv_freq.iter_mut().zip(div) {
                *f /= f64::from(*d);
            }
        }
        Rope { inv_freq, inv_freq_long, attention_factor, rotary_dim: dim, interleaved: cfg.interleaved, linear_factor }
    }

    /// Rotated dimensions (the first `rotary_dim` of a head).
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim
    }

    /// Whether adjacent pairs rotate together (GGUF's layout) rather than the two halves.
    pub fn interleaved(&self) -> bool {
        self.interleaved
    }

    /// cos and sin (`rotary_dim/2` each) for position `pos` of a sequence that has reached
    /// `total` positions, as [`Rope::tables`] computes them.
    pub fn cos_sin(&self, pos: usize, total: usize, cos: &mut [f32], sin: &mut [f32]) {
        let inv = match &self.inv_freq_long {
            Some((long, original)) if total > *original => long,
            _ => &self.inv_freq,
        };
        let p = pos as f64 / self.linear_factor;
        for ((f, c), s) in inv.iter().zip(cos.iter_mut()).zip(sin.iter_mut()) {
            let angle = p * f;
            *c = (angle.cos() * self.attention_factor) as f32;
            *s = (angle.sin() * self.attention_factor) as f32;
        }
    }

    /// cos and sin `[len, rotary_dim/2]` for positions `start..start+len`; `total` is the
    /// sequence length reached (LongRoPE switches tables past the original context).
    pub fn tables(
        &self,
        start: usize,
        len: usize,
        total: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let inv = match &self.inv_freq_long {
            Some((long, original)) if total > *original => long,
            _ => &self.inv_freq,
        };
        let half = inv.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            let pos = p as f64 / self.linear_factor;
            for f in inv {
                let angle = pos * f;
                cos.push((angle.cos() * self.attention_factor) as f32);
                sin.push((angle.sin() * self.attention_factor) as f32);
            }
        }
        let cos = Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// Rotates `x` `[batch, heads, len, head_dim]` (the first `rotary_dim` dimensions).
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let head_dim = x.dim(D::Minus1)?;
        let rotate = |t: &Tensor| -> Result<Tensor> {
            let t = t.contiguous()?;
            if self.interleaved {
                candle_nn::rotary_emb::rope_i(&t, cos, sin)
            } else {
                candle_nn::rotary_emb::rope(&t, cos, sin)
            }
        };
        if self.rotary_dim == head_dim {
            return rotate(x);
        }
        let rot = rotate(&x.narrow(D::Minus1, 0, self.rotary_dim)?)?;
        let pass = x.narrow(D::Minus1, self.rotary_dim, head_dim - self.rotary_dim)?;
        Tensor::cat(&[&rot, &pass], D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let cfg = RopeConfig {
            theta: 500_000.0,
            local_theta: None,
            rotary_dim: 128,
            interleaved: false,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 8192.0,
            },
        };
        let plain = Rope::new(&RopeConfig { scaling: RopeScaling::None, ..cfg.clone() }, 500_000.0, None);
        let scaled = Rope::new(&cfg, 500_000.0, None);
        assert_eq!(scaled.inv_freq[0], plain.inv_freq[0], "highest frequency untouched");
        let last = plain.inv_freq.len() - 1;
        assert!((scaled.inv_freq[last] - plain.inv_freq[last] / 8.0).abs() < 1e-15, "lowest divided by the factor");
    }

    #[test]
    fn rotation_by_zero_is_identity_and_preserves_norm() {
        let cfg = RopeConfig {
            theta: 10_000.0,
            local_theta: None,
            rotary_dim: 8,
            interleaved: false,
            scaling: RopeScaling::None,
        };
        let rope = Rope::new(&cfg, 10_000.0, None);
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 16.0, &dev).unwrap().reshape((1, 1, 2, 8)).unwrap();
        let (cos, sin) = rope.tables(0, 2, 2, &dev, DType::F32).unwrap();
        let y = rope.apply(&x, &cos, &sin).unwrap();
        let (x0, y0): (Vec<f32>, Vec<f32>) = (
            x.get(0).unwrap().get(0).unwrap().get(0).unwrap().to_vec1().unwrap(),
            y.get(0).unwrap().get(0).unwrap().get(0).unwrap().to_vec1().unwrap(),
        );
        assert_eq!(x0, y0, "position 0 is not rotated");
        let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((norm(&x) - norm(&y)).abs() < 1e-3);
    }
}
