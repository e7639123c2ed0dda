//! Weight formats as GGUF stores them, and activations quantized to 8 bits for the integer dot
//! products — the arithmetic every kernel flavor (scalar, AVX2, AVX-512) computes *exactly the
//! same way*, so that an output never depends on which flavor, tile shape or batch computed it.
//!
//! Two rules, by format. Integer sums are exact in any order, and every float operation is the
//! same in every flavor, so results are bit-identical either way.
//!
//! - **The formats the runtime repacks** ([`Kind::packed`]: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
//!   Q4_K, Q6_K): an output (one weight row · one activation row) has one float accumulator.
//!   Each block adds `(d_w·d_a) × isum` with one fused multiply-add, in block order, where
//!   `isum` is the block's exact integer dot product (unsigned weight codes times signed
//!   activation codes, minus the weight offset times the activation sum; for Q4_K/Q6_K each
//!   sub-block's times its integer scale, summed over the super-block); the min terms of
//!   Q4_1/Q5_1 (`m·s` per block) and Q4_K (`(dmin·d_a)·(−Σ min·sum)`) have their own
//!   accumulator, added at the end. The kernels hold one output per SIMD lane (16 weight rows
//!   side by side, see `kernels::packed`), so a block costs a few integer dot instructions and
//!   one multiply-add per 16 outputs.
//! - **The others** (MXFP4, Q5_K): an output is accumulated in 8 float lanes. Lane `i`
//!   of a 32-value group holds the exact integer sum of its values `4i..4i+3`; each group adds
//!   `scale × lane` to the lane's accumulator with one fused multiply-add, in block order; the
//!   8 lanes are summed in a fixed tree at the end ([`hsum8`]), then the min terms of
//!   Q4_K/Q5_K (accumulated in their own sequence) are added.

use half::f16;

/// Values per block of the 32-value formats, and per lane group everywhere.
pub const QK: usize = 32;
/// Values per super-block of the K formats.
pub const QK_K: usize = 256;

/// A stored weight format the CPU runtime computes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Dense f32 (F32, F16 and BF16 files are widened to it at load).
    F32,
    /// `x = d·(q − 8)`, 4-bit `q`; 18 bytes per 32 values.
    Q4_0,
    /// `x = d·q + m`, 4-bit `q`; 20 bytes.
    Q4_1,
    /// `x = d·(q − 16)`, 5-bit `q`; 22 bytes.
    Q5_0,
    /// `x = d·q + m`, 5-bit `q`; 24 bytes.
    Q5_1,
    /// `x = d·q`, signed 8-bit `q`; 34 bytes.
    Q8_0,
    /// Super-blocks of 256: 8 sub-blocks of 32 with 6-bit scales and mins, 4-bit `q`; 144 bytes.
    Q4K,
    /// As Q4_K with 5-bit `q`; 176 bytes.
    Q5K,
    /// Super-blocks of 256: 16 sub-blocks of 16 with 8-bit scales, 6-bit `q − 32`; 210 bytes.
    Q6K,
    /// `x = 2^(e−128)·v[q]`: a shared power-of-two scale byte (E8M0), then 4-bit codes of
    /// doubled FP4 values `v` (gpt-oss's experts); 17 bytes per 32 values.
    Mxfp4,
}

/// MXFP4's FP4 (E2M1) values, doubled to integers (ggml's `kvalues_mxfp4`).
pub const MXFP4_VALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// An E8M0 scale byte halved (the doubled values' scale): `2^(e−128)`.
pub fn e8m0_half(e: u8) -> f32 {
    if e >= 2 { f32::from_bits((u32::from(e) - 1) << 23) } else { 2f32.powi(i32::from(e) - 128) }
}

/// How activations are quantized for a weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActFormat {
    /// Not quantized: f32 rows.
    F32,
    /// Blocks of 32 signed 8-bit codes with a scale (ggml's Q8_1: also `d·Σq`).
    Q8,
    /// Super-blocks of 256 with sums of 16 (ggml's Q8_K).
    Q8K,
}

impl Kind {
    /// From a GGML type name, for the formats the runtime has kernels for.
    pub fn from_ggml(name: &str) -> Option<Kind> {
        Some(match name {
            "F32" => Kind::F32,
            "Q4_0" => Kind::Q4_0,
            "Q4_1" => Kind::Q4_1,
            "Q5_0" => Kind::Q5_0,
            "Q5_1" => Kind::Q5_1,
            "Q8_0" => Kind::Q8_0,
            "MXFP4" => Kind::Mxfp4,
            "Q4_K" => Kind::Q4K,
            "Q5_K" => Kind::Q5K,
            "Q6_K" => Kind::Q6K,
            _ => return None,
        })
    }

