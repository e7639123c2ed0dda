//! The repacked 32-value formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): 16 weight rows side by side,
//! so that a SIMD register holds one value group of 16 rows and an integer dot instruction
//! advances 16 outputs at once — one output per lane, with the one-accumulator rule of
//! [`super::super::quant`]. A batch of tokens reuses each unpacked block of weights for every
//! token, so the weights are read and unpacked once per step, not once per sequence.
//!
//! Layout. Rows are taken 16 at a time (a *group*; the last is padded with zero rows). A
//! group's blocks follow one another, each a record of `16 × block_bytes` bytes — the same
//! size as the 16 rows' GGUF blocks:
//! - the 16 rows' scales `d` (f16 bits), then for Q4_1/Q5_1 their mins `m`;
//! - for Q5_0/Q5_1, the fifth bits: 8 masks of 64 bits, mask `c` bit `4r + i` = bit 4 of row
//!   `r`'s code `4c + i`;
//! - the codes in 64-byte planes, plane byte `4r + i` for row `r`: for the 4- and 5-bit
//!   formats 4 planes, plane `p` holding code `4p + i` in its low nibble and code `16 + 4p + i`
//!   in its high one; for Q8_0 8 planes of the codes `q + 128`, plane `c` holding code `4c + i`.
//!
//! The GGUF bytes of a row can be rebuilt exactly ([`row_bytes`]), for embedding lookups and
//! for splitting a matrix by rows.

#![allow(unsafe_code)] // SIMD intrinsics behind runtime feature checks: see the SAFETY notes.

use std::ops::Range;

use super::super::quant::{ActBlock, Kind, QK, dot32_ref, unpack32};

/// Rows side by side in a group.
pub const LANES: usize = 16;

/// Where a record's parts are, for `kind`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Record {
    /// Bytes of one record (one block of 16 rows).
    pub bytes: usize,
    /// Offset of the mins (Q4_1, Q5_1).
    pub m: usize,
    /// Offset of the fifth-bit masks (Q5_0, Q5_1).
    pub hb: usize,
    /// Offset of the code planes.
    pub codes: usize,
}

impl Record {
    pub const fn of(kind: Kind) -> Record {
        let m = 2 * LANES;
        let hb = if kind.has_min() { m + 2 * LANES } else { m };
        let codes = if matches!(kind, Kind::Q5_0 | Kind::Q5_1) { hb + 64 } else { hb };
        Record { bytes: LANES * kind.block_bytes(), m, hb, codes }
    }
}

/// The packed bytes of a matrix of `rows` rows given as GGUF blocks, rearranged in place one
/// group at a time (a group takes the bytes its 16 rows took), so that packing a large matrix
/// never holds it twice; the last group's missing rows are added as zeros.
pub fn pack(kind: Kind, rows: usize, cols: usize, mut bytes: Vec<u8>) -> Vec<u8> {
    debug_assert!(kind.packed());
    let kb = cols / QK;
    let bb = kind.block_bytes();
    let rec = Record::of(kind);
    let group_bytes = LANES * kb * bb;
    bytes.resize(rows.div_ceil(LANES) * group_bytes, 0);
    let mut rows16 = vec![0u8; group_bytes];
    for group in bytes.chunks_exact_mut(group_bytes) {
        rows16.copy_from_slice(group);
        group.fill(0);
        for lane in 0..LANES {
            for b in 0..kb {
                let blk = &rows16[(lane * kb + b) * bb..(lane * kb + b + 1) * bb];
                let w = unpack32(kind, blk);
                let recb = &mut group[b * rec.bytes..(b + 1) * rec.bytes];
                // The scale and min keep their f16 bits.
                recb[2 * lane..2 * lane + 2].copy_from_slice(&blk[0..2]);
                if kind.has_min() {
                    recb[rec.m + 2 * lane..rec.m + 2 * lane + 2].copy_from_slice(&blk[2..4]);
                }
                for (k, &u) in w.u.iter().enumerate() {
                    let (c, i) = (k / 4, k % 4);
                    let byte = 4 * lane + i;
                    if kind == Kind::Q8_0 {
                        recb[rec.codes + 64 * c + byte] = u;
                    } else {
                        let (plane, shift) = (c % 4, 4 * (c / 4));
                        recb[rec.codes + 64 * plane + byte] |= (u & 0x0F) << shift;
                        if u & 0x10 != 0 {
                            recb[rec.hb + 8 * c + byte / 8] |= 1 << (byte % 8);
                        }
                    }
                }
            }
        }
    }
    bytes
}

