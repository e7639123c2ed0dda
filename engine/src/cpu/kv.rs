//! The paged KV cache of a model on the CPU: keys and values in fixed blocks of
//! [`BLOCK_TOKENS`] positions, from one pool per model part; a sequence holds a table of
//! block ids. Memory is taken in slabs as blocks are first needed and never moves, so a thread
//! reading a block needs no lock. A freed block is reused only once no thread can still be
//! reading it (a straggler of an older job: see [`super::pool`]).
//!
//! The pool is also the prefix cache: a block a sequence has filled is keyed by the chained
//! hash of its tokens ([`gantry_core::prefix`]) and, once no sequence holds it, kept until its
//! room is needed (least recently used first); a new sequence whose tokens start with cached
//! blocks takes them instead of computing them again. Blocks are shared only when full, and a
//! full block is never written again, so sharing needs no copy.

#![allow(unsafe_code)] // blocks are addressed through raw pointers into slabs: see SAFETY notes.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use gantry_core::prefix;

use half::f16;

/// Positions per block.
pub const BLOCK_TOKENS: usize = 16;
/// Blocks per slab (one allocation per layer for K and for V).
const SLAB_BLOCKS: usize = 64;
/// Most slabs a pool can have (the table is fixed, so readers need no lock): 4 Mi positions
/// per model part, 64 sequences of 64K tokens. (Each table takes 8 bytes a slab for every layer,
/// touched when made: 16K slabs cost SmolLM2 8 MiB of resident memory for nothing.)
const MAX_SLABS: usize = 1 << 12;

/// How keys and values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    F16,
}

impl KvDtype {
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

/// What a pool stores per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: KvDtype,
}

impl KvShape {
    /// Bytes of one block for one layer's keys (or values).
    fn block_bytes(&self) -> usize {
        self.kv_heads * BLOCK_TOKENS * self.head_dim * self.dtype.size()
    }

    /// Bytes of one block in all, keys and values of every layer.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.layers * self.block_bytes()
    }
}

/// What the pool knows of a block.
#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    /// Sequences holding it.
    refs: u32,
    /// Its prefix-cache entry: (parent key, key, token ids), once a sequence filled it.
    entry: Option<(u64, u64, [u32; BLOCK_TOKENS])>,
    /// The newest job that may have read it.
    last_job: u64,
    /// Its place in the least-recently-used order while only the cache holds it.
    tick: u64,
    /// A sequence has held it (its memory has been written, so it is resident).
    touched: bool,
}

#[derive(Debug, Default)]
struct Free {
    /// Blocks ready for reuse.
    ready: Vec<u32>,
    /// Blocks freed after job `.1` began: reusable once no thread is in a job that old.
    limbo: Vec<(u32, u64)>,
    /// Blocks sequences hold.
    used: usize,
    /// Distinct blocks sequences have held since the pool began.
    touched: usize,
    meta: Vec<Meta>,
    /// Prefix-cache entries: key → block.
    by_key: HashMap<u64, u32>,
    /// Blocks only the cache holds, least recently used first (tick → block).
    lru: BTreeMap<u64, u32>,
    tick: u64,
    /// Keys the cache gained (`true`) and lost since [`KvPool::take_key_changes`] last took
    /// them, in order; `None` once more than [`JOURNAL_MAX`] piled up (the reader resyncs).
    journal: Option<Vec<(u64, bool)>>,
}

impl Free {
    /// Moves blocks out of limbo whose readers are gone.
    fn settle(&mut self, oldest_active: u64) {
        if self.limbo.is_empty() {
            return;
        }
        let limbo = std::mem::take(&mut self.limbo);
        let (ready, still): (Vec<_>, Vec<_>) = limbo.into_iter().partition(|&(_, job)| job < oldest_active);
        self.ready.extend(ready.into_iter().map(|(b, _)| b));
        self.limbo = still;
    }

