//! CPU matrix kernels for the GGML types small models ship in (Q4_1, Q5_0, Q8_0).
//!
//! Candle has no fast CPU kernel for Q4_1 and Q5_0 (its generic ones run ~20× slower), and its
//! Q8_0 kernel reads each activation block once per output. These follow ggml's arithmetic:
//! activations are quantized per 32-value block to 8 bits (scales rounded to f16 as ggml
//! stores them), integer dot products per block, then scaled — so results match llama.cpp's up
//! to summation order, and the weights stay as compact as in the file (no repacking). Four
//! outputs are computed together so each activation block is loaded once for four weight rows;
//! in prefill the weight rows are unpacked once and reused for every token. On x86-64 with
//! AVX2/FMA (Gantry's build target) the inner products are 256-bit integer multiply-adds;
//! elsewhere a portable loop computes the same values.

#![allow(unsafe_code)] // SIMD intrinsics and disjoint parallel writes: see SAFETY notes.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use half::f16;

/// Values per quantization block.
const QK: usize = 32;
/// Output rows per work item.
const COLS_PER_ITEM: usize = 16;

/// A stored matrix type this module computes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `x = d·q + m`, 4-bit `q`; 20 bytes per block.
    Q4_1,
    /// `x = d·(q − 16)`, 5-bit `q`; 22 bytes per block.
    Q5_0,
    /// `x = d·q`, signed 8-bit `q`; 34 bytes per block.
    Q8_0,
}

impl Kind {
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_1 => 20,
            Kind::Q5_0 => 22,
            Kind::Q8_0 => 34,
        }
    }

    /// From a GGML type name.
    pub fn from_ggml(name: &str) -> Option<Kind> {
        match name {
            "Q4_1" => Some(Kind::Q4_1),
            "Q5_0" => Some(Kind::Q5_0),
            "Q8_0" => Some(Kind::Q8_0),
            _ => None,
        }
    }
}

/// An activation block quantized to 8 bits: `x ≈ d·q`, `s = d·Σq` rounded to f16 (ggml's
/// Q8_1), and `sum = Σq`.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
struct ABlock {
    q: [i8; QK],
    d: f32,
    s: f32,
    sum: i32,
}

/// A weight matrix `[n, k]` (`n` outputs, `k` inputs): the GGUF blocks exactly as stored in
/// the file, row after row.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    kind: Kind,
    n: usize,
    k: usize,
    raw: Vec<u8>,
}

impl QuantMatrix {
    /// Takes a matrix's GGUF block bytes.
    pub fn from_gguf_bytes(kind: Kind, bytes: Vec<u8>, n: usize, k: usize) -> std::result::Result<QuantMatrix, String> {
        if !k.is_multiple_of(QK) {
            return Err(format!("{kind:?} rows of {k} values are not whole blocks of {QK}"));
        }
        let nb = n * (k / QK);
        if bytes.len() != nb * kind.block_bytes() {
            return Err(format!("{kind:?} [{n}, {k}] needs {} bytes, got {}", nb * kind.block_bytes(), bytes.len()));
        }
        Ok(QuantMatrix { kind, n, k, raw: bytes })
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.raw.len()
    }

    /// The stored type.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Output features (rows).
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features (columns).
    pub fn cols(&self) -> usize {
        self.k
    }

    fn block(&self, b: usize) -> &[u8] {
        let bs = self.kind.block_bytes();
        &self.raw[b * bs..(b + 1) * bs]
    }

    fn scale(&self, b: usize) -> f32 {
        let blk = self.block(b);
        f16::from_le_bytes([blk[0], blk[1]]).to_f32()
    }

    /// Q4_1's block minimum.
    fn min(&self, b: usize) -> f32 {
        let blk = self.block(b);
        f16::from_le_bytes([blk[2], blk[3]]).to_f32()
    }

