"""Triton `attention_pool`: softmax over all positions, then the attended mean, in one pass.

Forward: one program per (sample, block of channels) walks the positions once with an online
(running-max) softmax, so the N×C×S attended tensor is never built and ±1e4 logits stay finite.
It also writes the per-sample log-sum-exp, which the backward uses to rebuild the attention.

Backward (a = softmax(logits), out_c = mean_s a_s f_cs):
    dF[c, s] = g_c a_s / S
    dL[s]    = a_s (h_s / S - Σ_c g_c out_c),   h_s = Σ_c g_c f_cs

The launches are wrapped as the ``torch.library.triton_op`` ``caer_fast::attention_pool_triton``
(autograd registered, backward ``caer_fast::attention_pool_triton_backward``), which
:func:`attention_pool` uses under ``torch.compile`` so ``fullgraph=True`` traces it, forward and
backward, and inductor sees the kernels (see ``_compile``). Eager calls run the same kernels through
``AttentionPoolFunction`` (no custom-op dispatch).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._compile import eager, triton_op, wrap_triton

BLOCK_C = 32
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_S = 64


@triton.jit
def _fwd_kernel(f_ptr, l_ptr, out_ptr, lse_ptr, C, S, inv_s,
                f_sn, f_sc, f_ss, l_sn, l_ss,
                BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    m = tl.full((1,), float("-inf"), tl.float32)  # running max
    den = tl.zeros((1,), tl.float32)  # running Σ exp(l - m)
    acc = tl.zeros((BLOCK_C,), tl.float32)  # running Σ exp(l - m) f
    for s0 in range(0, S, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        s_ok = ss < S
        x = tl.load(l_ptr + n * l_sn + ss * l_ss, mask=s_ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))  # finite from the first block on (S ≥ 1)
        alpha = tl.exp(m - m_new)
        p = tl.exp(x - m_new)  # masked positions: exp(-inf) = 0
        f = tl.load(f_ptr + n * f_sn + cs[:, None] * f_sc + ss[None, :] * f_ss,
                    mask=c_ok[:, None] & s_ok[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(f * p[None, :], axis=1)
        den = den * alpha + tl.sum(p, axis=0)
        m = m_new
    tl.store(out_ptr + n * C + cs, acc / den * inv_s, mask=c_ok)
    if tl.program_id(1) == 0:
        tl.store(lse_ptr + n + tl.arange(0, 1), m + tl.log(den))


@triton.jit
def _attention_kernel(l_ptr, lse_ptr, a_ptr, S, l_sn, l_ss, BLOCK_S: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    ss = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = ss < S
    x = tl.load(l_ptr + n * l_sn + ss * l_ss, mask=ok, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + n)
    tl.store(a_ptr + n * S + ss, tl.exp(x - lse).to(a_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bwd_kernel(g_ptr, f_ptr, l_ptr, lse_ptr, dot_ptr, gf_ptr, gl_ptr, C, S, inv_s,
                f_sn, f_sc, f_ss, l_sn, l_ss,
                NEED_GF: tl.constexpr, NEED_GL: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    ss = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = ss < S
    x = tl.load(l_ptr + n * l_sn + ss * l_ss, mask=s_ok, other=0.0).to(tl.float32)
    a = tl.exp(x - tl.load(lse_ptr + n))
    h = tl.zeros((BLOCK_S,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        g = tl.load(g_ptr + n * C + cs, mask=c_ok, other=0.0).to(tl.float32)
        mask = c_ok[:, None] & s_ok[None, :]
        if NEED_GL:
            f = tl.load(f_ptr + n * f_sn + cs[:, None] * f_sc + ss[None, :] * f_ss, mask=mask,
                        other=0.0).to(tl.float32)
            h += tl.sum(g[:, None] * f, axis=0)
        if NEED_GF:  # dF is written contiguous N×C×S
            gf = g[:, None] * (a * inv_s)[None, :]
            tl.store(gf_ptr + n * C * S + cs[:, None] * S + ss[None, :],
                     gf.to(gf_ptr.dtype.element_ty), mask=mask)
    if NEED_GL:
        gl = a * (h * inv_s - tl.load(dot_ptr + n))
        tl.store(gl_ptr + n * S + ss, gl.to(gl_ptr.dtype.element_ty), mask=s_ok)


def _flat(features: Tensor, logits: Tensor):
    n, c = features.shape[:2]
    return features.reshape(n, c, -1), logits.reshape(n, -1)  # views where the layout allows


def attention_pool_forward(features: Tensor, logits: Tensor):
    """(out float32 N×C, lse float32 N); the caller casts out to features.dtype."""
    f, lg = _flat(features, logits)
    n, c, s = f.shape
    out32 = torch.empty(n, c, dtype=torch.float32, device=f.device)
    lse = torch.empty(n, dtype=torch.float32, device=f.device)
    if n and c:
        wrap_triton(_fwd_kernel)[(n, triton.cdiv(c, BLOCK_C))](
            f, lg, out32, lse, c, s, 1.0 / s, f.stride(0), f.stride(1), f.stride(2),
            lg.stride(0), lg.stride(1), BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
    return out32, lse


def attention_map(logits: Tensor, lse: Tensor, dtype: torch.dtype) -> Tensor:
    lg = logits.reshape(logits.shape[0], -1)
    n, s = lg.shape
    a = torch.empty(n, s, dtype=dtype, device=lg.device)
    if n:
        wrap_triton(_attention_kernel)[(n, triton.cdiv(s, BLOCK_S))](
            lg, lse, a, s, lg.stride(0), lg.stride(1), BLOCK_S=BLOCK_S)
    return a.reshape(logits.shape)


def attention_pool_backward(grad: Tensor, grad_attention: Optional[Tensor], features: Tensor, logits: Tensor,
                            out32: Tensor, lse: Tensor, need_features: bool, need_logits: bool):
    """(grad features or None, grad logits or None); ``grad_attention`` is the gradient reaching a
    returned attention map (None when it was not returned or not used)."""
    f, lg = _flat(features, logits)
    n, c, s = f.shape
    grad = grad.contiguous()
    dot = (grad.float() * out32).sum(1)  # Σ_c g_c out_c, N values
    gf = torch.empty(n, c, s, dtype=features.dtype, device=f.device) if need_features else None
    gl = torch.empty(n, s, dtype=logits.dtype, device=f.device) if need_logits else None
    if n and (need_features or need_logits):
        wrap_triton(_bwd_kernel)[(n, triton.cdiv(s, BLOCK_S))](
            grad, f, lg, lse, dot, gf if need_features else f, gl if need_logits else lg, c, s, 1.0 / s,
            f.stride(0), f.stride(1), f.stride(2), lg.stride(0), lg.stride(1),
            NEED_GF=need_features, NEED_GL=need_logits, BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
    gl = gl.reshape(logits.shape) if need_logits else None
    if need_logits and grad_attention is not None:
        # the attention map's own softmax gradient: a (ga - Σ a ga)
        a = attention_map(logits, lse, torch.float32)
        ga = grad_attention.float()
        gl = gl + (a * (ga - (a * ga).flatten(1).sum(1).view(-1, *[1] * (a.dim() - 1)))).to(gl.dtype)
    return (gf.reshape(features.shape) if need_features else None), gl


# ---- the torch.library ops (torch.compile) ------------------------------------------------------
@triton_op("caer_fast::attention_pool_triton", mutates_args=())
def attention_pool_op(features: Tensor, logits: Tensor, return_attention: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(out float32 N×C, lse float32 N, attention shaped like logits in features.dtype — or an empty
    tensor unless ``return_attention``). out and attention take gradients; lse is for the backward."""
    out32, lse = attention_pool_forward(features, logits)
    if return_attention:
        attention = attention_map(logits, lse, features.dtype)
    else:
        attention = features.new_empty((0,))
    return out32, lse, attention


