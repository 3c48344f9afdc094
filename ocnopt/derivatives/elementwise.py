"""Derivatives of parameter-free stages: activations, pooling, reshapes, dropout.

Their VJPs and JVPs are the generic ones of ``torch.func``; what differs is only the
forward context. Dropout records its mask so that the update pass replays the nominal one
(element-wise for ``nn.Dropout``, one draw per sample and channel for ``nn.Dropout1d/2d/3d``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import StageDerivatives


class ElementwiseDerivatives(StageDerivatives):
    """Activations and other control-free maps (the generic ``torch.func`` forms suffice)."""

    def refusal(self, module: nn.Module) -> str | None:
        if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and module.return_indices:
            return ("return_indices=True, but a stage must return one tensor; use "
                    "return_indices=False")
        if isinstance(module, nn.Flatten) and module.start_dim == 0:
            return "start_dim=0 mixes the samples of the batch; use start_dim=1"
        return None


class DropoutDerivatives(StageDerivatives):
    """Dropout as a stage: the mask drawn in the nominal pass is replayed in the update pass.

    ``channelwise`` (``nn.Dropout1d/2d/3d``): one Bernoulli draw per sample and channel, the
    mask (B, C, 1, ..., 1) broadcast over the spatial dimensions, as torch's channel dropout.
    """

    #: the mask is drawn here (replayable), not by the module's own kernel
    plain_forward = False

    def __init__(self, channelwise: bool = False):
        self.channelwise = channelwise

    def forward(self, module: nn.Module, x: Tensor) -> tuple[Tensor, Any]:
        p = float(module.p)  # type: ignore[arg-type]
        if not module.training or p == 0.0:
            return x, None
        shape: tuple[int, ...] = tuple(x.shape)
        if self.channelwise:
            if x.dim() < 2:
                raise ValueError(f"{type(module).__name__} needs inputs (B, C, ...), got shape "
                                 f"{tuple(x.shape)}")
            shape = (*x.shape[:2], *([1] * (x.dim() - 2)))
        if p == 1.0:
            mask = x.new_zeros(shape)
        else:
            draw = (torch.rand(shape, dtype=x.dtype, device=x.device) if self.channelwise
                    else torch.rand_like(x))
            mask = (draw >= p).to(x.dtype) / (1.0 - p)
        return x * mask, mask

    def replay(self, module: nn.Module, x: Tensor, ctx: Any) -> Tensor:
        return x if ctx is None else x * ctx

    def functional(self, module: nn.Module, params: dict[str, Tensor], x: Tensor, ctx: Any) -> Tensor:
        return self.replay(module, x, ctx)


class EvalOnlyDerivatives(StageDerivatives):
    """Layers that draw random numbers in training mode in a way no mask replays (``nn.RReLU``,
    ``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``): supported in eval mode only, where they
    are deterministic; refused (``TypeError``) when the stage runs in training mode."""

    #: ``forward`` refuses training mode (the module's own call would not)
    plain_forward = False

    def refusal(self, module: nn.Module) -> str | None:
        if module.training:
            return ("draws random numbers in training mode that the update pass cannot replay; "
                    "call .eval() on it (deterministic there) or use nn.Dropout / nn.LeakyReLU")
        return None

    def forward(self, module: nn.Module, x: Tensor) -> tuple[Tensor, Any]:
        self.check(module, "a stage")
        return super().forward(module, x)
