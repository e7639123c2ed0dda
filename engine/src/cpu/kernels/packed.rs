//! The repacked formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K): 16 weight rows side by
//! side, so that a SIMD register holds one value group of 16 rows and an integer dot
//! instruction advances 16 outputs at once — one output per lane, with the one-accumulator rule
//! of [`super::super::quant`]. A batch of tokens reuses each unpacked block of weights for
//! every token, so the weights are read and unpacked once per step, not once per sequence.
//!
//! Layout. Rows are taken 16 at a time (a *group*; the last is padded with zero rows). A
//! group's blocks follow one another, each a record of `16 × block_bytes` bytes — the same
//! size as the 16 rows' GGUF blocks, so a matrix is rearranged in place. Codes sit in 64-byte
//! planes, plane byte `4r + i` for row `r`: per 32 values, 4 planes, plane `p` holding code
//! `4p + i` in its low nibble and code `16 + 4p + i` in its high one (Q8_0: 8 planes of the
//! codes `q + 128`, plane `c` holding code `4c + i`). A record holds, in order:
//! - Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: the 16 rows' scales `d` (f16 bits); the mins `m` (Q4_1, Q5_1);
//!   the fifth bits (Q5_0, Q5_1: 8 masks of 64 bits, mask `c` bit `4r + i` = bit 4 of row `r`'s
//!   code `4c + i`); the code planes.
//! - Q4_K: `d`, `dmin` (f16 bits); the 12 bytes of 6-bit scales and mins as 3 planes of 32-bit
//!   words (plane `w`, word `r` = bytes `4w..4w+4` of row `r`'s); 32 code planes (4 per group
//!   of 32 values).
//! - Q6_K: `d`; the 16 sub-block scales (i8) as 16 rows of 16 bytes; 32 planes of the codes'
//!   low nibbles; 16 planes of their high 2 bits (per group of 32 values two: chunk `c` of the
//!   group in plane `c / 4`, bits `2·(c % 4)`).
//!
//! The GGUF bytes of a row can be rebuilt exactly ([`row_bytes`]), for embedding lookups and
//! for splitting a matrix by rows.

#![allow(unsafe_code)] // SIMD intrinsics behind runtime feature checks: see the SAFETY notes.

use std::ops::Range;

use super::super::quant::{Kind, dot32_ref, dotk_ref, unpack_k, unpack32};
use super::ActsRef;

/// Rows side by side in a group.
pub const LANES: usize = 16;

/// Where a record's parts are, for `kind`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Record {
    /// Bytes of one record (one block of 16 rows).
    pub bytes: usize,
    /// Offset of the mins (Q4_1, Q5_1) or `dmin` (Q4_K).
    pub m: usize,
    /// Offset of the fifth-bit masks (Q5_0, Q5_1).
    pub hb: usize,
    /// Offset of the scales (Q4_K's words, Q6_K's bytes).
    pub scales: usize,
    /// Offset of the code planes.
    pub codes: usize,
    /// Offset of Q6_K's high-bit planes.
    pub high: usize,
}

impl Record {
    pub const fn of(kind: Kind) -> Record {
        let bytes = LANES * kind.block_bytes();
        let d = 2 * LANES;
        match kind {
            Kind::Q4K => Record { bytes, m: d, hb: 0, scales: 2 * d, codes: 2 * d + 3 * 64, high: 0 },
            Kind::Q6K => Record { bytes, m: 0, hb: 0, scales: d, codes: d + 256, high: d + 256 + 32 * 64 },
            _ => {
                let hb = if kind.has_min() { 2 * d } else { d };
                let codes = if matches!(kind, Kind::Q5_0 | Kind::Q5_1) { hb + 64 } else { hb };
                Record { bytes, m: d, hb, scales: 0, codes, high: 0 }
            }
        }
    }
}

/// Puts code `u` (value `k` of a block) of lane `lane` into a record.
fn put_code(kind: Kind, r: &Record, rec: &mut [u8], lane: usize, k: usize, u: u8) {
    let (g, c, i) = (k / 32, (k % 32) / 4, k % 4);
    let byte = 4 * lane + i;
    if kind == Kind::Q8_0 {
        rec[r.codes + 64 * c + byte] = u;
        return;
    }
    rec[r.codes + 64 * (4 * g + c % 4) + byte] |= (u & 0x0F) << (4 * (c / 4));
    match kind {
        Kind::Q5_0 | Kind::Q5_1 if u & 0x10 != 0 => rec[r.hb + 8 * c + byte / 8] |= 1 << (byte % 8),
        Kind::Q6K => rec[r.high + 64 * (2 * g + c / 4) + byte] |= ((u >> 4) & 3) << (2 * (c % 4)),
        _ => {}
    }
}

/// Code `k` of lane `lane` in a record.
fn code(kind: Kind, r: &Record, rec: &[u8], lane: usize, k: usize) -> u8 {
    let (g, c, i) = (k / 32, (k % 32) / 4, k % 4);
    let byte = 4 * lane + i;
    if kind == Kind::Q8_0 {
        return rec[r.codes + 64 * c + byte];
    }
    let mut u = (rec[r.codes + 64 * (4 * g + c % 4) + byte] >> (4 * (c / 4))) & 0x0F;
    match kind {
        Kind::Q5_0 | Kind::Q5_1 if rec[r.hb + 8 * c + byte / 8] & (1 << (byte % 8)) != 0 => u |= 0x10,
        Kind::Q6K => u |= ((rec[r.high + 64 * (2 * g + c / 4) + byte] >> (2 * (c % 4))) & 3) << 4,
        _ => {}
    }
    u
}