@triton_op("caer_fast::attention_pool_triton_backward", mutates_args=())
def attention_pool_backward_op(grad: Tensor, grad_attention: Optional[Tensor], features: Tensor, logits: Tensor,
                               out32: Tensor, lse: Tensor, need_features: bool,
                               need_logits: bool) -> Tuple[Tensor, Tensor]:
    """(grad features, grad logits); an empty tensor stands for a gradient that was not asked."""
    gf, gl = attention_pool_backward(grad, grad_attention, features, logits, out32, lse, need_features,
                                     need_logits)
    return (features.new_empty((0,)) if gf is None else gf), (logits.new_empty((0,)) if gl is None else gl)


def _op_setup(ctx, inputs, output):
    features, logits, return_attention = inputs
    out32, lse, _ = output
    ctx.save_for_backward(features, logits, out32, lse)
    ctx.return_attention = return_attention


def _op_backward(ctx, grad_out32, _grad_lse, grad_attention):
    features, logits, out32, lse = ctx.saved_tensors
    need_f, need_l = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_out32 is None:
        grad_out32 = torch.zeros_like(out32)
    gf, gl = attention_pool_backward_op(grad_out32, grad_attention if ctx.return_attention else None, features,
                                        logits, out32, lse, need_f, need_l)
    return (gf if need_f else None), (gl if need_l else None), None


attention_pool_op.register_autograd(_op_backward, setup_context=_op_setup)


# ---- eager ---------------------------------------------------------------------------------------
class AttentionPoolFunction(torch.autograd.Function):
    """Eager twin of ``attention_pool_op`` (same kernels and formulas, no custom-op dispatch)."""

    @staticmethod
    def forward(ctx, features, logits, return_attention):
        with eager():
            out32, lse = attention_pool_forward(features, logits)
            attention = attention_map(logits, lse, features.dtype) if return_attention else None
        ctx.save_for_backward(features, logits, out32, lse)
        ctx.return_attention = return_attention
        out = out32.to(features.dtype, copy=True)  # out32 itself is saved for backward
        return (out, attention) if return_attention else out

    @staticmethod
    def backward(ctx, grad, grad_attention=None):
        features, logits, out32, lse = ctx.saved_tensors
        need_f, need_l = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with eager():
            gf, gl = attention_pool_backward(grad, grad_attention if ctx.return_attention else None, features,
                                             logits, out32, lse, need_f, need_l)
        return gf, gl, None


def attention_pool(features: Tensor, logits: Tensor, return_attention: bool = False):
    """Same contract as :func:`caer_fast.ops.attention_pool` (tensors on CUDA, or CPU when interpreted)."""
    if features.dtype not in KERNEL_DTYPES:  # float64: the fp32-accumulating kernel would lose precision
        from caer_fast.ops.attention_pool import attention_pool_reference
        return attention_pool_reference(features, logits, return_attention)
    if torch.compiler.is_compiling():
        out32, _, attention = attention_pool_op(features, logits, return_attention)
        out = out32.to(features.dtype)
        return (out, attention) if return_attention else out
    return AttentionPoolFunction.apply(features, logits, return_attention)
