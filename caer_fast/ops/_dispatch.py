"""The one place that chooses a backend for the fused ops: a table of backends, consulted once per choice.

Every op has one name, ``torch.ops.caer_fast.<op>``, defined in C++ (csrc/ops.cpp) with its CPU
and CUDA kernels registered under torch's dispatch keys; importing ``caer_fast._C`` registers them.
A backend is a choice of what runs, one row of :data:`TABLE`:

- ``torch``: the readable PyTorch references in ``caer_fast/ops/<op>.py`` (always there);
- ``cpp``: the op with ``caer_fast._C``'s CPU kernels (csrc/cpu);
- ``triton``: the op with the Triton kernels of ``caer_fast.kernels`` registered under the CUDA key in
  place of the C++ ones (and under the CPU key when ``TRITON_INTERPRET=1`` runs them on CPU tensors);
- ``cuda``: the op with ``caer_fast._C``'s CUDA kernels (csrc/cuda; only where built with a CUDA torch).

:func:`set_backend` / :func:`use_backend` (or ``CAER_FAST_BACKEND``) force one; otherwise each device
type takes the first available backend of :data:`AUTO`, falling back to ``torch``. The front doors ask
:func:`use_kernel` ``(op, device type, dtype)``; the answer is worked out once per request (the forced
name or the variable's value) and remembered, so a call pays a dictionary lookup.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import pkgutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

ENV_VAR = "CAER_FAST_BACKEND"
#: the ops, one front door each (caer_fast/ops/<op>.py); tests/ops/test_docs_recipe.py checks the tree
OPS = ("attention_pool", "adaptive_fusion", "face_context")

try:  # registers the ops and their C++ kernels
    from .. import _C  # noqa: F401

    _EXT_ERROR = None
except ImportError as exc:  # not built (CAER_FAST_BUILD_EXT=0), or a broken build
    _EXT_ERROR = f"caer_fast._C is not built ({type(exc).__name__}: {exc}); reinstall with " \
                 "`pip install --no-build-isolation -e .`"

HAS_OPS = _EXT_ERROR is None
#: the C++ CUDA kernels are in this build (a CUDA torch and nvcc at install time)
HAS_CUDA_KERNELS = HAS_OPS and torch._C._dispatch_has_kernel_for_dispatch_key("caer_fast::attention_pool", "CUDA")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run here."""


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---- the backend table ------------------------------------------------------------------------------
def _cpp_unavailable(dev: str) -> Optional[str]:
    return _EXT_ERROR or (None if dev == "cpu" else f"it runs on CPU tensors, not {dev}")


def _cuda_unavailable(dev: str) -> Optional[str]:
    if _EXT_ERROR is not None:
        return _EXT_ERROR
    if not HAS_CUDA_KERNELS:
        return "caer_fast._C was built without CUDA (needs a CUDA build of torch and nvcc at install time)"
    return None if dev == "cuda" and torch.cuda.is_available() else "no CUDA device"


def _triton_unavailable(dev: str) -> Optional[str]:
    if _EXT_ERROR is not None:  # the op schemas come from caer_fast._C
        return _EXT_ERROR
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton==3.7.1)"
    if dev == "cuda" and torch.cuda.is_available() or dev == "cpu" and _interpreted():
        return None
    return "no CUDA device (on CPU it needs TRITON_INTERPRET=1, set before triton is imported)"


_LOW = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    """One row of :data:`TABLE`: what a backend runs, on what, and how it is put in place."""

    #: why it cannot run on a device type here, or None
    unavailable: Callable[[str], Optional[str]]
    #: the device types it runs on, the usual one first
    devices: Tuple[str, ...] = ("cpu",)
    #: the dtypes its kernels compute in (the op's dtype after promotion); others run the torch reference
    dtypes: Tuple[torch.dtype, ...] = _LOW
    #: the ops it may run (None: all); an op it has no kernels for (no module in ``package``, no kernel
    #: under the device's dispatch key in caer_fast._C) runs the torch reference on it
    ops: Optional[Tuple[str, ...]] = None
    #: a package of Python kernels (``<package>.<op>`` modules with the ops' signatures) registered
    #: through ``torch.library`` under the device's dispatch key while this backend is chosen; None for
    #: kernels compiled into caer_fast._C, which the dispatcher finds by itself
    package: Optional[str] = None
    #: True for the torch references (no kernels at all)
    reference: bool = False


