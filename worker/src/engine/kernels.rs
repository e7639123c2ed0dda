//! CPU matrix kernels for GGML types Candle has no fast kernel for (Q4_1, Q5_0).
//!
//! They follow ggml's arithmetic: activations are quantized per 32-value block to 8 bits
//! (Q8_1 for Q4_1, Q8_0 for Q5_0, scales rounded to f16 as ggml stores them), integer dot
//! products per block, then scaled — so results match llama.cpp's up to summation order, and
//! the weights stay as compact as in the file (no repacking to Q8_0). On x86-64 with AVX2/FMA
//! (Gantry's build target) the inner products use 256-bit integer multiply-adds; elsewhere a
//! portable loop computes the same values.

#![allow(unsafe_code)] // SIMD intrinsics and disjoint parallel writes: see SAFETY notes.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use half::f16;

/// Values per quantization block.
const QK: usize = 32;

/// A stored matrix type this module computes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `x = d·q + m`, 4-bit `q`; 20 bytes per block.
    Q4_1,
    /// `x = d·(q − 16)`, 5-bit `q`; 22 bytes per block.
    Q5_0,
}

impl Kind {
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_1 => 20,
            Kind::Q5_0 => 22,
        }
    }
}

/// One weight block, unpacked for the kernel: the scale and offset as f32 and the 32
/// quantized values as unsigned bytes (0..15 for Q4_1, 0..31 for Q5_0) in element order.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
struct WBlock {
    q: [u8; QK],
    d: f32,
    /// Q4_1: the block minimum `m`; Q5_0: unused (0).
    m: f32,
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

/// A weight matrix `[n, k]` (`n` outputs, `k` inputs) in one of [`Kind`]'s formats.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    kind: Kind,
    n: usize,
    k: usize,
    blocks: Vec<WBlock>,
}

impl QuantMatrix {
    /// Reads a matrix from GGUF block bytes.
    pub fn from_gguf_bytes(kind: Kind, bytes: &[u8], n: usize, k: usize) -> std::result::Result<QuantMatrix, String> {
        if k % QK != 0 {
            return Err(format!("{kind:?} rows of {k} values are not whole blocks of {QK}"));
        }
        let nb = n * (k / QK);
        if bytes.len() != nb * kind.block_bytes() {
            return Err(format!("{kind:?} [{n}, {k}] needs {} bytes, got {}", nb * kind.block_bytes(), bytes.len()));
        }
        let blocks = bytes.chunks_exact(kind.block_bytes()).map(|b| unpack(kind, b)).collect();
        Ok(QuantMatrix { kind, n, k, blocks })
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<WBlock>()
    }

