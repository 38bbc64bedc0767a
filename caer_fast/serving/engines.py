"""Inference engines for one of our models, and the measured choice between them.

An engine is called like the model: ``engine(face, context, return_details=False)`` returns the logits,
or ``(logits, {"attention": …, "fusion_weights": …})`` with ``return_details=True`` — what
:class:`~caer_fast.serving.inference.Predictor` calls. Engines (``ENGINES``):

- ``eager``: the model itself under ``torch.inference_mode``;
- ``compiled``: :func:`caer_fast.optimize` (``torch.compile``; pays a compile on first use of each batch-size
  range in every new process);
- ``onnxruntime``: our ONNX export (:func:`caer_fast.export.export_model_onnx`, the fused ops as plain
  softmax / mul / reduce so ONNX Runtime fuses them) in an ONNX Runtime CPU session;
- ``openvino``: the same ONNX file compiled by OpenVINO for this CPU, in fp32 (optional package:
  ``pip install openvino``; the fastest correct engine for the video model on AVX2 CPUs, bench/RESULTS.md);
- ``int8``: :func:`caer_fast.quantize_int8` (image model; needs calibration data);
- ``auto``: measures the fp32 candidates on this machine (:func:`auto_candidates`: ONNX Runtime, OpenVINO
  where installed, eager), rejects any whose outputs differ from the eager reference, keeps the fastest.

No compile wait: the ONNX file, ONNX Runtime's optimised graph, OpenVINO's compiled model and the ``auto``
decision live in an
on-disk cache (``$CAER_FAST_CACHE_DIR/engines/<key>``, see :func:`engine_key`) keyed by the model's
weights, the batch-size range, the thread count, the CPU's flags and the library versions, so a second
start on the same machine loads files instead of exporting, optimising and measuring again. ONNX Runtime
and OpenVINO take every batch size in one graph: nothing is rebuilt per size.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

log = logging.getLogger("caer_fast.engines")

ENGINES = ("auto", "eager", "compiled", "onnxruntime", "openvino", "int8")
FP32_ENGINES = ("eager", "compiled", "onnxruntime", "openvino")
# what `auto` measures by default (openvino where it is installed): the compiled engine pays a compile in
# every new process (no on-disk artefact yet), which breaks the "first answer within a second" promise, so
# it is measured only when asked
AUTO_CANDIDATES = ("onnxruntime", "openvino", "eager")
# 2: the export pools over the position axes (OpenVINO computed version 1's model.onnx wrongly at batch >= 2)
CACHE_VERSION = 2
# fp32 engines must agree with the eager reference this closely (max |Δ| over logits, attention, weights)
FP32_ATOL, FP32_RTOL = 1e-3, 1e-3


class EngineError(RuntimeError):
    """An engine cannot be built here (missing package, wrong device, bad option)."""


# -- keys ----------------------------------------------------------------------------------------------

def cpu_flags() -> List[str]:
    """The vector-ISA flags torch sees on this CPU (``torch.cpu.get_capabilities()``), sorted."""
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # older torch: fall back to the kernel's list
        caps = {}
    flags = sorted(k for k, v in caps.items() if v is True)
    if not flags:
        try:
            text = Path("/proc/cpuinfo").read_text()
            line = next(ln for ln in text.splitlines() if ln.startswith("flags"))
            flags = sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "amx", "sse4")))
        except Exception:
            flags = []
    return flags


def has_native_bf16() -> bool:
    """Does this CPU compute bf16 natively (AVX-512 BF16 or AMX-BF16)? AVX2-only CPUs emulate it."""
    flags = set(cpu_flags())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def model_hash(model: nn.Module) -> str:
    """sha256 of the model's class, configuration and every state_dict tensor (names, shapes, bytes)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for attr in ("frames",):
        h.update(repr(getattr(model, attr, None)).encode())
    fusion = getattr(model, "fusion_net", None)
    if fusion is not None:
        h.update(repr((fusion.use_face, fusion.use_context, fusion.concat)).encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _versions() -> Dict[str, str]:
    """torch's and the installed engines' versions (read from their metadata: nothing is imported)."""
    from importlib import metadata

    out = {"torch": torch.__version__}
    for package in ("onnxruntime", "openvino"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def engine_key(model: nn.Module, face_shape, context_shape, batch_sizes: Sequence[int],
               threads: Optional[int] = None) -> str:
    """The cache key: model weights, input shapes, batch range, threads, CPU flags, versions."""
    threads = threads or torch.get_num_threads()
    doc = {"v": CACHE_VERSION, "model": model_hash(model), "face": list(face_shape), "context": list(context_shape),
           "batch": [min(batch_sizes), max(batch_sizes)], "threads": int(threads), "cpu": cpu_flags(),
           "versions": _versions()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def cache_root() -> Path:
    """``$CAER_FAST_CACHE_DIR/engines`` (default ``~/.cache/caer_fast/engines``)."""
    from ..data.index_cache import cache_dir

    return cache_dir() / "engines"


def _write_json_atomic(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True))
    os.replace(tmp, path)


# -- engines -------------------------------------------------------------------------------------------

class Engine(nn.Module):
    """Base: ``name``, ``info`` (what was built, how long it took, cache hits), the model's call signature."""

    name = "engine"
    #: (face, context) sizes without the batch dimension, for engines built for one size (the ONNX ones)
    input_shapes: Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]] = None

    def __init__(self, name: Optional[str] = None):
        super().__init__()
        if name is not None:
            self.name = name
        self.info: Dict = {"engine": self.name}

    def run(self, face: torch.Tensor, context: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, face: torch.Tensor, context: torch.Tensor, return_details: bool = False):
        if self.input_shapes is not None:
            want_face, want_context = self.input_shapes
            if (tuple(face.shape[1:]) != want_face or tuple(context.shape[1:]) != want_context
                    or face.shape[0] != context.shape[0]):
                raise ValueError(
                    f"the {self.name} engine was built for face N×{'×'.join(map(str, want_face))} and context "
                    f"N×{'×'.join(map(str, want_context))}; got {tuple(face.shape)} and {tuple(context.shape)} "
                    "(build an engine for these sizes)")
        logits, attention, weights = self.run(face, context)
        if return_details:
            return logits, {"attention": attention, "fusion_weights": weights}
        return logits

    def extra_repr(self) -> str:
        return f"name={self.name}"


