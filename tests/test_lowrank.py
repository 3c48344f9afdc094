"""The low-rank Gauss-Newton backend: identity 5 of docs/method.md section 10, the rank-1
feedback identity, identities 1 and 2."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import grad, vmap

import ocnopt
from ocnopt.curvature.base import Solver

SETTINGS = settings(max_examples=10, deadline=None)
ACTS = [nn.Tanh, nn.Sigmoid, nn.ReLU, nn.GELU, nn.SiLU]


@st.composite
def chains(draw, conv=False):
    depth = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 5)) for _ in range(depth + 1)]
    widths[-1] = max(widths[-1], 2)
    acts = [draw(st.sampled_from(ACTS)) for _ in range(depth)]
    seed = draw(st.integers(0, 2**16))
    use_conv = conv and draw(st.booleans())

    def build():
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        if use_conv:
            layers += [nn.Conv1d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(),
                       nn.Linear(2 * widths[0], widths[0])]
        for i in range(depth):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < depth - 1:
                layers.append(acts[i]())
        return nn.Sequential(*layers).double()

    return widths, use_conv, build


def batch(widths, use_conv, B, loss, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, 1, widths[0]) if use_conv else (B, widths[0])
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if loss == "mse":
        return x, torch.randn(B, widths[-1], generator=g, dtype=torch.float64)
    return x, torch.randint(0, widths[-1], (B,), generator=g)


CURVATURES = [("sgd", {}), ("adam", {}), ("rmsprop", {"alpha": 0.9}),
              ("kfac", {"damping": 1.0, "fisher_type": "type-2"}),
              ("ekfac", {"damping": 1.0, "fisher_type": "type-2"})]


# Identity 5 (docs/method.md section 10) holds where no clipping happens: the two backends clip
# different matrices (C C^T vs V_xx) when I - (lr/B) W^T M^-1 W is indefinite. A small lr keeps
# it definite, and so does an eps that bounds Adam's and RMSprop's M^-1 <= 1/eps (with eps 1e-8,
# a weight whose second moment is still 0, e.g. behind a ReLU that was dead on every earlier
# batch, has M^-1 = 1e8).
# shampoo: matrix_eps bounds M^-1 as eps does for Adam (its inverse roots of eps I + a rank-one
# factor reach eps^(-1/2)). soap is not here: its bases inside the null space of a rank-deficient
# factor (one of a non-square weight's two always is) are picked by rounding, and the two
# backends' gradients differ by rounding (docs/method.md, soap)
CURVATURES_85 = [("sgd", {}), ("adam", {"eps": 0.1}), ("rmsprop", {"alpha": 0.9, "eps": 0.1}),
                 CURVATURES[3], CURVATURES[4], ("shampoo", {"matrix_eps": 1e-2})]


@SETTINGS
@given(chains(conv=True), st.integers(1, 6), st.sampled_from(CURVATURES_85),
       st.sampled_from(["cross_entropy", "mse"]))
def test_full_rank_exact_factor_equals_exact_gauss_newton_backend(chain, B, curv, loss):
    """Identity 5 (docs/method.md section 10): lowrank with the exact terminal factor
    (r = outputs) and the exact backend under Gauss-Newton give the same steps, losses after,
    predicted changes and V_xx (see CURVATURES_85 for the no-clipping condition)."""
    widths, use_conv, build = chain
    name, hp = curv
    if name == "ekfac":  # more samples than factor rows (<= 10 here): full-rank factors, else
        B += 10  # the eigenvalue correction depends on the basis chosen in the null space
    m1, m2 = build(), build()
    kw = dict(loss=loss, curvature=name, lr=1e-3, order=2, **hp)
    exact = ocnopt.OCNOpt(m1, backend="autograd", psd_clip=False, **kw)
    low = ocnopt.OCNOpt(m2, backend="lowrank", backend_options={"terminal": "exact"}, **kw)
    for s in range(2):
        x, y = batch(widths, use_conv, B, loss, seed=s)
        exact.step(x, y)
        low.step(x, y)
        assert low.last_step.loss_after == pytest.approx(exact.last_step.loss_after, rel=1e-10)
        assert low.last_step.predicted_change == pytest.approx(
            exact.last_step.predicted_change, rel=1e-8, abs=1e-14)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    # the value Hessians of the backward pass, stage by stage
    x, y = batch(widths, use_conv, B, loss, seed=5)
    passes = []
    for opt in (exact, low):
        eng = opt.engine
        traj = eng.nominal(x, input_value=True)
        term = eng.terminal(traj, y)

        def policy(stage, Q_u, stats, opt=opt):
            states = [opt.state[p] for p in stage.params]
            return [-1e-3 * g for g in Q_u], Solver(opt.model_, stage, states, opt.param_groups[0])

        passes.append(eng.second_order(traj, term, policy, lr=1e-3, clip=False, keep=True,
                                       need_stats=[False] * len(eng.stages), targets=y))
    for Va, Vb in zip(passes[0].V_xx, passes[1].V_xx):
        torch.testing.assert_close(Va, Vb, rtol=1e-9, atol=1e-11)
    for Va, Vb in zip(passes[0].V_x, passes[1].V_x):
        torch.testing.assert_close(Va, Vb, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(chains(), st.integers(1, 8), st.sampled_from(CURVATURES[:3] + [("kfac", {"damping": 1.0}),
                                                                  ("shampoo", {})]))
def test_rank_one_feedback_is_the_mean_of_per_sample_q_ux_dx(chain, B, curv):
    """K dx = -lr M^-1 (1/B) sum_i Q_ux^(i) dx^(i) with Q_ux^(i) = w_i a_i^T, w_i the
    per-sample gradient of <Z'_i, f(x_i, u)> (torch.func.vmap), a_i = f_x^T Z'_i."""
    widths, _, build = chain
    model = build()
    name, hp = curv
    lr = 0.1
    opt = ocnopt.OCNOpt(model, curvature=name, lr=lr, order=2, backend="lowrank", **hp)
    x, y = batch(widths, False, B, "cross_entropy")
    opt.step(x, y)  # curvature state
    eng = opt.engine
    traj = eng.nominal(x, input_value=True)
    term = eng.terminal(traj, y)
    solvers = {}

    def policy(stage, Q_u, stats):
        states = [opt.state[p] for p in stage.params]
        solvers[stage.index] = Solver(opt.model_, stage, states, opt.param_groups[0])
        return [-lr * g for g in Q_u], solvers[stage.index]

    res = eng.second_order(traj, term, policy, lr=lr, keep=True,
                           need_stats=[False] * len(eng.stages), targets=y)
    gen = torch.Generator().manual_seed(1)
    for t, stage in enumerate(eng.stages):
        if not stage.has_control or t == 0:
            continue
        exp = res.expansions[t]
        Zn = exp.next_value.Z[:, 0]  # r = 1: the propagated value gradient
        xt = traj.states[t]
        dx = torch.randn(xt.shape, generator=gen, dtype=xt.dtype)
        params = tuple(p.detach() for p in stage.params)

        def psi(ps, xi, zi, stage=stage):
            out = stage.functional(dict(zip(stage.param_names, ps)), xi.unsqueeze(0))
            return (out.squeeze(0) * zi).sum()

        W = vmap(grad(psi), in_dims=(None, 0, 0))(params, xt, Zn)    # per-sample w_i
        a = exp.a[:, 0]                                             # a_i = f_x^T z_i
        s = (a * dx).flatten(1).sum(1)                              # s_i = a_i^T dx_i
        mean = [(w * s.view(-1, *[1] * (w.dim() - 1))).mean(0) for w in W]
        expected = [-lr * v for v in solvers[t](mean)]
        got = res.policies[t].feedback(dx)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("curv", ["sgd", "adam", "kfac", "ekfac"])
def test_lowrank_first_order_and_switched_off_order2_are_autograd_order1(curv):
    """Identities 1 (order 1 is backprop whatever the backend) and 2 of docs/method.md
    section 10 for the lowrank backend."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    ms = [copy.deepcopy(base) for _ in range(3)]
    opts = [ocnopt.OCNOpt(ms[0], curvature=curv, lr=0.05),
            ocnopt.OCNOpt(ms[1], curvature=curv, lr=0.05, backend="lowrank"),
            ocnopt.OCNOpt(ms[2], curvature=curv, lr=0.05, backend="lowrank", order=2,
                          feedback=False, value_correction=False)]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
        for o in opts:
            o.step(x, y)
    for a, b, c in zip(*(m.parameters() for m in ms)):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_lowrank_order2_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = ocnopt.OCNOpt(model, curvature="kfac", lr=0.2, order=2, backend="lowrank", damping=0.1)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    first = float(opt.step(x, y))
    for _ in range(30):
        opt.step(x, y)
    assert opt.last_step.loss_after < 0.5 * first
    assert any(s.feedback_norm > 0 for s in opt.last_step.stages)


