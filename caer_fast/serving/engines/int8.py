"""``int8``: the model in int8 on CPU, calibrated on real data.

- the image model (CAER-Net-S): :func:`caer_fast.quantize_int8` (PT2E, oneDNN int8 kernels through
  ``torch.compile``); ``warmup_batch_sizes`` (default: ``batch_sizes``) are compiled before it is returned;
- the video model (CAER-Net): our ONNX export quantized by NNCF and compiled by OpenVINO
  (:mod:`caer_fast.models.openvino_int8`), checked by :func:`~caer_fast.models.openvino_int8.int8_guard`
  (top-1 agreement with fp32 ≥ 99 % on held-out clips) before it may answer. The int8 IR and the guard's
  report are cached in the engine's cache entry under the calibration data's digest
  (``int8-<digest>.xml/.bin/.json``), so a second start neither quantizes nor guards again.

Options (``build_engine(..., calibration=..., ...)``, or ``--engine int8`` with ``--calibrate ROOT``, or
nothing when ``calibration.pt`` lies beside the checkpoint): ``calibration`` is a CAER / CAER-S tree (read at
``calibration_sizes``, the checkpoint's preprocessing sizes), a ``calibration.pt`` sample that ``train``
wrote, or ready (face, context) batches; ``calibration_samples`` items are read from a tree.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from ...data.calibration import calibration_batches, load_calibration_sample, video_calibration_batches
from ...models.caer_net import CAERNet
from ...models.openvino_int8 import (MIN_AGREEMENT, OpenVinoInt8Engine, compile_int8, int8_guard, loaded_from_cache,
                                     quantize_openvino_int8)
from ...models.quantize import QuantizationUnavailable, check_quantizable, quantize_int8
from .base import BuildContext, Engine, EngineError, register_engine, release_memory
from .cache import write_json_atomic
from .torch_engines import TorchEngine


class Int8Engine(TorchEngine):
    """:func:`caer_fast.quantize_int8`'s model (image model only)."""

    def __init__(self, int8_model: nn.Module):
        Engine.__init__(self, "int8")
        self.model = int8_model
        self.info.update(getattr(int8_model, "info", {}))


class OpenVinoInt8VideoEngine(Engine):
    """The video model quantized by NNCF, compiled by OpenVINO (:class:`OpenVinoInt8Engine`) as an engine."""

    def __init__(self, inner: OpenVinoInt8Engine):
        super().__init__("int8")
        self.inner = inner
        self.info.update(inner.info, engine="int8", backend="openvino-int8")

    def run(self, face, context):
        return self.inner.run(face, context)


def _sizes(ctx: BuildContext):
    sizes = ctx.options.get("calibration_sizes") or {}
    face = sizes.get("face_size") or ctx.face_shape[-2:]
    context = sizes.get("context_size") or ctx.context_shape[-2:]
    crop = sizes.get("crop") if "crop" in sizes else None
    return tuple(face), tuple(context), crop


def _read_calibration(ctx: BuildContext, root) -> list:
    face, context, crop = _sizes(ctx)
    samples = int(ctx.options.get("calibration_samples") or 64)
    t = time.perf_counter()
    batches = calibration_batches(root, samples, face_size=face, context_size=context, crop=crop)
    ctx.say(f"int8: read {sum(len(f) for f, _ in batches)} calibration images from {root} in "
            f"{time.perf_counter() - t:.1f}s")
    return batches


def _clips(batches) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """One (face, context) batch per clip, views of ``batches`` where they are float32 already (no copy).

    Batches of one: NNCF's statistics collection holds the activations of every quantized layer for a whole
    batch at once (+500 MiB at batch 4 for the full-size model), and the guard runs the eager model beside."""
    return [(f[i:i + 1].float().contiguous(), c[i:i + 1].float().contiguous()) for f, c, *_ in batches
            for i in range(len(f))]


