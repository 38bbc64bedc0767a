"""Triton `adaptive_fusion`: two-way softmax over the stream scores and the weighted concat.

Forward: one program per (row, block of output columns); the two weights are recomputed per
program (two exps) rather than stored and re-read. Backward: one program per row, which also
reduces Σ g·face and Σ g·context for the score gradients:
    d face_score = -d context_score = w_f w_c (Σ g_f·face + gw_f - Σ g_c·context - gw_c),
where gw is the gradient reaching the returned weights (0 unless they are used).

The launches are wrapped as the ``torch.library.triton_op`` ``caer_fast::adaptive_fusion_triton``
(autograd registered, backward ``caer_fast::adaptive_fusion_triton_backward``), which
:func:`adaptive_fusion` uses under ``torch.compile`` (see ``_compile``); eager calls run the same
kernels through ``AdaptiveFusionFunction``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._compile import eager, triton_op, wrap_triton

BLOCK = 128
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _weights(fs_ptr, cs_ptr):
    sf = tl.load(fs_ptr).to(tl.float32)
    sc = tl.load(cs_ptr).to(tl.float32)
    m = tl.maximum(sf, sc)
    ef = tl.exp(sf - m)
    ec = tl.exp(sc - m)
    return ef / (ef + ec), ec / (ef + ec)


@triton.jit
def _fwd_kernel(face_ptr, ctx_ptr, fs_ptr, cs_ptr, out_ptr, w_ptr, CF, CC,
                face_sn, ctx_sn, fs_sn, cs_sn, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    wf, wc = _weights(fs_ptr + n * fs_sn, cs_ptr + n * cs_sn)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    is_face = j < CF
    is_ctx = (j >= CF) & (j < CF + CC)
    xf = tl.load(face_ptr + n * face_sn + j, mask=is_face, other=0.0).to(tl.float32)
    xc = tl.load(ctx_ptr + n * ctx_sn + (j - CF), mask=is_ctx, other=0.0).to(tl.float32)
    y = tl.where(is_face, wf * xf, wc * xc)
    tl.store(out_ptr + n * (CF + CC) + j, y.to(out_ptr.dtype.element_ty), mask=j < CF + CC)
    if tl.program_id(1) == 0:
        k = tl.arange(0, 2)
        tl.store(w_ptr + n * 2 + k, tl.where(k == 0, wf, wc))


@triton.jit
def _bwd_kernel(g_ptr, gw_ptr, face_ptr, ctx_ptr, w_ptr, gface_ptr, gctx_ptr, gfs_ptr, gcs_ptr, CF, CC,
                face_sn, ctx_sn, HAS_GW: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    wf = tl.load(w_ptr + n * 2)
    wc = tl.load(w_ptr + n * 2 + 1)
    row = n * (CF + CC)
    dot_f = tl.zeros((BLOCK,), tl.float32)
    dot_c = tl.zeros((BLOCK,), tl.float32)
    for j0 in range(0, CF, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        ok = j < CF
        g = tl.load(g_ptr + row + j, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(face_ptr + n * face_sn + j, mask=ok, other=0.0).to(tl.float32)
        dot_f += g * x
        tl.store(gface_ptr + n * CF + j, (g * wf).to(gface_ptr.dtype.element_ty), mask=ok)
    for j0 in range(0, CC, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        ok = j < CC
        g = tl.load(g_ptr + row + CF + j, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(ctx_ptr + n * ctx_sn + j, mask=ok, other=0.0).to(tl.float32)
        dot_c += g * x
        tl.store(gctx_ptr + n * CC + j, (g * wc).to(gctx_ptr.dtype.element_ty), mask=ok)
    dwf = tl.sum(dot_f, axis=0)
    dwc = tl.sum(dot_c, axis=0)
    if HAS_GW:
        dwf += tl.load(gw_ptr + n * 2).to(tl.float32)
        dwc += tl.load(gw_ptr + n * 2 + 1).to(tl.float32)
    d = wf * wc * (dwf - dwc)  # softmax over two: d s_f = -d s_c
    tl.store(gfs_ptr + n, d.to(gfs_ptr.dtype.element_ty))
    tl.store(gcs_ptr + n, (-d).to(gcs_ptr.dtype.element_ty))


def _rows(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def adaptive_fusion_forward(face, context, face_score, context_score):
    """(fused N×(Cf+Cc) in the promoted dtype, weights float32 N×2)."""
    face, context = _rows(face), _rows(context)
    n, cf = face.shape
    cc = context.shape[1]
    dtype = torch.promote_types(torch.promote_types(face.dtype, context.dtype), face_score.dtype)
    out = torch.empty(n, cf + cc, dtype=dtype, device=face.device)
    w = torch.empty(n, 2, dtype=torch.float32, device=face.device)
    if n:
        wrap_triton(_fwd_kernel)[(n, triton.cdiv(cf + cc, BLOCK))](
            face, context, face_score, context_score, out, w, cf, cc, face.stride(0), context.stride(0),
            face_score.stride(0), context_score.stride(0), BLOCK=BLOCK)
    return out, w


def adaptive_fusion_backward(grad, grad_weights, face, context, w32, score_dtype):
    face, context = _rows(face), _rows(context)
    grad = grad.contiguous()
    n, cf = face.shape
    cc = context.shape[1]
    gface = torch.empty(n, cf, dtype=face.dtype, device=face.device)
    gctx = torch.empty(n, cc, dtype=context.dtype, device=face.device)
    gfs = torch.empty(n, 1, dtype=score_dtype, device=face.device)
    gcs = torch.empty(n, 1, dtype=score_dtype, device=face.device)
    has_gw = grad_weights is not None
    gw = grad_weights.float().contiguous() if has_gw else w32
    if n:
        wrap_triton(_bwd_kernel)[(n,)](grad, gw, face, context, w32, gface, gctx, gfs, gcs, cf, cc,
                                       face.stride(0), context.stride(0), HAS_GW=has_gw, BLOCK=BLOCK)
    return gface, gctx, gfs, gcs


# ---- the torch.library ops (torch.compile) ------------------------------------------------------
@triton_op("caer_fast::adaptive_fusion_triton", mutates_args=())
def adaptive_fusion_op(face: Tensor, context: Tensor, face_score: Tensor,
                       context_score: Tensor) -> Tuple[Tensor, Tensor]:
    """(fused N×(Cf+Cc) in the promoted dtype, weights float32 N×2); both take gradients."""
    return adaptive_fusion_forward(face, context, face_score, context_score)


@triton_op("caer_fast::adaptive_fusion_triton_backward", mutates_args=())
def adaptive_fusion_backward_op(grad: Tensor, grad_weights: Optional[Tensor], face: Tensor, context: Tensor,
                                w32: Tensor, score_dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return adaptive_fusion_backward(grad, grad_weights, face, context, w32, score_dtype)


def _op_setup(ctx, inputs, output):
    face, context, face_score, _ = inputs
    _, w32 = output
    ctx.save_for_backward(face, context, w32)
    ctx.score_dtype = face_score.dtype


def _op_backward(ctx, grad, grad_w32):
    face, context, w32 = ctx.saved_tensors
    if grad is None:
        grad = w32.new_zeros((face.shape[0], face.shape[1] + context.shape[1]))
    grads = adaptive_fusion_backward_op(grad, grad_w32, face, context, w32, ctx.score_dtype)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


adaptive_fusion_op.register_autograd(_op_backward, setup_context=_op_setup)


# ---- eager ---------------------------------------------------------------------------------------
class AdaptiveFusionFunction(torch.autograd.Function):
    """Eager twin of ``adaptive_fusion_op`` (same kernels and formulas, no custom-op dispatch)."""

    @staticmethod
    def forward(ctx, face, context, face_score, context_score, return_weights):
        with eager():
            out, w32 = adaptive_fusion_forward(face, context, face_score, context_score)
        ctx.save_for_backward(face, context, w32)
        ctx.score_dtype = face_score.dtype
        ctx.return_weights = return_weights
        if return_weights:
            return out, w32.to(face_score.dtype, copy=True)  # w32 itself is saved for backward
        return out

    @staticmethod
    def backward(ctx, grad, grad_weights=None):
        face, context, w32 = ctx.saved_tensors
        with eager():
            gface, gctx, gfs, gcs = adaptive_fusion_backward(grad, grad_weights, face, context, w32,
                                                             ctx.score_dtype)
        need = ctx.needs_input_grad
        return (gface if need[0] else None, gctx if need[1] else None,
                gfs if need[2] else None, gcs if need[3] else None, None)


def adaptive_fusion(face, context, face_score, context_score, return_weights: bool = False):
    """Same contract as :func:`caer_fast.ops.adaptive_fusion`."""
    if any(t.dtype not in KERNEL_DTYPES for t in (face, context, face_score, context_score)):
        from caer_fast.ops.adaptive_fusion import adaptive_fusion_reference  # float64: exact reference
        return adaptive_fusion_reference(face, context, face_score, context_score, return_weights)
    if torch.compiler.is_compiling():
        out, w32 = adaptive_fusion_op(face, context, face_score, context_score)
        return (out, w32.to(face_score.dtype)) if return_weights else out
    return AdaptiveFusionFunction.apply(face, context, face_score, context_score, return_weights)
