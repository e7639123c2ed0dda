//! The AVX2 flavor: 256-bit integer dot products (`maddubs`/`madd`) and FMA, tiles of rows ×
//! tokens whose every output follows the arithmetic of `quant::dot32_ref` / `dotk_ref` /
//! `dotf_ref` to the bit.

// Tiles index rows × tokens of several arrays at once: index loops read best.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::quant::{ActBlock, ActBlockK, Kind, MXFP4_VALUES, QK, e8m0_half, f16_at, scale_min_k4};

/// Whether the CPU runs this flavor.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// The lanes' sum in `quant::hsum8`'s order.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum8(v: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
}

/// 32 values from 16 bytes of nibbles at `p`: the low nibbles, then the high ones.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY (caller): 16 readable bytes at `p`.
    let x = unsafe { _mm_loadu_si128(p.cast()) };
    _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(x, 4), x), _mm256_set1_epi8(0x0F))
}

/// 0x10 in byte `j` where bit `j` of `bits` is set.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn fifth_bits(bits: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0),
    );
    let mask = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask), _mm256_set1_epi8(0x10))
}

/// A 32-value block's unsigned codes (as `quant::unpack32`), its scale and min.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn unpack32(kind: Kind, p: *const u8) -> (__m256i, f32, f32) {
    // SAFETY (caller): `p` points at one whole block of `kind`.
    unsafe {
        let blk = std::slice::from_raw_parts(p, kind.block_bytes());
        let d = f16_at(blk, 0);
        match kind {
            Kind::Q4_0 => (nibbles(p.add(2)), d, 0.0),
            Kind::Q4_1 => (nibbles(p.add(4)), d, f16_at(blk, 2)),
            Kind::Q5_0 => {
                let qh = std::ptr::read_unaligned(p.add(2).cast::<u32>());
                (_mm256_or_si256(nibbles(p.add(6)), fifth_bits(qh)), d, 0.0)
            }
            Kind::Q5_1 => {
                let qh = std::ptr::read_unaligned(p.add(4).cast::<u32>());
                (_mm256_or_si256(nibbles(p.add(8)), fifth_bits(qh)), d, f16_at(blk, 2))
            }
            Kind::Q8_0 => (_mm256_xor_si256(_mm256_loadu_si256(p.add(2).cast()), _mm256_set1_epi8(-128)), d, 0.0),
            Kind::Mxfp4 => {
                // The doubled FP4 value of each nibble, then offset by 128 as Q8_0's codes.
                let lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(MXFP4_VALUES.as_ptr().cast()));
                let v = _mm256_shuffle_epi8(lut, nibbles(p.add(1)));
                (_mm256_xor_si256(v, _mm256_set1_epi8(-128)), e8m0_half(*p), 0.0)
            }
            _ => unreachable!("not a 32-value format"),
        }
    }
}

/// The 8 exact integer lanes `Σ (u − o)·a` of one 32-value group: `u` unsigned codes, `a`
/// signed activation codes, `corr` = `−o·asum4`. `signed8` for codes offset by 128 (Q8_0):
/// `maddubs` would saturate on them, so their signed values multiply by sign instead.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn lanes(u: __m256i, a: __m256i, corr: __m256i, signed8: bool) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    if signed8 {
        let w = _mm256_xor_si256(u, _mm256_set1_epi8(-128));
        _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w)), ones)
    } else {
        _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(u, a), ones), corr)
    }
}

/// `−o·asum4` as 8 lanes, for an offset `o` that is 0 or a power of two (every format's is).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn correction(asum4: &[i32; 8], o: i32) -> __m256i {
    debug_assert!(o == 0 || (o as u32).is_power_of_two());
    if o == 0 {
        return _mm256_setzero_si256();
    }
    // SAFETY: 8 readable i32.
    let s = unsafe { _mm256_loadu_si256(asum4.as_ptr().cast()) };
    _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_sll_epi32(s, _mm_cvtsi32_si128(o.trailing_zeros() as i32)))
}

/// Calls `$f::<K, ...>` with the 32-value kind `$kind` as a const generic: the ones not
/// repacked (`kernels::packed` computes the others).
macro_rules! by_kind32 {
    ($kind:expr, $f:ident $(::<$($g:tt),*>)? ($($a:expr),* $(,)?)) => {
        match $kind {
            Kind::Mxfp4 => $f::<{ Kind::Mxfp4 as u8 } $($(, $g)*)?>($($a),*),
            _ => unreachable!("not an unpacked 32-value format"),
        }
    };
}
pub(super) use by_kind32;

