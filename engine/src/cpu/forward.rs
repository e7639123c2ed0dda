//! One forward pass of a batch on the CPU: the new tokens (or hidden states) of any number of
//! sequences, each at its own position with its own KV blocks, as one job of the pool — every
//! projection reads its weights once for all the batch's rows. Every row is computed exactly as
//! it would be alone: the kernels' arithmetic does not depend on the batch, norms and
//! attention work row by row, and a sequence's keys and values are its own.
//!
//! The operations, per layer: norms (and the pending residual) → Q/K/V by head, with q/k norms
//! and rotary embeddings, keys and values written to the cache → attention by (row, kv head)
//! → the attention output quantized → output projection → MLP input norm → gate/up with the
//! activation, quantized for the down projection → down projection with the residual. A
//! chunk's results are written only when it commits (see [`super::pool`]).

#![allow(unsafe_code)] // buffers written by one chunk each, under the pool's protocol.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::Arc;

use crate::EngineError;
use crate::config::BlockKind;
use crate::cpu::kernels::quantize_row_q8;
use crate::cpu::kernels::{ActsRef, Flavor, QMatrix, matmul};
use crate::cpu::kv::BLOCK_TOKENS;
use crate::cpu::model::{CpuModel, Layer, Linear, Mlp, Moe};
use crate::cpu::ops::{AttnParams, activate_into, attend_rows, rope, softcap};
use crate::cpu::pool::{Pool, Scratch, Task};
use crate::cpu::quant::{ActBlock, ActBlockK, ActFormat, QK, QK_K, quantize_row_q8k};

/// One sequence's part of a batch.
#[derive(Debug, Clone)]
pub struct SeqStep {
    pub input: SeqInput,
    /// The position of its first new row.
    pub start: usize,
    /// Its KV blocks, covering positions `0..start + rows`.
    pub blocks: Vec<u32>,
    /// Logits of every new row (`true`) or of the last only (the last part of a model).
    pub all_logits: bool,
}

/// What a sequence brings to a step.
#[derive(Debug, Clone)]
pub enum SeqInput {
    Tokens(Vec<u32>),
    /// Hidden states, `rows × hidden`, from the previous pipeline stage.
    Hidden(Vec<f32>),
}

impl SeqInput {
    /// Rows it brings (tokens, or hidden states of width `hidden`).
    pub fn rows(&self, hidden: usize) -> usize {
        match self {
            SeqInput::Tokens(t) => t.len(),
            SeqInput::Hidden(h) => h.len() / hidden.max(1),
        }
    }
}

/// A buffer chunks write into under the pool's protocol (one chunk per element range).
struct Buf<T>(Box<[UnsafeCell<T>]>);

impl<T: Copy + Default> Buf<T> {
    fn new(n: usize) -> Buf<T> {
        Buf((0..n).map(|_| UnsafeCell::new(T::default())).collect())
    }

    /// Elements `r`, for reading.
    ///
    /// # Safety
    /// No chunk is writing them (they were committed by an earlier operation).
    unsafe fn get(&self, r: Range<usize>) -> &[T] {
        let s = &self.0[r];
        // SAFETY: `UnsafeCell<T>` has `T`'s layout; nobody writes (the caller's contract).
        unsafe { std::slice::from_raw_parts(UnsafeCell::raw_get(s.as_ptr()), s.len()) }
    }

    /// Elements `r`, for writing.
    ///
    /// # Safety
    /// The caller's chunk is the only writer and reader of them now (its commit).
    #[allow(clippy::mut_from_ref)]
    unsafe fn get_mut(&self, r: Range<usize>) -> &mut [T] {
        let s = &self.0[r];
        // SAFETY: as above; exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(UnsafeCell::raw_get(s.as_ptr()), s.len()) }
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

impl Buf<f32> {
    /// `n` zeros, from zeroed memory (a large buffer's pages come zeroed from the system: no
    /// pass over them before the chunks write them).
    fn zeroed(n: usize) -> Buf<f32> {
        let b: Box<[f32]> = vec![0f32; n].into_boxed_slice();
        // SAFETY: `UnsafeCell<f32>` has `f32`'s layout (`repr(transparent)`).
        Buf(unsafe { Box::from_raw(Box::into_raw(b) as *mut [UnsafeCell<f32>]) })
    }

    /// The values, no copy.
    fn into_vec(self) -> Vec<f32> {
        // SAFETY: as in `zeroed`; owning the buffer, nobody else reads or writes it.
        unsafe { Box::from_raw(Box::into_raw(self.0) as *mut [f32]) }.into_vec()
    }
}

/// Activation rows in every format some consumer needs.
struct ActBufs {
    cols: usize,
    rows: usize,
    f32: Option<Buf<f32>>,
    q8: Option<(Buf<ActBlock>, Buf<f32>)>,
    q8k: Option<Buf<ActBlockK>>,
}

impl ActBufs {
    fn new(formats: &[ActFormat], rows: usize, cols: usize) -> ActBufs {
        let has = |f| formats.contains(&f);
        ActBufs {
            cols,
            rows,
            f32: has(ActFormat::F32).then(|| Buf::new(rows * cols)),
            q8: (has(ActFormat::Q8) && cols.is_multiple_of(QK))
                .then(|| (Buf::new(rows * cols / QK), Buf::new(rows * cols / QK))),
            q8k: (has(ActFormat::Q8K) && cols.is_multiple_of(QK_K)).then(|| Buf::new(rows * cols / QK_K)),
        }
    }

    /// Quantizes `x` (row `r`, all columns) into the scratch for [`ActBufs::commit_row`].
    fn quantize(&self, x: &[f32], s: &mut Scratch) {
        if self.q8.is_some() {
            s.q8.resize(self.cols / QK, ActBlock::ZERO);
            quantize_row_q8(x, &mut s.q8);
        }
        if self.q8k.is_some() {
            s.q8k.resize(self.cols / QK_K, ActBlockK::ZERO);
            quantize_row_q8k(x, &mut s.q8k);
        }
    }

    /// Writes row `r` (the scratch [`ActBufs::quantize`] filled, and `x`).
    ///
    /// # Safety
    /// Row `r` is the calling chunk's alone.
    unsafe fn commit_row(&self, r: usize, x: &[f32], s: &Scratch) {
        // SAFETY (all): the row's elements belong to the caller's chunk.
        unsafe {
            if let Some(f) = &self.f32 {
                f.get_mut(r * self.cols..(r + 1) * self.cols).copy_from_slice(x);
            }
            if let Some((q, qs)) = &self.q8 {
                let kb = self.cols / QK;
                q.get_mut(r * kb..(r + 1) * kb).copy_from_slice(&s.q8[..kb]);
                for (b, blk) in s.q8[..kb].iter().enumerate() {
                    qs.get_mut(b * self.rows + r..b * self.rows + r + 1)[0] = blk.s;
                }
            }
            if let Some(q) = &self.q8k {
                let kb = self.cols / QK_K;
                q.get_mut(r * kb..(r + 1) * kb).copy_from_slice(&s.q8k[..kb]);
            }
        }
    }

    /// The rows as the kernels read them, each `cols` wide (at most the buffers' width).
    ///
    /// # Safety
    /// As [`ActBufs::view`].
    unsafe fn view_width(&self, cols: usize) -> ActsRef<'_> {
        // SAFETY: the caller's contract.
        let mut v = unsafe { self.view() };
        if cols < self.cols {
            v.cols = cols;
            v.f32 = &v.f32[..v.f32.len().min(self.rows * cols)];
            v.q8 = &v.q8[..v.q8.len().min(self.rows * (cols / QK))];
            v.q8_s = &v.q8_s[..v.q8_s.len().min(self.rows * (cols / QK))];
            v.q8k = &v.q8k[..v.q8k.len().min(self.rows * (cols / QK_K))];
        }
        v
    }

    /// The rows as the kernels read them.
    ///
    /// # Safety
    /// Every row was committed by an earlier operation.
    unsafe fn view(&self) -> ActsRef<'_> {
        // SAFETY: the caller's contract.
        unsafe {
            ActsRef {
                tokens: self.rows,
                cols: self.cols,
                f32: self.f32.as_ref().map_or(&[][..], |b| b.get(0..b.len())),
                q8: self.q8.as_ref().map_or(&[][..], |(b, _)| b.get(0..b.len())),
                q8_s: self.q8.as_ref().map_or(&[][..], |(_, b)| b.get(0..b.len())),
                q8k: self.q8k.as_ref().map_or(&[][..], |b| b.get(0..b.len())),
            }
        }
    }
}

