//! Self-attention with grouped key/value heads, rotary embeddings, sliding windows, soft-capping
//! and either a growing per-sequence KV cache or a paged store shared by a batch's sequences.

use candle_core::{D, DType, Device, Result, Tensor};

use crate::config::QkvLayout;
use crate::cpu::kv::BLOCK_TOKENS;
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

    /// Attends `x` `[1, rows, hidden]`: the rows of one sequence in its own cache, or of
    /// several sequences in a paged store ([`KvAccess`]).
    pub fn forward(&self, x: &Tensor, kv: KvAccess<'_>) -> Result<Tensor> {
        let (q, k, v) = self.project(x)?;
        let y = match kv {
            KvAccess::Own { cache, start } => {
                if cache.len() != start {
                    candle_core::bail!("cache holds {} tokens but the step starts at position {start}", cache.len());
                }
                self.attend(&q, &k, &v, start, |k, v| cache.append(k, v))?
            }
            KvAccess::Paged { store, seqs } => {
                let mut ys = Vec::with_capacity(seqs.len());
                for s in seqs {
                    let rows = |t: &Tensor| t.narrow(1, s.row, s.rows);
                    ys.push(self.attend(&rows(&q)?, &rows(&k)?, &rows(&v)?, s.start, |k, v| store.put_get(k, v, s))?);
                }
                Tensor::cat(&ys, 1)?
            }
        };
        self.out.forward(&y)
    }

    /// One sequence's attention: `q`, `k`, `v` `[1, t, heads * head_dim]` at positions
    /// `start..start+t`; `keep` stores the step's keys and values `[1, kv_heads, t, head_dim]`
    /// and returns all the sequence's so far. Returns `[1, t, heads * head_dim]`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        start: usize,
        keep: impl FnOnce(&Tensor, &Tensor) -> Result<(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
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
            let (cos, sin) = rope.tables(start, t, start + t, q.device(), q.dtype())?;
            q = rope.apply(&q, &cos, &sin)?;
            k = rope.apply(&k, &cos, &sin)?;
        }
        let (k_all, v_all) = keep(&k, &v)?;
        let total = k_all.dim(2)?;

        // Group queries by their KV head so K and V are never copied per query head:
        // [b, kvh, rep * t, d] · [b, kvh, d, total].
        let rep = h / kvh;
        let q = (q.contiguous()? * self.scale)?.reshape((b, kvh, rep * t, d))?;
        let mut scores = q.matmul(&k_all.transpose(2, 3)?)?;
        if let Some(cap) = self.softcap {
            scores = ((scores / cap)?.tanh()? * cap)?;
        }
        if let Some(mask) = mask(t, start, total, self.window, rep, q.device(), scores.dtype())? {
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
        y.reshape((b, kvh, rep, t, d))?.permute((0, 3, 1, 2, 4))?.reshape((b, t, h * d))
    }
}

/// Where a step's keys and values go, and where the sequences' earlier ones are.
#[derive(Debug)]
pub enum KvAccess<'a> {
    /// One sequence's own growing cache, the step at position `start`.
    Own { cache: &'a mut LayerCache, start: usize },
    /// Several sequences' blocks in one layer of a paged store; `seqs` says which rows of the
    /// step are whose.
    Paged { store: &'a LayerStore, seqs: &'a [SeqRows] },
}

/// A sequence's rows in a batched step.
#[derive(Debug, Clone)]
pub struct SeqRows {
    /// Its first row in the step, and how many.
    pub row: usize,
    pub rows: usize,
    /// The position of its first row.
    pub start: usize,
    /// Its block table: position `p` is slot `table[p / BLOCK_TOKENS] * BLOCK_TOKENS + p % BLOCK_TOKENS`.
    table: Vec<u32>,
    /// The slots of its positions `0..start + rows`, on the store's device: the same for every
    /// layer of the step, so made once.
    slots: Tensor,
}

impl SeqRows {
    /// The rows `row..row + rows` of a step at positions `start..`, with blocks `table`.
    pub fn new(row: usize, rows: usize, start: usize, table: Vec<u32>, device: &Device) -> Result<SeqRows> {
        let total = start + rows;
        let slots: Vec<u32> = (0..total).map(|p| slot(&table, p) as u32).collect();
        let slots = Tensor::from_vec(slots, total, device)?;
        Ok(SeqRows { row, rows, start, table, slots })
    }

    fn slot(&self, p: usize) -> usize {
        slot(&self.table, p)
    }
}

/// The slot of position `p` in block table `table`.
fn slot(table: &[u32], p: usize) -> usize {
    table[p / BLOCK_TOKENS] as usize * BLOCK_TOKENS + p % BLOCK_TOKENS
}

/// One layer of a paged KV store on a device: keys and values `[slots, kv_heads, head_dim]`,
/// slot `b * BLOCK_TOKENS + p` holding position `p` of block `b` (the blocks are handed out
/// by a [`crate::cpu::kv::KvPool`] that keeps only their ids).
#[derive(Debug, Clone)]
pub struct LayerStore {
    k: Tensor,
    v: Tensor,
}

impl LayerStore {
    /// A store of `slots` positions.
    pub fn new(slots: usize, kv_heads: usize, head_dim: usize, dtype: DType, device: &Device) -> Result<LayerStore> {
        let zeros = || Tensor::zeros((slots, kv_heads, head_dim), dtype, device);
        Ok(LayerStore { k: zeros()?, v: zeros()? })
    }

    /// Positions it has room for.
    pub fn slots(&self) -> usize {
        self.k.dim(0).unwrap_or(0)
    }

    /// A store of `slots` positions holding this one's.
    pub fn grown(&self, slots: usize) -> Result<LayerStore> {
        let (_, kvh, d) = self.k.dims3()?;
        let bigger = LayerStore::new(slots, kvh, d, self.k.dtype(), self.k.device())?;
        bigger.k.slice_set(&self.k, 0, 0)?;
        bigger.v.slice_set(&self.v, 0, 0)?;
        Ok(bigger)
    }

    /// Writes the step's keys and values `[1, kv_heads, t, head_dim]` of sequence `s` into its
    /// blocks, then gathers all of its positions so far, `[1, kv_heads, start + t, head_dim]`.
    fn put_get(&self, k: &Tensor, v: &Tensor, s: &SeqRows) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let rows = |x: &Tensor| x.squeeze(0)?.transpose(0, 1)?.contiguous(); // [t, kvh, d]
        let (k, v) = (rows(k)?, rows(v)?);
        // Runs of positions within one block are contiguous slots.
        let mut i = 0;
        while i < t {
            let p = s.start + i;
            let n = (BLOCK_TOKENS - p % BLOCK_TOKENS).min(t - i);
            let at = s.slot(p);
            if at + n > self.slots() {
                candle_core::bail!("block {} is beyond the KV store's {} slots", at / BLOCK_TOKENS, self.slots());
            }
            self.k.slice_set(&k.narrow(0, i, n)?, 0, at)?;
            self.v.slice_set(&v.narrow(0, i, n)?, 0, at)?;
            i += n;
        }
        let all = |x: &Tensor| x.index_select(&s.slots, 0)?.transpose(0, 1)?.contiguous()?.unsqueeze(0);
        Ok((all(&self.k)?, all(&self.v)?))
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
