"""The fused ops, autograd-aware, one name each whatever the backend.

See :func:`backend` for which implementation runs, and ``CAER_FAST_BACKEND`` to force one.
"""
from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ._dispatch import BackendUnavailableError, available_backends, backend
from .adaptive_fusion import adaptive_fusion
from .attention_pool import attention_pool
from .face_context import face_context

__all__ = ["attention_pool", "adaptive_fusion", "face_context", "backend", "available_backends",
           "BackendUnavailableError", "IMAGENET_MEAN", "IMAGENET_STD"]
