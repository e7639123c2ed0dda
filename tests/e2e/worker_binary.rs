//! The `gantry-worker` binary (the worker alone, for container images): its GPU listing, and
//! clear errors for bad flags.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn worker(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gantry-worker")).args(args).env_remove("GANTRY_GPUS").output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn print_gpus_lists_declared_gpus() {
    let (code, out, _) = worker(&["--print-gpus", "--gpus", "1x24GiB,1x16GB"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("INDEX NAME"), "{out}");
    assert!(lines[1].contains("24.0 GiB") && lines[1].ends_with("declared"), "{out}");
    assert!(lines[2].contains("14.9 GiB"), "16 GB is 14.9 GiB: {out}");
    assert_eq!(lines[3], "declared: 1x24GiB,1x16GB");
}

#[test]
fn without_a_driver_the_cpu_is_offered_and_the_reason_given() {
    let (code, out, _) = worker(&["--print-gpus"]);
    assert_eq!(code, 0, "a missing NVIDIA driver is not an error");
    // Where NVML works (a GPU machine) its cards are listed instead.
    if out.contains(" nvml") {
        return;
    }
    assert!(out.lines().nth(1).unwrap().ends_with("cpu"), "{out}");
    assert!(out.contains("NVML is not available (") && out.trim_end().ends_with("; serving on the CPU"), "{out}");
}

#[test]
fn bad_flags_are_usage_errors() {
    let (code, _, err) = worker(&["--print-gpus", "--gpus", "2x80"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.starts_with("error: --gpus: "), "{err}");
    let (code, _, err) = worker(&["--parallel", "0"]);
    assert_eq!((code, err.trim()), (64, "error: --parallel must be at least 1"));
    let (code, _, err) = worker(&["--listen", "127.0.0.1:99999"]);
    assert_eq!(code, 69, "{err}");
    assert!(err.contains("cannot listen on 127.0.0.1:99999"), "{err}");
}
