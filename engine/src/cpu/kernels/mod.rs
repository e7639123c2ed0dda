//! Matrix products of the CPU runtime: weight rows (any [`Kind`]) times activation rows, for
//! one token (decode) or many (prefill, batches). Three flavors compute the very same numbers
//! (see [`super::quant`]): a portable one, AVX2, and AVX-512 with VNNI; the fastest the CPU has
//! is chosen once. Inside a flavor the micro-kernels are tiles of rows × tokens, and a tile of
//! one token is the same arithmetic as a tile of eight — so a sequence's results never depend
//! on what else is in the batch. The common 32-value formats are stored repacked, 16 rows side
//! by side ([`packed`]), one output per SIMD lane.

#![allow(unsafe_code)] // SIMD intrinsics behind runtime feature checks: see the SAFETY notes.

use std::ops::Range;
use std::sync::OnceLock;

use super::quant::{ActBlock, ActBlockK, Kind, QK, QK_K, dot32_ref, dotf_ref, dotk_ref, quantize_row_q8k};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod packed;

/// Which instructions the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Portable,
    Avx2,
    Avx512,
}

impl Flavor {
    /// The best the CPU has; `GANTRY_CPU_KERNELS=portable|avx2|avx512` picks a lower one (for
    /// comparisons). Decided once per process.
    pub fn detect() -> Flavor {
        static FLAVOR: OnceLock<Flavor> = OnceLock::new();
        *FLAVOR.get_or_init(|| {
            let best = Flavor::best();
            match std::env::var("GANTRY_CPU_KERNELS").as_deref() {
                Ok("portable") => Flavor::Portable,
                Ok("avx2") if best != Flavor::Portable => Flavor::Avx2,
                _ => best,
            }
        })
    }

    /// The best flavor this CPU can run.
    pub fn best() -> Flavor {
        #[cfg(target_arch = "x86_64")]
        {
            if avx512::available() {
                return Flavor::Avx512;
            }
            if avx2::available() {
                return Flavor::Avx2;
            }
        }
        Flavor::Portable
    }

    /// Every flavor this CPU can run (for tests).
    pub fn all_available() -> Vec<Flavor> {
        let best = Flavor::best();
        [Flavor::Portable, Flavor::Avx2, Flavor::Avx512].into_iter().filter(|f| *f as u8 <= best as u8).collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            Flavor::Portable => "portable",
            Flavor::Avx2 => "AVX2",
            Flavor::Avx512 => "AVX-512 VNNI",
        }
    }
}

/// A weight matrix `[rows, cols]` in one of the runtime's formats, rows as GGUF stores them.
#[derive(Debug, Clone)]
pub struct QMatrix {
    kind: Kind,
    rows: usize,
    cols: usize,
    /// The rows' blocks (quantized kinds), shared by clones (a tied output head is the
    /// embedding table itself).
    bytes: std::sync::Arc<Vec<u8>>,
    /// The rows' values (F32), shared likewise.
    dense: std::sync::Arc<Vec<f32>>,
}

impl QMatrix {
    /// A matrix from GGUF block bytes (quantized kinds).
    pub fn from_blocks(kind: Kind, rows: usize, cols: usize, bytes: Vec<u8>) -> Result<QMatrix, String> {
        if kind == Kind::F32 {
            let dense: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            return QMatrix::from_f32(rows, cols, dense);
        }
        let per = kind.block_values();
        if !cols.is_multiple_of(per) {
            return Err(format!("{} rows of {cols} values are not whole blocks of {per}", kind.name()));
        }
        let need = rows * (cols / per) * kind.block_bytes();
        if bytes.len() != need {
            return Err(format!("{} [{rows}, {cols}] needs {need} bytes, got {}", kind.name(), bytes.len()));
        }
        let bytes = if kind.packed() { packed::pack(kind, rows, cols, bytes) } else { bytes };
        Ok(QMatrix { kind, rows, cols, bytes: std::sync::Arc::new(bytes), dense: std::sync::Arc::default() })
    }

    /// A dense matrix from its values, row after row.
    pub fn from_f32(rows: usize, cols: usize, dense: Vec<f32>) -> Result<QMatrix, String> {
        if dense.len() != rows * cols {
            return Err(format!("F32 [{rows}, {cols}] needs {} values, got {}", rows * cols, dense.len()));
        }
        Ok(QMatrix { kind: Kind::F32, rows, cols, bytes: std::sync::Arc::default(), dense: std::sync::Arc::new(dense) })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.bytes.len() + self.dense.len() * 4
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.kind.block_values() * self.kind.block_bytes()
    }

