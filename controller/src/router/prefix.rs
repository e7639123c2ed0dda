//! The prefix index: which replicas hold which prefix-cache keys (`gantry_core::prefix`), from
//! the key changes workers send with their heartbeats (`LoadedModel.prefix_keys`). Given a
//! prompt's block keys, it tells how many leading blocks each replica has cached, for routing a
//! request where its prefix already is.
//!
//! Bounded: each replica keeps at most `max_per_replica` keys (past it, its oldest go first) and
//! the index `max_entries` in all (past it, the oldest reported anywhere go first). What it forgets
//! only costs a routing hint, never a wrong answer (a worker checks the tokens of every block
//! it reuses).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use gantry_proto::v1 as pb;

/// Keys kept per replica by default: a worker's KV pool rarely holds more blocks.
pub const DEFAULT_MAX_PER_REPLICA: usize = 100_000;
/// Keys kept in all by default (about 100 bytes each: ~400 MB at the bound).
pub const DEFAULT_MAX_ENTRIES: usize = 4_000_000;

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
        let m = u128::from(k ^ self.0) * 0x9e37_79b9_7f4a_7c15;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Keyed = BuildHasherDefault<KeyHasher>;

/// One replica's keys.
#[derive(Debug, Default)]
struct Slot {
    worker: String,
    model_id: String,
    keys: HashSet<u64, Keyed>,
    /// The keys in the order they were reported (and some since dropped: skipped when met).
    order: VecDeque<u64>,
}

/// The index.
#[derive(Debug)]
pub struct PrefixIndex {
    /// Key → the slots holding it, in increasing order.
    holders: HashMap<u64, Vec<u32>, Keyed>,
    /// Worker → model id → slot (looked up by `&str`, without allocating).
    by_replica: HashMap<String, HashMap<String, u32, Keyed>, Keyed>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Every (slot, key) in the order reported (and some since dropped: skipped when met).
    order: VecDeque<(u32, u64)>,
    entries: usize,
    max_per_replica: usize,
    max_entries: usize,
    /// Keys forgotten for the bounds, since the start.
    forgotten: u64,
}

impl Default for PrefixIndex {
    fn default() -> Self {
        PrefixIndex::new(DEFAULT_MAX_PER_REPLICA, DEFAULT_MAX_ENTRIES)
    }
}

impl PrefixIndex {
    pub fn new(max_per_replica: usize, max_entries: usize) -> PrefixIndex {
        PrefixIndex {
            holders: HashMap::default(),
            by_replica: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            order: VecDeque::new(),
            entries: 0,
            max_per_replica: max_per_replica.max(1),
            max_entries: max_entries.max(1),
            forgotten: 0,
        }
    }

    /// Keys held in all (a key two replicas hold counts twice).
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Replicas with keys.
    pub fn replicas(&self) -> usize {
        self.by_replica.values().map(HashMap::len).sum()
    }

    /// Keys forgotten to keep within the bounds, since the start.
    pub fn forgotten(&self) -> u64 {
        self.forgotten
    }

    /// Keys `model_id` on `worker` holds.
    pub fn keys_of(&self, worker: &str, model_id: &str) -> usize {
        self.slot(worker, model_id).map_or(0, |s| self.slots[s as usize].as_ref().map_or(0, |s| s.keys.len()))
    }

    fn slot(&self, worker: &str, model_id: &str) -> Option<u32> {
        self.by_replica.get(worker)?.get(model_id).copied()
    }

    /// Applies the changes `worker` reported for `model_id`.
    pub fn apply(&mut self, worker: &str, model_id: &str, changes: &pb::PrefixKeyChanges) {
        if changes.reset {
            self.remove_replica(worker, model_id);
        }
        if let Some(s) = self.slot(worker, model_id) {
            for &key in &changes.dropped {
                self.drop_key(s, key);
            }
            self.compact(s);
        }
        self.add(worker, model_id, &changes.added);
    }

    /// Adds `keys` to what `model_id` on `worker` holds: reported by its worker, or expected
    /// because the router just sent it a prompt with these blocks (it reports them once
    /// computed, or drops them when evicted; a request that fails there leaves them to age
    /// out, costing a routing hint, never a wrong answer).
    pub fn add(&mut self, worker: &str, model_id: &str, keys: &[u64]) {
        if keys.is_empty() {
            return;
        }
        let s = match self.slot(worker, model_id) {
            Some(s) => s,
            None => {
                let slot = Slot { worker: worker.into(), model_id: model_id.into(), ..Slot::default() };
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
                self.by_replica.entry(worker.into()).or_default().insert(model_id.into(), s);
                s
            }
        };
        for &key in keys {
            let Some(slot) = self.slots[s as usize].as_mut() else { return };
            if !slot.keys.insert(key) {
                continue;
            }
            slot.order.push_back(key);
            let over = slot.keys.len() > self.max_per_replica;
            self.order.push_back((s, key));
            let h = self.holders.entry(key).or_default();
            if let Err(at) = h.binary_search(&s) {
                h.insert(at, s);
            }
            self.entries += 1;
            if over {
                self.forget_oldest_of(s);
            }
            while self.entries > self.max_entries && self.forget_oldest() {}
        }
        self.compact(s);
    }

    /// How many leading blocks of a prompt whose full blocks have `keys` (in order) `model_id`
    /// on `worker` holds.
    pub fn held_run(&self, worker: &str, model_id: &str, keys: &[u64]) -> usize {
        let Some(slot) = self.slot(worker, model_id).and_then(|s| self.slots[s as usize].as_ref()) else { return 0 };
        keys.iter().take_while(|k| slot.keys.contains(k)).count()
    }

