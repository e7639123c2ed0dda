#!/usr/bin/env python3
"""A real failover, end to end: a long request through a real `gantry controller` to one of two
real SmolLM2 workers; after --delivered tokens the worker serving it is killed (SIGKILL), and
the client's stream goes on from another. Measured at the client: the gap between the last
token before the kill and the first after (detection, routing, the resumed prefill), against
the time the delivered tokens took; and whether every token equals a run that nothing
interrupted.

Modes (--modes), each on a fresh controller and fresh workers: `plain` (`--standby-prefill 0`:
the new replica computes the prompt and every delivered token again, as one batched prefill),
`default` (the controller's defaults: every 256 delivered tokens the idle replica on the other
worker prefills them into its prefix cache, so the resume computes only the tokens since) and
`standby` (`--standby-prefill` --every). Each worker runs with
--threads (default 1: the two workers stand for two machines, a core each).

Prerequisites: `cargo build --release -p gantry-cli`, scripts/fetch-models.sh, scripts/setup.sh
(.venv-clients with grpcio). Run:
  .venv-clients/bin/python bench/failover.py
  .venv-clients/bin/python bench/failover.py --model models/gemma-3-270m-q4_k_m.gguf
Raw results go to bench/results/failover-<time>.json; a summary to stdout.
"""
import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "clients"))
sys.path.insert(0, str(ROOT / "bench"))

from gantry_worker import free_port, start_worker, stop_all  # noqa: E402

GANTRY = ROOT / "target/release/gantry"
WORDS = ("river stone lantern orchard harbor meadow copper window garden thunder silver candle "
         "market winter bridge feather valley compass morning shadow").split()


def prompt() -> str:
    """About 128 tokens, as bench/batching_vs_llama_server.py's resume prompt."""
    return "Note 4242. " + " ".join(WORDS[k % len(WORDS)] for k in range(95))


