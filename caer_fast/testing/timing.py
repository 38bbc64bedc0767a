"""Timing helpers of the benchmarks (bench/) and the scripts (tools/)."""
import time

import torch


def matmul_gflops(size=2048, rounds=5):
    """Best fp32 matmul rate at the current thread count: the limit the models are measured against."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best / 1e9


def median_time(fn, face, context, rounds):
    """Median seconds of ``rounds`` calls ``fn(face, context)``."""
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn(face, context)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]
