"""The ``cpp`` backend: the ``caer_fast._C`` CPU kernels, registered as ``torch.library`` custom ops.

Each op is a ``caer_fast::<op>_cpp`` custom op with a fake (meta) implementation and, where it has
gradients, an autograd formula that calls a ``<op>_cpp_backward`` custom op — so eager autograd
works and ``torch.compile(model, fullgraph=True)`` traces through the ops (forward and backward)
without a graph break. ``_dispatch`` imports this module lazily the first time an op needs it.

Eager calls skip the custom-op machinery: its Python dispatch costs ~80 us per forward+backward
(as much as the attention_pool kernels themselves at N=32, C=256, 7×7), so outside torch.compile the
same kernels run through a plain ``autograd.Function`` (or directly when no gradient is needed).
Both paths call the same ``_C`` functions and are tested.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _dispatch
from .face_context import empty_outputs

try:
    from .. import _C
    _IMPORT_ERROR = None
except ImportError as exc:  # not built (CAER_FAST_BUILD_EXT=0, or installed without the extension)
    _C = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def is_available() -> Tuple[bool, str]:
    if _C is None:
        return False, f"caer_fast._C is not built ({_IMPORT_ERROR})"
    return True, ""


# ---------------------------------------------------------------------------------------------
# attention_pool
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("caer_fast::attention_pool_cpp", mutates_args=(), device_types="cpu")
def attention_pool_op(features: Tensor, logits: Tensor) -> Tuple[Tensor, Tensor]:
    """(pooled N×C, attention shaped like logits); features and logits share one dtype."""
    return _C.attention_pool_forward(features, logits)


@attention_pool_op.register_fake
def _(features, logits):
    return features.new_empty(features.shape[:2]), features.new_empty(logits.shape)


@torch.library.custom_op("caer_fast::attention_pool_cpp_backward", mutates_args=(), device_types="cpu")
def attention_pool_backward_op(grad_out: Tensor, grad_attention: Optional[Tensor], features: Tensor,
                               attention: Tensor, out: Tensor) -> Tuple[Tensor, Tensor]:
    return _C.attention_pool_backward(grad_out, grad_attention, features, attention, out)


@attention_pool_backward_op.register_fake
def _(grad_out, grad_attention, features, attention, out):
    return features.new_empty(features.shape), features.new_empty(attention.shape)


def _attention_pool_setup(ctx, inputs, output):
    features, _ = inputs
    out, attention = output
    ctx.save_for_backward(features, attention, out)


def _attention_pool_backward(ctx, grad_out, grad_attention):
    features, attention, out = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_features, grad_logits = attention_pool_backward_op(grad_out.contiguous(), grad_attention, features,
                                                           attention, out)
    return grad_features, grad_logits


attention_pool_op.register_autograd(_attention_pool_backward, setup_context=_attention_pool_setup)


class _AttentionPoolFunction(torch.autograd.Function):
    """Eager-mode twin of ``attention_pool_op`` (same kernels, same formulas, less overhead)."""

    @staticmethod
    def forward(ctx, features, logits):
        out, attention = _C.attention_pool_forward(features, logits)
        ctx.save_for_backward(features, attention, out)
        return out, attention

    @staticmethod
    def backward(ctx, grad_out, grad_attention):
        features, attention, out = ctx.saved_tensors
        return _C.attention_pool_backward(grad_out.contiguous(), grad_attention, features, attention, out)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def attention_pool_cpp(features: Tensor, logits: Tensor, return_attention: bool = False):
    if logits.dtype != features.dtype:  # the kernel takes one dtype; the cast stays differentiable
        logits = logits.to(features.dtype)
    if torch.compiler.is_compiling():
        out, attention = attention_pool_op(features, logits)
    elif _needs_grad(features, logits):
        out, attention = _AttentionPoolFunction.apply(features, logits)
    else:
        out, attention = _C.attention_pool_forward(features, logits)
    return (out, attention) if return_attention else out


# ---------------------------------------------------------------------------------------------
# adaptive_fusion
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("caer_fast::adaptive_fusion_cpp", mutates_args=(), device_types="cpu")
def adaptive_fusion_op(face: Tensor, context: Tensor, face_score: Tensor,
                       context_score: Tensor) -> Tuple[Tensor, Tensor]:
    """(fused N×(Cf+Cc), weights N×2); all inputs share one dtype."""
    return _C.adaptive_fusion_forward(face, context, face_score, context_score)


@adaptive_fusion_op.register_fake
def _(face, context, face_score, context_score):
    n = face.shape[0]
    return face.new_empty((n, face.shape[1] + context.shape[1])), face.new_empty((n, 2))


@torch.library.custom_op("caer_fast::adaptive_fusion_cpp_backward", mutates_args=(), device_types="cpu")
def adaptive_fusion_backward_op(grad_out: Tensor, grad_weights: Optional[Tensor], face: Tensor, context: Tensor,
                                weights: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _C.adaptive_fusion_backward(grad_out, grad_weights, face, context, weights)


@adaptive_fusion_backward_op.register_fake
def _(grad_out, grad_weights, face, context, weights):
    n = face.shape[0]
    return (face.new_empty(face.shape), face.new_empty(context.shape), face.new_empty((n, 1)),
            face.new_empty((n, 1)))


def _adaptive_fusion_setup(ctx, inputs, output):
    face, context, _, _ = inputs
    _, weights = output
    ctx.save_for_backward(face, context, weights)


def _adaptive_fusion_backward(ctx, grad_out, grad_weights):
    face, context, weights = ctx.saved_tensors
    if grad_out is None:
        grad_out = face.new_zeros((face.shape[0], face.shape[1] + context.shape[1]))
    return adaptive_fusion_backward_op(grad_out.contiguous(), grad_weights, face, context, weights)


adaptive_fusion_op.register_autograd(_adaptive_fusion_backward, setup_context=_adaptive_fusion_setup)


class _AdaptiveFusionFunction(torch.autograd.Function):
    """Eager-mode twin of ``adaptive_fusion_op``."""

    @staticmethod
    def forward(ctx, face, context, face_score, context_score):
        out, weights = _C.adaptive_fusion_forward(face, context, face_score, context_score)
        ctx.save_for_backward(face, context, weights)
        return out, weights

    @staticmethod
    def backward(ctx, grad_out, grad_weights):
        face, context, weights = ctx.saved_tensors
        return _C.adaptive_fusion_backward(grad_out.contiguous(), grad_weights, face, context, weights)


def adaptive_fusion_cpp(face: Tensor, context: Tensor, face_score: Tensor, context_score: Tensor,
                        return_weights: bool = False):
    dtype = face.dtype
    context, face_score, context_score = (t if t.dtype == dtype else t.to(dtype)
                                          for t in (context, face_score, context_score))
    args = (face, context, face_score, context_score)
    if torch.compiler.is_compiling():
        out, weights = adaptive_fusion_op(*args)
    elif _needs_grad(*args):
        out, weights = _AdaptiveFusionFunction.apply(*args)
    else:
        out, weights = _C.adaptive_fusion_forward(*args)
    return (out, weights) if return_weights else out


# ---------------------------------------------------------------------------------------------
# face_context (uint8 input: no autograd). The C++ kernel is csrc/cpu/face_context.cpp.
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("caer_fast::face_context_cpp", mutates_args=(), device_types="cpu")
def face_context_op(frames: Tensor, boxes: Tensor, face_h: int, face_w: int, ctx_h: int, ctx_w: int,
                    crop_top: int, crop_left: int, crop_h: int, crop_w: int, mean: List[float], std: List[float],
                    antialias: bool) -> Tuple[Tensor, Tensor]:
    """float32 (face N×3×face_h×face_w, context N×3×h×w); crop_h = -1 means no crop."""
    return _C.face_context_forward(frames, boxes, face_h, face_w, ctx_h, ctx_w, crop_top, crop_left, crop_h,
                                   crop_w, list(mean), list(std), antialias)


@face_context_op.register_fake
def _(frames, boxes, face_h, face_w, ctx_h, ctx_w, crop_top, crop_left, crop_h, crop_w, mean, std, antialias):
    return empty_outputs(frames, face_h, face_w, ctx_h, ctx_w, crop_h, crop_w)


def face_context_cpp(frames: Tensor, boxes: Tensor, face_size: Sequence[int], context_size: Sequence[int],
                     crop: Optional[Sequence[int]], mean: Sequence[float], std: Sequence[float], antialias: bool,
                     dtype: torch.dtype):
    top, left, ch, cw = (0, 0, -1, -1) if crop is None else (int(v) for v in crop)
    face, context = face_context_op(frames.contiguous(), boxes.to(torch.int64).contiguous(), int(face_size[0]),
                                    int(face_size[1]), int(context_size[0]), int(context_size[1]), top, left, ch,
                                    cw, [float(m) for m in mean], [float(s) for s in std], bool(antialias))
    return face.to(dtype), context.to(dtype)


def _face_context_built() -> bool:
    """False while csrc/cpu/face_context.cpp is still the "not implemented" placeholder."""
    try:
        _C.face_context_forward(torch.zeros(1, 2, 2, 3, dtype=torch.uint8), torch.zeros(1, 4, dtype=torch.int64),
                                1, 1, 1, 1, 0, 0, -1, -1, [0.0] * 3, [1.0] * 3, False)
    except RuntimeError as exc:
        if "not implemented" in str(exc):
            return False
    return True


if _C is not None:
    _dispatch.register("attention_pool", "cpp", attention_pool_cpp)
    _dispatch.register("adaptive_fusion", "cpp", adaptive_fusion_cpp)
    # until the kernel exists, face_context keeps the torch implementation under the cpp backend
    if _face_context_built():
        _dispatch.register("face_context", "cpp", face_context_cpp)
