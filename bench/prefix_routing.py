#!/usr/bin/env python3
"""Routing by prefix against power of two choices, side by side in one run: a multi-tenant
workload on a real `gantry controller` and real SmolLM2 workers.

For each routing mode (`--routing p2c`, then `--routing prefix`; --rounds repeats the pair), a
fresh controller and --workers fresh workers (release build, declared 1x24GiB GPU, --threads 1,
--parallel P: each KV cache holds P x 2,048 tokens), one deployment of one replica per worker
(spread). --tenants tenants each have their own ~1,024-token system prompt; --requests chats
arrive as a Poisson process at --rate requests/s, each from a tenant drawn at random (the same
seeded draws in every mode), with its own short question, and generate --max-tokens greedy
tokens. Reported per mode: time to first token p50/p90/p99, throughput (requests and generated
tokens per second over the wall time, first arrival to last answer: at a rate past what a
mode can serve, its queue grows and the last answer comes late), and the workers' prefix
cache: full prompt blocks found cached over those looked up. For `prefix`, the router's wait for
the prompt's token ids (`gantry_routing_tokenize_seconds`) and its decisions
(`gantry_routing_decisions_total`) from the controller's /metrics.

The pool size is the point: the tenants' system prompts together (8 x 64 blocks) exceed one
worker's KV cache (P=3: 384 blocks) but fit across the workers, as when a fleet serves more
tenants than one replica can keep warm. Power of two choices sends every tenant everywhere, so
each worker cycles all the prompts through its cache; routing by prefix keeps each tenant on
the worker that holds its prompt.

Goal (issue #18): prefix TTFT p90 >= 3x better than p2c, throughput >= 1.3x.

Prerequisites: `cargo build --release -p gantry-cli`, scripts/fetch-models.sh, scripts/setup.sh
(.venv-clients with grpcio). Run:
  .venv-clients/bin/python bench/prefix_routing.py
  .venv-clients/bin/python bench/prefix_routing.py --requests 60 --rates 0.5
Raw results go to bench/results/prefix-routing-<time>.json; the table to stdout.
"""
import argparse
import datetime
import json
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "clients"))
sys.path.insert(0, str(ROOT / "bench"))

from gantry_worker import free_port, pct, start_worker, stop_all  # noqa: E402

GANTRY = ROOT / "target/release/gantry"
MODEL = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = ("ships harbours tides cargo sailors maps lighthouses storms anchors rope canvas compasses stars "
          "gardens roots seeds rain soil bees orchards pruning frost harvest ledgers invoices taxes audits "
          "budgets clocks gears springs bells towers rivers bridges mills engines rails tunnels").split()


def system_prompt(tenant: int) -> str:
    """About 1,024 tokens of instructions, different from the first words for each tenant."""
    rng = random.Random(1000 + tenant)
    words = [TOPICS[rng.randrange(len(TOPICS))] for _ in range(880)]
    return f"You are assistant number {tenant} of company {tenant * 7919}. Your notes: " + " ".join(words)


def metric_lines(http: str, prefix: str) -> list[str]:
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=10) as r:
        return [l for l in r.read().decode().splitlines() if l.startswith(prefix)]


