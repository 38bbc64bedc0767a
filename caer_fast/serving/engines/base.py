"""What every engine shares: :class:`Engine` (called like the model), :class:`EngineError`, the registry
(:func:`register_engine` / :func:`lookup_engine`), the :class:`BuildContext` a builder gets, and
:func:`compare` (an engine's outputs against the eager model's)."""
from __future__ import annotations

import ctypes
import gc
import importlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from ...models.caer_net import CAERNet
from .. import onnx as onnx_export
from .cache import Manifest, engine_key, model_hash

log = logging.getLogger("caer_fast.engines")


def release_memory() -> None:
    """Give dropped objects' memory back to the OS before the next big step (the cold build's peak)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed arenas otherwise
    except (OSError, AttributeError):
        pass

# fp32 engines must agree with the eager reference this closely (max |Δ| over logits, attention, weights)
FP32_ATOL, FP32_RTOL = 1e-3, 1e-3


# the most float32 input bytes one call of a CPU engine runs at once: 4 full-size video clips. A call's peak
# grows with its batch (full-size CAER-Net in OpenVINO fp32: +300 MiB at 4 clips, +800 MiB at 12, a 3-person
# `--people all` step; eager on 16 clips ~1 GB), and the per-clip time is the same at 4 (bench/RESULTS.md
# "Quiet machine, end of the stop"); auto times no bigger batch
MAX_BATCH_INPUT_BYTES = 16 * 2**20


def sample_input_bytes(face_shape, context_shape) -> int:
    """float32 bytes of one sample's inputs (shapes without the batch dimension)."""
    n = 0
    for shape in (face_shape, context_shape):
        k = 1
        for d in shape:
            k *= int(d)
        n += k
    return 4 * n


