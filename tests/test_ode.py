"""Neural ODE blocks (docs/method.md section 12): identities 12 and 13 of the method.

* identity 12 (order 1): OCNOpt with an ``ODEBlock`` equals torch.optim (SGD, Adam) on a deep
  copy of the model trained with torchdiffeq's ``odeint_adjoint`` gradients, several steps,
  fixed-step rk4 (to rounding) and adaptive dopri5 (to solver tolerance: the adjoint's step
  selection sees the cotangent's scale, B V_x for ocnopt and V_x for autograd's mean loss);
  V_x at the block input and Qbar_u equal the adjoint gradients (times B).
* identity 13 (order 2, lowrank): with euler/rk4 of N steps, the block's q(t0), p(t0), Q_x and
  Qbar_u from its one backward solve equal those of the same solver unrolled as a chain of N
  step modules run through the lowrank backend (and q q^T the exact backend's V_xx at the
  chain's input), with an error that falls like h^order; the
  feedback and the value update built from them equal the formulas on the chain's q, p; the
  forward sensitivity f_u k equals the unrolled chain's Jacobian-vector product to rounding.
* the empirical factor (Z' = rho V') gives the same columns without extra ones; the exact
  backend refuses the block at order 2; solver statistics count evaluations.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ocnopt.backends.autograd import AutogradBackend, ExactValue
from ocnopt.backends.lowrank import LowRankBackend, LowRankValue
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import ocnopt
from ocnopt.graph import build_graph
from ocnopt.ode import ODEBlock, reset_solver_statistics, solver_statistics

torchdiffeq = pytest.importorskip("torchdiffeq")
D = torch.float64


class Field(nn.Module):
    """F(t, x) = W2 tanh(W1 x + b1 + t c) + b2: time-dependent, per sample."""

    def __init__(self, n: int = 3, hidden: int = 5):
        super().__init__()
        self.l1, self.l2 = nn.Linear(n, hidden), nn.Linear(hidden, n)
        self.c = nn.Parameter(torch.randn(hidden) * 0.3)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.l2(torch.tanh(self.l1(x) + t * self.c))


class EulerStep(nn.Module):
    """x + h F(t, x): one step of torchdiffeq's euler."""

    def __init__(self, func: nn.Module, t: float, h: float):
        super().__init__()
        self.func, self.t, self.h = func, t, h

    def forward(self, x: Tensor) -> Tensor:
        t = torch.tensor(self.t, dtype=x.dtype)
        return x + self.h * self.func(t, x)


class RK4Step(EulerStep):
    """One step of torchdiffeq's rk4 (the 3/8 rule)."""

    def forward(self, x: Tensor) -> Tensor:
        h, t0 = self.h, self.t

        def f(t: float, y: Tensor) -> Tensor:
            return self.func(torch.tensor(t, dtype=x.dtype), y)

        k1 = f(t0, x)
        k2 = f(t0 + h / 3, x + h * k1 / 3)
        k3 = f(t0 + 2 * h / 3, x + h * (k2 - k1 / 3))
        k4 = f(t0 + h, x + h * (k1 - k2 + k3))
        return x + (k1 + 3 * (k2 + k3) + k4) * h * 0.125


def block(method: str, N: int | None = None, seed: int = 0, **kw) -> ODEBlock:
    torch.manual_seed(seed)
    opts = {"step_size": 1.0 / N} if N else None
    return ODEBlock(Field(), method=method, options=opts, **kw).to(D)


def unrolled(blk: ODEBlock, N: int) -> nn.Sequential:
    """The block's fixed-step solver as a chain of N step modules, each with its own copy of
    the field (a chain step is a control of its own)."""
    cls = EulerStep if blk.method == "euler" else RK4Step
    return nn.Sequential(*(cls(copy.deepcopy(blk.func), j / N, 1.0 / N) for j in range(N)))


def batch(B: int = 6, n: int = 4, classes: int = 3, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, n, generator=g, dtype=D), torch.randint(0, classes, (B,), generator=g)


