//! Attention over an f16 cache with AVX-512: [`super::ops::attend`] and
//! [`super::ops::attend_rows`] laid out for the vector units, to the same bits as the portable
//! arithmetic (`attend_any`):
//!
//! - **Scores.** Each dot product is eight lanes of multiply-adds over the head's values in
//!   order, then summed as `hsum8` sums them. A 512-bit register holds two keys' eight lanes
//!   side by side (the query's eight values broadcast to both halves), so one instruction
//!   advances two dots; sixteen dots are then summed at once by shuffles that add the same
//!   pairs in the same order as `hsum8` ([`sums16`]).
//! - **Softmax.** Exponentials 16 at a time ([`exp16`]); each head's sum is taken in position
//!   order, the heads' sums side by side (independent chains instead of one long one).
//! - **Values.** Up to 64 outputs of each head (of two rows, for a prompt) stay in registers
//!   while the positions go by; each value row is converted once for all of them.
//!
//! The shapes (heads per kv head, rows, keys per pass, outputs in registers) are constants of
//! each instantiation, so that the accumulators live in registers.

#![allow(unsafe_code)] // AVX-512 intrinsics on raw rows of the cache: see the SAFETY notes.

use std::arch::x86_64::*;

use super::kv::{BLOCK_TOKENS, KvPool, KvRow};
use super::ops::{ATTN_TILE, AttnParams, exp, softcap};

/// One sequence's keys and values of one layer and kv head: where each block's first position
/// keeps them (a block's positions follow each other, `d` values apart).
struct Rows {
    keys: Vec<*const u16>,
    values: Vec<*const u16>,
    /// The first block's index in the sequence's table.
    first: usize,
    d: usize,
}

impl Rows {
    /// The blocks of positions `from..end`.
    fn new(kv: &KvPool, layer: usize, table: &[u32], kvh: usize, from: usize, end: usize) -> Rows {
        let at = |v: bool, b: usize| match kv.read(layer, v, table[b], kvh, 0) {
            KvRow::F16(r) => r.as_ptr().cast(),
            KvRow::F32(_) => unreachable!("the caller checked that the pool is f16"),
        };
        let blocks = from / BLOCK_TOKENS..end.div_ceil(BLOCK_TOKENS);
        Rows {
            keys: blocks.clone().map(|b| at(false, b)).collect(),
            values: blocks.clone().map(|b| at(true, b)).collect(),
            first: blocks.start,
            d: kv.shape().head_dim,
        }
    }

    #[inline]
    fn key(&self, j: usize) -> *const u16 {
        self.keys[j / BLOCK_TOKENS - self.first].wrapping_add(j % BLOCK_TOKENS * self.d)
    }

    #[inline]
    fn value(&self, j: usize) -> *const u16 {
        self.values[j / BLOCK_TOKENS - self.first].wrapping_add(j % BLOCK_TOKENS * self.d)
    }
}

/// How far ahead of the position being computed decoding asks for the cache's rows: a step
/// reads every running sequence's keys and values from memory once (tens of MB, past the
/// caches), a block's rows 2 KiB apart from the next block's. Measured on SmolLM2's
/// 16-sequence step (`batch_bench`): keys and values 32 positions ahead, and each value row
/// asked for while its key is scored (so that the weighted sum finds it in the cache), 11.3–14.6
/// → 10.9–13.9 ms against 16 ahead and values only in their own pass; the first keys of each
/// sequence and head asked for together at its start, 11.0 → 10.6–10.8 ms (four pairs).
const KEYS_AHEAD: usize = 32;
const VALUES_AHEAD: usize = 32;

/// Keys taken per pass while decoding: [`KP_DECODE`] pairs.
const KP_DECODE: usize = 4;

