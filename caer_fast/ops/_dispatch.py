"""The one place that chooses a backend for the fused ops.

Backends: ``torch`` (readable reference, always there), ``cpp`` (``caer_fast._C`` CPU kernels),
``triton`` (``caer_fast.kernels``; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and
``cuda`` (``caer_fast._C`` CUDA kernels, only where built). ``CAER_FAST_BACKEND`` forces one.
Backend modules are imported lazily, the first time an op needs them, never at package import.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("torch", "cpp", "triton", "cuda")
ENV_VAR = "CAER_FAST_BACKEND"

# op name -> backend name -> implementation with the op's full positional signature
_IMPLS: Dict[str, Dict[str, Callable]] = {}
# backend name -> module that registers that backend's implementations when imported
_BACKEND_MODULES = {
    "cpp": "caer_fast.ops._cpp",
    "triton": "caer_fast.ops._triton",
    "cuda": "caer_fast.ops._cuda",
}
_load_errors: Dict[str, str] = {}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run here."""


def register(op: str, backend_name: str, fn: Callable) -> None:
    _IMPLS.setdefault(op, {})[backend_name] = fn


def _load(backend_name: str) -> bool:
    """Import the backend's module once; remember why it failed."""
    if backend_name == "torch":
        return True
    if backend_name in _load_errors:
        return False
    if any(backend_name in impls for impls in _IMPLS.values()):
        return True
    try:
        module = importlib.import_module(_BACKEND_MODULES[backend_name])
        ok, why = module.is_available()
    except Exception as exc:  # an ImportError, or a broken build
        ok, why = False, f"{type(exc).__name__}: {exc}"
    if not ok:
        _load_errors[backend_name] = why
    return ok


def _device_type(device) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, torch.Tensor):
        device = device.device
    return torch.device(device).type


def _preferred(device_type: str):
    if device_type == "cuda":
        return ("cuda", "triton", "torch")
    return ("cpp", "torch")


def available_backends(device=None) -> list:
    """Backends that can run ops on ``device`` (default: CUDA if present, else CPU)."""
    dtype = _device_type(device)
    out = []
    for name in BACKENDS:
        if name == "triton" and dtype == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        if name == "cuda" and dtype != "cuda":
            continue
        if name == "cpp" and dtype != "cpu":
            continue
        if _load(name):
            out.append(name)
    return out


def why_unavailable(backend_name: str) -> Optional[str]:
    _load(backend_name)
    return _load_errors.get(backend_name)


def backend(device=None) -> str:
    """Name of the backend the ops use for tensors on ``device``.

    ``CAER_FAST_BACKEND=torch|cpp|triton|cuda`` forces one; a forced backend that cannot run on
    this device is a :class:`BackendUnavailableError` saying why.
    """
    dtype = _device_type(device)
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise BackendUnavailableError(f"{ENV_VAR}={forced!r} is not one of {', '.join(BACKENDS)}")
        if forced not in available_backends(dtype):
            why = why_unavailable(forced) or f"it does not run on {dtype} tensors"
            hint = {
                "triton": " (on CPU it needs TRITON_INTERPRET=1, set before triton is imported)",
                "cuda": " (it needs a CUDA build of torch, nvcc and a GPU)",
                "cpp": " (reinstall with `pip install --no-build-isolation -e .` to build caer_fast._C)",
            }.get(forced, "")
            raise BackendUnavailableError(f"{ENV_VAR}={forced} is unavailable: {why}{hint}")
        return forced
    for name in _preferred(dtype):
        if name in available_backends(dtype):
            return name
    return "torch"


def preload(device=None) -> str:
    """Import the backend ops on ``device`` will use, now, outside any ``torch.compile`` trace.

    The first import of a backend runs its module code (library loading, a self-check); inside a
    dynamo trace that code is untraceable and ``fullgraph=True`` fails. Models and ``optimize`` call
    this up front. Returns the backend name, or None where a forced backend is unavailable (the
    op call itself raises that error, with its reason).
    """
    try:
        return backend(device)
    except BackendUnavailableError:
        return None


def implementation(op: str, tensor: torch.Tensor) -> Callable:
    """The implementation of ``op`` for ``tensor``'s device under the current backend choice."""
    name = backend(tensor)
    impls = _IMPLS.get(op, {})
    return impls.get(name, impls["torch"])
