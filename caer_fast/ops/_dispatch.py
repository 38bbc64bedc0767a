"""The one place that chooses a backend for the fused ops.

Every op has one name, ``torch.ops.caer_fast.<op>``, defined in C++ (csrc/ops.cpp) with its CPU
and CUDA kernels registered under torch's dispatch keys; importing ``caer_fast._C`` registers them.
A backend is a choice of what runs:

- ``torch``: the readable PyTorch references in ``caer_fast/ops/<op>.py`` (always there);
- ``cpp``: the op with ``caer_fast._C``'s CPU kernels (csrc/cpu);
- ``cuda``: the op with ``caer_fast._C``'s CUDA kernels (csrc/cuda; only where built with a CUDA torch);
- ``triton``: the op with the Triton kernels of ``caer_fast.kernels`` registered under the CUDA key in
  place of the C++ ones (and under the CPU key when ``TRITON_INTERPRET=1`` runs them on CPU tensors).

:func:`set_backend` / :func:`use_backend` (or ``CAER_FAST_BACKEND``) force one; otherwise CPU tensors
get ``cpp`` and CUDA tensors ``cuda``, then ``triton``, falling back to ``torch``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator, List, Optional

import torch

BACKENDS = ("torch", "cpp", "triton", "cuda")
ENV_VAR = "CAER_FAST_BACKEND"
OPS = ("attention_pool", "adaptive_fusion", "face_context")  # each has kernels/<op>.py for triton

try:  # registers the ops and their C++ kernels
    from .. import _C  # noqa: F401

    _EXT_ERROR = None
except ImportError as exc:  # not built (CAER_FAST_BUILD_EXT=0), or a broken build
    _EXT_ERROR = f"caer_fast._C is not built ({type(exc).__name__}: {exc}); reinstall with " \
                 "`pip install --no-build-isolation -e .`"

HAS_OPS = _EXT_ERROR is None
#: the C++ CUDA kernels are in this build (a CUDA torch and nvcc at install time)
HAS_CUDA_KERNELS = HAS_OPS and torch._C._dispatch_has_kernel_for_dispatch_key("caer_fast::attention_pool", "CUDA")

_forced: Optional[str] = None  # set_backend / use_backend; wins over the environment variable
_triton_lib = None  # the torch.library.Library holding the Triton kernels while they are registered
_triton_keys: frozenset = frozenset()


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run here."""


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _device_type(device) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, torch.Tensor):
        return device.device.type
    return torch.device(device).type


def why_unavailable(name: str, device=None) -> Optional[str]:
    """Why backend ``name`` cannot run ops on ``device`` (default: CUDA if present, else CPU); None if it can."""
    dev = _device_type(device)
    if name not in BACKENDS:
        return f"{name!r} is not one of {', '.join(BACKENDS)}"
    if name == "torch":
        return None
    if _EXT_ERROR is not None:
        return _EXT_ERROR
    if name == "cpp":
        return None if dev == "cpu" else f"it runs on CPU tensors, not {dev}"
    if name == "cuda":
        if not HAS_CUDA_KERNELS:
            return "caer_fast._C was built without CUDA (needs a CUDA build of torch and nvcc at install time)"
        return None if dev == "cuda" and torch.cuda.is_available() else "no CUDA device"
    if importlib.util.find_spec("triton") is None:  # triton
        return "triton is not installed (pip install triton==3.7.1)"
    if dev == "cuda" and torch.cuda.is_available() or dev == "cpu" and _interpreted():
        return None
    return "no CUDA device (on CPU it needs TRITON_INTERPRET=1, set before triton is imported)"


def available_backends(device=None) -> List[str]:
    """Backends that can run ops on ``device`` (default: CUDA if present, else CPU)."""
    return [name for name in BACKENDS if why_unavailable(name, device) is None]


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
    for name in (("cuda", "triton") if dev == "cuda" else ("cpp",)):
        if why_unavailable(name, dev) is None:
            return name
    return "torch"


def _kernels(module: str):
    """``caer_fast.kernels.<module>``. A development install (``setup.py develop``) ignores setup.py's
    ``package_dir``, so there the package is loaded from the checkout's kernels/ folder."""
    try:
        return importlib.import_module(f"caer_fast.kernels.{module}")
    except ModuleNotFoundError as exc:
        if exc.name != "caer_fast.kernels":
            raise
    folder = Path(__file__).resolve().parents[2] / "kernels"
    spec = importlib.util.spec_from_file_location("caer_fast.kernels", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["caer_fast.kernels"] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"caer_fast.kernels.{module}")


