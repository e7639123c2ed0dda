//! Tensor parallelism: which part of every layer each of `N` ranks computes.
//!
//! A tensor-parallel group splits each layer, not the layer list: every rank holds all layers,
//! a slice of each. Rank `r` of `N` computes
//! - query heads `r·H/N .. (r+1)·H/N`, with the key/value heads they read: its own slice of the
//!   KV heads when `N` divides them, or the one KV head its query heads share when the KV heads
//!   divide `N` (the KV projection is then repeated on `N / KV` ranks, as grouped-query attention
//!   with few KV heads must be);
//! - rows `r·F/N .. (r+1)·F/N` of the MLP's intermediate width `F`;
//! - vocabulary rows `r·V/N .. (r+1)·V/N` of the embeddings and the output head.
//!
//! The attention output and MLP down projections then hold partial sums that one all-reduce per
//! projection adds up; the output head's slices are gathered. The same rule decides whether a
//! model can be split `N` ways ([`check`]) for placement and for the engine.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Rank `rank`'s share of `total` items split `size` ways: `rank·total/size .. (rank+1)·total/size`
/// (shares differ by at most one item when `size` does not divide `total`).
pub fn share(total: usize, size: usize, rank: usize) -> Range<usize> {
    let size = size.max(1);
    rank * total / size..(rank + 1) * total / size
}

/// The attention heads one rank computes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadSplit {
    /// Query heads.
    pub q: Range<usize>,
    /// Key/value heads (shared with other ranks when the model has fewer KV heads than ranks).
    pub kv: Range<usize>,
}

/// The heads rank `rank` of `size` computes, or why the model's heads cannot be split so.
pub fn heads(num_heads: usize, num_kv_heads: usize, size: usize, rank: usize) -> Result<HeadSplit, String> {
    check_heads(num_heads, num_kv_heads, size)?;
    let q = share(num_heads, size, rank);
    let kv = if num_kv_heads.is_multiple_of(size) {
        share(num_kv_heads, size, rank)
    } else {
        // Each rank's query heads lie in one KV group (`size` is a multiple of the KV heads).
        let g = rank * num_kv_heads / size;
        g..g + 1
    };
    Ok(HeadSplit { q, kv })
}

fn check_heads(num_heads: usize, num_kv_heads: usize, size: usize) -> Result<(), String> {
    if size == 0 {
        return Err("a tensor-parallel group needs at least one rank".into());
    }
    if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(format!("{num_heads} attention heads do not form groups over {num_kv_heads} KV heads"));
    }
    if !num_heads.is_multiple_of(size) {
        return Err(format!("{size} ranks do not divide the {num_heads} attention heads"));
    }
    if !num_kv_heads.is_multiple_of(size) && !size.is_multiple_of(num_kv_heads) {
        return Err(format!("{size} ranks neither divide the {num_kv_heads} KV heads nor are a multiple of them"));
    }
    Ok(())
}

/// The shape figures the split depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    /// A mixture of experts (whose expert layers are not split).
    pub experts: bool,
}

impl TpShape {
    /// The figures of a model's architecture.
    pub fn of(a: &crate::arch::Architecture) -> TpShape {
        TpShape {
            num_heads: a.num_heads as usize,
            num_kv_heads: a.num_kv_heads as usize,
            intermediate_size: a.intermediate_size as usize,
            vocab_size: a.vocab_size as usize,
            experts: a.moe.is_some(),
        }
    }
}

/// Whether a model of `shape` splits `size` ways: `size` divides the attention heads, divides or
/// is a multiple of the KV heads, and divides the MLP width; the vocabulary may split unevenly.
pub fn check(shape: &TpShape, size: usize) -> Result<(), String> {
    if shape.experts {
        return Err("mixture-of-experts layers are not split tensor-parallel".into());
    }
    check_heads(shape.num_heads, shape.num_kv_heads, size)?;
    if !shape.intermediate_size.is_multiple_of(size) {
        return Err(format!("{size} ranks do not divide the MLP width {}", shape.intermediate_size));
    }
    if shape.vocab_size < size {
        return Err(format!("a vocabulary of {} cannot be split {size} ways", shape.vocab_size));
    }
    Ok(())
}

/// The group sizes (more than one) a model of `shape` can be split into, up to `max`.
pub fn sizes(shape: &TpShape, max: usize) -> Vec<usize> {
    (2..=max).filter(|&n| check(shape, n).is_ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_once() {
        for total in [0, 1, 7, 384, 49_152] {
            for size in 1..=5 {
                let parts: Vec<_> = (0..size).map(|r| share(total, size, r)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[size - 1].end, total);
                assert!(parts.windows(2).all(|w| w[0].end == w[1].start), "{total} / {size}: {parts:?}");
            }
        }
    }

    #[test]
    fn kv_heads_are_split_or_shared() {
        // Llama-like: 32 heads, 8 KV heads, 4 ranks: two KV heads each.
        assert_eq!(heads(32, 8, 4, 1).unwrap(), HeadSplit { q: 8..16, kv: 2..4 });
        // Gemma 3 270M: 4 heads, 1 KV head, 2 ranks: both read KV head 0.
        assert_eq!(heads(4, 1, 2, 1).unwrap(), HeadSplit { q: 2..4, kv: 0..1 });
        // 4 heads over 2 KV heads, 4 ranks: ranks 0,1 share KV head 0, ranks 2,3 KV head 1.
        let kv: Vec<_> = (0..4).map(|r| heads(4, 2, 4, r).unwrap().kv).collect();
        assert_eq!(kv, vec![0..1, 0..1, 1..2, 1..2]);
        // Every query head reads the KV head it reads unsplit.
        for (h, kvh, n) in [(32, 8, 8), (9, 3, 3), (12, 4, 2), (16, 2, 8)] {
            for r in 0..n {
                let s = heads(h, kvh, n, r).unwrap();
                for q in s.q.clone() {
                    assert!(s.kv.contains(&(q / (h / kvh))), "{h}/{kvh} over {n}: rank {r} head {q}");
                }
            }
        }
    }

    #[test]
    fn splits_that_cannot_work_say_why() {
        // SmolLM2-135M: 9 heads, 3 KV heads.
        assert_eq!(heads(9, 3, 2, 0).unwrap_err(), "2 ranks do not divide the 9 attention heads");
        assert_eq!(heads(12, 8, 6, 0).unwrap_err(), "12 attention heads do not form groups over 8 KV heads");
        assert_eq!(heads(24, 6, 4, 0).unwrap_err(), "4 ranks neither divide the 6 KV heads nor are a multiple of them");
        let smol =
            TpShape { num_heads: 9, num_kv_heads: 3, intermediate_size: 1536, vocab_size: 49_152, experts: false };
        assert_eq!(sizes(&smol, 8), vec![3]);
        let shape = TpShape { num_heads: 8, num_kv_heads: 8, intermediate_size: 100, vocab_size: 1000, experts: false };
        assert_eq!(check(&shape, 8).unwrap_err(), "8 ranks do not divide the MLP width 100");
        assert_eq!(sizes(&shape, 8), vec![2, 4]);
    }
}