    /// Block `b`'s values as bytes: unsigned 0..15 (Q4_1), 0..31 (Q5_0); Q8_0's signed values
    /// reinterpreted.
    fn block_values(&self, b: usize) -> [u8; QK] {
        let blk = self.block(b);
        let mut q = [0u8; QK];
        match self.kind {
            Kind::Q8_0 => q.copy_from_slice(&blk[2..34]),
            Kind::Q4_1 | Kind::Q5_0 => {
                let nib = if self.kind == Kind::Q4_1 { &blk[4..20] } else { &blk[6..22] };
                for j in 0..16 {
                    q[j] = nib[j] & 0x0F;
                    q[j + 16] = nib[j] >> 4;
                }
                if self.kind == Kind::Q5_0 {
                    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                    for (j, v) in q.iter_mut().enumerate() {
                        *v |= (((qh >> j) & 1) as u8) << 4;
                    }
                }
            }
        }
        q
    }

    /// Dequantized block `b`.
    fn dequantize_block(&self, b: usize) -> [f32; QK] {
        let d = self.scale(b);
        let q = self.block_values(b);
        match self.kind {
            Kind::Q4_1 => {
                let m = self.min(b);
                q.map(|v| d * f32::from(v) + m)
            }
            Kind::Q5_0 => q.map(|v| d * (f32::from(v) - 16.0)),
            Kind::Q8_0 => q.map(|v| d * f32::from(v as i8)),
        }
    }

    /// Dequantized rows `ids` (an embedding lookup), `ids.len() × k` values.
    pub fn rows_f32(&self, ids: &[u32]) -> std::result::Result<Vec<f32>, String> {
        let kb = self.k / QK;
        let mut out = Vec::with_capacity(ids.len() * self.k);
        for &id in ids {
            let r = id as usize;
            if r >= self.n {
                return Err(format!("row {r} is outside the matrix's {}", self.n));
            }
            for b in r * kb..(r + 1) * kb {
                out.extend_from_slice(&self.dequantize_block(b));
            }
        }
        Ok(out)
    }

    /// A row unpacked for reuse across activation rows: values, scales, and Q4_1 minimums.
    fn unpack_row(&self, j: usize, row: &mut UnpackedRow) {
        let kb = self.k / QK;
        #[cfg(all(target_arch = "x86_64", target_feature = "sse"))]
        {
            // The next rows stream from L3 or memory: ask for them early.
            let ahead = self.raw.as_ptr().wrapping_add((j + 8) * kb * self.kind.block_bytes());
            // SAFETY: prefetching never faults, whatever the address.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ahead.cast()) };
        }
        row.values.clear();
        row.scales.clear();
        row.mins.clear();
        for b in j * kb..(j + 1) * kb {
            let mut v = self.block_values(b);
            if self.kind == Kind::Q5_0 {
                // Stored as q − 16 (signed), so prefill needs no per-token offset.
                v = v.map(|q| (q as i8 - 16) as u8);
            }
            row.values.push(v);
            row.scales.push(self.scale(b));
            row.mins.push(if self.kind == Kind::Q4_1 { self.min(b) } else { 0.0 });
        }
    }

    /// Weight row `j` · one activation row (portable).
    #[cfg_attr(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"), allow(dead_code))]
    fn dot_portable(&self, j: usize, a: &[ABlock]) -> f32 {
        let kb = self.k / QK;
        let mut acc = 0f32;
        for (i, ab) in a.iter().enumerate().take(kb) {
            let b = j * kb + i;
            let q = self.block_values(b);
            let isum: i32 = match self.kind {
                Kind::Q8_0 => q.iter().zip(&ab.q).map(|(&x, &y)| i32::from(x as i8) * i32::from(y)).sum(),
                _ => q.iter().zip(&ab.q).map(|(&x, &y)| i32::from(x) * i32::from(y)).sum(),
            };
            let d = self.scale(b) * ab.d;
            acc += match self.kind {
                Kind::Q4_1 => d * isum as f32 + self.min(b) * ab.s,
                Kind::Q5_0 => d * (isum - 16 * ab.sum) as f32,
                Kind::Q8_0 => d * isum as f32,
            };
        }
        acc
    }

