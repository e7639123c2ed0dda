//! The prefix index: which replicas hold which prefix-cache keys (`gantry_core::prefix`), from
//! the key changes workers send with their heartbeats (`LoadedModel.prefix_keys`). Given a
//! prompt's block keys, it tells how many leading blocks a replica has cached, for routing a
//! request where its prefix already is.
//!
//! Sized for 10,000 replicas × 100,000 blocks each: each replica's keys are a cuckoo filter of
//! 16-bit fingerprints (two candidate buckets of four per key), a fixed table of about 2.6 bytes
//! per key it is sized for — 256 KiB for 100,000 keys, 2.5 GiB for 10,000 such replicas, where
//! exact sets would take about 100 bytes a key (100 GB). A lookup probes two buckets per key.
//! The price is a rare false hit: a key the replica does not hold matches another's fingerprint
//! with a chance of about 1 in 8,000 per probe, and a run of blocks needs every one of them to
//! match. A false hit, like a key the index forgot, only costs a routing hint, never a wrong
//! answer (a worker checks the tokens of every block it reuses).
//!
//! Bounded: each replica keeps at most `max_per_replica` keys (past it, a key it holds is
//! forgotten at random to make room) and at most `max_replicas` replicas are indexed (the keys of
//! more are not kept: their requests go by load).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use gantry_proto::v1 as pb;

/// Keys kept per replica by default: a worker's KV pool rarely holds more blocks.
pub const DEFAULT_MAX_PER_REPLICA: usize = 100_000;
/// Replicas indexed by default (each a fixed table: 256 KiB at the default per-replica bound).
pub const DEFAULT_MAX_REPLICAS: usize = 10_000;
/// Slots per bucket of a replica's filter.
const BUCKET: usize = 4;
/// Displacements tried before an insert into a full neighbourhood gives up a key.
const MAX_KICKS: usize = 500;

/// Hashes a prefix-cache key for the index's tables. The keys are FNV-1a outputs already, so
/// one multiply-and-fold spreads them (against keys chosen to collide, it stays a table of
/// `u64`s: slower, never wrong); SipHash, the default, was a quarter of a routing decision.
/// Worker and replica names (short, chosen by the operator) are hashed by FNV-1a.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, k: u64) {
        self.0 = mix(k ^ self.0);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A prompt's keys as the index's filters probe them.
pub fn mixed(keys: &[u64]) -> Vec<u64> {
    keys.iter().map(|&k| mix(k)).collect()
}

/// A multiply-and-fold of a 64-bit value.
fn mix(k: u64) -> u64 {
    let m = u128::from(k) * 0x9e37_79b9_7f4a_7c15;
    (m as u64) ^ ((m >> 64) as u64)
}

/// Hash maps keyed by prefix-cache keys, worker ids or replica ids.
pub type Keyed = BuildHasherDefault<KeyHasher>;

/// One replica's keys: a cuckoo filter of 16-bit fingerprints (0: an empty slot).
#[derive(Debug)]
struct Filter {
    buckets: Box<[[u16; BUCKET]]>,
    len: usize,
    /// Where the next eviction or displacement starts (spreads them over the table).
    cursor: usize,
}

/// What an insert did.
#[derive(Debug, PartialEq, Eq)]
enum Inserted {
    New,
    /// Already held (or a key with its fingerprint in its buckets is).
    Present,
    /// Stored, at the cost of another key the filter had no room left for.
    Displaced,
}

impl Filter {
    /// A filter with room for `keys` keys (its buckets a power of two, at most 95% full).
    fn with_room(keys: usize) -> Filter {
        let buckets = (keys * 100 / 95).div_ceil(BUCKET).max(2).next_power_of_two();
        Filter { buckets: vec![[0; BUCKET]; buckets].into_boxed_slice(), len: 0, cursor: 0 }
    }

    /// A key's fingerprint (never 0) and first bucket.
    fn place(&self, key: u64) -> (u16, usize) {
        self.place_mixed(mix(key))
    }

    /// [`Filter::place`] of a key already mixed (`mix(key)`).
    fn place_mixed(&self, h: u64) -> (u16, usize) {
        let fp = ((h >> 48) as u16).max(1);
        (fp, (h as usize) & (self.buckets.len() - 1))
    }

