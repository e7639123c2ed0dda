//! The AVX-512 flavor: `vpdpbusd` (VNNI) on 512-bit registers holding two outputs' lanes —
//! two tokens of one row, or (for one token) two rows — so that each output keeps exactly the
//! 8-lane accumulation of the other flavors, at twice the width.

// Tiles index rows × tokens of several arrays at once: index loops read best.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::super::quant::{ActBlock, ActBlockK, Kind};
use super::avx2::{
    Geom, KHeader, by_kind_k, by_kind32, correction, hsum8, k_codes, k_header, mins_dot, prefetch_next_tile, unpack32,
};

/// Whether the CPU runs this flavor.
pub fn available() -> bool {
    super::avx2::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vnni")
}

/// Two 256-bit halves as one register: `lo` in lanes 0–7, `hi` in 8–15.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
fn join_i(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
fn join_f(lo: f32, hi: f32) -> __m512 {
    _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(lo)), _mm256_set1_ps(hi), 1)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")]
fn halves(v: __m512) -> (f32, f32) {
    // Both halves summed in the shared tree order.
    (hsum8(_mm512_castps512_ps256(v)), hsum8(_mm512_extractf32x8_ps(v, 1)))
}

/// `off[i] = m·s[i] + off[i]` for `n` tokens' activation sums at `s` (one fused multiply-add
/// each, as the reference does them).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")]
unsafe fn min_terms(off: &mut [f32], m: f32, s: *const f32) {
    // SAFETY (caller): `off.len()` readable floats at `s`.
    unsafe {
        match off.len() {
            8 => _mm256_storeu_ps(
                off.as_mut_ptr(),
                _mm256_fmadd_ps(_mm256_set1_ps(m), _mm256_loadu_ps(s), _mm256_loadu_ps(off.as_ptr())),
            ),
            4 => _mm_storeu_ps(
                off.as_mut_ptr(),
                _mm_fmadd_ps(_mm_set1_ps(m), _mm_loadu_ps(s), _mm_loadu_ps(off.as_ptr())),
            ),
            _ => {
                for (i, o) in off.iter_mut().enumerate() {
                    *o = m.mul_add(*s.add(i), *o);
                }
            }
        }
    }
}

/// Rows `rows` of a 32-value-format matrix times `tokens` activation rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
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
    let g = Geom { bytes, row_bytes, kb, tokens, out: out.as_mut_ptr(), ld, row0: rows.start };
    // SAFETY: the caller's contract, passed on.
    unsafe { by_kind32!(kind, matmul_32_of(&g, acts, s_bt, rows)) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn matmul_32_of<const K: u8>(g: &Geom<'_>, acts: &[ActBlock], s_bt: &[f32], rows: Range<usize>) {
    let mut t = 0;
    // SAFETY (every tile): rows and tokens are within the matrix, the activations and `out`
    // (checked by `matmul`'s caller); each output is written by this call alone.
    unsafe {
        while t + 2 <= g.tokens {
            let p = ((g.tokens - t) / 2).min(4);
            let mut r = rows.start;
            macro_rules! sweep {
                ($p:literal) => {{
                    while r + 4 <= rows.end {
                        pairs32::<K, 4, $p>(g, acts, s_bt, r, t);
                        r += 4;
                    }
                    while r < rows.end {
                        pairs32::<K, 1, $p>(g, acts, s_bt, r, t);
                        r += 1;
                    }
                }};
            }
            match p {
                4 => sweep!(4),
                3 => sweep!(3),
                2 => sweep!(2),
                _ => sweep!(1),
            }
            t += 2 * p;
        }
        if t < g.tokens {
            let mut r = rows.start;
            while r + 4 <= rows.end {
                single32::<K, 4>(g, acts, s_bt, r, t);
                r += 4;
            }
            while r < rows.end {
                single32::<K, 1>(g, acts, s_bt, r, t);
                r += 1;
            }
        }
    }
}

/// Outputs of rows `r0..r0+R` × token pairs `(t0+2p, t0+2p+1)` for `p < P`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn pairs32<const K: u8, const R: usize, const P: usize>(
    g: &Geom<'_>,
    acts: &[ActBlock],
    s_bt: &[f32],
    r0: usize,
    t0: usize,
) {
    let kind = Kind::from_id(K);
    let o = kind.offset();
    let bb = kind.block_bytes();
    let base = g.bytes.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    let mut off = [[0f32; 8]; R];
    for b in 0..g.kb {
        let mut w = [_mm512_setzero_si512(); R];
        let mut dw = [_mm512_setzero_ps(); R];
        let mut mw = [0f32; R];
        for r in 0..R {
            // SAFETY (caller): row r0 + r exists.
            let (u, d, m) = unsafe { unpack32(kind, base.add((r0 + r) * g.row_bytes + b * bb)) };
            (w[r], dw[r], mw[r]) = (_mm512_broadcast_i64x4(u), _mm512_set1_ps(d), m);
        }
        for p in 0..P {
            let (ta, tb) = (t0 + 2 * p, t0 + 2 * p + 1);
            // SAFETY (caller): both tokens' block b exists.
            let (aa, ab) = unsafe { (acts.get_unchecked(ta * g.kb + b), acts.get_unchecked(tb * g.kb + b)) };
            // SAFETY: the codes are 32 aligned bytes, the sums 8 i32.
            let (a, corr) = unsafe {
                (
                    join_i(_mm256_load_si256(aa.q.as_ptr().cast()), _mm256_load_si256(ab.q.as_ptr().cast())),
                    join_i(correction(&aa.asum4, o), correction(&ab.asum4, o)),
                )
            };
            let da = join_f(aa.d, ab.d);
            for r in 0..R {
                let l = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr, w[r], a));
                acc[r][p] = _mm512_fmadd_ps(_mm512_mul_ps(dw[r], da), l, acc[r][p]);
            }
        }
        if kind.has_min() {
            for r in 0..R {
                // SAFETY (caller): the sums of tokens t0..t0+2P for block b exist.
                unsafe { min_terms(&mut off[r][..2 * P], mw[r], s_bt.as_ptr().add(b * g.tokens + t0)) };
            }
        }
    }
    for r in 0..R {
        for p in 0..P {
            let (lo, hi) = halves(acc[r][p]);
            let (ta, tb) = (t0 + 2 * p, t0 + 2 * p + 1);
            // SAFETY (caller): the outputs are within `out`.
            unsafe {
                *g.out.add(ta * g.ld + r0 + r - g.row0) = lo + off[r][2 * p];
                *g.out.add(tb * g.ld + r0 + r - g.row0) = hi + off[r][2 * p + 1];
            }
        }
    }
}

