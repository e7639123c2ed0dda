//! The row operations of a forward pass on the CPU: norms, activations, rotary embeddings and
//! attention over the paged KV cache. Each works on one row (a token, or a token's head) and
//! computes it the same way whatever else is in the batch.

#![allow(unsafe_code)] // AVX2 loads of keys and values: see SAFETY notes.

use crate::config::{Activation, NormKind};
use crate::cpu::kv::{BLOCK_TOKENS, KvPool, KvRow};
use crate::cpu::quant::hsum8;

/// RMSNorm or LayerNorm with its weights (RMSNorm's unit offset folded into the weight).
#[derive(Debug, Clone)]
pub struct Norm {
    pub kind: NormKind,
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
}

impl Norm {
    pub fn new(kind: NormKind, mut weight: Vec<f32>, bias: Option<Vec<f32>>) -> Norm {
        if let NormKind::Rms { unit_offset: true, .. } = kind {
            weight.iter_mut().for_each(|w| *w += 1.0);
        }
        Norm { kind, weight, bias }
    }

    /// `out = norm(x)`; `x` and `out` have the norm's width (or a multiple of it: each
    /// `weight.len()` values are normalized on their own, as per-head norms are).
    pub fn apply(&self, x: &[f32], out: &mut [f32]) {
        let n = self.weight.len();
        for (xs, os) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            match self.kind {
                NormKind::Rms { eps, .. } => {
                    let sum2: f32 = xs.iter().map(|v| v * v).sum();
                    let m = (sum2 / n as f32 + eps as f32).sqrt();
                    for ((o, &v), &w) in os.iter_mut().zip(xs).zip(&self.weight) {
                        *o = v / m * w;
                    }
                }
                NormKind::Layer { eps } => {
                    let mean: f32 = xs.iter().sum::<f32>() / n as f32;
                    let var: f32 = xs.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32;
                    let s = (var + eps as f32).sqrt();
                    for (i, (o, &v)) in os.iter_mut().zip(xs).enumerate() {
                        *o = (v - mean) / s * self.weight[i] + self.bias.as_ref().map_or(0.0, |b| b[i]);
                    }
                }
            }
        }
    }
}

/// `erf`, to about 1.2e-7 relative error (Numerical Recipes' Chebyshev fit of `erfc`).
pub fn erf(x: f32) -> f32 {
    let x = f64::from(x);
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    (if x >= 0.0 { 1.0 - r } else { r - 1.0 }) as f32
}

/// `eˣ` to about 1 ulp, in plain arithmetic the compiler vectorizes (Cephes' `expf`: `x = n·ln 2
/// + r`, a degree-7 polynomial for `eʳ`, `2ⁿ` from the exponent bits). Inputs below −87 give
/// `e⁻⁸⁷` (≈ 1.6e−38, not 0), above 88 give `e⁸⁸`; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E).round_ties_even();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p = 1.987_569_1e-4f32;
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = p.mul_add(r, c);
    }
    let e = p.mul_add(r * r, r) + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `out[i] = act(x[i])`, or with `up`, `act(x[i])·up[i]` (a gated MLP).
pub fn activate_into(act: Activation, x: &[f32], up: Option<&[f32]>, out: &mut [f32]) {
    fn run(f: impl Fn(f32) -> f32, x: &[f32], up: Option<&[f32]>, out: &mut [f32]) {
        match up {
            Some(up) => out.iter_mut().zip(x.iter().zip(up)).for_each(|(o, (&x, &u))| *o = f(x) * u),
            None => out.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x)),
        }
    }
    match act {
        Activation::Silu => run(|x| x / (1.0 + exp(-x)), x, up, out),
        // 0.5·x·(1 + tanh(z)) = x / (1 + e^(−2z)).
        Activation::GeluTanh => run(
            |x| {
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                let z = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
                x / (1.0 + exp(-2.0 * z))
            },
            x,
            up,
            out,
        ),
        Activation::GeluErf => run(|x| 0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2)), x, up, out),
        Activation::ClampedSwiglu { alpha, limit } => {
            let g = |x: f32| {
                let g = x.min(limit);
                g / (1.0 + exp(-alpha * g))
            };
            match up {
                Some(up) => out
                    .iter_mut()
                    .zip(x.iter().zip(up))
                    .for_each(|(o, (&x, &u))| *o = g(x) * (u.clamp(-limit, limit) + 1.0)),
                None => out.iter_mut().zip(x).for_each(|(o, &x)| *o = g(x)),
            }
        }
    }
}

/// `tanh(x / cap)·cap`.
#[inline]
pub fn softcap(x: f32, cap: f32) -> f32 {
    (x / cap).tanh() * cap
}

