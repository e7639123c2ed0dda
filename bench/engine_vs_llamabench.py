#!/usr/bin/env python3
"""Gantry's engine beside llama.cpp's own C++ `llama-bench`, in one run: same GGUF files, same
thread counts, a quiet machine and the same machine with busy processes on its cores.

For every model × thread count × load, it alternates fresh processes of
`gantry generate --json` (one untimed warm-up generation, then one timed: a prompt of exactly
--prompt-tokens ids, then --gen-tokens greedy tokens, EOS ignored) and `llama-bench -o json`
(pp<N> and tg<M>, one repetition per process), --repeat times each, and reports the medians:
prefill tokens/s (the whole prompt in one pass), decode tokens/s, and peak RSS of each process
(from wait4). Under load it also checks that Gantry's greedy tokens equal its quiet run's.

"busy": the benchmark starts --busy processes that spin forever (a Python busy loop each), one
per core by default, before the load's runs, and kills them after; they run at normal priority.

Prerequisites: `cargo build --release -p gantry-cli` (target/release/gantry),
bench/peer/build-llamacpp.sh (bench/peer/.llama.cpp/bin/llama-bench), scripts/fetch-models.sh.

  python3 bench/engine_vs_llamabench.py --repeat 5
  python3 bench/engine_vs_llamabench.py --models SmolLM2-135M-Instruct.Q4_1.gguf --threads 2 --loads quiet

Results (every run) go to bench/results/engine-cpp-<time>.json; the table to stdout.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]
GANTRY = ROOT / "target/release/gantry"
LLAMA_BENCH = ROOT / "bench/peer/.llama.cpp/bin/llama-bench"
TEXT = (
    "The history of the printing press is a story of many small steps. Long before movable type, "
    "people pressed carved blocks of wood onto cloth and paper, and scribes copied books by hand "
    "in quiet rooms. When metal type arrived, a shop could set a page, print hundreds of copies, "
    "break the page apart and use the letters again. Books grew cheaper, ideas travelled faster, "
    "and more people learned to read. "
)


def run_rss(cmd: list[str]) -> tuple[str, int]:
    """Runs `cmd`; returns its stdout and peak RSS in bytes, from wait4 on this very child."""
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(out_w, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(out_r)
        os.execv(cmd[0], cmd)
    os.close(out_w)
    chunks = []
    with os.fdopen(out_r, "rb") as f:
        while chunk := f.read(1 << 16):
            chunks.append(chunk)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed with {os.waitstatus_to_exitcode(status)}")
    return b"".join(chunks).decode(), usage.ru_maxrss * 1024


def prompt_ids(model: Path, n: int) -> list[int]:
    """`n` prompt ids from Gantry's tokenizer of the model (BOS first when the model adds one)."""
    out = json.loads(run_rss([str(GANTRY), "generate", "--model", str(model), "--prompt", TEXT * 8,
                          "--max-tokens", "1", "--json", "--threads", "1"])[0])
    ids = out["prompt_ids"]
    if len(ids) < n:
        sys.exit(f"the text gives {len(ids)} tokens, fewer than {n}")
    return ids[:n]


def gantry(model: Path, ids: list[int], threads: int, gen: int) -> dict:
    cmd = [str(GANTRY), "generate", "--model", str(model), "--prompt-ids", ",".join(map(str, ids)),
           "--max-tokens", str(gen), "--ignore-eos", "--threads", str(threads), "--warmup", "1", "--json"]
    out, rss = run_rss(cmd)
    o = json.loads(out)
    t = o["timings"]
    return {"prefill_tps": t["prefill_tokens_per_sec"], "decode_tps": t["decode_tokens_per_sec"],
            "peak_rss_bytes": rss, "tokens": o["tokens"]}


def llama_bench(model: Path, threads: int, prompt: int, gen: int) -> dict:
    cmd = [str(LLAMA_BENCH), "-m", str(model), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
           "-r", "1", "-o", "json"]
    out, rss = run_rss(cmd)
    rows = json.loads(out)
    pp = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == gen and r["n_prompt"] == 0)
    return {"prefill_tps": pp["avg_ts"], "decode_tps": tg["avg_ts"], "peak_rss_bytes": rss,
            "build_commit": pp.get("build_commit"), "cpu_info": pp.get("cpu_info")}