/// What an operation of the job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Token embeddings (or the hidden states given), positions' rotary tables.
    Embed,
    /// The pending residual of the layer before (Gemma's post-FFN norm), then this layer's
    /// input norm(s), quantized.
    Norm1(usize),
    /// Q, K and V by head.
    Qkv(usize),
    Attend(usize),
    QuantAttn(usize),
    Out(usize),
    /// The attention residual and the MLP's input norm.
    Norm2(usize),
    GateUp(usize),
    Down(usize),
    /// A mixture-of-experts layer: the rows' (row, slot) pairs listed by expert.
    Group(usize),
    /// Chunk `expert × part`: an expert's gate and up rows for its tokens, activated.
    ExpertUp(usize),
    /// Chunk `expert × part`: an expert's down projection for its tokens.
    ExpertDown(usize),
    /// Each row plus its experts' outputs, weighted, in the router's order.
    Combine(usize),
    /// The last pending residual; the final norm of the rows whose logits are wanted.
    Final,
    Head,
}

/// The alignment of a projection's output rows when they feed `next` (whole activation blocks).
fn align_for(next: &QMatrix) -> usize {
    match next.kind().act_format() {
        ActFormat::Q8K => QK_K,
        ActFormat::Q8 => QK,
        ActFormat::F32 => ROW_TILE,
    }
}

/// The rows a kernel computes side by side (a packed matrix's group): projections are split
/// between threads on multiples of it, so that no group is computed twice.
const ROW_TILE: usize = 16;

/// Rows per chunk of the row operations.
const ROWS_PER_CHUNK: usize = 4;

/// Rows of one sequence that attend together (sharing each key and value read).
const ATTN_ROWS: usize = crate::cpu::ops::ATTN_TILE;

/// The job.
struct Forward {
    model: Arc<CpuModel>,
    flavor: Flavor,
    ops: Vec<Op>,
    /// Per row: its sequence and position.
    row_seq: Vec<usize>,
    row_pos: Vec<usize>,
    /// Per sequence: its first row, rows, end position, block table.
    seqs: Vec<(usize, usize, usize, Vec<u32>)>,
    /// Runs of at most [`ATTN_ROWS`] consecutive rows of one sequence (first row, rows): the
    /// attention operation's chunks, each kv head of which reads every key and value once.
    attn_tiles: Vec<(usize, usize)>,
    inputs: Vec<SeqInput>,
    /// Rows whose logits are computed, in output order.
    logit_rows: Vec<usize>,
    rows: usize,
    /// Rotary tables per row: `[row][rotary_dim/2]`, global then local.
    cos: Buf<f32>,
    sin: Buf<f32>,
    cos_l: Buf<f32>,
    sin_l: Buf<f32>,
    half_rot: usize,
    x: Buf<f32>,
    q: Buf<f32>,
    attn: Buf<f32>,
    o: Buf<f32>,
    d: Buf<f32>,
    acts_a: ActBufs,
    acts_m: ActBufs,
    acts_o: ActBufs,
    acts_h: ActBufs,
    acts_head: ActBufs,
    logits: Buf<f32>,
    /// Mixture of experts: per (row, slot) its expert and weight; per row the shared
    /// expert's scale; the pairs grouped by expert (`group_at[e]..group_at[e + 1]` of
    /// `group_pairs`); per pair the activated expert rows (`eh`) and outputs (`eo`).
    top_k: usize,
    expert_size: usize,
    route_e: Buf<u32>,
    route_w: Buf<f32>,
    shared_scale: Buf<f32>,
    group_at: Buf<u32>,
    group_pairs: Buf<u32>,
    eh: Buf<f32>,
    eo: Buf<f32>,
}

// SAFETY: the buffers are written only under the pool's protocol (one committing chunk per
// element range), read only after their operation is done.
unsafe impl Sync for Forward {}
// SAFETY: as above; everything else is owned.
unsafe impl Send for Forward {}

fn formats(ms: &[&QMatrix]) -> Vec<ActFormat> {
    let mut out: Vec<ActFormat> = ms.iter().map(|m| m.kind().act_format()).collect();
    out.dedup();
    out
}

impl Forward {
    fn cfg(&self) -> &crate::config::EngineConfig {
        &self.model.config
    }

    fn layer(&self, l: usize) -> &Layer {
        &self.model.layers[l]
    }

    /// Row chunks of the row operations.
    fn row_chunks(&self) -> usize {
        self.rows.div_ceil(ROWS_PER_CHUNK)
    }

    fn chunk_rows(&self, c: usize) -> Range<usize> {
        c * ROWS_PER_CHUNK..((c + 1) * ROWS_PER_CHUNK).min(self.rows)
    }

    /// Output rows per chunk of a projection: about 8 chunks per thread, whole blocks.
    fn proj_chunk(&self, n: usize, align: usize) -> usize {
        let want = n.div_ceil(32).max(1);
        want.div_ceil(align).max(1) * align
    }

    /// The rows of matrix output `n` chunk `c` covers, with `align`.
    fn proj_rows(&self, n: usize, align: usize, c: usize) -> Range<usize> {
        let per = self.proj_chunk(n, align);
        c * per..((c + 1) * per).min(n)
    }