    /// The other bucket of a fingerprint in bucket `i` (and back: `alt(alt(i)) == i`).
    fn alt(&self, i: usize, fp: u16) -> usize {
        (i ^ (mix(u64::from(fp)) as usize)) & (self.buckets.len() - 1)
    }

    fn contains(&self, key: u64) -> bool {
        self.contains_mixed(mix(key))
    }

    fn contains_mixed(&self, h: u64) -> bool {
        let (fp, i) = self.place_mixed(h);
        self.buckets[i].contains(&fp) || self.buckets[self.alt(i, fp)].contains(&fp)
    }

    /// How many of `mixed` keys, from the first, it holds.
    fn run(&self, mixed: &[u64]) -> usize {
        mixed.iter().take_while(|&&h| self.contains_mixed(h)).count()
    }

    fn insert(&mut self, key: u64) -> Inserted {
        let (mut fp, i) = self.place(key);
        let j = self.alt(i, fp);
        if self.buckets[i].contains(&fp) || self.buckets[j].contains(&fp) {
            return Inserted::Present;
        }
        for b in [i, j] {
            if let Some(slot) = self.buckets[b].iter_mut().find(|s| **s == 0) {
                *slot = fp;
                self.len += 1;
                return Inserted::New;
            }
        }
        // Both full: move fingerprints to their other buckets until one finds room.
        let mut b = i;
        for _ in 0..MAX_KICKS {
            self.cursor = self.cursor.wrapping_add(1);
            let victim = &mut self.buckets[b][self.cursor % BUCKET];
            std::mem::swap(victim, &mut fp);
            b = self.alt(b, fp);
            if let Some(slot) = self.buckets[b].iter_mut().find(|s| **s == 0) {
                *slot = fp;
                self.len += 1;
                return Inserted::New;
            }
        }
        // No room: the last one moved out is forgotten.
        Inserted::Displaced
    }

    fn remove(&mut self, key: u64) -> bool {
        let (fp, i) = self.place(key);
        for b in [i, self.alt(i, fp)] {
            if let Some(slot) = self.buckets[b].iter_mut().find(|s| **s == fp) {
                *slot = 0;
                self.len -= 1;
                return true;
            }
        }
        false
    }

    /// Forgets one key it holds (the first found from a moving cursor).
    fn forget_one(&mut self) -> bool {
        let n = self.buckets.len() * BUCKET;
        for step in 0..n {
            let at = (self.cursor + step) % n;
            let slot = &mut self.buckets[at / BUCKET][at % BUCKET];
            if *slot != 0 {
                *slot = 0;
                self.len -= 1;
                self.cursor = at + 1;
                return true;
            }
        }
        false
    }

    /// Bytes of its table.
    fn bytes(&self) -> usize {
        self.buckets.len() * BUCKET * 2
    }
}

/// One replica's keys.
#[derive(Debug)]
struct Slot {
    worker: String,
    model_id: String,
    keys: Filter,
}

/// The deployment of a replica id (`name/index`), or the id itself.
fn deployment_of(model_id: &str) -> &str {
    model_id.rsplit_once('/').map_or(model_id, |(d, _)| d)
}

/// The index.
#[derive(Debug)]
pub struct PrefixIndex {
    /// Worker → model id → slot (looked up by `&str`, without allocating).
    by_replica: HashMap<String, HashMap<String, u32, Keyed>, Keyed>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Replicas indexed now, in all and per deployment.
    indexed: usize,
    per_deployment: HashMap<String, usize, Keyed>,
    entries: usize,
    max_per_replica: usize,
    max_replicas: usize,
    /// Keys forgotten (or never kept) for the bounds, since the start.
    forgotten: u64,
}

impl Default for PrefixIndex {
    fn default() -> Self {
        PrefixIndex::new(DEFAULT_MAX_PER_REPLICA, DEFAULT_MAX_REPLICAS)
    }
}

impl PrefixIndex {
    pub fn new(max_per_replica: usize, max_replicas: usize) -> PrefixIndex {
        PrefixIndex {
            by_replica: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            indexed: 0,
            per_deployment: HashMap::default(),
            entries: 0,
            max_per_replica: max_per_replica.max(1),
            max_replicas: max_replicas.max(1),
            forgotten: 0,
        }
    }

