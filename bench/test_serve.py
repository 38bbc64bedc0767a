"""Serving throughput and latency, with and without micro-batching, under a bounded loopback load.

    pytest bench/test_serve.py --benchmark-only -s

Starts ``python -m caer_fast.serve`` (CAER-Net-S checkpoint from random init, Haar detector) with
``--max-batch 1`` and ``--max-batch 8``, sends ``REQUESTS`` PNG uploads from ``CLIENTS`` concurrent
clients, and reports requests/s and p50/p99 latency. Each run also checks every answer is a 200 with
probabilities, and that batching happened only where it was allowed.
"""
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
from caer_fast.testing.serving import Server, make_checkpoint, write_png

CLIENTS = 8
REQUESTS = 64  # bounded: 8 clients × 8 requests


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_serve")
    images = [write_png(d / f"{i}.png", seed=i, size=(360, 640)).read_bytes() for i in range(8)]  # CAER-S-like
    return make_checkpoint(d / "caers.pth", "caers"), images, d


def cpu_seconds(pid) -> float:
    """User + system CPU time of a process (Linux /proc): a steadier measure than wall time on a shared box."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url, images):
    latencies, codes = [], []
    lock = threading.Lock()
    per = REQUESTS // CLIENTS

    def client(k):
        with httpx.Client(timeout=120) as c:
            for j in range(per):
                body = images[(k + j) % len(images)]
                t = time.perf_counter()
                r = c.post(url + "/predict", files={"file": ("x.png", body, "image/png")})
                dt = time.perf_counter() - t
                with lock:
                    latencies.append(dt)
                    codes.append(r.status_code if "probabilities" in r.json() else -1)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    assert codes == [200] * REQUESTS
    lat = np.asarray(latencies) * 1000
    return {"rps": REQUESTS / wall, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


@pytest.mark.parametrize("max_batch", [1, 8])
def test_serve_throughput(benchmark, setup, max_batch):
    ckpt, images, d = setup
    server = Server(ckpt, "--max-batch", max_batch, "--max-wait-ms", 10, "--threads", 2, cwd=d)
    try:
        with httpx.Client() as c:  # warm-up: first-call allocations out of the timing
            for b in images[:2]:
                c.post(server.url + "/predict", files={"file": ("x.png", b)}, timeout=120)
        cpu0 = cpu_seconds(server.proc.pid)
        result = benchmark.pedantic(load, args=(server.url, images), rounds=1, iterations=1)
        result["requests_per_cpu_s"] = REQUESTS / max(cpu_seconds(server.proc.pid) - cpu0, 1e-9)
        stats = httpx.get(server.url + "/health").json()["batching"]
    finally:
        server.close()
    if max_batch == 1:
        assert stats["max_requests_per_call"] == 1
    result.update(max_batch=max_batch, mean_requests_per_call=stats["mean_requests_per_call"],
                  threads=os.environ.get("OMP_NUM_THREADS", "default"))
    benchmark.extra_info.update(result)
    print(f"\nserving max_batch={max_batch}: {result['rps']:.1f} req/s, p50 {result['p50_ms']:.0f} ms, "
          f"p99 {result['p99_ms']:.0f} ms, {result['requests_per_cpu_s']:.1f} req per server CPU-s, {stats['mean_requests_per_call']} requests per model call")