    /// Values per block.
    pub const fn block_values(self) -> usize {
        match self {
            Kind::F32 => 1,
            Kind::Q4_0 | Kind::Q4_1 | Kind::Q5_0 | Kind::Q5_1 | Kind::Q8_0 | Kind::Mxfp4 => QK,
            Kind::Q4K | Kind::Q5K | Kind::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            Kind::F32 => 4,
            Kind::Q4_0 => 18,
            Kind::Q4_1 => 20,
            Kind::Q5_0 => 22,
            Kind::Q5_1 => 24,
            Kind::Q8_0 => 34,
            Kind::Mxfp4 => 17,
            Kind::Q4K => 144,
            Kind::Q5K => 176,
            Kind::Q6K => 210,
        }
    }

    /// The activation quantization its kernels take.
    pub const fn act_format(self) -> ActFormat {
        match self {
            Kind::F32 => ActFormat::F32,
            Kind::Q4K | Kind::Q5K | Kind::Q6K => ActFormat::Q8K,
            _ => ActFormat::Q8,
        }
    }

    /// The unsigned code offset of a 32-value format (`x = d·(u − o)`), for the kinds
    /// without a min.
    pub const fn offset(self) -> i32 {
        match self {
            Kind::Q4_0 => 8,
            Kind::Q5_0 => 16,
            Kind::Q8_0 | Kind::Mxfp4 => 128,
            _ => 0,
        }
    }

    /// The kind whose `as u8` is `id` (kernels take the kind as a const generic `u8`).
    pub const fn from_id(id: u8) -> Kind {
        const KINDS: [Kind; 10] = [
            Kind::F32,
            Kind::Q4_0,
            Kind::Q4_1,
            Kind::Q5_0,
            Kind::Q5_1,
            Kind::Q8_0,
            Kind::Q4K,
            Kind::Q5K,
            Kind::Q6K,
            Kind::Mxfp4,
        ];
        KINDS[id as usize]
    }

    /// Whether the runtime stores this format repacked, 16 rows side by side, and computes it
    /// with one accumulator per output (the first rule above).
    pub const fn packed(self) -> bool {
        matches!(self, Kind::Q4_0 | Kind::Q4_1 | Kind::Q5_0 | Kind::Q5_1 | Kind::Q8_0 | Kind::Q4K | Kind::Q6K)
    }

    /// Whether blocks carry a min (`x = d·q + m`).
    pub const fn has_min(self) -> bool {
        matches!(self, Kind::Q4_1 | Kind::Q5_1 | Kind::Q4K | Kind::Q5K)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::F32 => "F32",
            Kind::Q4_0 => "Q4_0",
            Kind::Q4_1 => "Q4_1",
            Kind::Q5_0 => "Q5_0",
            Kind::Q5_1 => "Q5_1",
            Kind::Q8_0 => "Q8_0",
            Kind::Q4K => "Q4_K",
            Kind::Q5K => "Q5_K",
            Kind::Q6K => "Q6_K",
            Kind::Mxfp4 => "MXFP4",
        }
    }
}

pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Rounds through f16, as ggml stores activation scales.
pub(crate) fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// One 32-value weight block as the kernels see it: unsigned codes `u` (`x = d·(u − o) + m`).
#[derive(Debug, Clone, Copy)]
pub struct Unpacked32 {
    pub u: [u8; QK],
    pub d: f32,
    pub m: f32,
}