/// Rotates one head's first `cos.len()·2` values in place: adjacent pairs when `interleaved`,
/// else the two halves.
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    if interleaved {
        for i in 0..half {
            let (a, b) = (x[2 * i], x[2 * i + 1]);
            x[2 * i] = a * cos[i] - b * sin[i];
            x[2 * i + 1] = a * sin[i] + b * cos[i];
        }
    } else {
        for i in 0..half {
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * cos[i] - b * sin[i];
            x[i + half] = b * cos[i] + a * sin[i];
        }
    }
}

/// What one head of attention needs to know.
#[derive(Debug, Clone, Copy)]
pub struct AttnParams<'a> {
    pub head_dim: usize,
    pub scale: f32,
    pub softcap: Option<f32>,
    pub window: Option<usize>,
    /// The heads' sink logits (gpt-oss): each joins its head's softmax as one more score.
    pub sinks: Option<&'a [f32]>,
}

impl AttnParams<'_> {
    /// The first position a row at `pos` sees: 0, or the start of its window.
    pub fn first_seen(&self, pos: usize) -> usize {
        self.window.map_or(0, |w| (pos + 1).saturating_sub(w))
    }
}

/// Whether the AVX-512 attention runs: an f16 cache, heads of a multiple of 16 values, at most
/// [`MAX_REP`] query heads per kv head, and the AVX-512 flavor.
#[cfg(target_arch = "x86_64")]
fn simd_attention(kv: &KvPool, d: usize, rep: usize) -> bool {
    rep <= MAX_REP
        && d.is_multiple_of(16)
        && matches!(kv.shape().dtype, crate::cpu::kv::KvDtype::F16)
        && crate::cpu::kernels::Flavor::detect() == crate::cpu::kernels::Flavor::Avx512
}

/// The query heads `qs` (`rep` heads of `head_dim` values, those sharing kv head `kvh`) at
/// position `pos` attending over positions `0..=pos` of their sequence (the last `window` of
/// them when there is a window): keys and values of layer `layer` in the blocks `table`.
/// `scores` is scratch; the heads' results go to `out` (`rep × head_dim`). Each key and value
/// is read once for all the heads; each head's arithmetic is that of attending alone.
#[allow(clippy::too_many_arguments)]
pub fn attend(
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
    let d = p.head_dim;
    let rep = qs.len() / d;
    #[cfg(target_arch = "x86_64")]
    if simd_attention(kv, d, rep) {
        // SAFETY: `simd_attention` holds only when the CPU has AVX-512 F/BW/VL/DQ and the pool
        // is f16 with heads of a multiple of 16 values.
        unsafe { super::attend512::attend(kv, layer, table, kvh, pos, qs, p, scores, out) };
        return;
    }
    attend_any(kv, layer, table, kvh, pos, qs, p, scores, out);
}

/// Rows of one sequence that [`attend_rows`] computes together, at most.
pub const ATTN_TILE: usize = 4;

/// [`attend`] for `m` (at most [`ATTN_TILE`]) consecutive rows of one sequence, at positions
/// `pos..pos + m` (a prompt's rows): `qs` holds each row's query heads after the other's, `out`
/// gets their results likewise. Each row's arithmetic is that of [`attend`] alone; each key
/// and value is read once for all the rows that see it.
#[allow(clippy::too_many_arguments)]
pub fn attend_rows(
    kv: &KvPool,
    layer: usize,
    table: &[u32],
    kvh: usize,
    pos: usize,
    m: usize,
    qs: &[f32],
    p: &AttnParams<'_>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let per = qs.len() / m.max(1);
    let (d, rep) = (p.head_dim, per / p.head_dim.max(1));
    #[cfg(target_arch = "x86_64")]
    if m == ATTN_TILE && simd_attention(kv, d, rep) {
        // SAFETY: as in `attend`.
        unsafe { super::attend512::attend_rows(kv, layer, table, kvh, pos, qs, p, scores, out) };
        return;
    }
    for i in 0..m {
        let rows = i * per..(i + 1) * per;
        attend(kv, layer, table, kvh, pos + i, &qs[rows.clone()], p, scores, &mut out[rows]);
    }
}

