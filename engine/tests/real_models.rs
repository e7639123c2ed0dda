//! The engine on the real SmolLM2-135M-Instruct (Q4_1) and Gemma 3 270M (Q4_K_M) GGUF files
//! against llama.cpp's goldens (fixtures/goldens, written by
//! `scripts/goldens/make_llamacpp_goldens.py` with llama-cpp-python): the same token ids for
//! tricky strings, the same prompts, and the same greedy continuations — exactly where the
//! logits are not near-ties, and by teacher forcing everywhere.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use candle_core::Device;
use gantry_engine::files::ModelFiles;
use gantry_engine::generate::{Session, generate};
use gantry_engine::model::{LogitsFor, StageInput, StageOutput};
use gantry_engine::sampling::SamplingParams;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn model_path(file: &str) -> PathBuf {
    let dir = std::env::var_os("GANTRY_MODELS_DIR").map_or_else(|| root().join("models"), PathBuf::from);
    let p = dir.join(file);
    assert!(p.is_file(), "{} is missing: run scripts/fetch-models.sh", p.display());
    p
}

fn golden(stem: &str) -> Value {
    let p = root().join("fixtures/goldens").join(format!("{stem}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

const MODELS: [&str; 2] = ["SmolLM2-135M-Instruct.Q4_1", "gemma-3-270m-q4_k_m"];

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn tokenization_matches_llama_cpp() {
    for stem in MODELS {
        let files = ModelFiles::open(&model_path(&format!("{stem}.gguf"))).unwrap();
        let tok = files.tokenizer().unwrap();
        let g = golden(stem);
        for case in g["tokenize"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let add = case["add_special"].as_bool().unwrap();
            let special = case["special"].as_bool().unwrap();
            let got = tok.encode(text, add, special).unwrap();
            assert_eq!(got, ids(&case["ids"]), "{stem}: {text:?} (add_special {add}, special {special})");
        }
        // llama.cpp's C `llama_detokenize` with special tokens rendered (llama-cpp-python's
        // own `detokenize` also drops a leading space after BOS, a binding quirk).
        for case in g["detokenize"].as_array().unwrap() {
            let want = case["c_api_detokenize_unparse_special"]["text"].as_str().unwrap();
            assert_eq!(tok.decode(&ids(&case["ids"]), false).unwrap(), want, "{stem}: decode {:?}", case["ids"]);
        }
    }
}

#[test]
fn prompts_tokenize_as_llama_cpp_does() {
    for stem in MODELS {
        let files = ModelFiles::open(&model_path(&format!("{stem}.gguf"))).unwrap();
        let tok = files.tokenizer().unwrap();
        for case in golden(stem)["greedy"].as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            assert_eq!(tok.encode(prompt, true, true).unwrap(), ids(&case["prompt_ids"]), "{stem}: {prompt:?}");
        }
    }
}

/// The float64 reference (`scripts/goldens/exact_reference.py`): exact arithmetic on the same
/// dequantized weights, the top-32 `(token, logit)` per generated step of each golden case.
fn exact(stem: &str) -> Value {
    golden(&format!("{stem}.exact"))
}

/// How far below the exact best token `ours` is in exact arithmetic, when that is a legitimate
/// choice for an engine with 8-bit activations: within `margin` of the best, or no further
/// below it than llama.cpp's own choice `theirs` (in flat distributions both drift alike).
fn exact_near_best(top: &Value, ours: u32, theirs: u32, margin: f64) -> Option<f64> {
    let list = top.as_array()?;
    let best = list.first()?[1].as_f64()?;
    let logit = |t: u32| list.iter().find(|p| p[0].as_u64() == Some(u64::from(t)))?[1].as_f64();
    let gap = best - logit(ours)?;
    let theirs_gap = logit(theirs).map_or(0.0, |l| best - l);
    (gap < margin || gap <= theirs_gap + margin).then_some(gap)
}

/// Near-tie margin: both engines differ from exact arithmetic by ~0.15 logit on average and by
/// up to ~1.3 at the most sensitive steps (8-bit activation quantization inside quantized
/// matrix products; measured on these goldens), so a choice within this of the exact best, or
/// of llama.cpp's own choice, can legitimately go either way. How close to exact arithmetic
/// the engine is overall is asserted separately ([`MEAN_ERROR`]).
const NEAR_TIE: f64 = 0.5;

/// The mean distance, in logits, between our logits and exact arithmetic's over each step's
/// 32 best tokens (relative to the exact best token's): 0.14 on both models.
const MEAN_ERROR: f64 = 0.2;

/// Teacher forcing, as llama.cpp produced its goldens: the prompt in one pass, then
/// llama.cpp's own tokens one at a time. At each step our top-1 is compared with llama.cpp's
/// token and with the exact float64 reference's top-1.
#[test]
fn teacher_forced_next_tokens_agree_with_llama_cpp() {
    for stem in MODELS {
        let files = ModelFiles::open(&model_path(&format!("{stem}.gguf"))).unwrap();
        let model = files.load(&Device::Cpu).unwrap();
        let exact = exact(stem);
        let (mut with_llama, mut ours_exact, mut llama_exact, mut total) = (0, 0, 0, 0);
        let (mut error_sum, mut error_n) = (0f64, 0usize);
        let mut misses = Vec::new();
        for case in golden(stem)["greedy"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let prompt = ids(&case["prompt_ids"]);
            let continuation = ids(&case["generated_ids"]);
            let mut cache = model.new_cache();
            let step = |tokens: &[u32], cache: &mut gantry_engine::model::PartCache| {
                let StageOutput::Logits(l) = model.forward(StageInput::Tokens(tokens), cache, LogitsFor::Last).unwrap()
                else {
                    panic!("logits expected")
                };
                l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            let mut rows = vec![step(&prompt, &mut cache)];
            for &t in &continuation[..continuation.len() - 1] {
                rows.push(step(&[t], &mut cache));
            }
            for (i, &want) in continuation.iter().enumerate() {
                let row = &rows[i];
                let (ours, top) = row
                    .iter()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |b, (j, &v)| if v > b.1 { (j as u32, v) } else { b });
                let exact_top5 = &exact["cases"][name][i];
                let list = exact_top5.as_array().unwrap();
                let (best, best_exact) = (list[0][0].as_u64().unwrap() as usize, list[0][1].as_f64().unwrap());
                for p in list {
                    let ours = f64::from(row[p[0].as_u64().unwrap() as usize] - row[best]);
                    error_sum += (ours - (p[1].as_f64().unwrap() - best_exact)).abs();
                    error_n += 1;
                }
                let exact_top = exact_top5[0][0].as_u64().unwrap() as u32;
                total += 1;
                ours_exact += usize::from(ours == exact_top);
                llama_exact += usize::from(want == exact_top);
                if row[want as usize] >= top - 1e-3 {
                    with_llama += 1;
                } else {
                    // A disagreement must be a near-best choice in exact arithmetic.
                    let gap = exact_near_best(exact_top5, ours, want, NEAR_TIE);
                    assert!(
                        gap.is_some(),
                        "{stem} {name} step {i}: we pick {ours}, llama.cpp {want}; exact arithmetic says {exact_top5}"
                    );
                    misses.push(format!("{name}@{i} (ours {:.3} below the exact best)", gap.unwrap_or_default()));
                }
            }
        }
        let pct = |n: usize| 100.0 * n as f64 / total as f64;
        eprintln!(
            "{stem}: llama.cpp's token is our top-1 (within 1e-3) at {with_llama}/{total} = {:.1}%; top-1 equals the exact float64 reference's: ours {ours_exact}/{total} = {:.1}%, llama.cpp {llama_exact}/{total} = {:.1}%; disagreements (all near-best in exact arithmetic): {misses:?}",
            pct(with_llama),
            pct(ours_exact),
            pct(llama_exact)
        );
        // Both engines are 8-bit-activation approximations of the same arithmetic; ours must
        // be at least as close to the exact choice as llama.cpp, and agree with it nearly always.
        assert!(
            ours_exact + 1 >= llama_exact,
            "{stem}: ours {ours_exact} vs llama.cpp {llama_exact} exact top-1 matches"
        );
        assert!(pct(with_llama) >= 95.0, "{stem}: {with_llama}/{total}");
        let mean = error_sum / error_n as f64;
        eprintln!("{stem}: mean distance to exact arithmetic over each step's 32 best tokens: {mean:.3} logit");
        assert!(mean <= MEAN_ERROR, "{stem}: our logits are {mean:.3} from exact arithmetic on average");
    }
}

#[test]
fn greedy_continuations_equal_llama_cpp_up_to_near_ties() {
    for stem in MODELS {
        let files = ModelFiles::open(&model_path(&format!("{stem}.gguf"))).unwrap();
        let tok = files.tokenizer().unwrap();
        let model = files.load(&Device::Cpu).unwrap();
        let exact = exact(stem);
        for case in golden(stem)["greedy"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let prompt = ids(&case["prompt_ids"]);
            let want = ids(&case["generated_ids"]);
            let params = SamplingParams { max_tokens: want.len(), ..SamplingParams::default() };
            let mut session = Session::new(&model);
            let got = generate(&mut session, &tok, &prompt, &params, &[], &mut |_| std::ops::ControlFlow::Continue(()))
                .unwrap()
                .tokens;
            // Up to the first difference the sequences are the same; there, our choice must be
            // near-best in exact arithmetic (after it, the contexts differ).
            let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
            if same < want.len().min(got.len()) {
                let top = &exact["cases"][name][same];
                let gap = exact_near_best(top, got[same], want[same], NEAR_TIE);
                eprintln!(
                    "{stem} {name}: equal for {same} of {} tokens, then ours is {gap:?} below the exact best",
                    want.len()
                );
                assert!(
                    gap.is_some(),
                    "{stem} {name}: token {same} differs ({} vs {}); exact: {top}",
                    got[same],
                    want[same]
                );
            } else {
                eprintln!("{stem} {name}: all {} tokens equal", want.len());
                assert_eq!(got, want, "{stem} {name}");
            }
        }
    }
}

#[test]
#[ignore = "diagnostic: prints how far our logits are from llama.cpp's"]
fn logit_differences_diagnostic() {
    for stem in MODELS {
        let files = ModelFiles::open(&model_path(&format!("{stem}.gguf"))).unwrap();
        let model = files.load(&Device::Cpu).unwrap();
        let (mut sum, mut n, mut worst) = (0f64, 0usize, 0f64);
        for case in golden(stem)["greedy"].as_array().unwrap() {
            let prompt = ids(&case["prompt_ids"]);
            let continuation = ids(&case["generated_ids"]);
            let mut cache = model.new_cache();
            let mut input: Vec<u32> = prompt.clone();
            for (i, st) in case["steps"].as_array().unwrap().iter().enumerate() {
                let StageOutput::Logits(l) =
                    model.forward(StageInput::Tokens(&input), &mut cache, LogitsFor::Last).unwrap()
                else {
                    panic!()
                };
                let row: Vec<f32> = l.flatten_all().unwrap().to_vec1().unwrap();
                for pair in st["top5"].as_array().unwrap() {
                    let (tok, val) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap());
                    let d = (f64::from(row[tok]) - val).abs();
                    sum += d;
                    n += 1;
                    worst = worst.max(d);
                }
                if i + 1 < continuation.len() {
                    input = vec![continuation[i]];
                } else {
                    break;
                }
            }
        }
        eprintln!(
            "{stem}: mean |our logit - llama.cpp logit| over top-5 = {:.4}, worst {worst:.4} ({n} values)",
            sum / n as f64
        );
    }
}

/// Streaming text, piece by piece as tokens arrive, adds up to llama.cpp's text for every
/// golden continuation: no half characters, no lost or doubled spaces (SmolLM2's byte-level
/// BPE and Gemma's SentencePiece with byte fallback).
#[test]
fn streamed_pieces_add_up_to_llama_cpps_text() {
    use gantry_engine::detok::Detokenizer;
    for stem in MODELS {
        let files = ModelFiles::open(&model_path(&format!("{stem}.gguf"))).unwrap();
        let tok = files.tokenizer().unwrap();
        for case in golden(stem)["greedy"].as_array().unwrap() {
            let prompt = ids(&case["prompt_ids"]);
            let mut d = Detokenizer::with_context(&prompt);
            let mut text = String::new();
            for id in ids(&case["generated_ids"]) {
                let piece = d.push(&tok, id).unwrap();
                assert!(!piece.contains('\u{FFFD}'), "{stem} {}: half a character in {piece:?}", case["name"]);
                text.push_str(&piece);
            }
            text.push_str(&d.finish(&tok).unwrap());
            assert_eq!(text, case["generated_text"].as_str().unwrap(), "{stem} {}", case["name"]);
        }
    }
}

#[test]
fn each_tokens_bytes_add_up_to_the_text_even_when_a_token_holds_part_of_a_character() {
    // Byte-level BPE (SmolLM2) and SentencePiece with byte tokens (Gemma), on text whose
    // characters some tokens split: the bytes a token reports (OpenAI's `logprobs.bytes`)
    // concatenate to the text exactly.
    let text = "Café au lait — naïve façade, 東京 🚀 and \u{1F9EA}, \u{13000}\u{1D50A}\u{2F804}!";
    for file in ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"] {
        let files = ModelFiles::open(&model_path(file)).unwrap();
        let tok = files.tokenizer().unwrap();
        let ids = tok.encode(text, false, false).unwrap();
        let bytes: Vec<u8> = ids.iter().flat_map(|&id| tok.token_bytes(id)).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), text, "{file}: {ids:?}");
        let partial = ids.iter().filter(|&&id| std::str::from_utf8(&tok.token_bytes(id)).is_err()).count();
        assert!(partial > 0, "{file}: the text should have tokens holding part of a character");
    }
}