#: every backend, in the order :data:`BACKENDS` lists them (a row added at run time is a backend too)
TABLE: Dict[str, Backend] = {
    "torch": Backend(unavailable=lambda dev: None, devices=("cpu", "cuda"), reference=True),
    "cpp": Backend(unavailable=_cpp_unavailable, dtypes=_LOW + (torch.float64,)),
    # float64 on triton and cuda: the kernels accumulate in float32, so it runs the reference
    "triton": Backend(unavailable=_triton_unavailable, devices=("cuda", "cpu"), package="kernels"),
    "cuda": Backend(unavailable=_cuda_unavailable, devices=("cuda",)),
}
BACKENDS = tuple(TABLE)
#: the automatic choice per device type, first available first (then ``torch``)
AUTO = {"cpu": ("cpp",), "cuda": ("cuda", "triton")}


_CPU = torch.device("cpu")


def device_type(device: torch.device) -> str:
    """``device.type`` for the front doors: ``torch.device.type`` builds a new string each time (0.3-0.4 µs,
    bench/RESULTS.md "front doors"), a comparison with a constant device answers the usual case."""
    return "cpu" if device == _CPU else device.type


def _device_type(device) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, torch.Tensor):
        return device.device.type
    return torch.device(device).type


def why_unavailable(name: str, device=None) -> Optional[str]:
    """Why backend ``name`` cannot run ops on ``device`` (default: CUDA if present, else CPU); None if it can."""
    row = TABLE.get(name)
    if row is None:
        return f"{name!r} is not one of {', '.join(TABLE)}"
    return row.unavailable(_device_type(device))


def available_backends(device=None) -> List[str]:
    """Backends that can run ops on ``device`` (default: CUDA if present, else CPU)."""
    return [name for name in BACKENDS if why_unavailable(name, device) is None]


_forced: Optional[str] = None  # set_backend / use_backend; wins over the environment variable


def _requested() -> Optional[str]:
    if _forced is not None:
        return _forced
    return os.environ.get(ENV_VAR, "").strip().lower() or None


def backend(device=None) -> str:
    """Name of the backend the ops use for tensors on ``device`` (default: CUDA if present, else CPU).

    A forced backend (:func:`set_backend`, :func:`use_backend`, ``CAER_FAST_BACKEND``) that cannot run
    on this device is a :class:`BackendUnavailableError` saying why.
    """
    dev = _device_type(device)
    name = _requested()
    if name is not None:
        why = why_unavailable(name, dev)
        if why is not None:
            source = "caer_fast.ops.set_backend" if _forced is not None else ENV_VAR
            raise BackendUnavailableError(f"{source}={name} is unavailable on {dev}: {why}")
        return name
    for name in AUTO.get(dev, ()):
        if why_unavailable(name, dev) is None:
            return name
    return "torch"


def _package(package: str):
    """``caer_fast.<package>``. A development install (``setup.py develop``) ignores setup.py's
    ``package_dir``, so there the package is loaded from the checkout's <package>/ folder."""
    try:
        return importlib.import_module(f"caer_fast.{package}")
    except ModuleNotFoundError as exc:
        if exc.name != f"caer_fast.{package}":
            raise
    folder = Path(__file__).resolve().parents[2] / package
    spec = importlib.util.spec_from_file_location(f"caer_fast.{package}", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"caer_fast.{package}"] = mod
    spec.loader.exec_module(mod)
    return mod


def _kernels(module: str, package: str = "kernels"):
    """``caer_fast.<package>.<module>`` (see :func:`_package`)."""
    _package(package)
    return importlib.import_module(f"caer_fast.{package}.{module}")


@functools.lru_cache(maxsize=None)
def _package_ops(package: str) -> frozenset:
    """The ops a package of Python kernels has a module for (its ``<op>.py`` files)."""
    names = {m.name for m in pkgutil.iter_modules(_package(package).__path__)}
    return frozenset(op for op in OPS if op in names)


def _has_kernels(name: str, op: str, device_type: str) -> bool:
    """Backend ``name`` has kernels for ``op`` on ``device_type``: a module in its package, or (compiled
    backends) a kernel under the device's dispatch key in caer_fast._C. An op without them runs the torch
    reference on that backend, so a new op needs no kernel for every backend."""
    row = TABLE[name]
    if row.reference or row.ops is not None and op not in row.ops:
        return False
    if row.package is not None:
        return op in _package_ops(row.package)
    key = _KEY.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"caer_fast::{op}", key)


_KEY = {"cpu": "CPU", "cuda": "CUDA"}  # device type -> the dispatch key its kernels register under


_libs: Dict[str, object] = {}  # backend with Python kernels -> the torch.library.Library holding them
_keys: Dict[str, frozenset] = {}  # ... and the dispatch keys they are registered under