/// Unpacks block `blk` (its bytes) of a 32-value format.
pub fn unpack32(kind: Kind, blk: &[u8]) -> Unpacked32 {
    let d = f16_at(blk, 0);
    let mut u = [0u8; QK];
    let mut m = 0.0;
    let nibbles = |u: &mut [u8; QK], qs: &[u8]| {
        for j in 0..16 {
            u[j] = qs[j] & 0x0F;
            u[j + 16] = qs[j] >> 4;
        }
    };
    let fifth = |u: &mut [u8; QK], qh: u32| {
        for (j, v) in u.iter_mut().enumerate() {
            *v |= (((qh >> j) & 1) as u8) << 4;
        }
    };
    match kind {
        Kind::Q4_0 => nibbles(&mut u, &blk[2..18]),
        Kind::Q4_1 => {
            m = f16_at(blk, 2);
            nibbles(&mut u, &blk[4..20]);
        }
        Kind::Q5_0 => {
            nibbles(&mut u, &blk[6..22]);
            fifth(&mut u, u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]));
        }
        Kind::Q5_1 => {
            m = f16_at(blk, 2);
            nibbles(&mut u, &blk[8..24]);
            fifth(&mut u, u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]));
        }
        Kind::Q8_0 => {
            for (v, &q) in u.iter_mut().zip(&blk[2..34]) {
                *v = (q as i8 as i32 + 128) as u8;
            }
        }
        Kind::Mxfp4 => {
            // Signed values offset by 128, as Q8_0's codes; low nibbles are values 0–15.
            let code = |n: u8| (i32::from(MXFP4_VALUES[usize::from(n)]) + 128) as u8;
            for j in 0..16 {
                u[j] = code(blk[1 + j] & 0x0F);
                u[j + 16] = code(blk[1 + j] >> 4);
            }
            return Unpacked32 { u, d: e8m0_half(blk[0]), m };
        }
        _ => unreachable!("not a 32-value format"),
    }
    Unpacked32 { u, d, m }
}

/// ggml's `get_scale_min_k4`: sub-block `j`'s 6-bit scale and min.
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// One K super-block as the kernels see it: 256 unsigned codes, a scale per 32-value group's
/// lanes (lanes 0–3 and 4–7 may differ: Q6_K's sub-blocks are 16 values), the code offset, and
/// the mins (`x = d·sc·(u − o) − dmin·mn`).
#[derive(Debug, Clone, Copy)]
pub struct UnpackedK {
    pub u: [u8; QK_K],
    /// Per 32-value group `g`: the integer scale of lanes 0–3 and of lanes 4–7.
    pub sc: [[i32; 2]; 8],
    /// Per 32-value group: the integer min (Q4_K, Q5_K; 0 otherwise).
    pub mn: [i32; 8],
    pub o: i32,
    pub d: f32,
    pub dmin: f32,
}