/// The query heads `qs` (`R` heads sharing kv head `kvh`) at position `pos`: `attend`'s
/// AVX-512 path (`rep` is `R`, 1–4).
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/DQ, AVX2, FMA and F16C; the pool is f16; `p.head_dim` is a
/// multiple of 16; `qs` and `out` hold `rep · head_dim` values.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn attend(
    kv: &KvPool,
    layer: usize,
    table: &[u32],
    kvh: usize,
    pos: usize,
    qs: &[f32],
    p: &AttnParams<'_>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let lo = p.first_seen(pos);
    let rows = Rows::new(kv, layer, table, kvh, lo, pos + 1);
    // SAFETY (caller): as this function's contract.
    unsafe {
        match qs.len() / p.head_dim {
            4 => decode::<4>(&rows, pos, qs, p, scores, out),
            3 => decode::<3>(&rows, pos, qs, p, scores, out),
            2 => decode::<2>(&rows, pos, qs, p, scores, out),
            _ => decode::<1>(&rows, pos, qs, p, scores, out),
        }
    }
}

/// [`ATTN_TILE`] consecutive rows of one sequence, at positions `pos .. pos + ATTN_TILE`:
/// `attend_rows`' AVX-512 path. Each row's results are those of [`attend`] alone.
///
/// # Safety
/// As [`attend`], with `qs` and `out` holding `ATTN_TILE · rep · head_dim` values.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn attend_rows(
    kv: &KvPool,
    layer: usize,
    table: &[u32],
    kvh: usize,
    pos: usize,
    qs: &[f32],
    p: &AttnParams<'_>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let lo = p.first_seen(pos);
    let rows = Rows::new(kv, layer, table, kvh, lo, pos + ATTN_TILE);
    // Keys per pass: as many as keep the accumulators (rows × heads × pairs) within 24
    // registers.
    // SAFETY (caller): as this function's contract.
    unsafe {
        match qs.len() / (ATTN_TILE * p.head_dim) {
            4 => prompt::<4, 1, 16>(&rows, pos, qs, p, scores, out),
            3 => prompt::<3, 2, 12>(&rows, pos, qs, p, scores, out),
            2 => prompt::<2, 3, 8>(&rows, pos, qs, p, scores, out),
            _ => prompt::<1, 4, 4>(&rows, pos, qs, p, scores, out),
        }
    }
}

/// [`attend`] for `R` heads.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn decode<const R: usize>(
    rows: &Rows,
    pos: usize,
    qs: &[f32],
    p: &AttnParams<'_>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = p.head_dim;
    let lo = p.first_seen(pos);
    let n = pos + 1 - lo;
    scores.clear();
    scores.resize(R * n, 0.0);
    let mut dots = [0f32; 48];
    // The first keys: asked for all at once (later ones come KEYS_AHEAD ahead of their pass).
    let mut t = 8;
    while t < KEYS_AHEAD.min(n) {
        prefetch_rows(std::array::from_fn(|i| rows.key(lo + (t + i).min(n - 1))), d);
        t += 4;
    }
    let mut k = 0;
    while k < n {
        let m = (n - k).min(2 * KP_DECODE);
        // The last key stands in for those past the end (their dots are not kept).
        let mut keys = [std::ptr::null(); 2 * KP_DECODE];
        for (t, key) in keys.iter_mut().enumerate() {
            *key = rows.key(lo + k + t.min(m - 1));
        }
        // The cache comes from memory once per step (it does not stay in the caches between
        // steps): ask for the keys ahead, and for the values of the keys being scored.
        if k + KEYS_AHEAD < n {
            for t in [KEYS_AHEAD, KEYS_AHEAD + 4] {
                prefetch_rows(std::array::from_fn(|i| rows.key(lo + (k + t + i).min(n - 1))), d);
            }
        }
        for t in [0, 4] {
            prefetch_rows(std::array::from_fn(|i| rows.value(lo + (k + t + i).min(n - 1))), d);
        }
        // SAFETY: `d` values in each key and in each of the `R` heads of `qs`.
        let acc = unsafe { qk::<R, 1, KP_DECODE>(&keys, qs.as_ptr(), R * d, d) };
        dots_into(acc.as_flattened().as_flattened(), p.scale, &mut dots);
        for h in 0..R {
            scores[h * n + k..][..m].copy_from_slice(&dots[h * 2 * KP_DECODE..][..m]);
        }
        k += m;
    }
    cap_scores(scores, p.softcap);
    let heads: [(usize, usize, Option<f32>); R] = std::array::from_fn(|h| (h * n, n, p.sinks.map(|s| s[h])));
    softmax_heads(scores, &heads);
    let w: [[*const f32; R]; 1] = [std::array::from_fn(|h| scores[h * n..].as_ptr())];
    let optr = out.as_mut_ptr();
    // SAFETY: `out` holds `R·d` values.
    let o: [[*mut f32; R]; 1] = [std::array::from_fn(|h| unsafe { optr.add(h * d) })];
    // SAFETY: `out` holds `R·d` values; every weight is within `scores`.
    unsafe { values::<R, 1>(rows, [(lo, pos + 1)], w, o, d, true) };
}

