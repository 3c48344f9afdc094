"""Order 2 and the exact backend: identities 2, 3, 4, 6, 7 of docs/method.md section 10 and
the exact-DDP identity."""

from __future__ import annotations

import copy

import pytest
import torch
from _chains import mlp_chains
from hypothesis import given, settings
from hypothesis import strategies as st
from ocnopt.backends import MemoryBudgetError
from torch import nn
from torch.func import functional_call, hessian

import ocnopt

SETTINGS = settings(max_examples=12, deadline=None)


chains = mlp_chains  # random MLP chains (tests/_chains.py)


def batch(widths, B, loss, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, widths[0], generator=g, dtype=torch.float64)
    if loss == "mse":
        return x, torch.randn(B, widths[-1], generator=g, dtype=torch.float64)
    return x, torch.randint(0, widths[-1], (B,), generator=g)


def sgd_policy(lr):
    """Policy of the sgd model without momentum: k = -lr Qbar_u, M = I."""
    def policy_fn(stage, Q_u, stats):
        return [-lr * g for g in Q_u], lambda v: list(v)
    return policy_fn


# -- identity 2 (docs/method.md section 10) -------------------------------------------------------
@SETTINGS
@given(chains(), st.integers(1, 8), st.sampled_from(["sgd", "adam", "kfac", "full"]),
       st.sampled_from(["cross_entropy", "mse"]))
def test_order2_without_feedback_and_correction_is_order1_bit_for_bit(chain, B, curv, loss):
    widths, build = chain
    m1, m2 = build(), build()
    # kfac: the empirical Fisher's rows are V'_x at both orders; MSE's default type-2 factor is
    # propagated column by column at order 1 but taken from the exact V_xx at order 2 (equal,
    # not bit for bit)
    fisher = {"fisher_type": "empirical"} if curv == "kfac" else {}
    o1 = ocnopt.OCNOpt(m1, loss=loss, curvature=curv, lr=0.05, order=1, **fisher)
    o2 = ocnopt.OCNOpt(m2, loss=loss, curvature=curv, lr=0.05, order=2, feedback=False,
                       value_correction=False, backend="autograd", **fisher)  # default: lowrank
    for s in range(3):
        x, y = batch(widths, B, loss, seed=s)
        assert torch.equal(o1.step(x, y), o2.step(x, y))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


# -- identity 3 (docs/method.md section 10) -------------------------------------------------------
@SETTINGS
@given(st.integers(1, 12), st.integers(1, 5), st.integers(1, 4), st.floats(1e-3, 1.0),
       st.integers(0, 100))