/// Calls `$f::<K, ...>` with the K-format kind `$kind` as a const generic: the one not
/// repacked (`kernels::packed` computes Q4_K and Q6_K).
macro_rules! by_kind_k {
    ($kind:expr, $f:ident $(::<$($g:tt),*>)? ($($a:expr),* $(,)?)) => {
        match $kind {
            Kind::Q5K => $f::<{ Kind::Q5K as u8 } $($(, $g)*)?>($($a),*),
            _ => unreachable!("not an unpacked K format"),
        }
    };
}
pub(super) use by_kind_k;

/// Rows `rows` of a 32-value-format matrix times `tokens` activation rows.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_32(
    kind: Kind,
    bytes: &[u8],
    row_bytes: usize,
    acts: &[ActBlock],
    s_bt: &[f32],
    kb: usize,
    tokens: usize,
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let geom = Geom { bytes, row_bytes, kb, tokens, out: out.as_mut_ptr(), ld, row0: rows.start };
    // SAFETY: the caller's contract, passed on.
    unsafe { by_kind32!(kind, matmul_32_of(&geom, acts, s_bt, rows)) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn matmul_32_of<const K: u8>(g: &Geom<'_>, acts: &[ActBlock], s_bt: &[f32], rows: Range<usize>) {
    let mut t = 0;
    while t < g.tokens {
        let c = (g.tokens - t).min(4);
        let mut r = rows.start;
        // SAFETY (each tile): rows and tokens are within the matrix, the activations and `out`
        // (checked by `matmul`'s caller); every output is written by this call alone.
        unsafe {
            match c {
                4 => {
                    while r + 2 <= rows.end {
                        tile32::<K, 2, 4>(g, acts, s_bt, r, t);
                        r += 2;
                    }
                    while r < rows.end {
                        tile32::<K, 1, 4>(g, acts, s_bt, r, t);
                        r += 1;
                    }
                }
                3 => {
                    while r < rows.end {
                        tile32::<K, 1, 3>(g, acts, s_bt, r, t);
                        r += 1;
                    }
                }
                2 => {
                    while r + 4 <= rows.end {
                        tile32::<K, 4, 2>(g, acts, s_bt, r, t);
                        r += 4;
                    }
                    while r < rows.end {
                        tile32::<K, 1, 2>(g, acts, s_bt, r, t);
                        r += 1;
                    }
                }
                _ => {
                    while r + 4 <= rows.end {
                        tile32::<K, 4, 1>(g, acts, s_bt, r, t);
                        r += 4;
                    }
                    while r < rows.end {
                        tile32::<K, 1, 1>(g, acts, s_bt, r, t);
                        r += 1;
                    }
                }
            }
        }
        t += c;
    }
}

/// Asks for the bytes `at..at + len` of rows `r0 + n .. r0 + 2n` (the next tile's rows) to
/// be brought into the cache: decode reads every weight once per token, mostly from memory,
/// and the hardware prefetcher alone leaves the core waiting (measured: a Q8_0 matrix of
/// 178 MB read at 5.8 GB/s without, 7.8 GB/s with, on a core that reads 8.1 GB/s at most).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn prefetch_next_tile(base: *const u8, row_bytes: usize, r0: usize, n: usize, at: usize, len: usize) {
    for r in r0 + n..r0 + 2 * n {
        let mut off = 0;
        while off < len {
            // Prefetching is a hint: an address past the matrix is never dereferenced.
            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(r * row_bytes + at + off).cast());
            off += 64;
        }
    }
}

/// Where a product's operands and results are.
pub(super) struct Geom<'a> {
    pub bytes: &'a [u8],
    pub row_bytes: usize,
    pub kb: usize,
    pub tokens: usize,
    pub out: *mut f32,
    pub ld: usize,
    pub row0: usize,
}

