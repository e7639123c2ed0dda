//! `gantry generate` run as a user would, on the real models: llama.cpp's greedy tokens, chat
//! templates, seeds, streaming, and clear errors for bad sampling values and long prompts.

#![allow(clippy::unwrap_used)]

use crate::common::{gantry, gantry_json, gemma3, repo_root, run, smollm2};

fn golden_case(stem: &str, name: &str) -> serde_json::Value {
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("fixtures/goldens").join(format!("{stem}.json"))).unwrap(),
    )
    .unwrap();
    g["greedy"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone()
}

fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

#[test]
fn greedy_generation_equals_llama_cpp_on_both_models() {
    for (path, stem, name) in [
        (smollm2(), "SmolLM2-135M-Instruct.Q4_1", "numbers_count"),
        (gemma3(), "gemma-3-270m-q4_k_m", "quick_brown_fox"),
    ] {
        let case = golden_case(stem, name);
        let prompt = case["prompt"].as_str().unwrap();
        let j = gantry_json(&[
            "generate",
            "--model",
            path.to_str().unwrap(),
            "--prompt",
            prompt,
            "--max-tokens",
            "24",
            "--json",
        ]);
        assert_eq!(ids(&j["prompt_ids"]), ids(&case["prompt_ids"]), "{stem}: prompt tokens");
        assert_eq!(ids(&j["tokens"]), ids(&case["generated_ids"])[..24].to_vec(), "{stem}: greedy tokens");
        let want_text: String =
            case["generated_pieces"].as_array().unwrap()[..24].iter().map(|p| p.as_str().unwrap()).collect();
        assert_eq!(j["text"].as_str().unwrap(), want_text, "{stem}: text");
        assert_eq!(j["finish_reason"], "length");
        assert_eq!(j["usage"]["completion_tokens"], 24);
    }
}

#[test]
fn chat_renders_the_models_template_and_stops_at_end_of_turn() {
    let case = golden_case("SmolLM2-135M-Instruct.Q4_1", "chat_spider_legs");
    let question =
        case["chat_messages"].as_array().unwrap().iter().find(|m| m["role"] == "user").unwrap()["content"].clone();
    let j = gantry_json(&[
        "generate",
        "--model",
        smollm2().to_str().unwrap(),
        "--chat",
        "--prompt",
        question.as_str().unwrap(),
        "--max-tokens",
        "48",
        "--json",
    ]);
    // The rendered prompt is llama.cpp's, token for token; the answer ends at <|im_end|>.
    assert_eq!(j["prompt"].as_str().unwrap(), case["prompt"].as_str().unwrap());
    assert_eq!(ids(&j["prompt_ids"]), ids(&case["prompt_ids"]));
    assert_eq!(j["finish_reason"], "end_of_sequence");
    assert!(!j["text"].as_str().unwrap().contains("<|im_end|>"));
}

#[test]
fn the_same_seed_gives_the_same_tokens() {
    let args = |seed: &str| -> Vec<String> {
        [
            "generate",
            "--model",
            smollm2().to_str().unwrap(),
            "--prompt",
            "Once upon a time,",
            "--max-tokens",
            "20",
            "--temperature",
            "1.0",
            "--top-k",
            "40",
            "--seed",
            seed,
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let tokens = |seed: &str| {
        let a = args(seed);
        ids(&gantry_json(&a.iter().map(String::as_str).collect::<Vec<_>>())["tokens"])
    };
    assert_eq!(tokens("7"), tokens("7"));
    assert_ne!(tokens("7"), tokens("8"));
}

#[test]
fn text_streams_to_stdout_with_a_summary_on_stderr() {
    let (code, out, err) = run(gantry().args([
        "generate",
        "--model",
        smollm2().to_str().unwrap(),
        "--prompt",
        "1, 2, 3, 4,",
        "--max-tokens",
        "40",
        "--stop",
        " 9",
    ]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, " 5, 6, 7, 8,\n", "stops before the stop string");
    assert!(err.contains("finish: StopString"), "{err}");
}

#[test]
fn bad_sampling_values_and_long_prompts_are_usage_errors() {
    let model = smollm2();
    let m = model.to_str().unwrap();
    let long = "word ".repeat(9000);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--temperature", "-1"], "temperature must be between 0 and 100, got -1"),
        (vec!["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
        (vec!["--temperature", "NaN"], "temperature must be between 0 and 100, got NaN"),
        (vec!["--device", "cuda:0"], "this build has no CUDA support"),
        (vec!["--prompt", &long], "prompt is 9001 tokens; model context is 8192"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["generate", "--model", m, "--max-tokens", "4"];
        if !extra.contains(&"--prompt") {
            args.extend(["--prompt", "hi"]);
        }
        args.extend(extra.iter().copied());
        let (code, _, err) = run(gantry().args(&args));
        assert_eq!(code, 64, "{want}: {err}");
        assert!(err.contains(want), "want {want:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