    /// Row `r`'s bytes as GGUF stores them (rebuilt for the packed formats).
    fn gguf_row(&self, r: usize) -> std::borrow::Cow<'_, [u8]> {
        let rb = self.row_bytes();
        if self.kind.packed() {
            let mut row = vec![0u8; rb];
            packed::row_bytes(self.kind, &self.bytes, self.cols, r, &mut row);
            std::borrow::Cow::Owned(row)
        } else {
            std::borrow::Cow::Borrowed(&self.bytes[r * rb..(r + 1) * rb])
        }
    }

    /// The matrix made of rows `ids` of this one, in that order (splitting fused projections,
    /// reordering Falcon's grouped heads).
    pub fn select_rows(&self, ids: &[usize]) -> QMatrix {
        if self.kind == Kind::F32 {
            let dense: Vec<f32> =
                ids.iter().flat_map(|&r| self.dense[r * self.cols..(r + 1) * self.cols].iter().copied()).collect();
            return QMatrix {
                kind: self.kind,
                rows: ids.len(),
                cols: self.cols,
                bytes: std::sync::Arc::default(),
                dense: std::sync::Arc::new(dense),
            };
        }
        let bytes: Vec<u8> = ids.iter().flat_map(|&r| self.gguf_row(r).into_owned()).collect();
        let bytes = if self.kind.packed() { packed::pack(self.kind, ids.len(), self.cols, bytes) } else { bytes };
        QMatrix {
            kind: self.kind,
            rows: ids.len(),
            cols: self.cols,
            bytes: std::sync::Arc::new(bytes),
            dense: std::sync::Arc::default(),
        }
    }

    /// Row `r`'s values (an embedding lookup).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        if self.kind == Kind::F32 {
            out.copy_from_slice(&self.dense[r * self.cols..(r + 1) * self.cols]);
        } else {
            super::quant::dequantize_row(self.kind, &self.gguf_row(r), out);
        }
    }
}

/// Activation rows as the kernels read them, in the format of the weights they multiply: f32
/// rows, Q8 blocks (`q8`, row after row, and their `s` laid out `[block][token]`), or Q8_K.
#[derive(Debug, Clone, Copy, Default)]
pub struct ActsRef<'a> {
    pub tokens: usize,
    pub cols: usize,
    pub f32: &'a [f32],
    pub q8: &'a [ActBlock],
    pub q8_s: &'a [f32],
    pub q8k: &'a [ActBlockK],
}

/// Activation rows, quantized as a weight kind's kernels take them.
#[derive(Debug, Default)]
pub struct Acts {
    tokens: usize,
    cols: usize,
    f32: Vec<f32>,
    q8: Vec<ActBlock>,
    /// Q8 `s` laid out `[block][token]`, for the min terms of several tokens at once.
    q8_s: Vec<f32>,
    q8k: Vec<ActBlockK>,
}

impl Acts {
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The rows as the kernels read them.
    pub fn view(&self) -> ActsRef<'_> {
        ActsRef { tokens: self.tokens, cols: self.cols, f32: &self.f32, q8: &self.q8, q8_s: &self.q8_s, q8k: &self.q8k }
    }

    /// `x` (`tokens × cols`, row after row) in the format `kind`'s kernels take.
    pub fn quantize(&mut self, kind: Kind, x: &[f32], cols: usize) {
        self.cols = cols;
        self.tokens = x.len() / cols;
        match kind.act_format() {
            super::quant::ActFormat::F32 => {
                self.f32.clear();
                self.f32.extend_from_slice(x);
            }
            super::quant::ActFormat::Q8 => {
                let kb = cols / QK;
                self.q8.clear();
                self.q8.resize(self.tokens * kb, ActBlock::ZERO);
                for (row, out) in x.chunks_exact(cols).zip(self.q8.chunks_exact_mut(kb)) {
                    quantize_row_q8(row, out);
                }
                self.q8_s.clear();
                self.q8_s.resize(kb * self.tokens, 0.0);
                for t in 0..self.tokens {
                    for b in 0..kb {
                        self.q8_s[b * self.tokens + t] = self.q8[t * kb + b].s;
                    }
                }
            }
            super::quant::ActFormat::Q8K => {
                let kb = cols / QK_K;
                self.q8k.clear();
                self.q8k.resize(self.tokens * kb, ActBlockK::ZERO);
                for (row, out) in x.chunks_exact(cols).zip(self.q8k.chunks_exact_mut(kb)) {
                    quantize_row_q8k(row, out);
                }
            }
        }
    }
}

