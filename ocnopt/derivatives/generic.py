"""The generic handler: any other leaf module whose derivatives ``torch.func`` can take.

A leaf module (no child modules, or one that owns parameters itself) maps one tensor to one
tensor; its VJPs come from autograd on the nominal graph, its per-sample terms from
``torch.func`` on ``functional_call``: Hardswish, Hardsigmoid, Mish, PReLU, LayerNorm,
GroupNorm, a custom module with parameters, ... Its parameters have no Kronecker structure:
the Kronecker curvature models (kfac, ekfac) use their diagonal fallback for them.

What it cannot see and the caller must guarantee: the module is deterministic (randomness
would not be replayed by the update pass) and does not change its own buffers in forward
(the update pass would change them again). The known offenders are refused by
``ocnopt.derivatives.handler_for``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import StageDerivatives


class GenericDerivatives(StageDerivatives):
    """Generic ``torch.func`` derivatives of a one-tensor-in, one-tensor-out module."""

    def forward(self, module: nn.Module, x: Tensor) -> tuple[Tensor, Any]:
        out, ctx = super().forward(module, x)
        if not isinstance(out, Tensor):
            raise TypeError(f"{type(module).__name__} returned {type(out).__name__}, but a stage "
                            "must return one tensor")
        return out, ctx


class PReLUDerivatives(GenericDerivatives):
    """``nn.PReLU``: y = max(0, x) + w min(0, x), w per channel (dim 1, or dim 0 for a 1-d
    input) or one shared scalar. ``functional`` is written out because ``torch.func``'s
    ``jacrev`` of ``F.prelu`` under ``vmap`` mixes the batch with the channels (torch 2.x)."""

    def functional(self, module: nn.Module, params: dict[str, Tensor], x: Tensor, ctx: Any) -> Tensor:
        w = params.get("weight", module.weight)
        assert isinstance(w, Tensor)
        if w.numel() > 1 and x.dim() >= 2:
            w = w.reshape(-1, *([1] * (x.dim() - 2)))
        return torch.where(x >= 0, x, w * x)
