"""Batch-norm folding: one eval-mode BN after a convolution becomes part of that convolution.

Below both :mod:`caer_fast.models.caer_net` (the Encoder's eager inference path folds on the fly) and
:mod:`caer_fast.models.optimize` / :mod:`caer_fast.models.quantize` (which fold a private copy), so it
imports neither.
"""
from __future__ import annotations

import copy

import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


def fold_conv_bn(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm):
    """(weight, bias) of the one convolution computing ``bn(conv(x))`` with the BN's running
    statistics: w' = w·γ/σ, b' = (b−μ)·γ/σ + β (torch's ``fuse_conv_bn_weights``). The one fold of
    caer_fast: :func:`fold_batch_norm` and the Encoder's eager inference path use it."""
    return fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)


def _conv_bn_stacks(model: nn.Module):
    """Our Encoders: modules that declare ``folds_conv_bn`` (``convs[i]`` is followed by ``bn[i]``)."""
    for m in model.modules():
        if getattr(type(m), "folds_conv_bn", False):
            yield m


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BN that follows a conv in an Encoder (a module declaring ``folds_conv_bn``:
    parallel ``convs`` / ``bn`` lists) into that conv, in place.

    The folded conv computes conv→BN in one op (:func:`fold_conv_bn`); the BN becomes
    ``nn.Identity``. Call it on a copy: it replaces the model's modules.
    """
    for enc in _conv_bn_stacks(model):
        for i, (conv, bn) in enumerate(zip(enc.convs, enc.bn)):
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and isinstance(conv, nn.modules.conv._ConvNd):
                fused = copy.deepcopy(conv.eval())
                weight, bias = fold_conv_bn(conv, bn.eval())
                fused.weight = nn.Parameter(weight.detach(), conv.weight.requires_grad)
                fused.bias = nn.Parameter(bias.detach(), conv.weight.requires_grad)
                enc.convs[i] = fused
                enc.bn[i] = nn.Identity()
    return model