    /// `out[t][..] = W[rows] · x[t]` (+ bias) for every row of the batch, into `s.f`. The
    /// activations are read as rows of `W`'s width (a layer's MLP can be narrower than the
    /// widest, whose width the buffers have).
    fn project(&self, lin: &Linear, x: &ActBufs, rows: Range<usize>, s: &mut Scratch) {
        let w = rows.len();
        s.f.clear();
        s.f.resize(self.rows * w, 0.0);
        // SAFETY: the activations were committed by an earlier operation.
        let view = unsafe { x.view_width(lin.w.cols()) };
        matmul(self.flavor, &lin.w, &view, rows.clone(), &mut s.f, w);
        if let Some(b) = &lin.b {
            for out in s.f.chunks_exact_mut(w) {
                for (o, bv) in out.iter_mut().zip(&b[rows.clone()]) {
                    *o += bv;
                }
            }
        }
    }

    fn gate_align(&self, l: usize) -> usize {
        align_for(&self.mlp(l).down.w)
    }

    /// Layer `l`'s dense MLP (or shared expert); ops are only made for layers that have one.
    fn mlp(&self, l: usize) -> &Mlp {
        self.layer(l).mlp.as_ref().expect("the MLP operations are made only for layers with an MLP")
    }

    fn moe(&self, l: usize) -> &Moe {
        self.layer(l).moe.as_ref().expect("the expert operations are made only for expert layers")
    }

    /// Parts an expert's intermediate rows are cut into.
    fn up_parts(&self, l: usize) -> usize {
        let e = &self.moe(l).experts[0];
        let n = e.up.w.rows();
        n.div_ceil(self.proj_chunk(n, align_for(&e.down.w)))
    }

    fn down_parts(&self) -> usize {
        let h = self.cfg().hidden_size;
        h.div_ceil(self.proj_chunk(h, ROW_TILE))
    }

    /// The (row, slot) pairs routed to expert `e`, in row order.
    ///
    /// # Safety
    /// The grouping operation has committed.
    unsafe fn pairs_of(&self, e: usize) -> &[u32] {
        // SAFETY: the caller's contract.
        unsafe {
            let at = self.group_at.get(e..e + 2);
            self.group_pairs.get(at[0] as usize..at[1] as usize)
        }
    }

    /// The residual of the layer before when it could not be added in its down projection
    /// (Gemma's post-FFN norm), into row `r` of `x` (in `s.g`, for the commit).
    fn pending_residual(&self, l: usize, r: usize, s: &mut Scratch) -> bool {
        let h = self.cfg().hidden_size;
        let Some(prev) = l.checked_sub(1).map(|p| self.layer(p)) else { return false };
        let Some(post) = &prev.post_ffn_norm else { return false };
        s.g.resize(2 * h, 0.0);
        let (normed, _) = s.g.split_at_mut(h);
        // SAFETY: `d` and `x` were committed by earlier operations.
        unsafe {
            post.apply(self.d.get(r * h..(r + 1) * h), normed);
            for (n, xv) in normed.iter_mut().zip(self.x.get(r * h..(r + 1) * h)) {
                *n += xv;
            }
        }
        true
    }
}

impl Task for Forward {
    fn ops(&self) -> usize {
        self.ops.len()
    }

    fn chunks(&self, op: usize) -> usize {
        let cfg = self.cfg();
        match self.ops[op] {
            Op::Embed | Op::Norm1(_) | Op::QuantAttn(_) | Op::Norm2(_) => self.row_chunks(),
            Op::Final => self.row_chunks(),
            Op::Qkv(_) => cfg.num_heads + 2 * cfg.num_kv_heads,
            Op::Attend(_) => self.attn_tiles.len() * cfg.num_kv_heads,
            Op::Out(l) => cfg.hidden_size.div_ceil(self.proj_chunk(self.layer(l).out.w.rows(), ROW_TILE)),
            Op::GateUp(l) => {
                let n = self.mlp(l).up.w.rows();
                n.div_ceil(self.proj_chunk(n, self.gate_align(l)))
            }
            Op::Down(l) => cfg.hidden_size.div_ceil(self.proj_chunk(self.mlp(l).down.w.rows(), ROW_TILE)),
            Op::Group(_) => 1,
            Op::ExpertUp(l) => self.moe(l).experts.len() * self.up_parts(l),
            Op::ExpertDown(l) => self.moe(l).experts.len() * self.down_parts(),
            Op::Combine(_) => self.row_chunks(),
            Op::Head => self.model.head.as_ref().map_or(0, |(_, h)| {
                let n = h.w.rows();
                n.div_ceil(self.proj_chunk(n, 64).max(256))
            }),
        }
    }

