"""``int8``: :func:`caer_fast.quantize_int8` (PT2E, oneDNN int8 kernels; the image model on CPU).

Options (``build_engine(..., calibration=..., ...)``, or ``--engine int8`` / ``--int8`` with
``--calibrate ROOT``): ``calibration`` is a CAER-S tree (read with
:func:`caer_fast.data.calibration.calibration_batches` at ``calibration_sizes``, the checkpoint's
preprocessing sizes) or ready (face, context) batches; ``calibration_samples`` images are read;
``warmup_batch_sizes`` (default: ``batch_sizes``) are compiled before the engine is returned.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch.nn as nn

from ...data.calibration import calibration_batches
from ...models.quantize import QuantizationUnavailable, check_quantizable, quantize_int8
from .base import BuildContext, Engine, EngineError, register_engine
from .torch_engines import TorchEngine


class Int8Engine(TorchEngine):
    """:func:`caer_fast.quantize_int8`'s model (image model only)."""

    def __init__(self, int8_model: nn.Module):
        Engine.__init__(self, "int8")
        self.model = int8_model
        self.info.update(getattr(int8_model, "info", {}))


def _read_calibration(ctx: BuildContext, root) -> list:
    sizes = ctx.options.get("calibration_sizes") or {}
    face = sizes.get("face_size") or ctx.face_shape[-2:]
    context = sizes.get("context_size") or ctx.context_shape[-2:]
    crop = sizes.get("crop") if "crop" in sizes else None
    samples = int(ctx.options.get("calibration_samples") or 64)
    t = time.perf_counter()
    batches = calibration_batches(root, samples, face_size=tuple(face), context_size=tuple(context), crop=crop)
    ctx.say(f"int8: read {sum(len(f) for f, _ in batches)} calibration images from {root} in "
            f"{time.perf_counter() - t:.1f}s")
    return batches


@register_engine("int8", fp32=False, description="caer_fast.quantize_int8 (image model; needs calibration data)")
def build_int8(ctx: BuildContext) -> Engine:
    calibration = ctx.options.get("calibration")
    if calibration is None:
        raise EngineError("the int8 engine needs calibration data (predict/serve: --calibrate ROOT)")
    try:
        check_quantizable(ctx.model)  # before any calibration data is read
        if isinstance(calibration, (str, os.PathLike)):
            calibration = _read_calibration(ctx, Path(calibration))
        fast = quantize_int8(ctx.model, calibration)
    except (QuantizationUnavailable, NotImplementedError, TypeError, ValueError, FileNotFoundError) as exc:
        raise EngineError(str(exc)) from exc
    i = fast.info
    ctx.say(f"int8: calibrated on {i['calibration_samples']} samples ({i['calibration_batches']} batches) in "
            f"{i['calibration_s']:.1f}s; {i['int8_convs']} convs and {i['int8_linears']} linears in int8, "
            f"{', '.join(i['fp32_custom_ops']) or 'no custom ops'} in fp32")
    warm = ctx.options.get("warmup_batch_sizes")
    sizes = sorted({int(b) for b in (ctx.batch_sizes if warm is None else warm) if int(b) >= 1})
    if sizes:
        ctx.say(f"int8: compiling for batch sizes {', '.join(map(str, sizes))} (torch.compile, oneDNN int8) …")
        i["warmup_s"] = fast.warmup(sizes)
        ctx.say(f"int8: compiled in {i['warmup_s']:.1f}s")
    return Int8Engine(fast)
