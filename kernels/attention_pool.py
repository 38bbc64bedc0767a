"""Triton `attention_pool`: softmax over all positions, then the attended mean, in one pass.

Forward: one program per (sample, block of channels) walks the positions once with an online
(running-max) softmax, so the N×C×S attended tensor is never built and ±1e4 logits stay finite;
it writes the per-sample log-sum-exp, from which a second kernel writes the attention map.

Backward (a = softmax(logits), out_c = mean_s a_s f_cs, ga = gradient reaching the attention map):
    dF[c, s] = g_c a_s / S
    dL[s]    = a_s (h_s / S - Σ_c g_c out_c + ga_s - Σ_t a_t ga_t),   h_s = Σ_c g_c f_cs

:func:`attention_pool` and :func:`attention_pool_backward` have the signatures of the ops
``caer_fast::attention_pool`` / ``_backward`` (csrc/ops.cpp), whose CUDA kernels they replace when the
backend is "triton" (see ``_compile``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._compile import wrap_triton

BLOCK_C = 32
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
    tl.store(out_ptr + n * C + cs, (acc / den * inv_s).to(out_ptr.dtype.element_ty), mask=c_ok)
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
def _bwd_kernel(g_ptr, f_ptr, a_ptr, ga_ptr, dot_ptr, gf_ptr, gl_ptr, C, S, inv_s,
                f_sn, f_sc, f_ss, HAS_GA: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    ss = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = ss < S
    a = tl.load(a_ptr + n * S + ss, mask=s_ok, other=0.0).to(tl.float32)
    h = tl.zeros((BLOCK_S,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        c_ok = cs < C
        g = tl.load(g_ptr + n * C + cs, mask=c_ok, other=0.0).to(tl.float32)
        mask = c_ok[:, None] & s_ok[None, :]
        f = tl.load(f_ptr + n * f_sn + cs[:, None] * f_sc + ss[None, :] * f_ss, mask=mask, other=0.0).to(tl.float32)
        h += tl.sum(g[:, None] * f, axis=0)
        gf = g[:, None] * (a * inv_s)[None, :]  # dF is written contiguous N×C×S
        tl.store(gf_ptr + n * C * S + cs[:, None] * S + ss[None, :], gf.to(gf_ptr.dtype.element_ty), mask=mask)
    d = h * inv_s - tl.load(dot_ptr + n)  # dot: Σ_c g_c out_c + Σ_t a_t ga_t
    if HAS_GA:
        d += tl.load(ga_ptr + n * S + ss, mask=s_ok, other=0.0).to(tl.float32)
    tl.store(gl_ptr + n * S + ss, (a * d).to(gl_ptr.dtype.element_ty), mask=s_ok)


INLINE = ("attention_pool", "attention_pool_backward")  # traced into compiled graphs on a GPU


def attention_pool(features: Tensor, logits: Tensor) -> Tuple[Tensor, Tensor]:
    """features N×C×(S…), logits N×S or N×1×(S…) (one dtype) -> (out N×C, attention in the logits' shape)."""
    n, c, s = features.shape[0], features.shape[1], math.prod(features.shape[2:])
    f, x = features.reshape(n, c, s), logits.reshape(n, s)
    out = torch.empty(n, c, dtype=features.dtype, device=features.device)
    lse = torch.empty(n, dtype=torch.float32, device=features.device)
    attention = torch.empty(logits.shape, dtype=features.dtype, device=features.device)  # written as N×S
    if n and c:
        wrap_triton(_fwd_kernel)[(n, triton.cdiv(c, BLOCK_C))](
            f, x, out, lse, c, s, 1.0 / s, f.stride(0), f.stride(1), f.stride(2),
            x.stride(0), x.stride(1), BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
    if n:
        if not c:  # no channel program ran to write the log-sum-exp
            lse = torch.logsumexp(x.float(), dim=1)
        wrap_triton(_attention_kernel)[(n, triton.cdiv(s, BLOCK_S))](
            x, lse, attention, s, x.stride(0), x.stride(1), BLOCK_S=BLOCK_S)
    return out, attention


def attention_pool_backward(grad_out: Tensor, grad_attention: Optional[Tensor], features: Tensor, attention: Tensor,
                            out: Tensor) -> Tuple[Tensor, Tensor]:
    n, c, s = features.shape[0], features.shape[1], math.prod(features.shape[2:])
    f = features.reshape(n, c, s)
    grad_out, flat_attention = grad_out.contiguous(), attention.contiguous().view(n, s)
    dot = (grad_out.float() * out.float()).sum(1)  # Σ_c g_c out_c, N values
    has_ga = grad_attention is not None
    if has_ga:
        grad_attention = grad_attention.contiguous().view(n, s)
        dot = dot + (flat_attention.float() * grad_attention.float()).sum(1)
    grad_features = torch.empty(features.shape, dtype=features.dtype, device=features.device)  # written as N×C×S
    grad_logits = torch.empty(attention.shape, dtype=features.dtype, device=features.device)  # written as N×S
    if n:
        wrap_triton(_bwd_kernel)[(n, triton.cdiv(s, BLOCK_S))](
            grad_out, f, flat_attention, grad_attention if has_ga else flat_attention, dot, grad_features,
            grad_logits, c, s, 1.0 / s, f.stride(0), f.stride(1), f.stride(2), HAS_GA=has_ga,
            BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
    return grad_features, grad_logits