    /// Weight row `j` · one activation row.
    fn dot(&self, j: usize, a: &[ABlock]) -> f32 {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        {
            // SAFETY: AVX2 and FMA are enabled at compile time; the row's blocks lie within
            // `raw`, which `from_gguf_bytes` checked holds n·k/32 blocks.
            unsafe { simd::dot(self, j, a) }
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
        {
            self.dot_portable(j, a)
        }
    }

    /// An unpacked weight row · activation rows `a` (1 to 4 of them), into `out`.
    fn dot_unpacked(&self, row: &UnpackedRow, a: &[&[ABlock]], out: &mut [f32; 4]) {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
        {
            // SAFETY: AVX2 and FMA are enabled at compile time; `row` and every `a[r]` hold
            // the same number of blocks.
            unsafe { simd::dot_unpacked(self.kind, row, a, out) }
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")))]
        {
            for (r, ar) in a.iter().enumerate() {
                let mut acc = 0f32;
                for (i, ab) in ar.iter().enumerate() {
                    let q = &row.values[i];
                    let isum: i32 = match self.kind {
                        Kind::Q4_1 => q.iter().zip(&ab.q).map(|(&x, &y)| i32::from(x) * i32::from(y)).sum(),
                        Kind::Q5_0 | Kind::Q8_0 => {
                            q.iter().zip(&ab.q).map(|(&x, &y)| i32::from(x as i8) * i32::from(y)).sum()
                        }
                    };
                    let d = row.scales[i] * ab.d;
                    acc += match self.kind {
                        Kind::Q4_1 => d * isum as f32 + row.mins[i] * ab.s,
                        Kind::Q5_0 | Kind::Q8_0 => d * isum as f32,
                    };
                }
                out[r] = acc;
            }
        }
    }
}

/// One weight row, unpacked for prefill: unsigned values for Q4_1, signed (`q − 16`) for
/// Q5_0, signed for Q8_0.
#[derive(Debug, Default)]
struct UnpackedRow {
    values: Vec<[u8; QK]>,
    scales: Vec<f32>,
    mins: Vec<f32>,
}

/// Rounds through f16, as ggml stores block scales.
fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Quantizes one row of activations to 8-bit blocks (ggml's `quantize_row_q8_1` / `_q8_0`).
fn quantize_row(x: &[f32], out: &mut [ABlock]) {
    for (blk, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in blk.q.iter_mut().zip(xs) {
            // Round half to even, as the SIMD path of ggml does.
            let r = (v * id).round_ties_even() as i32;
            *q = r.clamp(-127, 127) as i8;
            sum += r;
        }
        blk.d = f16_round(d);
        blk.s = f16_round(d * sum as f32);
        blk.sum = sum;
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma"))]
mod simd {
    use super::{ABlock, Kind, QK, QuantMatrix, UnpackedRow};
    use std::arch::x86_64::*;

    /// 32 bytes of values from 16 bytes of nibbles at `p`: low nibbles, then high nibbles.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
        // SAFETY (caller): `p` points at 16 readable bytes; unaligned load.
        let x = unsafe { _mm_loadu_si128(p.cast()) };
        let both = _mm256_set_m128i(_mm_srli_epi16(x, 4), x);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// 0x10 in byte `j` where bit `j` of `bits` is set.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn fifth_bits(bits: u32) -> __m256i {
        // Broadcast the word, move byte `j / 8` of it into byte `j`, test bit `j % 8`.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0),
        );
        let mask = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// Σ w·a over 32 bytes as 8 f32 lanes; `signed` for Q8_0's i8 weights.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn products(w: __m256i, a: __m256i, signed: bool) -> __m256 {
        let p16 = if signed {
            // maddubs takes u8 × i8: move the weights' signs onto the activations.
            _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w))
        } else {
            _mm256_maddubs_epi16(w, a)
        };
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(acc: __m256) -> f32 {
        let s128 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s64 = _mm_add_ps(s128, _mm_movehl_ps(s128, s128));
        let s32 = _mm_add_ss(s64, _mm_shuffle_ps(s64, s64, 1));
        _mm_cvtss_f32(s32)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn load_act(ab: &ABlock) -> __m256i {
        // SAFETY: `ab.q` is a 32-byte aligned array of 32 bytes.
        unsafe { _mm256_load_si256(ab.q.as_ptr().cast()) }
    }

    /// One block's contribution: `(scale·Σ w·a lanes, scalar offset)`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block(kind: Kind, p: *const u8, ab: &ABlock, acc: __m256) -> (__m256, f32) {
        // SAFETY (caller): `p` points at one whole block of `kind`.
        unsafe {
            let d = half::f16::from_bits(std::ptr::read_unaligned(p.cast::<u16>())).to_f32() * ab.d;
            let av = load_act(ab);
            match kind {
                Kind::Q4_1 => {
                    let m = half::f16::from_bits(std::ptr::read_unaligned(p.add(2).cast::<u16>())).to_f32();
                    (_mm256_fmadd_ps(_mm256_set1_ps(d), products(unpack_nibbles(p.add(4)), av, false), acc), m * ab.s)
                }
                Kind::Q5_0 => {
                    let qh = std::ptr::read_unaligned(p.add(2).cast::<u32>());
                    let w = _mm256_or_si256(unpack_nibbles(p.add(6)), fifth_bits(qh));
                    (_mm256_fmadd_ps(_mm256_set1_ps(d), products(w, av, false), acc), -16.0 * d * ab.sum as f32)
                }
                Kind::Q8_0 => {
                    let w = _mm256_loadu_si256(p.add(2).cast());
                    (_mm256_fmadd_ps(_mm256_set1_ps(d), products(w, av, true), acc), 0.0)
                }
            }
        }
    }

    /// Blocks ahead to prefetch (10–17 KiB): measured on SmolLM2 decode, 1 thread, 29.6
    /// tokens/s without prefetching, 39.6 at 16 blocks, 46.3 at 64, 54.9 at 512, 52.4 at 1024.
    const PREFETCH_BLOCKS: usize = 512;

    /// Weight row `j` · one activation row, two blocks at a time into two accumulators.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(m: &QuantMatrix, j: usize, a: &[ABlock]) -> f32 {
        let kb = m.k / QK;
        let bs = m.kind.block_bytes();
        debug_assert!((j + 1) * kb * bs <= m.raw.len() && a.len() >= kb);
        // SAFETY (caller): the row's kb blocks lie within `raw`.
        let row = unsafe { m.raw.as_ptr().add(j * kb * bs) };
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut off0, mut off1) = (0f32, 0f32);
        let mut i = 0;
        while i + 1 < kb {
            // Prefetch a few cache lines ahead: the matrix streams from L3 or memory and the
            // hardware prefetcher alone leaves the loads waiting.
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add((i + PREFETCH_BLOCKS) * bs).cast());
            // SAFETY: blocks i and i + 1 are within the row.
            unsafe {
                let (a0, o0) = block(m.kind, row.add(i * bs), &a[i], acc0);
                let (a1, o1) = block(m.kind, row.add((i + 1) * bs), &a[i + 1], acc1);
                (acc0, acc1) = (a0, a1);
                off0 += o0;
                off1 += o1;
            }
            i += 2;
        }
        if i < kb {
            // SAFETY: block i is within the row.
            let (a0, o0) = unsafe { block(m.kind, row.add(i * bs), &a[i], acc0) };
            acc0 = a0;
            off0 += o0;
        }
        hsum(_mm256_add_ps(acc0, acc1)) + off0 + off1
    }

    /// An unpacked weight row · up to four activation rows, one accumulator each.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_unpacked(kind: Kind, row: &UnpackedRow, a: &[&[ABlock]], out: &mut [f32; 4]) {
        let signed = kind != Kind::Q4_1;
        let n = a.len();
        let rows: [&[ABlock]; 4] = [a[0], a[1.min(n - 1)], a[2.min(n - 1)], a[3.min(n - 1)]];
        let (mut acc0, mut acc1, mut acc2, mut acc3) =
            (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
        for (i, v) in row.values.iter().enumerate() {
            // SAFETY: `v` is 32 readable bytes; unaligned load.
            let w = unsafe { _mm256_loadu_si256(v.as_ptr().cast()) };
            let d = row.scales[i];
            let (b0, b1, b2, b3) = (&rows[0][i], &rows[1][i], &rows[2][i], &rows[3][i]);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d * b0.d), products(w, load_act(b0), signed), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d * b1.d), products(w, load_act(b1), signed), acc1);
            acc2 = _mm256_fmadd_ps(_mm256_set1_ps(d * b2.d), products(w, load_act(b2), signed), acc2);
            acc3 = _mm256_fmadd_ps(_mm256_set1_ps(d * b3.d), products(w, load_act(b3), signed), acc3);
        }
        let sums = [hsum(acc0), hsum(acc1), hsum(acc2), hsum(acc3)];
        for r in 0..n {
            // Q4_1's minimums: Σ_i m_i · s_i (s = d·Σq of the activation block).
            let offset: f32 =
                if kind == Kind::Q4_1 { row.mins.iter().zip(rows[r]).map(|(m, ab)| m * ab.s).sum() } else { 0.0 };
            out[r] = sums[r] + offset;
        }
    }
}

