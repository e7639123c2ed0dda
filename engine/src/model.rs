//! A model, or any contiguous range of its layers, loaded on one device.
//!
//! A [`ModelPart`] holds layers `a..b`; the first part also holds the embeddings, the last the
//! final norm and output head. `forward` takes token ids (first part) or hidden states (any
//! other) and returns hidden states, or logits from the last part. Each sequence keeps its own
//! [`PartCache`]. One part holding every layer is the whole model; pipeline stages are parts.
//!
//! On the CPU a part runs on Gantry's own runtime ([`crate::cpu`]): its kernels, the process's
//! thread pool and a paged KV cache, where several sequences' steps can run as one batch
//! ([`ModelPart::forward_batch`]). On a GPU it runs on Candle ([`Backend::Candle`]), batched
//! the same way over a paged KV store on the device ([`LayerStore`], block ids from the same
//! kind of pool); tests also run Candle on the CPU, as the stand-in for that path.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{D, DType, Device, Tensor};
use gantry_core::Family;

use crate::EngineError;
use crate::attention::{Attention, KvAccess, LayerCache, LayerStore, QkvProj, SeqRows};
use crate::config::{BlockKind, EngineConfig, QkvLayout, RopeConfig, RopeScaling, WeightFormat};
use crate::cpu::forward::{SeqInput, SeqStep, StepValues, forward as cpu_forward};
use crate::cpu::kv::{BLOCK_TOKENS, KvDtype, KvPool, KvShape};
use crate::cpu::model::{CpuModel, DEFAULT_KV_BLOCKS};
use crate::cpu::pool;
use crate::layers::{Linear, Mlp, Norm, Rope};
use crate::moe::MoeLayer;
use crate::tp::{self, Shard};
use crate::weights::{Embedding, LoadStats, Part, Role, WeightSource};

/// One transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    kind: BlockKind,
    attn_norm: Norm,
    attn: Attention,
    /// The MLP's input norm (absent when it shares `attn_norm`).
    ffn_norm: Option<Norm>,
    mlp: Ffn,
    post_attn_norm: Option<Norm>,
    post_ffn_norm: Option<Norm>,
}

impl Block {
    fn forward(&self, x: &Tensor, kv: KvAccess<'_>) -> candle_core::Result<Tensor> {
        match self.kind {
            BlockKind::Sequential => {
                let h = (x + self.attn.forward(&self.attn_norm.forward(x)?, kv)?)?;
                let n = self.ffn_norm.as_ref().map_or_else(|| Ok(h.clone()), |n| n.forward(&h))?;
                h + self.mlp.forward(&n)?
            }
            BlockKind::Parallel { .. } => {
                let a = self.attn_norm.forward(x)?;
                let m = match &self.ffn_norm {
                    Some(n) => n.forward(x)?,
                    None => a.clone(),
                };
                let attn = self.attn.forward(&a, kv)?;
                (x + attn)? + self.mlp.forward(&m)?
            }
            BlockKind::Sandwich => {
                let mut a = self.attn.forward(&self.attn_norm.forward(x)?, kv)?;
                if let Some(n) = &self.post_attn_norm {
                    a = n.forward(&a)?;
                }
                let h = (x + a)?;
                let n = self.ffn_norm.as_ref().map_or_else(|| Ok(h.clone()), |n| n.forward(&h))?;
                let mut m = self.mlp.forward(&n)?;
                if let Some(p) = &self.post_ffn_norm {
                    m = p.forward(&m)?;
                }
                h + m
            }
        }
    }
}

/// A block's feed-forward part: one MLP, or a mixture of experts.
#[derive(Debug, Clone)]
enum Ffn {
    Dense(Mlp),
    Moe(Box<MoeLayer>),
}

impl Ffn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Ffn::Dense(m) => m.forward(x),
            Ffn::Moe(m) => m.forward(x),
        }
    }
}

/// The KV caches of one sequence in one part.
#[derive(Debug)]
pub struct PartCache {
    kind: CacheKind,
    /// Tokens processed so far.
    pub position: usize,
}

#[derive(Debug)]
enum CacheKind {
    /// One Candle cache per tensor-parallel rank (each holds its own KV heads).
    Tp(Vec<Vec<LayerCache>>),
    /// Blocks of the part's paged KV cache (the CPU runtime's, or a Candle part's store).
    Paged(PagedSeq),
}

/// A sequence's blocks in a part's paged KV cache, given back when it is dropped.
#[derive(Debug)]
pub struct PagedSeq {
    kv: Arc<KvPool>,
    blocks: Vec<u32>,
    /// The newest pool job that read the blocks (they are reused only after it).
    last_job: u64,
    /// The token ids of the positions so far, while they are known (the prefix cache keys full
    /// blocks by them; a sequence fed hidden states keys none).
    tokens: Vec<u32>,
    keyed: bool,
    /// The prefix-cache keys of the full blocks so far.
    keys: Vec<u64>,
}

impl PagedSeq {
    fn new(kv: Arc<KvPool>) -> PagedSeq {
        PagedSeq { kv, blocks: Vec::new(), last_job: 0, tokens: Vec::new(), keyed: true, keys: Vec::new() }
    }

