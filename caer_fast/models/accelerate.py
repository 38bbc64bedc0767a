"""`accelerate(model)`: put the fused ops into a live community-layout CAER-S model, in place.

The community model (``CAERSNet`` with ``two_stream_net`` / ``fusion_net``) multiplies the context
map by its softmax attention, average-pools, and fuses with separate softmax/multiply/concat ops.
``accelerate`` keeps the model's own class and weights and rebinds its ``forward`` to the same
computation through :func:`caer_fast.ops.attention_pool` and :func:`caer_fast.ops.adaptive_fusion`;
``print(model)`` says so.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import adaptive_fusion, attention_pool

_REQUIRED = ("two_stream_net.face_encoding_module", "two_stream_net.context_encoding_module",
             "two_stream_net.attention_inference_module", "fusion_net.face_bn", "fusion_net.context_bn",
             "fusion_net.face_1", "fusion_net.face_2", "fusion_net.context_1", "fusion_net.context_2",
             "fusion_net.fc1", "fusion_net.fc2", "fusion_net.dropout")
MARK = "caer_fast: fused attention_pool + adaptive_fusion"


def _fused_forward(self, face=None, context=None):
    ts, fu = self.two_stream_net, self.fusion_net
    face = ts.face_encoding_module(face).flatten(2).mean(dim=-1)
    context_map = ts.context_encoding_module(context)
    context = attention_pool(context_map, ts.attention_inference_module(context_map))
    face, context = fu.face_bn(face), fu.context_bn(context)
    if getattr(fu, "concat", False):
        features = torch.cat([face, context], dim=-1)
    else:
        face_score = fu.face_2(F.relu(fu.face_1(face)))
        context_score = fu.context_2(F.relu(fu.context_1(context)))
        features = adaptive_fusion(face, context, face_score, context_score)
    use_face, use_context = getattr(fu, "use_face", True), getattr(fu, "use_context", True)
    if not (use_face and use_context):
        f, c = features.split([face.shape[1], context.shape[1]], dim=-1)
        features = torch.cat([f if use_face else torch.zeros_like(f), c if use_context else torch.zeros_like(c)],
                             dim=-1)
    return fu.fc2(fu.dropout(F.relu(fu.fc1(features))))


def accelerate(model: nn.Module) -> nn.Module:
    """Swap caer_fast's fused ops into ``model`` (community CAER-S layout) in place and return it.

    Outputs stay equal to the original within fp32 rounding. Our own models already use the ops
    and are returned unchanged.

    Example:
        >>> model = accelerate(community_model)    # doctest: +SKIP
        >>> print(model)                             # doctest: +SKIP
        CAERSNet(
          caer_fast: fused attention_pool + adaptive_fusion
          (two_stream_net): ...
    """
    from .caer_net import _CAERBase

    if isinstance(model, _CAERBase):
        return model
    names = dict(model.named_modules())
    missing = [n for n in _REQUIRED if n not in names]
    if missing:
        raise TypeError(f"accelerate: {type(model).__name__} is not a community-layout CAER-S model "
                        f"(missing submodules: {', '.join(missing)})")
    model.forward = types.MethodType(_fused_forward, model)
    original_extra = model.extra_repr()
    model.extra_repr = lambda: MARK + (f", {original_extra}" if original_extra else "")
    model._caer_fast_accelerated = True
    return model
