//! Bad input to `gantry inspect` and `gantry select`: truncated and hostile model files,
//! malformed configs, unknown architectures, absurd sizes and bad flags each get one clear
//! line on stderr and a non-zero exit code — never a panic or a backtrace.

#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;

use crate::common::{gantry, run, smollm2};

/// Runs `gantry inspect PATH` and checks the failure is one clear line.
fn inspect_fails(path: &Path, code: i32, want: &str) {
    let (got, out, err) = run(gantry().arg("inspect").arg(path).env("RUST_BACKTRACE", "1"));
    assert_eq!(got, code, "exit code for {}: stderr {err}", path.display());
    assert!(out.is_empty(), "nothing on stdout: {out}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(want), "want {want:?} in {err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn folder_with_config(dir: &Path, config: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("config.json"), config).unwrap();
    dir.to_path_buf()
}

#[test]
fn truncated_real_gguf_files_name_what_is_missing() {
    let real = std::fs::read(smollm2()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Cut inside the metadata (the vocabulary is in the first 2 MiB).
    let p = write(dir.path(), "cut-metadata.gguf", &real[..1 << 20]);
    inspect_fails(&p, 65, "truncated GGUF file");
    inspect_fails(&p, 65, "but the file has 1048576 bytes");
    // Cut inside the tensor data: the last tensor's bytes are missing.
    let p = write(dir.path(), "cut-data.gguf", &real[..real.len() - 4096]);
    inspect_fails(&p, 65, "truncated GGUF file: tensor `");
    // Nothing after the magic.
    let p = write(dir.path(), "magic-only.gguf", b"GGUF");
    inspect_fails(&p, 65, "truncated GGUF file: the version");
}

#[test]
fn hostile_and_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut huge = b"GGUF".to_vec();
    huge.extend_from_slice(&3u32.to_le_bytes());
    huge.extend_from_slice(&(1u64 << 62).to_le_bytes()); // tensors
    huge.extend_from_slice(&0u64.to_le_bytes());
    inspect_fails(&write(dir.path(), "huge.gguf", &huge), 65, "tensor entries");
    inspect_fails(&write(dir.path(), "empty.gguf", b""), 65, "not a GGUF file");
    inspect_fails(&write(dir.path(), "text.gguf", b"hello, not a model"), 65, "not a GGUF file");
    let mut v9 = b"GGUF".to_vec();
    v9.extend_from_slice(&9u32.to_le_bytes());
    v9.extend_from_slice(&[0; 16]);
    inspect_fails(&write(dir.path(), "v9.gguf", &v9), 65, "version 9 is not supported");
}

#[test]
fn broken_configs_get_clear_errors() {
    let cases = [
        ("{\"model_type\": \"llama\", ", 65, "config.json is not valid JSON"),
        (
            r#"{"architectures":["MambaForCausalLM"],"model_type":"mamba"}"#,
            65,
            "unknown model architecture `MambaForCausalLM`",
        ),
        (
            r#"{"model_type":"llama","hidden_size":1000000000000,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":10,"intermediate_size":8,"max_position_embeddings":16}"#,
            65,
            "absurd hidden_size",
        ),
        (r#"{"model_type":"llama","hidden_size":64}"#, 65, "config.json has no `num_hidden_layers`"),
        (
            r#"{"model_type":"llama","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":10,"intermediate_size":8}"#,
            65,
            "has no `max_position_embeddings`",
        ),
    ];
    for (config, code, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        inspect_fails(&folder_with_config(dir.path(), config), code, want);
    }
}

#[test]
fn a_truncated_safetensors_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    folder_with_config(
        dir.path(),
        r#"{"model_type":"llama","hidden_size":8,"num_hidden_layers":1,"num_attention_heads":2,"vocab_size":10,"intermediate_size":16,"max_position_embeddings":64}"#,
    );
    let full = gantry_core::safetensors::write_safetensors(&[("model.embed_tokens.weight", "F32", &[10, 8])]);
    write(dir.path(), "model.safetensors", &full[..full.len() - 8]);
    inspect_fails(dir.path(), 65, "invalid safetensors file model.safetensors");
}

#[test]
fn missing_paths_and_bad_flags_exit_with_usage_codes() {
    inspect_fails(Path::new("no/such/model.gguf"), 66, "no/such/model.gguf: no such file or directory");
    let cases: [(&[&str], &str); 6] = [
        (&["inspect", "acme/not-a-model"], "neither a path nor a model in Gantry's catalog"),
        (&["inspect", "meta-llama/Meta-Llama-3-70B-Instruct", "--gpus", "2xlots"], "GPU list `2xlots`"),
        (&["inspect", "meta-llama/Meta-Llama-3-70B-Instruct", "--context", "1M"], "trained for 8192 tokens"),
        (&["inspect", "meta-llama/Meta-Llama-3-70B-Instruct", "--kv-dtype", "f64"], "KV cache dtype `f64`"),
        (&["select", "--task", "chat", "--latency", "soon"], "latency `soon`: use realtime, interactive or batch"),
        (&["select", "--task", "chat", "--latency", "batch", "--max-params", "huge"], "parameter count `huge`"),
    ];
    for (args, want) in cases {
        let (code, _, err) = run(gantry().args(args));
        assert_eq!(code, 64, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn help_shows_examples_and_exits_zero() {
    let (code, out, _) = run(gantry().args(["inspect", "--help"]));
    assert_eq!(code, 0);
    assert!(out.contains("Examples:") && out.contains("--gpus 2x80GiB"), "{out}");
    let (code, out, _) = run(gantry().arg("--help"));
    assert_eq!(code, 0);
    assert!(out.contains("inspect") && out.contains("select"), "{out}");
}

#[test]
fn completions_are_valid_scripts_for_each_shell() {
    let (code, bash, err) = common::run(common::gantry().args(["completions", "bash"]));
    assert_eq!(code, 0, "{err}");
    assert!(bash.contains("_gantry()") && bash.contains("deploy") && bash.contains("--api-key"), "{bash}");
    let mut check = std::process::Command::new("bash").arg("-n").stdin(std::process::Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), bash.as_bytes()).unwrap();
    assert!(check.wait().unwrap().success(), "bash accepts the script");
    for shell in ["zsh", "fish"] {
        let (code, script, _) = common::run(common::gantry().args(["completions", shell]));
        assert_eq!(code, 0);
        assert!(script.contains("inspect"), "{shell}: {script}");
    }
    let (code, _, err) = common::run(common::gantry().args(["completions", "tcsh"]));
    assert_eq!(code, 64);
    assert!(err.contains("invalid value 'tcsh'"), "{err}");
}
