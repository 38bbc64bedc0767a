"""How the Triton kernels become the CUDA kernels of the ``caer_fast::<op>`` ops (launch helpers).

* :func:`register` puts a kernel module's op functions (``<op>``, ``<op>_backward``: the ops' own
  signatures) into a ``torch.library.Library`` under the given dispatch keys, where they take the
  C++ kernels' place while the backend is "triton" (``caer_fast.ops._dispatch`` destroys the
  library to give the keys back). Eager calls launch the kernels directly (:func:`eager`).
* Under ``torch.compile`` on a GPU, the functions a module lists in ``INLINE`` are also
  decomposed under functionalization, as ``torch.library.triton_op`` does: their launches land in
  the graph as ``triton_kernel_wrapper_functional`` nodes that inductor schedules. They must be
  written as ``wrap_triton(<kernel name>)[grid](...)`` in the function or a module-level function
  it calls by name: torch finds the kernels by reading that source.

Under ``TRITON_INTERPRET=1`` (CPU tensors) ``triton.jit`` gives ``InterpretedFunction`` kernels,
which torch's ``wrap_triton`` returns unwrapped: they cannot become graph nodes, and launching one
on a fake tensor fails. So there :func:`wrap_triton` skips launches whose arguments are fake, and
nothing is decomposed: the op stays one opaque graph node, run for real at run time.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterable

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

try:
    from torch._library.triton import set_wrap_triton_enabled as _set_wrap_triton_enabled
except ImportError:  # older torch: no switch, the wrapped kernels always go through the HOP
    _set_wrap_triton_enabled = None


@triton.jit
def _probe(x_ptr):
    pass


#: True when ``triton.jit`` kernels are interpreted (``TRITON_INTERPRET=1`` at triton's import).
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"


class _InterpretedLaunch:
    """``kernel[grid](...)`` for an interpreted kernel: runs on real tensors, skips fake ones."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if any(isinstance(t, FunctionalTensor) for t in tensors):
                raise RuntimeError(f"{self.kernel}: an interpreted Triton kernel cannot be traced into a graph "
                                   "(caer_fast ops stay opaque under functionalization when interpreted)")
            if any(isinstance(t, FakeTensor) or t.device.type == "meta" for t in tensors):
                return None  # fake / meta run: the outputs' shapes are all that is asked
            return self.kernel[grid](*args, **kwargs)

        return launch


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``; for interpreted kernels, see the module docstring."""
    if INTERPRETED and type(kernel).__name__ == "InterpretedFunction":
        return _InterpretedLaunch(kernel)
    return torch.library.wrap_triton(kernel)


def eager():
    """Context: launch kernels directly, not through the wrapper's higher-order op (eager paths)."""
    if _set_wrap_triton_enabled is None:
        return contextlib.nullcontext()
    return _set_wrap_triton_enabled(False)


def _decomposition(fn):
    """``fn`` traced into the graph under functionalization (torch.library.triton_op's rule)."""

    def rule(mode, func, types, args, kwargs):
        if any(not issubclass(t, (FakeTensor, FunctionalTensor)) and t is not torch.Tensor for t in types):
            return NotImplemented
        with mode:
            return fn(*args, **kwargs)

    return rule


def _launching(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with eager():
            return fn(*args, **kwargs)

    return run


def register(lib: torch.library.Library, module, keys: Iterable[str]) -> None:
    """Register ``module``'s functions named after ``caer_fast::<op>`` ops under dispatch ``keys``."""
    names = [n for n in (module.__name__.rsplit(".", 1)[-1],) for n in (n, n + "_backward")
             if callable(getattr(module, n, None))]
    for name in names:
        for key in keys:
            lib.impl(name, _launching(getattr(module, name)), key)
        if not INTERPRETED and name in getattr(module, "INLINE", ()):
            lib._register_torch_dispatch_rule(name, FunctionalTensorMode, _decomposition(getattr(module, name)))
            try:  # what AOTAutograd's cache hashes for a triton_op
                from torch._library.triton import get_inner_triton_kernels, triton_ops_to_kernels

                triton_ops_to_kernels[f"caer_fast::{name}"] = get_inner_triton_kernels(getattr(module, name))
            except ImportError:  # older torch
                pass
