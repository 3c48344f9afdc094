"""Identity 14: the update of the integration time t1 (docs/method.md section 12).

s = E_batch[<F(t1, x(t1)), V'_x>] from the block equals dJ/dt1 by central finite differences
of the mean loss through a tight adaptive solve; Q_T, Q_TT and dt1 of ``update_t1`` equal the
formulas evaluated independently (closed loop with the feedback term, open loop); t1 respects
t1_min and t1_every, lives in state_dict and its updates in ``t1_history``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ocnopt
from ocnopt.ode import ODEBlock

torchdiffeq = pytest.importorskip("torchdiffeq")
D = torch.float64


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 5), nn.Linear(5, 3)

    def forward(self, t, x):
        return self.l2(torch.tanh(self.l1(x)))


def setup(**kw):
    torch.manual_seed(0)
    blk = ODEBlock(Field(), t1=0.8, method="dopri5", rtol=1e-11, atol=1e-12, learn_t1=True, **kw).to(D)
    head = nn.Linear(3, 2).to(D)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, generator=g, dtype=D)
    y = torch.randint(0, 2, (6,), generator=g)
    return blk, head, x, y


def loss_at(blk, head, x, y, t1):
    with torch.no_grad():
        out = torchdiffeq.odeint(blk.func, x, torch.tensor([0.0, t1], dtype=D), method="dopri5",
                                 rtol=1e-11, atol=1e-12)[-1]
        return float(nn.functional.cross_entropy(head(out), y))


def expansion_s(blk, head, x, y):
    """s through the block's backward expansion, with V' = B times the mean loss's gradient."""
    with torch.no_grad():
        out = blk(x)
    h = out.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(head(h), y), h)
    V = x.shape[0] * g
    blk.backward_expansion(out, V, None, torch.ones(x.shape[0], dtype=D))
    return blk.t1_grad


def test_s_is_derivative_of_loss_in_t1():
    blk, head, x, y = setup()
    s = expansion_s(blk, head, x, y)
    e = 1e-4
    fd = (loss_at(blk, head, x, y, 0.8 + e) - loss_at(blk, head, x, y, 0.8 - e)) / (2 * e)
    assert abs(float(s) - fd) < 1e-7 * max(1.0, abs(fd)), (float(s), fd)


def test_closed_loop_update_formulas():
    blk, head, x, y = setup(t1_lr=0.5, t1_reg=0.3)
    s = float(expansion_s(blk, head, x, y))
    g = torch.Generator().manual_seed(4)
    Q_theta = [torch.randn(p.shape, generator=g, dtype=D) for p in blk.parameters()]
    dtheta = [torch.randn(p.shape, generator=g, dtype=D) * 0.01 for p in blk.parameters()]
    upd = blk.update_t1(Q_theta=Q_theta, dtheta=dtheta)
    fb = sum(float((q * d).sum()) for q, d in zip(Q_theta, dtheta))
    Q_T, Q_TT = 0.3 * 0.8 + s, 0.3 + s * s
    dt1 = -0.5 * (Q_T + s * fb) / Q_TT
    assert upd is not None
    assert (upd.s, upd.Q_T, upd.Q_TT) == pytest.approx((s, Q_T, Q_TT), rel=1e-12)
    assert upd.dt1 == pytest.approx(dt1, rel=1e-12)
    assert float(blk.t1) == pytest.approx(max(blk.t1_min, 0.8 + dt1), rel=1e-12)
    assert blk.t1_history == [upd] and float(blk.state_dict()["t1"]) == upd.t1


def test_open_loop_update_and_bounds():
    blk, head, x, y = setup(t1_lr=0.5, t1_reg=0.3, t1_feedback=False, t1_every=2)
    s = float(expansion_s(blk, head, x, y))
    upd = blk.update_t1(Q_theta=[torch.ones(1, dtype=D)], dtheta=[torch.ones(1, dtype=D)])
    assert upd is not None and upd.Q_TT == 1.0
    assert upd.dt1 == pytest.approx(-0.5 * (0.3 * 0.8 + s), rel=1e-12)
    assert blk.update_t1(s=1.0) is None  # t1_every=2: the second call does nothing
    upd = blk.update_t1(s=1e6)  # a huge step down stops at t1_min
    assert upd is not None and float(blk.t1) == blk.t1_min == pytest.approx(0.008)


def test_invalid_t1_options():
    with pytest.raises(ValueError, match="invalid t1_min=0.0 with t0=0.0"):
        ODEBlock(Field(), learn_t1=True, t1_min=0.0)
    with pytest.raises(ValueError, match="invalid t1_every=0"):
        ODEBlock(Field(), learn_t1=True, t1_every=0)
    with pytest.raises(ValueError, match="update_t1 needs ODEBlock"):
        ODEBlock(Field()).update_t1(s=1.0)