def batch_limit(face_shape, context_shape) -> int:
    """The largest batch of these inputs one call runs at once (:data:`MAX_BATCH_INPUT_BYTES`), at least 1."""
    return max(1, MAX_BATCH_INPUT_BYTES // sample_input_bytes(face_shape, context_shape))


def run_in_slices(run: Callable, face: torch.Tensor, context: torch.Tensor, most: int) -> Tuple[torch.Tensor, ...]:
    """``run(face, context)``'s output tuple, computed on slices of at most ``most`` samples and concatenated
    (the same answers: every engine computes each sample on its own)."""
    n = face.shape[0]
    if most <= 0 or n <= most:
        return run(face, context)
    parts = [run(face[i:i + most], context[i:i + most]) for i in range(0, n, most)]
    return tuple(torch.cat(outs) for outs in zip(*parts))


class EngineError(RuntimeError):
    """An engine cannot be built here (missing package, wrong device, bad option)."""


def need_package(module: str, engine: str, hint: str):
    """``import module`` for an engine that cannot run without it; an :class:`EngineError` saying how to
    install it otherwise (the optional packages are imported only by the engines that use them)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EngineError(f"the {engine} engine needs {module} ({hint}): {exc}") from exc


class Engine(nn.Module):
    """Base: ``name``, ``info`` (what was built, how long it took, cache hits), the model's call signature."""

    name = "engine"
    #: (face, context) sizes without the batch dimension, for engines built for one size (the ONNX ones)
    input_shapes: Optional[Tuple[Tuple[int, ...], Tuple[int, ...]]] = None
    #: a batch over :data:`MAX_BATCH_INPUT_BYTES` runs in slices (False: the whole batch in one call)
    sliced = True

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
        if self.sliced:
            logits, attention, weights = run_in_slices(self.run, face, context,
                                                       batch_limit(face.shape[1:], context.shape[1:]))
        else:
            logits, attention, weights = self.run(face, context)
        if return_details:
            return logits, {"attention": attention, "fusion_weights": weights}
        return logits

    def extra_repr(self) -> str:
        return f"name={self.name}"


# -- the registry ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineSpec:
    """One registered engine: ``build(ctx) -> Engine``; ``fp32``: computes in fp32 (checked against the
    eager model to ``FP32_ATOL`` and measurable by ``auto``); ``cpu_only``: refused for a GPU model."""

    name: str
    build: Callable[["BuildContext"], Engine]
    fp32: bool = True
    cpu_only: bool = True
    description: str = ""


_REGISTRY: Dict[str, EngineSpec] = {}


def register_engine(name: str, build: Optional[Callable] = None, *, fp32: bool = True, cpu_only: bool = True,
                    description: str = ""):
    """Register ``build(ctx: BuildContext) -> Engine`` under ``name`` (usable as a decorator). A name
    registered twice is an error: two modules would silently fight over it."""
    def add(fn):
        if name in _REGISTRY and _REGISTRY[name].build is not fn:
            raise ValueError(f"engine {name!r} is already registered (by {_REGISTRY[name].build.__module__})")
        _REGISTRY[name] = EngineSpec(name, fn, fp32, cpu_only, description)
        return fn
    return add(build) if build is not None else add


def lookup_engine(name: str) -> EngineSpec:
    """The registered engine ``name``; :class:`EngineError` naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EngineError(f"unknown engine {name!r} (choose from {', '.join(_REGISTRY)})") from None


def engine_names() -> Tuple[str, ...]:
    """The registered engines' names, in registration order."""
    return tuple(_REGISTRY)


def fp32_engine_names() -> Tuple[str, ...]:
    return tuple(n for n, s in _REGISTRY.items() if s.fp32)


# -- what a builder gets ---------------------------------------------------------------------------------

def default_shapes(model: nn.Module) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The paper's input sizes (no batch dimension): image 3×96×96 / 3×112×112, video 3×T×… of the model."""
    if isinstance(model, CAERNet):
        t = int(getattr(model, "frames", 16))
        return (3, t, 96, 96), (3, t, 112, 112)
    return (3, 96, 96), (3, 112, 112)


class BuildContext:
    """The model, its input sizes, the batch sizes to serve, threads, the cache entry and the options of
    one :func:`~caer_fast.serving.engines.build_engine` call; :meth:`onnx_file` exports once per entry."""

    def __init__(self, model: nn.Module, face_shape, context_shape, batch_sizes, threads: Optional[int],
                 cache_dir: Optional[Path], say: Callable[[str], None], options: Optional[Dict] = None,
                 warn: Optional[Callable[[str], None]] = None):
        self.model = model.eval()
        self.face_shape, self.context_shape = tuple(face_shape), tuple(context_shape)
        self.batch_sizes = sorted({max(1, int(b)) for b in batch_sizes}) or [1]
        self.threads = int(threads or torch.get_num_threads())
        self.model_digest = model_hash(model)
        self.key = engine_key(model, self.face_shape, self.context_shape, self.batch_sizes, self.threads,
                              model_digest=self.model_digest)
        self.dir = Path(cache_dir) / self.key if cache_dir is not None else None
        self.say = say
        self.warn = warn or (lambda msg: log.warning("%s", msg))
        self.options = dict(options or {})
        self._tmpdir: Optional[Path] = None
        self._manifest: Optional[Manifest] = None

    @property
    def manifest(self) -> Optional[Manifest]:
        """The entry's record of its files and their digests (None without a cache)."""
        if self.dir is not None and self._manifest is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._manifest = Manifest(self.dir, self.model_digest, self.warn)
        return self._manifest

    def build(self, name: str) -> Engine:
        """Another registered engine for the same model and sizes (``auto`` builds its candidates so)."""
        return lookup_engine(name).build(self)

    def workdir(self) -> Path:
        """The cache entry's folder, or a temporary one when there is no cache."""
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            return self.dir
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="caer_fast_engine_"))
        return self._tmpdir

    def onnx_file(self) -> Tuple[Path, Dict]:
        """Our ONNX export, from the cache or written now (into a temporary folder without a cache)."""
        onnx_path = self.workdir() / "model.onnx"
        t = time.perf_counter()
        exported = False
        cached = onnx_path.is_file() if self.manifest is None else self.manifest.check(onnx_path)
        if not cached:
            self.say(f"engine: exporting the model to ONNX ({onnx_path}) …")
            onnx_export.export_model_onnx(self.model, self.face_shape, self.context_shape, onnx_path)
            if self.manifest is not None:
                self.manifest.record(onnx_path)
            exported = True
        return onnx_path, {"exported": exported, "export_s": round(time.perf_counter() - t, 3)}

    def forget_onnx(self, why: str) -> None:
        """A cached ``model.onnx`` that does not load: say so, remove it (the next :meth:`onnx_file` exports)."""
        onnx_path = self.workdir() / "model.onnx"
        self.warn(f"engine cache: {onnx_path} does not load ({why}): rebuilding it")
        if self.manifest is not None:
            self.manifest.forget(onnx_path)
        else:
            onnx_path.unlink(missing_ok=True)


def onnx_feed(face: torch.Tensor, context: torch.Tensor) -> Dict:
    """The ONNX graph's inputs: contiguous float32 CPU arrays named as in the export."""
    return {"face": face.detach().to("cpu", torch.float32).contiguous().numpy(),
            "context": context.detach().to("cpu", torch.float32).contiguous().numpy()}


# -- correctness -------------------------------------------------------------------------------------------

def random_inputs(face_shape, context_shape, batch: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
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
        face, context = random_inputs(face_shape, context_shape, int(b), seed + i)
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