class TorchEngine(Engine):
    """``eager`` (the model) or ``compiled`` (:func:`caer_fast.optimize`), under ``inference_mode``."""

    def __init__(self, model: nn.Module, compiled: bool = False):
        super().__init__("compiled" if compiled else "eager")
        if compiled:
            from ..models.optimize import optimize

            self.model = optimize(model, "inference")
        else:
            self.model = model.eval()

    def run(self, face, context):
        with torch.inference_mode():
            logits, d = self.model(face, context, return_details=True)
        return logits, d["attention"], d["fusion_weights"]


class Int8Engine(TorchEngine):
    """:func:`caer_fast.quantize_int8`'s model (image model only)."""

    def __init__(self, int8_model: nn.Module):
        Engine.__init__(self, "int8")
        self.model = int8_model
        self.info.update(getattr(int8_model, "info", {}))


def _onnx_feed(face: torch.Tensor, context: torch.Tensor) -> Dict:
    """The ONNX graph's inputs: contiguous float32 CPU arrays named as in the export."""
    return {"face": face.detach().to("cpu", torch.float32).contiguous().numpy(),
            "context": context.detach().to("cpu", torch.float32).contiguous().numpy()}


class OnnxRuntimeEngine(Engine):
    """Our ONNX export in an ONNX Runtime CPU session (all graph optimisations, this machine's kernels).

    ``optimized`` is where ORT writes the graph it optimised for this CPU; when that file exists it is
    loaded instead of the plain export, with the optimisations already applied (no work at start-up)."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, threads: Optional[int] = None, optimized: Optional[Path] = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineError(f"the onnxruntime engine needs onnxruntime (pinned in requirements.txt): {exc}") from exc
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
                log.warning("ignoring the cached optimised graph %s (%s)", optimized, exc)
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
        out = self.session.run(None, _onnx_feed(face, context))
        return tuple(torch.from_numpy(o) for o in out)


class OpenVinoEngine(Engine):
    """Our ONNX export compiled by OpenVINO for this CPU.

    fp32 is forced (on CPUs with bf16 OpenVINO would otherwise compute in bf16). ``cache_dir`` is
    OpenVINO's own cache of compiled models: a second start imports the compiled blob instead of compiling."""

    name = "openvino"

    def __init__(self, onnx_path: Path, threads: Optional[int] = None, cache_dir: Optional[Path] = None):
        super().__init__()
        try:
            import openvino as ov
        except ImportError as exc:
            raise EngineError(f"the openvino engine needs openvino (optional: pip install openvino==2026.4.1): {exc}") \
                from exc
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
        try:
            from_cache = bool(self.compiled.get_property("LOADED_FROM_CACHE"))
        except Exception:  # a property this OpenVINO does not have
            from_cache = None
        self.info.update(onnx=str(onnx_path), cache_dir=str(cache_dir) if cache_dir else None, threads=threads,
                         loaded_from_cache=from_cache, session_s=round(time.perf_counter() - t, 3),
                         version=ov.get_version())

    def run(self, face, context):
        n = face.shape[0]
        if n == 0:  # OpenVINO's CPU plugin refuses empty inputs; ONNX Runtime and eager answer with empty outputs
            logits, attention, weights = self.run(face.new_zeros((1, *face.shape[1:])),
                                                  context.new_zeros((1, *context.shape[1:])))
            return logits[:0], attention[:0], weights[:0]
        feed = _onnx_feed(face, context)
        with self._lock:
            result = self.request.infer(feed)
            # copies: the request reuses its output buffers on the next call
            return tuple(torch.from_numpy(result[o].copy()) for o in self.outputs)


