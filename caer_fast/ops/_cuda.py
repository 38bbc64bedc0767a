"""The ``cuda`` backend: the CUDA C++ kernels of ``caer_fast._C`` (csrc/cuda), for CUDA tensors.

Imported lazily by ``_dispatch``; ``caer_fast._C`` only holds these functions when it was built
with a CUDA torch and nvcc (``CAER_FAST_WITH_CUDA``). Importing this module never loads ``_C``:
the ops below look it up when they run, so the module imports (and its ops register) on a
CPU-only torch too, where :func:`is_available` says why the backend cannot run.

Each op is a ``torch.library.custom_op`` ``caer_fast::<op>_cuda`` (``device_types="cuda"``) with a
fake implementation and, where it has gradients, an autograd formula over a
``caer_fast::<op>_cuda_backward`` op, so ``torch.compile(model, fullgraph=True)`` traces through
them (forward and backward) without a graph break; inductor treats them as opaque kernels.
Under ``torch.compile`` the public functions call these ops; eager calls use the cheaper
``autograd.Function`` twins over the same ``_C`` functions (as the ``cpp`` backend does).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _dispatch, _resize_tables
from .face_context import empty_outputs

_FUNCS = ("attention_pool_forward_cuda", "attention_pool_backward_cuda", "adaptive_fusion_forward_cuda",
          "adaptive_fusion_backward_cuda", "face_context_resize_cuda")


def _ext():
    from caer_fast import _C

    return _C


def is_available():
    try:
        ext = _ext()
    except ImportError as exc:
        return False, f"caer_fast._C is not built ({exc}); reinstall with `pip install --no-build-isolation -e .`"
    missing = [f for f in _FUNCS if not hasattr(ext, f)]
    if missing:
        return False, "caer_fast._C was built without CUDA (needs a CUDA build of torch and nvcc at install time)"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    _dispatch.register("attention_pool", "cuda", attention_pool)
    _dispatch.register("adaptive_fusion", "cuda", adaptive_fusion)
    _dispatch.register("face_context", "cuda", face_context)
    return True, ""


def _softmax_grad(a: Tensor, grad_a: Tensor) -> Tensor:
    """Gradient reaching the logits through a returned softmax map a (rows = samples)."""
    a, ga = a.float().flatten(1), grad_a.float().flatten(1)
    return a * (ga - (a * ga).sum(1, keepdim=True))


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# attention_pool. The ops take the flat N×C×S features and N×S logits (one dtype); the public
# function reshapes and casts around them (differentiably).
# ---------------------------------------------------------------------------------------------
def _attention_pool_backward(grad, grad_attention, f, lg, out32, lse, need_f, need_l):
    gf, gl = _ext().attention_pool_backward_cuda(grad, f, lg, out32, lse, need_f, need_l)
    if need_l and grad_attention is not None:
        a = torch.exp(lg.float() - lse[:, None])
        gl = (gl.float() + _softmax_grad(a, grad_attention)).to(gl.dtype)
    return gf, gl


@torch.library.custom_op("caer_fast::attention_pool_cuda", mutates_args=(), device_types="cuda")
def attention_pool_op(f: Tensor, lg: Tensor, return_attention: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out N×C in f.dtype, out32 float32 N×C, lse float32 N, attention N×S — empty unless asked)."""
    out, out32, lse, attention = _ext().attention_pool_forward_cuda(f, lg, bool(return_attention))
    return out, out32, lse, (attention if return_attention else f.new_empty((0,)))


@attention_pool_op.register_fake
def _(f, lg, return_attention):
    n, c = f.shape[:2]
    f32 = torch.float32
    return (f.new_empty((n, c)), f.new_empty((n, c), dtype=f32), f.new_empty((n,), dtype=f32),
            f.new_empty(lg.shape if return_attention else (0,)))


@torch.library.custom_op("caer_fast::attention_pool_cuda_backward", mutates_args=(), device_types="cuda")
def attention_pool_backward_op(grad: Tensor, grad_attention: Optional[Tensor], f: Tensor, lg: Tensor, out32: Tensor,
                               lse: Tensor, need_f: bool, need_l: bool) -> Tuple[Tensor, Tensor]:
    """(grad f, grad lg); an empty tensor stands for a gradient that was not asked."""
    gf, gl = _attention_pool_backward(grad, grad_attention, f, lg, out32, lse, need_f, need_l)
    return (gf if need_f else f.new_empty((0,))), (gl if need_l else lg.new_empty((0,)))


@attention_pool_backward_op.register_fake
def _(grad, grad_attention, f, lg, out32, lse, need_f, need_l):
    return f.new_empty(f.shape if need_f else (0,)), lg.new_empty(lg.shape if need_l else (0,))


