"""`adaptive_fusion`: two-way softmax over the stream scores, then the weighted concatenation.

The op ``caer_fast::adaptive_fusion(face, context, face_score, context_score) -> (out, weights)`` and
its backward are defined in csrc/ops.cpp, its autograd formula in csrc/autograd.cpp; this file checks
the inputs, promotes them to one dtype, registers the fake implementation, and holds the torch reference.
"""
from __future__ import annotations

import torch
from torch import nn

from . import _dispatch


def _check_inputs(face, context, face_score, context_score) -> str:
    """Every error of the op; returns the device type."""
    if not (isinstance(face, torch.Tensor) and isinstance(context, torch.Tensor)
            and isinstance(face_score, torch.Tensor) and isinstance(context_score, torch.Tensor)):
        raise TypeError("adaptive_fusion: face, context, face_score and context_score must be tensors, got "
                        f"{[type(t).__name__ for t in (face, context, face_score, context_score)]}")
    n = face.shape[0]
    if face.dim() != 2 or context.dim() != 2 or context.shape[0] != n:
        raise ValueError(f"adaptive_fusion: face and context must be N×C, got {tuple(face.shape)} "
                         f"and {tuple(context.shape)}")
    # written out, without loops, generators or sets: every eager call pays for these lines
    if face_score.shape != (n, 1) or context_score.shape != (n, 1):
        name, s = ("face_score", face_score) if face_score.shape != (n, 1) else ("context_score", context_score)
        raise ValueError(f"adaptive_fusion: {name} must be {n}×1, got {tuple(s.shape)}")
    if not (face.is_floating_point() and context.is_floating_point() and face_score.is_floating_point()
            and context_score.is_floating_point()):
        raise ValueError("adaptive_fusion: inputs must be floating point, got "
                         f"{[str(t.dtype) for t in (face, context, face_score, context_score)]}")
    device = face.device
    if not (context.device == device and face_score.device == device and context_score.device == device):
        raise ValueError("adaptive_fusion: inputs on several devices: "
                         f"{[str(t.device) for t in (face, context, face_score, context_score)]}")
    return _dispatch.device_type(device)


def adaptive_fusion_reference(face, context, face_score, context_score, return_weights: bool = False):
    """Plain PyTorch reference, as the community model writes it."""
    weights = torch.softmax(torch.cat([face_score, context_score], dim=-1), dim=-1)
    fused = torch.cat([face * weights[:, 0:1], context * weights[:, 1:2]], dim=-1)
    if return_weights:
        return fused, weights
    return fused


def adaptive_fusion(face: torch.Tensor, context: torch.Tensor, face_score: torch.Tensor,
                    context_score: torch.Tensor, return_weights: bool = False):
    """Weigh the face and context vectors by a softmax over their scores and concatenate them.

    Args:
        face: N×Cf face features.  context: N×Cc context features.
        face_score, context_score: N×1 unnormalised scores.
        return_weights: also return the N×2 weights (λ_face, λ_context), rows summing to 1.

    Returns:
        N×(Cf+Cc) ``concat(λ_face·face, λ_context·context)`` in the inputs' promoted dtype (and the
        weights, in the scores' promoted dtype, if asked).

    Example:
        >>> out = adaptive_fusion(torch.randn(4, 256), torch.randn(4, 256), torch.randn(4, 1), torch.randn(4, 1))
        >>> out.shape
        torch.Size([4, 512])
    """
    device_type = _check_inputs(face, context, face_score, context_score)
    args = (face, context, face_score, context_score)
    dtype = face.dtype
    mixed = not (context.dtype == dtype and face_score.dtype == dtype and context_score.dtype == dtype)
    if mixed:
        for t in args[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    if not _dispatch.use_kernel("adaptive_fusion", device_type, dtype):
        return adaptive_fusion_reference(*args, return_weights)
    if mixed:
        args = tuple(t if t.dtype == dtype else t.to(dtype) for t in args)  # differentiable casts
    out, weights = _dispatch.call(_OP, *args)
    if not return_weights:
        return out
    if mixed:
        weights = weights.to(torch.promote_types(face_score.dtype, context_score.dtype))
    return out, weights


class AdaptiveFusion(nn.Module):
    """:func:`adaptive_fusion` as a module: ``forward(face, context, face_score, context_score)`` →
    (N×(Cf+Cc) fused features, N×2 weights)."""

    def forward(self, face, context, face_score, context_score):
        return adaptive_fusion(face, context, face_score, context_score, return_weights=True)


# ---- the op's fake implementation (its autograd formula is csrc/autograd.cpp's) ----------------
# d face = w_f g_f;  d w_f = g_f·face + gw_f (likewise context);  softmax over two:
# d face_score = −d context_score = w_f w_c (d w_f − d w_c). Every backend saves (face, context, weights).
_OP = torch.ops.caer_fast.adaptive_fusion.default if _dispatch.HAS_OPS else None  # bound once, not per call

if _dispatch.HAS_OPS:
    @torch.library.register_fake("caer_fast::adaptive_fusion")
    def _(face, context, face_score, context_score):
        n = face.shape[0]
        return face.new_empty((n, face.shape[1] + context.shape[1])), face.new_empty((n, 2))

    @torch.library.register_fake("caer_fast::adaptive_fusion_backward")
    def _(grad_out, grad_weights, face, context, weights):
        n = face.shape[0]
        return (face.new_empty(face.shape), face.new_empty(context.shape), face.new_empty((n, 1)),
                face.new_empty((n, 1)))

