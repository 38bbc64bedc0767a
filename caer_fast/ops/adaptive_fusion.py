"""`adaptive_fusion`: two-way softmax over the stream scores, then the weighted concatenation."""
from __future__ import annotations

import torch

from . import _dispatch


def _check_inputs(face, context, face_score, context_score) -> None:
    n = face.shape[0]
    if face.dim() != 2 or context.dim() != 2 or context.shape[0] != n:
        raise ValueError(f"adaptive_fusion: face and context must be N×C, got {tuple(face.shape)} "
                         f"and {tuple(context.shape)}")
    for name, s in (("face_score", face_score), ("context_score", context_score)):
        if tuple(s.shape) != (n, 1):
            raise ValueError(f"adaptive_fusion: {name} must be {n}×1, got {tuple(s.shape)}")


def adaptive_fusion_reference(face, context, face_score, context_score, return_weights: bool = False):
    """Plain PyTorch reference, as the community model writes it."""
    _check_inputs(face, context, face_score, context_score)
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
        N×(Cf+Cc) ``concat(λ_face·face, λ_context·context)`` (and the weights if asked).

    Example:
        >>> out = adaptive_fusion(torch.randn(4, 256), torch.randn(4, 256), torch.randn(4, 1), torch.randn(4, 1))
        >>> out.shape
        torch.Size([4, 512])
    """
    _check_inputs(face, context, face_score, context_score)
    impl = _dispatch.implementation("adaptive_fusion", face)
    return impl(face, context, face_score, context_score, return_weights)


_dispatch.register("adaptive_fusion", "torch", adaptive_fusion_reference)