def test_update_after_an_order2_step_uses_the_recorded_expansion():
    """After an OCNOpt order-2 step, the step's t1 update (``last_step.t1_updates``, made by
    ``update_t1()``) took s, Qbar_theta from the block's backward expansion and dtheta = the
    parameters' change in the step."""
    import copy

    import ocnopt

    blk, head, x, y = setup(t1_lr=0.2, t1_reg=0.1)
    blk.rtol, blk.atol = 1e-8, 1e-10
    probe, head0 = copy.deepcopy(blk), copy.deepcopy(head)
    before = [p.detach().clone() for p in blk.parameters()]
    opt = ocnopt.OCNOpt(nn.Sequential(blk, head), loss="cross_entropy", lr=0.05, curvature="sgd",
                        backend="lowrank", order=2, value_correction=False)
    opt.step(x, y)
    s = float(blk.t1_grad)
    # s of the nominal pass: V' = B times the gradient of the mean loss at x(t1), before the step
    with torch.no_grad():
        out = probe(x)
    h = out.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(nn.functional.cross_entropy(head0(h), y), h)
    assert s == pytest.approx(float(probe.t1_gradient(out, x.shape[0] * g)), rel=1e-10)
    Q_theta = blk._t1_ref[0]
    loss = nn.functional.cross_entropy(head0(probe(x)), y)  # Qbar_theta: the adjoint gradient
    for q, r in zip(Q_theta, torch.autograd.grad(loss, list(probe.parameters()))):
        torch.testing.assert_close(q, r, rtol=1e-6, atol=1e-8)
    dtheta = [p.detach() - b for p, b in zip(blk.parameters(), before)]
    assert all(float(d.abs().max()) > 0 for d in dtheta)
    fb = sum(float((q * d).sum()) for q, d in zip(Q_theta, dtheta))
    (upd,) = opt.last_step.t1_updates
    assert upd is blk.t1_history[-1] and len(blk.t1_history) == 1
    Q_T = 0.1 * 0.8 + s
    assert upd is not None
    assert upd.dt1 == pytest.approx(-0.2 * (Q_T + s * fb) / (0.1 + s * s), rel=1e-10)


def test_t1_hyperparameters_are_the_optimizers():
    """learn_t1, t1_lr, t1_reg, t1_every, t1_min, t1_feedback given to OCNOpt reach the block,
    live in param_groups (so in state_dict) and a change there applies at the next step;
    t1 is in the model's state_dict; a model without an ODE block refuses them."""
    torch.manual_seed(0)
    blk = ODEBlock(Field(), t1=0.8, method="rk4", options={"step_size": 0.1}).to(D)
    model = torch.nn.Sequential(blk)
    opt = ocnopt.OCNOpt(model, lr=0.05, curvature="sgd", order=2, loss="mse", learn_t1=True,
                        t1_lr=0.02, t1_reg=0.5, t1_feedback=False, t1_min=0.3)
    assert blk.learn_t1 and blk.t1_lr == 0.02 and blk.t1_reg == 0.5 and not blk.t1_feedback
    assert blk.t1_min == 0.3 and blk.t1_every == 1
    assert opt.state_dict()["param_groups"][0]["t1_lr"] == 0.02
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, generator=g, dtype=D), torch.randn(5, 3, generator=g, dtype=D)
    opt.step(x, y)
    (u,) = opt.last_step.t1_updates
    assert u.Q_TT == 1.0 and u.dt1 == pytest.approx(-0.02 * (0.5 * 0.8 + u.s), rel=1e-12)
    opt.param_groups[0]["t1_feedback"] = True
    opt.param_groups[0]["t1_lr"] = 0.01
    opt.step(x, y)
    (u2,) = opt.last_step.t1_updates
    assert blk.t1_feedback and blk.t1_lr == 0.01
    assert u2.Q_TT == pytest.approx(0.5 + u2.s ** 2, rel=1e-12)
    assert float(model.state_dict()["0.t1"]) == pytest.approx(u2.t1)
    with pytest.raises(ValueError, match="invalid t1_lr=-1"):
        ocnopt.OCNOpt(torch.nn.Sequential(ODEBlock(Field())), order=2, backend="lowrank",
                      t1_lr=-1)
    with pytest.raises(TypeError, match="unknown hyper-parameter.*t1_lr"):
        ocnopt.OCNOpt(torch.nn.Sequential(torch.nn.Linear(3, 3)), t1_lr=0.1)
    with pytest.raises(ValueError, match="learn_t1=True\\) needs order=2"):
        ocnopt.OCNOpt(torch.nn.Sequential(ODEBlock(Field())), order=1, learn_t1=True)
