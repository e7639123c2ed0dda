//! The real `config.json` files of well-known models (fixtures/model-configs) read into specs:
//! parameter counts within 0.5% of the published ones, context lengths, families, tuning,
//! sliding windows and memory estimates.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use gantry_core::spec::{HfFiles, ModelSpec, ParamSource, SpecSource};
use gantry_core::units::GIB;
use gantry_core::vram::{KvDtype, ServeOptions, estimate_vram};
use gantry_core::{Family, SizeClass};

fn fixture(folder: &str) -> String {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/model-configs").join(folder).join("config.json");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn spec(folder: &str) -> ModelSpec {
    let config = fixture(folder);
    let name = folder.replace("__", "/");
    ModelSpec::from_hf(HfFiles {
        name: &name,
        config: &config,
        tokenizer_config: None,
        generation_config: None,
        safetensors: &[],
        index: None,
    })
    .unwrap_or_else(|e| panic!("{folder}: {e}"))
}

struct Case {
    folder: &'static str,
    published: u64,
    family: Family,
    context: u64,
    instruct: bool,
    size: SizeClass,
}

const CASES: [Case; 21] = [
    Case {
        folder: "openai-community__gpt2",
        published: 124_439_808,
        family: Family::Gpt2,
        context: 1024,
        instruct: false,
        size: SizeClass::Tiny,
    },
    Case {
        folder: "openai__gpt-oss-20b",
        published: 20_914_757_184,
        family: Family::GptOss,
        context: 131_072,
        instruct: false,
        size: SizeClass::Medium,
    },
    Case {
        folder: "microsoft__phi-2",
        published: 2_779_683_840,
        family: Family::Phi,
        context: 2048,
        instruct: false,
        size: SizeClass::Small,
    },
    Case {
        folder: "microsoft__Phi-3-mini-4k-instruct",
        published: 3_821_079_552,
        family: Family::Phi3,
        context: 4096,
        instruct: true,
        size: SizeClass::Small,
    },
    Case {
        folder: "microsoft__Phi-3-mini-128k-instruct",
        published: 3_821_079_552,
        family: Family::Phi3,
        context: 131_072,
        instruct: true,
        size: SizeClass::Small,
    },
    Case {
        folder: "meta-llama__Llama-2-7b-hf",
        published: 6_738_415_616,
        family: Family::Llama,
        context: 4096,
        instruct: false,
        size: SizeClass::Small,
    },
    Case {
        folder: "meta-llama__Meta-Llama-3-8B-Instruct",
        published: 8_030_261_248,
        family: Family::Llama,
        context: 8192,
        instruct: true,
        size: SizeClass::Medium,
    },
    Case {
        folder: "meta-llama__Llama-3.1-8B-Instruct",
        published: 8_030_261_248,
        family: Family::Llama,
        context: 131_072,
        instruct: true,
        size: SizeClass::Medium,
    },
    Case {
        folder: "meta-llama__Llama-3.3-70B-Instruct",
        published: 70_553_706_496,
        family: Family::Llama,
        context: 131_072,
        instruct: true,
        size: SizeClass::Large,
    },
    Case {
        folder: "mistralai__Mistral-7B-v0.1",
        published: 7_241_732_096,
        family: Family::Mistral,
        context: 32_768,
        instruct: false,
        size: SizeClass::Small,
    },
    Case {
        folder: "mistralai__Mistral-7B-Instruct-v0.3",
        published: 7_248_023_552,
        family: Family::Mistral,
        context: 32_768,
        instruct: true,
        size: SizeClass::Small,
    },
    Case {
        folder: "mistralai__Mixtral-8x7B-v0.1",
        published: 46_702_792_704,
        family: Family::Mixtral,
        context: 32_768,
        instruct: false,
        size: SizeClass::Large,
    },
    Case {
        folder: "google__gemma-2b",
        published: 2_506_172_416,
        family: Family::Gemma,
        context: 8192,
        instruct: false,
        size: SizeClass::Small,
    },
    Case {
        folder: "google__gemma-2-9b-it",
        published: 9_241_705_984,
        family: Family::Gemma2,
        context: 8192,
        instruct: true,
        size: SizeClass::Medium,
    },
    Case {
        folder: "google__gemma-3-270m",
        published: 268_098_176,
        family: Family::Gemma3,
        context: 32_768,
        instruct: false,
        size: SizeClass::Tiny,
    },
    Case {
        folder: "google__gemma-3-1b-it",
        published: 999_885_952,
        family: Family::Gemma3,
        context: 32_768,
        instruct: true,
        size: SizeClass::Tiny,
    },
    Case {
        folder: "google__gemma-3-4b-it",
        published: 4_300_079_472,
        family: Family::Gemma3,
        context: 131_072,
        instruct: true,
        size: SizeClass::Small,
    },
    Case {
        folder: "HuggingFaceTB__SmolLM2-135M-Instruct",
        published: 134_515_008,
        family: Family::Llama,
        context: 8192,
        instruct: true,
        size: SizeClass::Tiny,
    },
    Case {
        folder: "Qwen__Qwen2-0.5B",
        published: 494_032_768,
        family: Family::Qwen2,
        context: 131_072,
        instruct: false,
        size: SizeClass::Tiny,
    },
    Case {
        folder: "tiiuae__falcon-7b",
        published: 6_921_720_704,
        family: Family::Falcon,
        context: 2048,
        instruct: false,
        size: SizeClass::Small,
    },
    Case {
        folder: "tiiuae__falcon-40b",
        published: 41_835_970_560,
        family: Family::Falcon,
        context: 2048,
        instruct: false,
        size: SizeClass::Large,
    },
];

