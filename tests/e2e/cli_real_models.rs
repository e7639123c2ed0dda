//! `gantry inspect` and `gantry select` run as a user would, on the real SmolLM2-135M-Instruct
//! and Gemma 3 270M GGUF files.
//!
//! Expected figures were read independently with the `gguf` Python package
//! (`GGUFReader(path).tensors`: element and byte totals, type counts).

#![allow(clippy::unwrap_used)]

use crate::common::{gantry, gantry_json, gemma3, run, smollm2};
use serde_json::Value;

fn path_str(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn inspect_reads_smollm2_from_its_gguf() {
    let path = smollm2();
    let j = gantry_json(&["inspect", &path_str(&path), "--json"]);
    let m = &j["model"];
    assert_eq!(j["schema_version"], 1);
    assert_eq!(m["family"], "llama");
    assert_eq!(m["family_group"], "LLaMA");
    assert_eq!(m["source"], "gguf");
    assert_eq!(m["parameters"]["total"], 134_515_008u64);
    assert_eq!(m["parameters"]["source"], "tensor_shapes");
    assert_eq!(m["size_class"], "tiny");
    assert_eq!(m["context"]["length"], 8192);
    assert_eq!(m["context"]["source"], "llama.context_length");
    assert_eq!(m["instruct"], true);
    assert_eq!(m["has_chat_template"], true);
    assert_eq!(m["weights"]["dtype"], "Q4_1");
    assert_eq!(m["weights"]["tensors_by_type"], serde_json::json!({"F32": 61, "Q4_1": 210, "Q8_0": 1}));
    assert_eq!(m["architecture"]["layers"], 30);
    assert_eq!(m["architecture"]["kv_heads"], 3);
    assert_eq!(m["architecture"]["tied_embeddings"], true);
    assert_eq!(m["eos_token_ids"], serde_json::json!([2]));
}

#[test]
fn smollm2_weights_figure_equals_the_files_tensor_bytes() {
    let path = smollm2();
    let j = gantry_json(&["inspect", &path_str(&path), "--json"]);
    let weights = j["model"]["weights"]["bytes"].as_u64().unwrap();
    assert_eq!(weights, 96_576_768, "sum of the tensors' data bytes");
    assert_eq!(j["memory"]["weights_bytes"].as_u64().unwrap(), weights);
    assert_eq!(j["model"]["weights"]["exact"], true);
    // Cross-check against the file itself: what is not header is tensor data plus at most
    // 31 bytes of alignment padding per tensor (272 tensors).
    let file_len = std::fs::metadata(&path).unwrap().len();
    let bytes = std::fs::read(&path).unwrap();
    let header = gantry_core::gguf::parse_gguf(&bytes).unwrap();
    let data = file_len - header.data_offset;
    assert!(data >= weights && data - weights < 31 * 272, "data section {data} vs tensors {weights}");
}

#[test]
fn smollm2_kv_cache_follows_the_formula() {
    let path = smollm2();
    let j = gantry_json(&["inspect", &path_str(&path), "--context", "4K", "--batch", "2", "--json"]);
    // 30 layers × 3 KV heads × 64 dims × (K,V) × 2 bytes × 4096 tokens × 2 sequences.
    assert_eq!(j["memory"]["kv_cache_bytes"], 30 * 3 * 64 * 2 * 2 * 4096 * 2);
    assert_eq!(j["memory"]["context"], 4096);
    let m = &j["memory"];
    let parts: u64 = ["weights_bytes", "kv_cache_bytes", "activation_bytes", "overhead_bytes"]
        .iter()
        .map(|k| m[*k].as_u64().unwrap())
        .sum();
    assert_eq!(m["total_bytes"].as_u64().unwrap(), parts);
}

#[test]
fn inspect_reads_gemma3_and_its_sliding_window() {
    let path = gemma3();
    let j = gantry_json(&["inspect", &path_str(&path), "--json", "--gpus", "1x8GiB"]);
    let m = &j["model"];
    assert_eq!(m["family"], "gemma3");
    assert_eq!(m["parameters"]["total"], 268_098_176u64);
    assert_eq!(m["weights"]["bytes"], 246_587_904u64);
    assert_eq!(m["weights"]["dtype"], "Q4_K_M");
    assert_eq!(
        m["weights"]["tensors_by_type"],
        serde_json::json!({"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9})
    );
    assert_eq!(m["context"]["length"], 32768);
    assert_eq!(m["context"]["sliding_window"], 512);
    assert_eq!(m["context"]["sliding_layers"], 15);
    // A base model: the GGUF carries no chat template and its name no instruct marker.
    assert_eq!(m["instruct"], false);
    assert_eq!(m["has_chat_template"], false);
    // 3 global layers hold 32K tokens, 15 sliding ones 512: 1 KV head × 256 dims × K,V × 2 bytes.
    assert_eq!(j["memory"]["kv_cache_bytes"], 256 * 2 * 2 * (3 * 32768 + 15 * 512));
    assert_eq!(j["fit"]["kind"], "one_device");
}

#[test]
fn inspect_human_output_reads_like_a_report() {
    let (code, out, err) = run(gantry().args(["inspect", &path_str(&smollm2()), "--gpus", "1x24GiB"]));
    assert_eq!(code, 0, "{err}");
    for line in [
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "  parameters     134,515,008 (135M, tiny), exact, summed over the tensor table",
        "  weights        Q4_1, 92.1 MiB (exact): Q4_1 ×210, F32 ×61, Q8_0 ×1",
        "  context        8,192 tokens (llama.context_length)",
        "  tuning         instruct: name `SmolLM2-135M-Instruct.Q4_1.gguf` contains `instruct`",
        "  KV cache     180.0 MiB  (22.5 KiB per token)",
    ] {
        assert!(out.lines().any(|l| l == line), "missing line {line:?} in:\n{out}");
    }
    assert!(out.contains("fits on one GPU of 1×24.0 GiB: gpu0"), "{out}");
}

#[test]
fn a_folder_with_one_gguf_is_read_as_that_file() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(gemma3(), dir.path().join("model.gguf")).unwrap();
    let j = gantry_json(&["inspect", &path_str(dir.path()), "--json"]);
    assert_eq!(j["model"]["parameters"]["total"], 268_098_176u64);
}

#[test]
fn the_70b_model_splits_over_two_80_gib_gpus_and_four_48_gib_ones() {
    let j = gantry_json(&["inspect", "meta-llama/Meta-Llama-3-70B-Instruct", "--gpus", "2x80GiB", "--json"]);
    assert_eq!(j["fit"]["kind"], "split");
    let stages = j["fit"]["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2);
    assert_eq!(stages[0]["layers"], serde_json::json!({"start": 0, "end": 40}));
    assert_eq!(stages[1]["layers"], serde_json::json!({"start": 40, "end": 80}));
    for s in stages {
        assert!(s["total_bytes"].as_u64().unwrap() <= s["free_bytes"].as_u64().unwrap());
    }
    let j = gantry_json(&["inspect", "meta-llama/Meta-Llama-3-70B-Instruct", "--gpus", "4x48GiB", "--json"]);
    let stages = j["fit"]["stages"].as_array().unwrap();
    let layers: u64 =
        stages.iter().map(|s| s["layers"]["end"].as_u64().unwrap() - s["layers"]["start"].as_u64().unwrap()).sum();
    assert_eq!(layers, 80, "every layer placed once");
    let (code, out, _) = run(gantry().args(["inspect", "meta-llama/Meta-Llama-3-70B-Instruct", "--gpus", "1x80GiB"]));
    assert_eq!(code, 0);
    assert!(out.contains("does not fit 1×80.0 GiB: needs 137.2 GiB on one device, the largest has 80.0 GiB"), "{out}");
    assert!(out.contains("at --dtype q8_0 it would fit"), "{out}");
}

#[test]
fn select_prints_a_ranked_table_and_stable_json() {
    let (code, out, err) =
        run(gantry().args(["select", "--task", "chat", "--latency", "realtime", "--gpus", "1x24GiB"]));
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "realtime chat on 1×24.0 GiB, context 8K (default)");
    assert!(lines[2].starts_with("RANK  SCORE  MODEL"), "{out}");
    assert!(out.contains("\nWhy:\n  1. "), "{out}");
    assert!(out.contains("Not suitable ("), "{out}");

    let j = gantry_json(&["select", "--task", "chat", "--latency", "realtime", "--gpus", "1x24GiB", "--json"]);
    assert_eq!(j["schema_version"], 1);
    assert_eq!(j["need"]["task"], "chat");
    let top: &Value = &j["candidates"][0];
    assert_eq!(top["instruct"], true);
    assert!(top["parameters"].as_u64().unwrap() < 7_500_000_000);
    assert!(top["reasons"][0].as_str().unwrap().starts_with("fits 1×24.0 GiB"));
    for c in j["candidates"].as_array().unwrap() {
        assert!(c["score"].as_u64().unwrap() <= 100);
    }
}

#[test]
fn select_long_context_excludes_short_context_models() {
    let j = gantry_json(&[
        "select",
        "--task",
        "summarization",
        "--latency",
        "batch",
        "--min-context",
        "128K",
        "--gpus",
        "8x80GiB",
        "--json",
    ]);
    for c in j["candidates"].as_array().unwrap() {
        assert!(c["context"].as_u64().unwrap() >= 131_072, "{}", c["id"]);
    }
    let phi = j["rejected"].as_array().unwrap().iter().find(|r| r["id"] == "microsoft/Phi-3-mini-4k-instruct").unwrap();
    assert_eq!(phi["reasons"][0], "context 4K < 128K needed");
}

/// `inspect --nvlink`: on three linked 600 MiB GPUs SmolLM2 at 2K context (657 MiB on one) is
/// split tensor-parallel, 3 of its 9 heads and 1 of its 3 KV heads per GPU; on two, whose count
/// does not divide the heads, it is split by layers and the output says why.
#[test]
fn inspect_shows_a_tensor_parallel_split_on_linked_gpus_or_why_not() {
    let path = path_str(&smollm2());
    let j = gantry_json(&["inspect", &path, "--context", "2048", "--gpus", "3x600MiB", "--nvlink", "--json"]);
    assert_eq!(j["fit"]["kind"], "tensor_parallel", "{}", j["fit"]);
    let ranks = j["fit"]["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 3);
    for (i, r) in ranks.iter().enumerate() {
        assert_eq!(
            (r["device"].as_u64(), &r["layers"]["start"], &r["layers"]["end"]),
            (Some(i as u64), &Value::from(0), &Value::from(30))
        );
        assert!(r["total_bytes"].as_u64().unwrap() <= 600 << 20);
    }
    let (code, out, err) =
        run(gantry().args(["inspect", &path, "--context", "2048", "--gpus", "3x600MiB", "--nvlink"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("split tensor-parallel over 3 of 3×600.0 MiB (linked): every layer on each, 3 of the 9 attention heads, 1 of 3 KV heads"), "{out}");
    let (code, out, err) =
        run(gantry().args(["inspect", &path, "--context", "2048", "--gpus", "2x620MiB", "--nvlink"]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("as pipeline stages")
            && out.contains("not tensor-parallel: 2 ranks do not divide the 9 attention heads"),
        "{out}"
    );
    // Without --nvlink the same GPUs are split by layers.
    let j = gantry_json(&["inspect", &path, "--context", "2048", "--gpus", "3x600MiB", "--json"]);
    assert_eq!(j["fit"]["kind"], "split");
}

/// A mixture of experts in `inspect`: split over two 80 GiB GPUs, each stage shows its experts;
/// on one 24 GiB GPU it is planned with its routed experts (every one of 32 layers × 8 experts
/// × 3 matrices of 4096 × 14336, bf16) in host memory; on 4 GiB not even that fits, and the
/// reason gives both numbers.
#[test]
fn inspect_places_a_mixtures_experts_per_stage_or_in_host_memory() {
    let config = "fixtures/model-configs/mistralai__Mixtral-8x7B-v0.1/config.json";
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = path_str(&root.join(config));
    let (code, out, err) = run(gantry().args(["inspect", &path, "--context", "8K", "--gpus", "2x80GiB"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("EXPERTS") && out.matches("8×16 (42.0 GiB)").count() == 2, "{out}");
    let experts = 32u64 * 8 * 3 * 4096 * 14336 * 2;
    let j = gantry_json(&["inspect", &path, "--context", "8K", "--gpus", "1x24GiB", "--json"]);
    assert_eq!(j["fit"]["kind"], "experts_on_host", "{}", j["fit"]);
    assert_eq!(j["fit"]["host_bytes"].as_u64(), Some(experts));
    let gpu = j["fit"]["stage"]["total_bytes"].as_u64().unwrap();
    assert!(gpu < 24 << 30, "{gpu}");
    assert_eq!(j["fit"]["stage"]["layers"], serde_json::json!({"start": 0, "end": 32}));
    let (code, out, err) = run(gantry().args(["inspect", &path, "--context", "8K", "--gpus", "1x24GiB"]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("host memory: 8 experts × 32 layers (84.0 GiB), run by the CPU"), "{out}");
    let (_, out, _) = run(gantry().args(["inspect", &path, "--context", "8K", "--gpus", "1x4GiB"]));
    assert!(out.contains("with its experts in host memory (84.0 GiB) it needs 4.6 GiB on one device"), "{out}");
    assert!(!out.contains("would fit"), "no quantization fits 4 GiB: {out}");
}