/// `off[c] = m·s[c] + off[c]` for `C` tokens' activation sums `s` (one fused multiply-add
/// per token, as the reference does them one by one).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn min_terms<const C: usize>(off: &mut [f32; C], m: f32, s: *const f32) {
    if C == 4 {
        // SAFETY (caller): 4 readable floats at `s`; `off` holds 4.
        unsafe {
            let v = _mm_fmadd_ps(_mm_set1_ps(m), _mm_loadu_ps(s), _mm_loadu_ps(off.as_ptr()));
            _mm_storeu_ps(off.as_mut_ptr(), v);
        }
    } else {
        for (c, o) in off.iter_mut().enumerate() {
            // SAFETY (caller): `C` readable floats at `s`.
            *o = m.mul_add(unsafe { *s.add(c) }, *o);
        }
    }
}

/// Outputs `r0..r0+R` × tokens `t0..t0+C` of a 32-value format.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile32<const K: u8, const R: usize, const C: usize>(
    g: &Geom<'_>,
    acts: &[ActBlock],
    s_bt: &[f32],
    r0: usize,
    t0: usize,
) {
    let kind = Kind::from_id(K);
    let o = kind.offset();
    let signed8 = matches!(kind, Kind::Q8_0 | Kind::Mxfp4);
    let bb = kind.block_bytes();
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut off = [[0f32; C]; R];
    let base = g.bytes.as_ptr();
    for b in 0..g.kb {
        if C == 1 && b % 2 == 0 {
            prefetch_next_tile(base, g.row_bytes, r0, R, b * bb, 2 * bb);
        }
        let mut w = [_mm256_setzero_si256(); R];
        let mut dw = [0f32; R];
        let mut mw = [0f32; R];
        for r in 0..R {
            // SAFETY (caller): row r0 + r exists, so its block b does.
            let (u, d, m) = unsafe { unpack32(kind, base.add((r0 + r) * g.row_bytes + b * bb)) };
            (w[r], dw[r], mw[r]) = (u, d, m);
        }
        for c in 0..C {
            // SAFETY (caller): token t0 + c's block b exists.
            let ab = unsafe { acts.get_unchecked((t0 + c) * g.kb + b) };
            // SAFETY: `ab.q` is 32 aligned bytes; 8 i32.
            let a = unsafe { _mm256_load_si256(ab.q.as_ptr().cast()) };
            let corr = if signed8 { _mm256_setzero_si256() } else { unsafe { correction(&ab.asum4, o) } };
            for r in 0..R {
                let l = _mm256_cvtepi32_ps(lanes(w[r], a, corr, signed8));
                acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dw[r] * ab.d), l, acc[r][c]);
            }
        }
        if kind.has_min() {
            for r in 0..R {
                // SAFETY (caller): the sums of tokens t0..t0+C for block b exist.
                unsafe { min_terms::<C>(&mut off[r], mw[r], s_bt.as_ptr().add(b * g.tokens + t0)) };
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            // SAFETY (caller): the output is within `out`.
            unsafe { *g.out.add((t0 + c) * g.ld + r0 + r - g.row0) = hsum8(acc[r][c]) + off[r][c] };
        }
    }
}

/// A K super-block's header as the kernels use it: `d`, `dmin`, and per 32-value group the
/// integer scales as 16 i16 (the first 8 for lanes 0–3, the last 8 for lanes 4–7: Q6_K's
/// sub-blocks are 16 values) and the integer min.
#[derive(Clone, Copy)]
pub(super) struct KHeader {
    pub d: f32,
    pub dmin: f32,
    pub sc: [__m256i; 8],
    pub mn: [i32; 8],
}

/// The header of the K super-block at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn k_header<const K: u8>(p: *const u8) -> KHeader {
    let kind = Kind::from_id(K);
    // SAFETY (caller): `p` points at one whole super-block.
    let blk = unsafe { std::slice::from_raw_parts(p, kind.block_bytes()) };
    let mut h = KHeader { d: 0.0, dmin: 0.0, sc: [_mm256_setzero_si256(); 8], mn: [0; 8] };
    if kind == Kind::Q6K {
        h.d = f16_at(blk, 208);
        for g in 0..8 {
            let (s0, s1) = (i16::from(blk[192 + 2 * g] as i8), i16::from(blk[193 + 2 * g] as i8));
            h.sc[g] = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
        }
    } else {
        h.d = f16_at(blk, 0);
        h.dmin = f16_at(blk, 2);
        for g in 0..8 {
            let (sc, mn) = scale_min_k4(g, &blk[4..16]);
            h.sc[g] = _mm256_set1_epi16(i16::from(sc));
            h.mn[g] = i32::from(mn);
        }
    }
    h
}