    /// Keys held in all (a key two replicas hold counts twice).
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Replicas with keys.
    pub fn replicas(&self) -> usize {
        self.indexed
    }

    /// Keys forgotten (or not kept) to stay within the bounds, since the start.
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// Bytes of the replicas' tables.
    pub fn table_bytes(&self) -> usize {
        self.slots.iter().flatten().map(|s| s.keys.bytes()).sum()
    }

    /// Whether some replica of `deployment` (replica ids `deployment/N`) has been reported
    /// holding keys (it may have dropped them since): what decides whether asking for a
    /// prompt's token ids can change where it goes.
    pub fn has_keys_for(&self, deployment: &str) -> bool {
        self.per_deployment.contains_key(deployment)
    }

    /// Keys `model_id` on `worker` holds.
    pub fn keys_of(&self, worker: &str, model_id: &str) -> usize {
        self.slot(worker, model_id).map_or(0, |s| self.slots[s as usize].as_ref().map_or(0, |s| s.keys.len))
    }

    fn slot(&self, worker: &str, model_id: &str) -> Option<u32> {
        self.by_replica.get(worker)?.get(model_id).copied()
    }

    /// Applies the changes `worker` reported for `model_id`.
    pub fn apply(&mut self, worker: &str, model_id: &str, changes: &pb::PrefixKeyChanges) {
        if changes.reset {
            self.remove_replica(worker, model_id);
        }
        if let Some(s) = self.slot(worker, model_id)
            && let Some(slot) = self.slots[s as usize].as_mut()
        {
            for &key in &changes.dropped {
                if slot.keys.remove(key) {
                    self.entries -= 1;
                }
            }
        }
        self.add(worker, model_id, &changes.added);
    }

    /// Adds `keys` to what `model_id` on `worker` holds: reported by its worker, or expected
    /// because the router just sent it a prompt with these blocks (it reports them once
    /// computed, or drops them when evicted; a request that fails there leaves them until the
    /// replica's bound makes room, costing a routing hint, never a wrong answer).
    pub fn add(&mut self, worker: &str, model_id: &str, keys: &[u64]) {
        if keys.is_empty() {
            return;
        }
        let s = match self.slot(worker, model_id) {
            Some(s) => s,
            None if self.indexed >= self.max_replicas => {
                self.forgotten += keys.len() as u64;
                return;
            }
            None => {
                let slot = Slot {
                    worker: worker.into(),
                    model_id: model_id.into(),
                    keys: Filter::with_room(self.max_per_replica),
                };
                let s = match self.free.pop() {
                    Some(s) => {
                        self.slots[s as usize] = Some(slot);
                        s
                    }
                    None => {
                        self.slots.push(Some(slot));
                        (self.slots.len() - 1) as u32
                    }
                };
                self.indexed += 1;
                *self.per_deployment.entry(deployment_of(model_id).into()).or_default() += 1;
                self.by_replica.entry(worker.into()).or_default().insert(model_id.into(), s);
                s
            }
        };
        let Some(slot) = self.slots[s as usize].as_mut() else { return };
        for &key in keys {
            if slot.keys.len >= self.max_per_replica && !slot.keys.contains(key) && slot.keys.forget_one() {
                self.entries -= 1;
                self.forgotten += 1;
            }
            match slot.keys.insert(key) {
                Inserted::New => self.entries += 1,
                Inserted::Present => {}
                Inserted::Displaced => self.forgotten += 1,
            }
        }
    }

    /// How many leading blocks of a prompt whose full blocks have `keys` (in order) `model_id`
    /// on `worker` holds.
    pub fn held_run(&self, worker: &str, model_id: &str, keys: &[u64]) -> usize {
        self.held_run_mixed(worker, model_id, &mixed(keys))
    }

    /// [`PrefixIndex::held_run`] of keys already [`mixed`] (once for every replica weighed).
    pub fn held_run_mixed(&self, worker: &str, model_id: &str, mixed: &[u64]) -> usize {
        let Some(slot) = self.slot(worker, model_id).and_then(|s| self.slots[s as usize].as_ref()) else { return 0 };
        slot.keys.run(mixed)
    }