/// [`attend`] for any pool and flavor.
#[allow(clippy::too_many_arguments)]
fn attend_any(
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
    let d = p.head_dim;
    let rep = qs.len() / d;
    let lo = p.first_seen(pos);
    let n = pos + 1 - lo;
    scores.clear();
    scores.resize(rep * n, 0.0);
    let mut dots = [0f32; MAX_REP];
    for (k, j) in (lo..=pos).enumerate() {
        let key = kv.read(layer, false, table[j / BLOCK_TOKENS], kvh, j % BLOCK_TOKENS);
        for (h0, chunk) in qs.chunks(MAX_REP * d).enumerate() {
            dot_many(chunk, d, key, &mut dots);
            for (i, &dt) in dots[..chunk.len() / d].iter().enumerate() {
                let mut s = dt * p.scale;
                if let Some(cap) = p.softcap {
                    s = softcap(s, cap);
                }
                scores[(h0 * MAX_REP + i) * n + k] = s;
            }
        }
    }
    for (i, head) in scores.chunks_exact_mut(n).enumerate() {
        let sink = p.sinks.map(|s| s[i]);
        let max = head.iter().fold(sink.unwrap_or(f32::NEG_INFINITY), |m, &s| m.max(s));
        let mut sum = 0f32;
        for s in head.iter_mut() {
            *s = exp(*s - max);
            sum += *s;
        }
        if let Some(sink) = sink {
            sum += exp(sink - max);
        }
        head.iter_mut().for_each(|s| *s /= sum);
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    for (k, j) in (lo..=pos).enumerate() {
        let value = kv.read(layer, true, table[j / BLOCK_TOKENS], kvh, j % BLOCK_TOKENS);
        for (i, o) in out.chunks_exact_mut(d).enumerate() {
            axpy(scores[i * n + k], value, o);
        }
    }
}

/// Query heads per kv head that [`dot_many`] takes at once.
const MAX_REP: usize = 4;

/// `dots[i] = qs[i] · k` for the (at most [`MAX_REP`]) heads in `qs`, each as [`dot`] computes it.
#[inline]
fn dot_many(qs: &[f32], d: usize, k: KvRow<'_>, dots: &mut [f32; MAX_REP]) {
    #[cfg(target_arch = "x86_64")]
    if d.is_multiple_of(8) && crate::cpu::kernels::Flavor::detect() != crate::cpu::kernels::Flavor::Portable {
        // SAFETY: a SIMD flavor is chosen only when the CPU has AVX2, FMA and F16C.
        unsafe {
            match qs.len() / d {
                4 => simd::dot_many::<4>(qs, k, dots),
                3 => simd::dot_many::<3>(qs, k, dots),
                2 => simd::dot_many::<2>(qs, k, dots),
                _ => simd::dot_many::<1>(qs, k, dots),
            }
        }
        return;
    }
    for (q, o) in qs.chunks_exact(d).zip(dots.iter_mut()) {
        *o = dot(q, k);
    }
}

/// `q · k` in 8 lanes, summed in the shared order.
#[inline]
fn dot(q: &[f32], k: KvRow<'_>) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if q.len().is_multiple_of(8) && crate::cpu::kernels::Flavor::detect() != crate::cpu::kernels::Flavor::Portable {
        // SAFETY: a SIMD flavor is chosen only when the CPU has AVX2, FMA and F16C.
        return unsafe { simd::dot(q, k) };
    }
    let mut acc = [0f32; 8];
    for (j, &qv) in q.iter().enumerate() {
        let kv = match k {
            KvRow::F32(k) => k[j],
            KvRow::F16(k) => k[j].to_f32(),
        };
        acc[j % 8] = qv.mul_add(kv, acc[j % 8]);
    }
    hsum8(&acc)
}