/// Groups `2j` and `2j+1` (64 values) of the K super-block at `p`: unsigned codes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn k_codes<const K: u8>(p: *const u8, j: usize) -> (__m256i, __m256i) {
    let kind = Kind::from_id(K);
    let m4 = _mm256_set1_epi8(0x0F);
    // SAFETY (caller): `p` points at one whole super-block of the kind.
    unsafe {
        match kind {
            Kind::Q4K | Kind::Q5K => {
                let ql = if kind == Kind::Q5K { p.add(48) } else { p.add(16) };
                let q = _mm256_loadu_si256(ql.add(32 * j).cast());
                let (mut lo, mut hi) = (_mm256_and_si256(q, m4), _mm256_and_si256(_mm256_srli_epi16(q, 4), m4));
                if kind == Kind::Q5K {
                    let qh = _mm256_loadu_si256(p.add(16).cast());
                    let one = _mm256_set1_epi8(1);
                    let bl = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j as i32)), one);
                    let bh = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * j as i32 + 1)), one);
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(bl, 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(bh, 4));
                }
                (lo, hi)
            }
            Kind::Q6K => {
                // Groups 2j, 2j+1: half j/2, sub-blocks 2(j%2), 2(j%2)+1.
                let (half, s0) = (j / 2, 2 * (j % 2));
                let qh = _mm256_loadu_si256(p.add(128 + 32 * half).cast());
                let code = |sub: usize| {
                    let ql = _mm256_loadu_si256(p.add(64 * half + 32 * (sub % 2)).cast());
                    let lo =
                        if sub < 2 { _mm256_and_si256(ql, m4) } else { _mm256_and_si256(_mm256_srli_epi16(ql, 4), m4) };
                    let hi =
                        _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * sub as i32)), _mm256_set1_epi8(3));
                    _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4))
                };
                (code(s0), code(s0 + 1))
            }
            _ => unreachable!("not a K format"),
        }
    }
}

/// `Σ mn[g]·gsum[g]`, exact.
#[inline]
pub(super) fn mins_dot(mn: &[i32; 8], gsum: &[i32; 8]) -> i32 {
    mn.iter().zip(gsum).map(|(m, s)| m * s).sum()
}

