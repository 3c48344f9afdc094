"""Profiler regions of a step (ocnopt.profiling): each phase appears once per step under
torch.profiler (the curvature update once per player at order 2, once for all players at
order 1), and none is recorded without one."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.profiler as autograd_profiler
from torch import nn

import ocnopt
from ocnopt.profiling import REGIONS, region


def _chain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


@pytest.mark.parametrize("kwargs", [dict(curvature="kfac", order=1),
                                    dict(curvature="adam", order=2, feedback=True,
                                         backend="lowrank")])
def test_every_phase_is_a_region_once_per_step(kwargs) -> None:
    opt = ocnopt.OCNOpt(_chain(), loss="cross_entropy", lr=0.01, **kwargs)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt.step(x, y)
    with torch.profiler.profile() as prof:
        for _ in range(2):
            opt.step(x, y)
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("ocnopt.")}
    per_step = 3 if kwargs["order"] == 2 else 1  # order 1: one update of every player at once
    assert counts == {name: 2 * (per_step if name == "ocnopt.curvature" else 1) for name in REGIONS}


def test_no_record_without_a_profiler(monkeypatch) -> None:
    original = autograd_profiler.record_function

    def fail(name: str, *args):  # torch.optim's own "Optimizer.step#..." record passes
        if name.startswith("ocnopt."):
            raise AssertionError(f"record_function({name!r}) outside a profiler")
        return original(name, *args)

    monkeypatch.setattr(autograd_profiler, "record_function", fail)
    assert not autograd_profiler._is_profiler_enabled
    with region("ocnopt.step") as r:
        assert r is None
    opt = ocnopt.OCNOpt(_chain(), loss="cross_entropy", lr=0.01, curvature="kfac", order=2,
                        feedback=True, backend="lowrank")
    loss = opt.step(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    assert torch.isfinite(loss)