#[test]
fn computed_parameter_counts_are_within_half_a_percent_of_the_published_ones() {
    for c in &CASES {
        let s = spec(c.folder);
        assert_eq!(s.parameters.source, ParamSource::ComputedFromConfig);
        let diff = (s.parameters.total as f64 - c.published as f64).abs() / c.published as f64;
        assert!(
            diff < 0.005,
            "{}: computed {} vs published {} ({:.4}%)",
            c.folder,
            s.parameters.total,
            c.published,
            diff * 100.0
        );
    }
}

#[test]
fn most_counts_are_exact() {
    // Every fixture whose config is complete computes the Hub's safetensors total to the
    // parameter; Falcon-7B's model-card figure differs by 75,776 (0.001%).
    for c in CASES.iter().filter(|c| c.folder != "tiiuae__falcon-7b") {
        assert_eq!(spec(c.folder).parameters.total, c.published, "{}", c.folder);
    }
}

#[test]
fn family_context_tuning_and_size_class_come_from_the_files() {
    for c in &CASES {
        let s = spec(c.folder);
        assert_eq!(s.family, c.family, "{}", c.folder);
        assert_eq!(s.context.length, c.context, "{}", c.folder);
        assert_eq!(s.tuning.instruct, c.instruct, "{}: {}", c.folder, s.tuning.evidence);
        assert_eq!(s.size_class, c.size, "{}", c.folder);
        assert_eq!(s.source, SpecSource::Config);
    }
}

#[test]
fn context_fallbacks_and_rope_scaling_are_recorded() {
    let gpt2 = spec("openai-community__gpt2");
    assert_eq!(gpt2.context.source, "n_positions");
    let gemma4b = spec("google__gemma-3-4b-it");
    assert_eq!(gemma4b.context.source, "max_position_embeddings (transformers default)");
    let llama31 = spec("meta-llama__Llama-3.1-8B-Instruct");
    let rope = llama31.context.rope_scaling.expect("llama3 rope scaling");
    assert_eq!((rope.kind.as_str(), rope.factor, rope.original_context), ("llama3", Some(8.0), Some(8192)));
    let phi128k = spec("microsoft__Phi-3-mini-128k-instruct");
    assert_eq!(phi128k.context.rope_scaling.unwrap().kind, "longrope");
}

