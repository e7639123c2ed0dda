//! Measuring what a model really takes and how fast it runs (`gantry_core::measured`).
//!
//! * **CPU** (method `rss`): the process's resident set (`VmRSS`) before the tokenizer is read,
//!   after it, and after the layers are built. Weights: the growth across building the layers
//!   (the engine's own layout, repacked or mapped, as resident). Overhead: the growth across the
//!   tokenizer and chat template. KV cache: the paged pool's bytes at the size the load reserved
//!   (`blocks × bytes per block`, the engine's own accounting; blocks are allocated as used).
//!   Activations: once the model has served, the process's peak resident set since the load
//!   (`VmHWM`, reset after each load) less the resident set after the load and the KV blocks
//!   written since; known only while the worker serves one model (with several, whose peak
//!   it is cannot be told).
//! * **GPU** (method `nvml`): the GPU's used memory before and after the load. Weights: the
//!   bytes of the weight tensors Candle allocated for the layers (as the load counted them);
//!   overhead: the rest of the growth (the CUDA context, in the first load's, and the
//!   allocator's pools). KV cache and activations are not measured there.
//!
//! A load that overlaps another load of the same process records no memory (whose growth it
//! is cannot be told) and says so in the log.

use gantry_core::measured::{Measurement, SpeedPoint, Terms};
use gantry_engine::batch::BatchStats;

/// The process's resident set and its peak since the last reset, in bytes (`/proc/self/status`).
pub fn resident() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Starts a new peak: the kernel sets the peak resident set to the current one.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// This machine's CPU as a device kind: `cpu:<model name>` from `/proc/cpuinfo`.
pub fn cpu_kind() -> String {
    let name = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
    });
    format!("cpu:{}", name.filter(|n| !n.is_empty()).unwrap_or_else(|| std::env::consts::ARCH.to_string()))
}

/// The speed figures of a batcher's counters.
pub fn speed(stats: &BatchStats) -> Vec<SpeedPoint> {
    stats
        .speed
        .iter()
        .enumerate()
        .filter(|(_, t)| t.prefill_rows + t.decode_rows > 0)
        .map(|(i, t)| SpeedPoint {
            batch: 1 << i,
            prefill_tokens: t.prefill_rows,
            prefill_seconds: t.prefill_nanos as f64 / 1e9,
            decode_tokens: t.decode_rows,
            decode_seconds: t.decode_nanos as f64 / 1e9,
        })
        .collect()
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Readings taken around a load.
#[derive(Debug, Default, Clone, Copy)]
pub struct Readings {
    /// Resident set (CPU) or the GPU's used bytes (GPU): before the tokenizer, after it, after the
    /// layers.
    pub before: u64,
    pub after_tokenizer: u64,
    pub after_layers: u64,
}

impl Readings {
    /// The measured terms (activations come later, from serving); `weight_bytes`: the weight
    /// tensors' bytes the load allocated (what a GPU's growth is split by).
    pub fn terms(&self, kv_cache: u64, gpu: bool, weight_bytes: u64) -> Terms {
        if gpu {
            let grown = self.after_layers.saturating_sub(self.before);
            let weights = if weight_bytes > 0 { weight_bytes.min(grown) } else { grown };
            return Terms { weights, overhead: grown - weights, ..Terms::default() };
        }
        Terms {
            weights: self.after_layers.saturating_sub(self.after_tokenizer),
            kv_cache,
            activations: 0,
            overhead: self.after_tokenizer.saturating_sub(self.before),
        }
    }
}

/// A served model's measurement as it stands: the load's, with activations from the peak
/// resident set (when `sole`: the only model served) and the speed counters.
pub fn current(
    load: &Measurement,
    resident_after_load: u64,
    kv_allocated_since_load: u64,
    sole: bool,
    stats: &BatchStats,
) -> Measurement {
    let mut m = load.clone();
    m.speed = speed(stats);
    if sole
        && load.method == "rss"
        && stats.steps > 0
        && let Some((_, peak)) = resident()
    {
        m.measured.activations = peak.saturating_sub(resident_after_load).saturating_sub(kv_allocated_since_load);
    }
    if stats.steps > 0 {
        m.measured_at_ms = now_ms();
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_resident_set_and_the_cpu_a_kind() {
        let (rss, peak) = resident().expect("Linux reports VmRSS and VmHWM");
        assert!(rss > 1 << 20 && peak >= rss, "{rss} {peak}");
        let kind = cpu_kind();
        assert!(kind.starts_with("cpu:") && kind.len() > 4, "{kind}");
        let r = Readings { before: 100, after_tokenizer: 130, after_layers: 1130 };
        assert_eq!(r.terms(500, false, 990), Terms { weights: 1000, kv_cache: 500, activations: 0, overhead: 30 });
        // On a GPU the growth splits into the tensors Candle allocated and the rest.
        assert_eq!(r.terms(500, true, 990), Terms { weights: 990, overhead: 40, ..Terms::default() });
        assert_eq!(r.terms(500, true, 0), Terms { weights: 1030, ..Terms::default() });
    }
}
