"""Where the video int8 engine's memory goes: a fresh process builds the full-size CAER-Net's int8 engine the
way ``auto`` does (calibration.pt beside the checkpoint) and prints VmRSS / VmHWM (MiB) after each step.

    python tools/int8_memory.py [WORKDIR] [--engine int8|auto]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def mem() -> str:
    st = {ln.split(":")[0]: int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(("VmRSS", "VmHWM"))}
    return f"VmRSS {st['VmRSS'] / 1024:6.0f} MiB  VmHWM {st['VmHWM'] / 1024:6.0f} MiB"


T0 = time.perf_counter()


def mark(label: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {label:<34} {mem()}", file=sys.stderr, flush=True)


def wrap(module, name: str, label: str) -> None:
    fn = getattr(module, name)

    def wrapped(*a, **kw):
        mark(f"{label}: start")
        out = fn(*a, **kw)
        mark(f"{label}: done")
        return out
    setattr(module, name, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", nargs="?")
    ap.add_argument("--engine", default="int8")
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--min-agreement", type=float, default=0.0,
                    help="0: the random-init model's int8 passes the guard, so auto times it as on a trained one")
    args = ap.parse_args()
    mark("python + torch imported")
    from caer_fast.data.calibration import CALIBRATION_FILE, save_calibration_sample
    from caer_fast.serving import onnx as onnx_export
    from caer_fast.serving.engines import auto, engine_for_checkpoint
    from caer_fast.serving.engines import int8 as int8_engine
    from caer_fast.testing.serving import full_size_checkpoint

    d = Path(args.workdir or tempfile.mkdtemp(prefix="int8mem-"))
    d.mkdir(parents=True, exist_ok=True)
    ckpt = d / "caer_full.pth"
    if not ckpt.is_file():
        full_size_checkpoint(ckpt)
        g = torch.Generator().manual_seed(1)
        save_calibration_sample(d / CALIBRATION_FILE, [(torch.rand(args.clips, 3, 16, 96, 96, generator=g),
                                                        torch.rand(args.clips, 3, 16, 112, 112, generator=g))])
    mark("caer_fast imported")
    wrap(int8_engine, "_video_data", "calibration read + split")
    wrap(int8_engine, "_digest", "calibration digest")
    wrap(onnx_export, "export_model_onnx", "ONNX export")
    wrap(int8_engine, "quantize_openvino_int8", "nncf.quantize")
    wrap(int8_engine, "OpenVinoInt8Engine", "OpenVINO compile")
    wrap(int8_engine, "int8_guard", "guard")
    wrap(auto, "time_engine", "timing")
    wrap(auto, "_release", "release")
    mark("building")
    _, eng = engine_for_checkpoint(ckpt, args.engine, cache_dir=d / "cache", calibration=d / CALIBRATION_FILE,
                                   min_agreement=args.min_agreement, out=sys.stderr)
    mark(f"built {eng.name}")
    del eng
    auto._release()
    mark("engine dropped")


if __name__ == "__main__":
    main()