def _route(name: str, device_type: str) -> None:
    """Register the Python kernels of every backend with a ``package`` under ``device_type``'s dispatch
    key while ``name`` is that backend, and take them out (the C++ kernels come back) when it is not."""
    key = _KEY.get(device_type)
    if key is None:  # no kernels of ours on this device type: nothing to put in place
        return
    for other, row in TABLE.items():
        if row.package is None:
            continue
        old = _keys.get(other, frozenset())
        keys = old | {key} if other == name else old - {key}
        if keys == old:
            continue
        if torch.compiler.is_compiling():
            raise BackendUnavailableError("caer_fast: the backend changed inside torch.compile; call "
                                          "caer_fast.ops.preload() (or use_backend) before compiling")
        lib = _libs.pop(other, None)
        if lib is not None:
            lib._destroy()
        if keys:
            compile_helpers = _kernels("_compile", row.package)
            lib = torch.library.Library("caer_fast", "IMPL")
            with warnings.catch_warnings():  # "overriding a previously registered kernel": the C++ one, on purpose
                warnings.simplefilter("ignore")
                for op in _package_ops(row.package):
                    compile_helpers.register(lib, _kernels(op, row.package), sorted(keys))
            _libs[other] = lib
        _keys[other] = frozenset(keys)


# ---- the choice, made once per request --------------------------------------------------------------
# os.environ.get raises and catches a KeyError inside when the variable is unset, about 5 µs of every
# op call; CPython's environ mapping answers directly (its raw value is only compared here)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else ENV_VAR
_request = "\0none"  # the request _decisions answer: the forced name, or the variable's raw value
_decisions: Dict[tuple, bool] = {}  # (op, device type, dtype) -> run the kernels (True) or the reference


def _raw_env_value():
    data = getattr(os.environ, "_data", None)
    return data.get(_ENV_KEY) if data is not None else os.environ.get(ENV_VAR)


def _decide(request, op: str, device_type: str, dtype: torch.dtype) -> bool:
    global _request
    if request != _request:  # a new request: forget the answers to the old one
        _decisions.clear()
        _request = request
    name = backend(device_type)  # an unavailable forced backend raises here (every call: nothing is cached)
    _route(name, device_type)
    answer = dtype in TABLE[name].dtypes and _has_kernels(name, op, device_type)
    _decisions[(op, device_type, dtype)] = answer
    return answer


def use_kernel(op: str, device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``op`` on ``device_type`` tensors of ``dtype`` runs the chosen backend's kernels
    (``torch.ops.caer_fast.<op>``), not the torch reference. The front doors call it once per call; the
    answer is worked out once per request (forced name or variable value), then looked up."""
    request = _forced if _forced is not None else _raw_env_value()
    if request is _request or request == _request:
        answer = _decisions.get((op, device_type, dtype))
        if answer is not None:
            return answer
    return _decide(request, op, device_type, dtype)


def preload(device=None) -> Optional[str]:
    """Load the backend ops on ``device`` will use, now, outside any ``torch.compile`` trace.

    Registering the Triton kernels is untraceable: models, :func:`caer_fast.optimize`, bench and tests
    call this up front. Returns the backend name, or None where a forced backend is unavailable (the
    op call itself raises that error, with its reason).
    """
    try:
        name = backend(device)
    except BackendUnavailableError:
        return None
    device_type = _device_type(device)
    _route(name, device_type)
    # every (op, dtype) answer now, so a torch.compile trace only reads _decisions (deciding is untraceable;
    # torch.compiler.assume_constant_result would import torch._dynamo, ~1.3 s and ~130 MB, in every process)
    for op in OPS:
        for dtype in _PRELOAD_DTYPES:
            use_kernel(op, device_type, dtype)
    return name


_PRELOAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def set_backend(name: Optional[str]) -> None:
    """Force backend ``name`` (one of :data:`BACKENDS`) for every op from now on; None: choose per device.

    An unavailable backend is reported by the op call (with its reason), as for ``CAER_FAST_BACKEND``.
    """
    global _forced
    if name is not None and name not in TABLE:
        raise ValueError(f"backend {name!r} is not one of {', '.join(TABLE)}")
    _forced = name
    preload("cpu")
    if torch.cuda.is_available():
        preload("cuda")


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Context manager: :func:`set_backend` ``(name)`` inside, the previous choice after.

    Example:
        >>> with caer_fast.ops.use_backend("torch"):      # doctest: +SKIP
        ...     reference = model(face, context)
    """
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


# ---- calling an op ------------------------------------------------------------------------------
# bound at import: call() below runs on every op call
_is_compiling = torch.compiler.is_compiling


def call(op, *args):
    """``op(*args)``. Under ``torch.compile`` the overload itself is traced (its fake implementation
    and its autograd formula, csrc/autograd.cpp); eager calls go to ``op._op``, the overload's C++ entry,
    without ``OpOverload.__call__``'s Python frame: the dispatcher runs the autograd kernel (which
    records the backward only where an input needs gradients) and then the chosen backend's kernel."""
    if _is_compiling():
        return op(*args)
    return op._op(*args)