/// The packed bytes of a matrix of `rows` rows given as GGUF blocks, rearranged in place one
/// group at a time (a group takes the bytes its 16 rows took), so that packing a large matrix
/// never holds it twice; the last group's missing rows are added as zeros.
pub fn pack(kind: Kind, rows: usize, cols: usize, mut bytes: Vec<u8>) -> Vec<u8> {
    debug_assert!(kind.packed());
    let kb = cols / kind.block_values();
    let bb = kind.block_bytes();
    let r = Record::of(kind);
    let group_bytes = LANES * kb * bb;
    bytes.resize(rows.div_ceil(LANES) * group_bytes, 0);
    let mut rows16 = vec![0u8; group_bytes];
    for group in bytes.chunks_exact_mut(group_bytes) {
        rows16.copy_from_slice(group);
        group.fill(0);
        for lane in 0..LANES {
            for b in 0..kb {
                let blk = &rows16[(lane * kb + b) * bb..(lane * kb + b + 1) * bb];
                let rec = &mut group[b * r.bytes..(b + 1) * r.bytes];
                // Scales keep their bytes (f16 bits, 6-bit packs, i8).
                match kind {
                    Kind::Q4K => {
                        rec[2 * lane..2 * lane + 2].copy_from_slice(&blk[0..2]);
                        rec[r.m + 2 * lane..r.m + 2 * lane + 2].copy_from_slice(&blk[2..4]);
                        for w in 0..3 {
                            let at = r.scales + 64 * w + 4 * lane;
                            rec[at..at + 4].copy_from_slice(&blk[4 + 4 * w..8 + 4 * w]);
                        }
                    }
                    Kind::Q6K => {
                        rec[2 * lane..2 * lane + 2].copy_from_slice(&blk[208..210]);
                        for s in 0..16 {
                            rec[r.scales + 16 * s + lane] = blk[192 + s];
                        }
                    }
                    _ => {
                        rec[2 * lane..2 * lane + 2].copy_from_slice(&blk[0..2]);
                        if kind.has_min() {
                            rec[r.m + 2 * lane..r.m + 2 * lane + 2].copy_from_slice(&blk[2..4]);
                        }
                    }
                }
                let codes: &[u8] =
                    if matches!(kind, Kind::Q4K | Kind::Q6K) { &unpack_k(kind, blk).u } else { &unpack32(kind, blk).u };
                for (k, &u) in codes.iter().enumerate() {
                    put_code(kind, &r, rec, lane, k, u);
                }
            }
        }
    }
    bytes
}

