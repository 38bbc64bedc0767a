"""Triton `attention_pool`: softmax over all positions, then the attended mean, in one pass.

Forward: one program per (sample, block of channels) walks the positions once with an online
(running-max) softmax, so the N×C×S attended tensor is never built and ±1e4 logits stay finite.
It also writes the per-sample log-sum-exp, which the backward uses to rebuild the attention.

Backward (a = softmax(logits), out_c = mean_s a_s f_cs):
    dF[c, s] = g_c a_s / S
    dL[s]    = a_s (h_s / S - Σ_c g_c out_c),   h_s = Σ_c g_c f_cs
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

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


def _flat(features: torch.Tensor, logits: torch.Tensor):
    n, c = features.shape[:2]
    return features.reshape(n, c, -1), logits.reshape(n, -1)  # views where the layout allows


def attention_pool_forward(features: torch.Tensor, logits: torch.Tensor):
    """(out in features.dtype, out float32, lse float32 N)."""
    f, lg = _flat(features, logits)
    n, c, s = f.shape
    out32 = torch.empty(n, c, dtype=torch.float32, device=f.device)
    lse = torch.empty(n, dtype=torch.float32, device=f.device)
    if n and c:
        _fwd_kernel[(n, triton.cdiv(c, BLOCK_C))](
            f, lg, out32, lse, c, s, 1.0 / s, f.stride(0), f.stride(1), f.stride(2),
            lg.stride(0), lg.stride(1), BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
    return out32.to(features.dtype, copy=True), out32, lse  # out32 itself is saved for backward


def attention_map(logits: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    lg = logits.reshape(logits.shape[0], -1)
    n, s = lg.shape
    a = torch.empty(n, s, dtype=dtype, device=lg.device)
    if n:
        _attention_kernel[(n, triton.cdiv(s, BLOCK_S))](lg, lse, a, s, lg.stride(0), lg.stride(1), BLOCK_S=BLOCK_S)
    return a.reshape(logits.shape)


def attention_pool_backward(grad, features, logits, out32, lse, need_features: bool, need_logits: bool):
    f, lg = _flat(features, logits)
    n, c, s = f.shape
    grad = grad.contiguous()
    dot = (grad.float() * out32).sum(1)  # Σ_c g_c out_c, N values
    gf = torch.empty(n, c, s, dtype=features.dtype, device=f.device) if need_features else None
    gl = torch.empty(n, s, dtype=logits.dtype, device=f.device) if need_logits else None
    if n and (need_features or need_logits):
        _bwd_kernel[(n, triton.cdiv(s, BLOCK_S))](
            grad, f, lg, lse, dot, gf if need_features else f, gl if need_logits else lg, c, s, 1.0 / s,
            f.stride(0), f.stride(1), f.stride(2), lg.stride(0), lg.stride(1),
            NEED_GF=need_features, NEED_GL=need_logits, BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
    return (gf.reshape(features.shape) if need_features else None,
            gl.reshape(logits.shape) if need_logits else None)


class AttentionPoolFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, logits, return_attention):
        out, out32, lse = attention_pool_forward(features, logits)
        ctx.save_for_backward(features, logits, out32, lse)
        ctx.return_attention = return_attention
        if return_attention:
            attention = attention_map(logits, lse, features.dtype)
            return out, attention
        return out

    @staticmethod
    def backward(ctx, grad, grad_attention=None):
        features, logits, out32, lse = ctx.saved_tensors
        need_f, need_l = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gf, gl = attention_pool_backward(grad, features, logits, out32, lse, need_f, need_l)
        if ctx.return_attention and grad_attention is not None and need_l:
            # the attention map's own softmax gradient: a (ga - Σ a ga)
            a = attention_map(logits, lse, torch.float32)
            ga = grad_attention.float()
            gl = gl + (a * (ga - (a * ga).flatten(1).sum(1).view(-1, *[1] * (a.dim() - 1)))).to(gl.dtype)
        return gf, gl, None


def attention_pool(features: torch.Tensor, logits: torch.Tensor, return_attention: bool = False):
    """Same contract as :func:`caer_fast.ops.attention_pool` (tensors on CUDA, or CPU when interpreted)."""
    if features.dtype not in KERNEL_DTYPES:  # float64: the fp32-accumulating kernel would lose precision
        from caer_fast.ops.attention_pool import attention_pool_reference
        return attention_pool_reference(features, logits, return_attention)
    return AttentionPoolFunction.apply(features, logits, return_attention)
