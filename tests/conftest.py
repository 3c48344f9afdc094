"""Shared tiny factories: a small MLP chain and reproducible classification batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float32, d_in: int = 4, hidden: int = 6,
             classes: int = 3) -> nn.Sequential:
    """Linear -> Tanh -> Linear, initialised from ``seed`` (same numbers in every dtype)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(dtype)


def tiny_batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float32, batch: int = 8,
                 d_in: int = 4, classes: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches (inputs (batch, d_in), class indices (batch,)) from their own generator."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=g).to(dtype),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]


@pytest.fixture
def make_mlp():
    return tiny_mlp


@pytest.fixture
def make_batches():
    return tiny_batches


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread per test process (pytest -n 2 already uses the two
    cores; more threads only oversubscribe them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