# -- correctness and speed ------------------------------------------------------------------------------

def _inputs(face_shape, context_shape, batch: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *face_shape, generator=g), torch.randn(batch, *context_shape, generator=g)


def compare(reference: Callable, engine: Callable, face_shape, context_shape, batch_sizes: Iterable[int] = (1, 3),
            seed: int = 0) -> Dict:
    """Outputs of ``engine`` against ``reference`` (both called like the model) on fresh random inputs.

    Returns ``max_abs`` (largest |Δ| of the logits), ``max_abs_details`` (attention and fusion weights),
    ``agreement`` (share of equal argmax) and ``ok`` (within the fp32 tolerance). Batch sizes ≥ 2 matter:
    an engine can be right at batch 1 and wrong at 2 (OpenVINO 2026.4's fusion weights, see bench/)."""
    worst, worst_d, agree, n = 0.0, 0.0, 0, 0
    ok = True
    for i, b in enumerate(batch_sizes):
        face, context = _inputs(face_shape, context_shape, int(b), seed + i)
        with torch.inference_mode():
            r_logits, r_d = reference(face, context, return_details=True)
            e_logits, e_d = engine(face, context, return_details=True)
        pairs = [(r_logits, e_logits), (r_d["attention"], e_d["attention"]),
                 (r_d["fusion_weights"], e_d["fusion_weights"])]
        for k, (r, e) in enumerate(pairs):
            r, e = r.float().cpu(), e.float().cpu()
            if r.shape != e.shape or not torch.isfinite(e).all():
                ok = False
                d = float("inf")
            else:
                d = float((r - e).abs().max())
                ok &= bool(torch.allclose(e, r, atol=FP32_ATOL, rtol=FP32_RTOL))
            if k == 0:
                worst = max(worst, d)
            else:
                worst_d = max(worst_d, d)
        if r_logits.shape == e_logits.shape:
            agree += int((r_logits.argmax(-1) == e_logits.argmax(-1)).sum())
        n += int(b)
    return {"max_abs": worst, "max_abs_details": worst_d, "agreement": agree / max(n, 1), "ok": ok}