def step_with_twin(opt, ref: nn.Module, ref_opt, batches) -> None:
    """OCNOpt and its torch.optim twin (on the copy ``ref``) each step on the same batches."""
    for x, y in batches:
        opt.step(x, y)
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()


# ---- identity 12: order 1 ----------------------------------------------------------------------
@pytest.mark.parametrize("curvature,torch_opt", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)])
@pytest.mark.parametrize("method,N,tol", [("rk4", 4, 1e-12), ("dopri5", None, 1e-6)])
def test_order1_matches_torch_optim(curvature, torch_opt, method, N, tol):
    kw = {"rtol": 1e-8, "atol": 1e-10} if N is None else {}
    torch.manual_seed(0)
    head = nn.Linear(4, 3).to(D)
    model = nn.Sequential(head, block(method, N, **kw), nn.Linear(3, 3).to(D))
    ref = copy.deepcopy(model)
    opt = ocnopt.OCNOpt(model, loss="cross_entropy", lr=0.05, curvature=curvature,
                        backend="lowrank", order=1)
    ref_opt = torch_opt(ref.parameters(), lr=0.05)
    step_with_twin(opt, ref, ref_opt, [batch(seed=10 + s) for s in range(3)])
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    assert not torch.equal(model[1].func.l1.weight, block(method, N).func.l1.weight)  # it moved


def test_order1_value_gradient_is_adjoint_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3).to(D), block("rk4", 4), nn.Linear(3, 3).to(D))
    x, y = batch()
    opt = ocnopt.OCNOpt(model, loss="cross_entropy", lr=0.1, curvature="sgd", backend="lowrank")
    eng = opt.engine
    traj = eng.nominal(x)
    term = eng.terminal(traj, y)
    exps, values = eng.expand(traj, term, need_stats=[False] * 3, keep_values=True)
    # reference: torchdiffeq's adjoint gradients of the mean loss, on the same nominal states
    h = traj.states[1].clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model[2](model[1](h)), y)
    g_h, *g_theta = torch.autograd.grad(loss, [h, *model[1].func.parameters()])
    torch.testing.assert_close(values[1], x.shape[0] * g_h, rtol=1e-12, atol=1e-12)
    for q, g in zip(exps[1].Q_u, g_theta):
        torch.testing.assert_close(q, g, rtol=1e-12, atol=1e-12)


# ---- identity 13: order 2 against the unrolled solver -----------------------------------------
def block_expansion(blk: ODEBlock, x: Tensor, V: Tensor, Z: Tensor | None, rho: Tensor | None):
    """The lowrank backend's expansion of the block as one stage (after an identity step, so
    that its input, value id 1, is a state the feedback reads), from V', Z' at its output."""
    be = LowRankBackend()
    graph = build_graph(nn.Sequential(nn.Identity(), blk))
    traj = be.forward(graph, x, input_value=True)
    Zv = Z if Z is not None else (rho.reshape(-1, 1) * V).unsqueeze(1)
    value = LowRankValue({2: V}, {2: Zv}, rho)
    exp = be.expand_stage(graph.stages[1], traj, value, gauss_newton=True, need_quu=False,
                          need_stats=False)
    return be, graph.stages[1], traj, exp