    /// Makes the blocks cover `positions` positions, taking free blocks from the pool (waiting
    /// a moment for blocks a straggler thread of an earlier pass may still be reading).
    fn reserve(&mut self, positions: usize) -> Result<(), EngineError> {
        let want = positions.div_ceil(BLOCK_TOKENS);
        let needed = want.saturating_sub(self.blocks.len());
        let mut got = Vec::with_capacity(needed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while got.len() < needed {
            let oldest = pool::global().oldest_active();
            if let Some(b) = self.kv.alloc(oldest) {
                got.push(b);
                continue;
            }
            if self.kv.held_for_readers(oldest) && std::time::Instant::now() < deadline {
                std::thread::yield_now();
                continue;
            }
            let free = self.kv.available();
            for b in got {
                self.kv.free(b, 0);
            }
            return Err(EngineError::KvCacheFull { needed, free, block_tokens: BLOCK_TOKENS });
        }
        self.blocks.extend(got);
        Ok(())
    }

    fn release(&mut self) {
        for b in self.blocks.drain(..) {
            self.kv.free(b, self.last_job);
        }
        self.tokens.clear();
        self.keys.clear();
        self.keyed = true;
    }

    /// Records a step's tokens and keys the blocks they filled.
    fn advanced(&mut self, input: &BatchInput<'_>) {
        match input {
            BatchInput::Tokens(ids) if self.keyed => self.tokens.extend_from_slice(ids),
            _ => {
                self.keyed = false;
                return;
            }
        }
        while self.keys.len() < self.tokens.len() / BLOCK_TOKENS {
            let i = self.keys.len();
            let parent = self.keys.last().copied().unwrap_or_else(|| self.kv.seed());
            let key = self.kv.register(self.blocks[i], parent, &self.tokens[i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS]);
            self.keys.push(key);
        }
    }
}

impl Drop for PagedSeq {
    fn drop(&mut self) {
        self.release();
    }
}

impl PartCache {
    /// Bytes the caches hold allocated.
    pub fn allocated_bytes(&self) -> usize {
        match &self.kind {
            CacheKind::Tp(ranks) => ranks.iter().flatten().map(LayerCache::allocated_bytes).sum(),
            CacheKind::Paged(seq) => seq.blocks.len() * seq.kv.shape().bytes_per_block(),
        }
    }

    /// Forgets the sequence (a CPU part's blocks go back to the pool).
    pub fn clear(&mut self) {
        match &mut self.kind {
            CacheKind::Tp(ranks) => ranks.iter_mut().flatten().for_each(LayerCache::clear),
            CacheKind::Paged(seq) => seq.release(),
        }
        self.position = 0;
    }

    /// Starts a new sequence whose first tokens are `tokens` from the prefix cache: takes the
    /// cached blocks of its longest cached run of leading full blocks, leaving at least one token
    /// to compute, and returns how many tokens they hold (0 with tensor parallelism, or when the
    /// cache holds none, or when the sequence has begun).
    pub fn reuse_prefix(&mut self, tokens: &[u32]) -> usize {
        let CacheKind::Paged(seq) = &mut self.kind else { return 0 };
        if self.position != 0 || !seq.blocks.is_empty() || tokens.len() <= BLOCK_TOKENS {
            return 0;
        }
        let full = (tokens.len() - 1) / BLOCK_TOKENS * BLOCK_TOKENS;
        let (blocks, keys) = seq.kv.lookup(&tokens[..full]);
        let n = blocks.len() * BLOCK_TOKENS;
        seq.blocks = blocks;
        seq.keys = keys;
        seq.tokens = tokens[..n].to_vec();
        self.position = n;
        n
    }

    /// Blocks the pool must hand this sequence for `rows` more positions (0 with tensor
    /// parallelism).
    pub fn blocks_needed(&self, rows: usize) -> usize {
        match &self.kind {
            CacheKind::Tp(_) => 0,
            CacheKind::Paged(seq) => (self.position + rows).div_ceil(BLOCK_TOKENS).saturating_sub(seq.blocks.len()),
        }
    }

    /// Blocks the sequence holds (0 with tensor parallelism).
    pub fn blocks_held(&self) -> usize {
        match &self.kind {
            CacheKind::Tp(_) => 0,
            CacheKind::Paged(seq) => seq.blocks.len(),
        }
    }
}

/// What a part is given.
#[derive(Debug)]
pub enum StageInput<'a> {
    /// Token ids (the first part).
    Tokens(&'a [u32]),
    /// Hidden states `[1, t, hidden]` from the previous part.
    Hidden(Tensor),
}

/// What a part gives back.
#[derive(Debug)]
pub enum StageOutput {
    /// Hidden states `[1, t, hidden]` for the next part.
    Hidden(Tensor),
    /// Logits `[t, vocab]` (or `[1, vocab]` for the last position only), f32.
    Logits(Tensor),
}

/// Runs `f` on the values of an f32 tensor: in place where they are contiguous in host memory
/// (a sequence's rows of a step's logits, a view into the pass's buffer), else on a copy.
pub fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R, EngineError> {
    if t.dtype() == DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((from, to))) = (&*storage, layout.contiguous_offsets()) {
            return Ok(f(&cpu.as_slice::<f32>()?[from..to]));
        }
    }
    Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
}

/// Which positions' logits the last part computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only the last position (generation).
    Last,
    /// Every position (scoring, tests).
    All,
}

/// Where a part runs.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Gantry's CPU runtime.
    Cpu,
    /// Candle on a device: a GPU (`cuda:N`), or the CPU as the stand-in tests use for that
    /// path.
    Candle(Device),
    /// Candle on several devices of one node, every layer split across them (tensor
    /// parallelism, rank `i` on device `i`); CPU devices are the stand-in tests use.
    TensorParallel(Vec<Device>),
    /// Candle on a device, a mixture-of-experts model's experts in host memory (run there by
    /// Candle's CPU kernels) when the device is short of memory; a CPU device is the stand-in
    /// tests use for the GPU.
    ExpertsOnHost(Device),
}

impl Backend {
    /// The runtime for a device: the CPU runtime on the CPU, Candle elsewhere.
    pub fn for_device(device: &Device) -> Backend {
        if device.is_cpu() { Backend::Cpu } else { Backend::Candle(device.clone()) }
    }
}

/// Layers `range` of a model on one device.
#[derive(Debug)]
pub struct ModelPart {
    pub config: Arc<EngineConfig>,
    pub range: Range<usize>,
    /// Bytes of the weight tensors the load created on its device (Candle's allocations, or the
    /// CPU runtime's packed copies), as the load counted them.
    pub weight_bytes: u64,
    runtime: Runtime,
}

#[derive(Debug)]
enum Runtime {
    /// A Candle part and its paged KV cache: block ids from the pool, keys and values in
    /// device tensors (one store per layer, grown as the pool makes blocks).
    Candle(Box<CandlePart>, Arc<KvPool>, Mutex<Vec<LayerStore>>),
    /// One Candle part per rank, each holding a slice of every layer.
    Tp(Vec<CandlePart>),
    Cpu(Arc<CpuModel>),
}

