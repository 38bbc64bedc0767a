"""Inference engines for one of our models: a registry of named engines and the measured choice.

An engine is called like the model: ``engine(face, context, return_details=False)`` returns the logits,
or ``(logits, {"attention": …, "fusion_weights": …})`` with ``return_details=True``; it has ``name`` and
``info`` (what was built, how long it took, cache hits). Build one with :func:`build_engine` and hand
it to :class:`~caer_fast.serving.inference.Predictor` (``engine=``).

The registry (the shape of ``torch._dynamo``'s backend registry): :func:`register_engine` (name → a
builder ``build(ctx: BuildContext) -> Engine``), :func:`lookup_engine`; ``ENGINES`` is its keys. One
module per engine registers itself when imported below:

- ``eager`` / ``compiled`` (:mod:`.torch_engines`): the model, or :func:`caer_fast.optimize`;
- ``onnxruntime`` (:mod:`.onnxruntime_engine`), ``openvino`` (:mod:`.openvino_engine`): our ONNX export
  (:mod:`caer_fast.serving.onnx`) in ONNX Runtime / compiled by OpenVINO (optional package);
- ``int8`` (:mod:`.int8`): :func:`caer_fast.quantize_int8`, calibrated on ``calibration``;
- ``auto`` (:mod:`.auto`): measures the fp32 candidates, keeps the fastest correct one.

No compile wait: the ONNX file, ONNX Runtime's optimised graph, OpenVINO's compiled model and the ``auto``
decision live in an on-disk cache (:mod:`.cache`: ``$CAER_FAST_CACHE_DIR/engines/<key>``) keyed by the
model's weights, the batch-size range, the thread count, the CPU's flags and the library versions.
The command lines' flags (``--engine``, ``--int8``, ``--calibrate``…) are in :mod:`.cli`.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...models.caer_net import CAERNet
from ...models.checkpoint import input_sizes, load_checkpoint, read_checkpoint
from . import auto, int8, onnxruntime_engine, openvino_engine, torch_engines  # noqa: F401  (they register)
from .auto import AUTO_CANDIDATES, BackgroundAuto, auto_candidates, time_engine
from .base import (BuildContext, Engine, EngineError, EngineSpec, compare, default_shapes, engine_names,
                   fp32_engine_names, lookup_engine, register_engine)
from .cache import (CACHE_VERSION, Manifest, cache_root, engine_key, entry_lock, file_digest, library_versions,
                    model_hash, usable_cache_dir)
from .int8 import Int8Engine
from .onnxruntime_engine import OnnxRuntimeEngine
from .openvino_engine import OpenVinoEngine
from .torch_engines import TorchEngine

log = logging.getLogger("caer_fast.engines")

#: the registered engines' names (the registry's keys once the engine modules above have registered)
ENGINES = engine_names()
FP32_ENGINES = fp32_engine_names()


def _model_device(model: nn.Module):
    p = next(model.parameters(), None)
    return p.device.type if p is not None else "cpu"


def build_engine(model: nn.Module, engine: str = "auto", *, face_shape=None, context_shape=None,
                 batch_sizes: Sequence[int] = (1, 16), threads: Optional[int] = None,
                 candidates: Optional[Sequence[str]] = None, cache_dir="default", calibration=None,
                 check: bool = True, out=None, **options) -> Engine:
    """An :class:`Engine` for ``model`` (a :class:`CAERNet` / :class:`CAERSNet` in eval mode).

    Args:
        engine: a registered name (``ENGINES``). ``auto`` measures ``candidates`` (default
            :func:`auto_candidates`) at the smallest and largest of ``batch_sizes``, drops any whose outputs
            differ from the eager model (:func:`compare`), keeps the fastest (per-sample time summed over
            the two sizes) and caches the decision; a later call with the same key reads it back.
        face_shape, context_shape: input sizes without the batch dimension (default: :func:`default_shapes`;
            a checkpoint's own: :func:`caer_fast.models.checkpoint.input_sizes`).
        batch_sizes: the batch sizes that will be served (their range is part of the cache key).
        cache_dir: the cache root (default :func:`cache_root`; None: no cache, work in a temporary folder).
        calibration: for ``int8``: a CAER-S tree or (face, context) batches.
        check: verify a named fp32 engine against the eager model before returning it.
        background: (``options``) for ``auto`` with no cached decision: return a :class:`BackgroundAuto`
            that answers with eager at once and switches when the measurement (in a thread) ends.
        out: a file for progress lines (e.g. ``sys.stderr``); default: the logger.
        options: passed to the engine's builder (``ctx.options``): ``calibration_samples``,
            ``calibration_sizes``, ``warmup_batch_sizes`` (int8), or a new engine's own.
    """
    say = (lambda msg: print(msg, file=out, flush=True)) if out is not None else log.info
    warn = (lambda msg: print(f"warning: {msg}", file=out, flush=True)) if out is not None else \
        (lambda msg: log.warning("%s", msg))
    spec = lookup_engine(engine)
    if not isinstance(model, nn.Module):
        raise TypeError(f"build_engine: expected one of our models, got {type(model).__name__}")
    device = _model_device(model)
    if device != "cpu" and spec.cpu_only and engine != "auto":
        raise EngineError(f"the {engine} engine runs on CPU; the model is on {device}")
    if device != "cpu":  # on a GPU the torch paths are the engines (untested on the CPU build machines)
        return TorchEngine(model, compiled=engine == "compiled")
    default_face, default_context = default_shapes(model)
    if cache_dir == "default":
        cache_dir = cache_root()
    if cache_dir is not None:
        cache_dir = usable_cache_dir(cache_dir, warn)
    t0 = time.perf_counter()
    background = bool(options.pop("background", False))
    ctx = BuildContext(model, face_shape or default_face, context_shape or default_context, batch_sizes, threads,
                       cache_dir, say, dict(options, candidates=candidates, calibration=calibration), warn=warn)
    if engine == "auto" and background and auto.cached_decision(ctx) is None:
        # a cold cache: answer with eager now, measure in a thread (on a copy: an ONNX export traces the model);
        # eager's calls and the measurement's candidates take turns, so their memory peaks do not add up (and
        # the timings are not of two models sharing the cores)
        turn = threading.Lock()

        def measure() -> Engine:
            return build_engine(copy.deepcopy(model), "auto", face_shape=ctx.face_shape, context_shape=ctx.context_shape,
                                batch_sizes=batch_sizes, threads=threads, candidates=candidates, cache_dir=cache_dir,
                                calibration=calibration, check=check, out=out, turn=turn, **options)
        say("engine: no measured choice for this model and machine yet: answering with eager now and measuring "
            "the engines in the background (once; the next start reads the choice)")
        sizes = auto.measured_batch_sizes(ctx.face_shape, ctx.context_shape, ctx.batch_sizes)
        return auto.BackgroundAuto(ctx.build("eager"), measure, say, memory_estimate=auto.measure_memory_estimate(
            ctx.face_shape, ctx.context_shape, ctx.batch_sizes), turn=turn, slice_batch=sizes[-1])
    with entry_lock(ctx.dir) if ctx.dir is not None else contextlib.nullcontext():
        eng = spec.build(ctx)
        if check and spec.fp32 and engine != "eager":
            cmp = compare(ctx.build("eager"), eng, ctx.face_shape, ctx.context_shape)
            if not cmp["ok"] and ctx.dir is not None and _from_cache(eng):
                # files that passed their digest check and still answer wrongly: the cache was the cause
                warn(f"engine cache: the {engine} engine built from {ctx.dir} answers differently from the model "
                     f"(max |Δlogit| {cmp['max_abs']:.3g}): the cache was the cause; rebuilding the entry")
                ctx.manifest.forget(ctx.dir / "model.onnx")
                for name in ("model.ort-optimized.onnx", "openvino"):
                    ctx.manifest.forget(ctx.dir / name)
                eng = spec.build(ctx)
                cmp = compare(ctx.build("eager"), eng, ctx.face_shape, ctx.context_shape)
            eng.info["check"] = cmp
            if not cmp["ok"]:
                raise EngineError(f"the {engine} engine's outputs differ from the model's (max |Δlogit| "
                                  f"{cmp['max_abs']:.3g}, details {cmp['max_abs_details']:.3g})")
    eng.info.update(key=ctx.key, build_s=round(time.perf_counter() - t0, 3))
    return eng


def _from_cache(eng: Engine) -> bool:
    """Did this engine load anything from the cache (rather than build it all now)?"""
    i = eng.info
    return i.get("exported") is False or bool(i.get("loaded_optimized")) or bool(i.get("loaded_from_cache"))


def engine_for_checkpoint(checkpoint, engine: str = "auto", *, device="cpu",
                          batch_sizes: Optional[Sequence[int]] = None, **kwargs) -> Tuple[dict, Engine]:
    """(the checkpoint as read, ``build_engine``'s engine for its model on ``device``, at the input sizes
    the checkpoint was trained with). Hand both to the Predictor: ``Predictor(ckpt, ..., engine=engine)``.

    ``batch_sizes``: the model batches that will run (``auto`` measures their ends); default 1 and the
    Predictor's default stream chunk (4 clips for the video model, 16 frames for the image model).
    ``kwargs`` go to :func:`build_engine` (``cache_dir``, ``out``, ``calibration``…); an int8 engine
    reads its calibration images at the checkpoint's preprocessing sizes."""
    ckpt = read_checkpoint(checkpoint)
    model = load_checkpoint(ckpt).eval().to(torch.device(device))
    sizes = input_sizes(ckpt, model)
    if batch_sizes is None:
        batch_sizes = (1, 4 if isinstance(model, CAERNet) else 16)
    kwargs.setdefault("calibration_sizes", sizes)
    eng = build_engine(model, engine, face_shape=sizes["face_shape"], context_shape=sizes["context_shape"],
                       batch_sizes=batch_sizes, **kwargs)
    return ckpt, eng


def engine_shapes(model: nn.Module, face_size, context_size, crop=None, clip_frames: Optional[int] = None):
    """(face_shape, context_shape) without the batch dimension for ``model`` fed at these preprocessing
    sizes (``crop``: the centred square side, or a (top, left, h, w) box, or None)."""
    if crop is not None and not isinstance(crop, int):
        crop = int(crop[2])
    seen = (min(crop, *context_size),) * 2 if crop else tuple(context_size)
    if isinstance(model, CAERNet):
        t = int(clip_frames or getattr(model, "frames", 16))
        return (3, t, *face_size), (3, t, *seen)
    return (3, *face_size), (3, *seen)


__all__ = ["AUTO_CANDIDATES", "BackgroundAuto", "BuildContext", "CACHE_VERSION", "ENGINES", "Engine", "EngineError", "EngineSpec",
           "FP32_ENGINES", "Int8Engine", "Manifest", "OnnxRuntimeEngine", "OpenVinoEngine", "TorchEngine", "auto_candidates",
           "build_engine", "cache_root", "compare", "default_shapes", "engine_key", "engine_names",
           "engine_for_checkpoint", "engine_shapes", "file_digest", "library_versions", "lookup_engine", "model_hash", "register_engine",
           "time_engine"]