/// Rows `r0..r0+R` × one token, with 256-bit VNNI lanes (decode).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn single32<const K: u8, const R: usize>(g: &Geom<'_>, acts: &[ActBlock], s_bt: &[f32], r0: usize, t: usize) {
    let kind = Kind::from_id(K);
    let o = kind.offset();
    let bb = kind.block_bytes();
    let base = g.bytes.as_ptr();
    let mut acc = [_mm256_setzero_ps(); R];
    let mut off = [0f32; R];
    for b in 0..g.kb {
        // SAFETY (caller): the token's block b exists; 32 aligned bytes; 8 i32.
        let ab = unsafe { acts.get_unchecked(t * g.kb + b) };
        let (a, corr) = unsafe { (_mm256_load_si256(ab.q.as_ptr().cast()), correction(&ab.asum4, o)) };
        // SAFETY (caller): as above.
        let s = if kind.has_min() { unsafe { *s_bt.get_unchecked(b * g.tokens + t) } } else { 0.0 };
        if b % 2 == 0 {
            prefetch_next_tile(base, g.row_bytes, r0, R, b * bb, 2 * bb);
        }
        for r in 0..R {
            // SAFETY (caller): row r0 + r exists.
            let (u, d, m) = unsafe { unpack32(kind, base.add((r0 + r) * g.row_bytes + b * bb)) };
            let l = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(corr, u, a));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * ab.d), l, acc[r]);
            if kind.has_min() {
                off[r] = m.mul_add(s, off[r]);
            }
        }
    }
    for r in 0..R {
        // SAFETY (caller): within `out`.
        unsafe { *g.out.add(t * g.ld + r0 + r - g.row0) = hsum8(acc[r]) + off[r] };
    }
}

