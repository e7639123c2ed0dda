#!/usr/bin/env python3
"""Gantry's engine and llama.cpp side by side, on the same GGUF, prompt, thread count, in one run.

For each model and thread count it alternates fresh processes of `gantry generate` and of
bench/peer/llamacpp_bench.py (llama.cpp through llama-cpp-python), each doing one untimed
warm-up generation and one timed one: a prompt of exactly --prompt-tokens tokens (the same ids
for both, cut from a fixed English text), then --gen-tokens greedy tokens ignoring EOS. It
reports medians of prefill tokens/s, decode tokens/s, time to first token and peak RSS, the
ratios Gantry/llama.cpp, and writes every run to bench/results/.

Prerequisites: `cargo build --release -p gantry-cli`, scripts/goldens/install-peer.sh (the
peer in .venv-peer), scripts/fetch-models.sh. Run with the peer's Python:
  .venv-peer/bin/python bench/engine_vs_llamacpp.py --repeat 5
The machines here are shared and noisy: compare within one run, not across runs.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "peer"))

MODELS = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]


def prompt_ids(model: Path, n: int) -> list[int]:
    import llama_cpp
    from llamacpp_bench import build_prompt

    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))
    return build_prompt(llm, n, bool(add_bos))


def run_gantry(model: Path, ids: list[int], threads: int, gen: int) -> dict:
    cmd = [
        str(ROOT / "target/release/gantry"), "generate", "--model", str(model),
        "--prompt-ids", ",".join(map(str, ids)), "--max-tokens", str(gen), "--ignore-eos",
        "--threads", str(threads), "--warmup", "1", "--json",
    ]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    t = out["timings"]
    return {
        "prefill_tokens_per_s": t["prefill_tokens_per_sec"],
        "decode_tokens_per_s": t["decode_tokens_per_sec"],
        "ttft_ms": t["time_to_first_token_ms"],
        "peak_rss_bytes": t["peak_rss_bytes"],
        "load_ms": t["load_ms"],
        "first_ids": out["tokens"][:8],
    }


def run_llamacpp(model: Path, threads: int, prompt: int, gen: int) -> dict:
    cmd = [
        sys.executable, str(ROOT / "bench/peer/llamacpp_bench.py"), "--model", str(model),
        "--threads", str(threads), "--prompt-tokens", str(prompt), "--gen-tokens", str(gen),
        "--repeat", "1", "--warmup", "1", "--json",
    ]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    m = out["median"]
    return {
        "prefill_tokens_per_s": m["prefill_tokens_per_s"],
        "decode_tokens_per_s": m["decode_tokens_per_s"],
        "ttft_ms": m["ttft_s"] * 1000,
        "peak_rss_bytes": out["peak_rss_bytes"],
        # The Python interpreter and numpy before the model loads.
        "python_rss_bytes": out["rss_before_load_bytes"],
        "load_ms": out["load_s"] * 1000,
        "first_ids": out["runs"][0]["first_generated_ids"],
    }


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--models", nargs="+", default=MODELS)
    args = ap.parse_args()

    results = []
    for name in args.models:
        model = ROOT / "models" / name
        ids = prompt_ids(model, args.prompt_tokens)
        size = model.stat().st_size
        for threads in args.threads:
            g, l = [], []
            for i in range(args.repeat):
                # Alternate who goes first so drifting load hits both alike.
                if i % 2 == 0:
                    g.append(run_gantry(model, ids, threads, args.gen_tokens))
                    l.append(run_llamacpp(model, threads, args.prompt_tokens, args.gen_tokens))
                else:
                    l.append(run_llamacpp(model, threads, args.prompt_tokens, args.gen_tokens))
                    g.append(run_gantry(model, ids, threads, args.gen_tokens))
            row = {"model": name, "file_bytes": size, "threads": threads, "gantry": g, "llamacpp": l}
            results.append(row)
            gp, lp = med(g, "prefill_tokens_per_s"), med(l, "prefill_tokens_per_s")
            gd, ld = med(g, "decode_tokens_per_s"), med(l, "decode_tokens_per_s")
            gt, lt = med(g, "ttft_ms"), med(l, "ttft_ms")
            gr = med(g, "peak_rss_bytes")
            lr = med(l, "peak_rss_bytes") - med(l, "python_rss_bytes")
            row["summary"] = {
                "prefill": [gp, lp, gp / lp], "decode": [gd, ld, gd / ld], "ttft_ms": [gt, lt, gt / lt],
                "rss_mib": [gr / 2**20, lr / 2**20], "rss_over_file": [gr / size, lr / size],
            }
            print(f"{name} t={threads}: prefill {gp:.0f} vs {lp:.0f} tok/s ({gp/lp:.2f}x), decode {gd:.1f} vs {ld:.1f} tok/s "
                  f"({gd/ld:.2f}x), TTFT {gt:.0f} vs {lt:.0f} ms, peak RSS {gr/2**20:.0f} vs {lr/2**20:.0f} MiB", file=sys.stderr)

    print("| model | threads | prefill tok/s (Gantry / llama.cpp, ratio) | decode tok/s (ratio) | time to first token ms (ratio) | peak RSS MiB (Gantry / llama.cpp; × file) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        s = r["summary"]
        print(f"| {r['model']} | {r['threads']} | {s['prefill'][0]:.0f} / {s['prefill'][1]:.0f} ({s['prefill'][2]:.2f}×) "
              f"| {s['decode'][0]:.1f} / {s['decode'][1]:.1f} ({s['decode'][2]:.2f}×) "
              f"| {s['ttft_ms'][0]:.0f} / {s['ttft_ms'][1]:.0f} ({s['ttft_ms'][2]:.2f}×) "
              f"| {s['rss_mib'][0]:.0f} / {s['rss_mib'][1]:.0f} ({s['rss_over_file'][0]:.2f}× / {s['rss_over_file'][1]:.2f}×) |")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    meta = {"when": stamp, "machine": platform.platform(), "cpus": os.cpu_count(), "args": vars(args)}
    (ROOT / "bench/results" / f"engine-{stamp}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
