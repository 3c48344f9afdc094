"""Hypothesis-drawn networks: a layer as data (prints readably when a test fails) and random
MLP chains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

SMOOTH_ACTS = [nn.Tanh, nn.Sigmoid, nn.Softplus, nn.GELU, nn.SiLU, nn.ELU]


@dataclass(frozen=True)
class Layer:
    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def build(self) -> nn.Module:
        return getattr(nn, self.name)(**dict(self.kwargs))

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.kwargs)})"


@st.composite
def mlp_chains(draw: Any, max_depth: int = 3, max_width: int = 5, smooth: bool = False,
               acts: list[type[nn.Module]] | None = None, min_out: int = 1) -> Any:
    """A random MLP chain (widths, builder of a float64 ``nn.Sequential``) of 1..max_depth
    Linear layers with activations from ``acts`` (default: smooth ones, plus ReLU and
    LeakyReLU unless ``smooth``); the output has at least ``min_out`` features."""
    depth = draw(st.integers(1, max_depth))
    widths = [draw(st.integers(1, max_width)) for _ in range(depth + 1)]
    widths[-1] = max(widths[-1], min_out)
    pool = acts if acts is not None else (
        SMOOTH_ACTS if smooth else SMOOTH_ACTS + [nn.ReLU, nn.LeakyReLU])
    chosen = [draw(st.sampled_from(pool)) for _ in range(depth - 1)]
    seed = draw(st.integers(0, 2**16))

    def build() -> nn.Sequential:
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < depth - 1:
                layers.append(chosen[i]())
        return nn.Sequential(*layers).double()

    return widths, build
