#!/usr/bin/env python3
"""Tenants kept apart: a light tenant's time to first token while another floods the same replica.

A real `gantry controller` with API keys and one real SmolLM2 worker (release build, declared
1x24GiB GPU, --threads 2), one deployment of one replica. Two tenants send Poisson arrivals of
greedy chats (--max-tokens tokens each): the light one at --rate requests/s, the heavy one at
10x that. Three phases of --phase-s seconds each:
  * alone:     the light tenant only (its unloaded TTFT);
  * unlimited: the heavy tenant floods with a key without limits;
  * limited:   the heavy tenant floods with a key limited to --heavy-streams streams at once
               (`KEY user NAME streams=N`): its extra requests are refused (RESOURCE_EXHAUSTED,
               retry-after) before they reach the worker's queue.
Reported per phase: the light tenant's TTFT p50/p99 and errors, the heavy tenant's requests
answered and refused. Goal: limited light p99 <= 2x alone p99.

Prerequisites: `cargo build --release -p gantry-cli`, scripts/fetch-models.sh, scripts/setup.sh
(.venv-clients with grpcio). Run:
  .venv-clients/bin/python bench/tenants.py
Raw results go to bench/results/tenants-<time>.json; the summary to stdout.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "clients"))
sys.path.insert(0, str(ROOT / "bench"))

from gantry_worker import free_port, pct, start_worker, stop_all  # noqa: E402

GANTRY = ROOT / "target/release/gantry"
KEYS = {
    "light": "k-light-0123456789abcdef",
    "heavy-unlimited": "k-heavy-u-0123456789abcd",
    "heavy-limited": "k-heavy-l-0123456789abcd",
}
QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
             "Who wrote Hamlet?", "What does a bee make?", "How many days are in a week?"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=0.5, help="the light tenant's requests per second")
    ap.add_argument("--phase-s", type=float, default=40)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--heavy-streams", type=int, default=2)
    args = ap.parse_args()
    import grpc
    from gantry_stubs import controller, worker
    cpb, crpc = controller()
    wpb, _ = worker()
    state = tempfile.mkdtemp(prefix="gantry-tenants-")
    keys = Path(state) / "keys"
    keys.write_text(
        f"{KEYS['light']} user light\n{KEYS['heavy-unlimited']} user heavy-unlimited\n"
        f"{KEYS['heavy-limited']} user heavy-limited streams={args.heavy_streams}\n"
        f"k-admin-0123456789abcdef admin ops\nk-worker-0123456789abcde worker workers\n")
    addr = f"127.0.0.1:{free_port()}"
    ctl = subprocess.Popen([str(GANTRY), "controller", "--listen", addr, "--http", "off", "--store",
                            f"{state}/state.redb", "--api-keys", str(keys)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [ctl]
    try:
        channel = grpc.insecure_channel(addr)
        grpc.channel_ready_future(channel).result(timeout=30)
        admin = [("authorization", "Bearer k-admin-0123456789abcdef")]
        w, _ = start_worker("--controller", f"http://{addr}", "--worker-id", "w1", "--gpus", "1x24GiB",
                            "--threads", "2", "--api-key", "k-worker-0123456789abcde")
        procs.append(w)
        deployments = crpc.DeploymentsStub(channel)
        inference = crpc.InferenceStub(channel)
        spec = cpb.DeploymentSpec(source=str(ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"), replicas=1,
                                  context_length=1024)
        deployments.Apply(cpb.ApplyRequest(name="chat", spec=spec), metadata=admin)
        deadline = time.time() + 120
        while deployments.Get(cpb.GetDeploymentRequest(name="chat"), metadata=admin).status.ready_replicas < 1:
            if time.time() > deadline:
                raise SystemExit("the replica did not get ready")
            time.sleep(0.2)

        def chat(key, i):
            req = cpb.ChatRequest(model="chat", messages=[wpb.ChatMessage(role="user", content=QUESTIONS[i % len(QUESTIONS)])],
                                  sampling=wpb.SamplingParams(max_tokens=args.max_tokens, temperature=0))
            start, first = time.perf_counter(), None
            try:
                for ev in inference.Chat(req, metadata=[("authorization", f"Bearer {KEYS[key]}")], timeout=300):
                    if ev.HasField("token") and first is None:
                        first = time.perf_counter() - start
                return first, None
            except grpc.RpcError as e:
                return first, e.code().name

        def tenant(key, rate, until, out, rng):
            threads, i = [], 0
            t = time.time()
            while True:
                t += rng.expovariate(rate)
                if t > until:
                    break
                time.sleep(max(0.0, t - time.time()))
                th = threading.Thread(target=lambda i=i: out.append(chat(key, i)))
                th.start()
                threads.append(th)
                i += 1
            for th in threads:
                th.join()

        chat("light", 0)  # warm
        phases = {}
        for phase, heavy in [("alone", None), ("unlimited", "heavy-unlimited"), ("limited", "heavy-limited")]:
            light, hv = [], []
            until = time.time() + args.phase_s
            runners = [threading.Thread(target=tenant, args=("light", args.rate, until, light, random.Random(1)))]
            if heavy:
                runners.append(threading.Thread(target=tenant, args=(heavy, 10 * args.rate, until, hv, random.Random(2))))
            for r in runners:
                r.start()
            for r in runners:
                r.join()
            ttft = [f for f, e in light if e is None and f is not None]
            phases[phase] = {
                "light_requests": len(light), "light_errors": sum(1 for _, e in light if e),
                "light_ttft_p50_s": pct(ttft, 50), "light_ttft_p99_s": pct(ttft, 99),
                "heavy_requests": len(hv), "heavy_answered": sum(1 for _, e in hv if e is None),
                "heavy_refused": sum(1 for _, e in hv if e == "RESOURCE_EXHAUSTED"),
                "heavy_other_errors": sum(1 for _, e in hv if e not in (None, "RESOURCE_EXHAUSTED")),
            }
            p = phases[phase]
            print(f"{phase:>9}: light TTFT p50 {p['light_ttft_p50_s'] * 1000:.0f} ms, p99 {p['light_ttft_p99_s'] * 1000:.0f} ms "
                  f"({p['light_requests']} requests, {p['light_errors']} errors); heavy {p['heavy_requests']} sent, "
                  f"{p['heavy_answered']} answered, {p['heavy_refused']} refused", flush=True)
            time.sleep(3)
        ratio = phases["limited"]["light_ttft_p99_s"] / phases["alone"]["light_ttft_p99_s"]
        print(f"limited light p99 / alone p99 = {ratio:.2f} (goal <= 2); unlimited: "
              f"{phases['unlimited']['light_ttft_p99_s'] / phases['alone']['light_ttft_p99_s']:.2f}")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = ROOT / "bench/results" / f"tenants-{stamp}.json"
        out.write_text(json.dumps({
            "bench": "tenants", "when": stamp, "machine": platform.platform(), "args": vars(args),
            "phases": phases, "limited_over_alone_p99": ratio,
        }, indent=2))
        print(f"wrote {out.relative_to(ROOT)}")
    finally:
        stop_all(procs)


if __name__ == "__main__":
    main()
