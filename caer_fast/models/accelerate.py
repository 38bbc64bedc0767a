"""`accelerate(model)`: put the fused ops into a live community-layout CAER-S model, in place.

The community model (``CAERSNet`` with ``two_stream_net`` / ``fusion_net``) multiplies the context
map by its softmax attention, average-pools, and fuses with separate softmax/multiply/concat ops.
``accelerate`` keeps the model's own class and weights and rebinds its ``forward`` to the same
computation through :func:`caer_fast.ops.attention_pool` and :func:`caer_fast.ops.adaptive_fusion`;
``print(model)`` says so.

In eval mode without autograd (``no_grad`` / ``inference_mode``: inference) the encoders also run
each conv→BN pair as one convolution with the batch norm folded in (w·γ/σ, (b−μ)·γ/σ + β) on
channels_last tensors: the convolutions are most of the time, and this is what makes the live model
faster (bench/RESULTS.md). The folded weights are cached and recomputed when any of their source
tensors changes (an optimizer step, ``load_state_dict``). With autograd on, the model's own encoders
run: gradients through the folded channels_last convolutions were occasionally 4e-3 (relative, in
norm) from float64 on this CPU where the plain path is 4e-7, from run to run.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..ops import adaptive_fusion, attention_pool

_REQUIRED = ("two_stream_net.face_encoding_module", "two_stream_net.context_encoding_module",
             "two_stream_net.attention_inference_module", "fusion_net.face_bn", "fusion_net.context_bn",
             "fusion_net.face_1", "fusion_net.face_2", "fusion_net.context_1", "fusion_net.context_2",
             "fusion_net.fc1", "fusion_net.fc2", "fusion_net.dropout")
MARK = "caer_fast: fused attention_pool + adaptive_fusion"


def _foldable(encoder: nn.Module) -> bool:
    convs, bns = getattr(encoder, "convs", None), getattr(encoder, "bn", None)
    return (isinstance(convs, nn.ModuleList) and isinstance(bns, nn.ModuleList) and len(convs) == len(bns) > 0
            and all(type(c) is nn.Conv2d for c in convs)
            and all(isinstance(b, nn.BatchNorm2d) and b.running_var is not None and b.affine for b in bns))


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    # torch's conv+BN folding, the one optimize() uses through fuse_conv_bn_eval
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                        bn.weight, bn.bias)
    return weight.detach().contiguous(memory_format=torch.channels_last), bias.detach()


def _folded_weights(model: nn.Module, encoder: nn.Module):
    """[(weight, bias)] per layer (autograd off), cached until a source tensor changes."""
    sources = [t for c, b in zip(encoder.convs, encoder.bn)
               for t in (c.weight, c.bias, b.weight, b.bias, b.running_mean, b.running_var) if t is not None]
    key = tuple((id(t), t._version) for t in sources)
    cache = model.__dict__.setdefault("_caer_fast_folded", {})
    hit = cache.get(id(encoder))
    if hit is None or hit[0] != key:
        with torch.inference_mode(False), torch.no_grad():  # cached tensors must be usable outside inference_mode
            hit = (key, [_fold(c, b) for c, b in zip(encoder.convs, encoder.bn)])
        cache[id(encoder)] = hit
    return hit[1]


def _encode(model: nn.Module, encoder: nn.Module, x: torch.Tensor, pool: bool) -> torch.Tensor:
    """The community encoder ([conv → BN → ReLU], max-pool 2 after all but the last layer if ``pool``):
    in eval mode without autograd, folded BN on channels_last tensors; otherwise the encoder's own forward."""
    if encoder.training or torch.is_grad_enabled() or not _foldable(encoder):
        return encoder(x)
    x = x.contiguous(memory_format=torch.channels_last)
    layers = _folded_weights(model, encoder)
    for i, (conv, (weight, bias)) in enumerate(zip(encoder.convs, layers)):
        x = F.relu(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups), inplace=True)
        if pool and i < len(layers) - 1:
            x = F.max_pool2d(x, 2)
    return x


def _fused_forward(self, face=None, context=None):
    ts, fu = self.two_stream_net, self.fusion_net
    face = _encode(self, ts.face_encoding_module, face, pool=True).flatten(2).mean(dim=-1)
    context_map = _encode(self, ts.context_encoding_module, context, pool=True)
    context = attention_pool(context_map, _encode(self, ts.attention_inference_module, context_map, pool=False))
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
