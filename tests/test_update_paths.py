"""The three ways order 1 runs a diagonal curvature model's update are the same arithmetic:
``update`` per stage (the path order 2 takes), ``update_many`` with ``_foreach`` ops (small
tensors) and ``update_many`` per tensor into kept workspaces (large tensors,
``FOREACH_MAX_NUMEL`` set to 0 here). Parameters after several steps are compared bit for bit;
and the connected order-1 backward (one autograd call) gives the per-step backward's Qbar_u
bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ocnopt
import ocnopt.curvature.base as curvature_base
from ocnopt.curvature.base import CurvatureModel

CASES = [("sgd", {}), ("sgd", {"momentum": 0.9}), ("sgd", {"momentum": 0.9, "nesterov": True}),
         ("sgd", {"momentum": 0.9, "dampening": 0.3, "weight_decay": 0.1}),
         ("rmsprop", {}), ("rmsprop", {"momentum": 0.5, "weight_decay": 0.1}),
         ("rmsprop", {"centered": True}), ("adam", {}), ("adam", {"weight_decay": 0.1}),
         ("adam", {"amsgrad": True}), ("adamw", {}), ("adamw", {"weight_decay": 0.3})]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 20, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]


def _train(curvature: str, hp: dict, path: str, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    model = copy.deepcopy(_model())
    opt = ocnopt.OCNOpt(model, curvature=curvature, lr=0.02, **hp)
    with monkeypatch.context() as mp:
        if path == "per-stage":  # the default update_many: ``update`` stage by stage
            mp.setattr(type(opt.model_), "update_many", CurvatureModel.update_many)
        elif path == "workspace":
            mp.setattr(curvature_base, "FOREACH_MAX_NUMEL", 0)
        for x, y in _batches() * 2:
            opt.step(x, y)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("curvature, hp", CASES)
def test_update_paths_are_bitwise_equal(curvature, hp, monkeypatch):
    ref = _train(curvature, hp, "per-stage", monkeypatch)
    for path in ("foreach", "workspace"):
        got = _train(curvature, hp, path, monkeypatch)
        for a, b in zip(got, ref):
            assert torch.equal(a, b), (path, curvature, hp)
    # the paths moved the parameters at all
    assert any(not torch.equal(a, b) for a, b in zip(ref, _model().parameters()))


@pytest.mark.parametrize("curvature", ["adam", "kfac"])
def test_connected_backward_equals_per_step_backward(curvature, monkeypatch):
    """Qbar_u (``.grad``) and the parameters after a step are bitwise those of the per-step
    vector-Jacobian products (the connected path switched off)."""
    runs = []
    for connected in (True, False):
        model = copy.deepcopy(_model())
        opt = ocnopt.OCNOpt(model, curvature=curvature, lr=0.02)
        assert opt.backend.connected_first_order
        with monkeypatch.context() as mp:
            if not connected:
                mp.setattr(type(opt.backend), "connected_first_order", False)
            calls = []
            original = opt.backend.backward_connected
            mp.setattr(opt.backend, "backward_connected",
                       lambda *a, calls=calls, original=original, **k:
                       calls.append(1) or original(*a, **k))
            for x, y in _batches():
                opt.step(x, y)
            assert bool(calls) == connected
        runs.append(([p.detach().clone() for p in model.parameters()],
                     [p.grad.clone() for p in model.parameters()]))
    (p1, g1), (p2, g2) = runs
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