    /// Takes block `b` for a sequence.
    fn take(&mut self, b: u32) -> u32 {
        let m = &mut self.meta[b as usize];
        if !m.touched {
            m.touched = true;
            self.touched += 1;
        }
        if m.refs == 0 {
            self.used += 1;
            if m.entry.is_some() {
                self.lru.remove(&m.tick);
            }
        }
        m.refs += 1;
        b
    }

    /// Drops the cache entry of the least recently used block no reader is still in; returns it.
    fn evict(&mut self, oldest_active: u64) -> Option<u32> {
        let (&tick, &b) = self.lru.iter().find(|(_, b)| self.meta[**b as usize].last_job < oldest_active)?;
        self.lru.remove(&tick);
        let m = &mut self.meta[b as usize];
        if let Some((_, key, _)) = m.entry.take() {
            self.by_key.remove(&key);
            self.note(key, false);
        }
        Some(b)
    }

    /// Journals a key gained or lost.
    fn note(&mut self, key: u64, added: bool) {
        let most = JOURNAL_MAX.max(2 * self.by_key.len());
        if let Some(j) = &mut self.journal {
            if j.len() >= most {
                self.journal = None;
            } else {
                j.push((key, added));
            }
        }
    }
}

/// Key changes journaled between two [`KvPool::take_key_changes`], at most (or twice the keys
/// held, when more: a snapshot goes through the journal too).
const JOURNAL_MAX: usize = 1 << 16;

/// Changes to the prefix-cache keys a pool holds, for a router's index: apply `dropped`, then
/// `added`. With `reset`, what the reader knew of the pool's keys is void: `added` starts a
/// snapshot of them (continued by the next takes' `added` when it is longer than one take).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyChanges {
    pub reset: bool,
    pub added: Vec<u64>,
    pub dropped: Vec<u64>,
}

/// The pool's blocks by use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvCounts {
    /// The most blocks the pool may hold.
    pub total: usize,
    /// Held by sequences.
    pub used: usize,
    /// Held only by the prefix cache (given to a new sequence that starts with their tokens,
    /// else reclaimed, least recently used first).
    pub cached: usize,
}

/// The pool.
pub struct KvPool {
    shape: KvShape,
    /// Whether the pool keeps the blocks' memory (the CPU runtime's), or only hands out their
    /// ids (Candle's parts keep keys and values in device tensors indexed by them).
    host: bool,
    /// `[layer][slab]` for keys, then values.
    k: Vec<Box<[AtomicPtr<u8>]>>,
    v: Vec<Box<[AtomicPtr<u8>]>>,
    slabs: AtomicUsize,
    max_blocks: AtomicUsize,
    free: Mutex<Free>,
    grow: Mutex<()>,
    /// The seed of prefix-cache keys ([`gantry_core::prefix::model_seed`]).
    seed: AtomicU64,
    /// Blocks new sequences looked up in the prefix cache, and found.
    looked_up: AtomicU64,
    hits: AtomicU64,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvPool({:?}, {} slabs)", self.shape, self.slabs.load(Ordering::Relaxed))
    }
}

impl KvPool {
    /// A pool of at most `max_blocks` blocks (taken as first needed).
    pub fn new(shape: KvShape, max_blocks: usize) -> Arc<KvPool> {
        Self::make(shape, max_blocks, true)
    }

    /// A pool that hands out block ids, counts them and keeps the prefix cache, for keys and
    /// values stored elsewhere (a device's tensors, position `b * BLOCK_TOKENS + p` for
    /// position `p` of block `b`); [`KvPool::read`] and [`KvPool::write`] are not for it.
    pub fn ids_only(shape: KvShape, max_blocks: usize) -> Arc<KvPool> {
        Self::make(shape, max_blocks, false)
    }

