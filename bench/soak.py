#!/usr/bin/env python3
"""A soak: mixed load and random faults for --minutes, with each process's memory and open file
descriptors sampled, to show they stay flat.

A real `gantry controller` (embedded store, API keys) and three real SmolLM2 workers (release
build, one thread each, declared 1x24GiB GPUs), one deployment of two replicas. Load: a few
concurrent clients sending greedy chats over gRPC, streaming completions over the OpenAI HTTP
API, and now and then a client that stops reading or cancels mid-stream. Faults, one every
--fault-s seconds at random: SIGKILL a worker and start it again; SIGSTOP a worker past its
lease and SIGCONT it; restart the controller (SIGTERM, then start it on the same store). Worker
w1 is never faulted, so one worker lives the whole run beside the controller's last life.

Every --sample-s seconds: resident memory (VmRSS) and open fds of the controller and each
worker (restarted processes start a new series). Reported: requests answered, failed (a failure
must name its reason; none may hang), faults done, and for each long-lived process its memory
and fds in the second and the last quarter of its life (medians; the first quarter holds the
model's load and the KV pool filling), the peak, and every sample in the JSON; failures by kind
with up to 20 distinct messages, and the slowest request (a hang would show there).

Prerequisites: `cargo build --release -p gantry-cli`, scripts/fetch-models.sh, scripts/setup.sh.
Run (about --minutes plus a minute):
  .venv-clients/bin/python bench/soak.py --minutes 30
Results go to bench/results/soak-<time>.json; the summary to stdout.
"""
import argparse
import datetime
import json
import os
import platform
import random
import signal
import statistics
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

from gantry_worker import free_port, stop_all  # noqa: E402

GANTRY = ROOT / "target/release/gantry"
ADMIN = "k-admin-0123456789abcdef"
WORKER_KEY = "k-worker-0123456789abcde"


def proc_stats(pid):
    """(VmRSS bytes, open fds) of a live process, or None."""
    try:
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


