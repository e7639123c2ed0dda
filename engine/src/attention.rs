//! Self-attention with grouped key/value heads, rotary embeddings, sliding windows, soft-capping
//! and a growing per-sequence KV cache.

use candle_core::{D, DType, Device, Result, Tensor};

use crate::config::QkvLayout;
use crate::layers::{Linear, Norm, Rope};

/// The keys and values one layer has seen for one sequence, `[1, kv_heads, capacity, head_dim]`,
/// grown by doubling.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

/// First allocation of a cache, in tokens.
const INITIAL_CAPACITY: usize = 256;

impl LayerCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated (capacity, not just what is used).
    pub fn allocated_bytes(&self) -> usize {
        [&self.k, &self.v].iter().filter_map(|t| t.as_ref()).map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }

    /// Appends `k`, `v` `[1, kv_heads, n, head_dim]` and returns everything held so far.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        let needed = self.len + n;
        let capacity = self.k.as_ref().map_or(0, |t| t.dim(2).unwrap_or(0));
        if needed > capacity {
            let mut new_cap = capacity.max(INITIAL_CAPACITY);
            while new_cap < needed {
                new_cap *= 2;
            }
            let grow = |old: &Option<Tensor>, like: &Tensor| -> Result<Tensor> {
                let (b, h, _, d) = like.dims4()?;
                let fresh = Tensor::zeros((b, h, new_cap, d), like.dtype(), like.device())?;
                if let Some(old) = old
                    && self.len > 0
                {
                    fresh.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(fresh)
            };
            self.k = Some(grow(&self.k, k)?);
            self.v = Some(grow(&self.v, v)?);
        }
        let (kc, vc) = match (&self.k, &self.v) {
            (Some(kc), Some(vc)) => (kc, vc),
            _ => unreachable!("allocated above"),
        };
        kc.slice_set(&k.contiguous()?, 2, self.len)?;
        vc.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((kc.narrow(2, 0, self.len)?, vc.narrow(2, 0, self.len)?))
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        *self = LayerCache::default();
    }
}

/// The projections and settings of one layer's attention.
#[derive(Debug, Clone)]
pub struct Attention {
    pub qkv: QkvProj,
    pub out: Linear,
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    pub softcap: Option<f64>,
    /// Attend only to the last `window` positions.
    pub window: Option<usize>,
    pub rope: Option<Rope>,
    /// One logit per query head that joins the softmax's denominator (gpt-oss), `[heads]`.
    pub sinks: Option<Tensor>,
}

/// Query/key/value projections.
#[derive(Debug, Clone)]
pub enum QkvProj {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// One matrix; `layout` says how the rows are ordered.
    Fused {
        qkv: Linear,
        layout: QkvLayout,
    },
}

