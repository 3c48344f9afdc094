"""The trust bound of the order-2 corrections (``trust``): the feedback part K dx of a stage is
at most ``trust`` |k|, the correction of each sample's V_x at most ``trust`` |Q_x|, and it
keeps order 2 finite where the unbounded recursion diverges."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_batches, tiny_mlp
from hypothesis import given, settings
from hypothesis import strategies as st

import ocnopt
from ocnopt.curvature.base import Solver
from ocnopt.engine import bound_correction

SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 7), st.floats(1e-3, 10.0), st.floats(1e-3, 1e3),
       st.integers(0, 2**16))
def test_bound_correction_scales_each_sample_onto_the_bound(B, n, trust, size, seed):
    """Per sample: unchanged inside the bound; otherwise the same direction, shortened to
    exactly trust |Q_x| (an independent per-sample computation)."""
    g = torch.Generator().manual_seed(seed)
    Q_x = torch.randn(B, n, 2, generator=g, dtype=torch.float64)
    V_x = Q_x + size * torch.randn(B, n, 2, generator=g, dtype=torch.float64)
    out = bound_correction(Q_x, V_x, trust)
    for i in range(B):
        d, q = (V_x[i] - Q_x[i]).flatten(), Q_x[i].flatten()
        limit = trust * q.norm()
        expected = Q_x[i] + (V_x[i] - Q_x[i]) * min(1.0, float(limit / d.norm()))
        torch.testing.assert_close(out[i], expected, rtol=1e-12, atol=1e-12)
        assert float((out[i] - Q_x[i]).norm()) <= float(limit) * (1 + 1e-12) + 1e-15


def test_bound_correction_keeps_zero_corrections_and_zero_gradients():
    Q_x = torch.zeros(3, 4)
    V_x = torch.zeros(3, 4)
    V_x[1] = 1.0  # a correction where Q_x = 0 is cut to 0
    out = bound_correction(Q_x, V_x, 0.5)
    assert torch.equal(out, torch.zeros(3, 4))


@pytest.mark.parametrize("backend", ["autograd", "lowrank"])
def test_update_pass_feedback_is_at_most_trust_times_the_open_loop_step(backend):
    """At a large lr the unbounded feedback is larger than trust |k| on some stage; with the
    bound every stage's |K dx| <= trust |k| (the diagnostics of last_step)."""
    trust = 0.05
    ratios, scales, cut = {}, {}, {}
    for bound in (None, trust):
        model = tiny_mlp(seed=3, dtype=torch.float64, hidden=8)
        opt = ocnopt.OCNOpt(model, curvature="sgd", lr=2.0, order=2, backend=backend,
                            trust=bound)
        worst, scales[bound], cut[bound] = 0.0, [], []
        for x, y in tiny_batches(4, dtype=torch.float64, batch=16):
            opt.step(x, y)
            for s in opt.last_step.stages:
                if s.k_norm > 0:
                    worst = max(worst, s.feedback_norm / s.k_norm)
                scales[bound].append(s.feedback_scale)
                cut[bound].append(s.value_bounded)
        ratios[bound] = worst
    assert ratios[None] > trust  # the bound is active in this test
    assert ratios[trust] <= trust * (1 + 1e-9)
    # diagnostics: the factor applied to K dx and the share of samples whose V_x was cut
    assert set(scales[None]) == {1.0} and set(cut[None]) == {0.0}
    assert min(scales[trust]) < 1.0 and all(0.0 <= c <= 1.0 for c in scales[trust])
    assert 0.0 < max(cut[trust]) <= 1.0


def test_value_correction_in_the_backward_pass_is_bounded_per_sample():
    """engine.second_order(trust=...) returns V_x = bound_correction(Q_x, V_x unbounded) at the
    last stage (the first corrected one; further upstream the inputs differ)."""
    model = tiny_mlp(seed=1, dtype=torch.float64, hidden=5)
    opt = ocnopt.OCNOpt(model, curvature="sgd", lr=3.0, order=2, backend="autograd")
    x, y = tiny_batches(1, dtype=torch.float64, batch=6)[0]
    eng = opt.engine
    T = len(eng.stages)
    results = {}
    for trust in (None, 0.1):
        traj = eng.nominal(x, input_value=True)
        term = eng.terminal(traj, y)

        def policy(stage, Q_u, stats):
            states = [opt.state[p] for p in stage.params]
            return [-3.0 * g for g in Q_u], Solver(opt.model_, stage, states, opt.param_groups[0])

        results[trust] = eng.second_order(traj, term, policy, lr=3.0, keep=True, trust=trust,
                                          need_stats=[False] * T, targets=y)
    Q_x = results[None].expansions[T - 1].Q_x
    unbounded, bounded = results[None].V_x[T - 1], results[0.1].V_x[T - 1]
    assert not torch.allclose(unbounded, bounded)  # the bound is active here
    torch.testing.assert_close(bounded, bound_correction(Q_x, unbounded, 0.1))
    corr = (bounded - Q_x).flatten(1).norm(dim=1)
    assert bool((corr <= 0.1 * Q_x.flatten(1).norm(dim=1) * (1 + 1e-12)).all())
    # the reported share of cut samples, counted independently
    over = (unbounded - Q_x).flatten(1).norm(dim=1) > 0.1 * Q_x.flatten(1).norm(dim=1)
    assert float(results[0.1].value_bounded[T - 1]) == float(over.double().mean()) > 0
    assert results[None].value_bounded[T - 1] is None


