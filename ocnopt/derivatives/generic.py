"""The generic handler: any other leaf module whose derivatives ``torch.func`` can take.

A leaf module (no child modules, or one that owns parameters itself) maps one tensor to one
tensor; its VJPs come from autograd on the nominal graph, its per-sample terms from
``torch.func`` on ``functional_call``: Hardswish, Hardsigmoid, Mish, PReLU, LayerNorm,
GroupNorm, a custom module with parameters, ... Its parameters have no Kronecker structure:
the Kronecker curvature models (kfac, ekfac) use their diagonal fallback for them.

Randomness: a module defined outside torch.nn (a user's block, torchvision's blocks with
stochastic depth, ...) may draw random numbers in training mode; its nominal pass records the
generator state and the update pass replays from it, so it draws the same numbers (the global
stream advances once per step). What it cannot see and the caller must guarantee: the module
does not change its own buffers in forward (the update pass would change them again). The
known offenders among torch.nn's layers are refused by ``ocnopt.derivatives.handler_for``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import StageDerivatives


class RandomState:
    """The generator state before a module's nominal pass (CPU, and the input's CUDA device)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _may_draw(module: nn.Module) -> bool:
    """A module defined outside torch.nn, in training mode: it may draw random numbers."""
    return module.training and not type(module).__module__.startswith("torch.nn")


class GenericDerivatives(StageDerivatives):
    """Generic ``torch.func`` derivatives of a one-tensor-in, one-tensor-out module."""

    def forward(self, module: nn.Module, x: Tensor) -> tuple[Tensor, Any]:
        state = RandomState(x.device) if _may_draw(module) else None
        out, ctx = super().forward(module, x)
        if not isinstance(out, Tensor):
            raise TypeError(f"{type(module).__name__} returned {type(out).__name__}, but a stage "
                            "must return one tensor")
        return out, state if ctx is None else ctx

    def replay(self, module: nn.Module, x: Tensor, ctx: Any) -> Tensor:
        if not isinstance(ctx, RandomState):
            return super().replay(module, x, ctx)
        with torch.random.fork_rng(devices=[ctx.device] if ctx.cuda is not None else []):
            torch.set_rng_state(ctx.cpu)
            if ctx.cuda is not None:
                torch.cuda.set_rng_state(ctx.cuda, ctx.device)
            return super().replay(module, x, None)

    def functional(self, module: nn.Module, params: dict[str, Tensor], x: Tensor, ctx: Any) -> Tensor:
        return super().functional(module, params, x, None if isinstance(ctx, RandomState) else ctx)

    def param_jvp(self, module: nn.Module, params: dict[str, Tensor], x: Tensor, ctx: Any,
                  tangent: dict[str, Tensor]) -> Tensor:
        """f_u k by ``torch.func.jvp``, drawing the nominal pass's random numbers."""
        if not isinstance(ctx, RandomState):
            return super().param_jvp(module, params, x, ctx, tangent)
        with torch.random.fork_rng(devices=[ctx.device] if ctx.cuda is not None else []):
            torch.set_rng_state(ctx.cpu)
            if ctx.cuda is not None:
                torch.cuda.set_rng_state(ctx.cuda, ctx.device)
            return super().param_jvp(module, params, x, None, tangent)


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
