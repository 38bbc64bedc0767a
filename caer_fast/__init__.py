"""caer_fast: fast CAER-Net (context-aware emotion recognition) for video and images.

>>> import caer_fast
>>> model = caer_fast.models.CAERNet()          # the video model
>>> model = caer_fast.load_checkpoint("checkpoint.pth")   # doctest: +SKIP
"""
from . import models, ops
from .constants import CLASSES, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES
from .models.accelerate import accelerate
from .models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .models.optimize import optimize
from .models.quantize import quantize_int8

__version__ = "0.1.0"


__all__ = ["models", "ops", "CLASSES", "NUM_CLASSES", "IMAGENET_MEAN", "IMAGENET_STD", "load_checkpoint",
           "save_checkpoint", "CheckpointError", "accelerate", "optimize", "quantize_int8",
           "__version__"]