/// Rows `rows` of a K-format matrix times `tokens` Q8_K activation rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
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
    let g = Geom { bytes, row_bytes, kb, tokens, out: out.as_mut_ptr(), ld, row0: rows.start };
    // SAFETY: the caller's contract, passed on.
    unsafe { by_kind_k!(kind, matmul_k_of(&g, acts, rows)) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn matmul_k_of<const K: u8>(g: &Geom<'_>, acts: &[ActBlockK], rows: Range<usize>) {
    let mut t = 0;
    // SAFETY: as in `matmul_32_of`.
    unsafe {
        while t + 2 <= g.tokens {
            let p = ((g.tokens - t) / 2).min(4);
            let mut r = rows.start;
            macro_rules! sweep {
                ($p:literal) => {{
                    while r + 2 <= rows.end {
                        pairsk::<K, 2, $p>(g, acts, r, t);
                        r += 2;
                    }
                    while r < rows.end {
                        pairsk::<K, 1, $p>(g, acts, r, t);
                        r += 1;
                    }
                }};
            }
            match p {
                4 => sweep!(4),
                3 => sweep!(3),
                2 => sweep!(2),
                _ => sweep!(1),
            }
            t += 2 * p;
        }
        if t < g.tokens {
            let mut r = rows.start;
            while r + 4 <= rows.end {
                singlek::<K, 4>(g, acts, r, t);
                r += 4;
            }
            while r < rows.end {
                singlek::<K, 1>(g, acts, r, t);
                r += 1;
            }
        }
    }
}

/// Rows `r0..r0+R` × token pairs `(t0+2p, t0+2p+1)` for `p < P` of a K format: `maddubs` of
/// codes and activations, the offset's products taken off in 16 bits (Q6_K), `vpdpwssd` with
/// the group's scales — the reference's exact integer lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn pairsk<const K: u8, const R: usize, const P: usize>(g: &Geom<'_>, acts: &[ActBlockK], r0: usize, t0: usize) {
    let kind = Kind::from_id(K);
    let bb = kind.block_bytes();
    let q6 = kind == Kind::Q6K;
    let m32 = _mm512_set1_epi8(32);
    let base = g.bytes.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    let mut off = [[[0f32; 2]; P]; R];
    for b in 0..g.kb {
        // SAFETY: all zeros is a valid header (overwritten just below).
        let mut head: [KHeader; R] = unsafe { std::mem::zeroed() };
        for (r, h) in head.iter_mut().enumerate() {
            // SAFETY (caller): the row's super-block b exists.
            *h = unsafe { k_header::<K>(base.add((r0 + r) * g.row_bytes + b * bb)) };
        }
        let mut isum = [[_mm512_setzero_si512(); P]; R];
        for j in 0..4 {
            let mut codes = [[_mm512_setzero_si512(); 2]; R];
            for r in 0..R {
                // SAFETY (caller): as above.
                let (lo, hi) = unsafe { k_codes::<K>(base.add((r0 + r) * g.row_bytes + b * bb), j) };
                codes[r] = [_mm512_broadcast_i64x4(lo), _mm512_broadcast_i64x4(hi)];
            }
            for (k, grp) in [2 * j, 2 * j + 1].into_iter().enumerate() {
                let sc: [__m512i; R] = std::array::from_fn(|r| _mm512_broadcast_i64x4(head[r].sc[grp]));
                for p in 0..P {
                    // SAFETY (caller): both tokens' super-block b exists; 32 aligned bytes each.
                    let a = unsafe {
                        let (aa, ab) = (
                            acts.get_unchecked((t0 + 2 * p) * g.kb + b),
                            acts.get_unchecked((t0 + 2 * p + 1) * g.kb + b),
                        );
                        join_i(
                            _mm256_load_si256(aa.q.as_ptr().add(32 * grp).cast()),
                            _mm256_load_si256(ab.q.as_ptr().add(32 * grp).cast()),
                        )
                    };
                    let oa = if q6 { _mm512_maddubs_epi16(m32, a) } else { _mm512_setzero_si512() };
                    for r in 0..R {
                        let mut p16 = _mm512_maddubs_epi16(codes[r][k], a);
                        if q6 {
                            p16 = _mm512_sub_epi16(p16, oa);
                        }
                        isum[r][p] = _mm512_dpwssd_epi32(isum[r][p], p16, sc[r]);
                    }
                }
            }
        }
        for p in 0..P {
            // SAFETY (caller): as above.
            let (aa, ab) = unsafe {
                (acts.get_unchecked((t0 + 2 * p) * g.kb + b), acts.get_unchecked((t0 + 2 * p + 1) * g.kb + b))
            };
            let da = join_f(aa.d, ab.d);
            for r in 0..R {
                let h = &head[r];
                acc[r][p] =
                    _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(h.d), da), _mm512_cvtepi32_ps(isum[r][p]), acc[r][p]);
                if kind.has_min() {
                    for (k, a) in [aa, ab].into_iter().enumerate() {
                        off[r][p][k] = (h.dmin * a.d).mul_add(-(mins_dot(&h.mn, &a.gsum) as f32), off[r][p][k]);
                    }
                }
            }
        }
    }
    for r in 0..R {
        for p in 0..P {
            let (lo, hi) = halves(acc[r][p]);
            // SAFETY (caller): within `out`.
            unsafe {
                *g.out.add((t0 + 2 * p) * g.ld + r0 + r - g.row0) = lo + off[r][p][0];
                *g.out.add((t0 + 2 * p + 1) * g.ld + r0 + r - g.row0) = hi + off[r][p][1];
            }
        }
    }
}