def run_mode(mode: str, args, schedule) -> dict:
    import grpc
    from gantry_stubs import controller, worker
    cpb, crpc = controller()
    wpb, wrpc = worker()
    state = tempfile.mkdtemp(prefix=f"gantry-routing-{mode}-")
    addr, http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    ctl = subprocess.Popen([str(GANTRY), "controller", "--listen", addr, "--http", http, "--store",
                            f"{state}/state.redb", "--routing", mode],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [ctl]
    try:
        channel = grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", 64 << 20)])
        grpc.channel_ready_future(channel).result(timeout=30)
        workers = []
        for i in range(args.workers):
            w, waddr = start_worker("--controller", f"http://{addr}", "--worker-id", f"w{i}", "--gpus", "1x24GiB",
                                    "--threads", "1", "--parallel", str(args.parallel))
            procs.append(w)
            workers.append(wrpc.WorkerStub(grpc.insecure_channel(waddr)))
        deployments = crpc.DeploymentsStub(channel)
        inference = crpc.InferenceStub(channel)
        spec = cpb.DeploymentSpec(source=str(MODEL), replicas=args.workers, context_length=2048,
                                  placement=cpb.PlacementPolicy(strategy=cpb.PLACEMENT_STRATEGY_SPREAD))
        deployments.Apply(cpb.ApplyRequest(name="chat", spec=spec))
        deadline = time.time() + 180
        while deployments.Get(cpb.GetDeploymentRequest(name="chat")).status.ready_replicas < args.workers:
            if time.time() > deadline:
                raise SystemExit("the replicas did not get ready")
            time.sleep(0.2)

        def chat(tenant, i, out):
            req = cpb.ChatRequest(model="chat", messages=[
                wpb.ChatMessage(role="system", content=system_prompt(tenant)),
                wpb.ChatMessage(role="user", content=f"Question {i}: what is note {i % 97} about?")],
                sampling=wpb.SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True))
            start, first, n = time.perf_counter(), None, 0
            try:
                for ev in inference.Chat(req, timeout=600):
                    if ev.HasField("token"):
                        n += 1
                        if first is None:
                            first = time.perf_counter() - start
                out.append((first, n, time.perf_counter(), None))
            except grpc.RpcError as e:
                out.append((first, n, time.perf_counter(), e.code().name))

        results, threads = [], []
        began = time.perf_counter()
        for at, tenant, i in schedule:
            time.sleep(max(0.0, began + at - time.perf_counter()))
            th = threading.Thread(target=chat, args=(tenant, i, results))
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
        wall = max(r[2] for r in results) - began
        ok = [r for r in results if r[3] is None and r[0] is not None]
        ttft = [r[0] for r in ok]
        looked = hit = 0
        per_worker = []
        for w in workers:
            for m in w.Status(wpb.StatusRequest()).models:
                looked += m.prefix_blocks_looked_up
                hit += m.prefix_blocks_hit
                per_worker.append(m.tokens_generated // max(1, args.max_tokens))
        out = {
            "requests": len(results), "errors": sorted({r[3] for r in results if r[3]}),
            "failed": len(results) - len(ok), "wall_s": wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r[1] for r in ok) / wall,
            "prefix_blocks_looked_up": looked, "prefix_blocks_hit": hit,
            "prefix_hit_ratio": hit / looked if looked else 0.0,
            "requests_per_worker": per_worker,
        }
        out["routing_metrics"] = metric_lines(http, "gantry_routing_")
        return out
    finally:
        stop_all(procs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=3, help="each worker's KV cache: P x 2,048 tokens")
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rates", type=float, nargs="+", default=[1.0, 3.0],
                    help="arrivals per second (Poisson): each rate is a run of both modes (the first within "
                         "p2c's capacity, for time to first token; the next past it, for throughput)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1, help="p2c then prefix, this many times")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    runs = []
    for rate in args.rates:
        # The same draws at every rate: arrival gaps scale, tenants and questions stay.
        rng = random.Random(args.seed)
        schedule, t = [], 0.0
        for i in range(args.requests):
            t += rng.expovariate(rate)
            schedule.append((t, rng.randrange(args.tenants), i))
        for r in range(args.rounds):
            for mode in ["p2c", "prefix"]:
                res = run_mode(mode, args, schedule)
                res.update(mode=mode, round=r, rate=rate)
                runs.append(res)
                print(f"{rate:.1f}/s {mode:>6} (round {r}): TTFT p50 {res['ttft_p50_s'] * 1000:7.0f} ms"
                      f"  p90 {res['ttft_p90_s'] * 1000:7.0f} ms  p99 {res['ttft_p99_s'] * 1000:7.0f} ms"
                      f" | {res['requests_per_s']:.3f} req/s {res['tokens_per_s']:.1f} tok/s"
                      f" | prefix cache hit {res['prefix_hit_ratio'] * 100:.1f}% | per worker {res['requests_per_worker']}"
                      f" | failed {res['failed']} {res['errors']}", flush=True)
                for line in res["routing_metrics"]:
                    if "decisions" in line or "tokenize_seconds_sum" in line or "tokenize_seconds_count" in line:
                        print(f"         {line}")
    for rate in args.rates:
        p2c = [x for x in runs if x["mode"] == "p2c" and x["rate"] == rate]
        pre = [x for x in runs if x["mode"] == "prefix" and x["rate"] == rate]
        for a, b in zip(p2c, pre):
            print(f"{rate:.1f}/s round {a['round']}: TTFT p90 p2c/prefix = {a['ttft_p90_s'] / b['ttft_p90_s']:.2f}x (goal >= 3), "
                  f"p50 {a['ttft_p50_s'] / b['ttft_p50_s']:.2f}x; throughput prefix/p2c = "
                  f"{b['tokens_per_s'] / a['tokens_per_s']:.2f}x tokens, {b['requests_per_s'] / a['requests_per_s']:.2f}x requests (goal >= 1.3)")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "bench/results" / f"prefix-routing-{stamp}.json"
    out.write_text(json.dumps({"bench": "prefix_routing", "when": stamp, "machine": platform.platform(),
                               "args": vars(args), "runs": runs}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