def time_engine(engine: Callable, face_shape, context_shape, batch: int, repeats: int = 3,
                min_time: float = 0.0) -> float:
    """Median seconds per call at ``batch`` after one warm-up call."""
    face, context = _inputs(face_shape, context_shape, batch, 123)
    with torch.inference_mode():
        engine(face, context, return_details=True)
        times = []
        start = time.perf_counter()
        while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 50):
            t = time.perf_counter()
            engine(face, context, return_details=True)
            times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


# -- building ---------------------------------------------------------------------------------------------

def auto_candidates() -> Tuple[str, ...]:
    """What ``auto`` measures by default here: ``AUTO_CANDIDATES``, less openvino where it is not installed."""
    return tuple(n for n in AUTO_CANDIDATES if n != "openvino" or importlib.util.find_spec("openvino") is not None)


def default_shapes(model: nn.Module) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The paper's input sizes (no batch dimension): image 3×96×96 / 3×112×112, video 3×T×… of the model."""
    from ..models.caer_net import CAERNet

    if isinstance(model, CAERNet):
        t = int(getattr(model, "frames", 16))
        return (3, t, 96, 96), (3, t, 112, 112)
    return (3, 96, 96), (3, 112, 112)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _Builder:
    def __init__(self, model, face_shape, context_shape, batch_sizes, threads, cache_dir, say):
        self.model = model.eval()
        self.face_shape, self.context_shape = tuple(face_shape), tuple(context_shape)
        self.batch_sizes = sorted({max(1, int(b)) for b in batch_sizes}) or [1]
        self.threads = int(threads or torch.get_num_threads())
        self.key = engine_key(model, self.face_shape, self.context_shape, self.batch_sizes, self.threads)
        self.dir = Path(cache_dir) / self.key if cache_dir is not None else None
        self.say = say
        self._tmpdir: Optional[Path] = None

    def build(self, name: str) -> Engine:
        if name == "eager":
            return TorchEngine(self.model)
        if name == "compiled":
            return TorchEngine(self.model, compiled=True)
        if name in ("onnxruntime", "openvino"):
            eng = self.onnxruntime() if name == "onnxruntime" else self.openvino()
            eng.input_shapes = (self.face_shape, self.context_shape)
            return eng
        raise EngineError(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})")

    def onnx_file(self) -> Tuple[Path, Dict]:
        """Our ONNX export, from the cache or written now (into a temporary folder without a cache)."""
        from ..export import export_model_onnx

        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            onnx_path = self.dir / "model.onnx"
        else:
            if self._tmpdir is None:
                import tempfile

                self._tmpdir = Path(tempfile.mkdtemp(prefix="caer_fast_engine_"))
            onnx_path = self._tmpdir / "model.onnx"
        t = time.perf_counter()
        exported = False
        if not onnx_path.is_file():
            self.say(f"engine: exporting the model to ONNX ({onnx_path}) …")
            export_model_onnx(self.model, self.face_shape, self.context_shape, onnx_path)
            exported = True
        return onnx_path, {"exported": exported, "export_s": round(time.perf_counter() - t, 3)}

    def onnxruntime(self) -> OnnxRuntimeEngine:
        onnx_path, info = self.onnx_file()
        optimized = self.dir / "model.ort-optimized.onnx" if self.dir is not None else None
        eng = OnnxRuntimeEngine(onnx_path, self.threads, optimized)
        eng.info.update(info)
        return eng

    def openvino(self) -> OpenVinoEngine:
        onnx_path, info = self.onnx_file()
        eng = OpenVinoEngine(onnx_path, self.threads, self.dir / "openvino" if self.dir is not None else None)
        eng.info.update(info)
        return eng