    fn run(&self, op: usize, c: usize, s: &mut Scratch) {
        let cfg = self.cfg();
        let h = cfg.hidden_size;
        match self.ops[op] {
            Op::Embed => {
                s.f.clear();
                for r in self.chunk_rows(c) {
                    let (seq, pos) = (self.row_seq[r], self.row_pos[r]);
                    let first = self.seqs[seq].0;
                    let mut row = vec![0f32; h];
                    match &self.inputs[seq] {
                        SeqInput::Tokens(t) => {
                            let e = self.model.embed.as_ref().expect("checked: the first part has embeddings");
                            e.row_f32(t[r - first] as usize, &mut row);
                            if let Some(scale) = cfg.embed_scale {
                                let scale = scale as f32;
                                row.iter_mut().for_each(|v| *v *= scale);
                            }
                            if let Some((_, p)) = &self.model.pos_embed {
                                for (v, pv) in row.iter_mut().zip(&p[pos * h..(pos + 1) * h]) {
                                    *v += pv;
                                }
                            }
                        }
                        SeqInput::Hidden(x) => row.copy_from_slice(&x[(r - first) * h..(r - first + 1) * h]),
                    }
                    s.f.extend_from_slice(&row);
                    // The rotary tables of the row's position.
                    if let Some((global, local)) = &self.model.ropes {
                        let end = self.seqs[seq].2;
                        let mut cs = vec![0f32; 4 * self.half_rot];
                        let (c1, rest) = cs.split_at_mut(self.half_rot);
                        let (s1, rest) = rest.split_at_mut(self.half_rot);
                        let (c2, s2) = rest.split_at_mut(self.half_rot);
                        global.cos_sin(pos, end, c1, s1);
                        if let Some(l) = local {
                            l.cos_sin(pos, end, c2, s2);
                        }
                        s.f.extend_from_slice(&cs);
                    }
                }
            }
            Op::Norm1(l) => {
                let layer = self.layer(l);
                s.f.clear();
                s.q8.clear();
                for r in self.chunk_rows(c) {
                    let pending = self.pending_residual(l, r, s);
                    // SAFETY: `x` was committed by an earlier operation.
                    let x: Vec<f32> =
                        if pending { s.g[..h].to_vec() } else { unsafe { self.x.get(r * h..(r + 1) * h).to_vec() } };
                    let mut xn = vec![0f32; h];
                    layer.attn_norm.apply(&x, &mut xn);
                    let mut xm = Vec::new();
                    if matches!(cfg.block, BlockKind::Parallel { .. }) {
                        xm = xn.clone();
                        if let Some(n2) = &layer.ffn_norm {
                            n2.apply(&x, &mut xm);
                        }
                    }
                    s.f.extend_from_slice(&x);
                    s.f.extend_from_slice(&xn);
                    s.f.extend_from_slice(&xm);
                }
            }
            Op::Qkv(l) => self.run_qkv(l, c, s),
            Op::Attend(l) => {
                let layer = self.layer(l);
                let ((r, m), g) = (self.attn_tiles[c / cfg.num_kv_heads], c % cfg.num_kv_heads);
                let (seq, pos) = (self.row_seq[r], self.row_pos[r]);
                let d = cfg.head_dim;
                let rep = cfg.num_heads / cfg.num_kv_heads;
                let p = AttnParams {
                    head_dim: d,
                    scale: cfg.attn_scale as f32,
                    softcap: cfg.attn_softcap.map(|c| c as f32),
                    window: layer.window,
                    sinks: layer.sinks.as_ref().map(|s| &s[g * rep..(g + 1) * rep]),
                };
                s.f.clear();
                s.f.resize(m * rep * d, 0.0);
                let table = &self.seqs[seq].3;
                let mut qs = Vec::with_capacity(m * rep * d);
                for i in 0..m {
                    let at = (r + i) * cfg.num_heads * d + g * rep * d;
                    // SAFETY: `q` was committed by the Q/K/V operation.
                    qs.extend_from_slice(unsafe { self.q.get(at..at + rep * d) });
                }
                attend_rows(&self.model.kv, l, table, g, pos, m, &qs, &p, &mut s.g, &mut s.f);
            }
            Op::QuantAttn(l) => {
                let width = cfg.num_heads * cfg.head_dim;
                let _ = l;
                s.f.clear();
                for r in self.chunk_rows(c) {
                    // SAFETY: `attn` was committed by the attention operation.
                    s.f.extend_from_slice(unsafe { self.attn.get(r * width..(r + 1) * width) });
                }
            }
            Op::Out(l) => {
                let lin = &self.layer(l).out;
                let rows = self.proj_rows(lin.w.rows(), ROW_TILE, c);
                self.project(lin, &self.acts_o, rows, s);
            }
            Op::Norm2(l) => {
                let layer = self.layer(l);
                s.f.clear();
                for r in self.chunk_rows(c) {
                    // SAFETY: `x` (and `o`, in a sandwich block) were committed by earlier
                    // operations.
                    let x = unsafe { self.x.get(r * h..(r + 1) * h) };
                    // A sequential block's output projection added its residual already.
                    let xr: Vec<f32> = if cfg.block == BlockKind::Sandwich {
                        // SAFETY: as above.
                        let o = unsafe { self.o.get(r * h..(r + 1) * h) };
                        let mut a = o.to_vec();
                        if let Some(post) = &layer.post_attn_norm {
                            post.apply(o, &mut a);
                        }
                        x.iter().zip(&a).map(|(x, a)| x + a).collect()
                    } else {
                        x.to_vec()
                    };
                    let mut xn = vec![0f32; h];
                    layer
                        .ffn_norm
                        .as_ref()
                        .expect("sequential and sandwich blocks have an MLP norm")
                        .apply(&xr, &mut xn);
                    s.f.extend_from_slice(&xr);
                    s.f.extend_from_slice(&xn);
                    if let Some(moe) = &layer.moe {
                        // Slot by slot: the expert (exact in f32) and its weight.
                        for (e, w) in moe.route(&xn) {
                            s.f.extend_from_slice(&[e as f32, w]);
                        }
                        s.f.push(moe.shared_scale(&xn));
                    }
                }
            }
            Op::GateUp(l) => {
                let mlp = self.mlp(l);
                let rows = self.proj_rows(mlp.up.w.rows(), self.gate_align(l), c);
                let w = rows.len();
                self.project(&mlp.up, &self.acts_m, rows.clone(), s);
                let up = std::mem::take(&mut s.f);
                let mut hv = vec![0f32; up.len()];
                if let Some(gate) = &mlp.gate {
                    self.project(gate, &self.acts_m, rows.clone(), s);
                    activate_into(mlp.act, &s.f, Some(&up), &mut hv);
                } else {
                    activate_into(mlp.act, &up, None, &mut hv);
                }
                // The chunk's blocks of each row, quantized for the down projection.
                s.q8.clear();
                s.q8k.clear();
                match mlp.down.w.kind().act_format() {
                    ActFormat::Q8 => {
                        for row in hv.chunks_exact(w) {
                            let at = s.q8.len();
                            s.q8.resize(at + w / QK, ActBlock::ZERO);
                            quantize_row_q8(row, &mut s.q8[at..]);
                        }
                    }
                    ActFormat::Q8K => {
                        for row in hv.chunks_exact(w) {
                            let at = s.q8k.len();
                            s.q8k.resize(at + w / QK_K, ActBlockK::ZERO);
                            quantize_row_q8k(row, &mut s.q8k[at..]);
                        }
                    }
                    ActFormat::F32 => {}
                }
                s.f = std::mem::take(&mut hv);
            }
            Op::Down(l) => {
                let lin = &self.mlp(l).down;
                let rows = self.proj_rows(lin.w.rows(), ROW_TILE, c);
                self.project(lin, &self.acts_h, rows, s);
            }
            Op::Group(l) => {
                let experts = self.moe(l).experts.len();
                let k = self.top_k;
                // SAFETY: the routes were committed by the MLP norm operation.
                let route = unsafe { self.route_e.get(0..self.rows * k) };
                let mut count = vec![0u32; experts + 1];
                for &e in route {
                    count[e as usize + 1] += 1;
                }
                for e in 0..experts {
                    count[e + 1] += count[e];
                }
                let mut fill = count.clone();
                let mut pairs = vec![0u32; route.len()];
                for (p, &e) in route.iter().enumerate() {
                    pairs[fill[e as usize] as usize] = p as u32;
                    fill[e as usize] += 1;
                }
                s.f.clear();
                s.f.extend(count.iter().map(|&c| f32::from_bits(c)));
                s.f.extend(pairs.iter().map(|&p| f32::from_bits(p)));
            }
            Op::ExpertUp(l) => self.run_expert_up(l, c, s),
            Op::ExpertDown(l) => self.run_expert_down(l, c, s),
            Op::Combine(_) => {
                let k = self.top_k;
                s.f.clear();
                for r in self.chunk_rows(c) {
                    // SAFETY: `x`, the routes and the experts' outputs were committed earlier.
                    let mut x = unsafe { self.x.get(r * h..(r + 1) * h).to_vec() };
                    for j in 0..k {
                        let p = r * k + j;
                        // SAFETY: as above.
                        let (w, y) = unsafe { (self.route_w.get(p..p + 1)[0], self.eo.get(p * h..(p + 1) * h)) };
                        for (xv, yv) in x.iter_mut().zip(y) {
                            *xv += w * yv;
                        }
                    }
                    s.f.extend_from_slice(&x);
                }
            }
            Op::Final => {
                let last_layer = self.model.layers.len();
                s.f.clear();
                for r in self.chunk_rows(c) {
                    let pending = self.pending_residual(last_layer, r, s);
                    // SAFETY: `x` was committed by an earlier operation.
                    let x: Vec<f32> =
                        if pending { s.g[..h].to_vec() } else { unsafe { self.x.get(r * h..(r + 1) * h).to_vec() } };
                    s.f.extend_from_slice(&x);
                    if let Some((norm, _)) = &self.model.head {
                        let mut xn = vec![0f32; h];
                        norm.apply(&x, &mut xn);
                        s.f.extend_from_slice(&xn);
                    }
                }
            }
            Op::Head => {
                let (_, lin) = self.model.head.as_ref().expect("a head operation has a head");
                let per = self.proj_chunk(lin.w.rows(), 64).max(256);
                let rows = c * per..((c + 1) * per).min(lin.w.rows());
                let w = rows.len();
                s.f.clear();
                s.f.resize(self.logit_rows.len() * w, 0.0);
                // SAFETY: committed by the final operation.
                let view = unsafe { self.acts_head.view() };
                matmul(self.flavor, &lin.w, &view, rows.clone(), &mut s.f, w);
                for out in s.f.chunks_exact_mut(w) {
                    if let Some(b) = &lin.b {
                        for (o, bv) in out.iter_mut().zip(&b[rows.clone()]) {
                            *o += bv;
                        }
                    }
                    if let Some(cap) = cfg.final_softcap {
                        let cap = cap as f32;
                        out.iter_mut().for_each(|v| *v = softcap(*v, cap));
                    }
                }
            }
        }
    }

