//! Every flavor against the reference arithmetic (bit for bit), the reference against plain
//! dequantized math, and the formats against Candle's decoding of the same blocks.

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use half::f16;

use super::*;
use crate::cpu::quant::dequantize_row;

/// A tiny deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn f(&mut self) -> f32 {
        (self.next() % 20001) as f32 / 10000.0 - 1.0
    }
}

const QUANTIZED: [Kind; 9] =
    [Kind::Q4_0, Kind::Q4_1, Kind::Q5_0, Kind::Q5_1, Kind::Q8_0, Kind::Q4K, Kind::Q5K, Kind::Q6K, Kind::Mxfp4];

/// Random blocks of `kind` with sane scales (random codes, random sub-block scales).
fn random_blocks(kind: Kind, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let bb = kind.block_bytes();
    let n = rows * cols / kind.block_values();
    let mut bytes: Vec<u8> = (0..n * bb).map(|_| rng.next() as u8).collect();
    for blk in bytes.chunks_exact_mut(bb) {
        let mut put = |at: usize, v: f32| blk[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
        match kind {
            Kind::Q4_0 | Kind::Q5_0 | Kind::Q8_0 => put(0, rng.f() * 0.02),
            Kind::Q4_1 | Kind::Q5_1 => {
                put(0, rng.f() * 0.02);
                put(2, rng.f() * 0.1);
            }
            Kind::Q4K | Kind::Q5K => {
                put(0, rng.f() * 0.005);
                put(2, rng.f() * 0.005);
            }
            Kind::Q6K => put(208, rng.f() * 0.002),
            // A scale around 2^-8, as gpt-oss's experts have.
            Kind::Mxfp4 => blk[0] = 116 + (rng.next() % 8) as u8,
            Kind::F32 => unreachable!(),
        }
    }
    bytes
}

fn ggml(kind: Kind) -> GgmlDType {
    match kind {
        Kind::Q4_0 => GgmlDType::Q4_0,
        Kind::Q4_1 => GgmlDType::Q4_1,
        Kind::Q5_0 => GgmlDType::Q5_0,
        Kind::Q5_1 => GgmlDType::Q5_1,
        Kind::Q8_0 => GgmlDType::Q8_0,
        Kind::Q4K => GgmlDType::Q4K,
        Kind::Q5K => GgmlDType::Q5K,
        Kind::Q6K => GgmlDType::Q6K,
        Kind::F32 | Kind::Mxfp4 => GgmlDType::F32,
    }
}

#[test]
fn each_format_decodes_as_candle_decodes_it() {
    let mut rng = Rng(7);
    // Candle has no MXFP4: that one is checked against the GGUF decoding in `experts`.
    for kind in QUANTIZED.into_iter().filter(|&k| k != Kind::Mxfp4) {
        let (rows, cols) = (3, 512);
        let bytes = random_blocks(kind, rows, cols, &mut rng);
        let storage = QStorage::from_data(std::borrow::Cow::Owned(bytes.clone()), &Device::Cpu, ggml(kind)).unwrap();
        let candle: Vec<f32> = QTensor::new(storage, (rows, cols))
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let m = QMatrix::from_blocks(kind, rows, cols, bytes).unwrap();
        let mut ours = vec![0f32; rows * cols];
        for r in 0..rows {
            m.row_f32(r, &mut ours[r * cols..(r + 1) * cols]);
        }
        assert_eq!(ours, candle, "{}", kind.name());
    }
}

fn random_matrix(kind: Kind, rows: usize, cols: usize, rng: &mut Rng) -> QMatrix {
    if kind == Kind::F32 {
        QMatrix::from_f32(rows, cols, (0..rows * cols).map(|_| rng.f()).collect()).unwrap()
    } else {
        QMatrix::from_blocks(kind, rows, cols, random_blocks(kind, rows, cols, rng)).unwrap()
    }
}

/// The reference result of `m · x[t]` for every row.
fn reference(m: &QMatrix, x: &[f32], tokens: usize) -> Vec<f32> {
    let mut acts = Acts::default();
    acts.quantize(m.kind(), x, m.cols());
    let mut out = vec![0f32; tokens * m.rows()];
    matmul(Flavor::Portable, m, &acts.view(), 0..m.rows(), &mut out, m.rows());
    out
}

/// `reference` computed from the GGUF bytes themselves, row by row, by the formats' rules.
fn reference_from_gguf(kind: Kind, gguf: &[u8], rows: usize, cols: usize, x: &[f32], tokens: usize) -> Vec<f32> {
    let mut acts = Acts::default();
    acts.quantize(kind, x, cols);
    let a = acts.view();
    let rb = gguf.len() / rows;
    let mut out = vec![0f32; tokens * rows];
    for t in 0..tokens {
        for r in 0..rows {
            let row = &gguf[r * rb..(r + 1) * rb];
            out[t * rows + r] = match kind.act_format() {
                super::super::quant::ActFormat::Q8K => {
                    dotk_ref(kind, row, &a.q8k[t * cols / QK_K..(t + 1) * cols / QK_K])
                }
                _ => dot32_ref(kind, row, &a.q8[t * cols / QK..(t + 1) * cols / QK]),
            };
        }
    }
    out
}

#[test]
fn packed_matrices_give_back_their_rows_bytes_exactly() {
    let mut rng = Rng(3);
    for kind in QUANTIZED.into_iter().filter(|k| k.packed()) {
        // Any bytes, scales included (NaN and infinite f16 bits too): the rows come back as given.
        let (rows, cols) = (21, 512);
        let bytes: Vec<u8> =
            (0..rows * cols / kind.block_values() * kind.block_bytes()).map(|_| rng.next() as u8).collect();
        let m = QMatrix::from_blocks(kind, rows, cols, bytes.clone()).unwrap();
        let rb = bytes.len() / rows;
        for r in 0..rows {
            assert_eq!(&m.gguf_row(r)[..], &bytes[r * rb..(r + 1) * rb], "{} row {r}", kind.name());
        }
        let picked = m.select_rows(&[20, 0, 17, 16]);
        for (i, r) in [20, 0, 17, 16].into_iter().enumerate() {
            assert_eq!(&picked.gguf_row(i)[..], &bytes[r * rb..(r + 1) * rb], "{} picked row {r}", kind.name());
        }
    }
}

#[test]
fn every_flavor_computes_the_reference_to_the_bit_for_any_batch_and_tile() {
    let mut rng = Rng(11);
    for kind in QUANTIZED.into_iter().chain([Kind::F32]) {
        // 37 rows: two whole groups of 16 and a part, for the packed formats.
        let (rows, cols) = (37, 512);
        let gguf = (kind != Kind::F32).then(|| random_blocks(kind, rows, cols, &mut rng));
        let m = match &gguf {
            Some(b) => QMatrix::from_blocks(kind, rows, cols, b.clone()).unwrap(),
            None => random_matrix(kind, rows, cols, &mut rng),
        };
        for tokens in [1, 2, 3, 4, 5, 7, 9] {
            let x: Vec<f32> = (0..tokens * cols).map(|_| rng.f()).collect();
            let want = reference(&m, &x, tokens);
            if let Some(b) = &gguf {
                assert_eq!(want, reference_from_gguf(kind, b, rows, cols, &x, tokens), "{} from GGUF", kind.name());
            }
            for flavor in Flavor::all_available() {
                let mut acts = Acts::default();
                acts.quantize(kind, &x, cols);
                // All rows, and sub-ranges (inside a group, across groups) into narrower outputs.
                let mut out = vec![f32::NAN; tokens * rows];
                matmul(flavor, &m, &acts.view(), 0..rows, &mut out, rows);
                assert_eq!(out, want, "{} {} tokens {}", kind.name(), flavor.name(), tokens);
                for range in [3..8, 14..35, 32..37] {
                    let n = range.len();
                    let mut part = vec![f32::NAN; tokens * n];
                    matmul(flavor, &m, &acts.view(), range.clone(), &mut part, n);
                    for t in 0..tokens {
                        assert_eq!(
                            &part[t * n..t * n + n],
                            &want[t * rows + range.start..t * rows + range.end],
                            "{} {} rows {range:?}",
                            kind.name(),
                            flavor.name()
                        );
                    }
                }
            }
            // A token's outputs do not depend on the batch it is in.
            if tokens > 1 {
                let alone = reference(&m, &x[cols..2 * cols], 1);
                assert_eq!(alone[..], want[rows..2 * rows], "{} token 1 alone vs in a batch of {tokens}", kind.name());
            }
        }
    }
}

#[test]
fn the_reference_computes_what_the_blocks_hold() {
    let mut rng = Rng(5);
    for kind in QUANTIZED.into_iter().chain([Kind::F32]) {
        let (rows, cols) = (4, 512);
        let m = random_matrix(kind, rows, cols, &mut rng);
        let x: Vec<f32> = (0..cols).map(|_| rng.f()).collect();
        let got = reference(&m, &x, 1);
        let mut w = vec![0f32; cols];
        for (r, &got) in got.iter().enumerate() {
            m.row_f32(r, &mut w);
            let exact: f64 = w.iter().zip(&x).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            let scale: f64 = w.iter().zip(&x).map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs()).sum();
            // 8-bit activations: well under 1% of the sum of |products|.
            assert!((f64::from(got) - exact).abs() <= 0.01 * scale + 1e-6, "{} row {r}: {got} vs {exact}", kind.name());
        }
        let _ = dequantize_row;
    }
}

