"""Starting the release `gantry worker` for the benchmarks that call one (shared by
bench/worker_vs_llamacpp_server.py, bench/pipeline_stages.py, bench/batching_vs_llama_server.py,
bench/autoscale_ramp.py, bench/soak.py, bench/tenants.py and bench/prefix_routing.py), and the
small helpers they share (a free port, percentiles, stopping processes)."""
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_worker(*args: str) -> tuple[subprocess.Popen, str]:
    """Starts the release `gantry worker` on a free loopback port with `args`; returns the
    process and its address once it prints `ready`."""
    proc = subprocess.Popen(
        [str(ROOT / "target/release/gantry"), "worker", "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    addr = None
    for line in proc.stdout:
        if " listening on " in line:
            addr = line.split(" listening on ")[1].strip()
        if line.strip() == "ready":
            break
    if addr is None:
        raise SystemExit("a Gantry worker did not start")
    return proc, addr


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, p):
    """The p-th percentile of xs (nearest rank); NaN when empty."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def stop_all(procs):
    """Asks every process in procs to stop, then waits up to 15 s for each, killing the ones
    still running."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