def reference(model: Path, threads: int, tokens: int) -> list:
    """The request's tokens from a worker of its own that nothing interrupts."""
    import grpc
    from gantry_stubs import worker
    pb, rpc = worker()
    proc, addr = start_worker("--threads", str(threads), "--model", f"m={model}")
    try:
        stub = rpc.WorkerStub(grpc.insecure_channel(addr))
        req = pb.GenerateRequest(model_id="m", prompt=prompt(),
                                 sampling=pb.SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
        return [ev.token.token_id for ev in stub.Generate(req, timeout=600)
                if ev.WhichOneof("event") == "token" and ev.token.HasField("token_id")]
    finally:
        stop_all([proc])


def run_mode(mode: str, args) -> dict:
    import grpc
    from gantry_stubs import controller, worker
    cpb, crpc = controller()
    wpb, wrpc = worker()
    state = tempfile.mkdtemp(prefix=f"gantry-failover-{mode}-")
    addr, http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    # `default`: the controller's own settings (an idle standby every 256 tokens).
    every = {"standby": args.every, "plain": 0}.get(mode)
    flags = [] if every is None else ["--standby-prefill", str(every)]
    ctl = subprocess.Popen([str(GANTRY), "controller", "--listen", addr, "--http", http, "--store",
                            f"{state}/state.redb", *flags],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [ctl]
    try:
        channel = grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", 64 << 20)])
        grpc.channel_ready_future(channel).result(timeout=30)
        workers = {}
        for i in range(2):
            w, waddr = start_worker("--controller", f"http://{addr}", "--worker-id", f"w{i}", "--gpus", "1x24GiB",
                                    "--threads", str(args.threads))
            procs.append(w)
            workers[f"w{i}"] = (w, wrpc.WorkerStub(grpc.insecure_channel(waddr)))
        deployments = crpc.DeploymentsStub(channel)
        inference = crpc.InferenceStub(channel)
        spec = cpb.DeploymentSpec(source=str(args.model), replicas=2, context_length=4096,
                                  placement=cpb.PlacementPolicy(strategy=cpb.PLACEMENT_STRATEGY_SPREAD))
        deployments.Apply(cpb.ApplyRequest(name="m", spec=spec))
        deadline = time.time() + 180
        while deployments.Get(cpb.GetDeploymentRequest(name="m")).status.ready_replicas < 2:
            if time.time() > deadline:
                raise SystemExit("the replicas did not get ready")
            time.sleep(0.2)
        # A warm-up request (another prompt) on each worker.
        for k in range(2):
            for _ in inference.Generate(cpb.InferenceRequest(model="m", prompt=f"Warm-up {k}.",
                                                             sampling=wpb.SamplingParams(max_tokens=4))):
                pass

        generated = {name: sum(m.tokens_generated for m in stub.Status(wpb.StatusRequest()).models)
                     for name, (_, stub) in workers.items()}
        total = args.delivered + args.after
        req = cpb.InferenceRequest(model="m", prompt=prompt(),
                                   sampling=wpb.SamplingParams(max_tokens=total, temperature=0, ignore_eos=True))
        ids, times, killed = [], [], None
        start = time.perf_counter()
        for ev in inference.Generate(req, timeout=600):
            if not (ev.HasField("token") and ev.token.HasField("token_id")):
                continue
            ids.append(ev.token.token_id)
            times.append(time.perf_counter())
            if len(ids) == 32 and killed is None:
                # The worker serving it: the one generating tokens (a standby prefill generates none).
                serving = [name for name, (_, stub) in workers.items()
                           if sum(m.tokens_generated for m in stub.Status(wpb.StatusRequest()).models) > generated[name]]
                if len(serving) != 1:
                    raise SystemExit(f"expected one worker serving the request, found {serving}")
                killed = serving[0]
            if len(ids) == args.delivered:
                workers[killed][0].send_signal(signal.SIGKILL)
        survivor = next(n for n in workers if n != killed)
        st = [m for m in workers[survivor][1].Status(wpb.StatusRequest()).models]
        gen_s = times[args.delivered - 1] - start
        gap_s = times[args.delivered] - times[args.delivered - 1]
        itl = sorted(b - a for a, b in zip(times[args.delivered - 100:args.delivered - 1],
                                            times[args.delivered - 99:args.delivered]))
        return {
            "mode": mode, "standby_prefill": "default" if every is None else every, "killed": killed, "tokens": len(ids), "ids": ids,
            "generation_of_delivered_s": gen_s, "resume_gap_s": gap_s, "ratio": gap_s / gen_s,
            "itl_median_before_s": itl[len(itl) // 2],
            "survivor_prefix_blocks_hit": sum(m.prefix_blocks_hit for m in st),
            "survivor_prefix_blocks_looked_up": sum(m.prefix_blocks_looked_up for m in st),
        }
    finally:
        stop_all(procs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--threads", type=int, default=1, help="threads per worker")
    ap.add_argument("--delivered", type=int, default=1000, help="tokens delivered before the kill")
    ap.add_argument("--after", type=int, default=24, help="tokens generated after it")
    ap.add_argument("--every", type=int, default=256, help="--standby-prefill for the standby mode")
    ap.add_argument("--modes", nargs="+", default=["plain", "default"], choices=["plain", "default", "standby"])
    args = ap.parse_args()
    if not GANTRY.exists():
        raise SystemExit("build it first: cargo build --release -p gantry-cli")
    ref = reference(args.model, args.threads, args.delivered + args.after)
    runs = []
    for mode in args.modes:
        r = run_mode(mode, args)
        r["tokens_equal"] = r.pop("ids") == ref
        runs.append(r)
        print(f"{mode}: resume gap {1000 * r['resume_gap_s']:.0f} ms after {r['generation_of_delivered_s']:.2f} s "
              f"of generation ({100 * r['ratio']:.1f}%), inter-token median before "
              f"{1000 * r['itl_median_before_s']:.1f} ms, tokens equal: {r['tokens_equal']}, survivor's prefix "
              f"blocks hit {r['survivor_prefix_blocks_hit']} of {r['survivor_prefix_blocks_looked_up']}", flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "bench" / "results" / f"failover-{stamp}.json"
    out.write_text(json.dumps({
        "when": stamp, "cpus": os.cpu_count(),
        "model": str(args.model.resolve().relative_to(ROOT)) if args.model.resolve().is_relative_to(ROOT) else args.model.name,
        "threads_per_worker": args.threads, "delivered": args.delivered, "runs": runs,
    }, indent=1))
    print(f"raw: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