def build_engine(model: nn.Module, engine: str = "auto", *, face_shape=None, context_shape=None,
                 batch_sizes: Sequence[int] = (1, 16), threads: Optional[int] = None,
                 candidates: Optional[Sequence[str]] = None, cache_dir="default", calibration=None,
                 check: bool = True, out=None) -> Engine:
    """An :class:`Engine` for ``model`` (a :class:`CAERNet` / :class:`CAERSNet` in eval mode).

    Args:
        engine: one of ``ENGINES``. ``auto`` measures ``candidates`` (default :func:`auto_candidates`) at the
            smallest and largest of ``batch_sizes``, drops any whose outputs differ from the eager model
            (:func:`compare`), keeps the fastest (per-sample time summed over the two sizes) and caches
            the decision; a later call with the same key reads it back without measuring.
        face_shape, context_shape: input sizes without the batch dimension (default: :func:`default_shapes`).
        batch_sizes: the batch sizes that will be served (their range is part of the cache key).
        cache_dir: the cache root (default :func:`cache_root`; None: no cache, work in a temporary folder).
        calibration: (face, context) batches for ``int8``.
        check: verify a named fp32 engine against the eager model before returning it.
        out: a file for progress lines (e.g. ``sys.stderr``); default: the logger.
    """
    say = (lambda msg: print(msg, file=out, flush=True)) if out is not None else log.info
    if engine not in ENGINES:
        raise EngineError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
    if not isinstance(model, nn.Module):
        raise TypeError(f"build_engine: expected one of our models, got {type(model).__name__}")
    device = _model_device(model)
    if device.type != "cpu" and engine not in ("auto", "eager", "compiled"):
        raise EngineError(f"the {engine} engine runs on CPU; the model is on {device}")
    if device.type != "cpu":  # on a GPU the torch paths are the engines (untested on the CPU build machines)
        return TorchEngine(model, compiled=engine == "compiled")
    default_face, default_context = default_shapes(model)
    face_shape = tuple(face_shape or default_face)
    context_shape = tuple(context_shape or default_context)
    if cache_dir == "default":
        cache_dir = cache_root()
    t0 = time.perf_counter()

    if engine == "int8":
        from ..models.quantize import quantize_int8

        if calibration is None:
            raise EngineError("the int8 engine needs calibration data (predict/serve: --calibrate ROOT)")
        eng = Int8Engine(quantize_int8(model, calibration))
        eng.info["build_s"] = round(time.perf_counter() - t0, 3)
        return eng

    b = _Builder(model, face_shape, context_shape, batch_sizes, threads, cache_dir, say)
    reference = TorchEngine(model)
    if engine != "auto":
        eng = b.build(engine)
        if check and engine != "eager":
            cmp = compare(reference, eng, face_shape, context_shape)
            eng.info["check"] = cmp
            if not cmp["ok"]:
                raise EngineError(f"the {engine} engine's outputs differ from the model's (max |Δlogit| "
                                  f"{cmp['max_abs']:.3g}, details {cmp['max_abs_details']:.3g})")
        eng.info.update(key=b.key, build_s=round(time.perf_counter() - t0, 3))
        return eng

    names = list(candidates or auto_candidates())
    for n in names:
        if n not in FP32_ENGINES:
            raise EngineError(f"auto: {n!r} is not an fp32 engine to measure ({', '.join(FP32_ENGINES)})")
    decision_file = b.dir / f"decision-{'-'.join(names)}.json" if b.dir is not None else None
    decision = None
    if decision_file is not None and decision_file.is_file():
        try:
            decision = json.loads(decision_file.read_text())
            if decision.get("chosen") not in names:
                decision = None
        except (OSError, ValueError) as exc:
            log.warning("ignoring the unreadable engine decision %s (%s)", decision_file, exc)
            decision = None
    if decision is not None:
        chosen = decision["chosen"]
        eng = reference if chosen == "eager" else b.build(chosen)
        eng.info.update(decision=decision, decision_cached=True, key=b.key,
                        build_s=round(time.perf_counter() - t0, 3))
        return eng

    say(f"engine: measuring {', '.join(names)} at batch {b.batch_sizes[0]} and {b.batch_sizes[-1]} "
        f"({b.threads} threads; once per model and machine) …")
    sizes = sorted({b.batch_sizes[0], b.batch_sizes[-1]})
    results = {}
    best, best_engine = None, None  # only the fastest so far stays in memory
    for n in names:
        try:
            eng = reference if n == "eager" else b.build(n)
        except Exception as exc:  # a missing package, a failed export: not a candidate here
            results[n] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        cmp = {"max_abs": 0.0, "max_abs_details": 0.0, "agreement": 1.0, "ok": True} if n == "eager" else \
            compare(reference, eng, face_shape, context_shape)
        r = {"check": cmp}
        if cmp["ok"]:
            r["seconds"] = {str(s): time_engine(eng, face_shape, context_shape, s) for s in sizes}
            r["score"] = sum(v / int(s) for s, v in r["seconds"].items())  # per-sample seconds, summed
            if best is None or r["score"] < results[best]["score"]:
                best, best_engine = n, eng
        del eng
        results[n] = r
    chosen = best or "eager"
    decision = {"chosen": chosen, "candidates": results, "batch_sizes": sizes, "threads": b.threads,
                "cpu_flags": cpu_flags(), "versions": _versions(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if decision_file is not None:
        try:
            _write_json_atomic(decision_file, decision)
        except OSError as exc:
            log.warning("could not write the engine decision %s (%s); the next start measures again", decision_file, exc)
    say("engine: " + "; ".join(
        f"{n} {'rejected (outputs differ)' if not r.get('check', {}).get('ok', False) and 'error' not in r else ''}"
        f"{r['error'] if 'error' in r else ''}"
        f"{', '.join(f'b{s} {v * 1e3:.0f} ms' for s, v in r.get('seconds', {}).items())}"
        for n, r in results.items()) + f" → {chosen}")
    eng = best_engine if best_engine is not None else reference
    eng.info.update(decision=decision, decision_cached=False, key=b.key, build_s=round(time.perf_counter() - t0, 3))
    return eng


def use_engine(predictor, engine: str = "auto", *, calibration=None, candidates=None, cache_dir="default",
               out=None, batch_sizes: Optional[Sequence[int]] = None) -> Engine:
    """Put an engine in a :class:`~caer_fast.serving.inference.Predictor`: ``predictor.model`` becomes the
    engine (same call), ``predictor.engine_name`` / ``predictor.engine_info`` say which. ``batch_sizes``:
    the range of model batches that will run (default 1 to ``predictor.batch_size``); `auto` measures
    its ends, so a streaming-only caller passes ``(1, predictor.stream_chunk)`` and does not pay for
    (nor hold the memory of) a larger batch it never runs."""
    crop = predictor.crop[2:] if predictor.crop else predictor.context_size
    from ..models.caer_net import CAERNet

    model = predictor.model
    if isinstance(model, CAERNet):
        t = predictor.clip_frames
        face_shape, context_shape = (3, t, *predictor.face_size), (3, t, *crop)
    else:
        face_shape, context_shape = (3, *predictor.face_size), (3, *crop)
    sizes = tuple(batch_sizes) if batch_sizes else (1, max(1, int(predictor.batch_size)))
    eng = build_engine(model, engine, face_shape=face_shape, context_shape=context_shape, batch_sizes=sizes,
                       candidates=candidates, cache_dir=cache_dir, calibration=calibration, out=out)
    predictor.model = eng
    predictor.engine_name = eng.name
    predictor.engine_info = eng.info
    return eng
