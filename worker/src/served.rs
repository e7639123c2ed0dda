//! A model being served: its layers on their devices, its tokenizer and chat template, where its
//! memory is counted, and its counters.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Instant;

use gantry_core::WireDtype;
use gantry_engine::chat::ChatTemplate;
use gantry_engine::pipeline::Segment;
use gantry_engine::tokenizer::Tokenizer;
use gantry_proto::v1 as pb;
use tokio::sync::Semaphore;

use crate::devices::DeviceBinding;

/// Seconds over which tokens/s are averaged.
const RATE_WINDOW_SECS: u64 = 10;

/// The stage after this worker's layers of a split model.
#[derive(Debug)]
pub struct NextStage {
    pub address: String,
    pub channel: tonic::transport::Channel,
    pub wire: WireDtype,
    /// The cluster's worker token, sent to the next stage (which may require it).
    pub token: Option<String>,
}

/// A model (or this worker's stage of a split one) being served.
#[derive(Debug)]
pub struct Served {
    pub info: pb::ModelInfo,
    /// Its layer ranges in order, each on its device.
    pub segments: Vec<Segment>,
    /// Where each segment's memory is counted, and how much.
    pub bindings: Vec<(DeviceBinding, u64)>,
    pub next: Option<NextStage>,
    pub tokenizer: Tokenizer,
    pub template: Result<ChatTemplate, String>,
    pub extra_eos: Vec<u32>,
    /// One permit per generation running at once (`WorkerOptions::max_running`); within
    /// them, sequences start as their KV blocks fit.
    pub slots: std::sync::Arc<Semaphore>,
    pub running: AtomicU32,
    pub queued: AtomicU32,
    pub tokens: AtomicU64,
    pub meter: RateMeter,
    /// What the load measured (`None`: it overlapped another load, or nothing could be read).
    pub measured: Option<LoadMeasurement>,
}

/// A load's measurement and the readings serving adds to.
#[derive(Debug, Clone)]
pub struct LoadMeasurement {
    pub load: gantry_core::measured::Measurement,
    /// The resident set when the load ended (the peak was reset then).
    pub resident_after: u64,
    /// KV blocks' bytes written when the load ended (see `KvPool::touched_bytes`).
    pub kv_allocated: u64,
}

impl Served {
    /// What `Status` reports of it.
    pub fn loaded(&self) -> pb::LoadedModel {
        use std::sync::atomic::Ordering::Relaxed;
        let mut m = pb::LoadedModel {
            info: Some(self.info.clone()),
            running: self.running.load(Relaxed),
            queued: self.queued.load(Relaxed),
            tokens_generated: self.tokens.load(Relaxed),
            tokens_per_sec: self.meter.rate(),
            ..Default::default()
        };
        for s in &self.segments {
            let b = s.batcher.stats();
            m.preemptions += b.preempted;
            m.batch_steps += b.steps;
            m.batch_rows += b.rows;
            if let Some(kv) = s.part.kv_pool() {
                let c = kv.counts();
                let (looked_up, hit) = kv.prefix_stats();
                m.kv_block_tokens = gantry_engine::cpu::kv::BLOCK_TOKENS as u32;
                m.kv_blocks_total += c.total as u64;
                m.kv_blocks_used += c.used as u64;
                m.kv_blocks_cached += c.cached as u64;
                m.prefix_blocks_looked_up += looked_up;
                m.prefix_blocks_hit += hit;
            }
        }
        m
    }

    /// Its measurement as it stands (see [`crate::measure`]); `sole`: the only model this
    /// process serves, so the peak resident set is its own.
    pub fn measurement(&self, sole: bool) -> Option<pb::ModelMeasurement> {
        let l = self.measured.as_ref()?;
        let first = self.segments.first()?;
        let kv_now: u64 = self.segments.iter().filter_map(|s| s.part.kv_pool()).map(|k| k.touched_bytes() as u64).sum();
        let m = crate::measure::current(
            &l.load,
            l.resident_after,
            kv_now.saturating_sub(l.kv_allocated),
            sole,
            &first.batcher.stats(),
        );
        Some(gantry_proto::convert::measurement_to_proto(&m))
    }

    /// How the prefix-cache keys of its KV cache changed since the last call, at most `max`
    /// of them (`resync`: a snapshot of all of them); `None` without a paged cache. The first
    /// segment's cache: it holds the prompt's leading blocks, which a router looks up.
    pub fn prefix_key_changes(&self, max: usize, resync: bool) -> Option<pb::PrefixKeyChanges> {
        let kv = self.segments.first()?.part.kv_pool()?;
        let c = kv.take_key_changes(max, resync);
        Some(pb::PrefixKeyChanges { reset: c.reset, added: c.added, dropped: c.dropped })
    }

    /// The first segment's prefix-cache block size and key seed (a block size of 0 without a
    /// paged cache).
    pub fn prefix_keying(&self) -> (u32, u64) {
        match self.segments.first().and_then(|s| s.part.kv_pool()) {
            Some(kv) => (gantry_engine::cpu::kv::BLOCK_TOKENS as u32, kv.seed()),
            None => (0, 0),
        }
    }

    /// Its vocabulary size (resumed tokens and logit biases are checked against it).
    pub fn vocab_size(&self) -> usize {
        self.segments.first().map_or(0, |s| s.part.config.vocab_size)
    }
}

/// Tokens per second over the last few seconds.
#[derive(Debug)]
pub struct RateMeter {
    origin: Instant,
    buckets: Mutex<VecDeque<(u64, u64)>>,
}

impl Default for RateMeter {
    fn default() -> Self {
        RateMeter::new()
    }
}

impl RateMeter {
    pub fn new() -> RateMeter {
        RateMeter { origin: Instant::now(), buckets: Mutex::new(VecDeque::new()) }
    }

    pub fn add(&self, n: u64) {
        let sec = self.origin.elapsed().as_secs();
        let Ok(mut b) = self.buckets.lock() else { return };
        match b.back_mut() {
            Some((s, count)) if *s == sec => *count += n,
            _ => b.push_back((sec, n)),
        }
        while b.front().is_some_and(|(s, _)| s + RATE_WINDOW_SECS < sec) {
            b.pop_front();
        }
    }

    pub fn rate(&self) -> f64 {
        let now = self.origin.elapsed().as_secs_f64();
        let Ok(b) = self.buckets.lock() else { return 0.0 };
        let from = (now - RATE_WINDOW_SECS as f64).max(0.0);
        let tokens: u64 = b.iter().filter(|(s, _)| *s as f64 + 1.0 > from).map(|(_, n)| n).sum();
        tokens as f64 / (now - from).max(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_meter_counts_recent_tokens() {
        let m = RateMeter::new();
        assert_eq!(m.rate(), 0.0);
        m.add(30);
        assert!(m.rate() > 0.0);
    }
}