    fn commit(&self, op: usize, c: usize, s: &Scratch) {
        let cfg = self.cfg();
        let h = cfg.hidden_size;
        // SAFETY (every arm): the chunk writes only its own rows / columns / heads, once.
        unsafe {
            match self.ops[op] {
                Op::Embed => {
                    let stride = h + if self.model.ropes.is_some() { 4 * self.half_rot } else { 0 };
                    for (i, r) in self.chunk_rows(c).enumerate() {
                        let row = &s.f[i * stride..(i + 1) * stride];
                        self.x.get_mut(r * h..(r + 1) * h).copy_from_slice(&row[..h]);
                        if self.model.ropes.is_some() {
                            let hr = self.half_rot;
                            let t = &row[h..];
                            self.cos.get_mut(r * hr..(r + 1) * hr).copy_from_slice(&t[..hr]);
                            self.sin.get_mut(r * hr..(r + 1) * hr).copy_from_slice(&t[hr..2 * hr]);
                            self.cos_l.get_mut(r * hr..(r + 1) * hr).copy_from_slice(&t[2 * hr..3 * hr]);
                            self.sin_l.get_mut(r * hr..(r + 1) * hr).copy_from_slice(&t[3 * hr..]);
                        }
                    }
                }
                Op::Norm1(_) => {
                    let parallel = matches!(cfg.block, BlockKind::Parallel { .. });
                    let stride = if parallel { 3 * h } else { 2 * h };
                    let mut sc = Scratch::default();
                    for (i, r) in self.chunk_rows(c).enumerate() {
                        let row = &s.f[i * stride..(i + 1) * stride];
                        self.x.get_mut(r * h..(r + 1) * h).copy_from_slice(&row[..h]);
                        self.acts_a.quantize(&row[h..2 * h], &mut sc);
                        self.acts_a.commit_row(r, &row[h..2 * h], &sc);
                        if parallel {
                            self.acts_m.quantize(&row[2 * h..3 * h], &mut sc);
                            self.acts_m.commit_row(r, &row[2 * h..3 * h], &sc);
                        }
                    }
                }
                Op::Qkv(l) => self.commit_qkv(l, c, s),
                Op::Attend(_) => {
                    let ((r, m), g) = (self.attn_tiles[c / cfg.num_kv_heads], c % cfg.num_kv_heads);
                    let d = cfg.head_dim;
                    let rep = cfg.num_heads / cfg.num_kv_heads;
                    for i in 0..m {
                        let at = (r + i) * cfg.num_heads * d + g * rep * d;
                        self.attn.get_mut(at..at + rep * d).copy_from_slice(&s.f[i * rep * d..(i + 1) * rep * d]);
                    }
                }
                Op::QuantAttn(_) => {
                    let width = cfg.num_heads * cfg.head_dim;
                    let mut sc = Scratch::default();
                    for (i, r) in self.chunk_rows(c).enumerate() {
                        let row = &s.f[i * width..(i + 1) * width];
                        self.acts_o.quantize(row, &mut sc);
                        self.acts_o.commit_row(r, row, &sc);
                    }
                }
                Op::Out(l) => {
                    let rows = self.proj_rows(self.layer(l).out.w.rows(), ROW_TILE, c);
                    let w = rows.len();
                    let sequential = cfg.block == BlockKind::Sequential;
                    for t in 0..self.rows {
                        let src = &s.f[t * w..(t + 1) * w];
                        let at = t * h + rows.start..t * h + rows.end;
                        if sequential {
                            for (x, v) in self.x.get_mut(at).iter_mut().zip(src) {
                                *x += v;
                            }
                        } else {
                            self.o.get_mut(at).copy_from_slice(src);
                        }
                    }
                }
                Op::Norm2(l) => {
                    let mut sc = Scratch::default();
                    let k = if self.layer(l).moe.is_some() { self.top_k } else { 0 };
                    let stride = 2 * h + if k > 0 { 2 * k + 1 } else { 0 };
                    for (i, r) in self.chunk_rows(c).enumerate() {
                        let row = &s.f[i * stride..(i + 1) * stride];
                        self.x.get_mut(r * h..(r + 1) * h).copy_from_slice(&row[..h]);
                        self.acts_m.quantize(&row[h..2 * h], &mut sc);
                        self.acts_m.commit_row(r, &row[h..2 * h], &sc);
                        if k > 0 {
                            let routes = &row[2 * h..];
                            for j in 0..k {
                                self.route_e.get_mut(r * k + j..r * k + j + 1)[0] = routes[2 * j] as u32;
                                self.route_w.get_mut(r * k + j..r * k + j + 1)[0] = routes[2 * j + 1];
                            }
                            self.shared_scale.get_mut(r..r + 1)[0] = routes[2 * k];
                        }
                    }
                }
                Op::GateUp(l) => {
                    let mlp = self.mlp(l);
                    let ffn = mlp.up.w.rows();
                    let rows = self.proj_rows(ffn, self.gate_align(l), c);
                    let w = rows.len();
                    let a = &self.acts_h;
                    for t in 0..self.rows {
                        if let Some(f) = &a.f32 {
                            f.get_mut(t * ffn + rows.start..t * ffn + rows.end)
                                .copy_from_slice(&s.f[t * w..(t + 1) * w]);
                        }
                        if let Some((q, qs)) = &a.q8 {
                            let (kb, b0, nb) = (ffn / QK, rows.start / QK, w / QK);
                            q.get_mut(t * kb + b0..t * kb + b0 + nb).copy_from_slice(&s.q8[t * nb..(t + 1) * nb]);
                            for j in 0..nb {
                                qs.get_mut((b0 + j) * self.rows + t..(b0 + j) * self.rows + t + 1)[0] =
                                    s.q8[t * nb + j].s;
                            }
                        }
                        if let Some(q) = &a.q8k {
                            let (kb, b0, nb) = (ffn / QK_K, rows.start / QK_K, w / QK_K);
                            q.get_mut(t * kb + b0..t * kb + b0 + nb).copy_from_slice(&s.q8k[t * nb..(t + 1) * nb]);
                        }
                    }
                }
                Op::Down(l) => {
                    let rows = self.proj_rows(self.mlp(l).down.w.rows(), ROW_TILE, c);
                    let w = rows.len();
                    let shared = self.layer(l).moe.is_some();
                    let mut scaled = Vec::new();
                    for t in 0..self.rows {
                        let mut src = &s.f[t * w..(t + 1) * w];
                        if shared {
                            // A shared expert's output, weighted by its gate.
                            let g = self.shared_scale.get(t..t + 1)[0];
                            scaled.clear();
                            scaled.extend(src.iter().map(|v| v * g));
                            src = &scaled;
                        }
                        let at = t * h + rows.start..t * h + rows.end;
                        match cfg.block {
                            BlockKind::Sequential => {
                                for (x, v) in self.x.get_mut(at).iter_mut().zip(src) {
                                    *x += v;
                                }
                            }
                            BlockKind::Parallel { .. } => {
                                let o = self.o.get(at.clone()).to_vec();
                                for ((x, v), ov) in self.x.get_mut(at).iter_mut().zip(src).zip(&o) {
                                    *x += ov + v;
                                }
                            }
                            BlockKind::Sandwich => self.d.get_mut(at).copy_from_slice(src),
                        }
                    }
                }
                Op::Group(l) => {
                    let n = self.moe(l).experts.len() + 1;
                    for (i, v) in s.f[..n].iter().enumerate() {
                        self.group_at.get_mut(i..i + 1)[0] = v.to_bits();
                    }
                    for (i, v) in s.f[n..].iter().enumerate() {
                        self.group_pairs.get_mut(i..i + 1)[0] = v.to_bits();
                    }
                }
                Op::ExpertUp(l) => {
                    let (e, part) = (c / self.up_parts(l), c % self.up_parts(l));
                    let ex = &self.moe(l).experts[e];
                    let rows = self.proj_rows(ex.up.w.rows(), align_for(&ex.down.w), part);
                    let (w, n) = (rows.len(), self.expert_size);
                    for (i, &p) in self.pairs_of(e).iter().enumerate() {
                        let p = p as usize;
                        self.eh.get_mut(p * n + rows.start..p * n + rows.end).copy_from_slice(&s.f[i * w..(i + 1) * w]);
                    }
                }
                Op::ExpertDown(_) => {
                    let (e, part) = (c / self.down_parts(), c % self.down_parts());
                    let rows = self.proj_rows(h, ROW_TILE, part);
                    let w = rows.len();
                    for (i, &p) in self.pairs_of(e).iter().enumerate() {
                        let p = p as usize;
                        self.eo.get_mut(p * h + rows.start..p * h + rows.end).copy_from_slice(&s.f[i * w..(i + 1) * w]);
                    }
                }
                Op::Combine(_) => {
                    for (i, r) in self.chunk_rows(c).enumerate() {
                        self.x.get_mut(r * h..(r + 1) * h).copy_from_slice(&s.f[i * h..(i + 1) * h]);
                    }
                }
                Op::Final => {
                    let with_head = self.model.head.is_some();
                    let stride = if with_head { 2 * h } else { h };
                    let mut sc = Scratch::default();
                    for (i, r) in self.chunk_rows(c).enumerate() {
                        let row = &s.f[i * stride..(i + 1) * stride];
                        self.x.get_mut(r * h..(r + 1) * h).copy_from_slice(&row[..h]);
                        if with_head && let Some(k) = self.logit_rows.iter().position(|&lr| lr == r) {
                            self.acts_head.quantize(&row[h..], &mut sc);
                            self.acts_head.commit_row(k, &row[h..], &sc);
                        }
                    }
                }
                Op::Head => {
                    let (_, lin) = self.model.head.as_ref().expect("a head operation has a head");
                    let n = lin.w.rows();
                    let per = self.proj_chunk(n, 64).max(256);
                    let rows = c * per..((c + 1) * per).min(n);
                    let w = rows.len();
                    for k in 0..self.logit_rows.len() {
                        self.logits
                            .get_mut(k * n + rows.start..k * n + rows.end)
                            .copy_from_slice(&s.f[k * w..(k + 1) * w]);
                    }
                }
            }
        }
    }
}

