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

#[test]
fn every_flavor_computes_the_reference_to_the_bit_for_any_batch_and_tile() {
    let mut rng = Rng(11);
    for kind in QUANTIZED.into_iter().chain([Kind::F32]) {
        let (rows, cols) = (13, 512);
        let m = random_matrix(kind, rows, cols, &mut rng);
        for tokens in [1, 2, 3, 4, 5, 7, 9] {
            let x: Vec<f32> = (0..tokens * cols).map(|_| rng.f()).collect();
            let want = reference(&m, &x, tokens);
            for flavor in Flavor::all_available() {
                let mut acts = Acts::default();
                acts.quantize(kind, &x, cols);
                // All rows, and an odd sub-range written into a narrower output.
                let mut out = vec![f32::NAN; tokens * rows];
                matmul(flavor, &m, &acts.view(), 0..rows, &mut out, rows);
                assert_eq!(out, want, "{} {} tokens {}", kind.name(), flavor.name(), tokens);
                let mut part = vec![f32::NAN; tokens * 5];
                matmul(flavor, &m, &acts.view(), 3..8, &mut part, 5);
                for t in 0..tokens {
                    assert_eq!(
                        &part[t * 5..t * 5 + 5],
                        &want[t * rows + 3..t * rows + 8],
                        "{} {}",
                        kind.name(),
                        flavor.name()
                    );
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
