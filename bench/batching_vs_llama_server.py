#!/usr/bin/env python3
"""Concurrent serving side by side: a Gantry worker (continuous batching, paged KV cache,
prefix cache; gRPC through grpcio) and llama.cpp's own C++ `llama-server -np 16 -cb` (its
`/completion` endpoint, streamed), on the same GGUF file and thread count.

One server at a time (never both: they would share the cores). For each model and server:

  * levels: 1, 4, 16 and 32 concurrent streams (--levels), each a distinct ~128-token prompt
    (it starts with its own number, so no prompt cache helps) and --gen-tokens greedy tokens,
    end-of-sequence ignored. Reported: aggregate generated tokens/s over the wall time; the
    decode rate once every stream has its first token (to the last token, and — "all decoding"
    — to the first stream's last token, the window in which all of them decode); time to first
    token p50/p99 and inter-token gap p99 over all streams. Gantry's levels also record its
    decoding passes' own rate by batch size class (`passes_decode_tokens_per_s`, from the
    worker's Status), so what is lost between steps shows against "all decoding".
  * Gantry's scaling (--scaling-repeats, default 5): 1 and 16 streams alternated that many
    times more; the medians of their decode rates and their ratio (the host's neighbours move
    one level's run by ±10%, so one pair says little).
  * sampled levels (--sampled-levels, default 16): the same with temperature 0.8, top_p 0.95
    and a seed, what chat clients send, so the sampler's cost shows.
  * long prompt: 15 streams decoding, then a ~4,000-token prompt arrives; the 15 streams'
    inter-token gap p99 while it is prefilled (from its arrival to its first token), beside
    their p99 before it arrived.
  * Gantry only: prefix cache (time to first token of a request whose 1,024-token system prompt
    is cached, against the same request cold), failover resume (a request resumed after 1,000
    delivered tokens on a second, fresh worker — what the controller sends when a worker died —
    its time to the next token against the time the 1,000 took to generate, and whether the
    tokens after equal the first run's), and KV memory per stream (peak blocks in use with 16
    streams, from Status).

Prerequisites: `cargo build --release -p gantry-cli`, bench/peer/build-llamacpp.sh,
scripts/fetch-models.sh, scripts/setup.sh (.venv-clients with grpcio). Run:
  .venv-clients/bin/python bench/batching_vs_llama_server.py
  .venv-clients/bin/python bench/batching_vs_llama_server.py --models SmolLM2-135M-Instruct.Q4_1.gguf --levels 1 16
  .venv-clients/bin/python bench/batching_vs_llama_server.py --levels 1 16 --skip-extras --no-peer   # Gantry alone, A/B
Raw results go to bench/results/batching-<time>.json; the tables to stdout.
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
sys.path.insert(0, str(ROOT / "bench"))

from gantry_worker import free_port, pct, start_worker  # noqa: E402

# The sampled levels' settings: a chat client's usual ones.
SAMPLED = {"temperature": 0.8, "top_p": 0.95, "seed": 42}
MODELS = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]
LLAMA_SERVER = ROOT / "bench/peer/.llama.cpp/bin/llama-server"
WORDS = ("the history of printing is a story of many small steps long before movable type people pressed "
         "carved blocks of wood onto cloth and paper and scribes copied books by hand in quiet rooms when "
         "metal type arrived a shop could set a page print hundreds of copies break the page apart and use "
         "the letters again books grew cheaper ideas travelled faster and more people learned to read").split()


def text(i: int, words: int) -> str:
    body = " ".join(WORDS[k % len(WORDS)] for k in range(words))
    return f"Note {i}. {body}"


class Gantry:
    name = "gantry"

    def __init__(self, model: Path, threads: int, context: int):
        import grpc
        from gantry_stubs import worker

        self.pb, rpc = worker()
        self.proc, addr = start_worker("--threads", str(threads), "--context", str(context), "--parallel", "16",
                                       "--max-running", "64", "--model", f"m={model}")
        self.stub = rpc.WorkerStub(grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", 1 << 26)]))

    def stream(self, prompt: str, gen: int, resume=None, sampled=False):
        """Yields each token's id as it arrives."""
        extra = dict(temperature=SAMPLED["temperature"], top_p=SAMPLED["top_p"], seed=SAMPLED["seed"]) if sampled else {}
        req = self.pb.GenerateRequest(model_id="m", prompt=prompt,
                                      sampling=self.pb.SamplingParams(max_tokens=gen, ignore_eos=True, **extra),
                                      resume_tokens=resume or [])
        for ev in self.stub.Generate(req):
            if ev.WhichOneof("event") == "token" and ev.token.HasField("token_id"):
                yield ev.token.token_id

    def kv(self):
        st = self.stub.Status(self.pb.StatusRequest())
        m = st.models[0]
        return {"block_tokens": m.kv_block_tokens, "total": m.kv_blocks_total, "used": m.kv_blocks_used,
                "cached": m.kv_blocks_cached, "steps": m.batch_steps, "rows": m.batch_rows,
                "preemptions": m.preemptions}

    def passes(self):
        """The worker's own counters of its decoding passes, by batch size class (up to 1, 2, 4,
        … sequences): {batch: (tokens, seconds)}."""
        m = self.stub.Status(self.pb.StatusRequest()).models[0]
        return {p.batch: (p.decode_tokens, p.decode_seconds) for p in m.measurement.speed}

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class LlamaServer:
    name = "llama-server"

    def __init__(self, model: Path, threads: int, context: int):
        self.port = free_port()
        # -np 16 slots of `context` tokens each, continuous batching.
        self.proc = subprocess.Popen(
            [str(LLAMA_SERVER), "-m", str(model), "-t", str(threads), "-tb", str(threads), "-np", "16", "-cb",
             "-c", str(16 * context), "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 180
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1).status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                raise SystemExit("llama-server did not start")
            time.sleep(0.3)

    def stream(self, prompt: str, gen: int, resume=None, sampled=False):
        sampling = ({"temperature": SAMPLED["temperature"], "top_p": SAMPLED["top_p"], "seed": SAMPLED["seed"]}
                    if sampled else {"temperature": 0})
        body = json.dumps({"prompt": prompt, "n_predict": gen, "stream": True, "ignore_eos": True,
                           "cache_prompt": False, **sampling}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=1200) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    ev = json.loads(line[6:])
                    if not ev.get("stop") or ev.get("content"):
                        yield ev.get("tokens", [None])

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def timed(server, prompt: str, gen: int, out: dict, resume=None, sampled=False):
    """Streams one request, recording each token's arrival time in out["times"]."""
    out["start"] = time.perf_counter()
    out["times"], out["ids"] = [], []
    for tok in server.stream(prompt, gen, resume, sampled):
        out["times"].append(time.perf_counter())
        out["ids"].append(tok)


def level(server, n: int, gen: int, words: int, base: int, sampled=False) -> dict:
    before = server.passes() if isinstance(server, Gantry) else None
    outs = [dict() for _ in range(n)]
    threads = [threading.Thread(target=timed, args=(server, text(base + k, words), gen, outs[k], None, sampled))
               for k in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = max(o["times"][-1] for o in outs)
    counts = [len(o["times"]) for o in outs]
    if any(c != gen for c in counts):
        raise SystemExit(f"{server.name}: streams ended early: {counts} of {gen}")
    ttft = [o["times"][0] - start for o in outs]
    gaps = [b - a for o in outs for a, b in zip(o["times"], o["times"][1:])]
    # Aggregate decode rate: the tokens that arrived once every stream had its first token
    # (all decoding), over that window; tokens_per_s counts the prompts' time too.
    decoding = max(o["times"][0] for o in outs)
    late = sum(1 for o in outs for t in o["times"] if t > decoding)
    decode = late / (end - decoding) if end > decoding else float("nan")
    # The rate while all n streams decode: from the last stream's first token to the first
    # stream's last (the window above also holds the tail, where streams that started early have
    # finished and fewer than n decode).
    first_done = min(o["times"][-1] for o in outs)
    within = sum(1 for o in outs for t in o["times"] if decoding < t <= first_done)
    all_decoding = within / (first_done - decoding) if first_done > decoding else float("nan")
    extra = {}
    if before is not None:
        # The decoding passes' own rate in the worker, by batch size class, over this level:
        # against "all decoding", what is lost between steps (sampling, sending, handing in).
        after = server.passes()
        extra["passes_decode_tokens_per_s"] = {
            b: (t - before.get(b, (0, 0))[0]) / (sec - before.get(b, (0, 0))[1])
            for b, (t, sec) in after.items() if sec > before.get(b, (0, 0))[1]}
    return {**extra, "streams": n, "sampled": sampled, "tokens_per_s": sum(counts) / (end - start),
            "decode_tokens_per_s": decode, "all_decoding_tokens_per_s": all_decoding,
            "all_decoding_s": max(0.0, first_done - decoding),
            "ttft_p50_ms": 1000 * pct(ttft, 50), "ttft_p99_ms": 1000 * pct(ttft, 99),
            "itl_p99_ms": 1000 * pct(gaps, 99), "wall_s": end - start}


def long_prompt(server, gen: int, words: int, long_words: int, base: int) -> dict:
    outs = [dict() for _ in range(15)]
    threads = [threading.Thread(target=timed, args=(server, text(base + k, words), gen, outs[k])) for k in range(15)]
    for t in threads:
        t.start()
    # Let them get past their prompts, then send the long one.
    while min(len(o.get("times", [])) for o in outs) < 8:
        time.sleep(0.01)
    big = {}
    t_long = threading.Thread(target=timed, args=(server, text(base + 99, long_words), 4, big))
    t_long.start()
    t_long.join()
    for t in threads:
        t.join()
    arrive, first = big["start"], big["times"][0]
    during = [b - a for o in outs for a, b in zip(o["times"], o["times"][1:]) if b > arrive and a < first]
    before = [b - a for o in outs for a, b in zip(o["times"], o["times"][1:]) if b <= arrive]
    return {"long_prompt_ttft_ms": 1000 * (first - arrive), "itl_p99_during_ms": 1000 * pct(during, 99),
            "itl_p99_before_ms": 1000 * pct(before, 99), "gaps_during": len(during)}


def prefix_cache(server, gen: int) -> dict:
    system = text(7777, 760)  # ~1,024 tokens
    cold, warm = {}, {}
    timed(server, system + " Question: what is this about?", gen, cold)
    timed(server, system + " Question: who wrote it down?", gen, warm)
    c, w = cold["times"][0] - cold["start"], warm["times"][0] - warm["start"]
    return {"cold_ttft_ms": 1000 * c, "cached_ttft_ms": 1000 * w, "ratio": w / c}


def resume(server, fresh, words: int, delivered: int) -> dict:
    """Generates delivered+8 tokens on `server`, then asks `fresh()` — a new worker, whose prefix
    cache is empty, as the one a failed-over request goes to — to resume after the first
    `delivered`; its time to the next token against the time the delivered ones took."""
    first = {}
    prompt = text(4242, words)
    ids = []
    first["start"] = time.perf_counter()
    first["times"] = []
    for tok in server.stream(prompt, delivered + 8):
        ids.append(tok)
        first["times"].append(time.perf_counter())
    gen_s = first["times"][delivered - 1] - first["start"]
    again = {}
    other = fresh()
    try:
        timed(other, text(1, 8), 2, {})  # warm-up, another prompt
        timed(other, prompt, delivered + 8, again, resume=ids[:delivered])
    finally:
        other.stop()
    resume_s = again["times"][0] - again["start"]
    same = again["ids"] == ids[delivered:]
    return {"generation_of_delivered_s": gen_s, "resume_to_next_token_s": resume_s, "ratio": resume_s / gen_s,
            "tokens_equal": same}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--words", type=int, default=95, help="prompt words (~128 tokens)")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--long-words", type=int, default=3000, help="the long prompt's words (~4,000 tokens)")
    ap.add_argument("--context", type=int, default=4608, help="tokens per sequence (and per llama-server slot)")
    ap.add_argument("--sampled-levels", type=int, nargs="*", default=[16],
                    help=f"levels run again with sampling ({SAMPLED})")
    ap.add_argument("--skip-extras", action="store_true", help="only the levels")
    ap.add_argument("--no-peer", action="store_true", help="Gantry alone (no table; the raw file and the log)")
    ap.add_argument("--scaling-repeats", type=int, default=5,
                    help="Gantry: 1 and 16 streams alternated this many times more; medians (0: none)")
    args = ap.parse_args()

    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "args": vars(args),
               "models": {}}
    for name in args.models:
        model = ROOT / "models" / name
        per = {}
        makers = [lambda: Gantry(model, args.threads, args.context)]
        if not args.no_peer:
            makers.append(lambda: LlamaServer(model, args.threads, args.context))
        for make in makers:
            server = make()
            r = {"levels": []}
            try:
                level(server, 1, 8, args.words, 90_000)  # warm-up
                base = 0
                for n in args.levels:
                    r["levels"].append(level(server, n, args.gen_tokens, args.words, base))
                    base += n
                    print(f"{name} {server.name} {n} streams: {r['levels'][-1]}", file=sys.stderr)
                if isinstance(server, Gantry) and args.scaling_repeats > 0:
                    # 16 streams against one, alternated: the host's neighbours move a run by
                    # ±10%, so one pair of levels says little; the medians say more.
                    pairs = []
                    for _ in range(args.scaling_repeats):
                        one = level(server, 1, args.gen_tokens, args.words, base)
                        base += 1
                        many = level(server, 16, args.gen_tokens, args.words, base)
                        base += 16
                        pairs.append([one["decode_tokens_per_s"], many["decode_tokens_per_s"]])
                    m1, m16 = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
                    r["scaling"] = {"pairs_1_16": pairs, "median_1": m1, "median_16": m16, "ratio_of_medians": m16 / m1,
                                    "median_of_ratios": statistics.median(p[1] / p[0] for p in pairs)}
                    print(f"{name} gantry scaling: {r['scaling']}", file=sys.stderr)
                r["sampled_levels"] = []
                for n in args.sampled_levels:
                    r["sampled_levels"].append(level(server, n, args.gen_tokens, args.words, base, sampled=True))
                    base += n
                    print(f"{name} {server.name} {n} sampled streams: {r['sampled_levels'][-1]}", file=sys.stderr)
                if not args.skip_extras:
                    r["long_prompt"] = long_prompt(server, args.gen_tokens, args.words, args.long_words, 50_000)
                    print(f"{name} {server.name} long prompt: {r['long_prompt']}", file=sys.stderr)
                    if isinstance(server, Gantry):
                        r["prefix_cache"] = prefix_cache(server, 4)
                        r["resume"] = resume(server, lambda: Gantry(model, args.threads, args.context), args.words, 1000)
                        # KV in use with 16 streams of 128+128 tokens, from Status mid-run.
                        outs = [dict() for _ in range(16)]
                        ts = [threading.Thread(target=timed, args=(server, text(70_000 + k, args.words),
                                                                      args.gen_tokens, outs[k])) for k in range(16)]
                        for t in ts:
                            t.start()
                        peak = 0
                        while any(t.is_alive() for t in ts):
                            peak = max(peak, server.kv()["used"])
                            time.sleep(0.05)
                        for t in ts:
                            t.join()
                        r["kv_peak_blocks_16_streams"] = peak
                        r["kv"] = server.kv()
                        print(f"{name} gantry extras: {r['prefix_cache']} {r['resume']} kv peak {peak}", file=sys.stderr)
            finally:
                server.stop()
            per[server.name] = r
        results["models"][name] = per

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "bench" / "results" / f"batching-{stamp}.json"
    out.write_text(json.dumps(results, indent=1))
    if args.no_peer:
        print(f"raw: {out.relative_to(ROOT)}", file=sys.stderr)
        return
    print("| model | streams | tok/s Gantry / llama-server (ratio) | decode tok/s Gantry (× its 1 stream) / llama-server "
          "| all decoding tok/s Gantry (× its 1 stream) / llama-server "
          "| TTFT p50 ms | TTFT p99 ms | inter-token p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, per in results["models"].items():
        g, l = per["gantry"]["levels"], per["llama-server"]["levels"]
        one, one_all = g[0]["decode_tokens_per_s"], g[0]["all_decoding_tokens_per_s"]
        rows = list(zip(g, l)) + list(zip(per["gantry"]["sampled_levels"], per["llama-server"]["sampled_levels"]))
        for a, b in rows:
            label = f"{a['streams']} sampled" if a["sampled"] else f"{a['streams']}"
            print(f"| {name} | {label} | {a['tokens_per_s']:.1f} / {b['tokens_per_s']:.1f} "
                  f"({a['tokens_per_s'] / b['tokens_per_s']:.2f}×) "
                  f"| {a['decode_tokens_per_s']:.1f} ({a['decode_tokens_per_s'] / one:.2f}×) / {b['decode_tokens_per_s']:.1f} "
                  f"| {a['all_decoding_tokens_per_s']:.1f} ({a['all_decoding_tokens_per_s'] / one_all:.2f}×) "
                  f"/ {b['all_decoding_tokens_per_s']:.1f} "
                  f"| {a['ttft_p50_ms']:.0f} / {b['ttft_p50_ms']:.0f} "
                  f"| {a['ttft_p99_ms']:.0f} / {b['ttft_p99_ms']:.0f} | {a['itl_p99_ms']:.0f} / {b['itl_p99_ms']:.0f} |")
    for name, per in results["models"].items():
        sc = per["gantry"].get("scaling")
        if sc:
            print(f"\n{name}, Gantry, 1 and 16 streams alternated {len(sc['pairs_1_16'])} times: median decode "
                  f"{sc['median_1']:.1f} and {sc['median_16']:.1f} tok/s, **{sc['ratio_of_medians']:.2f}×** "
                  f"(median of the pairs' ratios {sc['median_of_ratios']:.2f}×; pairs: "
                  + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in sc["pairs_1_16"]) + ")")
    print(f"raw: {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
