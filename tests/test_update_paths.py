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


@pytest.mark.parametrize("curvature, hp", [
    ("adam", {}), ("kfac", {}), ("kfac", {"fisher_type": "mc"}),
    ("kfac", {"fisher_type": "mc", "stat_every": 2, "inv_every": 2, "stat_decay": 0.0}),
    ("kfac", {"fisher_type": "type-2"}), ("ekfac", {"fisher_type": "mc"})])
def test_connected_backward_equals_per_step_backward(curvature, hp, monkeypatch):
    """Qbar_u (``.grad``), the parameters and the curvature states (K-FAC's factors, for the
    MC and type-2 Fisher from the terminal factor's columns) after the steps are bitwise those
    of the per-step vector-Jacobian products (the connected path switched off), and the MC
    labels come from the same draws (the generators end in the same state). Bitwise: both
    paths run the same autograd functions on the same tensors in the same order (a chain: no
    tensor read twice, whose sum autograd could order differently)."""
    runs = []
    for connected in (True, False):
        model = copy.deepcopy(_model())
        opt = ocnopt.OCNOpt(model, curvature=curvature, lr=0.02, **hp)
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
                     [p.grad.clone() for p in model.parameters()],
                     [(k, v.clone()) for p in model.parameters() for k, v in opt.state[p].items()
                      if isinstance(v, torch.Tensor)], opt.generator.get_state()))
    (p1, g1, s1, r1), (p2, g2, s2, r2) = runs
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert [k for k, _ in s1] == [k for k, _ in s2]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(s1, s2))
    assert torch.equal(r1, r2)
    if curvature != "adam":
        assert {"A", "G"} <= {k for k, _ in s1}
        if hp.get("fisher_type") == "mc":  # labels were drawn
            assert not torch.equal(r1, torch.Generator().manual_seed(0).get_state())


@pytest.mark.parametrize("connected", [True, False])
@pytest.mark.parametrize("fisher_type", ["mc", "type-2"])
def test_sampled_statistics_reach_layers_before_an_unparametrised_last_step(
        connected, fisher_type, monkeypatch):
    """K-FAC's G from the terminal factor Z (MC: one sampled gradient; type-2: the columns of
    the square root of the loss Hessian) on a network ending with an activation, whose last
    step has no statistics: G of each Linear is E_i[sum_c g_ic g_ic^T] with g_ic = the column
    Z_ic backpropagated to the Linear's output (an independent autograd reference on the
    module, the MC labels drawn from a copy of the optimizer's generator), on the connected
    path and on the per-step one (which used to stop propagating Z at the last step with
    statistics, falling back to the empirical Fisher here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh()).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    opt = ocnopt.OCNOpt(model, curvature="kfac", lr=0.02, fisher_type=fisher_type, seed=3)
    if not connected:
        monkeypatch.setattr(type(opt.backend), "connected_first_order", False)
    gen = torch.Generator()
    gen.set_state(opt.generator.get_state())
    outs: list[torch.Tensor] = []
    hooks = [model[i].register_forward_hook(lambda m, a, o: outs.append(o)) for i in (0, 2)]
    out = model(x)
    for h in hooks:
        h.remove()
    loss = opt.loss_fn
    Z = loss.sample_gradient(out.detach(), gen).unsqueeze(1) if fisher_type == "mc" \
        else loss.hessian_sqrt(out.detach(), y)
    Gs = [torch.zeros(o.shape[1], o.shape[1], dtype=torch.float64) for o in outs]
    for c in range(Z.shape[1]):
        cols = torch.autograd.grad(out, outs, Z[:, c], retain_graph=True)
        for G, g in zip(Gs, cols):
            G += g.T @ g / x.shape[0]
    opt.step(x, y)
    for i, G in zip((0, 2), Gs):
        assert torch.allclose(opt.state[model[i].weight]["G"], G, rtol=1e-12, atol=1e-14), i
    assert G.abs().max() > 1e-3  # not a zero factor


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hp", [
    {}, {"stat_every": 2, "inv_every": 3},
    {"stat_every": 3, "inv_every": 3, "stat_decay": 0.0, "fisher_type": "mc"},
    {"stat_every": 2, "inv_every": 2, "weight_decay": 0.1},
    {"stat_every": 2, "inv_every": 2, "kfac_max_dim": 16},
    {"stat_every": 2, "inv_every": 2, "momentum": 0.9}])
def test_kfac_update_many_equals_update_per_stage(hp, dtype, monkeypatch):
    """K-FAC's ``update_many`` (the plain steps between refreshes as G^-1 X A^-1 without
    ``update``) moves the parameters bitwise as ``update`` per stage (the default), on steps
    with and
    without statistics, stages on the diagonal fallback (``kfac_max_dim``: the 20-input layer)
    and momentum (the default path); without momentum the plain steps skip ``update``."""
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3)).to(dtype)
    torch.manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    runs = []
    for default in (False, True):
        m = copy.deepcopy(model)
        opt = ocnopt.OCNOpt(m, curvature="kfac", lr=0.05, **hp)
        calls = []
        original = type(opt.model_).update
        with monkeypatch.context() as mp:
            if default:
                mp.setattr(type(opt.model_), "update_many", CurvatureModel.update_many)
            mp.setattr(type(opt.model_), "update",
                       lambda *a, calls=calls, original=original, **k:
                       calls.append(1) or original(*a, **k))
            for x, y in _batches() * 3:
                opt.step(x.to(dtype), y)
        runs.append(([p.detach().clone() for p in m.parameters()], len(calls)))
    (got, n_fast), (ref, n_default) = runs
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert any(not torch.equal(a, b) for a, b in zip(ref, model.parameters()))
    assert n_default == 9 * 3  # every stage, every step
    if hp.get("momentum") or hp.get("stat_every", 1) == 1:  # no plain step on the fast path
        assert n_fast == n_default
    else:  # the Kronecker stages' plain steps skip ``update``
        assert n_fast < n_default


def test_the_direct_forward_runs_the_model_itself_and_equals_the_steps(monkeypatch):
    """Order 1 without statistics calls the model's own forward (``Graph.direct``); its
    parameters after three steps are bitwise those of the step-by-step forward."""
    runs = []
    for direct in (True, False):
        model = copy.deepcopy(_model())
        opt = ocnopt.OCNOpt(model, curvature="adam", lr=0.02)
        assert opt.graph.direct
        calls = []
        model.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        with monkeypatch.context() as mp:
            if not direct:
                mp.setattr(opt.graph, "direct", False)
            for x, y in _batches():
                opt.step(x, y)
        assert len(calls) == (3 if direct else 0)  # the root module itself was called
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_graphs_whose_steps_draw_their_own_randomness_are_not_direct():
    """Dropout's mask is drawn by ocnopt (replayable), RReLU refuses training mode in its
    step: the model's own call would differ, so such graphs run step by step."""
    assert not ocnopt.OCNOpt(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.Linear(3, 2))
                             ).graph.direct
    assert not ocnopt.OCNOpt(nn.Sequential(nn.Linear(3, 3), nn.RReLU().eval(), nn.Linear(3, 2))
                             ).graph.direct
    assert ocnopt.OCNOpt(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU(),
                                       nn.Linear(3, 2))).graph.direct