/// Rows `rows` of a K-format matrix times `tokens` Q8_K activation rows.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_k(
    kind: Kind,
    bytes: &[u8],
    row_bytes: usize,
    acts: &[ActBlockK],
    kb: usize,
    tokens: usize,
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let geom = Geom { bytes, row_bytes, kb, tokens, out: out.as_mut_ptr(), ld, row0: rows.start };
    // SAFETY: the caller's contract, passed on.
    unsafe { by_kind_k!(kind, matmul_k_of(&geom, acts, rows)) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn matmul_k_of<const K: u8>(g: &Geom<'_>, acts: &[ActBlockK], rows: Range<usize>) {
    let mut t = 0;
    while t < g.tokens {
        let c = (g.tokens - t).min(4);
        let mut r = rows.start;
        // SAFETY: as in `matmul_32_of`.
        unsafe {
            match c {
                4 => {
                    while r + 2 <= rows.end {
                        tilek::<K, 2, 4>(g, acts, r, t);
                        r += 2;
                    }
                    (r..rows.end).for_each(|r| tilek::<K, 1, 4>(g, acts, r, t));
                }
                3 => (r..rows.end).for_each(|r| tilek::<K, 1, 3>(g, acts, r, t)),
                2 => {
                    while r + 2 <= rows.end {
                        tilek::<K, 2, 2>(g, acts, r, t);
                        r += 2;
                    }
                    (r..rows.end).for_each(|r| tilek::<K, 1, 2>(g, acts, r, t));
                }
                _ => {
                    while r + 4 <= rows.end {
                        tilek::<K, 4, 1>(g, acts, r, t);
                        r += 4;
                    }
                    (r..rows.end).for_each(|r| tilek::<K, 1, 1>(g, acts, r, t));
                }
            }
        }
        t += c;
    }
}

/// Outputs `r0..r0+R` × tokens `t0..t0+C` of a K format: per group, `maddubs` of codes and
/// activations, the offset's products taken off in 16 bits (Q6_K), and `madd` with the
/// group's scales — the reference's exact integer lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tilek<const K: u8, const R: usize, const C: usize>(g: &Geom<'_>, acts: &[ActBlockK], r0: usize, t0: usize) {
    let kind = Kind::from_id(K);
    let bb = kind.block_bytes();
    let q6 = kind == Kind::Q6K;
    let m32 = _mm256_set1_epi8(32);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut off = [[0f32; C]; R];
    let base = g.bytes.as_ptr();
    for b in 0..g.kb {
        if C == 1 {
            prefetch_next_tile(base, g.row_bytes, r0, R, b * bb, bb);
        }
        let mut isum = [[_mm256_setzero_si256(); C]; R];
        // SAFETY: all zeros is a valid header (it is overwritten just below).
        let mut head: [KHeader; R] = unsafe { std::mem::zeroed() };
        for (r, h) in head.iter_mut().enumerate() {
            // SAFETY (caller): the row's super-block b exists.
            *h = unsafe { k_header::<K>(base.add((r0 + r) * g.row_bytes + b * bb)) };
        }
        for j in 0..4 {
            let mut u = [(_mm256_setzero_si256(), _mm256_setzero_si256()); R];
            for r in 0..R {
                // SAFETY (caller): as above.
                u[r] = unsafe { k_codes::<K>(base.add((r0 + r) * g.row_bytes + b * bb), j) };
            }
            for c in 0..C {
                // SAFETY (caller): token t0 + c's super-block b exists.
                let ab = unsafe { acts.get_unchecked((t0 + c) * g.kb + b) };
                for (k, grp) in [2 * j, 2 * j + 1].into_iter().enumerate() {
                    // SAFETY: 32 bytes within `ab.q`, aligned (groups start at multiples of 32).
                    let a = unsafe { _mm256_load_si256(ab.q.as_ptr().add(32 * grp).cast()) };
                    let oa = if q6 { _mm256_maddubs_epi16(m32, a) } else { _mm256_setzero_si256() };
                    for r in 0..R {
                        let code = if k == 0 { u[r].0 } else { u[r].1 };
                        let mut p16 = _mm256_maddubs_epi16(code, a);
                        if q6 {
                            p16 = _mm256_sub_epi16(p16, oa);
                        }
                        isum[r][c] = _mm256_add_epi32(isum[r][c], _mm256_madd_epi16(p16, head[r].sc[grp]));
                    }
                }
            }
        }
        for c in 0..C {
            // SAFETY (caller): as above.
            let ab = unsafe { acts.get_unchecked((t0 + c) * g.kb + b) };
            for r in 0..R {
                let h = &head[r];
                acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(h.d * ab.d), _mm256_cvtepi32_ps(isum[r][c]), acc[r][c]);
                if kind.has_min() {
                    off[r][c] = (h.dmin * ab.d).mul_add(-(mins_dot(&h.mn, &ab.gsum) as f32), off[r][c]);
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            // SAFETY (caller): the output is within `out`.
            unsafe { *g.out.add((t0 + c) * g.ld + r0 + r - g.row0) = hsum8(acc[r][c]) + off[r][c] };
        }
    }
}

/// Rows `rows` of an f32 matrix (`k` columns, a multiple of 8) times `tokens` f32 rows.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn matmul_f32(
    w: &[f32],
    k: usize,
    x: &[f32],
    tokens: usize,
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let outp = out.as_mut_ptr();
    let mut t = 0;
    while t < tokens {
        let c = (tokens - t).min(2);
        let mut r = rows.start;
        while r < rows.end {
            let rr = (rows.end - r).min(4);
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            for j in (0..k).step_by(8) {
                for ci in 0..c {
                    // SAFETY: token t + ci and columns j..j+8 are within `x`.
                    let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add((t + ci) * k + j)) };
                    for ri in 0..rr {
                        // SAFETY: row r + ri and columns j..j+8 are within `w`.
                        let wv = unsafe { _mm256_loadu_ps(w.as_ptr().add((r + ri) * k + j)) };
                        acc[ri][ci] = _mm256_fmadd_ps(wv, xv, acc[ri][ci]);
                    }
                }
            }
            for ri in 0..rr {
                for ci in 0..c {
                    // SAFETY: within `out` (checked by the caller).
                    unsafe { *outp.add((t + ci) * ld + r + ri - rows.start) = hsum8(acc[ri][ci]) };
                }
            }
            r += rr;
        }
        t += c;
    }
}

/// Keeps `QK` in use here (the block size the tiles assume).
const _: () = assert!(QK == 32);