    /// Forgets everything `model_id` on `worker` holds (unloaded, or its worker resynced).
    pub fn remove_replica(&mut self, worker: &str, model_id: &str) {
        let Some(models) = self.by_replica.get_mut(worker) else { return };
        let Some(s) = models.remove(model_id) else { return };
        if models.is_empty() {
            self.by_replica.remove(worker);
        }
        let Some(slot) = self.slots[s as usize].take() else { return };
        self.entries -= slot.keys.len;
        self.indexed -= 1;
        let d = deployment_of(model_id);
        if let Some(n) = self.per_deployment.get_mut(d) {
            *n -= 1;
            if *n == 0 {
                self.per_deployment.remove(d);
            }
        }
        self.free.push(s);
    }

    /// Forgets everything `worker` holds (lost).
    pub fn remove_worker(&mut self, worker: &str) {
        let models: Vec<String> = self.by_replica.get(worker).map(|m| m.keys().cloned().collect()).unwrap_or_default();
        for m in models {
            self.remove_replica(worker, &m);
        }
    }

    /// Forgets the models of `worker` not in `loaded` (it unloaded them).
    pub fn retain_loaded(&mut self, worker: &str, loaded: &HashSet<String>) {
        let gone: Vec<String> = self
            .by_replica
            .get(worker)
            .map(|m| m.keys().filter(|m| !loaded.contains(*m)).cloned().collect())
            .unwrap_or_default();
        for m in gone {
            self.remove_replica(worker, &m);
        }
    }

    /// For a prompt whose full blocks have `keys` (in order), each replica holding its first
    /// block and how many leading blocks it holds, longest first: (worker, model id, blocks).
    /// (Every indexed replica is probed; the router probes only the ready replicas of the
    /// request's deployment, with [`PrefixIndex::held_run`].)
    pub fn cached_prefixes(&self, keys: &[u64]) -> Vec<(String, String, usize)> {
        let mixed = mixed(keys);
        let mut out: Vec<(String, String, usize)> = self
            .slots
            .iter()
            .flatten()
            .map(|s| (s, s.keys.run(&mixed)))
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| (s.worker.clone(), s.model_id.clone(), n))
            .collect();
        out.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_core::prefix::{block_keys, model_seed};

    fn changes(reset: bool, added: &[u64], dropped: &[u64]) -> pb::PrefixKeyChanges {
        pb::PrefixKeyChanges { reset, added: added.to_vec(), dropped: dropped.to_vec() }
    }

    /// The block keys of a prompt of `n` tokens starting with `first`.
    fn prompt(model: &str, first: u32, n: u32) -> Vec<u64> {
        block_keys(model_seed(model), &(first..first + n).collect::<Vec<_>>(), 16)
    }

    #[test]
    fn the_replica_with_the_longest_cached_prefix_comes_first() {
        let mut ix = PrefixIndex::default();
        let p = prompt("m-0", 0, 160); // 10 blocks
        ix.apply("a", "m-0", &changes(true, &p[..3], &[]));
        ix.apply("b", "m-0", &changes(true, &p[..7], &[]));
        // c holds blocks 0–1 and 3–4 (not 2): its run stops at 2.
        ix.apply("c", "m-0", &changes(true, &[p[0], p[1], p[3], p[4]], &[]));
        assert_eq!(
            ix.cached_prefixes(&p),
            vec![("b".into(), "m-0".into(), 7), ("a".into(), "m-0".into(), 3), ("c".into(), "m-0".into(), 2)]
        );
        // Another prompt sharing nothing: no replica.
        assert!(ix.cached_prefixes(&prompt("m-0", 1000, 64)).is_empty());
        assert_eq!(ix.entries(), 14);
    }