impl Forward {
    /// Chunk `c` of the Q/K/V operation: head `c` of the queries, then of the keys, then of
    /// the values, for every row; q/k norms and rotary embeddings applied.
    fn run_qkv(&self, l: usize, c: usize, s: &mut Scratch) {
        let cfg = self.cfg();
        let layer = self.layer(l);
        let (nh, nkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let (lin, head, is_q) = if c < nh {
            (&layer.q, c, true)
        } else if c < nh + nkv {
            (&layer.k, c - nh, false)
        } else {
            (&layer.v, c - nh - nkv, false)
        };
        let is_v = c >= nh + nkv;
        self.project(lin, &self.acts_a, head * d..(head + 1) * d, s);
        if is_v {
            return;
        }
        let norm = if is_q { &layer.q_norm } else { &layer.k_norm };
        let mut tmp = vec![0f32; d];
        for row in s.f.chunks_exact_mut(d) {
            if let Some(n) = norm {
                n.apply(row, &mut tmp);
                row.copy_from_slice(&tmp);
            }
        }
        let Some((global, _)) = &self.model.ropes else { return };
        let hr = self.half_rot;
        let interleaved = global.interleaved();
        for (r, row) in s.f.chunks_exact_mut(d).enumerate() {
            // SAFETY: committed by the embedding operation.
            let (cos, sin) = unsafe {
                if layer.local_rope {
                    (self.cos_l.get(r * hr..(r + 1) * hr), self.sin_l.get(r * hr..(r + 1) * hr))
                } else {
                    (self.cos.get(r * hr..(r + 1) * hr), self.sin.get(r * hr..(r + 1) * hr))
                }
            };
            rope(&mut row[..2 * hr], cos, sin, interleaved);
        }
    }

    /// Chunk `c` of an expert-up operation: expert `c / parts`'s gate and up rows of part
    /// `c % parts`, for the rows routed to it, activated, into `s.f` (`pairs × width`).
    fn run_expert_up(&self, l: usize, c: usize, s: &mut Scratch) {
        let h = self.cfg().hidden_size;
        let (e, part) = (c / self.up_parts(l), c % self.up_parts(l));
        let ex = &self.moe(l).experts[e];
        s.f.clear();
        // SAFETY: grouped by the grouping operation.
        let pairs = unsafe { self.pairs_of(e) };
        if pairs.is_empty() {
            return;
        }
        let rows = self.proj_rows(ex.up.w.rows(), align_for(&ex.down.w), part);
        let w = rows.len();
        let acts = self.acts_m.f32.as_ref().expect("expert layers keep their MLP input in f32");
        let mut x = Vec::with_capacity(pairs.len() * h);
        for &p in pairs {
            let r = p as usize / self.top_k;
            // SAFETY: committed by the MLP norm operation.
            x.extend_from_slice(unsafe { acts.get(r * h..(r + 1) * h) });
        }
        let mut up = vec![0f32; pairs.len() * w];
        let gate = ex.gate.as_ref().expect("experts are gated");
        let mut gv = vec![0f32; pairs.len() * w];
        for (lin, out) in [(&ex.up, &mut up), (gate, &mut gv)] {
            let mut a = crate::cpu::kernels::Acts::default();
            a.quantize(lin.w.kind(), &x, h);
            matmul(self.flavor, &lin.w, &a.view(), rows.clone(), out, w);
            if let Some(b) = &lin.b {
                for o in out.chunks_exact_mut(w) {
                    o.iter_mut().zip(&b[rows.clone()]).for_each(|(o, b)| *o += b);
                }
            }
        }
        s.f.resize(pairs.len() * w, 0.0);
        activate_into(ex.act, &gv, Some(&up), &mut s.f);
    }

    /// Chunk `c` of an expert-down operation: expert `c / parts`'s output columns of part
    /// `c % parts`, for the rows routed to it, into `s.f` (`pairs × width`).
    fn run_expert_down(&self, l: usize, c: usize, s: &mut Scratch) {
        let h = self.cfg().hidden_size;
        let (e, part) = (c / self.down_parts(), c % self.down_parts());
        let ex = &self.moe(l).experts[e];
        s.f.clear();
        // SAFETY: grouped by the grouping operation.
        let pairs = unsafe { self.pairs_of(e) };
        if pairs.is_empty() {
            return;
        }
        let rows = self.proj_rows(h, ROW_TILE, part);
        let w = rows.len();
        let n = self.expert_size;
        let mut x = Vec::with_capacity(pairs.len() * n);
        for &p in pairs {
            let p = p as usize;
            // SAFETY: committed by the expert-up operation.
            x.extend_from_slice(unsafe { self.eh.get(p * n..(p + 1) * n) });
        }
        let mut a = crate::cpu::kernels::Acts::default();
        a.quantize(ex.down.w.kind(), &x, n);
        s.f.resize(pairs.len() * w, 0.0);
        matmul(self.flavor, &ex.down.w, &a.view(), rows.clone(), &mut s.f, w);
        if let Some(b) = &ex.down.b {
            for o in s.f.chunks_exact_mut(w) {
                o.iter_mut().zip(&b[rows.clone()]).for_each(|(o, b)| *o += b);
            }
        }
    }

    /// Commits a Q/K/V chunk: queries into `q`, keys and values into the cache.
    ///
    /// # Safety
    /// As [`Task::commit`].
    unsafe fn commit_qkv(&self, l: usize, c: usize, s: &Scratch) {
        let cfg = self.cfg();
        let (nh, nkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        for (r, row) in s.f.chunks_exact(d).enumerate() {
            if c < nh {
                // SAFETY: head `c` of row `r` is this chunk's.
                unsafe { self.q.get_mut(r * nh * d + c * d..r * nh * d + (c + 1) * d).copy_from_slice(row) };
            } else {
                let (v, head) = if c < nh + nkv { (false, c - nh) } else { (true, c - nh - nkv) };
                let (seq, pos) = (self.row_seq[r], self.row_pos[r]);
                let block = self.seqs[seq].3[pos / BLOCK_TOKENS];
                // SAFETY: the position is this sequence's new one; this chunk writes this head.
                unsafe { self.model.kv.write(l, v, block, head, pos % BLOCK_TOKENS, row) };
            }
        }
    }
}

/// What a forward pass gives back: logits from the last part, hidden states otherwise.
#[derive(Debug)]
pub struct StepOut {
    pub values: StepValues,
    /// The pool job that ran it (KV blocks it read may be reused once it is over).
    pub job: u64,
}

/// A forward pass's results.
#[derive(Debug)]
pub enum StepValues {
    /// Every wanted row's logits (`vocab` each), sequence after sequence, in one buffer (the
    /// pass's own: no copy); `rows[i]` is sequence `i`'s count (its last row, or every new one).
    Logits { all: Vec<f32>, rows: Vec<usize> },
    /// Each sequence's hidden states, `rows × hidden`.
    Hidden(Vec<Vec<f32>>),
}

/// Runs one forward pass of `steps` on `pool`.
pub fn forward(model: &Arc<CpuModel>, pool: &Pool, steps: Vec<SeqStep>) -> Result<StepOut, EngineError> {
    let cfg = model.config.clone();
    let (h, vocab) = (cfg.hidden_size, cfg.vocab_size);
    let mut row_seq = Vec::new();
    let mut row_pos = Vec::new();
    let mut seqs = Vec::with_capacity(steps.len());
    let mut logit_rows = Vec::new();
    let mut inputs = Vec::with_capacity(steps.len());
    for (i, st) in steps.into_iter().enumerate() {
        let n = st.input.rows(h);
        if n == 0 {
            return Err(EngineError::Config("no tokens to process".into()));
        }
        match &st.input {
            SeqInput::Tokens(t) => {
                if model.embed.is_none() {
                    return Err(EngineError::Config(format!(
                        "layers {}..{} start mid-model: give hidden states",
                        model.range.start, model.range.end
                    )));
                }
                if let Some(&bad) = t.iter().find(|&&id| id as usize >= vocab) {
                    return Err(EngineError::Config(format!("token id {bad} is outside the vocabulary of {vocab}")));
                }
                if let Some((max, _)) = &model.pos_embed
                    && st.start + n > *max
                {
                    return Err(EngineError::ContextExceeded { needed: st.start + n, limit: *max });
                }
            }
            SeqInput::Hidden(x) => {
                if model.embed.is_some() {
                    return Err(EngineError::Config("the first part takes token ids, not hidden states".into()));
                }
                if x.len() != n * h {
                    return Err(EngineError::Config(format!(
                        "hidden states of {} values are not rows of {h}",
                        x.len()
                    )));
                }
            }
        }
        if st.blocks.len() * BLOCK_TOKENS < st.start + n {
            return Err(EngineError::Config(format!(
                "the sequence's {} KV blocks hold {} positions, not the {} it reaches",
                st.blocks.len(),
                st.blocks.len() * BLOCK_TOKENS,
                st.start + n
            )));
        }
        let first = row_seq.len();
        for k in 0..n {
            row_seq.push(i);
            row_pos.push(st.start + k);
        }
        if model.head.is_some() {
            if st.all_logits {
                logit_rows.extend(first..first + n);
            } else {
                logit_rows.push(first + n - 1);
            }
        }
        seqs.push((first, n, st.start + n, st.blocks));
        inputs.push(st.input);
    }
    let rows = row_seq.len();
    let half_rot = model.ropes.as_ref().map_or(0, |(g, _)| g.rotary_dim() / 2);
    let mut ops = vec![Op::Embed];
    for l in 0..model.layers.len() {
        ops.extend([Op::Norm1(l), Op::Qkv(l), Op::Attend(l), Op::QuantAttn(l), Op::Out(l)]);
        if !matches!(cfg.block, BlockKind::Parallel { .. }) {
            ops.push(Op::Norm2(l));
        }
        let layer = &model.layers[l];
        if layer.mlp.is_some() {
            ops.extend([Op::GateUp(l), Op::Down(l)]);
        }
        if layer.moe.is_some() {
            ops.extend([Op::Group(l), Op::ExpertUp(l), Op::ExpertDown(l), Op::Combine(l)]);
        }
    }
    ops.push(Op::Final);
    if model.head.is_some() {
        ops.push(Op::Head);
    }
    let all = |f: &dyn Fn(&Layer) -> Vec<&QMatrix>| -> Vec<ActFormat> {
        let ms: Vec<&QMatrix> = model.layers.iter().flat_map(f).collect();
        let mut fs = formats(&ms);
        fs.sort_by_key(|f| *f as u8);
        fs.dedup();
        fs
    };
    let qkv_formats = all(&|l| vec![&l.q.w, &l.k.w, &l.v.w]);
    let mut mlp_formats =
        all(&|l| l.mlp.iter().flat_map(|m| [Some(&m.up.w), m.gate.as_ref().map(|g| &g.w)]).flatten().collect());
    let moe = model.layers.iter().find_map(|l| l.moe.as_ref());
    if moe.is_some() {
        // The experts' rows are gathered from the f32 inputs and quantized per expert.
        mlp_formats.push(ActFormat::F32);
        mlp_formats.dedup();
    }
    let out_formats = all(&|l| vec![&l.out.w]);
    let down_formats = all(&|l| l.mlp.iter().map(|m| &m.down.w).collect());
    let ffn = model.layers.iter().filter_map(|l| l.mlp.as_ref()).map(|m| m.up.w.rows()).max().unwrap_or(0);
    let top_k = moe.map_or(0, |m| m.cfg.top_k.min(m.experts.len()));
    let experts = moe.map_or(0, |m| m.experts.len());
    let expert_size = moe.and_then(|m| m.experts.first()).map_or(0, |e| e.up.w.rows());
    let qw = cfg.num_heads * cfg.head_dim;
    let head_formats = model.head.as_ref().map_or(Vec::new(), |(_, l)| formats(&[&l.w]));
    let sandwich = cfg.block == BlockKind::Sandwich;
    let parallel = matches!(cfg.block, BlockKind::Parallel { .. });
    let task = Arc::new(Forward {
        flavor: Flavor::detect(),
        ops,
        cos: Buf::new(rows * half_rot),
        sin: Buf::new(rows * half_rot),
        cos_l: Buf::new(rows * half_rot),
        sin_l: Buf::new(rows * half_rot),
        half_rot,
        x: Buf::new(rows * h),
        q: Buf::new(rows * qw),
        attn: Buf::new(rows * qw),
        o: Buf::new(if sandwich || parallel { rows * h } else { 0 }),
        d: Buf::new(if sandwich { rows * h } else { 0 }),
        acts_a: ActBufs::new(&qkv_formats, rows, h),
        acts_m: ActBufs::new(&mlp_formats, rows, h),
        acts_o: ActBufs::new(&out_formats, rows, qw),
        acts_h: ActBufs::new(&down_formats, rows, ffn),
        acts_head: ActBufs::new(&head_formats, logit_rows.len(), h),
        logits: Buf::zeroed(if model.head.is_some() { logit_rows.len() * vocab } else { 0 }),
        top_k,
        expert_size,
        route_e: Buf::new(rows * top_k),
        route_w: Buf::new(rows * top_k),
        shared_scale: Buf::new(if moe.is_some() { rows } else { 0 }),
        group_at: Buf::new(if moe.is_some() { experts + 1 } else { 0 }),
        group_pairs: Buf::new(rows * top_k),
        eh: Buf::new(rows * top_k * expert_size),
        eo: Buf::new(rows * top_k * h),
        model: model.clone(),
        attn_tiles: seqs
            .iter()
            .flat_map(|&(first, n, _, _)| {
                (first..first + n).step_by(ATTN_ROWS).map(move |r| (r, ATTN_ROWS.min(first + n - r)))
            })
            .collect(),
        row_seq,
        row_pos,
        seqs,
        inputs,
        logit_rows,
        rows,
    });
    let job = pool.run(task.clone());
    if task.model.head.is_none() {
        // SAFETY: the job is done: every buffer was committed, and nothing writes them any more.
        let per_seq = unsafe {
            task.seqs.iter().map(|&(first, n, _, _)| task.x.get(first * h..(first + n) * h).to_vec()).collect()
        };
        return Ok(StepOut { values: StepValues::Hidden(per_seq), job });
    }
    let rows = task
        .seqs
        .iter()
        .map(|&(first, n, _, _)| task.logit_rows.iter().filter(|&&r| r >= first && r < first + n).count())
        .collect();
    // The logits leave with the pass's own buffer; a pool thread still holding the job (a
    // straggler's late copy of a chunk, about to notice it is over) makes it a copy.
    let all = match Arc::try_unwrap(task) {
        Ok(done) => done.logits.into_vec(),
        // SAFETY: the job is done: every buffer was committed, and nothing writes them any more.
        Err(task) => unsafe { task.logits.get(0..task.logits.len()).to_vec() },
    };
    Ok(StepOut { values: StepValues::Logits { all, rows }, job })
}