def chain_expansion(chain: nn.Sequential, x: Tensor, V: Tensor, Z: Tensor):
    """q, p, Q_x, Qbar_u of the unrolled chain: the lowrank backend's propagation (no value
    correction) for a and Q_x, per-sample W_j = f_u^T Z'_j of every step summed for p."""
    be = LowRankBackend()
    graph = build_graph(chain, leaf_modules=(EulerStep,))
    N = len(graph.stages)
    traj = be.forward(graph, x, input_value=True)
    value = LowRankValue({N: V}, {N: Z})
    p = None
    Q_u = None
    for t in reversed(range(N)):
        st = graph.stages[t]
        exp = be.expand_stage(st, traj, value, gauss_newton=True, need_quu=False, need_stats=False)
        Zt = value.Zb[t + 1]
        params = {k: v.detach() for k, v in zip(st.param_names, st.params)}

        def psi(ps, xi, zi, _st=st):
            return (functional_call(_st.module, ps, (xi.unsqueeze(0),))[0] * zi).sum()

        W = vmap(vmap(grad(psi), in_dims=(None, None, 0)), in_dims=(None, 0, 0))(
            params, traj.states[t], Zt)
        W = st.flatten(list(W.values()), lead=2)
        p = W if p is None else p + W
        qu = st.flatten(exp.Q_u)
        Q_u = qu if Q_u is None else Q_u + qu
        value = be.value_update(st, exp, value, None, 0.0, x.shape[0], value_correction=False,
                                mu=0.0, clip=True)
    return {"out": traj.output, "q": value.Zb[0], "p": p, "Q_x": value.V[0], "Q_u": Q_u}


def exact_chain_hessian(chain: nn.Sequential, x: Tensor, V: Tensor, Z: Tensor) -> Tensor:
    """V_xx at the chain's input by the exact backend (full per-sample Jacobians, Gauss-Newton,
    no value correction) from V'_xx = Z'^T Z' at its output: the dense twin of q q^T."""
    be = AutogradBackend()
    graph = build_graph(chain, leaf_modules=(EulerStep,))
    N = len(graph.stages)
    traj = be.forward(graph, x, input_value=True)
    value = ExactValue({N: V}, torch.einsum("brn,brk->bnk", Z, Z), (N,))
    for t in reversed(range(N)):
        st = graph.stages[t]
        exp = be.expand_stage(st, traj, value, gauss_newton=True, need_quu=False, need_stats=False)
        value = be.value_update(st, exp, value, None, 0.0, x.shape[0], value_correction=False,
                                mu=0.0, clip=False)
    return value.V_xx


def relerr(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _data(B: int = 5, n: int = 3, r: int = 2):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, n, generator=g, dtype=D)
    V = torch.randn(B, n, generator=g, dtype=D)
    Z = torch.randn(B, r, n, generator=g, dtype=D)
    return x, V, Z


@pytest.mark.parametrize("method,order,Ns", [("euler", 1, (8, 16, 32)), ("rk4", 4, (2, 4, 8))])
def test_columns_converge_to_unrolled_solver(method, order, Ns):
    x, V, Z = _data()
    errs = []
    for N in Ns:
        blk = block(method, N)
        _, st, traj, exp = block_expansion(blk, x, V, Z, None)
        ref = chain_expansion(unrolled(blk, N), x, V, Z)
        torch.testing.assert_close(traj.states[2], ref["out"], rtol=1e-13, atol=1e-13)  # same solver
        err = max(relerr(exp.a_blocks[1], ref["q"]), relerr(exp.W, ref["p"]),
                  relerr(exp.Q_args[0], ref["Q_x"]), relerr(st.flatten(exp.Q_u), ref["Q_u"] / 1))
        qq = torch.einsum("brn,brk->bnk", exp.a_blocks[1], exp.a_blocks[1])
        err = max(err, relerr(qq, exact_chain_hessian(unrolled(blk, N), x, V, Z)))
        errs.append(err)
    assert errs[0] < 0.1
    # the continuous adjoint solved by the method vs the discrete adjoint of the method: both
    # of order `order`, so halving h divides the difference by ~2^order
    for e0, e1 in zip(errs, errs[1:]):
        assert e1 < e0 * 2.0 ** (-order) * 1.6, errs


def test_qbar_u_is_mean_of_columns_scale():
    """Qbar_u = (1/B) sum_i g^(i): with Z' = V' (rho = 1) the first column's W is g per sample."""
    x, V, _ = _data()
    blk = block("rk4", 4)
    rho = torch.ones(x.shape[0], dtype=D)
    _, st, _, exp = block_expansion(blk, x, V, None, rho)
    torch.testing.assert_close(exp.W[:, 0].mean(0), st.flatten(exp.Q_u), rtol=1e-12, atol=1e-14)