    fn make(shape: KvShape, max_blocks: usize, host: bool) -> Arc<KvPool> {
        let table = || (0..MAX_SLABS).map(|_| AtomicPtr::new(std::ptr::null_mut())).collect::<Box<[_]>>();
        Arc::new(KvPool {
            shape,
            host,
            k: (0..shape.layers).map(|_| table()).collect(),
            v: (0..shape.layers).map(|_| table()).collect(),
            slabs: AtomicUsize::new(0),
            max_blocks: AtomicUsize::new(max_blocks.min(MAX_SLABS * SLAB_BLOCKS)),
            free: Mutex::new(Free::default()),
            grow: Mutex::new(()),
            seed: AtomicU64::new(prefix::model_seed("")),
            looked_up: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Free> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// The most blocks the pool may hold.
    pub fn max_blocks(&self) -> usize {
        self.max_blocks.load(Ordering::Relaxed)
    }

    /// Sets the most blocks the pool may hold (blocks in use beyond it stay until freed).
    pub fn set_max_blocks(&self, n: usize) {
        self.max_blocks.store(n.min(MAX_SLABS * SLAB_BLOCKS), Ordering::Relaxed);
    }

    /// Keys prefix-cache entries for model `model_id` (see [`gantry_core::prefix`]).
    pub fn set_model(&self, model_id: &str) {
        self.seed.store(prefix::model_seed(model_id), Ordering::Relaxed);
    }

    /// The seed of this pool's prefix-cache keys.
    pub fn seed(&self) -> u64 {
        self.seed.load(Ordering::Relaxed)
    }

    /// Blocks handed out now.
    pub fn used_blocks(&self) -> usize {
        self.lock().used
    }

    /// The pool's blocks by use.
    pub fn counts(&self) -> KvCounts {
        let free = self.lock();
        KvCounts { total: self.max_blocks(), used: free.used, cached: free.lru.len() }
    }

    /// Blocks sequences could take: free ones and those only the cache holds (counting those a
    /// straggler thread may still read for a moment: [`KvPool::alloc`] waits for them).
    pub fn available(&self) -> usize {
        self.max_blocks().saturating_sub(self.lock().used)
    }

    /// Whether blocks the pool could hand out are held back only for stragglers of jobs as old
    /// as `oldest_active` or newer (they come back when those threads leave their jobs).
    pub fn held_for_readers(&self, oldest_active: u64) -> bool {
        let free = self.lock();
        !free.limbo.is_empty() || free.lru.values().any(|&b| free.meta[b as usize].last_job >= oldest_active)
    }

    /// (blocks looked up in the prefix cache, blocks found) since the pool was made.
    pub fn prefix_stats(&self) -> (u64, u64) {
        (self.looked_up.load(Ordering::Relaxed), self.hits.load(Ordering::Relaxed))
    }

    /// Bytes of memory the pool holds (its slabs; for an [`KvPool::ids_only`] pool, what the
    /// blocks it has made take where they are stored).
    pub fn allocated_bytes(&self) -> usize {
        self.slabs.load(Ordering::Acquire) * SLAB_BLOCKS * self.shape.bytes_per_block()
    }

    /// Bytes of the distinct blocks sequences have held: the part of [`KvPool::allocated_bytes`]
    /// that has been written, so is resident (a slab's untouched pages are not).
    pub fn touched_bytes(&self) -> usize {
        self.lock().touched * self.shape.bytes_per_block()
    }

    /// Block ids made so far: every id handed out is below it.
    pub fn blocks_made(&self) -> usize {
        self.slabs.load(Ordering::Acquire) * SLAB_BLOCKS
    }

    /// A block, if the pool has room (reclaiming the least recently used cached block when it
    /// is full); `oldest_active` is the oldest job a thread may still be reading in (blocks
    /// freed after it began are not reused yet).
    pub fn alloc(&self, oldest_active: u64) -> Option<u32> {
        let mut free = self.lock();
        free.settle(oldest_active);
        let max = self.max_blocks();
        let held = |f: &Free| f.used + f.limbo.len() + f.lru.len();
        if held(&free) < max {
            if free.ready.is_empty() {
                // No slab to grow at the table's end: then only reclaiming a block helps.
                drop(free);
                self.add_slab();
                free = self.lock();
            }
            if held(&free) < max
                && let Some(b) = free.ready.pop()
            {
                return Some(free.take(b));
            }
        }
        if free.used + free.limbo.len() >= max {
            return None;
        }
        let b = free.evict(oldest_active)?;
        Some(free.take(b))
    }

    /// Lets go of block `b`; `job` is the newest job that may have read it. A block the prefix
    /// cache keys stays, reusable, until its room is needed.
    pub fn free(&self, b: u32, job: u64) {
        let mut free = self.lock();
        let free = &mut *free;
        let Some(m) = free.meta.get_mut(b as usize) else { return };
        m.last_job = m.last_job.max(job);
        m.refs = m.refs.saturating_sub(1);
        if m.refs > 0 {
            return;
        }
        free.used = free.used.saturating_sub(1);
        if m.entry.is_some() {
            free.tick += 1;
            m.tick = free.tick;
            free.lru.insert(free.tick, b);
        } else {
            free.limbo.push((b, m.last_job));
        }
    }

    /// Records that block `b` holds the keys and values of `tokens` (a full block) after the
    /// block keyed `parent`; returns its key. A key another block has already keeps that one.
    pub fn register(&self, b: u32, parent: u64, tokens: &[u32]) -> u64 {
        let key = prefix::block_key(parent, tokens);
        let Ok(toks) = <[u32; BLOCK_TOKENS]>::try_from(tokens) else { return key };
        let mut free = self.lock();
        let free = &mut *free;
        if free.by_key.contains_key(&key) {
            return key;
        }
        if let Some(m) = free.meta.get_mut(b as usize)
            && m.entry.is_none()
        {
            m.entry = Some((parent, key, toks));
            free.by_key.insert(key, b);
            free.note(key, true);
        }
        key
    }

    /// The prefix-cache keys gained and lost since the last call, at most `max` of them (the
    /// rest wait for the next call). `resync` (a new reader), or a journal that overflowed,
    /// makes it a snapshot: `reset` and every key held, `max` at a time.
    pub fn take_key_changes(&self, max: usize, resync: bool) -> KeyChanges {
        let mut free = self.lock();
        let free = &mut *free;
        let mut out = KeyChanges::default();
        if resync || free.journal.is_none() {
            out.reset = true;
            // The snapshot, then what happens after it, through the journal.
            free.journal = Some(free.by_key.keys().map(|&k| (k, true)).collect());
        }
        let Some(j) = &mut free.journal else { return out };
        let n = j.len().min(max);
        // The net change of each key over the events taken (the last event wins), in order.
        let mut last: HashMap<u64, bool> = HashMap::with_capacity(n);
        let mut order = Vec::with_capacity(n);
        for (key, added) in j.drain(..n) {
            if last.insert(key, added).is_none() {
                order.push(key);
            }
        }
        for key in order {
            if last[&key] {
                out.added.push(key);
            } else {
                out.dropped.push(key);
            }
        }
        out
    }

    /// The cached blocks holding the longest run of leading full blocks of `tokens`, taken for a
    /// new sequence, with their keys.
    pub fn lookup(&self, tokens: &[u32]) -> (Vec<u32>, Vec<u64>) {
        let mut parent = self.seed();
        let (mut blocks, mut keys) = (Vec::new(), Vec::new());
        let mut free = self.lock();
        let wanted = tokens.len() / BLOCK_TOKENS;
        for chunk in tokens.chunks_exact(BLOCK_TOKENS) {
            let key = prefix::block_key(parent, chunk);
            let Some(&b) = free.by_key.get(&key) else { break };
            match free.meta[b as usize].entry {
                Some((p, _, toks)) if p == parent && toks[..] == chunk[..] => {}
                _ => break,
            }
            blocks.push(free.take(b));
            keys.push(key);
            parent = key;
        }
        drop(free);
        self.looked_up.fetch_add(wanted as u64, Ordering::Relaxed);
        self.hits.fetch_add(blocks.len() as u64, Ordering::Relaxed);
        (blocks, keys)
    }

    /// Allocates one more slab for every layer, putting its blocks on the ready list.
    fn add_slab(&self) -> Option<()> {
        let _g = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        let s = self.slabs.load(Ordering::Acquire);
        if s >= MAX_SLABS {
            return None;
        }
        let bytes = SLAB_BLOCKS * self.shape.block_bytes();
        for l in (0..self.shape.layers).filter(|_| self.host) {
            for table in [&self.k, &self.v] {
                let slab: Box<[u8]> = vec![0u8; bytes].into_boxed_slice();
                table[l][s].store(Box::into_raw(slab).cast::<u8>(), Ordering::Release);
            }
        }
        self.slabs.store(s + 1, Ordering::Release);
        let mut free = self.lock();
        free.meta.resize((s + 1) * SLAB_BLOCKS, Meta::default());
        free.ready.extend((s * SLAB_BLOCKS..(s + 1) * SLAB_BLOCKS).rev().map(|b| b as u32));
        Some(())
    }

    /// Where position `p` (0..BLOCK_TOKENS) of block `b`, kv head `h`, layer `l` keeps its key
    /// (`v == false`) or value.
    #[inline]
    fn at(&self, l: usize, v: bool, b: u32, h: usize, p: usize) -> *mut u8 {
        debug_assert!(self.host, "an ids-only pool holds no keys or values");
        let (slab, idx) = (b as usize / SLAB_BLOCKS, b as usize % SLAB_BLOCKS);
        let table = if v { &self.v } else { &self.k };
        let base = table[l][slab].load(Ordering::Acquire);
        let elem = self.shape.dtype.size();
        let off = ((idx * self.shape.kv_heads + h) * BLOCK_TOKENS + p) * self.shape.head_dim * elem;
        // SAFETY: `b` was handed out by this pool, so its slab exists and the offset is
        // within it.
        unsafe { base.add(off) }
    }

    /// Writes one position's key or value for head `h`.
    ///
    /// # Safety
    /// Block `b` belongs to the caller's sequence and no other thread writes this position.
    pub unsafe fn write(&self, l: usize, v: bool, b: u32, h: usize, p: usize, x: &[f32]) {
        let dst = self.at(l, v, b, h, p);
        let d = self.shape.head_dim;
        // SAFETY (caller): the position is the caller's alone; `d` elements fit the slot.
        unsafe {
            match self.shape.dtype {
                KvDtype::F32 => std::ptr::copy_nonoverlapping(x.as_ptr(), dst.cast::<f32>(), d),
                KvDtype::F16 => {
                    let out = std::slice::from_raw_parts_mut(dst.cast::<f16>(), d);
                    for (o, &v) in out.iter_mut().zip(x) {
                        *o = f16::from_f32(v);
                    }
                }
            }
        }
    }

    /// One position's key or value for head `h`.
    #[inline]
    pub fn read(&self, l: usize, v: bool, b: u32, h: usize, p: usize) -> KvRow<'_> {
        let at = self.at(l, v, b, h, p);
        let d = self.shape.head_dim;
        // SAFETY: a handed-out block's position, written before any job that reads it (the
        // caller's sequence wrote it in an earlier operation or step); slabs never move.
        unsafe {
            match self.shape.dtype {
                KvDtype::F32 => KvRow::F32(std::slice::from_raw_parts(at.cast::<f32>(), d)),
                KvDtype::F16 => KvRow::F16(std::slice::from_raw_parts(at.cast::<f16>(), d)),
            }
        }
    }
}

/// A stored key or value.
#[derive(Debug, Clone, Copy)]
pub enum KvRow<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl Drop for KvPool {
    fn drop(&mut self) {
        let bytes = SLAB_BLOCKS * self.shape.block_bytes();
        for table in self.k.iter().chain(self.v.iter()) {
            for p in table.iter() {
                let p = p.load(Ordering::Acquire);
                if !p.is_null() {
                    // SAFETY: made by `Box::into_raw` of a `[u8]` of `bytes` in `add_slab`.
                    drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, bytes)) });
                }
            }
        }
    }
}

