"""CAER-Net models: :class:`CAERNet` (video) and :class:`CAERSNet` (image)."""
from .caer_net import CAERNet, CAERSNet

__all__ = ["CAERNet", "CAERSNet"]