/// [`attend_rows`] for `R` heads, `2·KP` keys a pass; `H` is `ATTN_TILE · R` (the heads of
/// the softmax).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn prompt<const R: usize, const KP: usize, const H: usize>(
    rows: &Rows,
    pos0: usize,
    qs: &[f32],
    p: &AttnParams<'_>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    const M: usize = ATTN_TILE;
    let d = p.head_dim;
    let per = R * d;
    let last = pos0 + M - 1;
    // Row `i` sees positions `lo[i] ..= pos0 + i`; its head `h`'s scores are at
    // `base[i] + h·n[i]`.
    let lo: [usize; M] = std::array::from_fn(|i| p.first_seen(pos0 + i));
    let n: [usize; M] = std::array::from_fn(|i| pos0 + i + 1 - lo[i]);
    let mut base = [0usize; M];
    for i in 1..M {
        base[i] = base[i - 1] + R * n[i - 1];
    }
    scores.clear();
    scores.resize(base[M - 1] + R * n[M - 1], 0.0);
    let mut dots = [0f32; 48];
    let mut keys = [std::ptr::null(); 8];
    let mut j = lo[0];
    while j <= last {
        let m = (last + 1 - j).min(2 * KP);
        for (t, key) in keys.iter_mut().take(2 * KP).enumerate() {
            *key = rows.key(j + t.min(m - 1));
        }
        // SAFETY: `d` values in each key and in each head of each of the `M` rows of `qs`.
        let acc = unsafe { qk::<R, M, KP>(&keys[..2 * KP], qs.as_ptr(), per, d) };
        dots_into(acc.as_flattened().as_flattened(), p.scale, &mut dots);
        for i in 0..M {
            // The positions of this pass that row `i` sees.
            let (from, to) = (j.max(lo[i]), (j + m).min(pos0 + i + 1));
            if from >= to {
                continue;
            }
            for h in 0..R {
                let (dst, src) = (base[i] + h * n[i] + from - lo[i], (i * R + h) * 2 * KP + from - j);
                if to - from == 2 * KP {
                    // A copy of a length known here: a few moves, not a call.
                    scores[dst..dst + 2 * KP].copy_from_slice(&dots[src..src + 2 * KP]);
                } else {
                    scores[dst..dst + to - from].copy_from_slice(&dots[src..src + to - from]);
                }
            }
        }
        j += m;
    }
    cap_scores(scores, p.softcap);
    debug_assert_eq!(H, M * R);
    let heads: [(usize, usize, Option<f32>); H] =
        std::array::from_fn(|t| (base[t / R] + (t % R) * n[t / R], n[t / R], p.sinks.map(|s| s[t % R])));
    softmax_heads(scores, &heads);
    // Two rows at a time (one with four heads), each value converted once for both.
    let pair = if R <= 3 { 2 } else { 1 };
    let w = |i: usize| -> [*const f32; R] { std::array::from_fn(|h| scores[base[i] + h * n[i]..].as_ptr()) };
    let optr = out.as_mut_ptr();
    let o = |i: usize| -> [*mut f32; R] {
        // SAFETY: `out` holds `M·R·d` values.
        std::array::from_fn(|h| unsafe { optr.add(i * per + h * d) })
    };
    let mut i = 0;
    while i < M {
        // SAFETY: `out` holds `M·R·d` values (written through the pointers only); every
        // weight is within `scores`.
        unsafe {
            if pair == 2 {
                let spans = [(lo[i], pos0 + i + 1), (lo[i + 1], pos0 + i + 2)];
                values::<R, 2>(rows, spans, [w(i), w(i + 1)], [o(i), o(i + 1)], d, false);
            } else {
                values::<R, 1>(rows, [(lo[i], pos0 + i + 1)], [w(i)], [o(i)], d, false);
            }
        }
        i += pair;
    }
}