impl Attention {
    fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        match &self.qkv {
            QkvProj::Separate { q, k, v } => Ok((q.forward(x)?, k.forward(x)?, v.forward(x)?)),
            QkvProj::Fused { qkv, layout: QkvLayout::FalconGrouped } => {
                // [b, t, kvh, h/kvh + 2, d]: per group, its query heads, then a key, then a value.
                let per = h / kvh;
                let all = qkv.forward(x)?.reshape((b, t, kvh, per + 2, d))?;
                let q = all.narrow(3, 0, per)?.reshape((b, t, h * d))?;
                let k = all.narrow(3, per, 1)?.reshape((b, t, kvh * d))?;
                let v = all.narrow(3, per + 1, 1)?.reshape((b, t, kvh * d))?;
                Ok((q, k, v))
            }
            QkvProj::Fused { qkv, .. } => {
                let all = qkv.forward(x)?;
                let q = all.narrow(D::Minus1, 0, h * d)?;
                let k = all.narrow(D::Minus1, h * d, kvh * d)?;
                let v = all.narrow(D::Minus1, h * d + kvh * d, kvh * d)?;
                Ok((q, k, v))
            }
        }
    }

    /// Attends `x` `[1, t, hidden]` at positions `start..start+t`, appending to `cache`.
    pub fn forward(&self, x: &Tensor, start: usize, cache: &mut LayerCache) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = self.project(x)?;
        let mut q = q.reshape((b, t, h, d))?.transpose(1, 2)?;
        let mut k = k.reshape((b, t, kvh, d))?.transpose(1, 2)?;
        let v = v.reshape((b, t, kvh, d))?.transpose(1, 2)?;
        if let Some(n) = &self.q_norm {
            q = n.forward(&q)?;
        }
        if let Some(n) = &self.k_norm {
            k = n.forward(&k)?;
        }
        if let Some(rope) = &self.rope {
            let (cos, sin) = rope.tables(start, t, start + t, x.device(), x.dtype())?;
            q = rope.apply(&q, &cos, &sin)?;
            k = rope.apply(&k, &cos, &sin)?;
        }
        if cache.len() != start {
            candle_core::bail!("cache holds {} tokens but the step starts at position {start}", cache.len());
        }
        let (k_all, v_all) = cache.append(&k, &v)?;
        let total = k_all.dim(2)?;

        // Group queries by their KV head so K and V are never copied per query head:
        // [b, kvh, rep * t, d] · [b, kvh, d, total].
        let rep = h / kvh;
        let q = (q.contiguous()? * self.scale)?.reshape((b, kvh, rep * t, d))?;
        let mut scores = q.matmul(&k_all.transpose(2, 3)?)?;
        if let Some(cap) = self.softcap {
            scores = ((scores / cap)?.tanh()? * cap)?;
        }
        if let Some(mask) = mask(t, start, total, self.window, rep, x.device(), scores.dtype())? {
            scores = scores.broadcast_add(&mask)?;
        }
        let probs = match &self.sinks {
            None => candle_nn::ops::softmax_last_dim(&scores)?,
            Some(sinks) => {
                // Rows are (kv head, query head of its group, position): one sink per row.
                let col = sinks
                    .reshape((1, kvh, rep, 1, 1))?
                    .broadcast_as((b, kvh, rep, t, 1))?
                    .reshape((b, kvh, rep * t, 1))?
                    .to_dtype(scores.dtype())?;
                let with = Tensor::cat(&[&scores, &col], D::Minus1)?;
                candle_nn::ops::softmax_last_dim(&with)?.narrow(D::Minus1, 0, total)?
            }
        };
        let y = probs.matmul(&v_all.contiguous()?)?; // [b, kvh, rep * t, d]
        let y = y.reshape((b, kvh, rep, t, d))?.permute((0, 3, 1, 2, 4))?.reshape((b, t, h * d))?;
        self.out.forward(&y)
    }
}

/// The additive mask `[rep * t, total]` for queries at `start..start+t`: causal, and limited to
/// the last `window` keys when there is one (query `i` sees key `j` when `j <= i` and
/// `i - j < window`). `None` when nothing is masked.
fn mask(
    t: usize,
    start: usize,
    total: usize,
    window: Option<usize>,
    rep: usize,
    device: &Device,
    dtype: DType,
) -> Result<Option<Tensor>> {
    let sees = |i: usize, j: usize| j <= i && window.is_none_or(|w| i - j < w);
    let all_visible = (start..start + t).all(|i| (0..total).all(|j| sees(i, j)));
    if all_visible {
        return Ok(None);
    }
    let mut m = Vec::with_capacity(rep * t * total);
    for _ in 0..rep {
        for i in start..start + t {
            m.extend((0..total).map(|j| if sees(i, j) { 0f32 } else { f32::NEG_INFINITY }));
        }
    }
    Ok(Some(Tensor::from_vec(m, (rep * t, total), device)?.to_dtype(dtype)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_is_causal_and_windowed() {
        let m = mask(3, 2, 5, Some(2), 1, &Device::Cpu, DType::F32).unwrap().unwrap();
        let rows: Vec<Vec<f32>> = m.to_vec2().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(rows[0], vec![inf, 0.0, 0.0, inf, inf], "position 2 sees 1 and 2");
        assert_eq!(rows[2], vec![inf, inf, inf, 0.0, 0.0], "position 4 sees 3 and 4");
        assert!(mask(1, 4, 5, None, 1, &Device::Cpu, DType::F32).unwrap().is_none(), "decode without window");
    }

    #[test]
    fn cache_grows_and_keeps_order() {
        let dev = Device::Cpu;
        let mut c = LayerCache::default();
        for step in 0..300 {
            let k = Tensor::full(step as f32, (1, 2, 1, 4), &dev).unwrap();
            let (ka, _) = c.append(&k, &k).unwrap();
            assert_eq!(ka.dim(2).unwrap(), step + 1);
        }
        let (ka, _) = c
            .append(
                &Tensor::zeros((1, 2, 1, 4), DType::F32, &dev).unwrap(),
                &Tensor::zeros((1, 2, 1, 4), DType::F32, &dev).unwrap(),
            )
            .unwrap();
        let first: f32 = ka.get(0).unwrap().get(0).unwrap().get(299).unwrap().get(0).unwrap().to_scalar().unwrap();
        assert_eq!(first, 299.0);
        assert_eq!(c.allocated_bytes(), 2 * 512 * 2 * 4 * 4);
    }
}
