"""How the kernels meet ``torch.library``: ``triton_op`` / ``wrap_triton``, an eager switch, the interpreter.

* :func:`triton_op` is ``torch.library.triton_op``: the op's Python body allocates outputs and
  launches its kernels through :func:`wrap_triton`. The body is also the op's fake (meta)
  implementation, and under ``torch.compile`` AOTAutograd decomposes the op into that body, so the
  kernels land in the graph as ``triton_kernel_wrapper_functional`` nodes that inductor schedules
  (and AOTAutograd's cache keys on their source).
* :func:`wrap_triton` is ``torch.library.wrap_triton`` — plus the interpreter case below. It must
  be called literally as ``wrap_triton(<kernel name>)[grid](...)`` inside the op body or a
  module-level function the body calls by name: torch finds an op's kernels by reading that source.
* :func:`eager` turns the wrapping off: outside ``torch.compile`` the ops run through plain
  ``autograd.Function`` twins (the custom-op dispatch plus the wrapper's higher-order-op dispatch
  cost far more than a launch), which launch the same kernels directly.

Under ``TRITON_INTERPRET=1`` (CPU tensors) ``triton.jit`` gives ``InterpretedFunction`` kernels,
which torch's ``wrap_triton`` returns unwrapped: they cannot become graph nodes, and launching one
on a fake tensor fails ("Cannot access data pointer"). So there :func:`wrap_triton` skips launches
whose arguments are fake (shape propagation only needs the allocations), and :func:`triton_op`
keeps the op opaque under functionalization (one ``caer_fast::<op>_triton`` node in the graph,
run for real at run time) instead of decomposing it. Same op, same body; only the graph capture
of the kernels themselves is GPU-only.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

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


def _opaque(mode, func, types, args, kwargs):
    return mode.__torch_dispatch__(func, types, args, kwargs)


def triton_op(name: str, *, mutates_args: Iterable[str] = ()) -> Callable:
    """``torch.library.triton_op(name, mutates_args=...)``; opaque to functionalization when interpreted."""

    def deco(fn):
        op = torch.library.triton_op(name, fn, mutates_args=tuple(mutates_args))
        if INTERPRETED:
            op.register_torch_dispatch(FunctionalTensorMode, _opaque)
        return op

    return deco