def test_empirical_factor_needs_no_extra_columns():
    """Z' = rho V': the rho path (g per sample, no q/p columns) equals the general solve."""
    x, V, _ = _data()
    blk = block("rk4", 4)
    rho = torch.tensor([0.5, 1.0, 2.0, -1.0, 3.0], dtype=D)
    _, _, _, e_rho = block_expansion(blk, x, V, None, rho)
    _, _, _, e_gen = block_expansion(blk, x, V, (rho.reshape(-1, 1) * V).unsqueeze(1), None)
    torch.testing.assert_close(e_rho.a_blocks[1], e_gen.a_blocks[1], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(e_rho.W, e_gen.W, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(e_rho.Q_args[0], e_gen.Q_args[0], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_param_jvp_is_unrolled_jvp(method):
    """f_u k by the forward sensitivity solved alongside the state equals the unrolled fixed-step
    solver's Jacobian-vector product (an explicit RK method commutes with the variational
    equation), to rounding."""
    N = 4
    x, _, _ = _data()
    blk = block(method, N)
    names = [n for n, _ in blk.named_parameters()]
    g = torch.Generator().manual_seed(5)
    k = {n: torch.randn(p.shape, generator=g, dtype=D) for n, p in blk.named_parameters()}
    params = {n: p.detach() for n, p in blk.named_parameters()}
    fu_k = blk.param_jvp(params, x, k)
    chain = unrolled(blk, N)

    def run(*ps):
        d = {n.removeprefix("func."): p for n, p in zip(names, ps)}
        y = x
        for step in chain:
            y = functional_call(step, {f"func.{n}": v for n, v in d.items()}, (y,))
        return y

    ref = torch.func.jvp(run, tuple(params[n] for n in names), tuple(k[n] for n in names))[1]
    torch.testing.assert_close(fu_k, ref, rtol=1e-12, atol=1e-13)


class Identity:
    """M = I (curvature sgd without momentum) as the backend's solver."""

    def __call__(self, v):
        return list(v)

    def solves_direction(self, v):
        return False


@pytest.mark.parametrize("method,Ns", [("euler", (16, 32)), ("rk4", (4, 8))])
def test_feedback_and_value_update_converge(method, Ns):
    """The block's feedback K dx = -lr (1/B) sum_i p^(i) <q^(i), dx^(i)> and value update
    V_x = Q_x + q (p^T k), Z = q C with C C^T = I - (lr/B) p^T p, from the backend, against the
    same formulas on the unrolled chain's q, p: the difference falls with N."""
    x, V, Z = _data()
    B, lr = x.shape[0], 0.05
    dx = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=D)
    errs = []
    for N in Ns:
        blk = block(method, N)
        be, st, traj, exp = block_expansion(blk, x, V, Z, None)
        ref = chain_expansion(unrolled(blk, N), x, V, Z)
        minv = Identity()
        k = [v.mul(-lr) for v in exp.Q_u]
        be.quadratic(st, exp, k)
        fb = st.flatten(be.feedback(st, exp, minv, lr, B)({1: dx}))
        s = torch.einsum("brn,bn->br", ref["q"], dx)
        fb_ref = -lr * torch.einsum("brm,br->m", ref["p"], s) / B
        new = be.value_update(st, exp, LowRankValue({2: V}, {2: Z}), minv, lr, B,
                              value_correction=True, mu=0.0, clip=True)
        k_ref = -lr * ref["Q_u"]
        V_ref = ref["Q_x"] + torch.einsum("brn,br->bn", ref["q"], torch.einsum("brm,m->br", ref["p"], k_ref))
        S = torch.eye(Z.shape[1], dtype=D) - (lr / B) * torch.einsum("bcm,bdm->bcd", ref["p"], ref["p"])
        VZZ_ref = torch.einsum("bcn,bcd,bdk->bnk", ref["q"], S, ref["q"])  # q S q^T (S is PSD here)
        assert bool((torch.linalg.eigvalsh(S) > 0).all())
        Zn = new.Zb[1]
        VZZ = torch.einsum("bcn,bck->bnk", Zn, Zn)
        errs.append(max(relerr(fb, fb_ref), relerr(new.V[1], V_ref), relerr(VZZ, VZZ_ref)))
    assert errs[0] < 0.1 and errs[1] < 0.75 * errs[0], errs


# ---- refusals, statistics, construction -------------------------------------------------------
def test_exact_backend_refuses_order2():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3).to(D), block("rk4", 2), nn.Linear(3, 3).to(D))
    opt = ocnopt.OCNOpt(model, loss="cross_entropy", lr=0.1, curvature="sgd", backend="autograd",
                        order=2)
    x, y = batch()
    with pytest.raises(TypeError, match="ODEBlock is solved by the adjoint method.*lowrank"):
        opt.step(x, y)


