//! The prefix-cache key of a block of tokens: a chained hash, so that a block's key names every
//! token before it too. A worker keys the KV blocks it keeps by it (a new request reuses the
//! longest run of leading blocks whose keys it finds), and a router can compute the same keys
//! from a prompt's token ids to send it where its prefix is cached.
//!
//! The definition (also in `worker.proto`, `LoadedModel`): 64-bit FNV-1a over little-endian
//! bytes.
//!
//! - `seed = fnv1a(b"gantry-prefix-v1\0" ++ model_id as UTF-8)`
//! - `key(0) = fnv1a_from(seed, tokens[0..B] as u32 LE)`
//! - `key(i) = fnv1a_from(key(i-1), tokens[i·B..(i+1)·B] as u32 LE)`
//!
//! where `fnv1a_from(h, bytes)` continues FNV-1a from state `h` (offset basis
//! 0xcbf29ce484222325, prime 0x100000001b3) and `B` is the block size in tokens. Only full
//! blocks have keys. A 64-bit key can collide; whoever reuses a block on a key also compares the
//! block's token ids, so a collision costs a cache miss, never a wrong answer.

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a_from(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// The seed of a model's chain: blocks of different models never share keys.
pub fn model_seed(model_id: &str) -> u64 {
    fnv1a_from(fnv1a_from(OFFSET, b"gantry-prefix-v1\0"), model_id.as_bytes())
}

/// The key of a block of `tokens` that follows the block keyed `parent` (the model's seed for
/// the first block).
pub fn block_key(parent: u64, tokens: &[u32]) -> u64 {
    tokens.iter().fold(parent, |h, t| fnv1a_from(h, &t.to_le_bytes()))
}

/// The keys of every full block of `tokens`, `block` tokens each.
pub fn block_keys(seed: u64, tokens: &[u32], block: usize) -> Vec<u64> {
    if block == 0 {
        return Vec::new();
    }
    let mut parent = seed;
    tokens
        .chunks_exact(block)
        .map(|b| {
            parent = block_key(parent, b);
            parent
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_is_the_published_function() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a_from(OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a_from(OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a_from(OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn a_blocks_key_depends_on_every_token_before_it() {
        let seed = model_seed("smollm2");
        let a: Vec<u32> = (0..48).collect();
        let mut b = a.clone();
        b[3] = 999;
        let (ka, kb) = (block_keys(seed, &a, 16), block_keys(seed, &b, 16));
        assert_eq!(ka.len(), 3);
        // Block 0 differs, so every later key does too, though blocks 1 and 2 hold equal tokens.
        assert!(ka.iter().zip(&kb).all(|(x, y)| x != y));
        // The same tokens give the same keys; a partial block has none.
        assert_eq!(block_keys(seed, &a[..40], 16), ka[..2]);
        // Another model, other keys.
        assert_ne!(block_keys(model_seed("gemma"), &a, 16), ka);
    }

    #[test]
    fn keys_are_stable_across_releases() {
        // The controller routes on these values: they must never change. (Computed apart, with
        // Python: FNV-1a 64 over b"gantry-prefix-v1\0m", then over struct.pack("<II", 1, 2).)
        let seed = model_seed("m");
        assert_eq!(seed, 0x897a_4431_db66_19ce);
        assert_eq!(block_keys(seed, &[1, 2, 3], 2), vec![0xf86e_7e63_4d74_b08d]);
    }
}
