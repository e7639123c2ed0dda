//! What a GGUF header costs in memory, against its size in the file, for the headers a hostile
//! file can make cheapest to write and dearest to hold: many short arrays, many one-byte
//! values under one-byte keys, many empty strings, a kept-whole vocabulary of empty tokens, and
//! many tensor entries. The peak of live heap bytes while parsing (a counting allocator, this
//! binary only) is held to a bound per byte of header, and printed.

#![allow(clippy::unwrap_used)]
// A counting global allocator needs `unsafe impl GlobalAlloc`; it only forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use gantry_core::gguf::{KEEP_SHORT_ARRAY_ELEMENTS, MetaValue, parse_gguf, parse_gguf_keeping};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// One measurement at a time (the test harness runs tests on several threads).
static ONE: Mutex<()> = Mutex::new(());

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: the caller's layout, as GlobalAlloc requires.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: allocated by `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Peak heap bytes `f` holds above what was live before it.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - base)
}

fn header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b
}

fn key(b: &mut Vec<u8>, name: &str) {
    b.extend((name.len() as u64).to_le_bytes());
    b.extend(name.as_bytes());
}

/// `n` keys named by their index (the shortest names), each made by `value`.
fn file(n: u64, value: impl Fn(&mut Vec<u8>, u64)) -> Vec<u8> {
    let mut b = header(0, n);
    for i in 0..n {
        key(&mut b, &format!("{i:x}"));
        value(&mut b, i);
    }
    b
}

fn u8_array(b: &mut Vec<u8>, len: u64) {
    b.extend(9u32.to_le_bytes()); // array
    b.extend(0u32.to_le_bytes()); // of u8
    b.extend(len.to_le_bytes());
    b.extend(std::iter::repeat_n(7u8, len as usize));
}

/// Peak heap per byte of file for parsing `bytes`.
fn ratio(name: &str, bytes: &[u8], parse: impl FnOnce(&[u8])) -> f64 {
    let (_, peak) = peak_of(|| parse(bytes));
    let r = peak as f64 / bytes.len() as f64;
    println!(
        "{name}: {} bytes of header, peak {peak} bytes held while parsing: {r:.1}× (the input not counted)",
        bytes.len()
    );
    r
}

#[test]
fn a_hostile_header_costs_at_most_a_bounded_multiple_of_its_size() {
    let _one = ONE.lock().unwrap();
    let mut worst: Vec<(&str, f64)> = Vec::new();

    // 4,000 arrays of 1,024 one-byte elements (4 MiB): before the budget on short arrays, each
    // element was a 32-byte value (32×); past the budget they are summarised.
    let short_arrays = file(4000, |b, _| u8_array(b, 1024));
    worst.push((
        "short arrays",
        ratio("4,000 arrays of 1,024 u8", &short_arrays, |b| {
            let f = parse_gguf(b).unwrap();
            let kept: u64 =
                f.metadata.values().filter(|v| matches!(v, MetaValue::Array(_))).map(|v| v.array_len().unwrap()).sum();
            assert!(kept <= KEEP_SHORT_ARRAY_ELEMENTS, "{kept} short-array elements kept");
            assert_eq!(f.get("ff").and_then(MetaValue::array_len), Some(1024), "a summarised array keeps its length");
        }),
    ));

    // 200,000 one-byte values under keys of 1 to 5 characters.
    let scalars = file(200_000, |b, _| {
        b.extend(0u32.to_le_bytes());
        b.push(1);
    });
    worst.push(("u8 values", ratio("200,000 u8 values", &scalars, |b| drop(parse_gguf(b).unwrap()))));

    // 200,000 empty strings.
    let strings = file(200_000, |b, _| {
        b.extend(8u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
    });
    worst.push(("empty strings", ratio("200,000 empty strings", &strings, |b| drop(parse_gguf(b).unwrap()))));

    // A vocabulary kept whole (the tokenizer reads it) of 500,000 empty tokens.
    let mut vocab = header(0, 1);
    key(&mut vocab, "tokenizer.ggml.tokens");
    vocab.extend(9u32.to_le_bytes());
    vocab.extend(8u32.to_le_bytes());
    vocab.extend(500_000u64.to_le_bytes());
    for _ in 0..500_000 {
        vocab.extend(0u64.to_le_bytes());
    }
    worst.push((
        "kept vocabulary",
        ratio("a kept vocabulary of 500,000 empty tokens", &vocab, |b| {
            let f = parse_gguf_keeping(b, b.len() as u64, &|k| k == "tokenizer.ggml.tokens").unwrap();
            assert_eq!(f.get("tokenizer.ggml.tokens").and_then(MetaValue::array_len), Some(500_000));
        }),
    ));

    // 100,000 tensor entries with one-character names and one dimension (no data).
    let mut tensors = header(100_000, 0);
    for i in 0..100_000u64 {
        key(&mut tensors, &format!("{}", i % 10));
        tensors.extend(1u32.to_le_bytes()); // dims
        tensors.extend(0u64.to_le_bytes()); // a zero-length dimension
        tensors.extend(0u32.to_le_bytes()); // f32
        tensors.extend(0u64.to_le_bytes()); // offset
    }
    worst.push(("tensor entries", ratio("100,000 tensor entries", &tensors, |b| drop(parse_gguf(b)))));

    for (name, r) in worst {
        assert!(r <= 12.0, "{name}: {r:.1}× the header's bytes");
    }
}