def test_full_newton_step_lands_on_ridge_solution(B, d, K, wd, seed):
    torch.manual_seed(seed)
    X, Y = torch.randn(B, d, dtype=torch.float64), torch.randn(B, K, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(d, K)).double()
    opt = ocnopt.OCNOpt(model, loss="mse", curvature="full", lr=1.0, damping=0.0,
                        weight_decay=wd, order=2)
    opt.step(X, Y)
    Xa = torch.cat([X, torch.ones(B, 1, dtype=torch.float64)], 1)
    c = 2.0 / (B * K)
    W = torch.linalg.solve(c * Xa.T @ Xa + wd * torch.eye(d + 1, dtype=torch.float64),
                           c * Xa.T @ Y).T
    torch.testing.assert_close(model[0].weight, W[:, :d], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(model[0].bias, W[:, d], rtol=1e-9, atol=1e-10)


# -- identity 4 (docs/method.md section 10) -------------------------------------------------------
@SETTINGS
@given(chains(), st.integers(1, 6), st.sampled_from(["cross_entropy", "mse"]))
def test_gauss_newton_quu_equals_ggn_block(chain, B, loss):
    from curvlinops import GGNLinearOperator

    widths, build = chain
    model = build()
    x, y = batch(widths, B, loss)
    opt = ocnopt.OCNOpt(model, loss=loss, curvature="full", order=2, value_correction=False)
    eng = opt.engine
    traj = eng.nominal(x)
    term = eng.terminal(traj, y, hessian=True)
    res = eng.second_order(traj, term, sgd_policy(0.1), lr=0.1, value_correction=False,
                           feedback=False, need_stats=[False] * len(eng.stages), need_quu=True,
                           keep=True, clip=False)
    loss_fn = nn.CrossEntropyLoss() if loss == "cross_entropy" else nn.MSELoss()
    for stage, exp in zip(eng.stages, res.expansions):
        if not stage.has_control:
            continue
        G = GGNLinearOperator(model, loss_fn, stage.params, [(x, y)], check_deterministic=False)
        eye = torch.eye(stage.control_size, dtype=torch.float64)
        ggn = G @ eye
        torch.testing.assert_close(exp.Q_uu, ggn, rtol=1e-9, atol=1e-11)


# -- exact DDP identity --------------------------------------------------------------------------
@SETTINGS
@given(chains(max_depth=3, max_width=4, smooth=True), st.sampled_from(["cross_entropy", "mse"]))
def test_exact_backend_is_the_hessian_of_the_cost_to_go(chain, loss):
    """gauss_newton off, B = 1, no value correction: Q_xx, Q_ux, Q_uu of every stage equal
    the second derivatives of phi(f_{T-1}(... f_t(x, u) ...)) by torch.func.hessian."""
    widths, build = chain
    model = build()
    x, y = batch(widths, 1, loss)
    opt = ocnopt.OCNOpt(model, loss=loss, curvature="full", order=2, gauss_newton=False,
                        value_correction=False)
    eng = opt.engine
    traj = eng.nominal(x, input_value=True)
    term = eng.terminal(traj, y, hessian=True)
    res = eng.second_order(traj, term, sgd_policy(0.1), lr=0.1, value_correction=False,
                           feedback=False, gauss_newton=False, clip=False,
                           need_stats=[False] * len(eng.stages), need_quu=True, keep=True)
    for t, stage in enumerate(eng.stages):
        xt = traj.states[t].reshape(-1)

        def cost_to_go(u_flat, x_flat, t=t, stage=stage):
            h = x_flat.reshape(traj.states[t].shape)
            if stage.has_control:
                params = dict(zip(stage.param_names, stage.unflatten(u_flat)))
                h = functional_call(stage.module, params, (h,))
            else:
                h = stage.module(h)
            for later in eng.stages[t + 1:]:
                h = later.module(h)
            return opt.loss_fn.per_sample(h, y).sum()

        exp = res.expansions[t]
        if stage.has_control:
            u = stage.flatten([p.detach() for p in stage.params])
            (H_uu, H_ux), (_, H_xx) = hessian(cost_to_go, argnums=(0, 1))(u, xt)
            torch.testing.assert_close(exp.Q_uu, H_uu, rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(exp.Q_ux[0], H_ux, rtol=1e-8, atol=1e-10)
        else:
            H_xx = hessian(cost_to_go, argnums=1)(xt.new_zeros(0), xt)
        torch.testing.assert_close(exp.Q_xx[0], H_xx, rtol=1e-8, atol=1e-10)


# -- identity 6 (docs/method.md section 10) -------------------------------------------------------
@pytest.mark.parametrize("order,feedback", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("curv", ["sgd", "adam", "full"])
def test_small_lr_loss_change_matches_first_order_term(order, feedback, curv):
    torch.manual_seed(3)
    widths = [4, 5, 3]
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = batch(widths, 6, "cross_entropy")
    ratios = []
    for lr in (1e-4, 1e-5):
        m = copy.deepcopy(model)
        opt = ocnopt.OCNOpt(m, curvature=curv, lr=lr, order=order, feedback=feedback,
                            track_loss_after=True, damping=0.1) if curv == "full" else \
            ocnopt.OCNOpt(m, curvature=curv, lr=lr, order=order, feedback=feedback,
                          track_loss_after=True, backend="autograd")
        before = float(opt.step(x, y))
        # -sum_t Qbar_u^T M^{-1} Qbar_u with the state of this step
        eng = opt.engine
        traj = eng.nominal(x)
        m_ref = copy.deepcopy(model)
        ref = ocnopt.OCNOpt(m_ref, curvature=curv, lr=lr, order=1,
                            **({"damping": 0.1} if curv == "full" else {}))
        ref_traj = ref.engine.nominal(x)
        term = ref.engine.terminal(ref_traj, y)
        exps, _ = ref.engine.expand(ref_traj, term, need_stats=[False] * len(ref.stages))
        first = 0.0
        for stage, e in zip(ref.stages, exps):
            if stage.has_control:
                states = [opt.state[p] for p in opt.stages[stage.index].params]
                Minv_g = opt.model_.solve(stage, states, e.Q_u, opt.param_groups[0])
                first -= sum(float((g * v).sum()) for g, v in zip(e.Q_u, Minv_g))
        del traj
        ratios.append(((opt.last_step.loss_after - before) / lr, first))
    (r1, f1), (r2, f2) = ratios
    assert abs(r2 - f2) < abs(f2) * 1e-3
    assert abs(r2 - f2) <= abs(r1 - f1) + 1e-12  # error shrinks with lr


@SETTINGS
@given(st.integers(1, 10), st.integers(1, 4), st.integers(1, 3), st.integers(0, 100))
def test_quadratic_problem_predicted_change_is_actual(B, d, K, seed):
    torch.manual_seed(seed)
    X, Y = torch.randn(B, d, dtype=torch.float64), torch.randn(B, K, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(d, K)).double()
    decay_before = 0.025 * sum(float(p.detach().square().sum()) for p in model.parameters())
    opt = ocnopt.OCNOpt(model, loss="mse", curvature="full", lr=1.0, damping=0.0,
                        weight_decay=0.05, order=2)

    def decay() -> float:  # l(u) = wd/2 |u|^2, part of the objective J
        return 0.025 * sum(float(p.detach().square().sum()) for p in model.parameters())

    J_before = float(opt.step(X, Y)) + decay_before
    actual = opt.last_step.loss_after + decay() - J_before
    assert opt.last_step.predicted_change == pytest.approx(actual, rel=1e-8, abs=1e-11)


# -- identity 7 (docs/method.md section 10) -------------------------------------------------------
@SETTINGS
@given(chains(), st.integers(1, 6), st.booleans())
def test_update_pass_at_zero_lr_reproduces_nominal_states(chain, B, feedback):
    widths, build = chain
    model = build()
    x, y = batch(widths, B, "cross_entropy")
    opt = ocnopt.OCNOpt(model, curvature="full", order=2, lr=0.0, feedback=feedback)
    eng = opt.engine
    traj = eng.nominal(x)
    term = eng.terminal(traj, y, hessian=True)
    seen_dx0 = []
    res = eng.second_order(traj, term, sgd_policy(0.0), lr=0.0, feedback=feedback,
                           need_stats=[False] * len(eng.stages))
    first = next(t for t, p in enumerate(res.policies) if p is not None)
    fb = res.policies[first].feedback
    if feedback and first == 0:  # dx_0 = 0 always: the network input carries no block
        assert fb is None
    elif feedback:
        assert fb is not None

        def spy(dX, fb=fb):
            seen_dx0.append({j: dX[j].clone() for j in fb.blocks})
            return fb(dX)

        res.policies[first].feedback = ocnopt.engine.Feedback(spy, fb.blocks)
    states, loss_after, _ = eng.update_pass(traj, res.policies, y)
    for a, b in zip(states, traj.states):
        assert torch.equal(a, b)
    assert loss_after == float(term.loss)
    for dX in seen_dx0:  # at lr = 0 nothing before the first player moved
        assert all(torch.count_nonzero(d) == 0 for d in dX.values())


# -- the exact backend's budget ------------------------------------------------------------------
def test_exact_backend_refuses_a_stage_over_budget():
    # the network input carries no value block (dx_0 = 0): n_in = 0 at the first stage
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    opt = ocnopt.OCNOpt(model, curvature="full", order=2, memory_budget=2**20)
    with pytest.raises(MemoryBudgetError, match=r"Linear.*MiB.*B=32, n_in=0, n_out=64, m=4160"):
        opt.step(torch.randn(32, 64), torch.randint(0, 10, (32,)))
    assert all(not s for p, s in opt.state.items() if p != "ocnopt")


def test_order2_diagnostics_and_feedback_change_the_step():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = batch([5, 6, 3], 8, "cross_entropy")
    with_fb, without = copy.deepcopy(base), copy.deepcopy(base)
    o1 = ocnopt.OCNOpt(with_fb, curvature="full", order=2, lr=0.5, damping=0.1)
    o2 = ocnopt.OCNOpt(without, curvature="full", order=2, lr=0.5, damping=0.1, feedback=False)
    o1.step(x, y)
    o2.step(x, y)
    # the first stage has dx_0 = 0: same update; later stages differ by the feedback
    torch.testing.assert_close(with_fb[0].weight, without[0].weight, rtol=0, atol=0)
    assert not torch.allclose(with_fb[2].weight, without[2].weight)
    diag = o1.last_step
    assert diag.stages[0].feedback_norm == 0.0 and diag.stages[1].feedback_norm > 0
    assert diag.loss_after is not None and diag.predicted_change < 0


def test_newton_mode_blow_up_is_skipped_not_raised():
    """Newton mode without damping can blow up; decompositions of non-finite value Hessians
    must end in a skipped step, not in an exception, and leave the parameters alone."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    opt = ocnopt.OCNOpt(m, curvature="full", order=2, lr=0.5, damping=0.0, gauss_newton=False)
    with pytest.warns(ocnopt.NonFiniteStepWarning):
        for _ in range(6):
            before = [p.detach().clone() for p in m.parameters()]
            opt.step(x, y)
            if opt.last_step.skipped:
                assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert opt.skipped_steps > 0
    assert all(torch.isfinite(p).all() for p in m.parameters())