/// Row `r`'s GGUF bytes, rebuilt from the packed matrix, into `out` (one row's bytes).
pub fn row_bytes(kind: Kind, packed: &[u8], cols: usize, r: usize, out: &mut [u8]) {
    let kb = cols / kind.block_values();
    let bb = kind.block_bytes();
    let rd = Record::of(kind);
    let (g, lane) = (r / LANES, r % LANES);
    for (b, blk) in out.chunks_exact_mut(bb).enumerate().take(kb) {
        let at = (g * kb + b) * rd.bytes;
        let rec = &packed[at..at + rd.bytes];
        blk.fill(0);
        let u = |k: usize| code(kind, &rd, rec, lane, k);
        let d = &rec[2 * lane..2 * lane + 2];
        match kind {
            Kind::Q4K => {
                blk[0..2].copy_from_slice(d);
                blk[2..4].copy_from_slice(&rec[rd.m + 2 * lane..rd.m + 2 * lane + 2]);
                for w in 0..3 {
                    let at = rd.scales + 64 * w + 4 * lane;
                    blk[4 + 4 * w..8 + 4 * w].copy_from_slice(&rec[at..at + 4]);
                }
                for j in 0..4 {
                    for l in 0..32 {
                        blk[16 + 32 * j + l] = (u(64 * j + l) & 0x0F) | ((u(64 * j + 32 + l) & 0x0F) << 4);
                    }
                }
            }
            Kind::Q6K => {
                for half in 0..2 {
                    let base = 128 * half;
                    for l in 0..32 {
                        let q = |o: usize| u(base + l + o);
                        blk[64 * half + l] = (q(0) & 0x0F) | ((q(64) & 0x0F) << 4);
                        blk[64 * half + l + 32] = (q(32) & 0x0F) | ((q(96) & 0x0F) << 4);
                        blk[128 + 32 * half + l] =
                            (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
                    }
                }
                for s in 0..16 {
                    blk[192 + s] = rec[rd.scales + 16 * s + lane];
                }
                blk[208..210].copy_from_slice(d);
            }
            Kind::Q8_0 => {
                blk[0..2].copy_from_slice(d);
                for k in 0..32 {
                    blk[2 + k] = u(k) ^ 0x80;
                }
            }
            _ => {
                blk[0..2].copy_from_slice(d);
                let (qs, qh) = match kind {
                    Kind::Q4_0 => (2, None),
                    Kind::Q4_1 => (4, None),
                    Kind::Q5_0 => (6, Some(2)),
                    _ => (8, Some(4)),
                };
                if kind.has_min() {
                    blk[2..4].copy_from_slice(&rec[rd.m + 2 * lane..rd.m + 2 * lane + 2]);
                }
                let mut high = 0u32;
                for j in 0..16 {
                    let (lo, hi) = (u(j), u(j + 16));
                    blk[qs + j] = (lo & 0x0F) | ((hi & 0x0F) << 4);
                    high |= u32::from(lo >> 4) << j | u32::from(hi >> 4) << (j + 16);
                }
                if let Some(at) = qh {
                    blk[at..at + 4].copy_from_slice(&high.to_le_bytes());
                }
            }
        }
    }
}

/// `out[t·ld + (r − rows.start)] = W[r] · x[t]`, one row at a time from its rebuilt GGUF bytes
/// (the portable flavor: the reference itself).
pub fn matmul_portable(
    kind: Kind,
    packed: &[u8],
    cols: usize,
    x: &ActsRef<'_>,
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let kb = cols / kind.block_values();
    let mut row = vec![0u8; kb * kind.block_bytes()];
    for r in rows.clone() {
        row_bytes(kind, packed, cols, r, &mut row);
        for t in 0..x.tokens {
            out[t * ld + r - rows.start] = if matches!(kind, Kind::Q4K | Kind::Q6K) {
                dotk_ref(kind, &row, &x.q8k[t * kb..(t + 1) * kb])
            } else {
                dot32_ref(kind, &row, &x.q8[t * kb..(t + 1) * kb])
            };
        }
    }
}

/// Calls `$f::<K, ...>` with the packed kind `$kind` as a const generic.
#[cfg(target_arch = "x86_64")]
macro_rules! by_packed {
    ($kind:expr, $f:ident $(::<$($g:tt),*>)? ($($a:expr),* $(,)?)) => {
        match $kind {
            Kind::Q4_0 => $f::<{ Kind::Q4_0 as u8 } $($(, $g)*)?>($($a),*),
            Kind::Q4_1 => $f::<{ Kind::Q4_1 as u8 } $($(, $g)*)?>($($a),*),
            Kind::Q5_0 => $f::<{ Kind::Q5_0 as u8 } $($(, $g)*)?>($($a),*),
            Kind::Q5_1 => $f::<{ Kind::Q5_1 as u8 } $($(, $g)*)?>($($a),*),
            Kind::Q8_0 => $f::<{ Kind::Q8_0 as u8 } $($(, $g)*)?>($($a),*),
            _ => unreachable!("not a packed format"),
        }
    };
}

/// What a tile reads and where it writes.
#[cfg(target_arch = "x86_64")]
pub(super) struct Tile<'a, A> {
    /// The group's first record.
    pub group: *const u8,
    pub kb: usize,
    pub acts: &'a [A],
    /// The tile's first token.
    pub t0: usize,
    /// The lanes to write (rows `group·16 + lanes`).
    pub lanes: Range<usize>,
    /// Where lane 0 of token `t0` goes, as an offset into `out` that may be negative (lanes
    /// before the range are never written).
    pub out: *mut f32,
    pub at: isize,
    pub ld: usize,
}

#[cfg(target_arch = "x86_64")]
impl<A> Tile<'_, A> {
    /// Writes lanes `self.lanes` of `v` (16 outputs) for token `t0 + t`.
    ///
    /// # Safety
    /// The written outputs are within `out`.
    #[inline(always)]
    unsafe fn store(&self, t: usize, v: &[f32; LANES]) {
        for lane in self.lanes.clone() {
            let at = self.at + (t * self.ld + lane) as isize;
            // SAFETY (caller): a lane in range lands inside `out`.
            unsafe { *self.out.offset(at) = v[lane] };
        }
    }
}

/// How far ahead of the record being computed the packed kernels ask for the weights: a
/// group's records are read in order, and a matrix much larger than the caches (a model's
/// weights are all read once a step) otherwise waits on memory at every record. Measured on
/// SmolLM2 (`batch_bench`): 4 records of 320 bytes ahead took a 16-sequence step from 17.7 to
/// 15.7 ms, 16 records (5 KiB) to 11.2 against 12.7; 32 and 64 records were no better.
#[cfg(target_arch = "x86_64")]
const PREFETCH_BYTES: usize = 16 * 320;

/// Asks for the `bytes` of weights `PREFETCH_BYTES` after `rec` to be brought into the cache.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead(rec: *const u8, bytes: usize) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    // A prefetch never faults (past the matrix's end included) and reads nothing;
    // `wrapping_add` keeps the address arithmetic defined there.
    let ahead = rec.wrapping_add(PREFETCH_BYTES);
    let mut line = 0;
    while line < bytes {
        // SAFETY: a prefetch is a hint: it neither reads nor faults.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast()) };
        line += 64;
    }
}