    /// Forgets slot `s`'s oldest key.
    fn forget_oldest_of(&mut self, s: u32) {
        loop {
            let Some(slot) = self.slots[s as usize].as_mut() else { return };
            let Some(key) = slot.order.pop_front() else { return };
            if slot.keys.contains(&key) {
                self.drop_key(s, key);
                self.forgotten += 1;
                return;
            }
        }
    }

    /// Forgets the oldest key reported by any replica; false when there is none.
    fn forget_oldest(&mut self) -> bool {
        while let Some((s, key)) = self.order.pop_front() {
            if self.slots[s as usize].as_ref().is_some_and(|x| x.keys.contains(&key)) {
                self.drop_key(s, key);
                self.forgotten += 1;
                return true;
            }
        }
        false
    }

    fn drop_key(&mut self, s: u32, key: u64) {
        let Some(slot) = self.slots[s as usize].as_mut() else { return };
        if !slot.keys.remove(&key) {
            return;
        }
        self.entries -= 1;
        self.unhold(key, s);
    }

    /// Takes slot `s` off `key`'s holders.
    fn unhold(&mut self, key: u64, s: u32) {
        if let Some(h) = self.holders.get_mut(&key) {
            if let Ok(at) = h.binary_search(&s) {
                h.remove(at);
            }
            if h.is_empty() {
                self.holders.remove(&key);
            }
        }
    }

    /// Drops the dropped keys still queued in slot `s`'s order and in the index's once they
    /// are most of them.
    fn compact(&mut self, s: u32) {
        if let Some(slot) = self.slots[s as usize].as_mut()
            && slot.order.len() > 2 * slot.keys.len() + 1024
        {
            let keys = &slot.keys;
            slot.order.retain(|k| keys.contains(k));
        }
        if self.order.len() > 2 * self.entries + 1024 {
            let slots = &self.slots;
            self.order.retain(|(s, k)| slots[*s as usize].as_ref().is_some_and(|x| x.keys.contains(k)));
        }
    }

    /// Forgets everything `model_id` on `worker` holds (unloaded, or its worker resynced).
    pub fn remove_replica(&mut self, worker: &str, model_id: &str) {
        let Some(models) = self.by_replica.get_mut(worker) else { return };
        let Some(s) = models.remove(model_id) else { return };
        if models.is_empty() {
            self.by_replica.remove(worker);
        }
        let Some(slot) = self.slots[s as usize].take() else { return };
        for key in slot.keys {
            self.entries -= 1;
            self.unhold(key, s);
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
    pub fn cached_prefixes(&self, keys: &[u64]) -> Vec<(String, String, usize)> {
        let Some(first) = keys.first().and_then(|k| self.holders.get(k)) else { return Vec::new() };
        let mut run: Vec<(u32, usize)> = first.iter().map(|&s| (s, 1)).collect();
        for (i, key) in keys.iter().enumerate().skip(1) {
            let Some(h) = self.holders.get(key) else { break };
            let mut any = false;
            for (s, n) in &mut run {
                if *n == i && h.binary_search(s).is_ok() {
                    *n += 1;
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        let mut out: Vec<(String, String, usize)> = run
            .into_iter()
            .filter_map(|(s, n)| self.slots[s as usize].as_ref().map(|x| (x.worker.clone(), x.model_id.clone(), n)))
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
        ix.remove_worker("a");
        assert_eq!((ix.entries(), ix.replicas(), ix.holders.len()), (0, 0, 0));
    }

    #[test]
    fn the_index_never_grows_past_its_bounds_and_forgets_the_oldest_first() {
        let mut ix = PrefixIndex::new(100, 250);
        // One replica reporting 1,000 keys keeps its newest 100.
        let keys: Vec<u64> = (0..1000).collect();
        for chunk in keys.chunks(64) {
            ix.apply("a", "m", &changes(false, chunk, &[]));
            assert!(ix.keys_of("a", "m") <= 100);
        }
        assert_eq!(ix.keys_of("a", "m"), 100);
        assert!(ix.cached_prefixes(&[999]).len() == 1 && ix.cached_prefixes(&[899]).is_empty());
        // Three more replicas: the total stays within 250, the oldest reported forgotten first
        // (a's, then b's).
        for w in ["b", "c", "d"] {
            ix.apply(w, "m", &changes(true, &keys[..100], &[]));
            assert!(ix.entries() <= 250, "{} entries", ix.entries());
        }
        assert_eq!(ix.entries(), 250);
        assert_eq!(ix.forgotten(), 900 + 150);
        let held: Vec<usize> = ["a", "b", "c", "d"].iter().map(|w| ix.keys_of(w, "m")).collect();
        assert_eq!(held, vec![0, 50, 100, 100]);
        // Churn (keys added and dropped again and again) does not grow a replica's order.
        for round in 0..50u64 {
            let batch: Vec<u64> = (0..100).map(|k| 10_000 + round * 100 + k).collect();
            ix.apply("a", "m", &changes(false, &batch, &[]));
            ix.apply("a", "m", &changes(false, &[], &batch));
        }
        let s = ix.slot("a", "m").unwrap();
        assert!(ix.slots[s as usize].as_ref().unwrap().order.len() <= 2 * 100 + 1024 + 100);
        assert!(ix.order.len() <= 2 * 250 + 1024 + 100);
    }
}
