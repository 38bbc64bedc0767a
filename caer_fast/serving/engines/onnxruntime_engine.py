"""``onnxruntime``: our ONNX export (:func:`caer_fast.serving.onnx.export_model_onnx`, the fused ops as
plain softmax / mul / reduce so ONNX Runtime fuses them) in an ONNX Runtime CPU session."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import torch

from .base import BuildContext, Engine, EngineError, log, need_package, onnx_feed, register_engine


class OnnxRuntimeEngine(Engine):
    """Our ONNX export in an ONNX Runtime CPU session (all graph optimisations, this machine's kernels).

    ``optimized`` is where ORT writes the graph it optimised for this CPU; when that file exists it is
    loaded instead of the plain export, with the optimisations already applied (no work at start-up)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, threads: Optional[int] = None, optimized: Optional[Path] = None):
        super().__init__()
        ort = need_package("onnxruntime", "onnxruntime", "pinned in requirements.txt")
        t = time.perf_counter()
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        loaded_optimized = optimized is not None and Path(optimized).is_file()
        if loaded_optimized:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            path = optimized
        else:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if optimized is not None:
                so.optimized_model_filepath = str(Path(optimized).with_name(f".{Path(optimized).name}.{os.getpid()}.tmp"))
            path = onnx_path
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            if loaded_optimized:  # a stale or damaged optimised file: rebuild from the export
                log.warning("engine cache: ignoring the optimised graph %s (%s): rebuilding it", optimized, exc)
                Path(optimized).unlink(missing_ok=True)
                self.__init__(onnx_path, threads, optimized)
                return
            raise EngineError(f"onnxruntime could not load {path}: {exc}") from exc
        if optimized is not None and not loaded_optimized:
            tmp = Path(so.optimized_model_filepath)
            if tmp.is_file():
                os.replace(tmp, optimized)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.info.update(onnx=str(onnx_path), optimized_graph=str(optimized) if optimized else None,
                         loaded_optimized=loaded_optimized, session_s=round(time.perf_counter() - t, 3),
                         threads=so.intra_op_num_threads)

    def run(self, face, context):
        out = self.session.run(None, onnx_feed(face, context))
        return tuple(torch.from_numpy(o) for o in out)


@register_engine("onnxruntime", description="our ONNX export in an ONNX Runtime CPU session")
def build_onnxruntime(ctx: BuildContext) -> Engine:
    onnx_path, info = ctx.onnx_file()
    optimized = ctx.dir / "model.ort-optimized.onnx" if ctx.dir is not None else None
    if optimized is not None:
        ctx.manifest.check(optimized)  # a file that is not the one ORT wrote for this model goes
    try:
        eng = OnnxRuntimeEngine(onnx_path, ctx.threads, optimized)
    except EngineError as exc:
        if info["exported"]:
            raise
        ctx.forget_onnx(str(exc).splitlines()[0][:200])  # a cached export that does not parse
        onnx_path, info = ctx.onnx_file()
        eng = OnnxRuntimeEngine(onnx_path, ctx.threads, optimized)
    if optimized is not None and not eng.info["loaded_optimized"] and optimized.is_file():
        ctx.manifest.record(optimized)
    eng.info.update(info)
    eng.input_shapes = (ctx.face_shape, ctx.context_shape)
    return eng