def _route(name: str, device_type: str) -> None:
    """Register the Triton kernels under ``device_type``'s dispatch key while ``name`` is "triton",
    and take them out (the C++ kernels come back) when it is not."""
    global _triton_lib, _triton_keys
    key = "CUDA" if device_type == "cuda" else "CPU"
    keys = _triton_keys | {key} if name == "triton" else _triton_keys - {key}
    if keys == _triton_keys:
        return
    if torch.compiler.is_compiling():
        raise BackendUnavailableError("caer_fast: the backend changed inside torch.compile; call "
                                      "caer_fast.ops.preload() (or use_backend) before compiling")
    if _triton_lib is not None:
        _triton_lib._destroy()
        _triton_lib = None
    if keys:
        _compile = _kernels("_compile")
        lib = torch.library.Library("caer_fast", "IMPL")
        with warnings.catch_warnings():  # "overriding a previously registered kernel": the C++ one, on purpose
            warnings.simplefilter("ignore")
            for op in OPS:
                _compile.register(lib, _kernels(op), sorted(keys))
        _triton_lib = lib
    _triton_keys = frozenset(keys)


_chosen: dict = {}  # (forced name or the variable's raw value, device type) -> backend name, for kernel_backend

# os.environ.get raises and catches a KeyError inside when the variable is unset, about 5 µs of every
# op call; CPython's environ mapping answers directly (its raw value is only a cache key here)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else ENV_VAR


def _raw_env_value():
    data = getattr(os.environ, "_data", None)
    return data.get(_ENV_KEY) if data is not None else os.environ.get(ENV_VAR)


def kernel_backend(device_type: str) -> Optional[str]:
    """The backend whose kernels run an op on ``device_type`` tensors, or None for the torch reference.
    The front doors (``caer_fast/ops/<op>.py``) call it once per call: what is available does not
    change while the process runs, so the choice is remembered per request and device."""
    key = (_forced if _forced is not None else _raw_env_value(), device_type)
    name = _chosen.get(key)
    if name is None:
        name = _chosen[key] = backend(device_type)  # an unavailable forced backend raises, every call
    if name == "torch":
        return None
    if name == "triton" or _triton_keys:
        _route(name, device_type)
    return name


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
    _route(name, _device_type(device))
    return name


def set_backend(name: Optional[str]) -> None:
    """Force backend ``name`` (one of :data:`BACKENDS`) for every op from now on; None: choose per device.

    An unavailable backend is reported by the op call (with its reason), as for ``CAER_FAST_BACKEND``.
    """
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
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
def register_autograd(op: str, saved):
    """Register the autograd formula of ``caer_fast::<op>``: save ``saved(inputs, output)`` (the state
    every backend's ``<op>_backward`` takes), and in backward call
    ``caer_fast::<op>_backward(*output_grads, *saved)``.

    Returns the same formula as an ``autograd.Function`` for :func:`call`'s eager calls: it skips the
    Python dispatch of the registered autograd kernel, which costs about as much as a small kernel
    (bench/RESULTS.md, "op layer"). One class per op, so ``apply`` takes the op's tensors only.
    """
    if not HAS_OPS:
        return None
    forward_op = getattr(torch.ops.caer_fast, op).default
    backward_op = getattr(torch.ops.caer_fast, f"{op}_backward").default

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*saved(inputs, output))

    def backward(ctx, *grads):
        return backward_op(*grads, *ctx.saved_tensors)

    torch.library.register_autograd(f"caer_fast::{op}", backward, setup_context=setup_context)

    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            output = forward_op(*args)
        setup_context(ctx, args, output)
        return output

    return type(f"{op}_eager", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward), "__module__": __name__})


def call(op, *args, eager=None):
    """``op(*args)``; ``eager`` is the op's formula from :func:`register_autograd` (if it has one).

    Under ``torch.compile`` the op itself is traced (its fake implementation and registered formula);
    eager calls that need gradients run ``eager``, the others the op below autograd."""
    if torch.compiler.is_compiling():
        return op(*args)
    if eager is not None and torch.is_grad_enabled():
        for a in args:  # a loop, not any(<generator>): this runs on every eager call
            if isinstance(a, torch.Tensor) and a.requires_grad:
                return eager.apply(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)
