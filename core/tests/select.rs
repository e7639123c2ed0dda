//! The decision framework end to end: needs and GPUs in, ranked models with reasons out.

#![allow(clippy::unwrap_used)]

use gantry_core::select::{Candidate, Selection};
use gantry_core::{Catalog, Latency, Need, SizeClass, Task, parse_gpus, select};

fn run(task: Task, latency: Latency, gpus: &str, min_context: Option<u64>) -> Selection {
    let need = Need { task, latency, min_context, no_gated: false, max_params: None };
    let gpus = if gpus.is_empty() { Vec::new() } else { parse_gpus(gpus).unwrap() };
    select(&need, &gpus, &Catalog::builtin().unwrap()).unwrap()
}

fn find<'a>(s: &'a Selection, id: &str) -> Option<&'a Candidate> {
    s.candidates.iter().find(|c| c.id == id)
}

fn rejection<'a>(s: &'a Selection, id: &str) -> &'a [String] {
    &s.rejected.iter().find(|r| r.id == id).unwrap_or_else(|| panic!("{id} not rejected")).reasons
}

#[test]
fn realtime_chat_on_one_24_gib_gpu_favours_a_small_instruct_model() {
    let s = run(Task::Chat, Latency::Realtime, "1x24GiB", None);
    let top = &s.candidates[0];
    assert!(top.instruct, "{top:?}");
    assert_eq!(SizeClass::of(top.parameters), SizeClass::Small, "top pick {} should be small (1-7B)", top.id);
    assert_eq!(top.gpus_used, 1);
    assert!(top.reasons.iter().any(|r| r.starts_with("fits 1×24.0 GiB at bf16")), "{:?}", top.reasons);
    assert!(top.reasons.iter().any(|r| r.contains("suits realtime chat")), "{:?}", top.reasons);
    // Every top-5 pick is small or tiny and instruct-tuned.
    for c in s.candidates.iter().take(5) {
        assert!(c.instruct && c.parameters < 7_500_000_000, "{} in the top 5", c.id);
    }
    // A 70B model is rejected for latency, base models for tuning.
    assert!(rejection(&s, "meta-llama/Llama-3.3-70B-Instruct")[0].contains("too slow for realtime"));
    assert!(rejection(&s, "meta-llama/Llama-2-7b-hf")[0].starts_with("base model"));
}

#[test]
fn reasoning_on_eight_80_gib_gpus_may_use_a_70b_instruct_model() {
    let s = run(Task::Reasoning, Latency::Interactive, "8x80GiB", None);
    let llama = find(&s, "meta-llama/Llama-3.3-70B-Instruct").expect("the 70B model is a candidate");
    assert!(llama.instruct);
    assert_eq!(llama.gpus_used, 2, "70B at bf16 needs two 80 GiB GPUs");
    assert!(llama.reasons.iter().any(|r| r.starts_with("split over 2 GPUs at bf16")), "{:?}", llama.reasons);
    // The top of the list is a large model.
    let top = &s.candidates[0];
    assert_eq!(SizeClass::of(top.parameters), SizeClass::Large, "top pick {}", top.id);
    // Large models outrank small ones for reasoning.
    let small = find(&s, "HuggingFaceTB/SmolLM2-1.7B-Instruct").unwrap();
    assert!(llama.score > small.score);
}

#[test]
fn a_128k_context_need_excludes_4k_models() {
    let s = run(Task::Summarization, Latency::Batch, "8x80GiB", Some(131_072));
    assert!(!s.candidates.is_empty());
    for c in &s.candidates {
        assert!(c.context >= 131_072, "{} has {} context", c.id, c.context);
    }
    for id in ["microsoft/Phi-3-mini-4k-instruct", "meta-llama/Llama-2-7b-chat-hf"] {
        assert!(rejection(&s, id).contains(&"context 4K < 128K needed".to_string()), "{id}: {:?}", rejection(&s, id));
    }
    assert!(find(&s, "meta-llama/Llama-3.1-8B-Instruct").is_some());
}

#[test]
fn a_model_too_big_for_the_gpus_is_rejected_with_its_needs() {
    let s = run(Task::Chat, Latency::Interactive, "1x24GiB", None);
    let reasons = rejection(&s, "meta-llama/Llama-3.3-70B-Instruct");
    let r = reasons.last().unwrap();
    assert!(r.starts_with("does not fit 1×24.0 GiB at 8K context: bf16 needs 13"), "{r}");
    assert!(r.contains("q8_0 needs") && r.contains("q4_k needs") && r.ends_with("largest GPU 24.0 GiB"), "{r}");
}

#[test]
fn quantization_is_chosen_only_when_needed_and_said() {
    // Llama-3.1-8B at bf16 needs ~16.8 GiB: on 12 GiB it takes q8_0.
    let s = run(Task::Chat, Latency::Interactive, "1x12GiB", None);
    let c = find(&s, "meta-llama/Llama-3.1-8B-Instruct").unwrap();
    assert_eq!(c.dtype, "q8_0");
    assert!(c.reasons.iter().any(|r| r.starts_with("quantized to fit: bf16 needs 16.")), "{:?}", c.reasons);
    assert_eq!(c.score_parts.precision, 90);
    let small = find(&s, "HuggingFaceTB/SmolLM2-1.7B-Instruct").unwrap();
    assert_eq!(small.dtype, "bf16");
}