def test_order2_step_runs_and_counts_evaluations():
    N = 4
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3).to(D), block("rk4", N), nn.Linear(3, 3).to(D))
    opt = ocnopt.OCNOpt(model, loss="cross_entropy", lr=0.1, curvature="sgd", backend="lowrank",
                        order=2)
    x, y = batch()
    before = [p.clone() for p in model.parameters()]
    reset_solver_statistics(model)
    opt.step(x, y)
    stats = solver_statistics(model)
    # rk4: 4 evaluations a step; forward: the nominal pass and the update pass; backward: the
    # one expansion solve (no autograd adjoint solve at order 2)
    assert (stats.nfe_forward, stats.nfe_backward) == (2 * 4 * N, 4 * N)
    assert opt.last_step is not None and math.isfinite(float(opt.last_step.loss))
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_order1_counts_adjoint_evaluations():
    N = 3
    blk = block("euler", N)
    x, _ = batch(n=3)
    blk.reset_nfe()
    blk(x).sum().backward()
    assert (blk.nfe_forward, blk.nfe_backward) == (N, N)


@pytest.mark.parametrize("kw,match", [
    ({"method": "rk5"}, "invalid method='rk5'"),
    ({"t1": 0.0}, "invalid t1=0.0 with t0=0.0: accepted t1 > t0"),
    ({"rtol": -1.0}, "invalid rtol=-1.0"),
])
def test_invalid_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        ODEBlock(Field(), **kw)
    with pytest.raises(TypeError, match="func must be a torch.nn.Module"):
        ODEBlock(lambda t, x: x)  # type: ignore[arg-type]


def test_t0_t1_in_state_dict():
    blk = ODEBlock(Field(), t0=0.5, t1=2.0)
    sd = blk.state_dict()
    assert float(sd["t0"]) == 0.5 and float(sd["t1"]) == 2.0