/// Code `k` (0–31) of lane `lane` in a record.
fn code(kind: Kind, rec: &[u8], lane: usize, k: usize) -> u8 {
    let r = Record::of(kind);
    let (c, i) = (k / 4, k % 4);
    let byte = 4 * lane + i;
    if kind == Kind::Q8_0 {
        return rec[r.codes + 64 * c + byte];
    }
    let mut u = (rec[r.codes + 64 * (c % 4) + byte] >> (4 * (c / 4))) & 0x0F;
    if matches!(kind, Kind::Q5_0 | Kind::Q5_1) && rec[r.hb + 8 * c + byte / 8] & (1 << (byte % 8)) != 0 {
        u |= 0x10;
    }
    u
}

/// Row `r`'s GGUF bytes, rebuilt from the packed matrix, into `out` (one row's bytes).
pub fn row_bytes(kind: Kind, packed: &[u8], cols: usize, r: usize, out: &mut [u8]) {
    let kb = cols / QK;
    let bb = kind.block_bytes();
    let rec = Record::of(kind);
    let (g, lane) = (r / LANES, r % LANES);
    for (b, blk) in out.chunks_exact_mut(bb).enumerate().take(kb) {
        let at = (g * kb + b) * rec.bytes;
        let recb = &packed[at..at + rec.bytes];
        blk.fill(0);
        blk[0..2].copy_from_slice(&recb[2 * lane..2 * lane + 2]);
        let u = |k: usize| code(kind, recb, lane, k);
        let (qs, qh) = match kind {
            Kind::Q4_0 => (2, None),
            Kind::Q4_1 => (4, None),
            Kind::Q5_0 => (6, Some(2)),
            Kind::Q5_1 => (8, Some(4)),
            Kind::Q8_0 => {
                for k in 0..QK {
                    blk[2 + k] = u(k) ^ 0x80;
                }
                continue;
            }
            _ => unreachable!("not a packed format"),
        };
        if kind.has_min() {
            blk[2..4].copy_from_slice(&recb[rec.m + 2 * lane..rec.m + 2 * lane + 2]);
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

/// `out[t·ld + (r − rows.start)] = W[r] · x[t]`, one row at a time from its rebuilt GGUF bytes
/// (the portable flavor: the reference itself).
#[allow(clippy::too_many_arguments)]
pub fn matmul_portable(
    kind: Kind,
    packed: &[u8],
    cols: usize,
    acts: &[ActBlock],
    tokens: usize,
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let kb = cols / QK;
    let mut row = vec![0u8; kb * kind.block_bytes()];
    for r in rows.clone() {
        row_bytes(kind, packed, cols, r, &mut row);
        for t in 0..tokens {
            out[t * ld + r - rows.start] = dot32_ref(kind, &row, &acts[t * kb..(t + 1) * kb]);
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
pub(super) struct Tile<'a> {
    /// The group's first record.
    pub group: *const u8,
    pub kb: usize,
    pub acts: &'a [ActBlock],
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
impl Tile<'_> {
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

/// Runs `tile(t, n)` over each group of `rows` and each run of at most `per` tokens.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn for_each_tile(
    kind: Kind,
    packed: &[u8],
    cols: usize,
    acts: &[ActBlock],
    tokens: usize,
    rows: &Range<usize>,
    out: &mut [f32],
    ld: usize,
    per: usize,
    mut tile: impl FnMut(&Tile<'_>, usize),
) {
    let kb = cols / QK;
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

    use super::{LANES, Record, Tile, for_each_tile};
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
    unsafe fn tile<const K: u8, const T: usize>(t: &Tile<'_>) {
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
pub(super) mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{LANES, Record, Tile, for_each_tile};
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
    unsafe fn half_tile<const K: u8, const T: usize>(t: &Tile<'_>, half: usize, v: &mut [[f32; LANES]; 2]) {
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