def test_trust_bound_keeps_order_two_finite_where_it_diverged():
    """Regression (issue 4): digits-fcn, lowrank kfac order 2 at lr 0.1, B 32, 60 steps. The
    unbounded recursion reached losses of 1e5 here (docs/method.md, "Trust bound"); the
    default bound trains."""
    from ocnopt.bench.problems import get_problem, load

    problem = get_problem("digits-fcn")
    data = load(problem)
    opt = ocnopt.OCNOpt(problem.model(0), curvature="kfac", backend="lowrank", order=2, lr=0.1)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        idx = torch.randint(0, len(data.y_fit), (32,), generator=g)
        losses.append(float(opt.step(data.X_fit[idx], data.y_fit[idx])))
    assert opt.skipped_steps == 0
    assert max(losses) < 5.0
    assert sum(losses[-10:]) / 10 < 0.5 < losses[0]


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, True, "0.5"])
def test_invalid_trust_is_refused_with_its_value(bad):
    with pytest.raises(ValueError, match=r"trust=.*accepted a finite number > 0 or None"):
        ocnopt.OCNOpt(tiny_mlp(), order=2, trust=bad)


def test_trust_is_a_param_group_hyperparameter_saved_with_the_state():
    model = tiny_mlp()
    opt = ocnopt.OCNOpt(model, order=2, trust=0.25)
    assert opt.param_groups[0]["trust"] == 0.25
    opt.param_groups[0]["trust"] = None  # schedulable / switchable like lr
    state = opt.state_dict()
    other = ocnopt.OCNOpt(tiny_mlp(), order=2)
    other.load_state_dict(state)
    assert other.param_groups[0]["trust"] is None


@pytest.mark.parametrize("fb_value, k_value, expected", [
    (0.0, 1.0, 1.0),            # K dx = 0: nothing to cut (|k| / 0 = inf -> 1)
    (0.0, 0.0, 1.0),            # K dx = 0 and k = 0: 0 / 0 -> 1, not nan
    (3.0, 1.0, 0.5 / 3.0),      # |K dx| = 3 > trust |k| = 0.5 (one entry): scaled onto it
    (0.1, 1.0, 1.0),            # inside the bound
])
def test_update_pass_trust_factor_min_one_trust_k_over_feedback(fb_value, k_value, expected):
    """The update pass moves u by k + s K dx with s = min(1, trust |k| / |K dx|), and s = 1
    where K dx = 0 (also for k = 0), on a hand-made policy of the first Linear layer."""
    from ocnopt.engine import Feedback, Policy

    model = tiny_mlp(seed=0, dtype=torch.float64, hidden=4)
    opt = ocnopt.OCNOpt(model, curvature="sgd", lr=0.1, order=2, backend="lowrank")
    eng = opt.engine
    x, y = tiny_batches(1, dtype=torch.float64, batch=4)[0]
    traj = eng.nominal(x)
    t = next(i for i, st in enumerate(eng.stages) if st.has_control)
    stage = eng.stages[t]
    before = [p.detach().clone() for p in stage.params]
    k = [torch.zeros_like(p) for p in stage.params]
    k[0].view(-1)[0] = k_value
    fb = [torch.zeros_like(p) for p in stage.params]
    fb[0].view(-1)[0] = fb_value
    policy = Policy(k=k, feedback=Feedback(lambda dX: fb, [stage.inputs[0]]))
    policies = [policy if i == t else None for i in range(len(eng.stages))]
    _, _, norms = eng.update_pass(traj, policies, y, trust=0.5)
    assert float(policy.feedback_scale) == pytest.approx(expected, rel=1e-15)
    assert norms[0] == pytest.approx(fb_value * expected, rel=1e-15)
    for p, b, kk, f in zip(stage.params, before, k, fb):
        torch.testing.assert_close(p.detach(), b + kk + expected * f, rtol=0, atol=1e-15)