def test_order2_without_feedback_and_correction_is_order1():
    """Identity 2 with an ODE block: the expansion's own backward solve gives the adjoint's
    Qbar_u (same fixed-step solver), so order 2 with both additions off is order 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3).to(D), block("rk4", 4), nn.Linear(3, 3).to(D))
    ref = copy.deepcopy(model)
    kw = {"loss": "cross_entropy", "lr": 0.05, "curvature": "adam", "backend": "lowrank"}
    opt2 = ocnopt.OCNOpt(model, order=2, feedback=False, value_correction=False, **kw)
    opt1 = ocnopt.OCNOpt(ref, order=1, **kw)
    for s in range(3):
        x, y = batch(seed=20 + s)
        opt2.step(x, y)
        opt1.step(x, y)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-12)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.ode, self.out = nn.Linear(4, 3), block("rk4", 4), nn.Linear(3, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.ode(h) + h)


def test_traced_graph_with_ode_block_matches_torch_optim():
    """An ODE block inside a traced model is one step; order 1 equals torch.optim."""
    torch.manual_seed(0)
    model = Residual().to(D)
    ref = copy.deepcopy(model)
    opt = ocnopt.OCNOpt(model, loss="cross_entropy", lr=0.05, curvature="sgd", backend="lowrank")
    assert [type(st.module).__name__ for st in opt.stages] == ["Linear", "ODEBlock", "FunctionStep",
                                                               "Linear"]
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    step_with_twin(opt, ref, ref_opt, [batch(seed=30 + s) for s in range(3)])
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


class NormField(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.l, self.inner = nn.Linear(3, 3), layer

    def forward(self, t, x):
        return self.inner(self.l(x))


@pytest.mark.parametrize("layer,match", [
    (nn.BatchNorm1d(3), "BatchNorm1d at func.inner, which couples the samples"),
    (nn.Dropout(0.2), "Dropout at func.inner in training mode"),
])
def test_field_with_batch_coupling_or_randomness_is_refused(layer, match):
    model = nn.Sequential(nn.Linear(4, 3), ODEBlock(NormField(layer)), nn.Linear(3, 2))
    with pytest.raises(TypeError, match=f"unsupported module ODEBlock at .*{match}"):
        ocnopt.OCNOpt(model, loss="cross_entropy", lr=0.1, curvature="sgd", backend="lowrank")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_order2_step_on_cuda_equals_cpu():
    torch.manual_seed(0)
    cpu = nn.Sequential(nn.Linear(4, 3).to(D), block("rk4", 4, learn_t1=True), nn.Linear(3, 3).to(D))
    gpu = copy.deepcopy(cpu).cuda()
    x, y = batch()
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        opt = ocnopt.OCNOpt(model, loss="cross_entropy", lr=0.05, curvature="adam",
                            backend="lowrank", order=2)
        opt.step(x.to(dev), y.to(dev))
        model[1].update_t1()
        with torch.no_grad():
            h = model[0](x.to(dev))
            model[1].grid_statistics(model[1](h), torch.ones_like(h), grid_step=0.25)
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-10, atol=1e-12)
    assert float(cpu[1].t1) == pytest.approx(float(gpu[1].t1), rel=1e-10)


def test_backprop_through_solver_is_the_unrolled_gradient():
    """``adjoint=False`` differentiates the solver's operations: with a fixed-step solver the
    gradient is the unrolled chain's (discretise-then-optimise) to rounding, and it differs
    from the adjoint's continuous gradient by the discretisation error."""
    N = 4
    blk = block("rk4", N, adjoint=False)
    adj = block("rk4", N)
    chain = unrolled(blk, N)
    x, V, _ = _data()
    g_direct = torch.autograd.grad((blk(x) * V).sum(), list(blk.func.parameters()))
    g_adj = torch.autograd.grad((adj(x) * V).sum(), list(adj.func.parameters()))
    out = chain(x)
    g_chain = torch.autograd.grad((out * V).sum(), [p for p in chain.parameters()])
    per_step = len(g_direct)
    summed = [sum(g_chain[j * per_step + i] for j in range(N)) for i in range(per_step)]
    for a, b, c in zip(g_direct, summed, g_adj):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(c, b, rtol=1e-12, atol=1e-13)


# ---- property-based versions (random sizes and seeds) ------------------------------------------
PROPERTY = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_block(method: str, N: int, n: int, hidden: int, seed: int) -> ODEBlock:
    torch.manual_seed(seed)
    return ODEBlock(Field(n, hidden), method=method, options={"step_size": 1.0 / N}).to(D)


@PROPERTY
@given(n=st.integers(1, 4), hidden=st.integers(1, 6), B=st.integers(1, 5), seed=st.integers(0, 99),
       curvature=st.sampled_from(["sgd", "adam"]))