#[test]
fn sliding_windows_follow_each_family_rule() {
    // (folder, window, sliding layers)
    let cases = [
        ("mistralai__Mistral-7B-v0.1", Some(4096), 32),
        ("mistralai__Mistral-7B-Instruct-v0.3", None, 0),
        ("google__gemma-2-9b-it", Some(4096), 21),
        ("google__gemma-3-270m", Some(512), 15),
        ("google__gemma-3-1b-it", Some(512), 22),
        ("google__gemma-3-4b-it", Some(1024), 29),
        ("openai__gpt-oss-20b", Some(128), 12),
        ("microsoft__Phi-3-mini-4k-instruct", Some(2047), 32),
        // A window longer than the context is no window.
        ("microsoft__Phi-3-mini-128k-instruct", None, 0),
        ("Qwen__Qwen2-0.5B", None, 0),
    ];
    for (folder, window, layers) in cases {
        let s = spec(folder);
        assert_eq!((s.context.sliding_window, s.context.sliding_layers), (window, layers), "{folder}");
    }
}

#[test]
fn moe_models_report_active_parameters() {
    let mixtral = spec("mistralai__Mixtral-8x7B-v0.1");
    assert_eq!(mixtral.architecture.moe.unwrap().experts, 8);
    // Mistral's "12.9B active" (2 of 8 experts; embeddings included).
    assert!((12_850_000_000..12_950_000_000).contains(&mixtral.parameters.active), "{}", mixtral.parameters.active);
}

#[test]
fn kv_cache_matches_the_formula_by_hand() {
    // Llama-3-8B: 32 layers × 8 KV heads × 128 dims × 2 (K,V) × 2 bytes = 128 KiB per token.
    let s = spec("meta-llama__Meta-Llama-3-8B-Instruct");
    let e = estimate_vram(&s, &ServeOptions { context: Some(8192), ..Default::default() }).unwrap();
    assert_eq!(e.kv_cache_bytes, 32 * 8 * 128 * 2 * 2 * 8192);
    assert_eq!(e.kv_cache_bytes, GIB);
    assert_eq!(e.weights_bytes, 8_030_261_248 * 2);
    // Batch and KV precision scale it linearly.
    let e4 =
        estimate_vram(&s, &ServeOptions { context: Some(8192), batch: 4, kv_dtype: KvDtype::Q8, ..Default::default() })
            .unwrap();
    assert_eq!(e4.kv_cache_bytes, 2 * GIB);
    assert_eq!(e.total_bytes, e.weights_bytes + e.kv_cache_bytes + e.activation_bytes + e.overhead_bytes);
}

#[test]
fn sliding_window_layers_cap_their_cache_at_the_window() {
    // Gemma 3 1B at 32K: 4 global layers hold 32K tokens, 22 sliding layers only 512.
    let s = spec("google__gemma-3-1b-it");
    let e = estimate_vram(&s, &ServeOptions::default()).unwrap();
    let per_token_layer = 2 * 256 * 2; // 1 KV head × 256 dims × K,V × 2 bytes
    assert_eq!(e.kv_cache_bytes, per_token_layer * (4 * 32_768 + 22 * 512));
}

#[test]
fn asking_for_more_context_than_trained_is_an_error_with_the_numbers() {
    let s = spec("meta-llama__Llama-2-7b-hf");
    let err = estimate_vram(&s, &ServeOptions { context: Some(8192), ..Default::default() }).unwrap_err().to_string();
    assert!(err.contains("context 8192") && err.contains("trained for 4096 tokens"), "{err}");
}

#[test]
fn mxfp4_experts_make_gpt_oss_20b_about_13_gb() {
    let s = spec("openai__gpt-oss-20b");
    assert!(s.weights.dtype.contains("mxfp4"), "{}", s.weights.dtype);
    // The published checkpoint is 13.8 GB (12.8 GiB).
    let gib = s.weights.bytes as f64 / GIB as f64;
    assert!((12.0..13.5).contains(&gib), "{gib:.2} GiB");
}

#[test]
fn dtype_override_recosts_the_weights() {
    let s = spec("meta-llama__Meta-Llama-3-8B-Instruct");
    let q4 = gantry_core::quant::WeightDtype::parse("q4_k_m").unwrap();
    let e = estimate_vram(&s, &ServeOptions { context: Some(4096), dtype: Some(q4), ..Default::default() }).unwrap();
    // 4.5 bits per weight.
    let expected = 8_030_261_248f64 * 4.5 / 8.0;
    assert!((e.weights_bytes as f64 / expected - 1.0).abs() < 0.001, "{} vs {expected}", e.weights_bytes);
    assert_eq!(e.weights_dtype, "q4_k");
}
