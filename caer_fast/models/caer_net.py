"""CAER-Net (video, 3-D) and CAER-Net-S (image, 2-D).

Both share one layout, the community CAER-S model's (``two_stream_net`` with the face, context and
attention encoders; ``fusion_net`` with the adaptive fusion), so that its state_dicts load strictly
into :class:`CAERSNet` and the video model reads the same way.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..constants import CLIP_FRAMES, NUM_CLASSES
from ..ops import AdaptiveFusion, AttentionPool, preload
from .fold import fold_conv_bn

ENCODER_WIDTHS = (3, 32, 64, 128, 256, 256)
ATTENTION_WIDTHS = (256, 128, 1)


class Encoder(nn.Module):
    """[conv k3 p1 → BN → ReLU] per layer, max-pool after every layer but the last (if pooling).

    Eager 2-D inference (eval mode, autograd off, not compiling) runs each conv→BN pair as one
    convolution with the batch norm folded in (:func:`caer_fast.models.fold.fold_conv_bn`) on
    channels_last tensors: the convolutions are most of the time (bench/RESULTS.md). The folded
    weights are cached and recomputed when any of their source tensors changes (an optimizer step,
    ``load_state_dict``). With autograd on, the plain path runs: gradients through the folded
    channels_last convolutions were occasionally 4e-3 (relative, in norm) from float64 on this CPU
    where the plain path is 4e-7.
    """

    #: each ``convs[i]`` is followed by ``bn[i]``: :func:`caer_fast.models.fold.fold_batch_norm` may fold them
    folds_conv_bn = True

    def __init__(self, widths: Sequence[int], dims: int = 2, pool: bool = True,
                 pool_sizes: Sequence = ()):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        n = len(widths) - 1
        self._setup(nn.ModuleList(conv(widths[i], widths[i + 1], 3, padding=1) for i in range(n)),
                    nn.ModuleList(norm(widths[i + 1]) for i in range(n)), dims, pool, pool_sizes)

    def _setup(self, convs: nn.ModuleList, bns: nn.ModuleList, dims: int, pool: bool, pool_sizes: Sequence):
        self.convs, self.bn, self.dims = convs, bns, dims
        # one max-pool size per pooled layer (all but the last); default 2 in every dimension
        self.pool_sizes = (tuple(pool_sizes) or (2,) * (len(convs) - 1)) if pool else ()
        self._folded = None  # (source tensor versions, [(weight, bias)]) of the inference fast path

    @classmethod
    def wrap(cls, convs: nn.ModuleList, bns: nn.ModuleList, pool: bool) -> "Encoder":
        """An Encoder running the given (shared, not copied) 2-D conv and BN modules."""
        encoder = cls.__new__(cls)
        nn.Module.__init__(encoder)
        encoder._setup(convs, bns, 2, pool, ())
        return encoder

    def __getstate__(self):  # copies and pickles start without the cache
        return {**self.__dict__, "_folded": None}

    def _foldable(self) -> bool:
        return (self.dims == 2 and not self.training and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
                and all(type(c) is nn.Conv2d for c in self.convs)
                and all(isinstance(b, nn.BatchNorm2d) and b.running_var is not None and b.affine for b in self.bn))

    def _folded_weights(self):
        sources = [t for c, b in zip(self.convs, self.bn)
                   for t in (c.weight, c.bias, b.weight, b.bias, b.running_mean, b.running_var) if t is not None]
        key = tuple((id(t), t._version) for t in sources)
        if self._folded is None or self._folded[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # usable outside inference_mode too
                layers = [fold_conv_bn(c, b) for c, b in zip(self.convs, self.bn)]
            # fuse_conv_bn_weights returns Parameters that require grad: plain tensors here
            self._folded = (key, [(w.detach().contiguous(memory_format=torch.channels_last), b.detach())
                                  for w, b in layers])
        return self._folded[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = F.max_pool2d if self.dims == 2 else F.max_pool3d
        if self._foldable():
            x = x.contiguous(memory_format=torch.channels_last)
            for i, (conv, (weight, bias)) in enumerate(zip(self.convs, self._folded_weights())):
                x = F.relu(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups),
                           inplace=True)
                if i < len(self.pool_sizes):
                    x = pool(x, self.pool_sizes[i])
            return x
        for i, (conv, bn) in enumerate(zip(self.convs, self.bn)):
            x = F.relu(bn(conv(x)))
            if i < len(self.pool_sizes):
                x = pool(x, self.pool_sizes[i])
        return x


class TwoStreamNetwork(nn.Module):
    def __init__(self, dims: int = 2, pool_sizes: Sequence = ()):
        super().__init__()
        self.face_encoding_module = Encoder(ENCODER_WIDTHS, dims, pool_sizes=pool_sizes)
        self.context_encoding_module = Encoder(ENCODER_WIDTHS, dims, pool_sizes=pool_sizes)
        self.attention_inference_module = Encoder(ATTENTION_WIDTHS, dims, pool=False)
        self.attention_pool = AttentionPool()

    @classmethod
    def wrap(cls, face_encoding_module: nn.Module, context_encoding_module: nn.Module,
             attention_inference_module: nn.Module) -> "TwoStreamNetwork":
        """A TwoStreamNetwork running the given (shared, not copied) encoders."""
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        net.face_encoding_module = face_encoding_module
        net.context_encoding_module = context_encoding_module
        net.attention_inference_module = attention_inference_module
        net.attention_pool = AttentionPool()
        return net

    def forward(self, face: torch.Tensor, context: torch.Tensor):
        """Returns pooled face N×256, attended context N×256 and the attention map N×1×(S…)."""
        face = self.face_encoding_module(face)
        face = face.mean(dim=tuple(range(2, face.dim())))  # not flatten(2).mean(-1): tools/openvino_repro.py
        context = self.context_encoding_module(context)
        logits = self.attention_inference_module(context)
        context, attention = self.attention_pool(context, logits)
        return face, context, attention


_FUSION_MODULES = ("face_bn", "context_bn", "face_1", "face_2", "context_1", "context_2", "fc1", "fc2", "dropout")


class FusionNetwork(nn.Module):
    def __init__(self, use_face: bool = True, use_context: bool = True, concat: bool = False,
                 num_class: int = NUM_CLASSES):
        super().__init__()
        self.face_bn = nn.BatchNorm1d(256)
        self.context_bn = nn.BatchNorm1d(256)
        self.use_face, self.use_context, self.concat = use_face, use_context, concat
        self.face_1 = nn.Linear(256, 128)
        self.face_2 = nn.Linear(128, 1)
        self.context_1 = nn.Linear(256, 128)
        self.context_2 = nn.Linear(128, 1)
        self.fc1 = nn.Linear(512, 128)
        self.fc2 = nn.Linear(128, num_class)
        self.dropout = nn.Dropout()
        self.adaptive_fusion = AdaptiveFusion()

    @classmethod
    def wrap(cls, other: nn.Module) -> "FusionNetwork":
        """A FusionNetwork running ``other``'s (shared, not copied) modules and stream settings."""
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        for name in _FUSION_MODULES:
            setattr(net, name, getattr(other, name))
        net.use_face, net.use_context = getattr(other, "use_face", True), getattr(other, "use_context", True)
        net.concat = getattr(other, "concat", False)
        net.adaptive_fusion = AdaptiveFusion()
        return net

    def forward(self, face: torch.Tensor, context: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns logits and the N×2 fusion weights (λ_face, λ_context)."""
        face, context = self.face_bn(face), self.context_bn(context)
        if self.concat:
            features = torch.cat([face, context], dim=-1)
            weights = torch.full((face.shape[0], 2), 0.5, dtype=face.dtype, device=face.device)
        else:
            face_score = self.face_2(F.relu(self.face_1(face)))
            context_score = self.context_2(F.relu(self.context_1(context)))
            features, weights = self.adaptive_fusion(face, context, face_score, context_score)
        if not (self.use_face and self.use_context):  # ablations: drop a stream after weighting
            f, c = features.split([face.shape[1], context.shape[1]], dim=-1)
            features = torch.cat([f if self.use_face else torch.zeros_like(f),
                                  c if self.use_context else torch.zeros_like(c)], dim=-1)
        features = self.dropout(F.relu(self.fc1(features)))
        return self.fc2(features), weights


class _CAERBase(nn.Module):
    def __init__(self):
        super().__init__()
        preload()  # this machine's backend (CUDA if present): not lazily inside a compiled forward

    def forward(self, face: torch.Tensor, context: torch.Tensor, return_details: bool = False):
        face_vec, context_vec, attention = self.two_stream_net(face, context)
        logits, weights = self.fusion_net(face_vec, context_vec)
        if return_details:
            return logits, {"attention": attention, "fusion_weights": weights}
        return logits


# a graph (ONNX, torch.export) returns tensors, not a dict: the details as plain outputs, in this order
OUTPUT_NAMES = ("logits", "attention", "fusion_weights")


def outputs_with_details(model: nn.Module, face: torch.Tensor, context: torch.Tensor):
    """``(logits, attention, fusion_weights)`` of a model called with ``return_details=True``."""
    logits, details = model(face, context, return_details=True)
    return logits, details["attention"], details["fusion_weights"]


class WithDetails(nn.Module):
    """``model`` returning :data:`OUTPUT_NAMES` as a tuple: what ONNX export and int8 quantization trace."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, face: torch.Tensor, context: torch.Tensor):
        return outputs_with_details(self.model, face, context)


class CAERSNet(_CAERBase):
    """CAER-Net-S, the image model: face N×3×96×96 and context N×3×112×112 → N×7 logits.

    Module names, constructor arguments and state_dict are the community model's, so its
    checkpoints load strictly (see :func:`caer_fast.load_checkpoint`).

    Example:
        >>> model = CAERSNet().eval()
        >>> logits, details = model(torch.randn(2, 3, 96, 96), torch.randn(2, 3, 112, 112), return_details=True)
        >>> logits.shape, details["attention"].shape, details["fusion_weights"].shape
        (torch.Size([2, 7]), torch.Size([2, 1, 7, 7]), torch.Size([2, 2]))
    """

    def __init__(self, use_face: bool = True, use_context: bool = True, concat: bool = False, *,
                 num_classes: int = NUM_CLASSES):
        if not all(isinstance(v, (bool, int)) and v in (0, 1) for v in (use_face, use_context, concat)):
            raise TypeError("CAERSNet(use_face, use_context, concat, *, num_classes) takes three booleans first, got "
                            f"{use_face!r}, {use_context!r}, {concat!r} (CAERNet takes num_classes, frames)")
        super().__init__()
        self.two_stream_net = TwoStreamNetwork(dims=2)
        self.fusion_net = FusionNetwork(use_face, use_context, concat, num_classes)


class CAERNet(_CAERBase):
    """CAER-Net, the video model: face clips N×3×T×96×96, context clips N×3×T×112×112 → N×7 logits.

    3-D convolutions; the first max-pool is spatial only (1×2×2, the C3D choice), the next three
    halve time too, so 16-frame clips give 2×6×6 face and 2×7×7 context maps; the attention
    softmax runs over space-time.

    Example:
        >>> model = CAERNet().eval()
        >>> model(torch.randn(1, 3, 16, 96, 96), torch.randn(1, 3, 16, 112, 112)).shape
        torch.Size([1, 7])
    """

    def __init__(self, num_classes: int = NUM_CLASSES, frames: int = CLIP_FRAMES, *, use_face: bool = True,
                 use_context: bool = True, concat: bool = False):
        if isinstance(num_classes, bool) or isinstance(frames, bool):  # CAERSNet's (use_face, use_context, …)
            raise TypeError("CAERNet(num_classes, frames, *, use_face, use_context, concat): got a bool for "
                            "num_classes or frames (CAERSNet takes use_face, use_context, concat first)")
        super().__init__()
        self.frames = frames
        self.two_stream_net = TwoStreamNetwork(dims=3, pool_sizes=((1, 2, 2), 2, 2, 2))
        self.fusion_net = FusionNetwork(use_face, use_context, concat, num_classes)

    def forward(self, face: torch.Tensor, context: torch.Tensor, return_details: bool = False):
        if face.dim() != 5 or context.dim() != 5:
            raise ValueError(f"CAERNet takes clips N×3×T×H×W, got face {tuple(face.shape)} and "
                             f"context {tuple(context.shape)}")
        if face.shape[2] < 8:
            raise ValueError(f"CAERNet needs clips of at least 8 frames (three temporal pools), got {face.shape[2]}")
        return super().forward(face, context, return_details)