def test_property_order1_matches_torch_optim(n, hidden, B, seed, curvature):
    blk = random_block("rk4", 2, n, hidden, seed)
    model = nn.Sequential(nn.Linear(3, n).to(D), blk, nn.Linear(n, 2).to(D))
    ref = copy.deepcopy(model)
    opt = ocnopt.OCNOpt(model, loss="cross_entropy", lr=0.05, curvature=curvature, backend="lowrank")
    ref_opt = (torch.optim.SGD if curvature == "sgd" else torch.optim.Adam)(ref.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    step_with_twin(opt, ref, ref_opt,
                   [(torch.randn(B, 3, generator=g, dtype=D), torch.randint(0, 2, (B,), generator=g))
                    for _ in range(2)])
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-12)


@PROPERTY
@given(n=st.integers(1, 4), hidden=st.integers(1, 5), B=st.integers(1, 4), r=st.integers(1, 3),
       seed=st.integers(0, 99))
def test_property_columns_converge_at_rk4_rate(n, hidden, B, r, seed):
    g = torch.Generator().manual_seed(seed)
    x, V = torch.randn(B, n, generator=g, dtype=D), torch.randn(B, n, generator=g, dtype=D)
    Z = torch.randn(B, r, n, generator=g, dtype=D)
    errs = []
    for N in (4, 8):
        blk = random_block("rk4", N, n, hidden, seed)
        _, _, _, exp = block_expansion(blk, x, V, Z, None)
        ref = chain_expansion(unrolled(blk, N), x, V, Z)
        scale = max(float(ref["q"].abs().max()), 1e-3)
        pscale = max(float(ref["p"].abs().max()), 1e-3)
        errs.append(max(float((exp.a_blocks[1] - ref["q"]).abs().max()) / scale,
                        float((exp.W - ref["p"]).abs().max()) / pscale))
    # halving h divides the difference by ~16 (rk4) once asymptotic; at h = 1/4, 1/8 some
    # fields are not yet (hypothesis found 7.4 at n=3, hidden=1, B=2, r=1, seed=58): more than
    # 6 still rules out a second-order error (4); rounding floor 1e-12
    assert errs[1] < errs[0] / 6 + 1e-12 and errs[0] < 1e-2, errs


def _ode_model(learn_t1: bool = False) -> nn.Sequential:
    torch.manual_seed(4)
    block = ODEBlock(Field(3), method="rk4", options={"step_size": 0.25}, learn_t1=learn_t1,
                     t1_lr=0.1)
    return nn.Sequential(nn.Linear(4, 3), block, nn.Linear(3, 3)).to(D)


@pytest.mark.parametrize("order", [1, 2])
def test_last_step_reports_the_solver_evaluations(order):
    """rk4 with 4 steps on [0, 1]: 16 evaluations forward; the step's backward solves add
    theirs; last_step.solver holds this step's counts (the block's counters, reset per step)."""
    model = _ode_model()
    opt = ocnopt.OCNOpt(model, curvature="adam", lr=1e-2, order=order, backend="lowrank")
    block = model[1]
    for _ in range(2):
        opt.step(*batch())
        stats = opt.last_step.solver
        assert stats == {"nfe_forward": block.nfe_forward, "nfe_backward": block.nfe_backward}
        assert stats["nfe_forward"] >= 16 and stats["nfe_backward"] > 0


def test_learned_t1_moves_at_order_two_and_is_reported():
    model = _ode_model(learn_t1=True)
    opt = ocnopt.OCNOpt(model, curvature="adam", lr=1e-2, order=2, backend="lowrank")
    block = model[1]
    t1 = [float(block.t1)]
    for s in range(3):
        opt.step(*batch(seed=s))
        (upd,) = opt.last_step.t1_updates
        assert upd is block.t1_history[-1] and upd.t1 == float(block.t1)
        t1.append(float(block.t1))
    assert len(set(t1)) == 4  # it moved every step
    with pytest.raises(ValueError, match="learn_t1=True.*needs order=2"):
        ocnopt.OCNOpt(_ode_model(learn_t1=True), curvature="adam", order=1)