/// `out[t·ld + (r − rows.start)] = W[r] · x[t]` for rows `rows` of `w` and every token of `x`
/// (quantized for `w`'s kind), with `flavor`'s instructions.
pub fn matmul(flavor: Flavor, w: &QMatrix, x: &ActsRef<'_>, rows: Range<usize>, out: &mut [f32], ld: usize) {
    debug_assert!(rows.end <= w.rows && x.cols == w.cols);
    debug_assert!(x.tokens == 0 || out.len() >= (x.tokens - 1) * ld + rows.len());
    match (flavor, w.kind) {
        (_, Kind::F32) => matmul_f32(flavor, w, x, rows, out, ld),
        (Flavor::Portable, kind) if kind.packed() => packed::matmul_portable(kind, &w.bytes, w.cols, x, rows, out, ld),
        #[cfg(target_arch = "x86_64")]
        (Flavor::Avx2, Kind::Q4K | Kind::Q6K) => {
            // SAFETY: the flavor is only chosen when the CPU has AVX2, FMA and F16C.
            unsafe { packed::avx2_k::matmul(w.kind, &w.bytes, w.cols, x.q8k, x.tokens, rows, out, ld) }
        }
        #[cfg(target_arch = "x86_64")]
        (Flavor::Avx512, Kind::Q4K | Kind::Q6K) => {
            // SAFETY: the flavor is only chosen when the CPU has AVX-512 F/BW/VL/VNNI.
            unsafe { packed::avx512_k::matmul(w.kind, &w.bytes, w.cols, x.q8k, x.tokens, rows, out, ld) }
        }
        #[cfg(target_arch = "x86_64")]
        (Flavor::Avx2, kind) if kind.packed() => {
            // SAFETY: the flavor is only chosen when the CPU has AVX2, FMA and F16C.
            unsafe { packed::avx2::matmul(kind, &w.bytes, w.cols, x.q8, x.tokens, rows, out, ld) }
        }
        #[cfg(target_arch = "x86_64")]
        (Flavor::Avx512, kind) if kind.packed() => {
            // SAFETY: the flavor is only chosen when the CPU has AVX-512 F/BW/VL/VNNI.
            unsafe { packed::avx512::matmul(kind, &w.bytes, w.cols, x.q8, x.tokens, rows, out, ld) }
        }
        (Flavor::Portable, Kind::Q5K) => {
            let (rb, kb) = (w.row_bytes(), w.cols / QK_K);
            for t in 0..x.tokens {
                for r in rows.clone() {
                    out[t * ld + r - rows.start] =
                        dotk_ref(w.kind, &w.bytes[r * rb..(r + 1) * rb], &x.q8k[t * kb..(t + 1) * kb]);
                }
            }
        }
        (Flavor::Portable, kind) => {
            let (rb, kb) = (w.row_bytes(), w.cols / QK);
            for t in 0..x.tokens {
                for r in rows.clone() {
                    out[t * ld + r - rows.start] =
                        dot32_ref(kind, &w.bytes[r * rb..(r + 1) * rb], &x.q8[t * kb..(t + 1) * kb]);
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        (Flavor::Avx2, Kind::Q5K) => {
            // SAFETY: the flavor is only chosen when the CPU has AVX2 and FMA (`avx2::available`).
            unsafe { avx2::matmul_k(w.kind, &w.bytes, w.row_bytes(), x.q8k, w.cols / QK_K, x.tokens, rows, out, ld) }
        }
        #[cfg(target_arch = "x86_64")]
        (Flavor::Avx2, kind) => {
            // SAFETY: as above.
            unsafe {
                avx2::matmul_32(kind, &w.bytes, w.row_bytes(), x.q8, x.q8_s, w.cols / QK, x.tokens, rows, out, ld)
            }
        }
        #[cfg(target_arch = "x86_64")]
        (Flavor::Avx512, Kind::Q5K) => {
            // SAFETY: the flavor is only chosen when the CPU has AVX-512 F/BW/VL/VNNI.
            unsafe { avx512::matmul_k(w.kind, &w.bytes, w.row_bytes(), x.q8k, w.cols / QK_K, x.tokens, rows, out, ld) }
        }
        #[cfg(target_arch = "x86_64")]
        (Flavor::Avx512, kind) => {
            // SAFETY: as above.
            unsafe {
                avx512::matmul_32(kind, &w.bytes, w.row_bytes(), x.q8, x.q8_s, w.cols / QK, x.tokens, rows, out, ld)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the portable flavor exists off x86-64"),
    }
}

fn matmul_f32(flavor: Flavor, w: &QMatrix, x: &ActsRef<'_>, rows: Range<usize>, out: &mut [f32], ld: usize) {
    let k = w.cols;
    #[cfg(target_arch = "x86_64")]
    if flavor != Flavor::Portable && k.is_multiple_of(8) {
        // SAFETY: AVX2 and FMA are there whenever a SIMD flavor is chosen.
        unsafe { avx2::matmul_f32(&w.dense, k, x.f32, x.tokens, rows, out, ld) };
        return;
    }
    let _ = flavor;
    for t in 0..x.tokens {
        for r in rows.clone() {
            out[t * ld + r - rows.start] = dotf_ref(&w.dense[r * k..(r + 1) * k], &x.f32[t * k..(t + 1) * k]);
        }
    }
}

/// `quant::quantize_row_q8` (the reference), with the fastest instructions the CPU has: the
/// same bits.
pub fn quantize_row_q8(x: &[f32], out: &mut [ActBlock]) {
    #[cfg(target_arch = "x86_64")]
    if Flavor::detect() == Flavor::Avx512 {
        // SAFETY: the flavor is only chosen when the CPU has AVX-512 F/BW/VL/VNNI.
        unsafe { avx512::quantize_row_q8(x, out) };
        return;
    }
    super::quant::quantize_row_q8(x, out);
}

#[cfg(test)]
mod tests;

/// The 8 lanes' sum in the shared order (for other modules' AVX2 code).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn hsum8_avx2(v: std::arch::x86_64::__m256) -> f32 {
    avx2::hsum8(v)
}