impl Runtime {
    /// A Candle part with an empty paged KV cache.
    fn paged(part: CandlePart) -> Runtime {
        let cfg = &part.config;
        let shape = KvShape {
            layers: part.blocks.len(),
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            dtype: if part.dtype == DType::F32 { KvDtype::F32 } else { KvDtype::F16 },
        };
        Runtime::Candle(Box::new(part), KvPool::ids_only(shape, DEFAULT_KV_BLOCKS), Mutex::new(Vec::new()))
    }
}

/// One step of a sequence in [`ModelPart::forward_batch`].
#[derive(Debug)]
pub struct BatchStep<'a> {
    pub cache: &'a mut PartCache,
    /// Token ids (the first part) or hidden states, `rows × hidden`, row after row.
    pub input: BatchInput<'a>,
    pub logits_for: LogitsFor,
}

/// What a sequence brings to a batch.
#[derive(Debug, Clone, Copy)]
pub enum BatchInput<'a> {
    Tokens(&'a [u32]),
    Hidden(&'a [f32]),
}

impl BatchInput<'_> {
    /// Rows (positions) it brings, for a part of `hidden` wide hidden states.
    pub fn rows(&self, hidden: usize) -> usize {
        match self {
            BatchInput::Tokens(ids) => ids.len(),
            BatchInput::Hidden(h) => h.len() / hidden.max(1),
        }
    }
}

/// Layers of a model on a device, run with Candle.
#[derive(Debug)]
struct CandlePart {
    config: Arc<EngineConfig>,
    range: Range<usize>,
    device: Device,
    dtype: DType,
    embed: Option<Embedding>,
    pos_embed: Option<Tensor>,
    blocks: Vec<Block>,
    head: Option<(Norm, Linear)>,
    /// On a tensor-parallel rank: its group, and the vocabulary rows its embeddings and head
    /// hold.
    shard: Option<(Shard, Range<usize>)>,
}

/// Progress while loading: layers done of the part's total.
#[derive(Debug, Clone, Copy)]
pub struct LoadProgress {
    pub layers_done: usize,
    pub layers_total: usize,
}

static CPU: Device = Device::Cpu;