/// Unpacks a K super-block.
pub fn unpack_k(kind: Kind, blk: &[u8]) -> UnpackedK {
    let mut out = UnpackedK { u: [0; QK_K], sc: [[0; 2]; 8], mn: [0; 8], o: 0, d: 0.0, dmin: 0.0 };
    match kind {
        Kind::Q4K | Kind::Q5K => {
            out.d = f16_at(blk, 0);
            out.dmin = f16_at(blk, 2);
            let scales = &blk[4..16];
            let (qh, ql) = if kind == Kind::Q5K { (Some(&blk[16..48]), &blk[48..176]) } else { (None, &blk[16..144]) };
            for g in 0..8 {
                let (sc, mn) = scale_min_k4(g, scales);
                out.sc[g] = [i32::from(sc); 2];
                out.mn[g] = i32::from(mn);
            }
            // Four groups of 64 values: 32 bytes of nibbles, low then high.
            for j in 0..4 {
                for l in 0..32 {
                    let q = ql[32 * j + l];
                    let (mut lo, mut hi) = (q & 0x0F, q >> 4);
                    if let Some(qh) = qh {
                        lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    }
                    out.u[64 * j + l] = lo;
                    out.u[64 * j + 32 + l] = hi;
                }
            }
        }
        Kind::Q6K => {
            let (ql, qh, scales) = (&blk[0..128], &blk[128..192], &blk[192..208]);
            out.d = f16_at(blk, 208);
            out.o = 32;
            for half in 0..2 {
                let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
                let base = 128 * half;
                for l in 0..32 {
                    out.u[base + l] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                    out.u[base + l + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                    out.u[base + l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    out.u[base + l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
            for g in 0..8 {
                out.sc[g] = [i32::from(scales[2 * g] as i8), i32::from(scales[2 * g + 1] as i8)];
            }
        }
        _ => unreachable!("not a K format"),
    }
    out
}

/// Dequantizes `out.len()` values of a row starting at value 0 of `row` (its bytes).
pub fn dequantize_row(kind: Kind, row: &[u8], out: &mut [f32]) {
    match kind {
        Kind::F32 => {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Kind::Q4K | Kind::Q5K | Kind::Q6K => {
            for (blk, o) in row.chunks_exact(kind.block_bytes()).zip(out.chunks_mut(QK_K)) {
                let b = unpack_k(kind, blk);
                for (i, v) in o.iter_mut().enumerate() {
                    let g = i / 32;
                    let sc = b.sc[g][(i % 32) / 16];
                    *v = b.d * sc as f32 * (i32::from(b.u[i]) - b.o) as f32 - b.dmin * b.mn[g] as f32;
                }
            }
        }
        _ => {
            for (blk, o) in row.chunks_exact(kind.block_bytes()).zip(out.chunks_mut(QK)) {
                let b = unpack32(kind, blk);
                let off = kind.offset();
                for (v, &u) in o.iter_mut().zip(&b.u) {
                    *v = b.d * (i32::from(u) - off) as f32 + b.m;
                }
            }
        }
    }
}

/// One activation row quantized in 32-value blocks.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct ActBlock {
    pub q: [i8; QK],
    /// Lane sums: `asum4[i] = Σ q[4i..4i+4]`.
    pub asum4: [i32; 8],
    /// `Σq`.
    pub asum: i32,
    pub d: f32,
    /// `d·Σq` (ggml's Q8_1 `s`), rounded through f16 as ggml stores it.
    pub s: f32,
}

impl Default for ActBlock {
    fn default() -> ActBlock {
        ActBlock::ZERO
    }
}

impl ActBlock {
    pub const ZERO: ActBlock = ActBlock { q: [0; QK], asum4: [0; 8], asum: 0, d: 0.0, s: 0.0 };
}

/// Quantizes one row of activations into 32-value blocks (ggml's `quantize_row_q8_1`).
pub fn quantize_row_q8(x: &[f32], out: &mut [ActBlock]) {
    for (blk, xs) in out.iter_mut().zip(x.chunks_exact(QK)) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in blk.q.iter_mut().zip(xs) {
            let r = (v * id).round_ties_even() as i32;
            *q = r.clamp(-127, 127) as i8;
            sum += i32::from(*q);
        }
        for (i, a) in blk.asum4.iter_mut().enumerate() {
            *a = blk.q[4 * i..4 * i + 4].iter().map(|&q| i32::from(q)).sum();
        }
        blk.asum = sum;
        blk.d = f16_round(d);
        blk.s = f16_round(d * sum as f32);
    }
}

/// One activation row quantized in 256-value super-blocks (ggml's `quantize_row_q8_K`).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(32))]
pub struct ActBlockK {
    pub q: [i8; QK_K],
    /// Lane sums of each 32-value group: `asum4[g][i] = Σ q[32g + 4i .. 32g + 4i + 4]`.
    pub asum4: [[i32; 8]; 8],
    /// Sums of each 32-value group.
    pub gsum: [i32; 8],
    /// Sums of each 16-value sub-block (Q6_K's).
    pub ssum: [i32; 16],
    pub d: f32,
}

impl Default for ActBlockK {
    fn default() -> ActBlockK {
        ActBlockK::ZERO
    }
}

impl ActBlockK {
    pub const ZERO: ActBlockK = ActBlockK { q: [0; QK_K], asum4: [[0; 8]; 8], gsum: [0; 8], ssum: [0; 16], d: 0.0 };
}

pub fn quantize_row_q8k(x: &[f32], out: &mut [ActBlockK]) {
    for (blk, xs) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xs {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *blk = ActBlockK::ZERO;
            continue;
        }
        let iscale = -128.0 / max;
        for (q, v) in blk.q.iter_mut().zip(xs) {
            *q = ((iscale * v).round_ties_even() as i32).clamp(-128, 127) as i8;
        }
        for g in 0..8 {
            let qs = &blk.q[32 * g..32 * g + 32];
            for i in 0..8 {
                blk.asum4[g][i] = qs[4 * i..4 * i + 4].iter().map(|&q| i32::from(q)).sum();
            }
            blk.gsum[g] = blk.asum4[g].iter().sum();
            blk.ssum[2 * g] = blk.asum4[g][..4].iter().sum();
            blk.ssum[2 * g + 1] = blk.asum4[g][4..].iter().sum();
        }
        blk.d = 1.0 / iscale;
    }
}

/// The fixed summation tree of 8 lanes every flavor uses: the halves added lane by lane, then
/// the same again twice.
#[inline(always)]
pub fn hsum8(l: &[f32; 8]) -> f32 {
    let s4 = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    s2[0] + s2[1]
}

/// The reference dot product of a 32-value-format row (its GGUF bytes) with a quantized
/// activation row, by its format's rule.
pub fn dot32_ref(kind: Kind, row: &[u8], acts: &[ActBlock]) -> f32 {
    let o = kind.offset();
    let blocks = row.chunks_exact(kind.block_bytes()).zip(acts);
    if kind.packed() {
        let (mut acc, mut off) = (0f32, 0f32);
        for (blk, a) in blocks {
            let w = unpack32(kind, blk);
            let mut isum = -o * a.asum;
            for (&u, &q) in w.u.iter().zip(&a.q) {
                isum += i32::from(u) * i32::from(q);
            }
            acc = (w.d * a.d).mul_add(isum as f32, acc);
            off = w.m.mul_add(a.s, off);
        }
        return if kind.has_min() { acc + off } else { acc };
    }
    let mut acc = [0f32; 8];
    for (blk, a) in blocks {
        let w = unpack32(kind, blk);
        let scale = w.d * a.d;
        for (i, lane) in acc.iter_mut().enumerate() {
            let mut isum = -o * a.asum4[i];
            for k in 4 * i..4 * i + 4 {
                isum += i32::from(w.u[k]) * i32::from(a.q[k]);
            }
            *lane = scale.mul_add(isum as f32, *lane);
        }
    }
    // `+ 0.0` as the kernels add their (zero) min terms: −0.0 comes out as 0.0.
    hsum8(&acc) + 0.0
}

/// The reference dot product of a K-format row with a Q8_K activation row.
pub fn dotk_ref(kind: Kind, row: &[u8], acts: &[ActBlockK]) -> f32 {
    let mut acc = [0f32; 8];
    let mut off = 0f32;
    if kind.packed() {
        let mut acc = 0f32;
        for (blk, a) in row.chunks_exact(kind.block_bytes()).zip(acts) {
            let w = unpack_k(kind, blk);
            let (mut isum, mut mins) = (0i32, 0i32);
            for s in 0..16 {
                let mut dot = -w.o * a.ssum[s];
                for k in 16 * s..16 * s + 16 {
                    dot += i32::from(w.u[k]) * i32::from(a.q[k]);
                }
                isum += w.sc[s / 2][s % 2] * dot;
            }
            for g in 0..8 {
                mins += w.mn[g] * a.gsum[g];
            }
            acc = (w.d * a.d).mul_add(isum as f32, acc);
            off = (w.dmin * a.d).mul_add(-(mins as f32), off);
        }
        return if kind.has_min() { acc + off } else { acc };
    }
    for (blk, a) in row.chunks_exact(kind.block_bytes()).zip(acts) {
        let w = unpack_k(kind, blk);
        let mut lanes = [0i32; 8];
        let mut mins = 0i32;
        for g in 0..8 {
            for (i, lane) in lanes.iter_mut().enumerate() {
                let mut isum = -w.o * a.asum4[g][i];
                for k in 32 * g + 4 * i..32 * g + 4 * i + 4 {
                    isum += i32::from(w.u[k]) * i32::from(a.q[k]);
                }
                *lane += w.sc[g][i / 4] * isum;
            }
            mins += w.mn[g] * a.gsum[g];
        }
        let scale = w.d * a.d;
        for (lane, &l) in acc.iter_mut().zip(&lanes) {
            *lane = scale.mul_add(l as f32, *lane);
        }
        if matches!(kind, Kind::Q4K | Kind::Q5K) {
            off = (w.dmin * a.d).mul_add(-(mins as f32), off);
        }
    }
    hsum8(&acc) + off
}

/// The reference dot product of an f32 row with an f32 activation row: 8 lanes over
/// consecutive groups of 8 (a last partial group fills the first lanes).
pub fn dotf_ref(row: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (w8, x8) in row.chunks(8).zip(x.chunks(8)) {
        for ((lane, &w), &v) in acc.iter_mut().zip(w8).zip(x8) {
            *lane = w.mul_add(v, *lane);
        }
    }
    hsum8(&acc)
}

/// Quantizes rows of `cols` values (a multiple of 32) to Q8_0 blocks as ggml does: for the
/// formats the runtime has no kernels for, which it requantizes at load.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK * 34);
    for xs in x.chunks_exact(QK) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(xs.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}