/// The 8-lane partial dots of `2·KP` keys with each of the `R` heads of `M` query rows at
/// `qs` (`per` values a row, `d` a head): `acc[i][h][p]` holds key `2p`'s lanes in its low half
/// and key `2p + 1`'s in its high half, lane `l` being `Σ q[c + l]·k[c + l]` over `c` in steps
/// of 8, in order.
///
/// # Safety
/// Each key holds `d` f16 values; `qs` holds `M` rows of `per` values, `R` heads of `d`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // one query broadcast feeds the accumulators of every pair
unsafe fn qk<const R: usize, const M: usize, const KP: usize>(
    keys: &[*const u16],
    qs: *const f32,
    per: usize,
    d: usize,
) -> [[[__m512; KP]; R]; M] {
    let mut acc = [[[_mm512_setzero_ps(); KP]; R]; M];
    let mut c = 0;
    while c < d {
        // SAFETY (caller): `d` values in each key and each head.
        unsafe {
            let mut kk = [_mm512_setzero_ps(); KP];
            for p in 0..KP {
                let lo = _mm_loadu_si128(keys[2 * p].add(c).cast());
                let hi = _mm_loadu_si128(keys[2 * p + 1].add(c).cast());
                kk[p] = _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi));
            }
            for i in 0..M {
                for h in 0..R {
                    let q = _mm512_broadcast_f32x8(_mm256_loadu_ps(qs.add(i * per + h * d + c)));
                    for p in 0..KP {
                        acc[i][h][p] = _mm512_fmadd_ps(q, kk[p], acc[i][h][p]);
                    }
                }
            }
        }
        c += 8;
    }
    acc
}

/// Sixteen dots from eight registers of two 8-lane chains each (dot `2t` in `a[t]`'s low half,
/// `2t + 1` in its high half), each summed as `hsum8` sums one: lanes `l + (l + 4)`, then
/// `(0 + 2) + (1 + 3)` of those. Element `k` of the result is dot `k`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn sums16(a: &[__m512; 8]) -> __m512 {
    // Lanes 0–3 plus 4–7 of each chain: four dots a register, dot `4t + L` in 128-bit lane L.
    let s: [__m512; 4] = std::array::from_fn(|t| {
        let (x, y) = (a[2 * t], a[2 * t + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(x, y), _mm512_shuffle_f32x4::<0xDD>(x, y))
    });
    // Within each 128-bit lane: (0 + 2, 1 + 3) of two registers' dots.
    let w: [__m512; 2] = std::array::from_fn(|u| {
        let (x, y) = (s[2 * u], s[2 * u + 1]);
        _mm512_add_ps(_mm512_shuffle_ps::<0x44>(x, y), _mm512_shuffle_ps::<0xEE>(x, y))
    });
    // The two halves' sum: element `4L + e` is dot `4e + L`; put dot `k` at `k`.
    let f = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(w[0], w[1]), _mm512_shuffle_ps::<0xDD>(w[0], w[1]));
    _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), f)
}

/// The dots of `acc` (register `r`'s low half is dot `2r`, its high half `2r + 1`) times
/// `scale`, into `out`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn dots_into(acc: &[__m512], scale: f32, out: &mut [f32; 48]) {
    debug_assert!(acc.len() <= 24);
    let scale = _mm512_set1_ps(scale);
    for (g, chunk) in acc.chunks(8).enumerate() {
        let mut a = [_mm512_setzero_ps(); 8];
        a[..chunk.len()].copy_from_slice(chunk);
        // SAFETY: at most three groups of 16 in 48 values.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(16 * g), _mm512_mul_ps(sums16(&a), scale)) };
    }
}