/// Runs `tile(t, n)` over each group of `rows` and each run of at most `per` tokens.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn for_each_tile<A>(
    kind: Kind,
    packed: &[u8],
    cols: usize,
    acts: &[A],
    tokens: usize,
    rows: &Range<usize>,
    out: &mut [f32],
    ld: usize,
    per: usize,
    mut tile: impl FnMut(&Tile<'_, A>, usize),
) {
    let kb = cols / kind.block_values();
    let rec = Record::of(kind);
    let out = out.as_mut_ptr();
    for g in rows.start / LANES..rows.end.div_ceil(LANES) {
        let first = g * LANES;
        let lanes = rows.start.max(first) - first..rows.end.min(first + LANES) - first;
        let mut t0 = 0;
        while t0 < tokens {
            let n = (tokens - t0).min(per);
            let t = Tile {
                group: packed[g * kb * rec.bytes..].as_ptr(),
                kb,
                acts,
                t0,
                lanes: lanes.clone(),
                out,
                at: (t0 * ld) as isize + first as isize - rows.start as isize,
                ld,
            };
            tile(&t, n);
            t0 += n;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{LANES, Record, Tile, for_each_tile, prefetch_ahead};
    use crate::cpu::quant::{ActBlock, Kind};

    /// Rows `rows` times `tokens` activation rows, 16 rows per register.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/DQ/VNNI; `packed` is a whole packed matrix of `cols`
    /// columns holding the rows; `acts` holds `tokens` rows; `out` holds every output.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul(
        kind: Kind,
        packed: &[u8],
        cols: usize,
        acts: &[ActBlock],
        tokens: usize,
        rows: Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        for_each_tile(kind, packed, cols, acts, tokens, &rows, out, ld, 4, |t, n| {
            // SAFETY: the caller's contract, passed on.
            unsafe {
                match n {
                    4 => by_packed!(kind, tile::<4>(t)),
                    3 => by_packed!(kind, tile::<3>(t)),
                    2 => by_packed!(kind, tile::<2>(t)),
                    _ => by_packed!(kind, tile::<1>(t)),
                }
            }
        });
    }

    /// The 8 code registers of a record: plane `c` = codes `4c..4c+4` of the 16 rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    unsafe fn codes<const K: u8>(rec: *const u8) -> [__m512i; 8] {
        let kind = Kind::from_id(K);
        let r = Record::of(kind);
        // SAFETY (caller): `rec` is a whole record.
        unsafe {
            let p = rec.add(r.codes);
            if kind == Kind::Q8_0 {
                return std::array::from_fn(|c| _mm512_loadu_si512(p.add(64 * c).cast()));
            }
            let low = _mm512_set1_epi8(0x0F);
            let planes: [__m512i; 4] = std::array::from_fn(|c| _mm512_loadu_si512(p.add(64 * c).cast()));
            let mut w: [__m512i; 8] = std::array::from_fn(|c| {
                if c < 4 {
                    _mm512_and_si512(planes[c], low)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16(planes[c - 4], 4), low)
                }
            });
            if matches!(kind, Kind::Q5_0 | Kind::Q5_1) {
                let hb = rec.add(r.hb).cast::<u64>();
                let sixteen = _mm512_set1_epi8(0x10);
                for (c, w) in w.iter_mut().enumerate() {
                    *w = _mm512_mask_add_epi8(*w, std::ptr::read_unaligned(hb.add(c)), *w, sixteen);
                }
            }
            w
        }
    }

    /// Tokens `t0..t0+T` of one group.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    unsafe fn tile<const K: u8, const T: usize>(t: &Tile<'_, ActBlock>) {
        let kind = Kind::from_id(K);
        let r = Record::of(kind);
        let o = kind.offset();
        let mut acc = [_mm512_setzero_ps(); T];
        let mut off = [_mm512_setzero_ps(); T];
        for b in 0..t.kb {
            // SAFETY: the group holds `kb` records; the tokens' blocks exist (the caller's
            // contract); the activation codes are 32 bytes read 4 at a time.
            unsafe {
                let rec = t.group.add(b * r.bytes);
                prefetch_ahead(rec, r.bytes);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(rec.cast()));
                let m = if kind.has_min() {
                    _mm512_cvtph_ps(_mm256_loadu_si256(rec.add(r.m).cast()))
                } else {
                    _mm512_setzero_ps()
                };
                let w = codes::<K>(rec);
                for i in 0..T {
                    let a = t.acts.get_unchecked((t.t0 + i) * t.kb + b);
                    let q = a.q.as_ptr().cast::<i32>();
                    let mut s = _mm512_set1_epi32(-o * a.asum);
                    for (c, w) in w.iter().enumerate() {
                        s = _mm512_dpbusd_epi32(s, *w, _mm512_set1_epi32(std::ptr::read_unaligned(q.add(c))));
                    }
                    acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(a.d)), _mm512_cvtepi32_ps(s), acc[i]);
                    if kind.has_min() {
                        off[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(a.s), off[i]);
                    }
                }
            }
        }
        for i in 0..T {
            let v = if kind.has_min() { _mm512_add_ps(acc[i], off[i]) } else { acc[i] };
            let mut lanes = [0f32; LANES];
            // SAFETY: 16 floats; the written lanes are within `out` (the caller's contract).
            unsafe {
                _mm512_storeu_ps(lanes.as_mut_ptr(), v);
                t.store(i, &lanes);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512_k {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{LANES, Record, Tile, for_each_tile, prefetch_ahead};
    use crate::cpu::quant::{ActBlockK, Kind};

    /// Rows `rows` of a packed Q4_K or Q6_K matrix times `tokens` Q8_K activation rows.
    ///
    /// # Safety
    /// As `super::avx512::matmul`, with Q8_K activations.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul(
        kind: Kind,
        packed: &[u8],
        cols: usize,
        acts: &[ActBlockK],
        tokens: usize,
        rows: Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        const Q4K: u8 = Kind::Q4K as u8;
        const Q6K: u8 = Kind::Q6K as u8;
        for_each_tile(kind, packed, cols, acts, tokens, &rows, out, ld, 4, |t, n| {
            // SAFETY: the caller's contract, passed on.
            unsafe {
                match (kind, n) {
                    (Kind::Q4K, 4) => tile::<Q4K, 4>(t),
                    (Kind::Q4K, 3) => tile::<Q4K, 3>(t),
                    (Kind::Q4K, 2) => tile::<Q4K, 2>(t),
                    (Kind::Q4K, _) => tile::<Q4K, 1>(t),
                    (_, 4) => tile::<Q6K, 4>(t),
                    (_, 3) => tile::<Q6K, 3>(t),
                    (_, 2) => tile::<Q6K, 2>(t),
                    _ => tile::<Q6K, 1>(t),
                }
            }
        });
    }

    /// The 8 code registers of group `g` (values `32g..32g+32`) of a record.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    unsafe fn codes<const K: u8>(rec: *const u8, g: usize) -> [__m512i; 8] {
        let kind = Kind::from_id(K);
        let r = Record::of(kind);
        // SAFETY (caller): `rec` is a whole record.
        unsafe {
            let p = rec.add(r.codes + 64 * 4 * g);
            let low = _mm512_set1_epi8(0x0F);
            let planes: [__m512i; 4] = std::array::from_fn(|c| _mm512_loadu_si512(p.add(64 * c).cast()));
            let mut w: [__m512i; 8] = std::array::from_fn(|c| {
                if c < 4 {
                    _mm512_and_si512(planes[c], low)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16(planes[c - 4], 4), low)
                }
            });
            if kind == Kind::Q6K {
                let h = rec.add(r.high + 64 * 2 * g);
                let high = [_mm512_loadu_si512(h.cast()), _mm512_loadu_si512(h.add(64).cast())];
                let bits = _mm512_set1_epi8(0x30);
                for (c, w) in w.iter_mut().enumerate() {
                    // Bits 2·(c % 4) of the plane moved to bits 4–5 of each byte.
                    let x = high[c / 4];
                    let at = match c % 4 {
                        0 => _mm512_slli_epi16(x, 4),
                        1 => _mm512_slli_epi16(x, 2),
                        2 => x,
                        _ => _mm512_srli_epi16(x, 2),
                    };
                    *w = _mm512_or_si512(*w, _mm512_and_si512(at, bits));
                }
            }
            w
        }
    }

    /// Q4_K's 6-bit scale and min of group `g` for the 16 rows, from the words of their
    /// 12-byte packs (as `quant::scale_min_k4`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")]
    fn scale_min(w: &[__m512i; 3], g: usize) -> (__m512i, __m512i) {
        let shr = |v: __m512i, n: usize| _mm512_srlv_epi32(v, _mm512_set1_epi32(n as i32));
        let and = |v: __m512i, m: i32| _mm512_and_si512(v, _mm512_set1_epi32(m));
        if g < 4 {
            (and(shr(w[0], 8 * g), 63), and(shr(w[1], 8 * g), 63))
        } else {
            let k = 8 * (g - 4);
            let top = |v: __m512i| _mm512_slli_epi32(and(shr(v, k + 6), 3), 4);
            (
                _mm512_or_si512(and(shr(w[2], k), 0x0F), top(w[0])),
                _mm512_or_si512(and(shr(w[2], k + 4), 0x0F), top(w[1])),
            )
        }
    }

    /// Tokens `t0..t0+T` of one group.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")]
    unsafe fn tile<const K: u8, const T: usize>(t: &Tile<'_, ActBlockK>) {
        let kind = Kind::from_id(K);
        let r = Record::of(kind);
        let q4k = kind == Kind::Q4K;
        let mut acc = [_mm512_setzero_ps(); T];
        let mut off = [_mm512_setzero_ps(); T];
        for b in 0..t.kb {
            // SAFETY: the group holds `kb` records; the tokens' blocks exist (the caller's
            // contract); the activation codes are 256 bytes read 4 at a time.
            unsafe {
                let rec = t.group.add(b * r.bytes);
                prefetch_ahead(rec, r.bytes);
                let acts: [&ActBlockK; T] = std::array::from_fn(|i| t.acts.get_unchecked((t.t0 + i) * t.kb + b));
                let mut isum = [_mm512_setzero_si512(); T];
                let mut imins = [_mm512_setzero_si512(); T];
                let words: [__m512i; 3] = std::array::from_fn(|w| {
                    if q4k { _mm512_loadu_si512(rec.add(r.scales + 64 * w).cast()) } else { _mm512_setzero_si512() }
                });
                for g in 0..8 {
                    let w = codes::<K>(rec, g);
                    if q4k {
                        let (sc, mn) = scale_min(&words, g);
                        for (i, a) in acts.iter().enumerate() {
                            let q = a.q.as_ptr().add(32 * g).cast::<i32>();
                            let mut s = _mm512_setzero_si512();
                            for (c, w) in w.iter().enumerate() {
                                s = _mm512_dpbusd_epi32(s, *w, _mm512_set1_epi32(std::ptr::read_unaligned(q.add(c))));
                            }
                            isum[i] = _mm512_add_epi32(isum[i], _mm512_mullo_epi32(s, sc));
                            imins[i] = _mm512_add_epi32(imins[i], _mm512_mullo_epi32(mn, _mm512_set1_epi32(a.gsum[g])));
                        }
                    } else {
                        let sc = |s: usize| _mm512_cvtepi8_epi32(_mm_loadu_si128(rec.add(r.scales + 16 * s).cast()));
                        let (sc0, sc1) = (sc(2 * g), sc(2 * g + 1));
                        for (i, a) in acts.iter().enumerate() {
                            let q = a.q.as_ptr().add(32 * g).cast::<i32>();
                            let mut s0 = _mm512_set1_epi32(-32 * a.ssum[2 * g]);
                            let mut s1 = _mm512_set1_epi32(-32 * a.ssum[2 * g + 1]);
                            for c in 0..4 {
                                s0 = _mm512_dpbusd_epi32(
                                    s0,
                                    w[c],
                                    _mm512_set1_epi32(std::ptr::read_unaligned(q.add(c))),
                                );
                                s1 = _mm512_dpbusd_epi32(
                                    s1,
                                    w[c + 4],
                                    _mm512_set1_epi32(std::ptr::read_unaligned(q.add(c + 4))),
                                );
                            }
                            isum[i] = _mm512_add_epi32(
                                isum[i],
                                _mm512_add_epi32(_mm512_mullo_epi32(s0, sc0), _mm512_mullo_epi32(s1, sc1)),
                            );
                        }
                    }
                }
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(rec.cast()));
                for (i, a) in acts.iter().enumerate() {
                    acc[i] =
                        _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(a.d)), _mm512_cvtepi32_ps(isum[i]), acc[i]);
                    if q4k {
                        let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(rec.add(r.m).cast()));
                        // −(mins as f32): the sign flipped exactly.
                        let neg = _mm512_castsi512_ps(_mm512_xor_si512(
                            _mm512_castps_si512(_mm512_cvtepi32_ps(imins[i])),
                            _mm512_set1_epi32(i32::MIN),
                        ));
                        off[i] = _mm512_fmadd_ps(_mm512_mul_ps(dmin, _mm512_set1_ps(a.d)), neg, off[i]);
                    }
                }
            }
        }
        for i in 0..T {
            let v = if q4k { _mm512_add_ps(acc[i], off[i]) } else { acc[i] };
            let mut lanes = [0f32; LANES];
            // SAFETY: 16 floats; the written lanes are within `out` (the caller's contract).
            unsafe {
                _mm512_storeu_ps(lanes.as_mut_ptr(), v);
                t.store(i, &lanes);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{LANES, Record, Tile, for_each_tile, prefetch_ahead};
    use crate::cpu::kernels::avx2::fifth_bits;
    use crate::cpu::quant::{ActBlock, Kind};

    /// Rows `rows` times `tokens` activation rows, 8 rows per register.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; the rest as `super::avx512::matmul`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul(
        kind: Kind,
        packed: &[u8],
        cols: usize,
        acts: &[ActBlock],
        tokens: usize,
        rows: Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        for_each_tile(kind, packed, cols, acts, tokens, &rows, out, ld, 2, |t, n| {
            // SAFETY: the caller's contract, passed on.
            unsafe {
                let mut v = [[0f32; LANES]; 2];
                for half in 0..2 {
                    if t.lanes.start >= 8 * (half + 1) || t.lanes.end <= 8 * half {
                        continue;
                    }
                    match n {
                        2 => by_packed!(kind, half_tile::<2>(t, half, &mut v)),
                        _ => by_packed!(kind, half_tile::<1>(t, half, &mut v)),
                    }
                }
                for (i, v) in v.iter().enumerate().take(n) {
                    t.store(i, v);
                }
            }
        });
    }

    /// The 8 code registers of lanes `8·half..8·half+8` of a record (plane `c` = codes
    /// `4c..4c+4`), as signed codes `q` for Q8_0.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn codes<const K: u8>(rec: *const u8, half: usize) -> [__m256i; 8] {
        let kind = Kind::from_id(K);
        let r = Record::of(kind);
        // SAFETY (caller): `rec` is a whole record.
        unsafe {
            let p = rec.add(r.codes + 32 * half);
            if kind == Kind::Q8_0 {
                let flip = _mm256_set1_epi8(-128);
                return std::array::from_fn(|c| _mm256_xor_si256(_mm256_loadu_si256(p.add(64 * c).cast()), flip));
            }
            let low = _mm256_set1_epi8(0x0F);
            let planes: [__m256i; 4] = std::array::from_fn(|c| _mm256_loadu_si256(p.add(64 * c).cast()));
            let mut w: [__m256i; 8] = std::array::from_fn(|c| {
                if c < 4 {
                    _mm256_and_si256(planes[c], low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(planes[c - 4], 4), low)
                }
            });
            if matches!(kind, Kind::Q5_0 | Kind::Q5_1) {
                let hb = rec.add(r.hb + 4 * half);
                for (c, w) in w.iter_mut().enumerate() {
                    let bits = std::ptr::read_unaligned(hb.add(8 * c).cast::<u32>());
                    *w = _mm256_or_si256(*w, fifth_bits(bits));
                }
            }
            w
        }
    }

    /// Lanes `8·half..8·half+8` of tokens `t0..t0+T` of one group, into `v[i]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half_tile<const K: u8, const T: usize>(t: &Tile<'_, ActBlock>, half: usize, v: &mut [[f32; LANES]; 2]) {
        let kind = Kind::from_id(K);
        let r = Record::of(kind);
        let o = kind.offset();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); T];
        let mut off = [_mm256_setzero_ps(); T];
        for b in 0..t.kb {
            // SAFETY: as in `super::avx512::tile`.
            unsafe {
                let rec = t.group.add(b * r.bytes);
                prefetch_ahead(rec, r.bytes);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(16 * half).cast()));
                let m = if kind.has_min() {
                    _mm256_cvtph_ps(_mm_loadu_si128(rec.add(r.m + 16 * half).cast()))
                } else {
                    _mm256_setzero_ps()
                };
                let w = codes::<K>(rec, half);
                for i in 0..T {
                    let a = t.acts.get_unchecked((t.t0 + i) * t.kb + b);
                    let q = a.q.as_ptr().cast::<i32>();
                    let mut s =
                        if kind == Kind::Q8_0 { _mm256_setzero_si256() } else { _mm256_set1_epi32(-o * a.asum) };
                    for (c, w) in w.iter().enumerate() {
                        let x = _mm256_set1_epi32(std::ptr::read_unaligned(q.add(c)));
                        // Q8_0's codes are signed here: `maddubs` multiplies |q| by ±a (no
                        // saturation: |q| ≤ 128, |a| ≤ 127), the others' unsigned codes by a.
                        let p = if kind == Kind::Q8_0 {
                            _mm256_maddubs_epi16(_mm256_sign_epi8(*w, *w), _mm256_sign_epi8(x, *w))
                        } else {
                            _mm256_maddubs_epi16(*w, x)
                        };
                        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                    }
                    acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(a.d)), _mm256_cvtepi32_ps(s), acc[i]);
                    if kind.has_min() {
                        off[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(a.s), off[i]);
                    }
                }
            }
        }
        for i in 0..T {
            let x = if kind.has_min() { _mm256_add_ps(acc[i], off[i]) } else { acc[i] };
            // SAFETY: 8 floats into a 16-float row.
            unsafe { _mm256_storeu_ps(v[i].as_mut_ptr().add(8 * half), x) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2_k {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{LANES, Record, Tile, for_each_tile, prefetch_ahead};
    use crate::cpu::quant::{ActBlockK, Kind};

    /// Rows `rows` of a packed Q4_K or Q6_K matrix times `tokens` Q8_K activation rows, 8
    /// rows per register.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; the rest as `super::avx512_k::matmul`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul(
        kind: Kind,
        packed: &[u8],
        cols: usize,
        acts: &[ActBlockK],
        tokens: usize,
        rows: Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        const Q4K: u8 = Kind::Q4K as u8;
        const Q6K: u8 = Kind::Q6K as u8;
        for_each_tile(kind, packed, cols, acts, tokens, &rows, out, ld, 2, |t, n| {
            // SAFETY: the caller's contract, passed on.
            unsafe {
                let mut v = [[0f32; LANES]; 2];
                for half in 0..2 {
                    if t.lanes.start >= 8 * (half + 1) || t.lanes.end <= 8 * half {
                        continue;
                    }
                    match (kind, n) {
                        (Kind::Q4K, 2) => half_tile::<Q4K, 2>(t, half, &mut v),
                        (Kind::Q4K, _) => half_tile::<Q4K, 1>(t, half, &mut v),
                        (_, 2) => half_tile::<Q6K, 2>(t, half, &mut v),
                        _ => half_tile::<Q6K, 1>(t, half, &mut v),
                    }
                }
                for (i, v) in v.iter().enumerate().take(n) {
                    t.store(i, v);
                }
            }
        });
    }

    /// The 8 code registers of group `g` of lanes `8·half..8·half+8` of a record.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn codes<const K: u8>(rec: *const u8, g: usize, half: usize) -> [__m256i; 8] {
        let kind = Kind::from_id(K);
        let r = Record::of(kind);
        // SAFETY (caller): `rec` is a whole record.
        unsafe {
            let p = rec.add(r.codes + 64 * 4 * g + 32 * half);
            let low = _mm256_set1_epi8(0x0F);
            let planes: [__m256i; 4] = std::array::from_fn(|c| _mm256_loadu_si256(p.add(64 * c).cast()));
            let mut w: [__m256i; 8] = std::array::from_fn(|c| {
                if c < 4 {
                    _mm256_and_si256(planes[c], low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(planes[c - 4], 4), low)
                }
            });
            if kind == Kind::Q6K {
                let h = rec.add(r.high + 64 * 2 * g + 32 * half);
                let high = [_mm256_loadu_si256(h.cast()), _mm256_loadu_si256(h.add(64).cast())];
                let bits = _mm256_set1_epi8(0x30);
                for (c, w) in w.iter_mut().enumerate() {
                    let x = high[c / 4];
                    let at = match c % 4 {
                        0 => _mm256_slli_epi16(x, 4),
                        1 => _mm256_slli_epi16(x, 2),
                        2 => x,
                        _ => _mm256_srli_epi16(x, 2),
                    };
                    *w = _mm256_or_si256(*w, _mm256_and_si256(at, bits));
                }
            }
            w
        }
    }

    /// As `super::avx512_k::scale_min`, for 8 rows.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn scale_min(w: &[__m256i; 3], g: usize) -> (__m256i, __m256i) {
        let shr = |v: __m256i, n: usize| _mm256_srlv_epi32(v, _mm256_set1_epi32(n as i32));
        let and = |v: __m256i, m: i32| _mm256_and_si256(v, _mm256_set1_epi32(m));
        if g < 4 {
            (and(shr(w[0], 8 * g), 63), and(shr(w[1], 8 * g), 63))
        } else {
            let k = 8 * (g - 4);
            let top = |v: __m256i| _mm256_slli_epi32(and(shr(v, k + 6), 3), 4);
            (
                _mm256_or_si256(and(shr(w[2], k), 0x0F), top(w[0])),
                _mm256_or_si256(and(shr(w[2], k + 4), 0x0F), top(w[1])),
            )
        }
    }

    /// `Σ u·a` in 8 lanes of 4 products each (`maddubs` cannot saturate: `u` ≤ 63, |a| ≤ 128).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dot4(u: __m256i, a: i32) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_set1_epi32(a)), _mm256_set1_epi16(1))
    }

    /// Lanes `8·half..8·half+8` of tokens `t0..t0+T` of one group, into `v[i]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half_tile<const K: u8, const T: usize>(t: &Tile<'_, ActBlockK>, half: usize, v: &mut [[f32; LANES]; 2]) {
        let kind = Kind::from_id(K);
        let r = Record::of(kind);
        let q4k = kind == Kind::Q4K;
        let mut acc = [_mm256_setzero_ps(); T];
        let mut off = [_mm256_setzero_ps(); T];
        for b in 0..t.kb {
            // SAFETY: as in `super::avx512_k::tile`.
            unsafe {
                let rec = t.group.add(b * r.bytes);
                prefetch_ahead(rec, r.bytes);
                let acts: [&ActBlockK; T] = std::array::from_fn(|i| t.acts.get_unchecked((t.t0 + i) * t.kb + b));
                let mut isum = [_mm256_setzero_si256(); T];
                let mut imins = [_mm256_setzero_si256(); T];
                let words: [__m256i; 3] = std::array::from_fn(|w| {
                    if q4k {
                        _mm256_loadu_si256(rec.add(r.scales + 64 * w + 32 * half).cast())
                    } else {
                        _mm256_setzero_si256()
                    }
                });
                for g in 0..8 {
                    let w = codes::<K>(rec, g, half);
                    let sc =
                        |s: usize| _mm256_cvtepi8_epi32(_mm_loadl_epi64(rec.add(r.scales + 16 * s + 8 * half).cast()));
                    let (sc0, sc1, mn) = if q4k {
                        let (sc, mn) = scale_min(&words, g);
                        (sc, sc, mn)
                    } else {
                        (sc(2 * g), sc(2 * g + 1), _mm256_setzero_si256())
                    };
                    for (i, a) in acts.iter().enumerate() {
                        let q = a.q.as_ptr().add(32 * g).cast::<i32>();
                        let o = if q4k { 0 } else { -32 };
                        let mut s0 = _mm256_set1_epi32(o * a.ssum[2 * g]);
                        let mut s1 = _mm256_set1_epi32(o * a.ssum[2 * g + 1]);
                        for c in 0..4 {
                            s0 = _mm256_add_epi32(s0, dot4(w[c], std::ptr::read_unaligned(q.add(c))));
                            s1 = _mm256_add_epi32(s1, dot4(w[c + 4], std::ptr::read_unaligned(q.add(c + 4))));
                        }
                        isum[i] = _mm256_add_epi32(
                            isum[i],
                            _mm256_add_epi32(_mm256_mullo_epi32(s0, sc0), _mm256_mullo_epi32(s1, sc1)),
                        );
                        if q4k {
                            imins[i] = _mm256_add_epi32(imins[i], _mm256_mullo_epi32(mn, _mm256_set1_epi32(a.gsum[g])));
                        }
                    }
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(16 * half).cast()));
                for (i, a) in acts.iter().enumerate() {
                    acc[i] =
                        _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(a.d)), _mm256_cvtepi32_ps(isum[i]), acc[i]);
                    if q4k {
                        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(r.m + 16 * half).cast()));
                        let neg = _mm256_castsi256_ps(_mm256_xor_si256(
                            _mm256_castps_si256(_mm256_cvtepi32_ps(imins[i])),
                            _mm256_set1_epi32(i32::MIN),
                        ));
                        off[i] = _mm256_fmadd_ps(_mm256_mul_ps(dmin, _mm256_set1_ps(a.d)), neg, off[i]);
                    }
                }
            }
        }
        for i in 0..T {
            let x = if q4k { _mm256_add_ps(acc[i], off[i]) } else { acc[i] };
            // SAFETY: 8 floats into a 16-float row.
            unsafe { _mm256_storeu_ps(v[i].as_mut_ptr().add(8 * half), x) };
        }
    }
}