// SAFETY: the slab pointers are set once (under `grow`) and read atomically; what they point
// to is written by one thread per position under the callers' contracts.
unsafe impl Send for KvPool {}
// SAFETY: as above.
unsafe impl Sync for KvPool {}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> KvShape {
        KvShape { layers: 2, kv_heads: 3, head_dim: 8, dtype: KvDtype::F16 }
    }

    #[test]
    fn blocks_are_reused_only_after_the_jobs_that_read_them() {
        let pool = KvPool::new(shape(), 64);
        let a = pool.alloc(u64::MAX).unwrap();
        assert_eq!(pool.used_blocks(), 1);
        pool.free(a, 5);
        // A straggler is still in job 5: the block waits in limbo (others come from the slab).
        let b = pool.alloc(5).unwrap();
        assert_ne!(a, b);
        // Nobody is in job 5 any more: it comes back.
        let mut got = Vec::new();
        while let Some(x) = pool.alloc(6) {
            got.push(x);
        }
        assert!(got.contains(&a));
        assert_eq!(got.len() + 1, 64, "at most max_blocks");
    }

    #[test]
    fn positions_keep_what_was_written() {
        let pool = KvPool::new(shape(), 128);
        let ids: Vec<u32> = (0..3).map(|_| pool.alloc(u64::MAX).unwrap()).collect();
        for (i, &b) in ids.iter().enumerate() {
            for h in 0..3 {
                for p in [0, 7, 15] {
                    let x: Vec<f32> = (0..8).map(|j| (i * 100 + h * 10 + p + j) as f32).collect();
                    // SAFETY: the blocks are this test's.
                    unsafe { pool.write(1, true, b, h, p, &x) };
                    match pool.read(1, true, b, h, p) {
                        KvRow::F16(r) => assert_eq!(r.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), x),
                        KvRow::F32(_) => unreachable!(),
                    }
                }
            }
        }
        assert_eq!(pool.allocated_bytes(), 64 * shape().bytes_per_block());
    }

    #[test]
    fn a_filled_block_is_found_by_its_tokens_and_shared() {
        let pool = KvPool::new(shape(), 4);
        pool.set_model("m");
        let tokens: Vec<u32> = (0..40).collect();
        let a = pool.alloc(u64::MAX).unwrap();
        let b = pool.alloc(u64::MAX).unwrap();
        let k0 = pool.register(a, pool.seed(), &tokens[..16]);
        pool.register(b, k0, &tokens[16..32]);
        // A second sequence with the same first 40 tokens finds both full blocks.
        let (found, keys) = pool.lookup(&tokens);
        assert_eq!(found, vec![a, b]);
        assert_eq!(keys, gantry_core::prefix::block_keys(gantry_core::prefix::model_seed("m"), &tokens, 16));
        assert_eq!(pool.counts(), KvCounts { total: 4, used: 2, cached: 0 });
        // Another second block: only the first is shared.
        let mut other = tokens.clone();
        other[20] = 7;
        let (found, _) = pool.lookup(&other);
        assert_eq!(found, vec![a]);
        assert_eq!(pool.prefix_stats(), (4, 3));
        // Both sequences end: the blocks stay cached, not used.
        for blk in [a, b, a, b, a] {
            pool.free(blk, 0);
        }
        assert_eq!(pool.counts(), KvCounts { total: 4, used: 0, cached: 2 });
        assert_eq!(pool.lookup(&tokens).0, vec![a, b]);
    }

    #[test]
    fn a_full_pool_reclaims_the_least_recently_used_cached_block() {
        let pool = KvPool::new(shape(), 3);
        let seqs: Vec<Vec<u32>> = (0..3).map(|s| (0..16).map(|t| s * 100 + t).collect()).collect();
        let blocks: Vec<u32> = seqs
            .iter()
            .map(|toks| {
                let b = pool.alloc(u64::MAX).unwrap();
                pool.register(b, pool.seed(), toks);
                b
            })
            .collect();
        // Freed in the order 1, 0, 2: block 1 is the least recently used.
        for i in [1, 0, 2] {
            pool.free(blocks[i], 0);
        }
        assert_eq!(pool.counts().cached, 3);
        assert_eq!(pool.available(), 3);
        let got = pool.alloc(u64::MAX).unwrap();
        assert_eq!(got, blocks[1]);
        assert!(pool.lookup(&seqs[1]).0.is_empty(), "its entry went with it");
        assert_eq!(pool.lookup(&seqs[0]).0, vec![blocks[0]]);
        // A block a straggler of job 9 may still read is not reclaimed before that job ends.
        pool.free(blocks[0], 9);
        assert_eq!(pool.alloc(9), Some(blocks[2]));
        assert_eq!(pool.alloc(9), None);
        assert_eq!(pool.alloc(10), Some(blocks[0]));
    }

    #[test]
    fn key_changes_are_a_snapshot_then_the_net_changes_in_bounded_takes() {
        let pool = KvPool::new(shape(), 4);
        let seqs: Vec<Vec<u32>> = (0..4).map(|s| (0..16).map(|t| s * 100 + t).collect()).collect();
        let mut key_of = Vec::new();
        let mut blocks = Vec::new();
        for toks in &seqs[..3] {
            let b = pool.alloc(u64::MAX).unwrap();
            key_of.push(pool.register(b, pool.seed(), toks));
            blocks.push(b);
        }
        // A new reader gets every key held, `max` at a time, the first take marked `reset`.
        let first = pool.take_key_changes(2, true);
        assert!(first.reset);
        assert_eq!(first.added.len(), 2);
        let rest = pool.take_key_changes(2, false);
        assert!(!rest.reset);
        let mut all: Vec<u64> = first.added.iter().chain(&rest.added).copied().collect();
        all.sort_unstable();
        let mut want = key_of.clone();
        want.sort_unstable();
        assert_eq!(all, want);
        assert_eq!(pool.take_key_changes(2, false), KeyChanges::default());
        // Block 0 freed and reclaimed for a new sequence (its key lost), a fourth registered:
        // the net changes, in order.
        for &b in &blocks {
            pool.free(b, 0);
        }
        let b = pool.alloc(u64::MAX).unwrap();
        let b2 = pool.alloc(u64::MAX).unwrap();
        assert_eq!((b, b2), (3, blocks[0]), "the never-used block first, then the least recently freed");
        let k4 = pool.register(b2, pool.seed(), &seqs[3]);
        let got = pool.take_key_changes(100, false);
        assert_eq!(got, KeyChanges { reset: false, added: vec![k4], dropped: vec![key_of[0]] });
        // Every cached block reclaimed (three keys lost), then one of them filled again with
        // the same tokens: a key lost and gained again within one take is a net gain.
        pool.free(b2, 0);
        pool.free(b, 0);
        let all = (0..4).map(|_| pool.alloc(u64::MAX).unwrap()).collect::<Vec<_>>();
        assert_eq!(pool.register(all[0], pool.seed(), &seqs[1]), key_of[1]);
        let mut changes = pool.take_key_changes(100, false);
        changes.dropped.sort_unstable();
        let mut lost = vec![key_of[2], k4];
        lost.sort_unstable();
        assert_eq!(changes, KeyChanges { reset: false, added: vec![key_of[1]], dropped: lost });
        // An overflowing journal turns into a snapshot.
        pool.lock().journal = None;
        assert!(pool.take_key_changes(100, false).reset);
    }

    #[test]
    fn a_colliding_key_is_a_miss_not_a_wrong_block() {
        let pool = KvPool::new(shape(), 2);
        let toks: Vec<u32> = (0..16).collect();
        let b = pool.alloc(u64::MAX).unwrap();
        let key = pool.register(b, pool.seed(), &toks);
        // Forge another block's entry under the same key, as a hash collision would.
        {
            let mut free = pool.lock();
            free.meta[b as usize].entry = Some((pool.seed(), key, [9; BLOCK_TOKENS]));
        }
        assert!(pool.lookup(&toks).0.is_empty());
    }
}