@pytest.mark.parametrize("kw, match", [
    (dict(gauss_newton=False), "gauss_newton=False"),
    (dict(mu=0.1), "invalid mu=0.1"),
    (dict(curvature="full"), "curvature 'full'"),
    (dict(backend_options={"terminal": "hessian"}), "invalid terminal='hessian'"),
    (dict(backend_options={"mc_samples": 0}), "invalid mc_samples=0"),
    (dict(backend_options={"memory_budget": 10}), "invalid backend option"),
])
def test_lowrank_refuses_what_it_cannot_represent(kw, match):
    model = nn.Sequential(nn.Linear(3, 2))
    args = dict(curvature="adam", order=2, backend="lowrank") | kw
    with pytest.raises((ValueError, TypeError), match=match):
        ocnopt.OCNOpt(model, **args)


def test_mc_terminal_factor_has_the_requested_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = ocnopt.OCNOpt(model, curvature="sgd", lr=0.1, order=2, backend="lowrank",
                        backend_options={"terminal": "mc", "mc_samples": 4})
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    traj = opt.engine.nominal(x)
    term = opt.engine.terminal(traj, y)
    value = opt.backend.terminal_value(opt.loss_fn, traj, term, targets=y, generator=opt.generator)
    assert value.Z.shape == (6, 4, 3)
    # each sampled column is p - e_y, scaled by 1/sqrt(4): its entries sum to zero
    torch.testing.assert_close(value.Z.sum(-1), torch.zeros(6, 4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(7, 5), (7, 3, 5)])