    /// The stored type.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.n
    }
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn unpack(kind: Kind, b: &[u8]) -> WBlock {
    let mut q = [0u8; QK];
    match kind {
        Kind::Q4_1 => {
            // d, m (f16), then 16 bytes: element j in the low nibble, j + 16 in the high one.
            for j in 0..16 {
                q[j] = b[4 + j] & 0x0F;
                q[j + 16] = b[4 + j] >> 4;
            }
            WBlock { q, d: h(b, 0), m: h(b, 2) }
        }
        Kind::Q5_0 => {
            // d (f16), 4 bytes of fifth bits, 16 bytes of nibbles.
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..16 {
                let lo = b[6 + j] & 0x0F;
                let hi = b[6 + j] >> 4;
                q[j] = lo | ((((qh >> j) & 1) as u8) << 4);
                q[j + 16] = hi | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
            WBlock { q, d: h(b, 0), m: 0.0 }
        }
    }
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
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
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

/// Σ q_w·q_a over one block, as i32.
#[inline(always)]
fn block_isum(w: &WBlock, a: &ABlock) -> i32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    {
        // SAFETY: both blocks are 32-byte aligned structs whose first field is a 32-byte
        // array, so the loads read exactly those arrays; AVX2 is enabled at compile time.
        unsafe {
            use std::arch::x86_64::*;
            let wv = _mm256_load_si256(w.q.as_ptr().cast());
            let av = _mm256_load_si256(a.q.as_ptr().cast());
            // u8 × i8 pairs summed to i16 (|15·127·2| and |31·127·2| fit), then to i32.
            let p16 = _mm256_maddubs_epi16(wv, av);
            let p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
            let s128 = _mm_add_epi32(_mm256_castsi256_si128(p32), _mm256_extracti128_si256(p32, 1));
            let s64 = _mm_add_epi32(s128, _mm_unpackhi_epi64(s128, s128));
            let s32 = _mm_add_epi32(s64, _mm_shuffle_epi32(s64, 0b01));
            _mm_cvtsi128_si32(s32)
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    {
        w.q.iter().zip(&a.q).map(|(&x, &y)| i32::from(x) * i32::from(y)).sum()
    }
}

/// The dot product of one weight row and one activation row.
#[inline(always)]
fn dot(kind: Kind, w: &[WBlock], a: &[ABlock]) -> f32 {
    let mut acc = 0f32;
    let mut offset = 0f32;
    match kind {
        Kind::Q4_1 => {
            for (w, a) in w.iter().zip(a) {
                acc += (w.d * a.d) * block_isum(w, a) as f32;
                offset += w.m * a.s;
            }
        }
        Kind::Q5_0 => {
            for (w, a) in w.iter().zip(a) {
                // Σ (q − 16)·qa = Σ q·qa − 16·Σ qa.
                acc += (w.d * a.d) * (block_isum(w, a) - 16 * a.sum) as f32;
            }
        }
    }
    acc + offset
}

/// Output columns per work item.
const COLS_PER_ITEM: usize = 8;

impl CustomOp1 for QuantMatrix {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Q4_1 => "gantry-q4_1-matmul",
            Kind::Q5_0 => "gantry-q5_0-matmul",
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
        let kind = self.kind;
        let blocks = &self.blocks;
        candle_core::utils::barrier_pool().execute_chunked(items, |range| {
            for item in range {
                let cols = item * COLS_PER_ITEM..((item + 1) * COLS_PER_ITEM).min(n);
                for j in cols {
                    let w = &blocks[j * kb..(j + 1) * kb];
                    for i in 0..m {
                        let v = dot(kind, w, &act[i * kb..(i + 1) * kb]);
                        // SAFETY: `dst` has m·n elements and outlives the pool call; each
                        // (i, j) is written by exactly one work item (items own disjoint j).
                        unsafe { *(dst_ptr as *mut f32).add(i * n + j) = v };
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

    /// Builds Q4_1 block bytes for a row of values (ggml's reference quantizer).
    fn q4_1_bytes(xs: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in xs.chunks_exact(QK) {
            let min = b.iter().copied().fold(f32::INFINITY, f32::min);
            let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
            let q = |v: f32| (((v - min) * id + 0.5) as u8).min(15);
            for j in 0..16 {
                out.push(q(b[j]) | (q(b[j + 16]) << 4));
            }
        }
        out
    }

    #[test]
    fn q4_1_matmul_matches_dequantized_math_within_activation_quantization() {
        let (n, k, m) = (24, 96, 3);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3).collect();
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 53 % 97) as f32 / 48.0 - 1.0)).collect();
        let bytes: Vec<u8> = w.chunks_exact(k).flat_map(q4_1_bytes).collect();
        let mat = QuantMatrix::from_gguf_bytes(Kind::Q4_1, &bytes, n, k).unwrap();
        // The exact product with the dequantized weights.
        let deq: Vec<f32> = mat.blocks.iter().flat_map(|b| b.q.map(|q| b.d * f32::from(q) + b.m)).collect();
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let got: Vec<Vec<f32>> = xt.apply_op1_no_bwd(&mat).unwrap().to_vec2().unwrap();
        for i in 0..m {
            for j in 0..n {
                let exact: f32 = (0..k).map(|t| x[i * k + t] * deq[j * k + t]).sum();
                assert!((got[i][j] - exact).abs() < 0.02 * (1.0 + exact.abs()), "({i},{j}): {} vs {exact}", got[i][j]);
            }
        }
    }

    #[test]
    fn q5_0_unpacks_the_fifth_bit() {
        // d = 1, qh with bit 0 and bit 16 set, nibbles 0x21 for every byte.
        let mut b = f16::from_f32(1.0).to_le_bytes().to_vec();
        b.extend_from_slice(&(1u32 | (1 << 16)).to_le_bytes());
        b.extend_from_slice(&[0x21; 16]);
        let blk = unpack(Kind::Q5_0, &b);
        assert_eq!(blk.q[0], 1 | 16);
        assert_eq!(blk.q[1], 1);
        assert_eq!(blk.q[16], 2 | 16);
        assert_eq!(blk.q[17], 2);
    }

    #[test]
    fn refuses_shapes_that_are_not_whole_blocks() {
        assert!(QuantMatrix::from_gguf_bytes(Kind::Q4_1, &[0; 20], 1, 33).is_err());
        assert!(QuantMatrix::from_gguf_bytes(Kind::Q4_1, &[0; 19], 1, 32).is_err());
    }
}