class Soak:
    def __init__(self, args):
        import grpc
        from gantry_stubs import controller, worker
        self.grpc = grpc
        self.args = args
        self.cpb, self.crpc = controller()
        self.wpb, _ = worker()
        self.state = tempfile.mkdtemp(prefix="gantry-soak-")
        keys = Path(self.state) / "keys"
        keys.write_text(f"{ADMIN} admin ops\n{WORKER_KEY} worker workers\n")
        self.keys = keys
        self.addr = f"127.0.0.1:{free_port()}"
        self.http = f"127.0.0.1:{free_port()}"
        self.lock = threading.Lock()
        self.samples = {}  # series name -> [(t, rss, fds)]
        self.counts = {"answered": 0, "failed": 0, "faults": 0}
        self.failures = {}
        self.messages = []
        self.slowest = 0.0
        self.start_controller()
        self.workers = {}
        for i in range(3):
            self.start_worker(f"w{i + 1}")
        self.channel = grpc.insecure_channel(self.addr)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.meta = [("authorization", f"Bearer {ADMIN}")]
        spec = self.cpb.DeploymentSpec(source=str(ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"), replicas=2,
                                       context_length=1024,
                                       placement=self.cpb.PlacementPolicy(strategy=self.cpb.PLACEMENT_STRATEGY_SPREAD))
        self.crpc.DeploymentsStub(self.channel).Apply(self.cpb.ApplyRequest(name="chat", spec=spec), metadata=self.meta)

    def start_controller(self):
        self.controller = subprocess.Popen(
            [str(GANTRY), "controller", "--listen", self.addr, "--http", self.http, "--store",
             f"{self.state}/state.redb", "--api-keys", str(self.keys), "--lease", "3"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.controller_series = f"controller#{self.controller.pid}"

    def start_worker(self, wid):
        p = subprocess.Popen(
            [str(GANTRY), "worker", "--listen", "127.0.0.1:0", "--controller", f"http://{self.addr}",
             "--worker-id", wid, "--gpus", "1x24GiB", "--threads", "1", "--api-key", WORKER_KEY],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.workers[wid] = p

    def chat(self, i):
        req = self.cpb.ChatRequest(model="chat", messages=[self.wpb.ChatMessage(role="user", content=f"Count to {i % 7 + 3}.")],
                                   sampling=self.wpb.SamplingParams(max_tokens=24, temperature=0))
        channel = self.grpc.insecure_channel(self.addr)
        try:
            stream = self.crpc.InferenceStub(channel).Chat(req, metadata=self.meta, timeout=120)
            if i % 11 == 0:
                next(iter(stream), None)
                stream.cancel()  # a client that leaves mid-stream
            else:
                for _ in stream:
                    pass
            return None
        except self.grpc.RpcError as e:
            return f"{e.code().name}: {e.details()[:80]}"
        finally:
            channel.close()

    def http_completion(self, i):
        body = json.dumps({"model": "chat", "prompt": f"Number {i}:", "max_tokens": 16, "stream": True}).encode()
        req = urllib.request.Request(f"http://{self.http}/v1/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN}"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                r.read()
            return None
        except Exception as e:  # noqa: BLE001 - every failure is recorded
            return f"http: {str(e)[:80]}"

    def client(self, k, until):
        i = k * 100000
        while time.time() < until:
            t0 = time.time()
            err = self.http_completion(i) if i % 3 == 0 else self.chat(i)
            with self.lock:
                self.slowest = max(self.slowest, time.time() - t0)
                if err is not None and err not in self.messages and len(self.messages) < 20:
                    self.messages.append(err)
                if err is None:
                    self.counts["answered"] += 1
                else:
                    self.counts["failed"] += 1
                    kind = err.split(":")[0]
                    self.failures[kind] = self.failures.get(kind, 0) + 1
            i += 1
            time.sleep(random.random() * 0.5)

    def sampler(self, until):
        t0 = time.time()
        while time.time() < until:
            procs = {self.controller_series: self.controller.pid}
            procs.update({f"{w}#{p.pid}": p.pid for w, p in self.workers.items()})
            for name, pid in procs.items():
                s = proc_stats(pid)
                if s:
                    self.samples.setdefault(name, []).append((time.time() - t0, s[0], s[1]))
            time.sleep(self.args.sample_s)

    def fault(self, rng):
        kind = rng.choice(["kill", "pause", "controller"])
        wid = rng.choice(sorted(w for w in self.workers if w != "w1"))
        if kind == "kill":
            self.workers[wid].kill()
            self.workers[wid].wait()
            time.sleep(2)
            self.start_worker(wid)
        elif kind == "pause":
            p = self.workers[wid]
            p.send_signal(signal.SIGSTOP)
            time.sleep(5)  # past the 3 s lease
            p.send_signal(signal.SIGCONT)
        else:
            self.controller.terminate()
            self.controller.wait(timeout=30)
            self.start_controller()
        with self.lock:
            self.counts["faults"] += 1
            self.counts[f"fault_{kind}"] = self.counts.get(f"fault_{kind}", 0) + 1

    def run(self):
        until = time.time() + self.args.minutes * 60
        rng = random.Random(7)
        threads = [threading.Thread(target=self.client, args=(k, until)) for k in range(self.args.clients)]
        threads.append(threading.Thread(target=self.sampler, args=(until,)))
        for t in threads:
            t.start()
        while time.time() < until - self.args.fault_s:
            time.sleep(self.args.fault_s * (0.5 + rng.random()))
            self.fault(rng)
        for t in threads:
            t.join()

    def close(self):
        stop_all([*self.workers.values(), self.controller])


def quarter_medians(series):
    """Second-quarter and last-quarter medians of a process's samples, its peak, and the
    samples themselves (seconds since the start, MiB, fds)."""
    n = len(series)
    if n < 8:
        return None
    second, last = series[n // 4: n // 2], series[-(n // 4):]
    return {
        "samples": n,
        "seconds": series[-1][0] - series[0][0],
        "rss_second_quarter_mib": statistics.median(s[1] for s in second) / 2**20,
        "rss_last_quarter_mib": statistics.median(s[1] for s in last) / 2**20,
        "rss_peak_mib": max(s[1] for s in series) / 2**20,
        "fds_second_quarter": statistics.median(s[2] for s in second),
        "fds_last_quarter": statistics.median(s[2] for s in last),
        "fds_peak": max(s[2] for s in series),
        "raw": [[round(t, 1), round(r / 2**20, 1), f] for t, r, f in series],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--fault-s", type=float, default=60)
    ap.add_argument("--sample-s", type=float, default=10)
    args = ap.parse_args()
    soak = Soak(args)
    try:
        time.sleep(10)
        soak.run()
    finally:
        soak.close()
    series = {name: quarter_medians(s) for name, s in soak.samples.items()}
    series = {k: v for k, v in series.items() if v}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    print(f"{args.minutes} min: {soak.counts}; failures by kind: {soak.failures}; slowest request "
          f"{soak.slowest:.1f} s")
    for m in soak.messages:
        print(f"  failure: {m}")
    for name, q in series.items():
        print(f"  {name}: {q['samples']} samples over {q['seconds'] / 60:.1f} min, memory "
              f"{q['rss_second_quarter_mib']:.1f} -> {q['rss_last_quarter_mib']:.1f} MiB (peak {q['rss_peak_mib']:.1f}), "
              f"fds {q['fds_second_quarter']:.0f} -> {q['fds_last_quarter']:.0f} (peak {q['fds_peak']})")
    out = ROOT / "bench/results" / f"soak-{stamp}.json"
    out.write_text(json.dumps({"bench": "soak", "when": stamp, "machine": platform.platform(), "args": vars(args),
                               "counts": soak.counts, "failures": soak.failures, "failure_messages": soak.messages,
                               "slowest_request_s": soak.slowest, "series": series}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