def test_kfac_solve_on_rows_equals_solving_the_formed_gradient(shape):
    """The feedback's closed form (g G^-1)^T (a A^-1) equals G^-1 (g^T a) A^-1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4)).double()
    opt = ocnopt.OCNOpt(model, curvature="kfac", loss="mse", damping=0.3)
    x = torch.randn(*shape, dtype=torch.float64)
    opt.step(x, torch.randn(*shape[:-1], 4, dtype=torch.float64))
    stage = opt.stages[0]
    solver = Solver(opt.model_, stage, [opt.state[p] for p in stage.params], opt.param_groups[0])
    cot = torch.randn(*shape[:-1], 4, dtype=torch.float64)
    d = stage.derivatives
    got = solver.solve_rows(d.kfac_input(stage.module, x), d.kfac_output(stage.module, cot[:, None])[:, 0])
    grads = [torch.einsum("...o,...i->oi", cot, x), cot.reshape(-1, 4).sum(0)]
    for g, e in zip(got, solver(grads)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(chains(conv=True), st.integers(1, 6), st.sampled_from(
    CURVATURES[:3] + [("kfac", {"damping": 0.5})]), st.sampled_from([None, 0.5]))
def test_parallel_factor_shortcut_equals_the_column_vjps(chain, B, curv, trust):
    """Empirical terminal, r = 1: Z = rho V_x per sample along the whole recursion, so
    a = rho' Q_x and Z' G^-1 = rho' (g G^-1) replace the VJPs f_x^T Z' and the products Z' G^-1,
    and the value update and its trust bound are per-sample scalars. Same steps, losses after
    and predicted changes as the general path (rho unknown: parallel_ratio -> None)."""
    import ocnopt.backends.lowrank as lowrank

    widths, use_conv, build = chain
    name, hp = curv
    models, opts = [build(), build()], []
    for m in models:
        # without the bound a large step can bring 1 + kappa near 0, where Q_x + a W^T k
        # cancels and the general path loses the digits the scalar path keeps: small lr there
        opts.append(ocnopt.OCNOpt(m, curvature=name, lr=0.05 if trust else 0.005, order=2,
                                  backend="lowrank", trust=trust, **hp))
    calls = {"vjp": 0}
    original_vjp, original_ratio = lowrank.LowRankBackend._vjp_columns, lowrank.parallel_ratio

    def counting_vjp(*args):
        calls["vjp"] += 1
        return original_vjp(*args)

    for s in range(3):
        x, y = batch(widths, use_conv, B, "cross_entropy", seed=s)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lowrank.LowRankBackend, "_vjp_columns", staticmethod(counting_vjp))
            opts[0].step(x, y)
            shortcut_vjps = calls["vjp"]
            mp.setattr(lowrank, "parallel_ratio", lambda value: None)
            opts[1].step(x, y)
        assert shortcut_vjps == 0 < calls["vjp"] or len(widths) == 2  # one stage: no VJP at all
        calls["vjp"] = 0
        a, b = opts[0].last_step, opts[1].last_step
        # the same quantities rounded differently (Q_x (1 + kappa) vs Q_x + a W^T k). Not
        # ekfac here: with these tiny batches its factors are rank-deficient, and its eigenvalue
        # correction depends on the basis an eigensolver picks inside the null space, which
        # rounding-level differences change (docs/method.md, "Devices")
        assert a.loss_after == pytest.approx(b.loss_after, rel=1e-8)
        assert a.predicted_change == pytest.approx(b.predicted_change, rel=1e-8, abs=1e-14)
    assert lowrank.parallel_ratio is original_ratio
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_closed_form_first_order_is_autograds_backward_bit_for_bit(dtype):
    """Order 2 forms f_x^T V' and Qbar_u of Linear (on vectors, with and without bias), ReLU
    and Tanh steps without the autograd engine: the same bits as the engine's VJP on the kept
    graph piece (GraphBackend.first_order); a module with a hook goes through the engine."""
    from ocnopt.backends.lowrank import _closed_first_order

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 9, bias=False), nn.Tanh(),
                          nn.Linear(9, 4)).to(dtype)
    opt = ocnopt.OCNOpt(model, lr=0.1, order=2, backend="lowrank")
    eng = opt.engine
    x = torch.randn(6, 7, dtype=dtype)
    traj = eng.nominal(x)
    g = torch.Generator().manual_seed(1)
    for stage in eng.stages:
        out = traj.handles[stage.index][1]
        V = torch.randn(out.shape, generator=g, dtype=dtype)
        closed = _closed_first_order(stage, traj, V, 6, control=True)
        assert closed is not None
        ref = eng.backend.first_order(stage, traj.handles[stage.index], V, 6, retain=True)
        for a, b in zip(closed[0], ref[0]):
            assert (a is None and b is None) or torch.equal(a, b)
        assert len(closed[1]) == len(ref[1]) and all(map(torch.equal, closed[1], ref[1]))
    handle = model[2].register_forward_hook(lambda m, i, o: 2 * o)
    try:
        stage = eng.stages[2]
        assert _closed_first_order(stage, traj, torch.zeros(6, 9, dtype=dtype), 6,
                                   control=True) is None
    finally:
        handle.remove()
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    parametrize.register_parametrization(model[4], "weight", Double())
    assert _closed_first_order(eng.stages[4], traj, torch.zeros(6, 4, dtype=dtype), 6,
                               control=True) is None
