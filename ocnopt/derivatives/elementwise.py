"""Derivatives of parameter-free stages: activations, pooling, reshapes, dropout.

Their VJPs and JVPs are the generic ones of ``torch.func``; what differs is only the
forward context. Dropout records its mask so that the update pass replays the nominal one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import StageDerivatives


class ElementwiseDerivatives(StageDerivatives):
    """Activations and other control-free maps (the generic ``torch.func`` forms suffice)."""


class DropoutDerivatives(StageDerivatives):
    """Dropout as a stage: the mask drawn in the nominal pass is replayed in the update pass."""

    def forward(self, module: nn.Module, x: Tensor) -> tuple[Tensor, Any]:
        p = float(module.p)  # type: ignore[arg-type]
        if not module.training or p == 0.0:
            return x, None
        if p == 1.0:
            mask = torch.zeros_like(x)
        else:
            mask = (torch.rand_like(x) >= p).to(x.dtype) / (1.0 - p)
        return x * mask, mask

    def replay(self, module: nn.Module, x: Tensor, ctx: Any) -> Tensor:
        return x if ctx is None else x * ctx

    def functional(self, module: nn.Module, params: dict[str, Tensor], x: Tensor, ctx: Any) -> Tensor:
        return self.replay(module, x, ctx)