    #[test]
    fn evictions_unloads_and_lost_workers_leave_the_index() {
        let mut ix = PrefixIndex::default();
        let p = prompt("m-0", 0, 64);
        ix.apply("a", "m-0", &changes(true, &p, &[]));
        ix.apply("a", "m-1", &changes(true, &prompt("m-1", 0, 64), &[]));
        ix.apply("b", "m-0", &changes(true, &p, &[]));
        // a evicted its last two blocks.
        ix.apply("a", "m-0", &changes(false, &[], &p[2..]));
        assert_eq!(ix.keys_of("a", "m-0"), 2);
        assert_eq!(ix.cached_prefixes(&p)[1], ("a".into(), "m-0".into(), 2));
        // a unloaded m-1 (its heartbeat no longer lists it).
        ix.retain_loaded("a", &HashSet::from(["m-0".to_string()]));
        assert_eq!(ix.keys_of("a", "m-1"), 0);
        // b lost.
        ix.remove_worker("b");
        assert_eq!(ix.cached_prefixes(&p), vec![("a".into(), "m-0".into(), 2)]);
        // A resync replaces what was known.
        ix.apply("a", "m-0", &changes(true, &p[..1], &[]));
        assert_eq!(ix.keys_of("a", "m-0"), 1);
        assert_eq!((ix.entries(), ix.replicas()), (1, 1));
        assert!(ix.has_keys_for("m-0") && !ix.has_keys_for("m-1") && !ix.has_keys_for("m"));
        ix.remove_worker("a");
        assert_eq!((ix.entries(), ix.replicas(), ix.table_bytes()), (0, 0, 0));
        assert!(!ix.has_keys_for("m-0"));
    }

    #[test]
    fn the_index_never_grows_past_its_bounds() {
        let mut ix = PrefixIndex::new(100, 3);
        // One replica reporting 1,000 keys keeps 100 of them, the newest among them.
        let keys: Vec<u64> = prompt("m", 0, 16_000);
        for chunk in keys.chunks(64) {
            ix.apply("a", "m", &changes(false, chunk, &[]));
            assert!(ix.keys_of("a", "m") <= 100);
        }
        assert_eq!(ix.keys_of("a", "m"), 100);
        assert_eq!(ix.held_run("a", "m", &keys[999..]), 1);
        let held = keys.iter().filter(|&&k| ix.held_run("a", "m", &[k]) == 1).count();
        assert!((100..=102).contains(&held), "{held} of 1,000 keys look held");
        assert_eq!(ix.forgotten(), 900);
        // Three replicas are indexed at most: a fourth one's keys are not kept.
        for w in ["b", "c", "d"] {
            ix.apply(w, "m", &changes(true, &keys[..50], &[]));
        }
        assert_eq!((ix.replicas(), ix.keys_of("d", "m"), ix.entries()), (3, 0, 200));
        assert_eq!(ix.forgotten(), 950);
        // Churn (keys added and dropped again and again) leaves the tables as they were.
        let bytes = ix.table_bytes();
        for round in 0..50u64 {
            let batch: Vec<u64> = (0..100).map(|k| mix(round * 1000 + k)).collect();
            ix.apply("b", "m", &changes(false, &batch, &[]));
            ix.apply("b", "m", &changes(false, &[], &batch));
        }
        assert_eq!(ix.table_bytes(), bytes);
        assert!(ix.keys_of("b", "m") <= 50);
        // A lost worker frees its slot for the next replica.
        ix.remove_worker("c");
        ix.apply("d", "m", &changes(true, &keys[..50], &[]));
        assert_eq!(ix.keys_of("d", "m"), 50);
    }

    #[test]
    fn a_replica_sized_for_100_000_keys_takes_256_kib_and_rarely_claims_a_key_it_lacks() {
        let mut ix = PrefixIndex::default();
        let held: Vec<u64> = (0..100_000u64).map(|k| mix(k.wrapping_mul(7919) ^ 0xa5a5)).collect();
        for chunk in held.chunks(1000) {
            ix.apply("w", "m", &changes(false, chunk, &[]));
        }
        // A few keys share a fingerprint and bucket with one before them: taken as held already.
        let kept = ix.keys_of("w", "m");
        assert!((99_980..=100_000).contains(&kept) && ix.forgotten() == 0, "{kept}");
        assert_eq!(ix.table_bytes(), 256 << 10);
        assert!(held.iter().all(|&k| ix.held_run("w", "m", &[k]) == 1));
        // A million keys it does not hold: about 8 in 65,536 match a fingerprint.
        let false_hits = (0..1_000_000u64).filter(|&k| ix.held_run("w", "m", &[mix(k ^ (1 << 40))]) == 1).count();
        assert!(false_hits < 500, "{false_hits} false hits in 1,000,000");
        // A prompt of 64 blocks it does not hold never looks held past its first block or two.
        let p = prompt("other", 0, 1024);
        assert!(ix.held_run("w", "m", &p) <= 1);
    }
}