/// Scaled dots as scores: capped, where the model caps them (`attend_any`'s order: scale,
/// then the cap).
fn cap_scores(scores: &mut [f32], cap: Option<f32>) {
    if let Some(cap) = cap {
        scores.iter_mut().for_each(|s| *s = softcap(*s, cap));
    }
}

/// Values `c0 ..` of the outputs of `ROWS` rows' `R` heads, 16·`U` values each: row `r` weighs
/// position `j` (in `spans[r]`, half-open) by `w[r][h][j − spans[r].0]`, summed over the
/// positions in order as `axpy` does; the results go to `out[r][h]`.
///
/// # Safety
/// Values `c0 .. c0 + 16·U` are within a row's `d`; each `w[r][h]` holds a weight for every
/// position of `spans[r]` and each `out[r][h]` has room for values `c0 .. c0 + 16·U`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn value_block<const R: usize, const ROWS: usize, const U: usize>(
    rows: &Rows,
    spans: [(usize, usize); ROWS],
    w: [[*const f32; R]; ROWS],
    out: [[*mut f32; R]; ROWS],
    c0: usize,
    prefetch: bool,
) {
    let end = spans.iter().map(|s| s.1).max().unwrap_or(0);
    let mut acc = [[[_mm512_setzero_ps(); U]; R]; ROWS];
    // The stretches between the spans' ends, each seen by the same rows.
    let mut cuts = [0usize; 4];
    for (r, s) in spans.iter().enumerate() {
        (cuts[2 * r], cuts[2 * r + 1]) = *s;
    }
    let cuts = &mut cuts[..2 * ROWS];
    cuts.sort_unstable();
    for k in 1..cuts.len() {
        let (from, to) = (cuts[k - 1], cuts[k]);
        let seen: [bool; ROWS] = std::array::from_fn(|r| spans[r].0 <= from && to <= spans[r].1);
        for j in from..to {
            let value = rows.value(j);
            if prefetch && j.is_multiple_of(4) && j + VALUES_AHEAD + 4 <= end {
                prefetch_rows(std::array::from_fn(|i| rows.value(j + VALUES_AHEAD + i).wrapping_add(c0)), 16 * U);
            }
            let mut v = [_mm512_setzero_ps(); U];
            for (u, v) in v.iter_mut().enumerate() {
                // SAFETY (caller): values `c0 + 16u .. +16` are within the row.
                *v = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(value.add(c0 + 16 * u).cast())) };
            }
            for r in 0..ROWS {
                if !seen[r] {
                    continue;
                }
                for h in 0..R {
                    // SAFETY (caller): a weight for every position of the span.
                    let a = _mm512_set1_ps(unsafe { *w[r][h].add(j - spans[r].0) });
                    for u in 0..U {
                        acc[r][h][u] = _mm512_fmadd_ps(a, v[u], acc[r][h][u]);
                    }
                }
            }
        }
    }
    for r in 0..ROWS {
        for h in 0..R {
            for (u, a) in acc[r][h].iter().enumerate() {
                // SAFETY (caller): room for values `c0 .. c0 + 16·U`.
                unsafe { _mm512_storeu_ps(out[r][h].add(c0 + 16 * u), *a) };
            }
        }
    }
}

/// All `d` values of the outputs of `ROWS` rows' `R` heads ([`value_block`], 64 at a time,
/// then 32 and 16).
///
/// # Safety
/// As [`value_block`], for values `0 .. d` (`d` a multiple of 16).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
unsafe fn values<const R: usize, const ROWS: usize>(
    rows: &Rows,
    spans: [(usize, usize); ROWS],
    w: [[*const f32; R]; ROWS],
    out: [[*mut f32; R]; ROWS],
    d: usize,
    prefetch: bool,
) {
    let mut c0 = 0;
    while c0 < d {
        // SAFETY (caller): as `value_block`'s.
        unsafe {
            match (d - c0) / 16 {
                4.. => {
                    value_block::<R, ROWS, 4>(rows, spans, w, out, c0, prefetch);
                    c0 += 64;
                }
                2 | 3 => {
                    value_block::<R, ROWS, 2>(rows, spans, w, out, c0, prefetch);
                    c0 += 32;
                }
                _ => {
                    value_block::<R, ROWS, 1>(rows, spans, w, out, c0, prefetch);
                    c0 += 16;
                }
            }
        }
    }
}

