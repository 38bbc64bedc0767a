"""The ``triton`` backend: registers ``caer_fast.kernels`` with the dispatcher.

Imported lazily by ``_dispatch`` the first time the backend is considered, never at package import.
Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton's import.

Importing ``caer_fast.kernels`` registers the ``torch.library`` ops ``caer_fast::attention_pool_triton``
and ``caer_fast::adaptive_fusion_triton`` (``triton_op``s with autograd, backward ops
``caer_fast::<op>_triton_backward``) and ``caer_fast::face_context_triton`` (an opaque ``custom_op``).
Under ``torch.compile`` the registered functions call those ops, so ``fullgraph=True`` traces
without a graph break; on CUDA AOTAutograd inlines the attention_pool / adaptive_fusion kernels
into the graph for inductor. Eager calls launch the same kernels through ``autograd.Function``s.
Under the interpreter the ops stay opaque graph nodes (see ``caer_fast/kernels/_compile.py``).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from . import _dispatch


def is_available():
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton==3.7.1)"
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU)"
    try:
        _register()
    except Exception as exc:  # a broken triton install, or caer_fast.kernels missing
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def _register():
    from caer_fast.kernels import adaptive_fusion, attention_pool, face_context

    _dispatch.register("attention_pool", "triton", attention_pool.attention_pool)
    _dispatch.register("adaptive_fusion", "triton", adaptive_fusion.adaptive_fusion)
    _dispatch.register("face_context", "triton", face_context.face_context)
