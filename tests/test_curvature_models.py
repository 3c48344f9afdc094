"""Curvature models alone (optax-style: explicit state, pure updates): refresh periods,
running averages, damping schedules and the float64 fallback of factor decompositions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ocnopt
from ocnopt.curvature import CurvatureWarning, ekfac, kfac


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (6,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("name, module, broken", [("kfac", kfac, "damped_inverse"),
                                                  ("ekfac", ekfac, "eigh64")])
def test_failed_decomposition_keeps_the_previous_one_and_warns(name, module, broken, monkeypatch):
    model = tiny()
    opt = ocnopt.OCNOpt(model, curvature=name, inv_every=1, damping=0.1, lr=0.1)
    data = batches(3)
    opt.step(*data[0])
    head = opt.state[opt.stages[0].params[0]]
    keys = ("A_inv", "G_inv") if name == "kfac" else ("QA", "QG")
    before = {k: head[k].clone() for k in keys}
    monkeypatch.setattr(module, broken, lambda *args: None)
    with pytest.warns(CurvatureWarning, match="keeping the previous"):
        opt.step(*data[1])
    head = opt.state[opt.stages[0].params[0]]
    for k in keys:
        assert torch.equal(head[k], before[k])
    assert opt.step_count == 2


def test_kfac_refresh_periods_and_running_average():
    """Statistics every stat_every steps (EMA with stat_decay, first estimate as is),
    inverses every inv_every steps, computed with the damping of that step."""
    model = tiny()
    damping = lambda k: 0.1 * (k + 1)  # noqa: E731
    opt = ocnopt.OCNOpt(model, curvature="kfac", stat_every=2, inv_every=3, stat_decay=0.5,
                        damping=damping, lr=0.0)
    w = opt.stages[0].params[0]
    seen_A, inverses = [], []
    for k, (x, y) in enumerate(batches(7)):
        opt.step(x, y)
        A_batch = (x.T @ x) / x.shape[0]
        if k % 2 == 0:
            seen_A.append(A_batch)
        expected = seen_A[0]
        for a in seen_A[1:]:
            expected = 0.5 * expected + 0.5 * a
        torch.testing.assert_close(opt.state[w]["A"], expected, rtol=1e-12, atol=1e-14)
        inverses.append(opt.state[w]["A_inv"].clone())
    for k in range(1, 7):
        changed = not torch.equal(inverses[k], inverses[k - 1])
        assert changed == (k % 3 == 0), k
    # the inverse at step 6 uses the damping of step 6 and the factor then
    A6 = opt.state[w]["A"]
    torch.testing.assert_close(inverses[6], torch.linalg.inv(A6 + 0.7 * torch.eye(4, dtype=A6.dtype)),
                               rtol=1e-9, atol=1e-12)


def test_curvature_models_are_pure():
    """update never mutates the state it is given (the non-finite guard relies on it)."""
    for name, cls in ocnopt.CURVATURES.items():
        if name == "full":
            continue
        model = tiny()
        opt = ocnopt.OCNOpt(model, curvature=name, lr=0.1)
        x, y = batches(1)[0]
        opt.step(x, y)
        st = opt.stages[0]
        states = [opt.state[p] for p in st.params]
        frozen = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                  for s in states]
        grads = [torch.randn_like(p) for p in st.params]
        stats = None
        if cls.needs_kronecker:
            from ocnopt.curvature.base import StageStatistics
            stats = StageStatistics(a=torch.randn(6, 1, 4, dtype=torch.float64),
                                    g=torch.randn(6, 1, 1, 5, dtype=torch.float64))
        cls().update(st, states, grads, list(st.params), stats, opt.param_groups[0], 1)
        for s, f in zip(states, frozen):
            for k, v in f.items():
                assert (torch.equal(s[k], v) if isinstance(v, torch.Tensor) else s[k] == v), (name, k)


def test_full_model_flips_and_floors_indefinite_q_uu():
    from ocnopt.curvature.full import floored_inverse

    M = torch.diag(torch.tensor([2.0, -1.0, 0.5, 1e-3], dtype=torch.float64))
    used, inv = floored_inverse(M, damping=0.0, eig_floor=0.1)
    # |eigenvalues|, floored at 0.1 * max|lambda| = 0.2
    torch.testing.assert_close(torch.linalg.eigvalsh(used),
                               torch.tensor([0.2, 0.5, 1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(inv @ used, torch.eye(4, dtype=torch.float64))


def test_damped_inverse_cholesky_and_fallback_agree():
    torch.manual_seed(0)
    X = torch.randn(20, 6, dtype=torch.float64)
    M = X.T @ X / 20
    inv = kfac.damped_inverse(M, 0.1)
    torch.testing.assert_close(inv, torch.linalg.inv(M + 0.1 * torch.eye(6, dtype=M.dtype)))
    # an indefinite factor (rounding can make one) goes through the eigen-decomposition:
    # negative eigenvalues are clipped to 0 before damping
    N = torch.diag(torch.tensor([1.0, -0.5], dtype=torch.float64))
    torch.testing.assert_close(kfac.damped_inverse(N, 0.1),
                               torch.diag(torch.tensor([1 / 1.1, 1 / 0.1], dtype=torch.float64)))


def test_damped_inverse_in_the_factor_dtype():
    """``inv_dtype="factor"``: the Cholesky inverse of a float32 factor in float32 (not the
    float64 one rounded, and within float32 accuracy of it: the condition number here is
    below 100), a float32 factor that is not positive definite redone in float64 (its
    eigen-decomposition, negative eigenvalues clipped), a float64 factor unchanged."""
    torch.manual_seed(0)
    X = torch.randn(200, 48)
    M = X.T @ X / 200
    ref = torch.linalg.inv(M.double() + 0.1 * torch.eye(48, dtype=torch.float64))
    inv32 = kfac.damped_inverse(M, 0.1, "factor")
    inv64 = kfac.damped_inverse(M, 0.1)
    assert inv32.dtype == inv64.dtype == torch.float32
    assert not torch.equal(inv32, inv64)
    assert float((inv32.double() - ref).abs().max() / ref.abs().max()) < 1e-5
    N = torch.diag(torch.tensor([1.0, -0.5]))
    assert torch.equal(kfac.damped_inverse(N, 0.1, "factor"), kfac.damped_inverse(N, 0.1))
    M64 = M.double()
    assert torch.equal(kfac.damped_inverse(M64, 0.1, "factor"), kfac.damped_inverse(M64, 0.1))


def test_inv_dtype_is_checked_and_kfac_only():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"invalid inv_dtype='float16': accepted one of "
                                         r"\('float64', 'factor'\)"):
        ocnopt.OCNOpt(model, curvature="kfac", inv_dtype="float16")
    with pytest.raises(TypeError, match=r"unknown hyper-parameter\(s\) \['inv_dtype'\] for "
                                        r"curvature 'ekfac'"):
        ocnopt.OCNOpt(model, curvature="ekfac", inv_dtype="factor")
    assert ocnopt.OCNOpt(model, curvature="kfac").param_groups[0]["inv_dtype"] == "float64"


# -- K-FAC direction from the statistics' rows (small batch, wide layers) --------------------
def _wide(kind: str) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3))
        x = torch.randn(2, 20, generator=g)
    else:  # one output position: P = 1, d_in = 8 * 5
        model = nn.Sequential(nn.Conv1d(8, 12, 5), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
        x = torch.randn(2, 8, 5, generator=g)
    return model.double(), x.double(), torch.randint(0, 3, (2,), generator=g)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_kfac_direction_from_rows_equals_dense_preconditioning(kind):
    """(g G^-1)^T (a A^-1) / B = G^-1 Qbar_u A^-1 with Qbar_u from autograd, and a A^-1 is
    left in the statistics for the Gram matrices."""
    model, x, y = _wide(kind)
    opt = ocnopt.OCNOpt(model, curvature="kfac", lr=0.1, damping=0.3)
    opt.step(x, y)  # factors and inverses
    eng = opt.engine
    traj = eng.nominal(x)
    term = eng.terminal(traj, y)
    exps, _ = eng.expand(traj, term, need_stats=[st.has_control for st in eng.stages])
    hp = opt.param_groups[0]
    stage, exp = eng.stages[0], exps[0]
    st = opt.state[stage.params[0]]
    rows = kfac.KFAC._direction_from_rows(stage, st, exp.stats, hp)
    assert rows is not None  # B P (d_in^2 + d_out^2 + d_in d_out) < d_in d_out (d_in + d_out)
    dense = kfac.KFAC().precondition(stage, st, exp.Q_u)
    for r, d in zip(rows, dense):
        torch.testing.assert_close(r, d, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(exp.stats.aA, exp.stats.a @ st["A_inv"], rtol=1e-12, atol=0)
    # a batch of 64: the dense products are cheaper, no rows direction
    big = eng.nominal(x.repeat(32, *[1] * (x.dim() - 1)))
    exps, _ = eng.expand(big, eng.terminal(big, y.repeat(32)),
                         need_stats=[st.has_control for st in eng.stages])
    assert kfac.KFAC._direction_from_rows(stage, st, exps[0].stats, hp) is None


def test_kfac_direction_from_rows_only_for_gradient_rows_without_weight_decay():
    model, x, y = _wide("linear")
    for kw in ({"weight_decay": 1e-3}, {"fisher_type": "type-2"}):
        opt = ocnopt.OCNOpt(model, curvature="kfac", lr=0.1, **kw)
        opt.step(x, y)
        eng = opt.engine
        traj = eng.nominal(x)
        term = eng.terminal(traj, y, fisher_type=kw.get("fisher_type"))
        exps, _ = eng.expand(traj, term, need_stats=[st.has_control for st in eng.stages])
        stage = eng.stages[0]
        assert kfac.KFAC._direction_from_rows(stage, opt.state[stage.params[0]], exps[0].stats,
                                              opt.param_groups[0]) is None
    assert ekfac.EKFAC._direction_from_rows(stage, {}, exps[0].stats, {}) is None


# -- closed-form per-sample Gram matrices and the cached feedback, against explicit gradients --
GRAM_CASES = {
    # (module, input shape, path the cost rule takes)
    "linear": (lambda: nn.Linear(6, 4), (6,), "rows"),
    "linear-no-bias": (lambda: nn.Linear(6, 4, bias=False), (6,), "rows"),
    "conv1d-one-position": (lambda: nn.Conv1d(2, 3, 3), (2, 3), "rows"),
    "conv2d-many-positions": (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 4, 4), "grads"),
    "conv2d-no-bias": (lambda: nn.Conv2d(2, 3, 3, padding=1, bias=False), (2, 4, 4), "grads"),
}


@pytest.mark.parametrize("curvature", ["kfac", "sgd", "rmsprop", "adam"])
@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("case", sorted(GRAM_CASES))
def test_per_sample_gram_and_cached_feedback_equal_explicit_per_sample_gradients(case, r,
                                                                                 curvature):
    """S[i, c, d] = w_ic^T M^-1 w_id (every closed form) and, for K-FAC, M^-1 sum_ic s_ic w_ic
    from the cached products, with w_ic the gradient of <Z_ic, f(x_i, u)> (torch.func.vmap)
    and M^-1 the curvature model's solve with the optimizer's state."""
    from torch.func import grad, vmap

    build, shape, path = GRAM_CASES[case]
    torch.manual_seed(0)
    module = build().double()
    model = nn.Sequential(module)
    g = torch.Generator().manual_seed(2)
    B = 5
    x = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    hp = {"damping": 0.2} if curvature == "kfac" else {}
    opt = ocnopt.OCNOpt(model, loss=lambda out, y: out.flatten(1).square().sum(1),
                        curvature=curvature, lr=0.1, **hp)
    opt.step(x, torch.zeros(B))  # factors and inverses
    stage = opt.stages[0]
    states = [opt.state[p] for p in stage.params]
    out_shape = module(x).shape[1:]
    Z = torch.randn(B, r, *out_shape, generator=g, dtype=torch.float64)
    d = stage.derivatives
    a_rows, g_rows = d.kfac_input(module, x), d.kfac_output(module, Z)
    cache: dict = {}
    if curvature == "kfac":
        S = opt.model_.per_sample_gram(stage, states, opt.param_groups[0], a_rows, g_rows, cache)
        assert ("grads" if path == "grads" else "rows") in cache
    else:
        S = opt.model_.per_sample_gram(stage, states, opt.param_groups[0], a_rows, g_rows)

    params = tuple(p.detach() for p in stage.params)

    def psi(ps, xi, zi):
        return (stage.functional(dict(zip(stage.param_names, ps)), xi.unsqueeze(0))[0] * zi).sum()

    w = vmap(vmap(grad(psi), in_dims=(None, None, 0)), in_dims=(None, 0, 0))(params, x, Z)
    Mw = opt.model_.solve(stage, states, list(w), opt.param_groups[0])
    S_ref = sum(torch.einsum("bc...,bd...->bcd", wi, mi) for wi, mi in zip(w, Mw))
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-12)

    if curvature != "kfac":
        return
    s = torch.randn(B, r, generator=g, dtype=torch.float64)
    fb = opt.model_.cached_feedback(stage, states, cache, s)
    ref = opt.model_.solve(stage, states, [torch.einsum("bc,bc...->...", s, wi) for wi in w],
                           opt.param_groups[0])
    for f, e in zip(fb, ref):
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("order, backend, momentum", [
    (1, "autograd", 0.0), (1, "autograd", 0.9), (1, "lowrank", 0.0), (2, "lowrank", 0.0),
    (2, "lowrank", 0.9), (2, "backpack", 0.0)])
def test_skipping_the_unused_dense_gradient_changes_no_step(order, backend, momentum,
                                                            monkeypatch):
    """Where K-FAC's direction comes from the rows, Qbar_u is not formed; the steps, losses
    after and predicted changes equal those of a run that forms it (gradient_unused -> False)."""
    runs = []
    for skip in (True, False):
        model, x, y = _wide("linear")
        with monkeypatch.context() as mp:
            if not skip:
                mp.setattr(kfac.KFAC, "gradient_unused", lambda self, *a, **k: False)
            opt = ocnopt.OCNOpt(model, curvature="kfac", lr=0.1, damping=0.3, order=order,
                                backend=backend, momentum=momentum, track_loss_after=True,
                                set_grad=False)  # set_grad=True forms Qbar_u for .grad
            losses = []
            for _ in range(3):
                opt.step(x, y)
                losses.append((opt.last_step.loss_after, opt.last_step.predicted_change))
        runs.append((model, losses))
    (m1, l1), (m2, l2) = runs
    for (a1, p1), (a2, p2) in zip(l1, l2):
        assert a1 == pytest.approx(a2, rel=1e-12)
        if p1 is not None:
            assert p1 == pytest.approx(p2, rel=1e-10)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("set_grad", [False, True])
def test_the_dense_gradient_is_not_formed_where_the_rows_give_the_direction(set_grad, monkeypatch):
    """Only with set_grad=False: .grad needs Qbar_u formed."""
    model, x, y = _wide("linear")
    opt = ocnopt.OCNOpt(model, curvature="kfac", lr=0.1, set_grad=set_grad)
    seen = []
    original = opt.backend.first_order
    connected = opt.backend.backward_connected

    def spy(stage, *args, **kwargs):  # the per-step backward
        out = original(stage, *args, **kwargs)
        if stage.has_control:
            seen.append(out[1] is None)
        return out

    def spy_connected(graph, *args, **kwargs):  # order 1 as one backward
        out = connected(graph, *args, **kwargs)
        seen.extend(e.Q_u is None for st, e in zip(graph.stages, out) if st.has_control)
        return out

    monkeypatch.setattr(opt.backend, "first_order", spy)
    monkeypatch.setattr(opt.backend, "backward_connected", spy_connected)
    opt.step(x, y)
    # B = 2 against 20 x 16 and 16 x 3 layers: rows at both (when .grad is not wanted)
    assert seen == [not set_grad, not set_grad]


@pytest.mark.parametrize("name, hp", [("adam", {}), ("adamw", {"weight_decay": 0.1}),
                                      ("adam", {"betas": (0.5, 0.9), "eps": 1e-3})])
def test_adam_update_of_a_stage_in_one_pass_equals_the_update_per_tensor(name, hp):
    """Order 2 updates one stage at a time: ``Adam.update`` of a stage's small tensors runs
    the multi-tensor arithmetic of ``update_many``; it equals ``update`` tensor by tensor (the
    per-tensor path) bit for bit, states, directions and the denominators it keeps for M^-1."""
    from ocnopt.curvature import CURVATURES

    model = tiny()
    opt = ocnopt.OCNOpt(model, curvature=name, lr=0.01, **hp)
    for x, y in batches(3):
        opt.step(x, y)
    group = opt.param_groups[0]
    stage = opt.stages[0]
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in stage.params]
    states = [opt.state[p] for p in stage.params]
    one, per = CURVATURES[name](), CURVATURES[name]()
    new, dirs = one.update(stage, states, grads, stage.params, None, group, 4)
    for i, (st, gi, p) in enumerate(zip(states, grads, stage.params)):
        ref_new, ref_dirs = per.update(stage, [st], [gi], [p], None, group, 4)
        assert torch.equal(dirs[i], ref_dirs[0])
        assert set(new[i]) == set(ref_new[0])
        assert all(torch.equal(new[i][k], ref_new[0][k]) for k in new[i])
        assert torch.equal(one.denominator(new[i], group), per.denominator(ref_new[0], group))
        assert torch.equal(one.denominator(new[i], group), one._denominator(new[i], group))
