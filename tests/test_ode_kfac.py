"""K-FAC and EKFAC on the layers inside an ODE block (docs/method.md section 12): each Linear
inside the field is preconditioned with its own Kronecker factors averaged over the time grid
t_j = t1 - j h, the other parameters of the field with the diagonal fallback.

The reference is written out independently: x(t_j) from a tight forward solve, the adjoint
a(t_j) = d<V, x(t1)>/dx(t_j) by autograd through a tight solve from t_j to t1 (V = B times the
gradient of the mean loss at x(t1)), the rows of each Linear by hand, the factors averaged over
the grid, damped inverses (K-FAC) or the eigenbasis with the eigenvalues re-estimated per grid
time and averaged (EKFAC), applied to autograd's gradient through the solver. Order 1 on a
block followed by a Linear; order 2 (lowrank) on a block alone, whose step is then the
open-loop k (dx_0 = 0: no feedback) with the factors from V'_x of the recursion.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_ode_grid import Field  # the field of the grid-statistics tests
from torch import nn

import ocnopt
from ocnopt.ode import ODEBlock, reset_solver_statistics, solver_statistics

torchdiffeq = pytest.importorskip("torchdiffeq")
D = torch.float64
T1, H, B = 0.5, 0.125, 6
TIGHT = {"rtol": 1e-11, "atol": 1e-13}


def make(head: bool) -> nn.Module:
    torch.manual_seed(0)
    blk = ODEBlock(Field(), t1=T1, method="dopri5", rtol=1e-10, atol=1e-12, grid_step=H)
    return (nn.Sequential(blk, nn.Linear(3, 2)) if head else nn.Sequential(blk)).to(D)


def reference(model: nn.Module, x0, y, curvature: str, lr: float, damping: float):
    """The expected change of l1.weight, l1.bias, l2.weight, l2.bias and c (module docstring)."""
    f = model[0].func
    with torch.no_grad():
        x1 = torchdiffeq.odeint(f, x0, torch.tensor([0.0, T1], dtype=D), **TIGHT)[-1]
    x1r = x1.clone().requires_grad_(True)
    out = x1r
    for m in list(model)[1:]:
        out = m(out)
    loss = (out - y).pow(2).flatten(1).mean(1).mean()
    (V,) = torch.autograd.grad(loss, x1r)
    V = V * B  # per sample, not divided by B
    params = [f.l1.weight, f.l1.bias, f.l2.weight, f.l2.bias, f.c]
    xt = torchdiffeq.odeint(f, x0, torch.tensor([0.0, T1], dtype=D), **TIGHT)[-1]
    grads = torch.autograd.grad(((xt if len(model) == 1 else model[1](xt)) - y)
                                .pow(2).flatten(1).mean(1).mean(), params)
    rows: dict[str, list] = {"l1": [], "l2": []}
    times = [T1 - H * j for j in range(int(T1 / H) + 1)]
    for tj in times:
        with torch.no_grad():
            xj = torchdiffeq.odeint(f, x0, torch.tensor([0.0, tj], dtype=D), **TIGHT)[-1] \
                if tj > 0 else x0
        xr = xj.clone().requires_grad_(True)
        end = torchdiffeq.odeint(f, xr, torch.tensor([tj, T1], dtype=D), **TIGHT)[-1] \
            if tj < T1 else xr
        (aj,) = torch.autograd.grad((end * V).sum(), xr)
        with torch.no_grad():
            h = torch.tanh(f.l1(xj) + tj * f.c)
            rows["l1"].append((xj, (aj @ f.l2.weight) * (1 - h * h)))
            rows["l2"].append((h, aj))
    eye = {n: torch.eye(n, dtype=D) for n in (3, 5)}
    steps = []
    for name, gw, gb in (("l1", grads[0], grads[1]), ("l2", grads[2], grads[3])):
        A = sum(a.T @ a / B for a, _ in rows[name]) / len(times)
        G = sum(g.T @ g / B for _, g in rows[name]) / len(times)
        if curvature == "kfac":
            Ai = torch.linalg.inv(A + damping * eye[A.shape[0]])
            Gi = torch.linalg.inv(G + damping * eye[G.shape[0]])
            steps += [Gi @ gw @ Ai, Gi @ gb]
        else:
            QA, QG = torch.linalg.eigh(A)[1], torch.linalg.eigh(G)[1]
            s_w = sum(torch.einsum("bo,bi->oi", (g @ QG) ** 2, (a @ QA) ** 2) / B
                      for a, g in rows[name]) / len(times)
            s_b = sum(((g @ QG) ** 2).sum(0) / B for _, g in rows[name]) / len(times)
            steps += [QG @ ((QG.T @ gw @ QA) / (s_w + damping)) @ QA.T,
                      QG @ ((QG.T @ gb) / (s_b + damping))]
    gc = grads[4]
    steps.append(gc / (gc * gc + damping))  # the diagonal fallback's first step
    return [-lr * s for s in steps]


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
@pytest.mark.parametrize("order", [1, 2])
def test_grid_factors_precondition_each_layer_inside_the_field(curvature, order):
    model = make(head=order == 1)
    ref_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(B, 3, generator=g, dtype=D)
    y = torch.randn(B, 3 if order == 2 else 2, generator=g, dtype=D)
    lr, damping = 0.3, 0.05
    opt = ocnopt.OCNOpt(model, lr=lr, curvature=curvature, order=order, loss="mse",
                        fisher_type="empirical", damping=damping)
    f = model[0].func
    before = [p.detach().clone() for p in (f.l1.weight, f.l1.bias, f.l2.weight, f.l2.bias, f.c)]
    opt.step(x0, y)
    after = [f.l1.weight, f.l1.bias, f.l2.weight, f.l2.bias, f.c]
    expected = reference(ref_model, x0, y, curvature, lr, damping)
    for p0, p1, e in zip(before, after, expected):
        torch.testing.assert_close(p1.detach() - p0, e, rtol=1e-6, atol=1e-9)
    # the field's Linear layers carry Kronecker state, its other parameter the fallback's
    assert "A" in opt.state[f.l1.weight] and "A" in opt.state[f.l2.weight]
    assert "diag" in opt.state[f.c] and "A" not in opt.state[f.c]


def test_statistics_every_stat_every_steps():
    """The grid solve runs at statistics steps only: its evaluations of the field appear in
    the backward count at steps 0 and 2 (stat_every=2), not at step 1."""
    model = make(head=True)
    opt = ocnopt.OCNOpt(model, lr=0.1, curvature="kfac", order=1, loss="mse",
                        stat_every=2, inv_every=2)
    g = torch.Generator().manual_seed(1)
    x0, y = torch.randn(B, 3, generator=g, dtype=D), torch.randn(B, 2, generator=g, dtype=D)
    counts = []
    for _ in range(3):
        reset_solver_statistics(model)
        opt.step(x0, y)
        counts.append(solver_statistics(model).nfe_backward)
    grid_evals = len(model[0].grid_times(H, x0))  # one field evaluation per grid time's rows
    assert counts[1] < counts[0] and counts[1] < counts[2]
    assert counts[0] - counts[1] >= grid_evals


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_solve_on_the_block_is_per_layer(curvature):
    """M^-1 on the block's control (what the order-2 feedback, value correction and Gram
    matrices use, with leading column dimensions) and M itself: per Linear inside the field
    its own damped factors (K-FAC: G^-1 X A^-1; EKFAC: the eigenbasis scaling), the field's
    other parameter the fallback's diagonal; M M^-1 = identity."""
    model = make(head=False)
    opt = ocnopt.OCNOpt(model, lr=0.1, curvature=curvature, order=2, loss="mse",
                        fisher_type="empirical", damping=0.05)
    g = torch.Generator().manual_seed(5)
    opt.step(torch.randn(B, 3, generator=g, dtype=D), torch.randn(B, 3, generator=g, dtype=D))
    stage = opt.stages[0]
    states = [opt.state[p] for p in stage.params]
    v = [torch.randn(2, 4, *p.shape, generator=g, dtype=D) for p in stage.params]
    out = opt.model_.solve(stage, states, v, opt.param_groups[0])
    names = stage.param_names
    for layer in ("func.l1", "func.l2"):
        iw, ib = names.index(f"{layer}.weight"), names.index(f"{layer}.bias")
        st = states[iw]
        if curvature == "kfac":
            exp_w = st["G_inv"] @ v[iw] @ st["A_inv"]
            exp_b = v[ib] @ st["G_inv"]
        else:
            QA, QG, d = st["QA"], st["QG"], st["damping"]
            exp_w = QG @ ((QG.T @ v[iw] @ QA) / (st["scale"] + d)) @ QA.T
            exp_b = ((v[ib] @ QG) / (st["scale_bias"] + d)) @ QG.T
        torch.testing.assert_close(out[iw], exp_w)
        torch.testing.assert_close(out[ib], exp_b)
    ic = names.index("func.c")
    torch.testing.assert_close(out[ic], v[ic] / (states[ic]["diag"] + states[ic]["diag_damping"]))
    back = opt.model_.apply(stage, states, out, opt.param_groups[0])
    for x, y in zip(back, v):
        torch.testing.assert_close(x, y)