/// Asks for `rows` (f16, `d` values each) to be brought into the cache.
#[inline(always)]
fn prefetch_rows(rows: [*const u16; 4], d: usize) {
    for r in rows {
        for off in (0..d).step_by(32) {
            // SAFETY: a prefetch is a hint and never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(off).cast()) };
        }
    }
}

/// Each head's scores (`scores[at .. at + n]`, with its sink) turned into weights as
/// `attend_any` does: the largest, exponentials 16 at a time, the sum in position order, each
/// weight divided by it. The heads' sums run side by side, each still in order.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
fn softmax_heads<const H: usize>(scores: &mut [f32], heads: &[(usize, usize, Option<f32>); H]) {
    let mut maxes = [0f32; H];
    for (t, &(at, n, sink)) in heads.iter().enumerate() {
        let head = &mut scores[at..at + n];
        // The largest (order does not change it; a NaN score is passed over, as by `f32::max`).
        let mut mv = _mm512_set1_ps(sink.unwrap_or(f32::NEG_INFINITY));
        let mut k = 0;
        while k + 16 <= n {
            // SAFETY: 16 scores from `k`.
            mv = _mm512_max_ps(unsafe { _mm512_loadu_ps(head.as_ptr().add(k)) }, mv);
            k += 16;
        }
        let max = head[k..].iter().fold(_mm512_reduce_max_ps(mv), |m, &s| m.max(s));
        let mut k = 0;
        while k + 16 <= n {
            // SAFETY: 16 scores from `k`.
            unsafe {
                let x = _mm512_sub_ps(_mm512_loadu_ps(head.as_ptr().add(k)), _mm512_set1_ps(max));
                _mm512_storeu_ps(head.as_mut_ptr().add(k), exp16(x));
            }
            k += 16;
        }
        for s in &mut head[k..] {
            *s = exp(*s - max);
        }
        maxes[t] = max;
    }
    // The first `common` positions of every head, their sums side by side.
    let common = heads.iter().map(|h| h.1).min().unwrap_or(0);
    let at: [*const f32; H] = std::array::from_fn(|t| scores.as_ptr().wrapping_add(heads[t].0));
    let mut sums = [0f32; H];
    for k in 0..common {
        for t in 0..H {
            // SAFETY: position `k` is within every head's scores.
            sums[t] += unsafe { *at[t].add(k) };
        }
    }
    for (t, &(at, n, sink)) in heads.iter().enumerate() {
        let head = &mut scores[at..at + n];
        let mut sum = sums[t];
        for s in &head[common..] {
            sum += *s;
        }
        if let Some(sink) = sink {
            sum += exp(sink - maxes[t]);
        }
        head.iter_mut().for_each(|s| *s /= sum);
    }
}

/// [`exp`] of 16 values, each by the same operations.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")]
pub(super) fn exp16(x: __m512) -> __m512 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // `clamp`: NaN stays NaN (`max_ps`/`min_ps` return their second operand then).
    let x = _mm512_min_ps(_mm512_set1_ps(88.0), _mm512_max_ps(_mm512_set1_ps(-87.0), x));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(LOG2E),
    ));
    let neg = _mm512_sub_ps(_mm512_set1_ps(-0.0), n); // −n exactly, as `-n`
    let r = _mm512_fmadd_ps(neg, _mm512_set1_ps(LN2_LO), _mm512_fmadd_ps(neg, _mm512_set1_ps(LN2_HI), x));
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let e = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0));
    let bits = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)));
    _mm512_mul_ps(e, _mm512_castsi512_ps(bits))
}
