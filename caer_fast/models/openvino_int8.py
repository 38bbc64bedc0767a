"""int8 inference of the video CAER-Net (and CAER-Net-S) with OpenVINO + NNCF post-training quantization.

The PT2E quantizer behind :func:`caer_fast.quantize_int8` has no Conv3d; OpenVINO's CPU plugin runs int8
Conv3d on VNNI / AMX. The path: our ONNX export (:func:`caer_fast.export.export_model_onnx`) →
``nncf.quantize`` calibrated on real clips (a CAER tree, or the ``calibration.pt`` that ``train`` saves
beside its checkpoint; :mod:`caer_fast.data.calibration`) → compiled for this CPU → checked by
:func:`int8_guard` (top-1 agreement with the fp32 model on held-out clips) before it may answer.

Needs the optional ``openvino`` and ``nncf`` packages (``pip install caer_fast[int8]``).

    >>> int8 = quantize_openvino_int8("caer.onnx", calibration)          # doctest: +SKIP
    >>> engine = OpenVinoInt8Engine(int8, threads=2)                      # doctest: +SKIP
    >>> report = int8_guard(model, engine, held_out)                      # {"agreement": 1.0, ...}
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn

MIN_AGREEMENT = 0.99  # top-1 agreement with fp32 on held-out clips below this refuses the int8 engine


class Int8AccuracyError(RuntimeError):
    """The int8 model disagrees with the fp32 model on held-out clips more than allowed."""


def _need(package: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"int8 for the video model needs {package} (pip install 'caer_fast[int8]', i.e. "
                          f"openvino and nncf==3.4.0): {exc}") from exc


def _pairs(batches) -> list:
    """(face, context) float32 CPU tensors from (face, context[, …]) tuples or {'face', 'context'} dicts."""
    out = []
    for b in batches:
        face, context = (b["face"], b["context"]) if isinstance(b, dict) else (b[0], b[1])
        if not (isinstance(face, torch.Tensor) and isinstance(context, torch.Tensor)) or face.shape[0] != \
                context.shape[0] or face.dim() not in (4, 5):
            raise ValueError("calibration / held-out items must be (face, context) batches of N×3×[T×]H×W tensors")
        out.append((face.detach().float().cpu().contiguous(), context.detach().float().cpu().contiguous()))
    if not out:
        raise ValueError("no calibration batches (give a few dozen real clips)")
    return out


def quantize_openvino_int8(onnx_path, calibration: Iterable, *, subset_size: Optional[int] = None,
                           save_to=None, fast_bias_correction: bool = True):
    """NNCF post-training quantization of an ONNX export of our model: returns the int8 ``openvino.Model``.

    Args:
        onnx_path: the model exported by :func:`caer_fast.export.export_model_onnx` (inputs ``face``,
            ``context``; outputs ``logits``, ``attention``, ``fusion_weights``).
        calibration: (face, context) batches preprocessed as at test time (real clips: see
            :func:`caer_fast.data.calibration.load_calibration_sample` / ``video_calibration_batches``).
        subset_size: how many calibration *batches* NNCF reads (default: all).
        save_to: also write the int8 IR there (``.xml`` + ``.bin``) so later processes skip the quantization.

    The first and last layers are quantized too (NNCF's ``performance`` preset, symmetric int8 weights
    per channel): the accuracy is checked afterwards by :func:`int8_guard`, not assumed.
    """
    ov = _need("openvino")
    nncf = _need("nncf")
    pairs = _pairs(calibration)
    model = ov.Core().read_model(str(onnx_path))
    data = nncf.Dataset(pairs, lambda p: {"face": p[0].numpy(), "context": p[1].numpy()})
    int8 = nncf.quantize(model, data, subset_size=subset_size or len(pairs),
                         fast_bias_correction=fast_bias_correction)
    if save_to is not None:
        save_to = Path(save_to)
        save_to.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(int8, str(save_to), compress_to_fp16=False)
    return int8


def compile_int8(model, threads: Optional[int] = None, cache_dir=None):
    """Compile an int8 ``openvino.Model`` (or a saved ``.xml``) for this CPU: ``openvino.CompiledModel``.

    Layers NNCF left in float run in fp32 (``INFERENCE_PRECISION_HINT=f32``; on bf16 CPUs OpenVINO would
    otherwise pick bf16 for them)."""
    ov = _need("openvino")
    config = {"INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads()), "INFERENCE_PRECISION_HINT": "f32",
              "PERFORMANCE_HINT": "LATENCY"}
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        config["CACHE_DIR"] = str(cache_dir)
    core = ov.Core()
    source = str(model) if isinstance(model, (str, Path)) else model
    return core.compile_model(source, "CPU", config)


def loaded_from_cache(compiled) -> Optional[bool]:
    """Whether OpenVINO loaded ``compiled`` from its CACHE_DIR instead of compiling it (None where this
    OpenVINO lacks the property)."""
    try:
        return bool(compiled.get_property("LOADED_FROM_CACHE"))
    except Exception:
        return None


class OpenVinoInt8Engine(nn.Module):
    """The int8 model as an engine: ``run(face, context) -> (logits, attention, fusion_weights)`` torch
    tensors; called like the model (``forward(face, context, return_details=False)``). ``info`` says what
    was built (threads, time, OpenVINO version, the guard's result once :func:`int8_guard` has run)."""

    name = "openvino-int8"

    def __init__(self, model, threads: Optional[int] = None, cache_dir=None):
        super().__init__()
        ov = _need("openvino")
        t = time.perf_counter()
        compiled = model if isinstance(model, ov.CompiledModel) else compile_int8(model, threads, cache_dir)
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.outputs = list(compiled.outputs)
        self._lock = threading.Lock()  # one infer request: one call at a time
        self.info: Dict = {"engine": self.name, "threads": int(threads or torch.get_num_threads()),
                           "compile_s": round(time.perf_counter() - t, 3), "version": ov.get_version()}

    def run(self, face: torch.Tensor, context: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = face.shape[0]
        if n == 0:  # the CPU plugin refuses empty inputs
            logits, attention, weights = self.run(face.new_zeros((1, *face.shape[1:])),
                                                  context.new_zeros((1, *context.shape[1:])))
            return logits[:0], attention[:0], weights[:0]
        feed = {"face": face.detach().to("cpu", torch.float32).contiguous().numpy(),
                "context": context.detach().to("cpu", torch.float32).contiguous().numpy()}
        with self._lock:
            result = self.request.infer(feed)
            return tuple(torch.from_numpy(result[o].copy()) for o in self.outputs)  # buffers are reused

    def forward(self, face: torch.Tensor, context: torch.Tensor, return_details: bool = False):
        logits, attention, weights = self.run(face, context)
        if return_details:
            return logits, {"attention": attention, "fusion_weights": weights}
        return logits


def _logits(fn: Callable, face, context) -> torch.Tensor:
    with torch.inference_mode():
        out = fn.run(face, context) if hasattr(fn, "run") else fn(face, context)
    return (out[0] if isinstance(out, (tuple, list)) else out).float()


def int8_guard(reference: Callable, int8: Callable, held_out: Iterable,
               min_agreement: float = MIN_AGREEMENT) -> Dict:
    """Top-1 agreement and max |Δlogit| of ``int8`` against ``reference`` (the fp32 model, or any callable
    returning logits first) on ``held_out`` (face, context) batches — clips not used for calibration.

    Returns ``{"agreement", "max_abs", "n", "ok"}``; ``ok`` is agreement ≥ ``min_agreement``."""
    agree, n, worst = 0, 0, 0.0
    for face, context in _pairs(held_out):
        r, q = _logits(reference, face, context), _logits(int8, face, context)
        if r.shape != q.shape or not torch.isfinite(q).all():
            return {"agreement": 0.0, "max_abs": float("inf"), "n": int(face.shape[0]), "ok": False}
        agree += int((r.argmax(-1) == q.argmax(-1)).sum())
        n += int(face.shape[0])
        worst = max(worst, float((r - q).abs().max()))
    agreement = agree / max(n, 1)
    return {"agreement": agreement, "max_abs": worst, "n": n, "ok": agreement >= min_agreement}


def build_int8_engine(model: nn.Module, onnx_path, calibration: Iterable, held_out: Iterable, work_dir, *,
                      threads: Optional[int] = None, min_agreement: float = MIN_AGREEMENT) -> OpenVinoInt8Engine:
    """Quantize ``onnx_path`` (``model``'s export, :func:`caer_fast.serving.onnx.export_model_onnx`, at the
    calibration clips' size) into ``work_dir``, compile, guard against ``model``. Raises
    :class:`Int8AccuracyError` when the guard fails. (The ``int8`` engine of
    :mod:`caer_fast.serving.engines` does these steps with its cache.)

    The engine's ``input_shapes`` are the calibration sizes (the export is for one size, dynamic batch)."""
    calib = _pairs(calibration)
    face_shape, context_shape = tuple(calib[0][0].shape[1:]), tuple(calib[0][1].shape[1:])
    work_dir = Path(work_dir)
    t = time.perf_counter()
    int8 = quantize_openvino_int8(onnx_path, calib, save_to=work_dir / "model-int8.xml")
    quantize_s = time.perf_counter() - t
    engine = OpenVinoInt8Engine(int8, threads=threads, cache_dir=work_dir / "ov_cache")
    engine.input_shapes = (face_shape, context_shape)
    report = int8_guard(model.eval(), engine, held_out, min_agreement)
    engine.info.update(guard=report, quantize_s=round(quantize_s, 2), calibration_samples=sum(len(f) for f, _ in calib),
                       ir=str(work_dir / "model-int8.xml"))
    if not report["ok"]:
        raise Int8AccuracyError(f"int8 model agrees with fp32 on {report['agreement']:.1%} of {report['n']} held-out "
                                f"clips (needs {min_agreement:.0%}; max |Δlogit| {report['max_abs']:.3g}): "
                                f"not used")
    return engine


def calibration_shapes(batches: Sequence) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(face, context) sizes without the batch dimension, checked equal over ``batches``."""
    pairs = _pairs(batches)
    shapes = {(tuple(f.shape[1:]), tuple(c.shape[1:])) for f, c in pairs}
    if len(shapes) != 1:
        raise ValueError(f"calibration batches have different sizes: {sorted(shapes)}")
    return shapes.pop()
