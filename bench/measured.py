#!/usr/bin/env python3
"""Estimate against measurement: `gantry bench` (release) on the real models, memory per term
and speed at 1 and N streams, side by side with what `gantry inspect` estimates.

    cargo build --release -p gantry-cli
    python3 bench/measured.py --threads 2 --streams 4

Writes bench/results/measured-<UTC>.json (every `gantry bench --json` report) and prints the
per-term table. The measurements go to a file of the run's own (GANTRY_MEASUREMENTS), not this
machine's. The model paths are given relative to the checkout, so the report names no path of
the machine that ran it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gantry_worker import ROOT

MODELS = {
    "SmolLM2-135M-Instruct Q4_1": "models/SmolLM2-135M-Instruct.Q4_1.gguf",
    "Gemma 3 270M Q4_K_M": "models/gemma-3-270m-q4_k_m.gguf",
}
TERMS = ["weights", "kv_cache", "activations", "overhead"]


def mib(b):
    return f"{b / 2**20:.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    a = ap.parse_args()
    gantry = str(ROOT / "target/release/gantry")
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GANTRY_MEASUREMENTS=str(Path(tmp) / "measurements.json"))
        for name, path in MODELS.items():
            out = subprocess.run(
                [gantry, "bench", path, "--threads", str(a.threads), "--streams", str(a.streams),
                 "--prompt-tokens", str(a.prompt_tokens), "--tokens", str(a.tokens), "--context", str(a.context),
                 "--json"],
                env=env, cwd=ROOT, check=True, capture_output=True, text=True,
            )
            reports[name] = json.loads(out.stdout)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {"commit": commit, "args": vars(a), "reports": reports}
    dest = ROOT / "bench/results" / f"measured-{stamp}.json"
    dest.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{dest.relative_to(ROOT)} ({commit}, {a.threads} threads, KV for {a.context} tokens x {a.streams} streams)\n")
    print("| model | term | estimated MiB | measured MiB | error |")
    print("|---|---|---|---|---|")
    for name, r in reports.items():
        for t in TERMS + ["total"]:
            est = sum(r["estimated"].values()) if t == "total" else r["estimated"][t]
            meas = r["measurement"] and (
                sum(r["measured"][x] or r["estimated"][x] for x in TERMS) if t == "total" else r["measured"][t])
            err = r["error_percent"].get(t)
            print(f"| {name} | {t} | {mib(est)} | {mib(meas) if meas else '-'} | {f'{err:+.0f}%' if err is not None else '-'} |")
    print("\n| model | streams | TTFT ms | prefill tok/s | decode tok/s | per stream | load ms |")
    print("|---|---|---|---|---|---|---|")
    for name, r in reports.items():
        for run in r["runs"]:
            print(f"| {name} | {run['streams']} | {run['ttft_ms']:.0f} | {run['prefill_tokens_per_sec']:.0f} | "
                  f"{run['decode_tokens_per_sec']:.1f} | {run['decode_tokens_per_sec_per_stream']:.1f} | {r['load_ms']} |")


if __name__ == "__main__":
    sys.exit(main())