class Busy:
    """`n` processes spinning on the CPU while the block runs."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--loads", nargs="+", default=["quiet", "busy"], choices=["quiet", "busy"])
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes under load")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    args = ap.parse_args()
    for exe in (GANTRY, LLAMA_BENCH):
        if not exe.exists():
            sys.exit(f"{exe.relative_to(ROOT)} is missing: see this script's docstring")

    results = []
    for name in args.models:
        model = ROOT / "models" / name
        ids = prompt_ids(model, args.prompt_tokens)
        quiet_tokens = {}
        for threads in args.threads:
            for load in args.loads:
                g_runs, l_runs = [], []
                with Busy(args.busy if load == "busy" else 0):
                    for _ in range(args.repeat):
                        g_runs.append(gantry(model, ids, threads, args.gen_tokens))
                        l_runs.append(llama_bench(model, threads, args.prompt_tokens, args.gen_tokens))
                tokens = g_runs[0]["tokens"]
                same = all(r["tokens"] == tokens for r in g_runs)
                if load == "quiet":
                    quiet_tokens[threads] = tokens
                elif threads in quiet_tokens:
                    same = same and tokens == quiet_tokens[threads]
                row = {"model": name, "threads": threads, "load": load, "busy_processes": args.busy if load == "busy" else 0,
                       "tokens_same_as_quiet": same, "gantry": g_runs, "llama_bench": l_runs}
                for who, runs in (("gantry", g_runs), ("llama_bench", l_runs)):
                    for key in ("prefill_tps", "decode_tps", "peak_rss_bytes"):
                        row[f"{who}_{key}"] = median(runs, key)
                results.append(row)
                print(f"{name} t={threads} {load}: prefill {row['gantry_prefill_tps']:.0f} vs {row['llama_bench_prefill_tps']:.0f}, "
                      f"decode {row['gantry_decode_tps']:.1f} vs {row['llama_bench_decode_tps']:.1f} tok/s "
                      f"(tokens same as quiet: {same})", file=sys.stderr, flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = ROOT / "bench/results" / f"engine-cpp-{stamp}.json"
    for r in results:
        for run_ in r["gantry"]:
            run_["tokens"] = run_["tokens"][:16]
    meta = {"commit": rev, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "repeat": args.repeat,
            "llama_cpp": "llama-cpp-python 0.3.36 sdist's vendored llama.cpp, bench/peer/build-llamacpp.sh"}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"| model | threads | load | prefill Gantry | prefill llama-bench | ratio | decode Gantry | decode llama-bench | ratio | "
          f"decode vs own quiet | peak RSS Gantry MiB | peak RSS llama-bench MiB | tokens as quiet |")
    print("|" + "---|" * 13)
    quiet = {(r["model"], r["threads"]): r for r in results if r["load"] == "quiet"}
    for r in results:
        q = quiet.get((r["model"], r["threads"]))
        own = f"{r['gantry_decode_tps'] / q['gantry_decode_tps']:.2f}" if q else "—"
        print(f"| {r['model'].removesuffix('.gguf')} | {r['threads']} | {r['load']} | {r['gantry_prefill_tps']:.0f} | "
              f"{r['llama_bench_prefill_tps']:.0f} | {r['gantry_prefill_tps'] / r['llama_bench_prefill_tps']:.2f} | "
              f"{r['gantry_decode_tps']:.1f} | {r['llama_bench_decode_tps']:.1f} | "
              f"{r['gantry_decode_tps'] / r['llama_bench_decode_tps']:.2f} | {own} | "
              f"{r['gantry_peak_rss_bytes'] / 2**20:.0f} | {r['llama_bench_peak_rss_bytes'] / 2**20:.0f} | "
              f"{'yes' if r['tokens_same_as_quiet'] else 'NO'} |")
    print(f"\nraw: {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
