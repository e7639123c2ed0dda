//! Conversions between the wire's messages and `gantry-core`'s types, in one place, so every
//! service reads a request the same way.

use gantry_core::SamplingParams;
use gantry_core::autoscale::Metric;

use crate::v1 as pb;

/// A request's sampling settings, with the defaults for what it leaves unset. Not checked:
/// call [`SamplingParams::validate`].
pub fn sampling_from_proto(p: Option<&pb::SamplingParams>) -> SamplingParams {
    let d = SamplingParams::default();
    let Some(p) = p else { return d };
    let mut logit_bias: Vec<(u32, f32)> = p.logit_bias.iter().map(|(&t, &b)| (t, b)).collect();
    logit_bias.sort_by_key(|&(t, _)| t);
    SamplingParams {
        temperature: p.temperature.unwrap_or(d.temperature),
        top_k: p.top_k.map_or(d.top_k, |k| k as usize),
        top_p: p.top_p.unwrap_or(d.top_p),
        min_p: p.min_p.unwrap_or(d.min_p),
        repetition_penalty: p.repetition_penalty.unwrap_or(d.repetition_penalty),
        presence_penalty: p.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: p.frequency_penalty.unwrap_or(d.frequency_penalty),
        logit_bias,
        seed: p.seed,
        max_tokens: p.max_tokens.map_or(d.max_tokens, |m| m as usize),
        stop: p.stop.clone(),
        ignore_eos: p.ignore_eos,
        logprobs: p.logprobs,
        top_logprobs: p.top_logprobs as usize,
    }
}

/// Every setting spelled out (what a pipeline stage sends the next one).
pub fn sampling_to_proto(p: &SamplingParams) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: Some(p.temperature),
        top_k: Some(u32::try_from(p.top_k).unwrap_or(u32::MAX)),
        top_p: Some(p.top_p),
        min_p: Some(p.min_p),
        repetition_penalty: Some(p.repetition_penalty),
        seed: p.seed,
        max_tokens: Some(u32::try_from(p.max_tokens).unwrap_or(u32::MAX)),
        stop: p.stop.clone(),
        ignore_eos: p.ignore_eos,
        logprobs: p.logprobs,
        presence_penalty: Some(p.presence_penalty),
        frequency_penalty: Some(p.frequency_penalty),
        logit_bias: p.logit_bias.iter().copied().collect(),
        top_logprobs: u32::try_from(p.top_logprobs).unwrap_or(u32::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_fields_take_the_defaults_and_set_ones_survive_a_round_trip() {
        assert_eq!(sampling_from_proto(None), SamplingParams::default());
        assert_eq!(sampling_from_proto(Some(&pb::SamplingParams::default())), SamplingParams::default());
        let p = SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            repetition_penalty: 1.1,
            presence_penalty: 0.5,
            frequency_penalty: -0.25,
            logit_bias: vec![(3, -100.0), (17, 2.5)],
            seed: Some(9),
            max_tokens: 12,
            stop: vec!["\n".into()],
            ignore_eos: true,
            logprobs: true,
            top_logprobs: 5,
        };
        assert_eq!(sampling_from_proto(Some(&sampling_to_proto(&p))), p);
    }
}

/// An autoscaling metric from the wire (unspecified: in flight), or `None` for a value this
/// version does not know.
pub fn metric_from_proto(metric: i32) -> Option<Metric> {
    match pb::AutoscalingMetric::try_from(metric).ok()? {
        pb::AutoscalingMetric::Unspecified | pb::AutoscalingMetric::InFlight => Some(Metric::InFlight),
        pb::AutoscalingMetric::Queue => Some(Metric::Queue),
        pb::AutoscalingMetric::KvUtilization => Some(Metric::KvUtilization),
    }
}

/// An autoscaling metric for the wire.
pub fn metric_to_proto(metric: Metric) -> pb::AutoscalingMetric {
    match metric {
        Metric::InFlight => pb::AutoscalingMetric::InFlight,
        Metric::Queue => pb::AutoscalingMetric::Queue,
        Metric::KvUtilization => pb::AutoscalingMetric::KvUtilization,
    }
}

/// A measurement as the wire carries it.
pub fn measurement_to_proto(m: &gantry_core::measured::Measurement) -> pb::ModelMeasurement {
    pb::ModelMeasurement {
        digest: m.digest.clone(),
        device_kind: m.device_kind.clone(),
        model: m.model.clone(),
        sources: m.sources.clone(),
        context: m.context,
        batch: m.batch,
        estimated: Some(terms_to_proto(&m.estimated)),
        measured: Some(terms_to_proto(&m.measured)),
        method: m.method.clone(),
        load_ms: m.load_ms,
        threads: m.threads,
        speed: m
            .speed
            .iter()
            .map(|p| pb::SpeedPoint {
                batch: p.batch,
                prefill_tokens: p.prefill_tokens,
                prefill_seconds: p.prefill_seconds,
                decode_tokens: p.decode_tokens,
                decode_seconds: p.decode_seconds,
            })
            .collect(),
        measured_at_ms: m.measured_at_ms,
        by: m.by.clone(),
    }
}

/// A measurement from the wire. Speed figures that are not finite and non-negative are left out.
pub fn measurement_from_proto(p: &pb::ModelMeasurement) -> gantry_core::measured::Measurement {
    use gantry_core::measured::{Measurement, SpeedPoint};
    let ok = |s: f64| s.is_finite() && s >= 0.0;
    Measurement {
        digest: p.digest.clone(),
        device_kind: p.device_kind.clone(),
        model: p.model.clone(),
        sources: p.sources.clone(),
        context: p.context,
        batch: p.batch,
        estimated: p.estimated.as_ref().map(terms_from_proto).unwrap_or_default(),
        measured: p.measured.as_ref().map(terms_from_proto).unwrap_or_default(),
        method: p.method.clone(),
        load_ms: p.load_ms,
        threads: p.threads,
        speed: p
            .speed
            .iter()
            .filter(|s| ok(s.prefill_seconds) && ok(s.decode_seconds))
            .map(|s| SpeedPoint {
                batch: s.batch,
                prefill_tokens: s.prefill_tokens,
                prefill_seconds: s.prefill_seconds,
                decode_tokens: s.decode_tokens,
                decode_seconds: s.decode_seconds,
            })
            .collect(),
        measured_at_ms: p.measured_at_ms,
        by: p.by.clone(),
    }
}

pub fn terms_to_proto(t: &gantry_core::measured::Terms) -> pb::MemoryTerms {
    pb::MemoryTerms { weights: t.weights, kv_cache: t.kv_cache, activations: t.activations, overhead: t.overhead }
}

fn terms_from_proto(t: &pb::MemoryTerms) -> gantry_core::measured::Terms {
    gantry_core::measured::Terms {
        weights: t.weights,
        kv_cache: t.kv_cache,
        activations: t.activations,
        overhead: t.overhead,
    }
}

pub fn ratios_to_proto(r: &gantry_core::measured::PerTerm) -> pb::TermRatios {
    pb::TermRatios {
        weights: r.weights,
        kv_cache: r.kv_cache,
        activations: r.activations,
        overhead: r.overhead,
        total: r.total,
    }
}
