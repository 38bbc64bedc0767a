"""``openvino``: our ONNX export compiled by OpenVINO for this CPU, in fp32 (optional package:
``pip install openvino``; the fastest correct engine for the video model on AVX2 CPUs, bench/RESULTS.md)."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Optional

import torch

from ...models.openvino_int8 import loaded_from_cache
from .base import BuildContext, Engine, EngineError, need_package, onnx_feed, register_engine


class OpenVinoEngine(Engine):
    """Our ONNX export compiled by OpenVINO for this CPU.

    fp32 is forced (on CPUs with bf16 OpenVINO would otherwise compute in bf16). ``cache_dir`` is
    OpenVINO's own cache of compiled models: a second start imports the compiled blob instead of compiling."""

    name = "openvino"

    def __init__(self, onnx_path: Path, threads: Optional[int] = None, cache_dir: Optional[Path] = None):
        super().__init__()
        ov = need_package("openvino", "openvino", "optional: pip install openvino==2026.4.1")
        t = time.perf_counter()
        threads = int(threads or torch.get_num_threads())
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache_dir)
        try:
            self.compiled = ov.Core().compile_model(str(onnx_path), "CPU", config)
        except Exception as exc:
            raise EngineError(f"openvino could not compile {onnx_path}: {exc}") from exc
        self.request = self.compiled.create_infer_request()
        self.outputs = list(self.compiled.outputs)
        self._lock = threading.Lock()  # one infer request: one call at a time
        self.info.update(onnx=str(onnx_path), cache_dir=str(cache_dir) if cache_dir else None, threads=threads,
                         loaded_from_cache=loaded_from_cache(self.compiled), session_s=round(time.perf_counter() - t, 3),
                         version=ov.get_version())

    def run(self, face, context):
        n = face.shape[0]
        if n == 0:  # OpenVINO's CPU plugin refuses empty inputs; ONNX Runtime and eager answer with empty outputs
            logits, attention, weights = self.run(face.new_zeros((1, *face.shape[1:])),
                                                  context.new_zeros((1, *context.shape[1:])))
            return logits[:0], attention[:0], weights[:0]
        feed = onnx_feed(face, context)
        with self._lock:
            result = self.request.infer(feed)
            # copies: the request reuses its output buffers on the next call
            return tuple(torch.from_numpy(result[o].copy()) for o in self.outputs)


@register_engine("openvino", description="our ONNX export compiled by OpenVINO for this CPU (fp32)")
def build_openvino(ctx: BuildContext) -> Engine:
    onnx_path, info = ctx.onnx_file()
    blobs = ctx.dir / "openvino" if ctx.dir is not None else None
    if blobs is not None:
        ctx.manifest.check_tree(blobs)  # OpenVINO would load another model's blob found under its name
    try:
        eng = OpenVinoEngine(onnx_path, ctx.threads, blobs)
    except EngineError as exc:
        if info["exported"]:
            raise
        ctx.forget_onnx(str(exc).splitlines()[0][:200])
        onnx_path, info = ctx.onnx_file()
        eng = OpenVinoEngine(onnx_path, ctx.threads, blobs)
    if blobs is not None and not eng.info.get("loaded_from_cache"):
        ctx.manifest.record(blobs)
    eng.info.update(info)
    eng.input_shapes = (ctx.face_shape, ctx.context_shape)
    return eng
