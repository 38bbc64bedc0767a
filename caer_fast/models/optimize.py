"""`optimize(model, mode)`: the fastest callable form of one of our models on this device."""
from __future__ import annotations

import torch
import torch.nn as nn

MODES = ("train", "inference")


def optimize(model: nn.Module, mode: str = "inference"):
    """Return ``model`` prepared for ``mode``: same call signature and outputs.

    ``inference``: eval mode, then ``torch.compile``. ``train``: ``torch.compile`` (the fused ops are
    registered with ``torch.library`` so the graph has no break). The compile happens on the first
    call and is cached for the life of the returned object.
    """
    if mode not in MODES:
        raise ValueError(f"optimize: mode must be one of {MODES}, got {mode!r}")
    if mode == "inference":
        model.eval()
    return torch.compile(model)