/// Rows `r0..r0+R` × one token of a K format, with 256-bit VNNI lanes (decode).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn singlek<const K: u8, const R: usize>(g: &Geom<'_>, acts: &[ActBlockK], r0: usize, t: usize) {
    let kind = Kind::from_id(K);
    let bb = kind.block_bytes();
    let q6 = kind == Kind::Q6K;
    let m32 = _mm256_set1_epi8(32);
    let base = g.bytes.as_ptr();
    let mut acc = [_mm256_setzero_ps(); R];
    let mut off = [0f32; R];
    for b in 0..g.kb {
        // SAFETY (caller): the token's super-block b exists.
        let ab = unsafe { acts.get_unchecked(t * g.kb + b) };
        prefetch_next_tile(base, g.row_bytes, r0, R, b * bb, bb);
        // SAFETY: all zeros is a valid header (overwritten just below).
        let mut head: [KHeader; R] = unsafe { std::mem::zeroed() };
        for (r, h) in head.iter_mut().enumerate() {
            // SAFETY (caller): the row's super-block b exists.
            *h = unsafe { k_header::<K>(base.add((r0 + r) * g.row_bytes + b * bb)) };
        }
        let mut isum = [_mm256_setzero_si256(); R];
        for j in 0..4 {
            let mut codes = [(_mm256_setzero_si256(), _mm256_setzero_si256()); R];
            for r in 0..R {
                // SAFETY (caller): as above.
                codes[r] = unsafe { k_codes::<K>(base.add((r0 + r) * g.row_bytes + b * bb), j) };
            }
            for (k, grp) in [2 * j, 2 * j + 1].into_iter().enumerate() {
                // SAFETY: 32 aligned bytes within `ab.q`.
                let a = unsafe { _mm256_load_si256(ab.q.as_ptr().add(32 * grp).cast()) };
                let oa = if q6 { _mm256_maddubs_epi16(m32, a) } else { _mm256_setzero_si256() };
                for r in 0..R {
                    let code = if k == 0 { codes[r].0 } else { codes[r].1 };
                    let mut p16 = _mm256_maddubs_epi16(code, a);
                    if q6 {
                        p16 = _mm256_sub_epi16(p16, oa);
                    }
                    isum[r] = _mm256_dpwssd_epi32(isum[r], p16, head[r].sc[grp]);
                }
            }
        }
        for r in 0..R {
            let h = &head[r];
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(h.d * ab.d), _mm256_cvtepi32_ps(isum[r]), acc[r]);
            if kind.has_min() {
                off[r] = (h.dmin * ab.d).mul_add(-(mins_dot(&h.mn, &ab.gsum) as f32), off[r]);
            }
        }
    }
    for r in 0..R {
        // SAFETY (caller): within `out`.
        unsafe { *g.out.add(t * g.ld + r0 + r - g.row0) = hsum8(acc[r]) + off[r] };
    }
}

/// `quant::quantize_row_q8`, 32 values per step, to the same bits: the same float operations
/// on each value (|x| maximum, `x·(127/amax)` rounded to even), and exact integer sums.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
pub(super) fn quantize_row_q8(x: &[f32], out: &mut [ActBlock]) {
    use super::super::quant::{QK, f16_round};
    let ones = _mm256_set1_epi8(1);
    let ones16 = _mm256_set1_epi16(1);
    for (blk, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        // SAFETY: `xs` holds 32 floats, `blk.q` 32 bytes and `blk.asum4` 8 i32.
        unsafe {
            let lo = _mm512_loadu_ps(xs.as_ptr());
            let hi = _mm512_loadu_ps(xs.as_ptr().add(16));
            // `max` of the absolute values, ignoring NaN as `f32::max` does.
            let abs = |v: __m512| _mm512_abs_ps(v);
            let (alo, ahi) = (abs(lo), abs(hi));
            let m = _mm512_max_ps(
                _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(alo, alo), _mm512_setzero_ps(), alo),
                _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(ahi, ahi), _mm512_setzero_ps(), ahi),
            );
            let amax = _mm512_reduce_max_ps(m);
            let d = amax / 127.0;
            let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
            let q = |v: __m512| {
                let s = _mm512_mul_ps(v, _mm512_set1_ps(id));
                // NaN (an infinite amax, or a NaN value) becomes 0, as `as i32` makes it.
                let s = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(s, s), s);
                // Clamped before rounding (the same for whole bounds; an infinite product too).
                let s = _mm512_max_ps(_mm512_min_ps(s, _mm512_set1_ps(127.0)), _mm512_set1_ps(-127.0));
                _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(s)
            };
            let codes = _mm256_set_m128i(_mm512_cvtepi32_epi8(q(hi)), _mm512_cvtepi32_epi8(q(lo)));
            _mm256_storeu_si256(blk.q.as_mut_ptr().cast(), codes);
            let sums4 = _mm256_madd_epi16(_mm256_maddubs_epi16(ones, codes), ones16);
            _mm256_storeu_si256(blk.asum4.as_mut_ptr().cast(), sums4);
            let sum: i32 = blk.asum4.iter().sum();
            blk.asum = sum;
            blk.d = f16_round(d);
            blk.s = f16_round(d * sum as f32);
        }
    }
}
