#!/usr/bin/env python3
"""Serving side by side: a Gantry worker (gRPC, called with grpcio) and llama.cpp's server
(llama-cpp-python's OpenAI-compatible server, streamed completions over HTTP), on the same GGUF
file and thread count, as clients see them.

For each repeat it starts one server at a time (never both: they would share the 2 cores),
alternating Gantry and llama.cpp, and runs:
  * single: one stream at a time, --requests times: a prompt of the fixed English text, then
    --gen-tokens greedy tokens (end-of-sequence ignored by Gantry, banned by logit bias for
    llama.cpp). Time to first token as the client sees it, decode tokens/s after the first.
  * concurrent: --clients streams started together; aggregate tokens/s over the wall time and
    the mean time to first token. (llama.cpp's Python server runs one request at a time;
    Gantry runs up to --clients at once, each with its own KV cache, taking turns at each
    forward pass; neither batches.) Every stream's token count is recorded and checked.
Each request starts with a different number, so neither server can reuse a cached prompt.

Prerequisites: `cargo build --release -p gantry-cli`, scripts/goldens/install-peer.sh (the peer
and its server extras in .venv-peer), scripts/fetch-models.sh. Run with the peer's Python:
  .venv-peer/bin/python bench/worker_vs_llamacpp_server.py --repeat 3
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
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "clients"))
sys.path.insert(0, str(ROOT / "bench" / "peer"))

from gantry_worker import free_port, start_worker  # noqa: E402
from llamacpp_bench import PROMPT_TEXT  # noqa: E402

MODELS = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]


def prompt(i: int, words: int) -> str:
    return f"Note {i}. " + " ".join(PROMPT_TEXT.split()[:words])


class Gantry:
    name = "gantry"

    def __init__(self, model: Path, threads: int, parallel: int):
        import grpc
        from gantry_stubs import worker

        self.pb, rpc = worker()
        self.proc, addr = start_worker("--threads", str(threads), "--parallel", str(parallel), "--model", f"m={model}")
        self.stub = rpc.WorkerStub(grpc.insecure_channel(addr))

    def stream(self, text: str, gen: int):
        req = self.pb.GenerateRequest(
            model_id="m", prompt=text, sampling=self.pb.SamplingParams(max_tokens=gen, ignore_eos=True))
        for ev in self.stub.Generate(req):
            if ev.WhichOneof("event") == "token" and ev.token.HasField("token_id"):
                yield

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class LlamaCppServer:
    name = "llama.cpp"

    def __init__(self, model: Path, threads: int, eos: list[int]):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_threads", str(threads),
             "--n_threads_batch", str(threads), "--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(self.port),
             # Queue concurrent requests instead of cutting the running one off (its default).
             "--interrupt_requests", "False"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.bias = {str(e): -100.0 for e in eos}
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=1).read()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise SystemExit("llama.cpp's server did not start")
                time.sleep(0.2)

    def stream(self, text: str, gen: int):
        body = json.dumps({"prompt": text, "max_tokens": gen, "temperature": 0, "stream": True,
                           "logit_bias": self.bias}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    # The last chunk only carries the finish reason.
                    if json.loads(line[6:])["choices"][0].get("finish_reason") is None:
                        yield

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def timed_stream(server, text: str, gen: int, start: float) -> dict:
    first = last = None
    n = 0
    for _ in server.stream(text, gen):
        now = time.perf_counter()
        first = first or now
        last = now
        n += 1
    return {"tokens": n, "ttft_s": first - start, "decode_tokens_per_s": (n - 1) / (last - first) if n > 1 else 0.0,
            "end": last}


def single(server, requests: int, words: int, gen: int, base: int) -> list[dict]:
    runs = []
    for i in range(requests):
        runs.append(timed_stream(server, prompt(base + i, words), gen, time.perf_counter()))
        if runs[-1]["tokens"] != gen:
            raise SystemExit(f"{server.name}: a stream ended after {runs[-1]['tokens']} of {gen} tokens")
    return runs


def concurrent(server, clients: int, words: int, gen: int, base: int) -> dict:
    results = [None] * clients
    start = time.perf_counter()

    def go(k):
        results[k] = timed_stream(server, prompt(base + k, words), gen, start)

    threads = [threading.Thread(target=go, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - start
    if any(r["tokens"] != gen for r in results):
        raise SystemExit(f"{server.name}: streams ended early: {[r['tokens'] for r in results]} of {gen} tokens")
    return {"aggregate_tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "mean_ttft_s": statistics.mean(r["ttft_s"] for r in results), "wall_s": wall,
            "tokens": [r["tokens"] for r in results]}


def eos_ids(model: Path) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    return sorted({llm.token_eos()} | ({llm.token_eot()} if hasattr(llm, "token_eot") else set()) - {-1})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--requests", type=int, default=3, help="sequential requests per repeat")
    ap.add_argument("--clients", type=int, default=4, help="concurrent streams")
    ap.add_argument("--words", type=int, default=90, help="prompt length in words (~128 tokens)")
    ap.add_argument("--gen-tokens", type=int, default=64)
    args = ap.parse_args()

    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "args": vars(args), "models": {}}
    for name in args.models:
        model = ROOT / "models" / name
        eos = eos_ids(model)
        per = {"gantry": {"single": [], "concurrent": []}, "llama.cpp": {"single": [], "concurrent": []}}
        base = 0
        for r in range(args.repeat):
            for make in (lambda: Gantry(model, args.threads, args.clients), lambda: LlamaCppServer(model, args.threads, eos)):
                server = make()
                try:
                    timed_stream(server, prompt(10_000 + base, args.words), 4, time.perf_counter())  # warm-up
                    per[server.name]["single"] += single(server, args.requests, args.words, args.gen_tokens, base)
                    base += args.requests
                    per[server.name]["concurrent"].append(
                        concurrent(server, args.clients, args.words, args.gen_tokens, base))
                    base += args.clients
                finally:
                    server.stop()
                print(f"{name} repeat {r + 1}/{args.repeat}: {server.name} done", file=sys.stderr)
        summary = {}
        for who, d in per.items():
            summary[who] = {
                "ttft_ms": 1000 * statistics.median(x["ttft_s"] for x in d["single"]),
                "decode_tokens_per_s": statistics.median(x["decode_tokens_per_s"] for x in d["single"]),
                "concurrent_tokens_per_s": statistics.median(x["aggregate_tokens_per_s"] for x in d["concurrent"]),
                "concurrent_ttft_ms": 1000 * statistics.median(x["mean_ttft_s"] for x in d["concurrent"]),
            }
        results["models"][name] = {"runs": per, "median": summary}

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "bench" / "results" / f"worker-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"| model | threads | TTFT ms (Gantry / llama.cpp) | decode tok/s (ratio) | {args.clients} streams: tok/s (ratio) | {args.clients} streams: mean TTFT ms |")
    print("|---|---|---|---|---|---|")
    for name, m in results["models"].items():
        g, l = m["median"]["gantry"], m["median"]["llama.cpp"]
        print(f"| {name} | {args.threads} | {g['ttft_ms']:.0f} / {l['ttft_ms']:.0f} "
              f"| {g['decode_tokens_per_s']:.1f} / {l['decode_tokens_per_s']:.1f} ({g['decode_tokens_per_s'] / l['decode_tokens_per_s']:.2f}×) "
              f"| {g['concurrent_tokens_per_s']:.1f} / {l['concurrent_tokens_per_s']:.1f} ({g['concurrent_tokens_per_s'] / l['concurrent_tokens_per_s']:.2f}×) "
              f"| {g['concurrent_ttft_ms']:.0f} / {l['concurrent_ttft_ms']:.0f} |")
    print(f"raw runs: {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
