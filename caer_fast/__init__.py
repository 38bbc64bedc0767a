"""caer_fast: fast CAER-Net (context-aware emotion recognition) for video and images.

>>> import caer_fast
>>> model = caer_fast.models.CAERNet()          # the video model
>>> model = caer_fast.load_checkpoint("checkpoint.pth")   # doctest: +SKIP
"""
from . import models, ops
from .constants import CLASSES, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES
from .models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__version__ = "0.1.0"


def accelerate(model):
    """Swap the fused ops into a live community-layout CAER-S model, in place; returns it."""
    from .accelerate import accelerate as _accelerate

    return _accelerate(model)


def optimize(model, mode: str = "inference"):
    """The fastest callable form of one of our models for ``mode`` ("train" or "inference")."""
    from .optimize import optimize as _optimize

    return _optimize(model, mode=mode)


__all__ = ["models", "ops", "CLASSES", "NUM_CLASSES", "IMAGENET_MEAN", "IMAGENET_STD", "load_checkpoint",
           "save_checkpoint", "CheckpointError", "accelerate", "optimize", "__version__"]
