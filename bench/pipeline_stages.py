#!/usr/bin/env python3
"""What a pipeline stage costs: SmolLM2 served whole by one Gantry worker, then split into 2
and 3 stages over as many worker processes on this machine (hidden states streamed between
them over gRPC on loopback), and llama.cpp's server on the same file as the peer, in one run.

A fourth configuration puts 2 stages in one worker process as two segments (the layout for
the GPUs of one node), where hidden states pass in memory.

For each configuration (one at a time, never two together: they would share the 2 cores) it
runs --requests streams one after the other: a prompt of ~128 tokens of fixed English text,
then --gen-tokens greedy tokens with end-of-sequence ignored. It reports the time to first
token as the client sees it, decode tokens/s after the first, the cost of each extra stage hop
per generated token ((1/tok_s at k stages - 1/tok_s at 1 stage) / (k - 1)), and each worker's
resident memory after loading (a stage holds only its own layers' weights).

Each configuration runs twice: every worker with all --threads (a sequence runs on one stage
at a time, but on one machine the idle stages' thread pools still wake and spin on the same
cores), and every worker with one thread (no two compute threads ever share a core, which
isolates what the hop itself costs). The split configurations must produce exactly the tokens
of the whole model (checked on every request).

Prerequisites as bench/worker_vs_llamacpp_server.py (a release build, .venv-peer with the peer
and grpcio-tools, the models). Run:
  .venv-peer/bin/python bench/pipeline_stages.py --repeat 3
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts" / "clients"))

from gantry_worker import start_worker  # noqa: E402
from worker_vs_llamacpp_server import LlamaCppServer, eos_ids, prompt, timed_stream  # noqa: E402

MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYERS = 30


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class GantryStages:
    """`stages` worker processes, the model's layers split evenly over them."""

    def __init__(self, model: Path, threads: int, stages: int, wire: str = "f32", one_process: bool = False):
        import grpc
        from gantry_stubs import worker

        self.pb, rpc = worker()
        started = [start_worker("--threads", str(threads), "--parallel", "1")
                   for _ in range(1 if one_process else stages)]
        self.procs = [p for p, _ in started]
        addrs = [a for _, a in started]
        self.stubs = [rpc.WorkerStub(grpc.insecure_channel(a)) for a in addrs]
        cuts = [round(k * LAYERS / stages) for k in range(stages + 1)]
        self.layers = [f"{cuts[k]}-{cuts[k + 1] - 1}" for k in range(stages)]
        self.stub = self.stubs[0]
        if one_process:
            # Every stage a segment of one worker: hidden states handed over in memory.
            req = self.pb.LoadModelRequest(model_id="m", source=str(model), context_length=2048)
            for k in range(stages):
                req.segments.append(self.pb.LayerSegment(device="cpu", layer_start=cuts[k], layer_end=cuts[k + 1]))
            for ev in self.stub.LoadModel(req):
                pass
            self.layers = ["+".join(self.layers)]
            return
        # The last stage first, so each stage's next one is there when it is asked for.
        for k in reversed(range(stages)):
            req = self.pb.LoadModelRequest(model_id="m", source=str(model), context_length=2048)
            if stages > 1:
                req.segments.append(self.pb.LayerSegment(device="cpu", layer_start=cuts[k], layer_end=cuts[k + 1]))
                req.next_stage = addrs[k + 1] if k + 1 < stages else ""
                req.wire_dtype = wire
            for ev in self.stubs[k].LoadModel(req):
                pass

    def rss(self) -> list[int]:
        return [rss_bytes(p.pid) for p in self.procs]

    def stream(self, text: str, gen: int):
        for token in self.tokens(text, gen):
            yield token

    def tokens(self, text: str, gen: int):
        req = self.pb.GenerateRequest(
            model_id="m", prompt=text, sampling=self.pb.SamplingParams(max_tokens=gen, ignore_eos=True))
        for ev in self.stub.Generate(req):
            if ev.WhichOneof("event") == "token" and ev.token.HasField("token_id"):
                yield ev.token.token_id

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--requests", type=int, default=3, help="sequential requests per repeat")
    ap.add_argument("--words", type=int, default=90, help="prompt length in words (~128 tokens)")
    ap.add_argument("--gen-tokens", type=int, default=64)
    args = ap.parse_args()
    model = ROOT / "models" / MODEL
    eos = eos_ids(model)

    def gantry(threads, stages, wire="f32", one_process=False):
        name = f"gantry, {stages} stage{'s' if stages > 1 else ''}, {threads} thread{'s' if threads > 1 else ''} each"
        name += f", {wire} on the wire" if wire != "f32" else ""
        name += ", in one worker" if one_process else ""
        return name, stages, threads, lambda: GantryStages(model, threads, stages, wire, one_process)

    configs = []
    for threads in sorted({args.threads, 1}, reverse=True):
        configs += [gantry(threads, k) for k in (1, 2, 3)]
        if threads == args.threads:
            configs += [gantry(threads, 2, "f16"), gantry(threads, 2, one_process=True)]
        configs.append((f"llama.cpp, {threads} thread{'s' if threads > 1 else ''}", 1, threads,
                        lambda t=threads: LlamaCppServer(model, t, eos)))
    runs = {name: [] for name, *_ in configs}
    memory = {}
    reference = {}
    for r in range(args.repeat):
        for name, _, _, make in configs:
            server = make()
            try:
                timed_stream(server, prompt(10_000, args.words), 4, time.perf_counter())  # warm-up
                if isinstance(server, GantryStages):
                    memory[name] = {"layers": server.layers, "rss_bytes": server.rss()}
                for i in range(args.requests):
                    text = prompt(i, args.words)
                    run = timed_stream(server, text, args.gen_tokens, time.perf_counter())
                    if run["tokens"] != args.gen_tokens:
                        raise SystemExit(f"{name}: a stream ended after {run['tokens']} tokens")
                    runs[name].append(run)
                    if isinstance(server, GantryStages) and "f16" not in name:
                        got = list(server.tokens(text, 16))
                        if reference.setdefault(i, got) != got:
                            raise SystemExit(f"{name}: tokens differ from the whole model's: {got} vs {reference[i]}")
            finally:
                server.stop()
            print(f"repeat {r + 1}/{args.repeat}: {name} done", file=sys.stderr)

    summary = {}
    for name, rs in runs.items():
        summary[name] = {"ttft_ms": 1000 * statistics.median(x["ttft_s"] for x in rs),
                         "decode_tokens_per_s": statistics.median(x["decode_tokens_per_s"] for x in rs)}
    for name, stages, threads, _ in configs:
        s = summary[name]
        one = summary[gantry(threads, 1)[0]]
        k = stages
        if k > 1:
            s["hop_ms_per_token"] = 1000 * (1 / s["decode_tokens_per_s"] - 1 / one["decode_tokens_per_s"]) / (k - 1)
            s["hop_ttft_ms"] = (s["ttft_ms"] - one["ttft_ms"]) / (k - 1)
    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "args": vars(args),
               "model": MODEL, "median": summary, "memory": memory,
               "runs": {n: [{k: v for k, v in x.items() if k != "end"} for x in rs] for n, rs in runs.items()}}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "bench" / "results" / f"pipeline-{stamp}.json"
    out.write_text(json.dumps(results, indent=1))

    print(f"| {MODEL} | TTFT ms | decode tok/s | per extra hop: ms/token, TTFT ms | resident memory per worker |")
    print("|---|---|---|---|---|")
    for name, s in summary.items():
        hop = f"{s['hop_ms_per_token']:.2f}, {s['hop_ttft_ms']:.1f}" if "hop_ms_per_token" in s else "—"
        mem = memory.get(name)
        mem = ", ".join(f"{l}: {b / 2**20:.0f} MiB" for l, b in zip(mem["layers"], mem["rss_bytes"])) if mem else "—"
        print(f"| {name} | {s['ttft_ms']:.0f} | {s['decode_tokens_per_s']:.1f} | {hop} | {mem} |")
    print(f"raw runs: {out.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
