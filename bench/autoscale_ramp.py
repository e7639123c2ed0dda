#!/usr/bin/env python3
"""Autoscaling under a load ramp: a real `gantry controller` and real SmolLM2 workers (release
build, one thread each, declared 1x24GiB GPUs), one autoscaled deployment (min 0), and a
Poisson load whose rate goes 0 -> peak -> 0. Everything is on loopback.

Phases:
  * cold start: the deployment starts at 0 replicas; one chat is sent. Reported: its time to
    first token, the replica's load time (the `Placed` -> `Loaded` events the controller
    records, i.e. the worker's load plus one link round trip), the same chat's warm time to
    first token (median of 3), and the control-plane overhead = cold TTFT - load - warm TTFT
    (goal: < 1 s). Then the deployment is left idle until it is back at zero.
  * ramp: arrivals at rate r(t) going linearly 0 -> --peak-rps over --ramp-s seconds, held for
    --hold-s, back to 0 over --ramp-s, then --tail-s of nothing (it scales back to zero).
    Every request is a chat of --max-tokens greedy tokens. Reported: requests sent, answered,
    lost (errors: must be 0), TTFT p50/p99 overall and for requests started while scaling up,
    replicas over time beside what the target asks for (ceil(in flight / target)), the
    autoscaler's decisions, and flaps (reversals of direction while the rate is steady: goal 0).

Prerequisites: `cargo build --release -p gantry-cli`, scripts/fetch-models.sh,
scripts/setup.sh (.venv-clients with grpcio). Run:
  .venv-clients/bin/python bench/autoscale_ramp.py
  .venv-clients/bin/python bench/autoscale_ramp.py --workers 3 --peak-rps 6 --target 1
Raw results go to bench/results/autoscale-<time>.json; the summary to stdout.
"""
import argparse
import datetime
import json
import math
import platform
import random
import statistics
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
QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.", "What is 12 times 12?",
    "Who wrote Hamlet?", "What is the boiling point of water?", "Give me a synonym for happy.",
    "What does a bee make?", "How many days are in a week?",
]


