"""``eager`` (the model itself) and ``compiled`` (:func:`caer_fast.optimize`, ``torch.compile``)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ...models.caer_net import outputs_with_details
from ...models.optimize import optimize
from .base import BuildContext, Engine, register_engine


class TorchEngine(Engine):
    """``eager`` (the model) or ``compiled`` (:func:`caer_fast.optimize`), under ``inference_mode``."""

    def __init__(self, model: nn.Module, compiled: bool = False):
        super().__init__("compiled" if compiled else "eager")
        self.model = optimize(model, "inference") if compiled else model.eval()

    @property
    def sliced(self) -> bool:
        """On the CPU a big batch runs in slices like every engine (a call's peak grows with its batch); on a
        GPU the caller's batch as it comes (slices would leave it idle)."""
        weight = next(self.model.parameters(), None)
        return weight is None or weight.device.type == "cpu"

    def run(self, face, context):
        with torch.inference_mode():
            return outputs_with_details(self.model, face, context)


@register_engine("eager", cpu_only=False, description="the model under torch.inference_mode")
def build_eager(ctx: BuildContext) -> Engine:
    return TorchEngine(ctx.model)


@register_engine("compiled", cpu_only=False,
                 description="caer_fast.optimize (torch.compile; compiles again in every new process)")
def build_compiled(ctx: BuildContext) -> Engine:
    return TorchEngine(ctx.model, compiled=True)
