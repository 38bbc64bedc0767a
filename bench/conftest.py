"""After a benchmark run: each op's and each model's speed-up over its reference, side by side.

The tables are printed from ``pytest_terminal_summary`` because output written while tests or their
fixtures run is captured by pytest.
"""
import os
import time

import torch

from caer_fast.testing.timing import matmul_gflops


def _median(b):
    return getattr(b.stats, "stats", b.stats).median  # Metadata wraps Stats


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) if b.stats]
    _ops_table(terminalreporter, [b for b in benchmarks if b.extra_info.get("op")])
    _models_table(terminalreporter, [b for b in benchmarks if b.extra_info.get("model_case")])
    _loaders_table(terminalreporter, [b for b in benchmarks if b.extra_info.get("frames")])


def _ops_table(terminalreporter, rows):
    if not rows:
        return
    base = {b.group: _median(b) for b in rows if b.extra_info["implementation"] == "reference"}
    tr = terminalreporter
    tr.section("ops: median time and speed-up over the eager reference")
    tr.write_line(f"{'group':<42} {'implementation':<20} {'median us':>10} {'speed-up':>9}")
    for b in sorted(rows, key=lambda b: (b.group, _median(b))):
        ref = base.get(b.group)
        ratio = f"{ref / _median(b):8.2f}x" if ref else "       -"
        tr.write_line(f"{b.group:<42} {b.extra_info['implementation']:<20} {_median(b) * 1e6:10.1f} {ratio}")


MODEL_BASELINES = {"caers-b32": "community-eager", "caer-video-b4": "ours-eager"}


def _models_table(tr, rows):
    """bench/test_models.py: speed-up over the group's baseline, GFLOP/s against the matmul rate
    measured now, the ceiling that rate allows (rate / baseline GFLOP/s), peak memory, first call."""
    if not rows:
        return
    base = {b.group: _median(b) for b in rows
            if b.extra_info["implementation"] == MODEL_BASELINES[b.extra_info["model_case"]]}
    torch.set_num_threads(rows[0].extra_info["threads"])
    peak = matmul_gflops()
    tr.section(f"models: speed-up over the baseline; GFLOP/s against the fp32 matmul rate measured now "
               f"({peak:.0f} GFLOP/s); threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    tr.write_line(f"{'group':<26} {'implementation':<22} {'median ms':>10} {'speed-up':>9} {'GFLOP/s':>8} "
                  f"{'% matmul':>8} {'ceiling':>8} {'peak MB':>8} {'first call s':>12}")
    for b in sorted(rows, key=lambda b: (b.group, _median(b))):
        e, m = b.extra_info, _median(b)
        ref = base.get(b.group)
        gflops = e["flops"] / m / 1e9
        ceiling = f"{peak / (e['flops'] / ref / 1e9):7.2f}x" if ref else "       -"
        tr.write_line(f"{b.group:<26} {e['implementation']:<22} {m * 1e3:10.1f} "
                      f"{(f'{ref / m:8.2f}x' if ref else '       -'):>9} {gflops:8.1f} "
                      f"{100 * gflops / peak:7.1f}% {ceiling:>8} {e['peak_mb']:8.0f} {e['first_call_s'] or 0:12.1f}")


def _loaders_table(tr, rows):
    """bench/test_data.py: frames/s of each path, against raw decoding and against the per-sample path."""
    if not rows:
        return
    tr.section(f"data: frames/s (median), one process; load average {os.getloadavg()[0]:.1f}")
    for group in sorted({b.group for b in rows}):
        members = [b for b in rows if b.group == group]
        rate = {b.extra_info["implementation"]: b.extra_info["frames"] / _median(b) for b in members}
        tr.write_line(group)
        tr.write_line(f"  {'implementation':<24} {'frames/s':>9} {'vs pyav-decode':>15} {'vs per-sample-pil':>18}")
        for impl, r in sorted(rate.items(), key=lambda kv: -kv[1]):
            vs = [f"{r / rate[k]:.2f}x" if k in rate else "-" for k in ("pyav-decode", "per-sample-pil")]
            tr.write_line(f"  {impl:<24} {r:9.1f} {vs[0]:>15} {vs[1]:>18}")