impl ModelPart {
    /// Loads layers `range` (and the embeddings or head when the range starts or ends the
    /// model) from `source` for `backend`, reporting progress after each layer.
    pub fn load(
        source: &WeightSource,
        config: Arc<EngineConfig>,
        range: Range<usize>,
        backend: &Backend,
        stats: &mut LoadStats,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<ModelPart, EngineError> {
        let n = config.num_layers;
        if range.start >= range.end || range.end > n {
            return Err(EngineError::Config(format!(
                "layer range {}..{} is not within the model's {n} layers",
                range.start, range.end
            )));
        }
        let runtime = match backend {
            Backend::Cpu => {
                let total = range.len();
                let mut layer_done = |d: usize| progress(LoadProgress { layers_done: d, layers_total: total });
                Runtime::Cpu(Arc::new(CpuModel::load(source, config.clone(), range.clone(), stats, &mut layer_done)?))
            }
            Backend::Candle(device) => Runtime::paged(CandlePart::load(
                source,
                config.clone(),
                range.clone(),
                (device, device, false),
                stats,
                progress,
                None,
            )?),
            Backend::ExpertsOnHost(device) => {
                if config.moe.is_none() {
                    return Err(EngineError::Config(
                        "only a mixture-of-experts model has experts to keep on the host".into(),
                    ));
                }
                Runtime::paged(CandlePart::load(
                    source,
                    config.clone(),
                    range.clone(),
                    (device, &CPU, true),
                    stats,
                    progress,
                    None,
                )?)
            }
            Backend::TensorParallel(devices) => {
                Runtime::Tp(load_ranks(source, &config, &range, devices, stats, progress)?)
            }
        };
        Ok(ModelPart { config, range, weight_bytes: 0, runtime })
    }

    /// Bytes of expert weights the part keeps in host memory ([`Backend::ExpertsOnHost`]).
    pub fn experts_on_host_bytes(&self) -> usize {
        let Runtime::Candle(c, ..) = &self.runtime else { return 0 };
        c.blocks
            .iter()
            .map(|b| match &b.mlp {
                Ffn::Moe(m) if m.on_host() => m.expert_bytes(),
                _ => 0,
            })
            .sum()
    }

    /// The device the part runs on.
    pub fn device(&self) -> &Device {
        match &self.runtime {
            Runtime::Candle(c, ..) => &c.device,
            Runtime::Tp(ranks) => ranks.first().map_or(&CPU, |r| &r.device),
            Runtime::Cpu(_) => &CPU,
        }
    }

    /// The part's paged KV cache (`None` with tensor parallelism, which keeps a cache per
    /// sequence and rank).
    pub fn kv_pool(&self) -> Option<&Arc<KvPool>> {
        match &self.runtime {
            Runtime::Cpu(m) => Some(&m.kv),
            Runtime::Candle(_, kv, _) => Some(kv),
            Runtime::Tp(_) => None,
        }
    }

    /// A fresh cache for a new sequence.
    pub fn new_cache(&self) -> PartCache {
        let kind = match &self.runtime {
            Runtime::Tp(ranks) => {
                CacheKind::Tp(ranks.iter().map(|r| vec![LayerCache::default(); r.blocks.len()]).collect())
            }
            Runtime::Cpu(m) => CacheKind::Paged(PagedSeq::new(m.kv.clone())),
            Runtime::Candle(_, kv, _) => CacheKind::Paged(PagedSeq::new(kv.clone())),
        };
        PartCache { kind, position: 0 }
    }

    /// Runs the part on the next tokens (or hidden states) of the sequence `cache` belongs to.
    pub fn forward(
        &self,
        input: StageInput<'_>,
        cache: &mut PartCache,
        logits_for: LogitsFor,
    ) -> Result<StageOutput, EngineError> {
        match (&self.runtime, &mut cache.kind) {
            (Runtime::Tp(ranks), CacheKind::Tp(caches)) => {
                let (out, t) = forward_ranks(ranks, input, caches, cache.position, logits_for)?;
                cache.position += t;
                Ok(out)
            }
            (Runtime::Cpu(_) | Runtime::Candle(..), CacheKind::Paged(_)) => {
                let hidden;
                let input = match input {
                    StageInput::Tokens(ids) => BatchInput::Tokens(ids),
                    StageInput::Hidden(h) => {
                        hidden = h.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        BatchInput::Hidden(&hidden)
                    }
                };
                let mut out = self.forward_batch(&mut [BatchStep { cache, input, logits_for }])?;
                Ok(out.remove(0))
            }
            _ => Err(EngineError::Config("this cache belongs to a part on another runtime".into())),
        }
    }

    /// Runs one step of several sequences together, as one pass: every projection reads its
    /// weights once for all of them, and attention reads each sequence's own blocks. On the
    /// CPU runtime each sequence's results are the same as it would get alone (its kernels
    /// compute every row in the same order whatever the batch); on Candle they are as
    /// Candle's kernels make them (see `docs/src/engine.md`). With tensor parallelism the
    /// sequences run one after the other. On an error no sequence advances.
    pub fn forward_batch(&self, steps: &mut [BatchStep<'_>]) -> Result<Vec<StageOutput>, EngineError> {
        let model = match &self.runtime {
            Runtime::Cpu(model) => model,
            Runtime::Candle(part, kv, store) => return self.forward_candle(part, kv, store, steps),
            Runtime::Tp(_) => {
                let mut outs = Vec::with_capacity(steps.len());
                for step in steps.iter_mut() {
                    let hidden;
                    let input = match step.input {
                        BatchInput::Tokens(ids) => StageInput::Tokens(ids),
                        BatchInput::Hidden(h) => {
                            let rows = step.input.rows(self.config.hidden_size);
                            hidden = Tensor::from_slice(h, (1, rows, self.config.hidden_size), self.device())?;
                            StageInput::Hidden(hidden)
                        }
                    };
                    outs.push(self.forward(input, step.cache, step.logits_for)?);
                }
                return Ok(outs);
            }
        };
        let hidden = self.config.hidden_size;
        let spans = Self::reserve(&model.kv, hidden, steps)?;
        let rows: Vec<usize> = spans.iter().map(|&(_, rows, _)| rows).collect();
        let seq_steps: Vec<SeqStep> = steps
            .iter()
            .zip(spans)
            .map(|(step, (start, _, blocks))| SeqStep {
                input: match step.input {
                    BatchInput::Tokens(ids) => SeqInput::Tokens(ids.to_vec()),
                    BatchInput::Hidden(h) => SeqInput::Hidden(h.to_vec()),
                },
                start,
                blocks,
                all_logits: step.logits_for == LogitsFor::All,
            })
            .collect();
        let out = cpu_forward(model, pool::global(), seq_steps)?;
        Self::advance(steps, hidden, out.job);
        let mut outs = Vec::with_capacity(steps.len());
        match out.values {
            StepValues::Logits { all, rows } => {
                // One tensor over the pass's buffer; each sequence gets a view of its rows.
                let vocab = self.config.vocab_size;
                let all = Tensor::from_vec(all, (rows.iter().sum::<usize>(), vocab), &CPU)?;
                let mut at = 0;
                for k in rows {
                    outs.push(StageOutput::Logits(all.narrow(0, at, k)?));
                    at += k;
                }
            }
            StepValues::Hidden(per_seq) => {
                for (values, n) in per_seq.into_iter().zip(rows) {
                    outs.push(StageOutput::Hidden(Tensor::from_vec(values, (1, n, hidden), &CPU)?));
                }
            }
        }
        Ok(outs)
    }

    /// Each step's first position, rows and block table, with blocks of pool `kv` reserved for
    /// its rows.
    fn reserve(
        kv: &Arc<KvPool>,
        hidden: usize,
        steps: &mut [BatchStep<'_>],
    ) -> Result<Vec<(usize, usize, Vec<u32>)>, EngineError> {
        let mut spans = Vec::with_capacity(steps.len());
        for step in steps.iter_mut() {
            let CacheKind::Paged(seq) = &mut step.cache.kind else {
                return Err(EngineError::Config("this cache belongs to a part on another runtime".into()));
            };
            if !Arc::ptr_eq(&seq.kv, kv) {
                return Err(EngineError::Config("this cache belongs to another model part".into()));
            }
            let rows = step.input.rows(hidden);
            let start = step.cache.position;
            seq.reserve(start + rows)?;
            spans.push((start, rows, seq.blocks.clone()));
        }
        Ok(spans)
    }

    /// Moves each step's sequence past its rows, which job `job` read.
    fn advance(steps: &mut [BatchStep<'_>], hidden: usize, job: u64) {
        for step in steps.iter_mut() {
            let rows = step.input.rows(hidden);
            if let CacheKind::Paged(seq) = &mut step.cache.kind {
                seq.last_job = job;
                seq.advanced(&step.input);
            }
            step.cache.position += rows;
        }
    }

    /// [`ModelPart::forward_batch`] on a Candle part.
    fn forward_candle(
        &self,
        part: &CandlePart,
        kv: &Arc<KvPool>,
        stores: &Mutex<Vec<LayerStore>>,
        steps: &mut [BatchStep<'_>],
    ) -> Result<Vec<StageOutput>, EngineError> {
        let hidden = self.config.hidden_size;
        let Some(first) = steps.first().map(|s| s.input) else { return Ok(Vec::new()) };
        let spans = Self::reserve(kv, hidden, steps)?;
        let mut seqs = Vec::with_capacity(spans.len());
        let mut row = 0;
        for (start, rows, table) in spans {
            seqs.push(SeqRows::new(row, rows, start, table, &part.device)?);
            row += rows;
        }
        let mixed = || EngineError::Config("a batch mixes token ids and hidden states".into());
        let x = match first {
            BatchInput::Tokens(_) => {
                let (mut ids, mut positions) = (Vec::with_capacity(row), Vec::with_capacity(row));
                for (step, s) in steps.iter().zip(&seqs) {
                    let BatchInput::Tokens(t) = step.input else { return Err(mixed()) };
                    if t.is_empty() {
                        return Err(EngineError::Config("no tokens to process".into()));
                    }
                    ids.extend_from_slice(t);
                    positions.extend(s.start..s.start + s.rows);
                }
                part.embed_ids(&ids, &positions)?
            }
            BatchInput::Hidden(_) => {
                let mut h = Vec::with_capacity(row * hidden);
                for step in steps.iter() {
                    let BatchInput::Hidden(x) = step.input else { return Err(mixed()) };
                    h.extend_from_slice(x);
                }
                part.hidden_in(&Tensor::from_vec(h, (1, row, hidden), &CPU)?)?
            }
        };
        let logits_for: Vec<LogitsFor> = steps.iter().map(|s| s.logits_for).collect();
        let outs = part.forward_paged(kv, stores, x, &seqs, &logits_for)?;
        Self::advance(steps, hidden, 0);
        Ok(outs)
    }
}

impl CandlePart {
    fn load(
        source: &WeightSource,
        config: Arc<EngineConfig>,
        range: Range<usize>,
        (device, expert_device, experts_on_host): (&Device, &Device, bool),
        stats: &mut LoadStats,
        progress: &mut dyn FnMut(LoadProgress),
        shard: Option<&Shard>,
    ) -> Result<CandlePart, EngineError> {
        let n = config.num_layers;
        // Candle's CPU kernels compute in f32; quantized matrices take f32 activations too.
        let dtype = DType::F32;
        let cfg = &*config;
        let first = range.start == 0;
        let last = range.end == n;
        let vocab = shard.map_or(0..cfg.vocab_size, |s| s.share(cfg.vocab_size));
        let embed = if first || (last && cfg.tied_embeddings) {
            let e = source.embedding(Role::TokenEmbd, device, dtype)?;
            Some(if shard.is_some() { e.rows(vocab.clone())? } else { e })
        } else {
            None
        };
        let pos_embed = if first && cfg.learned_positions.is_some() {
            Some(source.dense(Role::PosEmbd, None, Part::Weight, device, dtype)?)
        } else {
            None
        };
        let divisors = match source.dense_opt(Role::RopeFreqs, None, Part::Weight, device, DType::F32)? {
            Some(t) => Some(t.to_vec1::<f32>()?),
            None => None,
        };
        let ropes = cfg.rope.as_ref().map(|r| rope_pair(r, divisors.as_deref()));
        let mut loader = Loader { source, cfg, device, expert_device, experts_on_host, dtype, stats, shard };
        let mut blocks = Vec::with_capacity(range.len());
        for (done, i) in range.clone().enumerate() {
            blocks.push(loader.block(i, ropes.as_ref())?);
            progress(LoadProgress { layers_done: done + 1, layers_total: range.len() });
        }
        let head = if last {
            let norm = loader.norm(Role::OutputNorm, None)?;
            let output = if source.has(Role::Output, None, Part::Weight) {
                let head = Linear::new(
                    source.matrix(Role::Output, None, device, dtype, false, loader.stats)?,
                    source.dense_opt(Role::Output, None, Part::Bias, device, dtype)?,
                );
                loader.column(head, std::slice::from_ref(&vocab))?
            } else if let Some(e) = &embed {
                Linear::new(e.as_head()?, None)
            } else {
                return Err(EngineError::MissingTensor("output.weight".into()));
            };
            Some((norm, output))
        } else {
            None
        };
        // A last-only part keeps the embedding table solely as its tied head.
        let embed = if first { embed } else { None };
        let shard = shard.map(|s| (s.clone(), vocab));
        Ok(CandlePart { config, range, device: device.clone(), dtype, embed, pos_embed, blocks, head, shard })
    }

    /// The hidden states `[1, t, hidden]` of token `ids` at `positions` (the first part).
    fn embed_ids(&self, ids: &[u32], positions: &[usize]) -> Result<Tensor, EngineError> {
        let embed = self.embed.as_ref().ok_or_else(|| {
            EngineError::Config(format!(
                "layers {}..{} start mid-model: give hidden states",
                self.range.start, self.range.end
            ))
        })?;
        if ids.is_empty() {
            return Err(EngineError::Config("no tokens to process".into()));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return Err(EngineError::Config(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let t = ids.len();
        let mut x = match &self.shard {
            None => embed.forward(&Tensor::from_slice(ids, (1, t), &self.device)?, self.dtype)?,
            Some((shard, vocab)) => {
                // This rank's rows for the ids it holds, zeros for the others; the sum
                // over the group is every id's row.
                let held = |id: &u32| vocab.contains(&(*id as usize));
                let local: Vec<u32> =
                    ids.iter().map(|id| if held(id) { *id - vocab.start as u32 } else { 0 }).collect();
                let mask: Vec<f32> = ids.iter().map(|id| if held(id) { 1.0 } else { 0.0 }).collect();
                let rows = embed.forward(&Tensor::from_slice(&local, (1, t), &self.device)?, self.dtype)?;
                let mask = Tensor::from_slice(&mask, (1, t, 1), &self.device)?.to_dtype(self.dtype)?;
                shard.comm.all_reduce_sum(&rows.broadcast_mul(&mask)?)?
            }
        };
        if let Some(scale) = self.config.embed_scale {
            // transformers rounds √hidden to the activation dtype before multiplying.
            x = (x * f64::from(scale as f32))?;
        }
        if let Some(p) = &self.pos_embed {
            let max = p.dim(0)?;
            if let Some(&last) = positions.iter().max()
                && last >= max
            {
                return Err(EngineError::ContextExceeded { needed: last + 1, limit: max });
            }
            let at: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
            let rows = p.index_select(&Tensor::from_vec(at, t, &self.device)?, 0)?;
            x = x.broadcast_add(&rows.unsqueeze(0)?)?;
        }
        Ok(x)
    }

    /// Hidden states from the previous part, on this part's device and dtype.
    fn hidden_in(&self, h: &Tensor) -> Result<Tensor, EngineError> {
        if self.embed.is_some() {
            return Err(EngineError::Config("the first part takes token ids, not hidden states".into()));
        }
        Ok(h.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// The logits `[k, vocab]` (f32) of hidden states `[1, k, hidden]` (the last part).
    fn logits(&self, x: &Tensor) -> Result<Tensor, EngineError> {
        let Some((norm, output)) = &self.head else {
            return Err(EngineError::Config("only the last part computes logits".into()));
        };
        let mut logits = output.forward(&norm.forward(x)?)?;
        if let Some((shard, vocab)) = &self.shard {
            // Each rank's vocabulary slice in place, zeros elsewhere: the sum is the whole row.
            let (before, after) = (vocab.start, self.config.vocab_size - vocab.end);
            logits = shard.comm.all_reduce_sum(&logits.pad_with_zeros(D::Minus1, before, after)?)?;
        }
        if let Some(cap) = self.config.final_softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?)
    }

    /// Runs the part on the next tokens (or hidden states) of a sequence at `start`, in its own
    /// caches (a tensor-parallel rank); returns the output and how many positions it added.
    fn forward(
        &self,
        input: StageInput<'_>,
        layers: &mut [LayerCache],
        start: usize,
        logits_for: LogitsFor,
    ) -> Result<(StageOutput, usize), EngineError> {
        let mut x = match input {
            StageInput::Tokens(ids) => self.embed_ids(ids, &(start..start + ids.len()).collect::<Vec<_>>())?,
            StageInput::Hidden(h) => self.hidden_in(&h)?,
        };
        let t = x.dim(1)?;
        for (block, cache) in self.blocks.iter().zip(layers.iter_mut()) {
            x = block.forward(&x, KvAccess::Own { cache, start })?;
        }
        if self.head.is_none() {
            return Ok((StageOutput::Hidden(x), t));
        }
        let x = match logits_for {
            LogitsFor::Last => x.narrow(1, t - 1, 1)?,
            LogitsFor::All => x,
        };
        Ok((StageOutput::Logits(self.logits(&x)?), t))
    }

    /// Runs one step of several sequences as one pass: their rows side by side through every
    /// projection, each sequence's attention over its own blocks of the paged `stores` (grown
    /// first to hold every block `kv` has made).
    fn forward_paged(
        &self,
        kv: &KvPool,
        stores: &Mutex<Vec<LayerStore>>,
        x: Tensor,
        seqs: &[SeqRows],
        logits_for: &[LogitsFor],
    ) -> Result<Vec<StageOutput>, EngineError> {
        let mut stores = stores.lock().unwrap_or_else(|p| p.into_inner());
        let need = kv.blocks_made() * BLOCK_TOKENS;
        let have = stores.first().map_or(0, LayerStore::slots);
        if stores.len() != self.blocks.len() || have < need {
            // Doubling, so that a pool filling up copies each position a few times at most, but
            // never past the blocks the pool may hand out (the memory the worker sized it for).
            let most = kv.max_blocks().saturating_mul(BLOCK_TOKENS);
            let slots = need.max((2 * have).min(most));
            let (kvh, d) = (self.config.num_kv_heads, self.config.head_dim);
            let grown: Result<Vec<LayerStore>, candle_core::Error> = (0..self.blocks.len())
                .map(|l| match stores.get(l) {
                    Some(old) => old.grown(slots),
                    None => LayerStore::new(slots, kvh, d, self.dtype, &self.device),
                })
                .collect();
            *stores = grown?;
        }
        let mut x = x;
        for (block, store) in self.blocks.iter().zip(stores.iter()) {
            x = block.forward(&x, KvAccess::Paged { store, seqs })?;
        }
        drop(stores);
        if self.head.is_none() {
            return seqs.iter().map(|s| Ok(StageOutput::Hidden(x.narrow(1, s.row, s.rows)?.contiguous()?))).collect();
        }
        // The rows whose logits are wanted, all in one pass through the head.
        let mut wanted = Vec::new();
        let mut counts = Vec::with_capacity(seqs.len());
        for (s, which) in seqs.iter().zip(logits_for) {
            let rows = match which {
                LogitsFor::Last => s.row + s.rows - 1..s.row + s.rows,
                LogitsFor::All => s.row..s.row + s.rows,
            };
            counts.push(rows.len());
            wanted.extend(rows.map(|r| r as u32));
        }
        let n = wanted.len();
        let logits = self.logits(&x.index_select(&Tensor::from_vec(wanted, n, &self.device)?, 1)?)?;
        let mut at = 0;
        let mut outs = Vec::with_capacity(seqs.len());
        for k in counts {
            outs.push(StageOutput::Logits(logits.narrow(0, at, k)?));
            at += k;
        }
        Ok(outs)
    }
}

/// Loads one Candle part per device, each rank's slices of layers `range`, joined by a
/// communicator: NCCL when every device is a GPU and the build has the `nccl` feature, else
/// the in-process one (activations pass through host memory).
fn load_ranks(
    source: &WeightSource,
    config: &Arc<EngineConfig>,
    range: &Range<usize>,
    devices: &[Device],
    stats: &mut LoadStats,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<Vec<CandlePart>, EngineError> {
    let n = devices.len();
    let shape = gantry_core::tp::TpShape {
        num_heads: config.num_heads,
        num_kv_heads: config.num_kv_heads,
        intermediate_size: config.intermediate_size,
        vocab_size: config.vocab_size,
        experts: config.moe.is_some(),
    };
    gantry_core::tp::check(&shape, n)
        .map_err(|e| EngineError::Config(format!("cannot split the model {n} ways (tensor parallelism): {e}")))?;
    let comms = tp::communicators(devices)?;
    let per = range.len();
    let mut ranks = Vec::with_capacity(n);
    for (rank, (device, comm)) in devices.iter().zip(comms).enumerate() {
        let mut rank_progress =
            |p: LoadProgress| progress(LoadProgress { layers_done: rank * per + p.layers_done, layers_total: n * per });
        let shard = Shard { comm };
        ranks.push(CandlePart::load(
            source,
            config.clone(),
            range.clone(),
            (device, device, false),
            stats,
            &mut rank_progress,
            Some(&shard),
        )?);
    }
    Ok(ranks)
}

/// Runs one step on every rank at once (a thread each: the collectives meet in the middle) and
/// returns rank 0's output. A rank that fails or panics aborts the group's collectives, so the
/// others return instead of waiting; the error given is the failing rank's own.
fn forward_ranks(
    ranks: &[CandlePart],
    input: StageInput<'_>,
    caches: &mut [Vec<LayerCache>],
    start: usize,
    logits_for: LogitsFor,
) -> Result<(StageOutput, usize), EngineError> {
    let results: Vec<Result<(StageOutput, usize), EngineError>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter()
            .zip(caches.iter_mut())
            .map(|(part, cache)| {
                let input = match &input {
                    StageInput::Tokens(ids) => StageInput::Tokens(ids),
                    StageInput::Hidden(h) => StageInput::Hidden(h.clone()),
                };
                s.spawn(move || {
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        part.forward(input, cache, start, logits_for)
                    }));
                    let out = run.unwrap_or_else(|_| {
                        Err(EngineError::Config("a tensor-parallel rank panicked while computing a step".into()))
                    });
                    if out.is_err()
                        && let Some((shard, _)) = &part.shard
                    {
                        shard.comm.abort();
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(EngineError::Config("a tensor-parallel rank thread died".into()))))
            .collect()
    });
    let mut first_err = None;
    let mut out = None;
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(o) if i == 0 => out = Some(o),
            Ok(_) => {}
            Err(e) => {
                let knock_on = e.to_string().contains(tp::ABORTED);
                if first_err.as_ref().is_none_or(|(k, _)| *k && !knock_on) {
                    first_err = Some((knock_on, e));
                }
            }
        }
    }
    if let Some((_, e)) = first_err {
        if let Some((shard, _)) = ranks.first().and_then(|r| r.shard.as_ref()) {
            shard.comm.reset();
        }
        return Err(e);
    }
    out.ok_or_else(|| EngineError::Config("a tensor-parallel group with no ranks".into()))
}

/// A weight matrix's `(rows, columns)`.
fn matrix_dims(m: &crate::layers::Matrix) -> Result<(usize, usize), EngineError> {
    use candle_core::quantized::QMatMul;
    Ok(match m {
        QMatMul::QTensor(q) => q.shape().dims2()?,
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims2()?,
    })
}

/// The global rope and, for Gemma 3, the local one (its own base, no scaling).
fn rope_pair(cfg: &RopeConfig, divisors: Option<&[f32]>) -> (Rope, Option<Rope>) {
    let global = Rope::new(cfg, cfg.theta, divisors);
    let local =
        cfg.local_theta.map(|theta| Rope::new(&RopeConfig { scaling: RopeScaling::None, ..cfg.clone() }, theta, None));
    (global, local)
}

/// What loading one part needs at hand: where the weights are, where they go, and the tally.
struct Loader<'a> {
    source: &'a WeightSource,
    cfg: &'a EngineConfig,
    device: &'a Device,
    /// Where a mixture-of-experts layer's experts go, and whether that is the host's memory.
    expert_device: &'a Device,
    experts_on_host: bool,
    dtype: DType,
    stats: &'a mut LoadStats,
    /// This rank's place when the model is split tensor-parallel.
    shard: Option<&'a Shard>,
}

impl Loader<'_> {
    /// This rank's share of an MLP of `width` (all of it when the model is not split).
    fn mlp_share(&self, width: usize) -> Range<usize> {
        self.shard.map_or(0..width, |s| s.share(width))
    }

    fn norm(&self, role: Role, layer: Option<usize>) -> Result<Norm, EngineError> {
        let w = self.source.dense(role, layer, Part::Weight, self.device, self.dtype)?;
        let b = self.source.dense_opt(role, layer, Part::Bias, self.device, self.dtype)?;
        Ok(Norm::new(self.cfg.norm, w, b)?)
    }

    /// A linear map with its bias when the file has one; `transpose` for GPT-2's Conv1D.
    fn linear(&mut self, role: Role, layer: usize, transpose: bool) -> Result<Linear, EngineError> {
        let weight = self.source.matrix(role, Some(layer), self.device, self.dtype, transpose, self.stats)?;
        let bias = self.source.dense_opt(role, Some(layer), Part::Bias, self.device, self.dtype)?;
        Ok(Linear::new(weight, bias))
    }

    /// Keeps rows `rows` of a column-parallel map (weight and bias) on a tensor-parallel rank.
    fn column(&self, l: Linear, rows: &[Range<usize>]) -> Result<Linear, EngineError> {
        if self.shard.is_none() {
            return Ok(l);
        }
        let bias = l.bias.as_ref().map(|b| tp::take_rows(b, rows)).transpose()?;
        Ok(Linear::new(tp::matrix_rows(&l.weight, rows)?, bias))
    }

    /// Keeps columns `cols` of a row-parallel map on a tensor-parallel rank: its output is
    /// all-reduced, then the whole bias added.
    fn row(&self, l: Linear, cols: Range<usize>) -> Result<Linear, EngineError> {
        let Some(shard) = self.shard else { return Ok(l) };
        Ok(Linear { weight: tp::matrix_cols(&l.weight, cols)?, bias: l.bias, reduce: Some(shard.comm.clone()) })
    }

    /// The rows of the query/key/value projection(s) this rank keeps, and its head counts.
    fn split_qkv(&self, qkv: QkvProj) -> Result<(QkvProj, usize, usize), EngineError> {
        let cfg = self.cfg;
        let (h, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let Some(shard) = self.shard else { return Ok((qkv, h, kvh)) };
        let split = gantry_core::tp::heads(h, kvh, shard.size(), shard.rank()).map_err(EngineError::Config)?;
        let rows = |heads: &Range<usize>, offset: usize| offset + heads.start * d..offset + heads.end * d;
        let q_rows = rows(&split.q, 0);
        let kv_rows = rows(&split.kv, 0);
        let qkv = match qkv {
            QkvProj::Separate { q, k, v } => QkvProj::Separate {
                q: self.column(q, std::slice::from_ref(&q_rows))?,
                k: self.column(k, std::slice::from_ref(&kv_rows))?,
                v: self.column(v, std::slice::from_ref(&kv_rows))?,
            },
            QkvProj::Fused { qkv, layout: QkvLayout::FalconGrouped } => {
                // Per KV group: its query heads, a key, a value. Keep this rank's query heads of
                // each group it reads, then the group's key and value.
                let per = h / kvh;
                let mut keep = Vec::new();
                for g in split.kv.clone() {
                    let base = g * (per + 2);
                    let first = split.q.start.max(g * per);
                    let last = split.q.end.min((g + 1) * per);
                    keep.push((base + first - g * per) * d..(base + last - g * per) * d);
                    keep.push((base + per) * d..(base + per + 2) * d);
                }
                QkvProj::Fused { qkv: self.column(qkv, &keep)?, layout: QkvLayout::FalconGrouped }
            }
            QkvProj::Fused { qkv, layout } => {
                let keep = [q_rows, rows(&split.kv, h * d), rows(&split.kv, (h + kvh) * d)];
                QkvProj::Fused { qkv: self.column(qkv, &keep)?, layout }
            }
        };
        Ok((qkv, split.q.len(), split.kv.len()))
    }

    fn block(&mut self, i: usize, ropes: Option<&(Rope, Option<Rope>)>) -> Result<Block, EngineError> {
        let cfg = self.cfg;
        // GPT-2 checkpoints from transformers store Conv1D matrices as [in, out].
        let transpose = cfg.family == Family::Gpt2 && cfg.format == WeightFormat::Safetensors;
        let qkv = if self.source.has(Role::AttnQkv, Some(i), Part::Weight) {
            let layout = match (cfg.family, cfg.format) {
                // llama.cpp reorders Falcon's groups into [q; k; v] at conversion.
                (Family::Falcon, WeightFormat::Safetensors) => QkvLayout::FalconGrouped,
                _ => QkvLayout::Fused,
            };
            QkvProj::Fused { qkv: self.linear(Role::AttnQkv, i, transpose)?, layout }
        } else {
            QkvProj::Separate {
                q: self.linear(Role::AttnQ, i, false)?,
                k: self.linear(Role::AttnK, i, false)?,
                v: self.linear(Role::AttnV, i, false)?,
            }
        };
        let sliding = cfg.is_sliding(i);
        let rope = ropes.map(|(global, local)| match (sliding, local) {
            (true, Some(l)) => l.clone(),
            _ => global.clone(),
        });
        let (q_norm, k_norm) = if cfg.qk_norm {
            (Some(self.norm(Role::AttnQNorm, Some(i))?), Some(self.norm(Role::AttnKNorm, Some(i))?))
        } else {
            (None, None)
        };
        let (qkv, num_heads, num_kv_heads) = self.split_qkv(qkv)?;
        let out = self.linear(Role::AttnOut, i, transpose)?;
        let out = match self.shard {
            Some(s) => {
                let q = gantry_core::tp::share(cfg.num_heads, s.size(), s.rank());
                self.row(out, q.start * cfg.head_dim..q.end * cfg.head_dim)?
            }
            None => out,
        };
        let attn = Attention {
            qkv,
            out,
            q_norm,
            k_norm,
            num_heads,
            num_kv_heads,
            head_dim: cfg.head_dim,
            scale: cfg.attn_scale,
            softcap: cfg.attn_softcap,
            window: if sliding { cfg.sliding_window } else { None },
            rope,
            sinks: None,
        };
        let mlp = if let Some(moe) = cfg.moe.as_ref().filter(|m| m.is_sparse(i)) {
            Ffn::Moe(Box::new(MoeLayer::load(
                self.source,
                moe,
                i,
                self.device,
                self.expert_device,
                self.experts_on_host,
                self.dtype,
                self.stats,
            )?))
        } else {
            Ffn::Dense(self.dense_mlp(i, transpose)?)
        };
        let sinks = if cfg.attn_sinks {
            Some(self.source.dense(Role::AttnSinks, Some(i), Part::Weight, self.device, self.dtype)?)
        } else {
            None
        };
        let attn = Attention { sinks, ..attn };
        let attn_norm = self.norm(Role::AttnNorm, Some(i))?;
        let (ffn_norm, post_attn_norm, post_ffn_norm) = match cfg.block {
            BlockKind::Parallel { shared_norm: true } => (None, None, None),
            BlockKind::Parallel { shared_norm: false } => (Some(self.norm(Role::AttnNorm2, Some(i))?), None, None),
            BlockKind::Sequential => (Some(self.norm(Role::FfnNorm, Some(i))?), None, None),
            BlockKind::Sandwich => (
                Some(self.norm(Role::FfnNorm, Some(i))?),
                Some(self.norm(Role::AttnPostNorm, Some(i))?),
                Some(self.norm(Role::FfnPostNorm, Some(i))?),
            ),
        };
        Ok(Block { kind: cfg.block, attn_norm, attn, ffn_norm, mlp, post_attn_norm, post_ffn_norm })
    }

    /// Layer `i`'s dense MLP (this rank's share of it).
    fn dense_mlp(&mut self, i: usize, transpose: bool) -> Result<Mlp, EngineError> {
        let cfg = self.cfg;
        let act = cfg.activation;
        let mlp = if cfg.family == Family::Phi3 && self.source.has(Role::FfnGateUp, Some(i), Part::Weight) {
            let gate_up = self.linear(Role::FfnGateUp, i, false)?;
            let down = self.linear(Role::FfnDown, i, false)?;
            let width = matrix_dims(&gate_up.weight)?.0 / 2;
            let mine = self.mlp_share(width);
            let halves = [mine.clone(), width + mine.start..width + mine.end];
            Mlp::GatedFused { gate_up: self.column(gate_up, &halves)?, down: self.row(down, mine)?, act }
        } else if cfg.gated_mlp {
            let gate = self.linear(Role::FfnGate, i, false)?;
            let up = self.linear(Role::FfnUp, i, false)?;
            let down = self.linear(Role::FfnDown, i, false)?;
            let mine = self.mlp_share(matrix_dims(&gate.weight)?.0);
            Mlp::Gated {
                gate: self.column(gate, std::slice::from_ref(&mine))?,
                up: self.column(up, std::slice::from_ref(&mine))?,
                down: self.row(down, mine)?,
                act,
            }
        } else {
            let up = self.linear(Role::FfnUp, i, transpose)?;
            let down = self.linear(Role::FfnDown, i, transpose)?;
            let mine = self.mlp_share(matrix_dims(&up.weight)?.0);
            Mlp::Plain { up: self.column(up, std::slice::from_ref(&mine))?, down: self.row(down, mine)?, act }
        };
        Ok(mlp)
    }
}
