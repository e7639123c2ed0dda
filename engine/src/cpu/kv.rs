//! The paged KV cache of a model on the CPU: keys and values in fixed blocks of
//! [`BLOCK_TOKENS`] positions, from one pool per model part; a sequence holds a table of
//! block ids. Memory is taken in slabs as blocks are first needed and never moves, so a thread
//! reading a block needs no lock. A freed block is reused only once no thread can still be
//! reading it (a straggler of an older job: see [`super::pool`]).

#![allow(unsafe_code)] // blocks are addressed through raw pointers into slabs: see SAFETY notes.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use half::f16;

/// Positions per block.
pub const BLOCK_TOKENS: usize = 16;
/// Blocks per slab (one allocation per layer for K and for V).
const SLAB_BLOCKS: usize = 64;
/// Most slabs a pool can have (the table is fixed, so readers need no lock).
const MAX_SLABS: usize = 1 << 14;

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

#[derive(Debug, Default)]
struct Free {
    /// Blocks ready for reuse.
    ready: Vec<u32>,
    /// Blocks freed after job `.1` began: reusable once no thread is in a job that old.
    limbo: Vec<(u32, u64)>,
    /// Blocks handed out in all (capacity in use).
    used: usize,
}

/// The pool.
pub struct KvPool {
    shape: KvShape,
    /// `[layer][slab]` for keys, then values.
    k: Vec<Box<[AtomicPtr<u8>]>>,
    v: Vec<Box<[AtomicPtr<u8>]>>,
    slabs: AtomicUsize,
    max_blocks: AtomicUsize,
    free: Mutex<Free>,
    grow: Mutex<()>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvPool({:?}, {} slabs)", self.shape, self.slabs.load(Ordering::Relaxed))
    }
}

impl KvPool {
    /// A pool of at most `max_blocks` blocks (taken as first needed).
    pub fn new(shape: KvShape, max_blocks: usize) -> Arc<KvPool> {
        let table = || (0..MAX_SLABS).map(|_| AtomicPtr::new(std::ptr::null_mut())).collect::<Box<[_]>>();
        Arc::new(KvPool {
            shape,
            k: (0..shape.layers).map(|_| table()).collect(),
            v: (0..shape.layers).map(|_| table()).collect(),
            slabs: AtomicUsize::new(0),
            max_blocks: AtomicUsize::new(max_blocks.min(MAX_SLABS * SLAB_BLOCKS)),
            free: Mutex::new(Free::default()),
            grow: Mutex::new(()),
        })
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

    /// Blocks handed out now.
    pub fn used_blocks(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).used
    }

    /// Bytes of memory the pool holds (its slabs).
    pub fn allocated_bytes(&self) -> usize {
        self.slabs.load(Ordering::Acquire) * SLAB_BLOCKS * self.shape.bytes_per_block()
    }

    /// A block, if the pool has room; `oldest_active` is the oldest job a thread may still be
    /// reading in (blocks freed after it began are not reused yet).
    pub fn alloc(&self, oldest_active: u64) -> Option<u32> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.ready.is_empty() && !free.limbo.is_empty() {
            let limbo = std::mem::take(&mut free.limbo);
            let (ready, still): (Vec<_>, Vec<_>) = limbo.into_iter().partition(|&(_, job)| job < oldest_active);
            free.ready.extend(ready.into_iter().map(|(b, _)| b));
            free.limbo = still;
        }
        if let Some(b) = free.ready.pop() {
            free.used += 1;
            return Some(b);
        }
        let total = self.slabs.load(Ordering::Acquire) * SLAB_BLOCKS;
        let in_limbo = free.limbo.len();
        if free.used + in_limbo >= self.max_blocks() {
            return None;
        }
        if free.used + in_limbo >= total {
            drop(free);
            self.add_slab()?;
            free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(b) = free.ready.pop() {
                free.used += 1;
                return Some(b);
            }
            return None;
        }
        None
    }

    /// Gives block `b` back; `job` is the newest job that may have read it.
    pub fn free(&self, b: u32, job: u64) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.used = free.used.saturating_sub(1);
        free.limbo.push((b, job));
    }

    /// Allocates one more slab for every layer, putting its blocks on the ready list.
    fn add_slab(&self) -> Option<()> {
        let _g = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        let s = self.slabs.load(Ordering::Acquire);
        if s >= MAX_SLABS {
            return None;
        }
        let bytes = SLAB_BLOCKS * self.shape.block_bytes();
        for l in 0..self.shape.layers {
            for table in [&self.k, &self.v] {
                let slab: Box<[u8]> = vec![0u8; bytes].into_boxed_slice();
                table[l][s].store(Box::into_raw(slab).cast::<u8>(), Ordering::Release);
            }
        }
        self.slabs.store(s + 1, Ordering::Release);
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.ready.extend((s * SLAB_BLOCKS..(s + 1) * SLAB_BLOCKS).rev().map(|b| b as u32));
        Some(())
    }

    /// Where position `p` (0..BLOCK_TOKENS) of block `b`, kv head `h`, layer `l` keeps its key
    /// (`v == false`) or value.
    #[inline]
    fn at(&self, l: usize, v: bool, b: u32, h: usize, p: usize) -> *mut u8 {
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
}
