//! The CPU runtime's matrix kernels alone, one thread: every quantized format × flavor ×
//! batch of activation rows, on matrices of real models' shapes. Reports billions of weight ×
//! row products per second (GMAC/s) and the weights' bytes read per second.
//!
//!     cargo run --release -p gantry-engine --example kernel_bench -- [--kinds Q4_1,Q8_0] [--tokens 1,4,16,128] [--secs 0.5]

#![allow(clippy::unwrap_used)] // a benchmark: any failure is fatal

use std::time::Instant;

use gantry_engine::cpu::kernels::{Acts, Flavor, QMatrix, matmul};
use gantry_engine::cpu::quant::Kind;
use half::f16;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.into())
}

/// Random blocks with sane scales (a deterministic xorshift).
fn random_blocks(kind: Kind, rows: usize, cols: usize) -> Vec<u8> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let bb = kind.block_bytes();
    let mut bytes: Vec<u8> = (0..rows * cols / kind.block_values() * bb).map(|_| next() as u8).collect();
    for blk in bytes.chunks_exact_mut(bb) {
        if kind == Kind::Mxfp4 {
            blk[0] = 120; // 2^-8: an E8M0 scale byte, not an f16
            continue;
        }
        let v = f16::from_f32(0.01).to_le_bytes();
        let at = if kind == Kind::Q6K { 208 } else { 0 };
        blk[at..at + 2].copy_from_slice(&v);
        if matches!(kind, Kind::Q4_1 | Kind::Q5_1 | Kind::Q4K | Kind::Q5K) {
            blk[2..4].copy_from_slice(&v);
        }
    }
    bytes
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let kinds: Vec<Kind> = arg(&args, "--kinds", "Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q4_K,Q5_K,Q6_K,MXFP4")
        .split(',')
        .map(|k| Kind::from_ggml(k).unwrap_or_else(|| panic!("unknown kind {k}")))
        .collect();
    let tokens: Vec<usize> = arg(&args, "--tokens", "1,4,16,128").split(',').map(|t| t.parse().unwrap()).collect();
    let secs: f64 = arg(&args, "--secs", "0.5").parse().unwrap();
    // (rows, cols): SmolLM2's MLP up (1536×576), Gemma 3's MLP up (2048×640), a 2048² square;
    // or --shapes 262144x640,… (Gemma 3's output head is 262144×640).
    let shapes: Vec<(usize, usize)> = arg(&args, "--shapes", "1536x576,2048x640,2048x2048")
        .split(',')
        .map(|s| {
            let (r, c) = s.split_once('x').unwrap_or_else(|| panic!("shape {s}: use ROWSxCOLS"));
            (r.parse().unwrap(), c.parse().unwrap())
        })
        .collect();
    println!("| kind | shape | tokens | flavor | GMAC/s | weight GB/s |");
    println!("|---|---|---|---|---|---|");
    for &kind in &kinds {
        for &(rows, cols) in &shapes {
            if !cols.is_multiple_of(kind.block_values()) {
                continue;
            }
            let w = QMatrix::from_blocks(kind, rows, cols, random_blocks(kind, rows, cols)).unwrap();
            for &t in &tokens {
                let x: Vec<f32> = (0..t * cols).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
                let mut acts = Acts::default();
                acts.quantize(kind, &x, cols);
                let mut out = vec![0f32; t * rows];
                for flavor in Flavor::all_available() {
                    if flavor == Flavor::Portable && t > 4 {
                        continue;
                    }
                    let view = acts.view();
                    matmul(flavor, &w, &view, 0..rows, &mut out, rows);
                    let started = Instant::now();
                    let mut n = 0u64;
                    while started.elapsed().as_secs_f64() < secs {
                        matmul(flavor, &w, &view, 0..rows, &mut out, rows);
                        n += 1;
                    }
                    let el = started.elapsed().as_secs_f64();
                    let macs = (rows * cols * t) as f64 * n as f64;
                    let bytes = w.size_in_bytes() as f64 * n as f64;
                    println!(
                        "| {} | {rows}×{cols} | {t} | {} | {:.2} | {:.2} |",
                        kind.name(),
                        flavor.name(),
                        macs / el / 1e9,
                        bytes / el / 1e9
                    );
                }
            }
        }
    }
}