@pytest.mark.parametrize("curvature, hp", [("sgd", {}), ("sgd", {"momentum": 0.9}),
                                           ("adam", {}), ("rmsprop", {"momentum": 0.5})])
def test_order1_diagnostics_are_the_step_norms(curvature, hp):
    """last_step.stages[i].k_norm = |u_i after - u_i before| per player (order 1: k = -lr d),
    also when read after .grad was zeroed in place, and kept by a result held across the
    next step."""
    model = copy.deepcopy(_model())
    opt = ocnopt.OCNOpt(model, curvature=curvature, lr=0.02, **hp)
    players = [model[0], model[2], model[4]]
    held = None
    for x, y in _batches():
        before = [[p.detach().clone() for p in m.parameters()] for m in players]
        opt.step(x, y)
        for p in model.parameters():  # (in place: a diagnostic made later must not see it)
            p.grad.zero_()
        want = [torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(m.parameters(), bs)))
                for m, bs in zip(players, before)]
        got = opt.last_step.stages
        assert [d.index for d in got] == [0, 2, 4]
        for d, w in zip(got, want):
            assert d.k_norm == pytest.approx(float(w), rel=1e-9)
        if held is None:
            held, held_norms = opt.last_step, [d.k_norm for d in got]
    assert [d.k_norm for d in held.stages] == held_norms


@pytest.mark.parametrize("entry, lr", [(1e30, 1e10), (float("inf"), 1e-2)])
def test_an_update_beyond_the_dtype_range_is_skipped(entry, lr, monkeypatch):
    """A step whose move is not finite in float32 (a finite direction whose -lr d overflows,
    or a direction with an infinite entry) leaves the parameters and the optimizer state as
    they were: the moved parameters are checked and the backup put back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = ocnopt.OCNOpt(model, curvature="sgd", momentum=0.9, lr=lr)
    opt.step(x, y)  # (a finite first step, also at lr 1e10)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    bufs = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    original = opt.model_.update_many

    def poisoned(*args, **kwargs):
        states, dirs = original(*args, **kwargs)
        dirs[0][0] = dirs[0][0].clone()
        dirs[0][0][0, 0] = entry
        return states, dirs
    monkeypatch.setattr(opt.model_, "update_many", poisoned)
    with pytest.warns(ocnopt.optimizer.NonFiniteStepWarning, match="update is not finite"):
        opt.step(x, y)
    assert opt.skipped_steps == 1 and opt.step_count == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    assert all(opt.state[p]["momentum_buffer"] is b for p, b in zip(model.parameters(), bufs))


def test_a_learning_rate_the_parameters_dtype_cannot_hold_is_refused():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"invalid lr=1e\+300: .*float32.*3\.4"):
        ocnopt.OCNOpt(model, curvature="sgd", lr=1e300)
    opt = ocnopt.OCNOpt(model, curvature="sgd", lr=0.1)
    opt.param_groups[0]["lr"] = 1e300
    with pytest.raises(ValueError, match=r"invalid lr=1e\+300"):
        opt.step(torch.randn(2, 4), torch.tensor([0, 1]))
    assert ocnopt.OCNOpt(copy.deepcopy(model).double(), curvature="sgd", lr=1e300)  # float64
