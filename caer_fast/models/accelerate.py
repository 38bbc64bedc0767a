"""`accelerate(model)`: caer_fast's modules swapped into a live community-layout CAER-S model, in place.

As Liger-Kernel patches a live model: the model keeps its class, its parameters (the same tensor
objects, so an optimizer over them keeps working) and its state_dict; its ``two_stream_net`` and
``fusion_net`` become caer_fast's :class:`~caer_fast.models.caer_net.TwoStreamNetwork` and
:class:`~caer_fast.models.caer_net.FusionNetwork` running the model's own encoders, batch norms and
linears, with the fused :class:`~caer_fast.ops.AttentionPool` and :class:`~caer_fast.ops.AdaptiveFusion`
inside, and its ``forward`` becomes the one of caer_fast's models. ``print(model)`` shows all of it.
The encoders become caer_fast's :class:`~caer_fast.models.caer_net.Encoder` over the same conv and BN
modules, whose eager inference runs folded conv+BN on channels_last tensors.
"""
from __future__ import annotations

import types

import torch.nn as nn

from .caer_net import Encoder, FusionNetwork, TwoStreamNetwork, _CAERBase, _FUSION_MODULES

_ENCODERS = ("face_encoding_module", "context_encoding_module", "attention_inference_module")
_REQUIRED = tuple(f"two_stream_net.{n}" for n in _ENCODERS) + tuple(f"fusion_net.{n}" for n in _FUSION_MODULES)


def _encoder(module: nn.Module, pool: bool) -> nn.Module:
    """caer_fast's Encoder over a community encoder's own ``convs`` / ``bn`` (2-D layers only)."""
    if isinstance(module, Encoder):
        return module
    convs, bns = getattr(module, "convs", None), getattr(module, "bn", None)
    if not (isinstance(convs, nn.ModuleList) and isinstance(bns, nn.ModuleList) and len(convs) == len(bns) > 0
            and all(type(c) is nn.Conv2d for c in convs) and all(isinstance(b, nn.BatchNorm2d) for b in bns)):
        return module  # not the community's [conv → BN → ReLU] layout: keep it as it is
    encoder = Encoder.wrap(convs, bns, pool=getattr(module, "pool", pool))
    encoder.training = module.training
    return encoder


def accelerate(model: nn.Module) -> nn.Module:
    """Swap caer_fast's modules into ``model`` (community CAER-S layout) in place and return it.

    Outputs stay equal to the original within fp32 rounding; parameters and state_dict are the
    model's own. Our own models already run these modules and are returned unchanged.

    Example:
        >>> model = accelerate(community_model)    # doctest: +SKIP
        >>> print(model)                             # doctest: +SKIP
        CAERSNet(
          (two_stream_net): TwoStreamNetwork(
            ...
            (attention_pool): AttentionPool()
          )
          (fusion_net): FusionNetwork(
            ...
            (adaptive_fusion): AdaptiveFusion()
          )
        )
    """
    if isinstance(model, _CAERBase):
        return model
    names = dict(model.named_modules())
    missing = [n for n in _REQUIRED if n not in names]
    if missing:
        raise TypeError(f"accelerate: {type(model).__name__} is not a community-layout CAER-S model "
                        f"(missing submodules: {', '.join(missing)})")
    ts = model.two_stream_net
    if not isinstance(ts, TwoStreamNetwork):
        model.two_stream_net = TwoStreamNetwork.wrap(_encoder(ts.face_encoding_module, True),
                                                     _encoder(ts.context_encoding_module, True),
                                                     _encoder(ts.attention_inference_module, False))
        model.two_stream_net.training = ts.training
    if not isinstance(model.fusion_net, FusionNetwork):
        fusion = model.fusion_net
        model.fusion_net = FusionNetwork.wrap(fusion)
        model.fusion_net.training = fusion.training
    model.forward = types.MethodType(_CAERBase.forward, model)
    return model