/// `out += a·v`.
#[inline]
fn axpy(a: f32, v: KvRow<'_>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if out.len().is_multiple_of(8) && crate::cpu::kernels::Flavor::detect() != crate::cpu::kernels::Flavor::Portable {
        // SAFETY: as in `dot`.
        unsafe { simd::axpy(a, v, out) };
        return;
    }
    for (j, o) in out.iter_mut().enumerate() {
        let x = match v {
            KvRow::F32(v) => v[j],
            KvRow::F16(v) => v[j].to_f32(),
        };
        *o = a.mul_add(x, *o);
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::KvRow;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(k: KvRow<'_>, j: usize) -> __m256 {
        // SAFETY (caller): `j + 8 <= len`.
        unsafe {
            match k {
                KvRow::F32(k) => _mm256_loadu_ps(k.as_ptr().add(j)),
                KvRow::F16(k) => _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(j).cast())),
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot(q: &[f32], k: KvRow<'_>) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for j in (0..q.len()).step_by(8) {
            // SAFETY: `q` and `k` have the same length, a multiple of 8.
            unsafe { acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(j)), load8(k, j), acc) };
        }
        // SAFETY: this function's features include AVX2 and FMA.
        unsafe { crate::cpu::kernels::hsum8_avx2(acc) }
    }

    /// `N` heads' dots with one key, each accumulated as `dot` does it.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_many<const N: usize>(qs: &[f32], k: KvRow<'_>, dots: &mut [f32; super::MAX_REP]) {
        let d = qs.len() / N;
        let mut acc = [_mm256_setzero_ps(); N];
        for j in (0..d).step_by(8) {
            // SAFETY: `k` has `d` values, a multiple of 8; `qs` has `N·d`.
            unsafe {
                let kv = load8(k, j);
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(qs.as_ptr().add(i * d + j)), kv, *a);
                }
            }
        }
        for (o, a) in dots.iter_mut().zip(acc) {
            // SAFETY: this function's features include AVX2 and FMA.
            *o = unsafe { crate::cpu::kernels::hsum8_avx2(a) };
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn axpy(a: f32, v: KvRow<'_>, out: &mut [f32]) {
        let av = _mm256_set1_ps(a);
        for j in (0..out.len()).step_by(8) {
            // SAFETY: `out` and `v` have the same length, a multiple of 8.
            unsafe {
                let o = _mm256_loadu_ps(out.as_ptr().add(j));
                _mm256_storeu_ps(out.as_mut_ptr().add(j), _mm256_fmadd_ps(av, load8(v, j), o));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_gives_the_same_bits_on_every_path() {
        use crate::cpu::kv::{KvDtype, KvShape};
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut f = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 20001) as f32 / 10000.0 - 1.0
        };
        for (d, kvh) in [(64, 3), (256, 1), (48, 2), (80, 1)] {
            let kv = KvPool::new(KvShape { layers: 1, kv_heads: kvh, head_dim: d, dtype: KvDtype::F16 }, 64);
            let positions: usize = 70;
            let table: Vec<u32> = (0..positions.div_ceil(BLOCK_TOKENS)).map(|_| kv.alloc(u64::MAX).unwrap()).collect();
            for j in 0..positions {
                for h in 0..kvh {
                    for v in [false, true] {
                        let x: Vec<f32> = (0..d).map(|_| 3.0 * f()).collect();
                        // SAFETY: the blocks are this test's, one thread.
                        unsafe { kv.write(0, v, table[j / BLOCK_TOKENS], h, j % BLOCK_TOKENS, &x) };
                    }
                }
            }
            let sinks: Vec<f32> = (0..MAX_REP).map(|_| f()).collect();
            for rep in 1..=MAX_REP {
                let qs: Vec<f32> = (0..rep * d).map(|_| f()).collect();
                for (softcap, window, sinks) in
                    [(None, None, None), (Some(30.0), None, None), (None, Some(20), Some(&sinks[..rep]))]
                {
                    let p = AttnParams { head_dim: d, scale: 0.125, softcap, window, sinks };
                    for pos in [0, 15, 16, 33, 69] {
                        let (mut s1, mut s2) = (Vec::new(), Vec::new());
                        let (mut o1, mut o2) = (vec![f32::NAN; rep * d], vec![f32::NAN; rep * d]);
                        attend(&kv, 0, &table, kvh - 1, pos, &qs, &p, &mut s1, &mut o1);
                        attend_any(&kv, 0, &table, kvh - 1, pos, &qs, &p, &mut s2, &mut o2);
                        let bits = |o: &[f32]| o.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&o1), bits(&o2), "d {d} rep {rep} pos {pos} {softcap:?} {window:?}");
                    }
                    // Several rows of a prompt at once: each row as alone.
                    for (pos, m) in [(0, 4), (14, 3), (30, 2), (66, 4)] {
                        let qm: Vec<f32> = (0..m * rep * d).map(|_| f()).collect();
                        let (mut s1, mut s2) = (Vec::new(), Vec::new());
                        let mut together = vec![f32::NAN; m * rep * d];
                        attend_rows(&kv, 0, &table, kvh - 1, pos, m, &qm, &p, &mut s1, &mut together);
                        for i in 0..m {
                            let at = i * rep * d..(i + 1) * rep * d;
                            let mut alone = vec![f32::NAN; rep * d];
                            attend_any(&kv, 0, &table, kvh - 1, pos + i, &qm[at.clone()], &p, &mut s2, &mut alone);
                            let bits = |o: &[f32]| o.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            assert_eq!(bits(&together[at]), bits(&alone), "d {d} rep {rep} rows {pos}+{i} of {m}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn exp_of_sixteen_at_once_is_exp_of_each() {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::kernels::Flavor::detect() == crate::cpu::kernels::Flavor::Avx512 {
            let mut xs: Vec<f32> = (-1400..1400).map(|i| i as f32 * 0.0673).collect();
            xs.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, 1e-30, -1e-30, 88.5, -87.5]);
            xs.resize(xs.len().next_multiple_of(16), 0.5);
            for x in xs.chunks_exact(16) {
                let mut got = [0f32; 16];
                // SAFETY: the AVX-512 flavor was detected.
                unsafe {
                    use std::arch::x86_64::*;
                    _mm512_storeu_ps(got.as_mut_ptr(), crate::cpu::attend512::exp16(_mm512_loadu_ps(x.as_ptr())));
                }
                for (g, &x) in got.iter().zip(x) {
                    assert_eq!(g.to_bits(), exp(x).to_bits(), "exp({x})");
                }
            }
        }
    }

    #[test]
    fn erf_is_accurate_enough_for_gelu() {
        for (x, want) in
            [(0.0f32, 0.0f32), (0.5, 0.520_499_9), (1.0, 0.842_700_8), (-2.0, -0.995_322_3), (3.0, 0.999_977_9)]
        {
            assert!((erf(x) - want).abs() < 2e-7, "erf({x}) = {} not {want}", erf(x));
        }
    }

    #[test]
    fn exp_is_within_two_ulps_of_libm_and_activations_match_their_formulas() {
        let mut x = -90.0f32;
        while x < 89.0 {
            let (got, want) = (exp(x), x.clamp(-87.0, 88.0).exp());
            assert!((got - want).abs() <= 2.0 * f32::EPSILON * want, "exp({x}) = {got}, libm {want}");
            x += 0.013;
        }
        let xs: Vec<f32> = (-400..400).map(|i| i as f32 / 40.0).collect();
        let mut out = vec![0f32; xs.len()];
        activate_into(Activation::GeluTanh, &xs, None, &mut out);
        for (&x, &y) in xs.iter().zip(&out) {
            let want = 0.5
                * f64::from(x)
                * (1.0 + (0.797_884_560_8 * (f64::from(x) + 0.044715 * f64::from(x).powi(3))).tanh());
            assert!((f64::from(y) - want).abs() < 1e-6 * (1.0 + want.abs()), "gelu({x}) = {y}, want {want}");
        }
        activate_into(Activation::Silu, &xs, Some(&xs), &mut out);
        for (&x, &y) in xs.iter().zip(&out) {
            let want = f64::from(x) * f64::from(x) / (1.0 + (-f64::from(x)).exp());
            assert!((f64::from(y) - want).abs() < 1e-6 * (1.0 + want.abs()), "silu({x})·{x} = {y}, want {want}");
        }
    }

    /// The portable arithmetic of `dot` and `axpy` (what the SIMD code must reproduce).
    fn portable_dot(q: &[f32], k: &[half::f16]) -> f32 {
        let mut acc = [0f32; 8];
        for (j, (&a, b)) in q.iter().zip(k).enumerate() {
            acc[j % 8] = a.mul_add(b.to_f32(), acc[j % 8]);
        }
        hsum8(&acc)
    }

    #[test]
    fn attention_dots_and_sums_are_the_portable_arithmetic_to_the_bit() {
        let d = 64;
        let qs: Vec<f32> = (0..4 * d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let k: Vec<half::f16> = (0..d).map(|i| half::f16::from_f32(((i * 53 % 89) as f32 - 44.0) / 13.0)).collect();
        for rep in 1..=4 {
            let mut dots = [0f32; MAX_REP];
            dot_many(&qs[..rep * d], d, KvRow::F16(&k), &mut dots);
            for i in 0..rep {
                assert_eq!(
                    dots[i].to_bits(),
                    portable_dot(&qs[i * d..(i + 1) * d], &k).to_bits(),
                    "rep {rep} head {i}"
                );
                assert_eq!(dot(&qs[i * d..(i + 1) * d], KvRow::F16(&k)).to_bits(), dots[i].to_bits());
            }
        }
        let mut out: Vec<f32> = qs[..d].to_vec();
        let mut want = out.clone();
        axpy(0.37, KvRow::F16(&k), &mut out);
        for (w, v) in want.iter_mut().zip(&k) {
            *w = 0.37f32.mul_add(v.to_f32(), *w);
        }
        assert_eq!(out, want);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_keeps_the_norm() {
        let x: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        for interleaved in [false, true] {
            let mut y = x.clone();
            rope(&mut y, &[1.0; 4], &[0.0; 4], interleaved);
            assert_eq!(y, x);
            let (c, s) = (0.3f32.cos(), 0.3f32.sin());
            rope(&mut y, &[c; 4], &[s; 4], interleaved);
            let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
            assert!((n(&y) - n(&x)).abs() < 1e-4);
        }
    }
}
