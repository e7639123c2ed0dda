//! The engine against transformers: tiny random-weight models of every family (made by
//! `scripts/fixtures/make_engine_fixtures.py`) must give the reference logits within 1e-4 at
//! every position — whole, split in two at every layer, over 4 stages (also with the hidden states
//! sent through the wire format), and decoding token by token — on both runtimes: the CPU
//! runtime, and Candle (what runs on a GPU; here on the CPU, its stand-in). On the CPU runtime
//! a batch of sequences gives each the very bits it gets alone.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use gantry_core::WireDtype;
use gantry_engine::files::ModelFiles;
use gantry_engine::model::{Backend, BatchInput, BatchStep, LogitsFor, ModelPart, StageInput, StageOutput};
use gantry_engine::wire::{decode, encode};

mod support;

/// Every fixture: dense families, then mixtures of experts.
const CASES: [&str; 19] = {
    let mut all = [""; 19];
    let mut i = 0;
    while i < support::ENGINE_CASES.len() {
        all[i] = support::ENGINE_CASES[i];
        i += 1;
    }
    let mut j = 0;
    while j < support::MOE_CASES.len() {
        all[i + j] = support::MOE_CASES[j];
        j += 1;
    }
    all
};

const TOLERANCE: f32 = 1e-4;

/// Both runtimes, named for messages.
fn backends() -> [(&'static str, Backend); 2] {
    [("cpu runtime", Backend::Cpu), ("candle (gpu path, on the cpu)", Backend::Candle(Device::Cpu))]
}

fn fixture(case: &str) -> PathBuf {
    support::engine_fixture(case)
}

struct Reference {
    inputs: Vec<Vec<u32>>,
    logits: Vec<Tensor>,
}

fn reference(case: &str) -> Reference {
    let r = candle_core::safetensors::load(fixture(case).join("reference.safetensors"), &Device::Cpu).unwrap();
    let mut inputs = Vec::new();
    let mut logits = Vec::new();
    for i in 0..2 {
        let ids: Vec<i64> = r[&format!("input_{i}")].to_vec1().unwrap();
        inputs.push(ids.into_iter().map(|x| x as u32).collect());
        logits.push(r[&format!("logits_{i}")].clone());
    }
    Reference { inputs, logits }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn logits(out: StageOutput) -> Tensor {
    match out {
        StageOutput::Logits(l) => l,
        StageOutput::Hidden(_) => panic!("expected logits"),
    }
}

/// Runs `ids` through consecutive parts, handing hidden states along.
fn run_parts(parts: &[ModelPart], ids: &[u32]) -> Tensor {
    let mut caches: Vec<_> = parts.iter().map(ModelPart::new_cache).collect();
    let mut input = StageInput::Tokens(ids);
    for (i, part) in parts.iter().enumerate() {
        match part.forward(input, &mut caches[i], LogitsFor::All).unwrap() {
            StageOutput::Hidden(h) => input = StageInput::Hidden(h),
            StageOutput::Logits(l) => return l,
        }
    }
    panic!("the last part returned hidden states")
}

#[test]
fn every_family_matches_transformers_at_every_position() {
    for (name, backend) in backends() {
        for case in CASES {
            let files = ModelFiles::open(&fixture(case)).unwrap_or_else(|e| panic!("{case}: {e}"));
            let n = files.config.num_layers;
            let model = files.load_part_on(0..n, &backend, &mut |_| {}).unwrap_or_else(|e| panic!("{case}: {e}"));
            let r = reference(case);
            for (ids, want) in r.inputs.iter().zip(&r.logits) {
                let got = run_parts(std::slice::from_ref(&model), ids);
                let d = max_diff(&got, want);
                eprintln!("{name}: {case:>13}, {:2} tokens: max |Δlogit| = {d:.1e}", ids.len());
                assert!(d < TOLERANCE, "{name}: {case}, {} tokens: max |Δlogit| = {d}", ids.len());
            }
        }
    }
}

#[test]
fn every_two_way_layer_split_matches() {
    for (name, backend) in backends() {
        for case in CASES {
            let files = ModelFiles::open(&fixture(case)).unwrap();
            let n = files.config.num_layers;
            let r = reference(case);
            for cut in 1..n {
                let parts = [
                    files.load_part_on(0..cut, &backend, &mut |_| {}).unwrap(),
                    files.load_part_on(cut..n, &backend, &mut |_| {}).unwrap(),
                ];
                let got = run_parts(&parts, &r.inputs[1]);
                let d = max_diff(&got, &r.logits[1]);
                assert!(d < TOLERANCE, "{name}: {case} split at layer {cut}: max |Δlogit| = {d}");
            }
        }
    }
}

#[test]
fn four_stages_of_one_layer_each_match() {
    for (name, backend) in backends() {
        for case in ["llama", "gemma3", "falcon-new"] {
            let files = ModelFiles::open(&fixture(case)).unwrap();
            let parts: Vec<ModelPart> =
                (0..4).map(|i| files.load_part_on(i..i + 1, &backend, &mut |_| {}).unwrap()).collect();
            let r = reference(case);
            let d = max_diff(&run_parts(&parts, &r.inputs[1]), &r.logits[1]);
            assert!(d < TOLERANCE, "{name}: {case} over 4 stages: {d}");
        }
    }
}

/// Like [`run_parts`], with the hidden states between parts sent through the wire format.
fn run_parts_over_the_wire(parts: &[ModelPart], ids: &[u32], wire: WireDtype) -> Tensor {
    let mut caches: Vec<_> = parts.iter().map(ModelPart::new_cache).collect();
    let mut input = StageInput::Tokens(ids);
    for (i, part) in parts.iter().enumerate() {
        match part.forward(input, &mut caches[i], LogitsFor::All).unwrap() {
            StageOutput::Hidden(h) => {
                let msg = encode(&h, wire).unwrap();
                input = StageInput::Hidden(decode(&msg, part.config.hidden_size, &Device::Cpu).unwrap());
            }
            StageOutput::Logits(l) => return l,
        }
    }
    panic!("the last part returned hidden states")
}

#[test]
fn four_stages_over_the_wire_match() {
    // f32 is exact; f16 and bf16 round the hidden states (measured max |Δlogit|: f16 ≈ 0.003-0.004,
    // bf16 ≈ 0.02-0.03, with 8 bits of mantissa).
    for (wire, tolerance) in [(WireDtype::F32, TOLERANCE), (WireDtype::F16, 1e-2), (WireDtype::Bf16, 1e-1)] {
        for case in ["llama", "gemma3", "falcon-new", "gpt2"] {
            let files = ModelFiles::open(&fixture(case)).unwrap();
            let parts: Vec<ModelPart> =
                (0..4).map(|i| files.load_part(i..i + 1, &Device::Cpu, &mut |_| {}).unwrap()).collect();
            let r = reference(case);
            let d = max_diff(&run_parts_over_the_wire(&parts, &r.inputs[1], wire), &r.logits[1]);
            assert!(d < tolerance, "{case} over 4 stages, {} on the wire: max |Δlogit| = {d}", wire.name());
        }
    }
}

#[test]
fn decoding_token_by_token_with_the_cache_matches() {
    for (name, backend) in backends() {
        for case in CASES {
            let files = ModelFiles::open(&fixture(case)).unwrap();
            let model = files.load_part_on(0..files.config.num_layers, &backend, &mut |_| {}).unwrap();
            let r = reference(case);
            let ids = &r.inputs[1];
            let want = &r.logits[1];
            let mut cache = model.new_cache();
            // Prefill 5 tokens, then one at a time (past the sliding windows of 4).
            let pre = logits(model.forward(StageInput::Tokens(&ids[..5]), &mut cache, LogitsFor::All).unwrap());
            assert!(max_diff(&pre, &want.narrow(0, 0, 5).unwrap()) < TOLERANCE, "{name}: {case} prefill");
            for (pos, id) in ids.iter().enumerate().skip(5) {
                let step = logits(model.forward(StageInput::Tokens(&[*id]), &mut cache, LogitsFor::Last).unwrap());
                let d = max_diff(&step, &want.narrow(0, pos, 1).unwrap());
                assert!(d < TOLERANCE, "{name}: {case} decode at position {pos}: {d}");
            }
        }
    }
}

fn values(out: StageOutput) -> Vec<f32> {
    logits(out).flatten_all().unwrap().to_vec1().unwrap()
}

/// A step of the batch test: `(sequence, tokens, logits wanted for)`.
type Plan = [(usize, std::ops::Range<usize>, LogitsFor)];

/// Runs `plan`'s steps one sequence at a time, then as batches of every step with the same
/// batch number, and returns both results per step.
fn alone_and_batched(model: &ModelPart, ids: &[Vec<u32>], plan: &[(usize, &Plan)]) -> Vec<(Vec<f32>, Vec<f32>)> {
    let mut alone = Vec::new();
    let mut caches: Vec<_> = ids.iter().map(|_| model.new_cache()).collect();
    for (_, steps) in plan {
        for (seq, range, lf) in steps.iter() {
            alone.push(values(
                model.forward(StageInput::Tokens(&ids[*seq][range.clone()]), &mut caches[*seq], *lf).unwrap(),
            ));
        }
    }
    let mut batched = Vec::new();
    let mut caches: Vec<_> = ids.iter().map(|_| model.new_cache()).collect();
    for (_, steps) in plan {
        let mut refs: Vec<Option<&mut gantry_engine::model::PartCache>> = caches.iter_mut().map(Some).collect();
        let mut batch: Vec<BatchStep<'_>> = steps
            .iter()
            .map(|(seq, range, lf)| BatchStep {
                cache: refs[*seq].take().unwrap(),
                input: BatchInput::Tokens(&ids[*seq][range.clone()]),
                logits_for: *lf,
            })
            .collect();
        batched.extend(model.forward_batch(&mut batch).unwrap().into_iter().map(values));
    }
    alone.into_iter().zip(batched).collect()
}

#[test]
fn a_batch_gives_every_sequence_the_bits_it_gets_alone() {
    // Three sequences in steps that mix prefill and decode, at different positions, past the
    // sliding windows and across KV blocks of 16 positions; on both runtimes (Candle's paged
    // store on the CPU standing in for a GPU's).
    for (case, (name, backend)) in CASES.iter().flat_map(|c| backends().map(|b| (c, b))) {
        let case = *case;
        let files = ModelFiles::open(&fixture(case)).unwrap();
        let model = files.load_part_on(0..files.config.num_layers, &backend, &mut |_| {}).unwrap();
        let r = reference(case);
        let vocab = files.config.vocab_size as u32;
        let long: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % vocab).collect();
        let ids = vec![r.inputs[1].clone(), r.inputs[0].clone(), long];
        let plan: &[(usize, &Plan)] = &[
            (0, &[(0, 0..5, LogitsFor::All), (1, 0..3, LogitsFor::Last), (2, 0..17, LogitsFor::Last)]),
            (1, &[(0, 5..6, LogitsFor::Last), (1, 3..7, LogitsFor::All), (2, 17..18, LogitsFor::Last)]),
            (2, &[(2, 18..35, LogitsFor::All), (0, 6..7, LogitsFor::Last)]),
            (3, &[(0, 7..13, LogitsFor::Last), (2, 35..36, LogitsFor::Last)]),
        ];
        for (i, (alone, batched)) in alone_and_batched(&model, &ids, plan).into_iter().enumerate() {
            assert_eq!(alone.len(), batched.len(), "{case} on {name} step {i}");
            if matches!(backend, Backend::Cpu) {
                let same = alone.iter().zip(&batched).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{case} on {name} step {i}: the batch changed the logits");
            } else {
                // Candle's matrix products pick their kernels by the batch's shape (gemm here,
                // cuBLAS on a GPU): the same numbers up to rounding, and the same greedy tokens.
                let d = alone.iter().zip(&batched).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(d < 1e-4, "{case} on {name} step {i}: the batch moved a logit by {d}");
                let argmax = |v: &[f32]| -> Vec<usize> {
                    v.chunks(vocab as usize)
                        .map(|r| {
                            r.iter().enumerate().fold((0, f32::MIN), |m, (j, &x)| if x > m.1 { (j, x) } else { m }).0
                        })
                        .collect()
                };
                assert_eq!(argmax(&alone), argmax(&batched), "{case} on {name} step {i}: greedy tokens differ");
            }
        }
        // The KV blocks went back to the pool with the caches.
        assert_eq!(model.kv_pool().unwrap().used_blocks(), 0, "{case} on {name}");
    }
}

#[test]
fn a_batch_with_one_bad_step_fails_whole_and_moves_no_sequence() {
    for (name, backend) in backends() {
        let files = ModelFiles::open(&fixture("llama")).unwrap();
        let model = files.load_part_on(0..files.config.num_layers, &backend, &mut |_| {}).unwrap();
        let (mut a, mut b) = (model.new_cache(), model.new_cache());
        let bad = files.config.vocab_size as u32;
        let err = model
            .forward_batch(&mut [
                BatchStep { cache: &mut a, input: BatchInput::Tokens(&[1, 2, 3]), logits_for: LogitsFor::Last },
                BatchStep { cache: &mut b, input: BatchInput::Tokens(&[4, bad]), logits_for: LogitsFor::Last },
            ])
            .unwrap_err();
        assert_eq!(err.to_string(), format!("token id {bad} is outside the vocabulary of {bad}"), "{name}");
        assert_eq!((a.position, b.position), (0, 0), "{name}");
    }
}

/// Experts in host memory (a GPU short of memory): the code path that moves each expert's
/// tokens to the host and back, with a CPU device standing in for the GPU, gives the same
/// logits; a dense model is refused with the reason.
#[test]
fn experts_kept_on_the_host_match_stand_in_for_a_gpu() {
    for case in support::MOE_CASES {
        let files = ModelFiles::open(&fixture(case)).unwrap();
        let n = files.config.num_layers;
        let model = files.load_part_on(0..n, &Backend::ExpertsOnHost(Device::Cpu), &mut |_| {}).unwrap();
        let r = reference(case);
        for (ids, want) in r.inputs.iter().zip(&r.logits) {
            let d = max_diff(&run_parts(std::slice::from_ref(&model), ids), want);
            assert!(d < TOLERANCE, "{case} with its experts on the host: max |Δlogit| = {d}");
        }
    }
    let dense = ModelFiles::open(&fixture("llama")).unwrap();
    let err = dense.load_part_on(0..4, &Backend::ExpertsOnHost(Device::Cpu), &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("only a mixture-of-experts model has experts to keep on the host"), "{err}");
}

/// The MoE fixtures as llama.cpp's converter writes them (`model-f32.gguf`, made by
/// `scripts/fixtures/make_gguf_fixtures.py`): Mixtral as arch `llama` with experts (Q/K rows
/// permuted), Qwen3-MoE, and gpt-oss (gate and up de-interleaved, the MLP norm named
/// `post_attention_norm`). Both runtimes give transformers' logits. gpt-oss keeps its config's YaRN without truncation, as transformers does (llama.cpp
/// truncates; `fixtures/engine/GGUF.md`).
#[test]
fn moe_ggufs_match_transformers() {
    for (name, backend) in backends() {
        for case in ["mixtral", "qwen3-moe", "gpt-oss"] {
            let files =
                ModelFiles::open(&fixture(case).join("model-f32.gguf")).unwrap_or_else(|e| panic!("{case}: {e}"));
            let model = files.load_part_on(0..files.config.num_layers, &backend, &mut |_| {}).unwrap();
            let r = reference(case);
            for (ids, want) in r.inputs.iter().zip(&r.logits) {
                let d = max_diff(&run_parts(std::slice::from_ref(&model), ids), want);
                eprintln!("{name}: {case:>13} GGUF, {:2} tokens: max |Δlogit| = {d:.1e}", ids.len());
                assert!(d < TOLERANCE, "{name}: {case} GGUF, {} tokens: max |Δlogit| = {d}", ids.len());
            }
        }
    }
}

/// gpt-oss with MXFP4 experts, from transformers' safetensors (`_blocks`/`_scales`) and from
/// llama.cpp's GGUF (GGML type 39): the CPU runtime runs the blocks as stored and Candle as Q8_0
/// blocks of the same values, so the two files give the same logits on each runtime. Both
/// quantize the experts' inputs to 8 bits, as for every quantized format (llama.cpp's MXFP4
/// kernels do the same): against transformers' exact arithmetic on the same values the logits
/// move (measured: up to 0.37 and 0.70 on this random model, llama.cpp 0.25 and 2.17); the
/// kernels' own test bounds that rounding per product (`cpu::kernels::tests`).
#[test]
fn mxfp4_experts_run_as_stored_from_either_file() {
    let case = "gpt-oss-mxfp4";
    let r = reference(case);
    for (name, backend) in backends() {
        let load = |p: PathBuf| {
            let files = ModelFiles::open(&p).unwrap();
            files.load_part_on(0..files.config.num_layers, &backend, &mut |_| {}).unwrap()
        };
        let (st, gguf) = (load(fixture(case)), load(fixture(case).join("model-f32.gguf")));
        for (ids, want) in r.inputs.iter().zip(&r.logits) {
            let a = run_parts(std::slice::from_ref(&st), ids);
            let b = run_parts(std::slice::from_ref(&gguf), ids);
            assert_eq!(max_diff(&a, &b), 0.0, "{name}: safetensors and GGUF differ");
            let d = max_diff(&a, want);
            eprintln!("{name}: {case}, {:2} tokens: max |Δlogit| vs exact = {d:.2}", ids.len());
            assert!(d < 1.0, "{name}: {case}, {} tokens: max |Δlogit| = {d}", ids.len());
        }
        // 4 layers × 4 experts × 3 matrices: kept as MXFP4 blocks (CPU runtime, 17 bytes per 32
        // weights) or made Q8_0 (Candle), never widened to f32.
        let files = ModelFiles::open(&fixture(case)).unwrap();
        let mut stats = gantry_engine::weights::LoadStats::default();
        ModelPart::load(&files.source, files.config.clone(), 0..4, &backend, &mut stats, &mut |_| {}).unwrap();
        let kept = stats.kernels.iter().find(|(k, _)| k == "MXFP4").map(|(_, n)| *n);
        let as_q8 = stats.repacked.iter().find(|(f, t, _)| f == "MXFP4" && t == "Q8_0").map(|(_, _, n)| *n);
        match backend {
            Backend::Cpu => assert_eq!((kept, as_q8), (Some(48), None), "{stats:?}"),
            _ => assert_eq!((kept, as_q8), (None, Some(48)), "{stats:?}"),
        }
    }
}
