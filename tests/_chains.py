"""A layer as data, for hypothesis-drawn networks that print readably when a test fails."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Layer:
    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def build(self) -> nn.Module:
        return getattr(nn, self.name)(**dict(self.kwargs))

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.kwargs)})"
