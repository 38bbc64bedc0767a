"""Triton `adaptive_fusion`: two-way softmax over the stream scores and the weighted concat.

Forward: one program per (row, block of output columns); the two weights are recomputed per
program (two exps) rather than stored and re-read. Backward: one program per row, which also
reduces Σ g·face and Σ g·context for the score gradients:
    d face_score = -d context_score = w_f w_c (Σ g_f·face + gw_f - Σ g_c·context - gw_c),
where gw is the gradient reaching the returned weights.

:func:`adaptive_fusion` and :func:`adaptive_fusion_backward` have the signatures of the ops
``caer_fast::adaptive_fusion`` / ``_backward`` (csrc/ops.cpp), whose CUDA kernels they replace when
the backend is "triton" (see ``_compile``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._compile import wrap_triton

BLOCK = 128


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
        tl.store(w_ptr + n * 2 + k, tl.where(k == 0, wf, wc).to(w_ptr.dtype.element_ty))


@triton.jit
def _bwd_kernel(g_ptr, gw_ptr, face_ptr, ctx_ptr, w_ptr, gface_ptr, gctx_ptr, gfs_ptr, gcs_ptr, CF, CC,
                face_sn, ctx_sn, HAS_GW: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    wf = tl.load(w_ptr + n * 2).to(tl.float32)
    wc = tl.load(w_ptr + n * 2 + 1).to(tl.float32)
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


INLINE = ("adaptive_fusion", "adaptive_fusion_backward")  # traced into compiled graphs on a GPU


def _rows(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def adaptive_fusion(face: Tensor, context: Tensor, face_score: Tensor, context_score: Tensor) -> Tuple[Tensor, Tensor]:
    """face N×Cf, context N×Cc, scores N×1 (one dtype) -> (out N×(Cf+Cc), weights N×2) in that dtype."""
    face, context = _rows(face), _rows(context)
    n, cf = face.shape
    cc = context.shape[1]
    out = torch.empty(n, cf + cc, dtype=face.dtype, device=face.device)
    weights = torch.empty(n, 2, dtype=face.dtype, device=face.device)
    if n:
        wrap_triton(_fwd_kernel)[(n, max(1, triton.cdiv(cf + cc, BLOCK)))](
            face, context, face_score, context_score, out, weights, cf, cc, face.stride(0), context.stride(0),
            face_score.stride(0), context_score.stride(0), BLOCK=BLOCK)
    return out, weights


def adaptive_fusion_backward(grad_out: Tensor, grad_weights: Optional[Tensor], face: Tensor, context: Tensor,
                             weights: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    face, context, weights = _rows(face), _rows(context), weights.contiguous()
    grad_out = grad_out.contiguous()
    n, cf = face.shape
    cc = context.shape[1]
    grad_face = torch.empty(n, cf, dtype=face.dtype, device=face.device)
    grad_context = torch.empty(n, cc, dtype=face.dtype, device=face.device)
    grad_face_score = torch.empty(n, 1, dtype=face.dtype, device=face.device)
    grad_context_score = torch.empty(n, 1, dtype=face.dtype, device=face.device)
    has_gw = grad_weights is not None
    if n:
        wrap_triton(_bwd_kernel)[(n,)](
            grad_out, grad_weights.contiguous() if has_gw else weights, face, context, weights, grad_face,
            grad_context, grad_face_score, grad_context_score, cf, cc, face.stride(0), context.stride(0),
            HAS_GW=has_gw, BLOCK=BLOCK)
    return grad_face, grad_context, grad_face_score, grad_context_score