def _attention_pool_setup(ctx, inputs, output):
    f, lg, return_attention = inputs
    _, out32, lse, _ = output
    ctx.save_for_backward(f, lg, out32, lse)
    ctx.return_attention = return_attention


def _attention_pool_grad(ctx, grad_out, _grad_out32, _grad_lse, grad_attention):
    f, lg, out32, lse = ctx.saved_tensors
    need_f, need_l = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_out is None:
        grad_out = out32.new_zeros(out32.shape)
    gf, gl = attention_pool_backward_op(grad_out, grad_attention if ctx.return_attention else None, f, lg, out32,
                                        lse, need_f, need_l)
    return (gf if need_f else None), (gl if need_l else None), None


attention_pool_op.register_autograd(_attention_pool_grad, setup_context=_attention_pool_setup)


class _AttentionPool(torch.autograd.Function):
    """Eager twin of ``attention_pool_op`` (same ``_C`` functions, no custom-op dispatch)."""

    @staticmethod
    def forward(ctx, f, lg, return_attention):
        out, out32, lse, attention = _ext().attention_pool_forward_cuda(f, lg, bool(return_attention))
        ctx.save_for_backward(f, lg, out32, lse)
        ctx.return_attention = return_attention
        return (out, attention) if return_attention else out

    @staticmethod
    def backward(ctx, grad, grad_attention=None):
        f, lg, out32, lse = ctx.saved_tensors
        need_f, need_l = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gf, gl = _attention_pool_backward(grad, grad_attention if ctx.return_attention else None, f, lg, out32, lse,
                                          need_f, need_l)
        return (gf if need_f else None), (gl if need_l else None), None


def attention_pool(features, logits, return_attention=False):
    if features.dtype not in _KERNEL_DTYPES:  # float64: the reference is exact enough and rare
        return _reference("attention_pool")(features, logits, return_attention)
    n, c = features.shape[:2]
    f = features.reshape(n, c, -1)
    lg = logits.reshape(n, -1).to(features.dtype)  # the kernels take one dtype; the cast is differentiable
    if torch.compiler.is_compiling():
        out, _, _, attention = attention_pool_op(f, lg, return_attention)
    elif return_attention:
        out, attention = _AttentionPool.apply(f, lg, True)
    else:
        out, attention = _AttentionPool.apply(f, lg, False), None
    return (out, attention.reshape(logits.shape)) if return_attention else out


# ---------------------------------------------------------------------------------------------
# adaptive_fusion. The ops take four tensors of one dtype; the public function casts them to the
# promoted dtype (differentiably, so the gradients come back in each input's dtype).
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("caer_fast::adaptive_fusion_cuda", mutates_args=(), device_types="cuda")
def adaptive_fusion_op(face: Tensor, context: Tensor, face_score: Tensor,
                       context_score: Tensor) -> Tuple[Tensor, Tensor]:
    """(fused N×(Cf+Cc), weights float32 N×2); both take gradients."""
    out, w32 = _ext().adaptive_fusion_forward_cuda(face, context, face_score, context_score)
    return out, w32


@adaptive_fusion_op.register_fake
def _(face, context, face_score, context_score):
    n = face.shape[0]
    return face.new_empty((n, face.shape[1] + context.shape[1])), face.new_empty((n, 2), dtype=torch.float32)


@torch.library.custom_op("caer_fast::adaptive_fusion_cuda_backward", mutates_args=(), device_types="cuda")
def adaptive_fusion_backward_op(grad: Tensor, grad_weights: Optional[Tensor], face: Tensor, context: Tensor,
                                w32: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    gface, gctx, gfs, gcs = _ext().adaptive_fusion_backward_cuda(grad, grad_weights, face, context, w32)
    return gface, gctx, gfs, gcs


@adaptive_fusion_backward_op.register_fake
def _(grad, grad_weights, face, context, w32):
    n = face.shape[0]
    return face.new_empty(face.shape), face.new_empty(context.shape), face.new_empty((n, 1)), face.new_empty((n, 1))


def _adaptive_fusion_setup(ctx, inputs, output):
    face, context, _, _ = inputs
    _, w32 = output
    ctx.save_for_backward(face, context, w32)


def _adaptive_fusion_grad(ctx, grad, grad_w32):
    face, context, w32 = ctx.saved_tensors
    if grad is None:
        grad = face.new_zeros((face.shape[0], face.shape[1] + context.shape[1]))
    grads = adaptive_fusion_backward_op(grad, grad_w32, face, context, w32)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


adaptive_fusion_op.register_autograd(_adaptive_fusion_grad, setup_context=_adaptive_fusion_setup)


class _AdaptiveFusion(torch.autograd.Function):
    """Eager twin of ``adaptive_fusion_op``."""

    @staticmethod
    def forward(ctx, face, context, face_score, context_score, return_weights):
        out, w32 = _ext().adaptive_fusion_forward_cuda(face, context, face_score, context_score)
        ctx.save_for_backward(face, context, w32)
        if return_weights:
            return out, w32.to(face_score.dtype, copy=True)  # w32 itself is saved for backward
        return out

    @staticmethod
    def backward(ctx, grad, grad_weights=None):
        face, context, w32 = ctx.saved_tensors
        grads = _ext().adaptive_fusion_backward_cuda(grad, grad_weights, face, context, w32)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])) + (None,)


