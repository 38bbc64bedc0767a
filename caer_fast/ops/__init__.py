"""The fused ops, autograd-aware, one name each whatever the backend.

``caer_fast.ops.<op>`` checks its inputs and calls ``torch.ops.caer_fast.<op>`` (or, on the ``torch``
backend, the PyTorch reference). See :func:`backend` for which kernels run, :func:`use_backend` /
:func:`set_backend` (or ``CAER_FAST_BACKEND``) to choose, :func:`preload` before ``torch.compile``.
"""
from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ._dispatch import (BACKENDS, BackendUnavailableError, available_backends, backend, preload, set_backend,
                        use_backend, why_unavailable)
from .adaptive_fusion import AdaptiveFusion, adaptive_fusion
from .attention_pool import AttentionPool, attention_pool
from .face_context import face_context

__all__ = ["attention_pool", "adaptive_fusion", "face_context", "AttentionPool", "AdaptiveFusion", "backend",
           "available_backends", "why_unavailable", "set_backend", "use_backend", "preload", "BACKENDS",
           "BackendUnavailableError", "IMAGENET_MEAN", "IMAGENET_STD"]