#[test]
fn activations_quantize_to_the_reference_bits_whatever_the_values() {
    let mut rng = Rng(13);
    let mut rows: Vec<Vec<f32>> =
        (0..20).map(|i| (0..256).map(|_| rng.f() * 10f32.powi(i % 7 - 3)).collect()).collect();
    // Zeros, a tiny maximum (127/amax overflows), infinities, NaN, ties at .5.
    rows.push(vec![0.0; 64]);
    rows.push((0..64).map(|i| if i == 3 { 1e-45 } else { 0.0 }).collect());
    rows.push((0..64).map(|i| if i == 5 { f32::INFINITY } else { i as f32 - 30.0 }).collect());
    rows.push((0..64).map(|i| if i % 7 == 0 { f32::NAN } else { i as f32 }).collect());
    rows.push((0..64).map(|i| (i as f32 - 32.0) * 0.5).collect());
    for x in rows {
        let mut want = vec![ActBlock::ZERO; x.len() / QK];
        super::super::quant::quantize_row_q8(&x, &mut want);
        let mut got = vec![ActBlock::ZERO; x.len() / QK];
        quantize_row_q8(&x, &mut got);
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((g.q, g.asum4, g.asum), (w.q, w.asum4, w.asum), "{x:?}");
            assert_eq!((g.d.to_bits(), g.s.to_bits()), (w.d.to_bits(), w.s.to_bits()), "{x:?}");
        }
    }
}