class Bench:
    def __init__(self, args):
        import grpc
        from gantry_stubs import controller, worker
        self.args = args
        self.cpb, self.crpc = controller()
        self.wpb, _ = worker()
        self.state = tempfile.mkdtemp(prefix="gantry-autoscale-")
        port = free_port()
        self.addr = f"127.0.0.1:{port}"
        self.controller = subprocess.Popen(
            [str(GANTRY), "controller", "--listen", self.addr, "--http", "off", "--store", f"{self.state}/state.redb",
             "--lease", "2", "--autoscale-interval", str(args.interval)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.channel = grpc.insecure_channel(self.addr)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.deployments = self.crpc.DeploymentsStub(self.channel)
        self.inference = self.crpc.InferenceStub(self.channel)
        self.cluster = self.crpc.ClusterStub(self.channel)
        self.workers = []
        for i in range(args.workers):
            proc, _ = start_worker("--controller", f"http://{self.addr}", "--worker-id", f"w{i + 1}",
                                   "--gpus", "1x24GiB", "--threads", "1")
            self.workers.append(proc)
        deadline = time.time() + 30
        while len([w for w in self.cluster.ListWorkers(self.cpb.ListWorkersRequest()).workers
                   if w.state == "ready"]) < args.workers:
            if time.time() > deadline:
                raise SystemExit("the workers did not register")
            time.sleep(0.1)

    def close(self):
        stop_all([*self.workers, self.controller])

    def deploy(self, model: Path):
        a = self.args
        policy = self.cpb.AutoscalingPolicy(
            min_replicas=0, max_replicas=a.workers, metric=self.cpb.AUTOSCALING_METRIC_IN_FLIGHT, target=a.target,
            scale_up_window_s=0, scale_down_delay_s=a.down_s, scale_to_zero_after_s=a.down_s)
        spec = self.cpb.DeploymentSpec(source=str(model), context_length=1024, replicas=0, autoscaling=policy,
                                       placement=self.cpb.PlacementPolicy(
                                           strategy=self.cpb.PLACEMENT_STRATEGY_SPREAD))
        self.deployments.Apply(self.cpb.ApplyRequest(name="ramp", spec=spec))

    def get(self):
        return self.deployments.Get(self.cpb.GetDeploymentRequest(name="ramp"))

    def chat(self, question: str):
        """(time to first token, seconds in all, error or None)."""
        req = self.cpb.ChatRequest(model="ramp", messages=[self.wpb.ChatMessage(role="user", content=question)],
                                   sampling=self.wpb.SamplingParams(max_tokens=self.args.max_tokens, temperature=0))
        start = time.perf_counter()
        first = None
        try:
            for ev in self.inference.Chat(req, timeout=600):
                if ev.HasField("token") and first is None:
                    first = time.perf_counter() - start
            return first, time.perf_counter() - start, None
        except Exception as e:  # noqa: BLE001 - a benchmark records every failure
            return first, time.perf_counter() - start, f"{getattr(e, 'code', lambda: '')()}: {getattr(e, 'details', lambda: str(e))()}"

    def wait_zero(self, timeout: float):
        deadline = time.time() + timeout
        while time.time() < deadline:
            d = self.get()
            if d.spec.replicas == 0 and len(d.status.replica_status) == 0:
                return True
            time.sleep(0.25)
        return False


def cold_start(b: Bench):
    q = QUESTIONS[0]
    cold_ttft, _, err = b.chat(q)
    if err:
        raise SystemExit(f"the cold chat failed: {err}")
    events = list(b.get().status.events)
    last = lambda kind: max((e.at_ms for e in events if e.kind == kind), default=0)  # noqa: E731
    load_s = (last("Loaded") - last("Placed")) / 1000
    warm = statistics.median(b.chat(q)[0] for _ in range(3))
    return {"cold_ttft_s": cold_ttft, "load_s": load_s, "warm_ttft_s": warm,
            "control_plane_overhead_s": cold_ttft - load_s - warm}


def ramp(b: Bench):
    a = b.args
    total = 2 * a.ramp_s + a.hold_s + a.tail_s

    def rate(t):
        if t < a.ramp_s:
            return a.peak_rps * t / a.ramp_s
        if t < a.ramp_s + a.hold_s:
            return a.peak_rps
        if t < 2 * a.ramp_s + a.hold_s:
            return a.peak_rps * (2 * a.ramp_s + a.hold_s - t) / a.ramp_s
        return 0.0

    rng = random.Random(7)
    results, lock, threads = [], threading.Lock(), []
    samples = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def sampler():
        while not stop.is_set():
            d = b.get()
            auto = d.status.autoscaler
            samples.append({"t": time.perf_counter() - t0, "replicas": d.spec.replicas,
                            "ready": d.status.ready_replicas, "in_flight": auto.in_flight,
                            "waiting": auto.waiting, "wants": math.ceil((auto.in_flight + auto.waiting) / a.target)})
            time.sleep(0.5)

    def one(i, at):
        ttft, took, err = b.chat(QUESTIONS[i % len(QUESTIONS)])
        with lock:
            results.append({"i": i, "at": at, "ttft": ttft, "took": took, "error": err})

    s = threading.Thread(target=sampler, daemon=True)
    s.start()
    # Poisson arrivals at rate(t), by thinning a process at the peak rate.
    t, i = 0.0, 0
    while True:
        t += rng.expovariate(a.peak_rps)
        if t >= total - a.tail_s:
            break
        if rng.random() * a.peak_rps > rate(t):
            continue
        delay = t - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)
        th = threading.Thread(target=one, args=(i, t), daemon=True)
        th.start()
        threads.append(th)
        i += 1
    for th in threads:
        th.join()
    left = total - (time.perf_counter() - t0)
    if left > 0:
        time.sleep(left)
    zero = b.wait_zero(a.down_s + 10)
    stop.set()
    s.join()
    events = [{"at_ms": e.at_ms, "message": e.message} for e in b.get().status.events if e.kind == "Autoscaled"]
    return results, samples, events, zero


def flaps(events, hold_start_ms, hold_end_ms):
    """Reversals of direction among decisions inside [hold_start, hold_end]."""
    dirs = []
    for e in events:
        if hold_start_ms <= e["at_ms"] <= hold_end_ms and "→" in e["message"]:
            frm, to = e["message"].split(": ")[-1].split(" replica(s)")[0].split(" → ")
            dirs.append(int(to) > int(frm))
    return sum(1 for x, y in zip(dirs, dirs[1:]) if x != y)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--target", type=float, default=1.0, help="requests in flight per replica")
    ap.add_argument("--peak-rps", type=float, default=4.0)
    ap.add_argument("--ramp-s", type=float, default=30)
    ap.add_argument("--hold-s", type=float, default=40)
    ap.add_argument("--tail-s", type=float, default=20)
    ap.add_argument("--down-s", type=int, default=10, help="scale-down delay and scale-to-zero period")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--interval", type=float, default=0.5, help="the controller's --autoscale-interval")
    args = ap.parse_args()
    model = ROOT / "models" / args.model
    if not GANTRY.is_file() or not model.is_file():
        raise SystemExit("needs target/release/gantry (cargo build --release -p gantry-cli) and models/ (scripts/fetch-models.sh)")
    b = Bench(args)
    try:
        b.deploy(model)
        cold = cold_start(b)
        if not b.wait_zero(args.down_s + 15):
            raise SystemExit("the deployment did not scale back to zero after the cold start")
        wall0 = time.time()
        results, samples, events, zero = ramp(b)
    finally:
        b.close()
    ok = [r for r in results if r["error"] is None]
    lost = [r for r in results if r["error"] is not None]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    up = [r["ttft"] for r in ok if r["ttft"] is not None and r["at"] < args.ramp_s]
    hold_start = int(wall0 * 1000 + (args.ramp_s + 5) * 1000)
    hold_end = int(wall0 * 1000 + (args.ramp_s + args.hold_s) * 1000)
    summary = {
        "cold_start": cold,
        "requests": len(results), "answered": len(ok), "lost": len(lost), "errors": [r["error"] for r in lost][:5],
        "ttft_p50_s": pct(ttfts, 50), "ttft_p99_s": pct(ttfts, 99), "ttft_p99_scaling_up_s": pct(up, 99),
        "max_replicas_seen": max((s["replicas"] for s in samples), default=0),
        "decisions": len(events), "flaps_while_steady": flaps(events, hold_start, hold_end),
        "reversals_overall": flaps(events, int(wall0 * 1000), 1 << 62),
        "back_to_zero": zero,
    }
    out = {"bench": "autoscale_ramp", "when": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "host": platform.node(), "cpus": len(__import__("os").sched_getaffinity(0)), "args": vars(args),
           "summary": summary, "samples": samples, "decisions": events, "requests": results}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = ROOT / "bench" / "results" / f"autoscale-{stamp}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))
    print("replicas over time (t s: replicas/ready, wants):")
    for s in samples[:: max(1, len(samples) // 40)]:
        print(f"  {s['t']:6.1f}: {s['replicas']}/{s['ready']}  wants {s['wants']}  in flight {s['in_flight']}  waiting {s['waiting']}")
    print("decisions:")
    for e in events:
        print(f"  {(e['at_ms'] / 1000 - wall0):7.1f} s  {e['message']}")
    print(f"raw: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
