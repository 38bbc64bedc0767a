"""`attention_pool`: softmax attention over all positions, then the attended mean.

out[n, c] = mean_s softmax(logits[n, 0, :])[s] * features[n, c, s] — exactly the community
model's ``context * softmax(attention)`` followed by ``avg_pool2d`` over the whole map.

The op ``caer_fast::attention_pool(features N×C×(S…), logits N×1×(S…)) -> (out N×C, attention in the
logits' shape)`` and its backward are defined in csrc/ops.cpp, its autograd formula in
csrc/autograd.cpp; this file checks the inputs, registers the fake implementation, and holds the torch
reference.

Non-finite logits follow ``torch.softmax`` on every backend: a ``-inf`` logit gives its position
weight 0; a ``+inf`` or NaN logit, or all ``-inf``, make that sample's attention and output NaN.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _dispatch


def _check_inputs(features: torch.Tensor, logits: torch.Tensor) -> str:
    """Every error of the op; returns the device type. Every eager call pays for these lines (no tuple
    copies of the shapes, one ``device`` per tensor)."""
    if not (isinstance(features, torch.Tensor) and isinstance(logits, torch.Tensor)):
        raise TypeError(f"attention_pool: features and logits must be tensors, got {type(features).__name__} "
                        f"and {type(logits).__name__}")
    fs = features.shape
    if len(fs) < 3:
        raise ValueError(f"attention_pool: features must be N×C×(S…), got {tuple(fs)}")
    if logits.shape != (fs[0], 1, *fs[2:]):
        raise ValueError(f"attention_pool: logits must be {(fs[0], 1, *fs[2:])} for features {tuple(fs)}, "
                         f"got {tuple(logits.shape)}")
    if not (features.is_floating_point() and logits.is_floating_point()):
        raise ValueError(f"attention_pool: features and logits must be floating point, got {features.dtype} "
                         f"and {logits.dtype}")
    device = features.device
    if logits.device != device:
        raise ValueError(f"attention_pool: features on {device}, logits on {logits.device}")
    if not features.numel() and math.prod(fs[2:]) == 0:  # a non-empty map has positions
        raise ValueError(f"attention_pool: features need at least one position, got {tuple(fs)}")
    return _dispatch.device_type(device)


def attention_pool_reference(features: torch.Tensor, logits: torch.Tensor, return_attention: bool = False):
    """Plain PyTorch reference (materialises the N×C×S attended tensor); the softmax in float32 or wider."""
    if torch.onnx.is_in_onnx_export():
        return _attention_pool_over_axes(features, logits, return_attention)
    n, c = features.shape[:2]
    s = math.prod(features.shape[2:])
    compute = torch.promote_types(logits.dtype, torch.float32)
    attention = torch.softmax(logits.reshape(n, 1, s).to(compute), dim=-1).to(features.dtype)
    pooled = (features.reshape(n, c, s) * attention).mean(dim=-1)
    if return_attention:
        return pooled, attention.reshape(logits.shape)
    return pooled


def _attention_pool_over_axes(features: torch.Tensor, logits: torch.Tensor, return_attention: bool):
    """The reference with reductions over the position axes instead of a flattening Reshape, for ONNX
    graphs: OpenVINO 2026.4 computes a dynamic-batch Reshape → ReduceMean → BatchNormalization wrongly
    at batch ≥ 2 (tools/openvino_repro.py). Eager, its backward is slower than the reference's."""
    dims = tuple(range(2, features.dim()))
    x = logits.reshape(logits.shape[0], 1, *features.shape[2:]) if logits.dim() == 2 else logits
    x = x.to(torch.promote_types(logits.dtype, torch.float32))
    e = (x - x.amax(dim=dims, keepdim=True)).exp()
    attention = (e / e.sum(dim=dims, keepdim=True)).to(features.dtype)
    pooled = (features * attention).mean(dim=dims)
    if return_attention:
        return pooled, attention.reshape(logits.shape)
    return pooled


def attention_pool(features: torch.Tensor, logits: torch.Tensor, return_attention: bool = False):
    """Attention-weighted mean of ``features`` over every position.

    Args:
        features: N×C×(S…) feature map (2-D maps, or T×H×W space-time maps for clips).
        logits: N×1×(S…) attention logits; the softmax runs over all positions at once.
        return_attention: also return the N×1×(S…) attention map (it sums to 1 per sample).

    Returns:
        N×C pooled features in ``features.dtype`` (and the attention map if asked).

    Example:
        >>> f, a = torch.randn(2, 256, 7, 7), torch.randn(2, 1, 7, 7)
        >>> attention_pool(f, a).shape
        torch.Size([2, 256])
    """
    device_type = _check_inputs(features, logits)
    dtype = features.dtype
    if not _dispatch.use_kernel("attention_pool", device_type, dtype):
        return attention_pool_reference(features, logits, return_attention)
    if logits.dtype != dtype:
        logits = logits.to(dtype)  # differentiable
    # the kernels take N×C×(S…) as it comes and return the attention map in the logits' shape
    out, attention = _dispatch.call(_OP, features, logits)
    return (out, attention) if return_attention else out


class AttentionPool(nn.Module):
    """:func:`attention_pool` as a module: ``forward(features, logits)`` → (N×C pooled, attention map)."""

    def forward(self, features: torch.Tensor, logits: torch.Tensor):
        return attention_pool(features, logits, return_attention=True)


# ---- the op's fake implementation (its autograd formula is csrc/autograd.cpp's) ----------------
# a = softmax(x), out_c = mean_s a_s f_cs:
#   d f_cs = g_c a_s / S;   d x_s = a_s (Σ_c g_c f_cs / S − Σ_c g_c out_c + ga_s − Σ_t a_t ga_t)
# (ga: the gradient reaching the returned attention map). Every backend saves (features, attention, out).
_OP = torch.ops.caer_fast.attention_pool.default if _dispatch.HAS_OPS else None  # bound once, not per call

if _dispatch.HAS_OPS:
    @torch.library.register_fake("caer_fast::attention_pool")
    def _(features, logits):
        return features.new_empty(features.shape[:2]), features.new_empty(logits.shape)

    @torch.library.register_fake("caer_fast::attention_pool_backward")
    def _(grad_out, grad_attention, features, attention, out):
        return features.new_empty(features.shape), features.new_empty(attention.shape)