#[test]
fn no_gated_and_max_size_filter_with_reasons() {
    let need = Need {
        task: Task::Chat,
        latency: Latency::Interactive,
        min_context: None,
        no_gated: true,
        max_params: Some(10_000_000_000),
    };
    let s = select(&need, &parse_gpus("1x80GiB").unwrap(), &Catalog::builtin().unwrap()).unwrap();
    for c in &s.candidates {
        assert!(!c.gated && c.parameters <= 10_000_000_000, "{}", c.id);
    }
    assert!(rejection(&s, "google/gemma-2-9b-it").iter().any(|r| r.starts_with("gated")));
    assert!(rejection(&s, "Qwen/Qwen2.5-14B-Instruct").iter().any(|r| r == "14.8B parameters > 10.0B limit"));
}

#[test]
fn code_completion_accepts_base_models_and_prefers_code_models() {
    let s = run(Task::CodeCompletion, Latency::Interactive, "1x24GiB", None);
    assert!(find(&s, "microsoft/phi-2").is_some(), "base models complete code");
    let coder = find(&s, "Qwen/Qwen2.5-Coder-7B-Instruct").unwrap();
    let general = find(&s, "Qwen/Qwen2.5-7B-Instruct").unwrap();
    assert!(coder.score > general.score);
    assert!(coder.reasons.contains(&"model card highlights code".to_string()));
}

#[test]
fn without_gpus_every_suitable_model_is_listed_with_its_need() {
    let s = run(Task::Chat, Latency::Batch, "", None);
    assert_eq!(s.hardware, "none given");
    let c = find(&s, "meta-llama/Meta-Llama-3-70B-Instruct").unwrap();
    assert_eq!(c.gpus_used, 0);
    assert!(c.reasons[0].starts_with("needs 13") && c.reasons[0].ends_with("(no GPUs given)"), "{:?}", c.reasons);
}

#[test]
fn rankings_are_deterministic_and_scores_bounded() {
    let a = run(Task::Chat, Latency::Interactive, "2x24GiB", None);
    let b = run(Task::Chat, Latency::Interactive, "2x24GiB", None);
    assert_eq!(a, b);
    for w in a.candidates.windows(2) {
        assert!(w[0].score > w[1].score || (w[0].score == w[1].score && w[0].id < w[1].id));
    }
    for c in &a.candidates {
        let p = c.score_parts;
        assert!(c.score <= 100 && p.quality <= 100 && p.speed <= 100 && p.task <= 100 && p.precision <= 100);
    }
    assert_eq!(a.candidates.len() + a.rejected.len(), Catalog::builtin().unwrap().entries.len());
}

#[test]
fn reasoning_models_are_slower_for_realtime() {
    let s = run(Task::Chat, Latency::Realtime, "1x24GiB", None);
    let oss = find(&s, "openai/gpt-oss-20b").unwrap();
    assert!(oss.reasons.iter().any(|r| r.contains("reasoning trace")));
    assert!(oss.score < s.candidates[0].score);
}

#[test]
fn a_measured_model_is_ranked_by_its_measured_speed_against_the_latency_class() {
    use gantry_core::measured::{Measurement, SpeedPoint};
    use gantry_core::select::select_measured;
    let need =
        Need { task: Task::Chat, latency: Latency::Realtime, min_context: None, no_gated: true, max_params: None };
    let gpus = parse_gpus("1x24GiB").unwrap();
    let catalog = Catalog::builtin().unwrap();
    let plain = select(&need, &gpus, &catalog).unwrap();
    let id = "HuggingFaceTB/SmolLM2-135M-Instruct";
    let before = find(&plain, id).unwrap().clone();
    assert_eq!(before.speed_source, "estimated");
    let measured = |tokens_per_sec: f64| Measurement {
        digest: "sha256s:00".into(),
        device_kind: "cpu:Test CPU".into(),
        model: "SmolLM2 135M Instruct".into(),
        speed: vec![SpeedPoint {
            batch: 1,
            decode_tokens: (tokens_per_sec * 10.0) as u64,
            decode_seconds: 10.0,
            ..SpeedPoint::default()
        }],
        ..Measurement::default()
    };
    // 5 tokens/s per stream is a quarter of realtime's 20: the speed part falls to 25.
    let slow = measured(5.0);
    let s = select_measured(&need, &gpus, &catalog, &[&slow], &["cpu:Test CPU".into()]).unwrap();
    let c = find(&s, id).unwrap();
    assert_eq!(c.score_parts.speed, 25);
    assert!(c.score < before.score, "{} vs {}", c.score, before.score);
    assert_eq!((c.measured_tokens_per_sec, c.speed_source.as_str()), (Some(5.0), "measured here"));
    assert!(
        c.reasons.last().unwrap().contains("decodes 5 tokens/s per stream, measured here (realtime wants 20)"),
        "{:?}",
        c.reasons
    );
    // Measured elsewhere and fast: full marks, labelled with the device kind.
    let fast = measured(80.0);
    let s = select_measured(&need, &gpus, &catalog, &[&fast], &["cpu:Other".into()]).unwrap();
    let c = find(&s, id).unwrap();
    assert_eq!((c.score_parts.speed, c.speed_source.as_str()), (100, "measured on cpu:Test CPU"));
    // Other models keep their estimated speed.
    assert_eq!(find(&s, "HuggingFaceTB/SmolLM2-360M-Instruct").unwrap().speed_source, "estimated");
}