impl CustomOp1 for QuantMatrix {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Q4_1 => "gantry-q4_1-matmul",
            Kind::Q5_0 => "gantry-q5_0-matmul",
            Kind::Q8_0 => "gantry-q8_0-matmul",
        }
    }

    /// `x · Wᵀ` for `x` `[…, k]` f32.
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{} takes f32 activations", self.name());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{} needs contiguous activations", self.name());
        };
        let x = &data[start..end];
        let dims = layout.shape().dims();
        let Some((&k, batch)) = dims.split_last() else { candle_core::bail!("{}: scalar input", self.name()) };
        if k != self.k {
            candle_core::bail!("{}: input has {k} features, the matrix {}", self.name(), self.k);
        }
        let m = batch.iter().product::<usize>();
        let kb = k / QK;
        let mut act = vec![ABlock { q: [0; QK], d: 0.0, s: 0.0, sum: 0 }; m * kb];
        for (row, out) in x.chunks_exact(k).zip(act.chunks_exact_mut(kb)) {
            quantize_row(row, out);
        }
        let n = self.n;
        let mut dst = vec![0f32; m * n];
        let dst_ptr = dst.as_mut_ptr() as usize;
        let items = n.div_ceil(COLS_PER_ITEM);
        candle_core::utils::barrier_pool().execute_chunked(items, |range| {
            let mut row = UnpackedRow::default();
            let mut out = [0f32; 4];
            for item in range {
                for j in item * COLS_PER_ITEM..((item + 1) * COLS_PER_ITEM).min(n) {
                    // SAFETY (for the writes below): `dst` has m·n elements and outlives the
                    // pool call; each (i, j) is written by exactly one work item.
                    let put = |i: usize, v: f32| unsafe { *(dst_ptr as *mut f32).add(i * n + j) = v };
                    if m == 1 {
                        put(0, self.dot(j, &act[..kb]));
                        continue;
                    }
                    // Prefill: unpack the weight row once, then four tokens at a time.
                    self.unpack_row(j, &mut row);
                    for i0 in (0..m).step_by(4) {
                        let rows: Vec<&[ABlock]> = (i0..(i0 + 4).min(m)).map(|i| &act[i * kb..(i + 1) * kb]).collect();
                        self.dot_unpacked(&row, &rows, &mut out);
                        for (r, v) in out.iter().enumerate().take(rows.len()) {
                            put(i0 + r, *v);
                        }
                    }
                }
            }
        });
        let mut out_dims = batch.to_vec();
        out_dims.push(n);
        Ok((CpuStorage::F32(dst), Shape::from(out_dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Builds GGUF block bytes for a row of values with ggml's reference quantizers.
    fn quantize(kind: Kind, xs: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in xs.chunks_exact(QK) {
            let min = b.iter().copied().fold(f32::INFINITY, f32::min);
            let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
            match kind {
                Kind::Q4_1 => {
                    let d = (max - min) / 15.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                    let q = |v: f32| (((v - min) * id + 0.5) as u8).min(15);
                    out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
                }
                Kind::Q5_0 => {
                    let d = -amax / 16.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    let q = |v: f32| ((v * id + 16.5) as u8).min(31);
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    let qh: u32 = (0..32).map(|j| u32::from(q(b[j]) >> 4) << j).sum();
                    out.extend_from_slice(&qh.to_le_bytes());
                    out.extend((0..16).map(|j| (q(b[j]) & 15) | ((q(b[j + 16]) & 15) << 4)));
                }
                Kind::Q8_0 => {
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
                }
            }
        }
        out
    }

    fn check(kind: Kind, m: usize) {
        let (n, k) = (22, 96);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3).collect();
        let x: Vec<f32> = (0..m * k).map(|i| (i * 53 % 97) as f32 / 48.0 - 1.0).collect();
        let bytes: Vec<u8> = w.chunks_exact(k).flat_map(|r| quantize(kind, r)).collect();
        let mat = QuantMatrix::from_gguf_bytes(kind, bytes, n, k).unwrap();
        let deq = mat.rows_f32(&(0..n as u32).collect::<Vec<_>>()).unwrap();
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let got: Vec<Vec<f32>> = xt.apply_op1_no_bwd(&mat).unwrap().to_vec2().unwrap();
        for i in 0..m {
            for j in 0..n {
                let exact: f32 = (0..k).map(|t| x[i * k + t] * deq[j * k + t]).sum();
                // 8-bit activations: about 0.4% of each product.
                assert!(
                    (got[i][j] - exact).abs() < 0.02 * (1.0 + exact.abs()),
                    "{kind:?} m={m} ({i},{j}): {} vs {exact}",
                    got[i][j]
                );
            }
        }
    }

    #[test]
    fn every_kind_matches_dequantized_math_in_decode_and_prefill() {
        for kind in [Kind::Q4_1, Kind::Q5_0, Kind::Q8_0] {
            for m in [1, 2, 5, 8] {
                check(kind, m);
            }
        }
    }

    #[test]
    fn the_simd_path_equals_the_portable_one() {
        for kind in [Kind::Q4_1, Kind::Q5_0, Kind::Q8_0] {
            let (n, k) = (3, 160);
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 29 % 83) as f32 / 40.0 - 1.0) * 0.5).collect();
            let mat =
                QuantMatrix::from_gguf_bytes(kind, w.chunks_exact(k).flat_map(|r| quantize(kind, r)).collect(), n, k)
                    .unwrap();
            let x: Vec<f32> = (0..k).map(|i| (i * 13 % 31) as f32 / 15.0 - 1.0).collect();
            let mut act = vec![ABlock { q: [0; QK], d: 0.0, s: 0.0, sum: 0 }; k / QK];
            quantize_row(&x, &mut act);
            for j in 0..n {
                let (a, b) = (mat.dot(j, &act), mat.dot_portable(j, &act));
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{kind:?} row {j}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn q5_0_unpacks_the_fifth_bit() {
        // d = 1, qh with bits 0, 9 and 16 set, nibbles 0x21 for every byte.
        let mut b = f16::from_f32(1.0).to_le_bytes().to_vec();
        b.extend_from_slice(&(1u32 | (1 << 9) | (1 << 16)).to_le_bytes());
        b.extend_from_slice(&[0x21; 16]);
        let mat = QuantMatrix::from_gguf_bytes(Kind::Q5_0, b, 1, 32).unwrap();
        let q = mat.block_values(0);
        assert_eq!((q[0], q[1], q[9], q[16], q[17]), (1 | 16, 1, 1 | 16, 2 | 16, 2));
    }

    #[test]
    fn embedding_rows_dequantize_and_refuse_bad_ids() {
        let w: Vec<f32> = (0..64).map(|i| i as f32 / 10.0 - 3.0).collect();
        let mat = QuantMatrix::from_gguf_bytes(Kind::Q8_0, quantize(Kind::Q8_0, &w), 2, 32).unwrap();
        let row1 = mat.rows_f32(&[1]).unwrap();
        for (a, b) in row1.iter().zip(&w[32..]) {
            assert!((a - b).abs() < 0.02, "{a} vs {b}");
        }
        assert!(mat.rows_f32(&[2]).is_err());
    }

    #[test]
    fn refuses_shapes_that_are_not_whole_blocks() {
        assert!(QuantMatrix::from_gguf_bytes(Kind::Q4_1, vec![0; 20], 1, 33).is_err());
        assert!(QuantMatrix::from_gguf_bytes(Kind::Q4_1, vec![0; 19], 1, 32).is_err());
    }
}