def _video_data(ctx: BuildContext, calibration) -> Tuple[list, list, str]:
    """(calibration clips, held-out clips, where they came from) for the video model, one clip a batch."""
    if isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration)
        if path.is_file():
            clips, where = _clips(load_calibration_sample(path, batch_size=1)), str(path)  # views of the file's tensors
        else:
            face, context, crop = _sizes(ctx)
            kw = dict(clip_frames=int(ctx.face_shape[1]), face_size=face, context_size=context, crop=crop,
                      batch_size=1)
            samples = int(ctx.options.get("calibration_samples") or 32)
            t = time.perf_counter()
            calib = video_calibration_batches(path, samples, **kw)
            try:  # held out: the test split's clips; a tree without one: the clips beside the calibration picks
                held = video_calibration_batches(path, samples, split="test", **kw)
            except (FileNotFoundError, ValueError):
                held = video_calibration_batches(path, max(samples // 4, 1), offset=1, **kw)
            ctx.say(f"int8: read {len(calib)} calibration and {len(held)} held-out clips from {path} in "
                    f"{time.perf_counter() - t:.1f}s")
            return _clips(calib), _clips(held), str(path)
    else:
        clips, where = _clips(calibration), "the given batches"
    # one sample (calibration.pt, or batches): every 4th clip is held out for the guard, the rest calibrate
    held = clips[3::4]
    if not held or len(held) == len(clips):
        raise EngineError(f"int8: {where} has {len(clips)} clips; give at least 4 (train saves 32)")
    return [c for i, c in enumerate(clips) if i % 4 != 3], held, where


def _digest(batches) -> str:
    h = hashlib.sha256()
    for f, c in batches:
        for t in (f, c):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class _ThreadRoutedStdout:
    """A ``sys.stdout`` that sends the writes of the threads in ``keep`` to ``real`` and all others to stderr."""

    def __init__(self, real, keep):
        self._real, self._keep = real, keep

    def _target(self):
        return self._real if threading.get_ident() in self._keep else sys.stderr

    def write(self, text):
        return self._target().write(text)

    def flush(self):
        return self._target().flush()

    def __getattr__(self, name):
        return getattr(self._target(), name)


@contextlib.contextmanager
def _stdout_of_this_thread_to_stderr():
    """Within the block, what this thread (and any thread it starts) prints goes to stderr; threads already
    running keep the real stdout. ``contextlib.redirect_stdout`` is process-wide: while ``auto`` quantized in
    the background, it sent the answer ``predict --json`` printed meanwhile to stderr."""
    real = sys.stdout
    route = _ThreadRoutedStdout(real, {t.ident for t in threading.enumerate()} - {threading.get_ident()})
    sys.stdout = route
    try:
        yield
    finally:
        if sys.stdout is route:
            sys.stdout = real


def _calibration_file(calibration) -> Optional[Path]:
    """``calibration`` as a file (a ``calibration.pt``), or None (a tree, or batches)."""
    if isinstance(calibration, (str, os.PathLike)) and Path(calibration).is_file():
        return Path(calibration)
    return None


def _int8_files(ctx: BuildContext, digest: str) -> Tuple[Path, Path, Path]:
    """(IR, guard report, OpenVINO's compiled blobs) of the int8 model for calibration data of ``digest``."""
    work = ctx.workdir()
    return work / f"int8-{digest}.xml", work / f"int8-{digest}.json", work / "openvino-int8"


def _cached_int8(ctx: BuildContext, digest: str, min_agreement: float):
    """The int8 engine the cache entry holds for calibration data of ``digest`` (its IR, compiled blobs and
    guard report, all as recorded in the manifest, and a guard that passed at ``min_agreement``), or None."""
    man = ctx.manifest
    if man is None:
        return None
    xml, report_file, blobs = _int8_files(ctx, digest)
    man.check_tree(blobs)
    if not all(man.check(p) for p in (xml, xml.with_suffix(".bin"), report_file)):
        return None
    report = json.loads(report_file.read_text())
    if not report["guard"]["ok"] or report["guard"]["agreement"] < min_agreement:
        return None  # a stricter threshold now: guard again
    compiled = compile_int8(xml, ctx.threads, blobs)
    if not loaded_from_cache(compiled):
        man.record(blobs)  # compiled again (a damaged blob was removed, other threads): trusted at the next start
    inner = OpenVinoInt8Engine(compiled, threads=ctx.threads)
    inner.info.update(guard=report["guard"], quantize_s=report.get("quantize_s"))
    return inner


def _quantized_int8(ctx: BuildContext, calib: list, held: list, where: str, digest: str, min_agreement: float):
    """Quantize (NNCF), compile (OpenVINO) and guard the video model; the IR, blobs and report go into the
    cache entry when the guard passed."""
    man = ctx.manifest
    xml, report_file, blobs = _int8_files(ctx, digest)
    onnx_path, _ = ctx.onnx_file()
    release_memory()  # the export's graph and buffers, before NNCF's peak
    ctx.say(f"int8: quantizing the video model (NNCF, OpenVINO) on {sum(len(f) for f, _ in calib)} clips "
            f"of {where} …")
    tq = time.perf_counter()
    with _stdout_of_this_thread_to_stderr():  # NNCF's progress bar: stdout is the answer's (--json)
        model = quantize_openvino_int8(onnx_path, calib, save_to=xml)
    quantize_s = round(time.perf_counter() - tq, 2)
    release_memory()  # NNCF's statistics
    inner = OpenVinoInt8Engine(model, threads=ctx.threads, cache_dir=blobs if man else None)
    del model
    guard = int8_guard(ctx.model, inner, held, min_agreement)
    inner.info.update(guard=guard, quantize_s=quantize_s)
    if guard["ok"] and man is not None:
        write_json_atomic(report_file, {"guard": guard, "quantize_s": quantize_s, "calibration": where,
                                        "calibration_digest": digest})
        man.record(xml, xml.with_suffix(".bin"), report_file)
    if man is not None and blobs.is_dir():
        man.record(blobs)  # what OpenVINO compiled now (what was there before passed check_tree)
    return inner


def build_video_int8(ctx: BuildContext, calibration) -> Engine:
    min_agreement = float(ctx.options.get("min_agreement", MIN_AGREEMENT))
    man = ctx.manifest
    source = _calibration_file(calibration)
    t = time.perf_counter()
    try:
        # a warm start with an unchanged calibration.pt finds its digest by the file's stat: the ~130 MiB of
        # clips are read only to quantize (or when the cache has nothing for them)
        digest = man.source_digest(source) if man is not None and source is not None else None
        inner = _cached_int8(ctx, digest, min_agreement) if digest is not None else None
        cached, where = inner is not None, str(source)
        if inner is None:
            calib, held, where = _video_data(ctx, calibration)
            got = (tuple(calib[0][0].shape[1:]), tuple(calib[0][1].shape[1:]))
            if got != (ctx.face_shape, ctx.context_shape):
                raise EngineError(f"int8: the calibration clips of {where} are face {got[0]} / context {got[1]}; the "
                                  f"model here takes {ctx.face_shape} / {ctx.context_shape} (calibrate at the "
                                  "checkpoint's sizes)")
            digest = _digest(calib + held)
            inner = _cached_int8(ctx, digest, min_agreement)
            cached = inner is not None
            if inner is None:
                inner = _quantized_int8(ctx, calib, held, where, digest, min_agreement)
            del calib, held
            if man is not None and source is not None and inner.info["guard"]["ok"]:
                man.remember_source(source, digest)
    except ImportError as exc:
        raise EngineError(str(exc).splitlines()[0]) from exc
    guard = inner.info["guard"]
    if not guard["ok"]:
        raise EngineError(f"int8: the int8 model agrees with fp32 on {guard['agreement']:.1%} of {guard['n']} held-out "
                          f"clips (needs {min_agreement:.0%}; max |Δlogit| {guard['max_abs']:.3g}): not used")
    ctx.say(f"int8: {'loaded from the cache' if cached else 'quantized'} in {time.perf_counter() - t:.1f}s; "
            f"agreement with fp32 {guard['agreement']:.1%} on {guard['n']} held-out clips")
    eng = OpenVinoInt8VideoEngine(inner)
    eng.info.update(calibration=where, calibration_digest=digest, loaded_from_cache=cached,
                    ir=str(_int8_files(ctx, digest)[0]))
    eng.input_shapes = (ctx.face_shape, ctx.context_shape)
    return eng


@register_engine("int8", fp32=False, description="int8 on CPU: the image model through caer_fast.quantize_int8, "
                                                 "the video model through OpenVINO + NNCF (needs calibration data)")
def build_int8(ctx: BuildContext) -> Engine:
    calibration = ctx.options.get("calibration")
    if calibration is None:
        raise EngineError("the int8 engine needs calibration data: --calibrate ROOT, or the calibration.pt that "
                          "train writes beside the checkpoint")
    if isinstance(ctx.model, CAERNet):
        try:
            return build_video_int8(ctx, calibration)
        except (TypeError, ValueError, FileNotFoundError, RuntimeError) as exc:
            if isinstance(exc, EngineError):
                raise
            raise EngineError(str(exc)) from exc
    try:
        check_quantizable(ctx.model)  # before any calibration data is read
        if isinstance(calibration, (str, os.PathLike)):
            calibration = (load_calibration_sample(calibration, batch_size=16) if Path(calibration).is_file()
                           else _read_calibration(ctx, Path(calibration)))
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
