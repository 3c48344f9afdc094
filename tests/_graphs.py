"""Tiny fx-traceable graph networks (float64) for the graph identities: a residual block, an
inception block merged by concatenation, and a branch merged by addition with a projection
shortcut. Each takes inputs (B, 3) and returns logits (B, 2)."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """y = head(x + lin2(tanh(lin1(x)))): players lin1, lin2, head on one ancestry chain."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin2, self.head = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.lin2(torch.tanh(self.lin1(x))))


class Inception(nn.Module):
    """y = head(cat(a(x), b2(tanh(b1(x))))): a is simultaneous with b1 and b2."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b1, self.b2 = nn.Linear(3, 2), nn.Linear(3, 4), nn.Linear(4, 2)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b2(torch.tanh(self.b1(x)))], dim=1))


class Projection(nn.Module):
    """y = head(b2(tanh(b1(x))) + proj(x)): the projection is simultaneous with b1 and b2."""

    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2, self.proj = nn.Linear(3, 4), nn.Linear(4, 3), nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b2(torch.tanh(self.b1(x))) + self.proj(x))


GRAPHS = {"residual": Residual, "inception": Inception, "projection": Projection}


def make_graph(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return GRAPHS[name]().double()


def graph_batch(B: int, loss: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, generator=g, dtype=torch.float64)
    if loss == "mse":
        return x, torch.randn(B, 2, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 2, (B,), generator=g)
