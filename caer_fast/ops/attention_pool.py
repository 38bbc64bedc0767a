"""`attention_pool`: softmax attention over all positions, then the attended mean.

out[n, c] = mean_s softmax(logits[n, 0, :])[s] * features[n, c, s] — exactly the community
model's ``context * softmax(attention)`` followed by ``avg_pool2d`` over the whole map.
"""
from __future__ import annotations

import torch

from . import _dispatch


def _check_inputs(features: torch.Tensor, logits: torch.Tensor) -> None:
    if features.dim() < 3:
        raise ValueError(f"attention_pool: features must be N×C×(S…), got {tuple(features.shape)}")
    expected = (features.shape[0], 1, *features.shape[2:])
    if tuple(logits.shape) != expected:
        raise ValueError(f"attention_pool: logits must be {expected} for features {tuple(features.shape)}, "
                         f"got {tuple(logits.shape)}")


def attention_pool_reference(features: torch.Tensor, logits: torch.Tensor, return_attention: bool = False):
    """Plain PyTorch reference (materialises the N×C×S attended tensor)."""
    _check_inputs(features, logits)
    n, c = features.shape[:2]
    attention = torch.softmax(logits.reshape(n, 1, -1).float(), dim=-1).to(features.dtype)
    pooled = (features.reshape(n, c, -1) * attention).mean(dim=-1)
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
        N×C pooled features (and the attention map if asked).

    Example:
        >>> f, a = torch.randn(2, 256, 7, 7), torch.randn(2, 1, 7, 7)
        >>> attention_pool(f, a).shape
        torch.Size([2, 256])
    """
    _check_inputs(features, logits)
    impl = _dispatch.implementation("attention_pool", features)
    return impl(features, logits, return_attention)


_dispatch.register("attention_pool", "torch", attention_pool_reference)
