"""The network as a chain of stages ``x_{t+1} = f_t(x_t, u_t)`` (SPEC section 1).

Stage t maps the state x_t (the activation entering it, per sample) and the control u_t (its
trainable parameters, shared by the batch) to x_{t+1}. Parameter-free layers are kept as
control-free stages (u empty); the value recursion passes through them unchanged in form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .derivatives import DERIVATIVES, StageDerivatives, supported_modules
from .derivatives.base import param_dict


@dataclass
class Stage:
    """One time step of the chain: a module, its derivatives and its control."""

    index: int
    name: str
    module: nn.Module
    derivatives: StageDerivatives
    param_names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def has_control(self) -> bool:
        return bool(self.params)

    @property
    def kronecker(self) -> bool:
        """Whether curvature models with Kronecker factors (kfac, ekfac) apply to this stage."""
        return self.derivatives.kronecker and self.has_control

    def forward(self, x: Tensor) -> tuple[Tensor, Any]:
        return self.derivatives.forward(self.module, x)

    def replay(self, x: Tensor, ctx: Any) -> Tensor:
        return self.derivatives.replay(self.module, x, ctx)

    def functional(self, params: dict[str, Tensor], x: Tensor, ctx: Any = None) -> Tensor:
        """f_t(x, u) as a pure function of ``params`` (a dict keyed by ``param_names``)."""
        return self.derivatives.functional(self.module, params, x, ctx)

    @property
    def control_size(self) -> int:
        """m, the number of entries of the control u_t."""
        return sum(p.numel() for p in self.params)

    def flatten(self, tensors: list[Tensor], lead: int = 0) -> Tensor:
        """Concatenate per-parameter tensors (with ``lead`` leading dims) into (..., m)."""
        return torch.cat([t.reshape(*t.shape[:lead], -1) for t in tensors], dim=-1)

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Split (..., m) into per-parameter tensors of shape (..., *param.shape)."""
        lead = flat.shape[:-1]
        chunks = flat.split([p.numel() for p in self.params], dim=-1)
        return [c.reshape(*lead, *p.shape) for c, p in zip(chunks, self.params)]

    def __repr__(self) -> str:
        return f"Stage({self.index}, {self.name!r}, {type(self.module).__name__})"


def _flatten(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for name, child in module._modules.items():  # named_children() hides repeats
            if child is not None:
                out += _flatten(child, f"{prefix}.{name}" if prefix else name)
        return out
    return [(prefix or type(module).__name__, module)]


def _check_module(position: int, name: str, module: nn.Module) -> StageDerivatives:
    handler = DERIVATIVES.get(type(module))
    if handler is None:
        if len(list(module.children())) > 0 and not isinstance(module, nn.Sequential):
            raise TypeError(
                f"module {type(module).__name__} at stage position {position} (model.{name}) is "
                "a container with its own forward(): ocnopt cannot see its computation as a chain. "
                "Write it as nn.Sequential(...) of supported layers (nested Sequentials are "
                "flattened); residual and multi-branch blocks are not supported yet. "
                f"Supported layers: {', '.join(supported_modules())}"
            )
        raise TypeError(
            f"unsupported module {type(module).__name__} at stage position {position} "
            f"(model.{name}); supported layers: {', '.join(supported_modules())}"
        )
    if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d)) and module.return_indices:
        raise TypeError(
            f"{type(module).__name__} at stage position {position} (model.{name}) has "
            "return_indices=True; a stage must return one tensor, use return_indices=False"
        )
    if isinstance(module, nn.Flatten) and module.start_dim == 0:
        raise TypeError(
            f"Flatten at stage position {position} (model.{name}) has start_dim=0, which mixes "
            "samples of the batch; use start_dim=1"
        )
    return handler


def build_stages(model: nn.Module) -> list[Stage]:
    """Turn ``model`` (an ``nn.Sequential`` of supported layers, nested Sequentials flattened,
    or a single supported layer) into the chain of stages.

    Raises ``TypeError`` naming the module, its position and the supported layers when a module
    is not supported, and explaining how to express the model as a chain when it is not one.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(model, nn.Sequential) and type(model) not in DERIVATIVES:
        raise TypeError(
            f"model of type {type(model).__name__} is not a chain: ocnopt needs the network as "
            "nn.Sequential(layer_0, layer_1, ...) whose output is the next layer's input "
            "(nested Sequentials are flattened). Residual and multi-branch networks are not "
            f"supported yet. Supported layers: {', '.join(supported_modules())}"
        )
    stages: list[Stage] = []
    first_seen: dict[int, str] = {}
    for position, (name, module) in enumerate(_flatten(model, "")):
        if id(module) in first_seen and any(True for _ in module.parameters()):
            raise ValueError(
                f"module {type(module).__name__} is shared: it appears twice in the chain (model."
                f"{first_seen[id(module)]} and model.{name}, stage position {position}): each "
                "stage must own its control; use a separate module (copy.deepcopy) for each use"
            )
        first_seen.setdefault(id(module), name)
        handler = _check_module(position, name, module)
        params = param_dict(module)
        stages.append(
            Stage(
                index=position,
                name=name,
                module=module,
                derivatives=handler,
                param_names=list(params),
                params=[p for p in params.values() if isinstance(p, nn.Parameter)],
            )
        )
    if not stages:
        raise ValueError("model has no layers: an empty nn.Sequential is not a network")
    seen: set[int] = set()
    for st in stages:
        for p in st.params:
            if id(p) in seen:
                raise ValueError(
                    f"parameter shared between stages (found again at stage {st.index}, "
                    f"model.{st.name}); each stage must own its control"
                )
            seen.add(id(p))
    if not seen:
        raise ValueError("model has no trainable parameters: nothing to optimise")
    return stages
