"""The ``cuda`` backend: the CUDA C++ kernels of ``caer_fast._C`` (csrc/cuda), for CUDA tensors.

Imported lazily by ``_dispatch``; ``caer_fast._C`` only holds these functions when it was built
with a CUDA torch and nvcc (``CAER_FAST_WITH_CUDA``).
"""
from __future__ import annotations

import torch

from . import _dispatch, _resize_tables

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


def _softmax_grad(a: torch.Tensor, grad_a: torch.Tensor) -> torch.Tensor:
    """Gradient reaching the logits through a returned softmax map a (rows = samples)."""
    a, ga = a.float().flatten(1), grad_a.float().flatten(1)
    return a * (ga - (a * ga).sum(1, keepdim=True))


class _AttentionPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, logits, return_attention):
        n, c = features.shape[:2]
        f = features.reshape(n, c, -1)
        lg = logits.reshape(n, -1).to(features.dtype)
        out, out32, lse, attention = _ext().attention_pool_forward_cuda(f, lg, bool(return_attention))
        ctx.save_for_backward(f, lg, out32, lse)
        ctx.shapes = (features.shape, logits.shape, logits.dtype)
        ctx.return_attention = return_attention
        if return_attention:
            return out, attention.reshape(logits.shape)
        return out

    @staticmethod
    def backward(ctx, grad, grad_attention=None):
        f, lg, out32, lse = ctx.saved_tensors
        f_shape, l_shape, l_dtype = ctx.shapes
        need_f, need_l = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gf, gl = _ext().attention_pool_backward_cuda(grad, f, lg, out32, lse, need_f, need_l)
        if need_l:
            if ctx.return_attention and grad_attention is not None:
                a = torch.exp(lg.float() - lse[:, None])
                gl = (gl.float() + _softmax_grad(a, grad_attention)).to(gl.dtype)
            gl = gl.reshape(l_shape).to(l_dtype)
        return (gf.reshape(f_shape) if need_f else None), (gl if need_l else None), None


class _AdaptiveFusion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, face, context, face_score, context_score, return_weights):
        dtypes = (face.dtype, context.dtype, face_score.dtype, context_score.dtype)
        dtype = torch.promote_types(torch.promote_types(dtypes[0], dtypes[1]), torch.promote_types(dtypes[2], dtypes[3]))
        face, context, fs, cs = (t.to(dtype) for t in (face, context, face_score, context_score))
        out, w32 = _ext().adaptive_fusion_forward_cuda(face, context, fs, cs)
        ctx.save_for_backward(face, context, w32)
        ctx.dtypes = dtypes
        if return_weights:
            return out, w32.to(dtypes[2], copy=True)  # w32 itself is saved for backward
        return out

    @staticmethod
    def backward(ctx, grad, grad_weights=None):
        face, context, w32 = ctx.saved_tensors
        grads = _ext().adaptive_fusion_backward_cuda(grad, grad_weights, face, context, w32)
        return tuple(g.to(d) if need else None
                     for g, d, need in zip(grads, ctx.dtypes, ctx.needs_input_grad[:4])) + (None,)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def attention_pool(features, logits, return_attention=False):
    if features.dtype not in _KERNEL_DTYPES:  # float64: the reference is exact enough and rare
        return _reference("attention_pool")(features, logits, return_attention)
    return _AttentionPool.apply(features, logits, return_attention)


def adaptive_fusion(face, context, face_score, context_score, return_weights=False):
    if any(t.dtype not in _KERNEL_DTYPES for t in (face, context, face_score, context_score)):
        return _reference("adaptive_fusion")(face, context, face_score, context_score, return_weights)
    return _AdaptiveFusion.apply(face, context, face_score, context_score, return_weights)


def _reference(op):
    return _dispatch._IMPLS[op]["torch"]


def face_context(frames, boxes, face_size, context_size, crop, mean, std, antialias, dtype):
    if dtype not in _KERNEL_DTYPES:
        face, context = face_context(frames, boxes, face_size, context_size, crop, mean, std, antialias,
                                     torch.float32)
        return face.to(dtype), context.to(dtype)
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
