"""Video CAER-Net int8 (OpenVINO + NNCF, caer_fast.models.openvino_int8) vs our eager PyTorch and vs
OpenVINO fp32, at batch 1 and 4, in one run with the contenders alternated round by round.

Calibration and held-out clips are real encoded clips (the synthetic demo tree, test-time preprocessing:
16 frames, face 96², context 112²); the model has random weights with randomised BN statistics (as in
bench/test_engines.py). Prints the CPU flags, the fp32 matmul rate and the load beside the table.

    pytest bench/test_openvino_int8.py -s      # CAER_FAST_BENCH_THREADS=2 (default), CAER_FAST_BENCH_ROUNDS=5

Goal (issue 24): int8 ≥ 3× our eager at batch 4, 2 threads, with ≥ 99 % top-1 agreement on held-out clips.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
import torch

from caer_fast.data import calibration as cal
from caer_fast.data.synthetic import make_demo_dataset
from caer_fast.export import export_model_onnx
from caer_fast.models import CAERNet
from caer_fast.serving import engines
from caer_fast.testing.community_model import randomize_bn_
from caer_fast.testing.timing import matmul_gflops

THREADS = int(os.environ.get("CAER_FAST_BENCH_THREADS", "2"))
ROUNDS = int(os.environ.get("CAER_FAST_BENCH_ROUNDS", "5"))
SIZES = dict(clip_frames=16, face_size=(96, 96), context_size=(128, 171), crop=112)


def run():
    """Prints the table; returns ({batch: {engine: median s}}, int8 guard)."""
    from caer_fast.models import openvino_int8 as q

    torch.set_num_threads(THREADS)
    print(f"CPU flags: {' '.join(engines.cpu_flags())}")
    print(f"fp32 matmul 2048², {THREADS} threads: {matmul_gflops():.0f} GFLOP/s; torch {torch.__version__}; "
          f"{engines._versions()}; load {os.getloadavg()}", flush=True)
    torch.manual_seed(0)
    model = randomize_bn_(CAERNet(), torch.Generator().manual_seed(1)).eval()
    with tempfile.TemporaryDirectory(prefix="caer_fast_int8_video_") as d:
        d = Path(d)
        make_demo_dataset(d / "demo", seed=0, videos_per_class={"train": 3, "validation": 0, "test": 2},
                          images_per_class={"train": 0, "test": 0})
        calib = cal.video_calibration_batches(d / "demo", 21, batch_size=4, **SIZES)
        held = cal.video_calibration_batches(d / "demo", 14, split="test", batch_size=4, **SIZES)
        t = time.perf_counter()
        int8 = q.build_int8_engine(model, calib, held, d / "int8", threads=THREADS)
        print(f"int8 built in {time.perf_counter() - t:.1f}s (quantize {int8.info['quantize_s']}s), "
              f"guard on {int8.info['guard']['n']} held-out clips: {int8.info['guard']}", flush=True)
        fp32 = engines.OpenVinoEngine(export_model_onnx(model, *q.calibration_shapes(calib), d / "fp32.onnx"),
                                      threads=THREADS)
        fp32_guard = q.int8_guard(model, fp32, held)

        def eager(face, context):
            with torch.inference_mode():
                return model(face, context, return_details=True)

        contenders = {"ours-eager": eager, "openvino-fp32": fp32, "openvino-int8": int8}
        face_all = torch.cat([f for f, _ in held])
        ctx_all = torch.cat([c for _, c in held])
        rows = {}
        for b in (1, 4):
            face, context = face_all[:b].contiguous(), ctx_all[:b].contiguous()
            times = {k: [] for k in contenders}
            for fn in contenders.values():
                fn(face, context)  # warm-up
            for _ in range(ROUNDS):
                for name, fn in contenders.items():  # alternated: the same load for every contender
                    t = time.perf_counter()
                    fn(face, context)
                    times[name].append(time.perf_counter() - t)
            rows[b] = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"\nvideo CAER-Net (16×96² face, 16×112² context), {THREADS} threads, median of {ROUNDS} alternated "
              f"rounds, load after {os.getloadavg()[0]:.1f}")
        print(f"  {'engine':<14} {'agree':>6} {'max|dlogit|':>11} | b1 ms   × eager | b4 ms   × eager")
        for name in contenders:
            g = {"ours-eager": {"agreement": 1.0, "max_abs": 0.0}, "openvino-fp32": fp32_guard,
                 "openvino-int8": int8.info["guard"]}[name]
            s = f"  {name:<14} {g['agreement']:6.0%} {g['max_abs']:11.2e}"
            for b in (1, 4):
                m = rows[b][name]
                s += f" | {m * 1e3:7.1f} {rows[b]['ours-eager'] / m:5.2f}x"
            print(s)
        print(f"  int8 vs openvino fp32: b1 {rows[1]['openvino-fp32'] / rows[1]['openvino-int8']:.2f}x, "
              f"b4 {rows[4]['openvino-fp32'] / rows[4]['openvino-int8']:.2f}x")
        return rows, int8.info["guard"]


def test_int8_video_vs_eager_and_openvino_fp32():
    pytest.importorskip("openvino")
    pytest.importorskip("nncf", reason="nncf not installed (pip install 'caer_fast[openvino-int8]')")
    rows, guard = run()
    assert guard["ok"] and guard["agreement"] >= 0.99, guard
    assert rows[4]["ours-eager"] / rows[4]["openvino-int8"] >= 3.0, rows