def adaptive_fusion(face, context, face_score, context_score, return_weights=False):
    if any(t.dtype not in _KERNEL_DTYPES for t in (face, context, face_score, context_score)):
        return _reference("adaptive_fusion")(face, context, face_score, context_score, return_weights)
    score_dtype = face_score.dtype
    dtype = torch.promote_types(torch.promote_types(face.dtype, context.dtype),
                                torch.promote_types(face_score.dtype, context_score.dtype))
    args = tuple(t.to(dtype) for t in (face, context, face_score, context_score))  # differentiable casts
    if torch.compiler.is_compiling():
        out, w32 = adaptive_fusion_op(*args)
        return (out, w32.to(score_dtype)) if return_weights else out
    out = _AdaptiveFusion.apply(*args, return_weights)
    if return_weights:
        out, weights = out
        return out, weights.to(score_dtype)
    return out


def _reference(op):
    return _dispatch._IMPLS[op]["torch"]


# ---------------------------------------------------------------------------------------------
# face_context (uint8 input: no autograd)
# ---------------------------------------------------------------------------------------------
def _face_context(frames, boxes, face_size, context_size, crop, mean, std, antialias, dtype):
    frames = frames.contiguous()
    t = _resize_tables.build(frames, boxes, face_size, context_size, crop, antialias)
    n = frames.shape[0]
    face = torch.empty(n, 3, *t["face_size"], dtype=dtype, device=frames.device)
    context = torch.empty(n, 3, *t["context_out"], dtype=dtype, device=frames.device)
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    ext = _ext()
    ext.face_context_resize_cuda(frames, face, t["fy0"], t["fyw"], t["fx0"], t["fxw"], t["boxes"], t["valid"],
                                 True, mean, std, False, True)
    ext.face_context_resize_cuda(frames, context, t["cy0"], t["cyw"], t["cx0"], t["cxw"], t["boxes"],
                                 t["valid"], False, mean, std, True, False)
    return face, context


@torch.library.custom_op("caer_fast::face_context_cuda", mutates_args=(), device_types="cuda")
def face_context_op(frames: Tensor, boxes: Tensor, face_h: int, face_w: int, ctx_h: int, ctx_w: int,
                    crop_top: int, crop_left: int, crop_h: int, crop_w: int, mean: List[float], std: List[float],
                    antialias: bool, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(face N×3×face_h×face_w, context N×3×h×w) in ``dtype`` (a kernel dtype); crop_h = -1: no crop."""
    crop = None if crop_h < 0 else (crop_top, crop_left, crop_h, crop_w)
    return _face_context(frames, boxes, (face_h, face_w), (ctx_h, ctx_w), crop, mean, std, antialias, dtype)


@face_context_op.register_fake
def _(frames, boxes, face_h, face_w, ctx_h, ctx_w, crop_top, crop_left, crop_h, crop_w, mean, std, antialias,
      dtype):
    return empty_outputs(frames, face_h, face_w, ctx_h, ctx_w, crop_h, crop_w, dtype)


def face_context(frames, boxes, face_size, context_size, crop, mean, std, antialias, dtype):
    kernel_dtype = dtype if dtype in _KERNEL_DTYPES else torch.float32
    if torch.compiler.is_compiling():
        top, left, ch, cw = (0, 0, -1, -1) if crop is None else (int(v) for v in crop)
        face, context = face_context_op(frames, boxes, int(face_size[0]), int(face_size[1]), int(context_size[0]),
                                        int(context_size[1]), top, left, ch, cw, [float(m) for m in mean],
                                        [float(s) for s in std], bool(antialias), kernel_dtype)
    else:
        face, context = _face_context(frames, boxes, face_size, context_size, crop, mean, std, antialias,
                                      kernel_dtype)
    if kernel_dtype != dtype:
        face, context = face.to(dtype), context.to(dtype)
    return face, context
