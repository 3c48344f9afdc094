"""ocnopt.bench's Neural ODE problems (digits-odenet, motions-ode, circles-cnf): data shapes and
splits, seeded networks, the flow's trace estimator and likelihood, that each problem trains a
few steps with a torch peer and with SNOpt, the SNOpt names, the backprop-through-the-solver
peers, and the function evaluations a train run records."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("torchdiffeq")
from ocnopt.bench import optimizers as registry  # noqa: E402
from ocnopt.bench import problems  # noqa: E402
from ocnopt.bench.ode_problems import (  # noqa: E402
    CNFField,
    CNFNet,
    HutchinsonNoise,
    flow_nll,
    load_circles,
)
from ocnopt.bench.protocols import evaluate, train_one  # noqa: E402

HAS_SKTIME = importlib.util.find_spec("sktime") is not None
# problem -> (input shape of one sample, classes or None, sizes fit/val/test)
DOCUMENTED = {
    "digits-odenet": ((1, 8, 8), 10, (1005, 252, 540)),
    "motions-ode": ((6, 100), 4, (32, 8, 40)),
    "circles-cnf": ((2,), None, (1120, 280, 600)),
}
NEEDS = {"motions-ode": HAS_SKTIME}


def _skip(name: str) -> None:
    if not NEEDS.get(name, True):
        pytest.skip("motions-ode needs sktime (pip install 'ocnopt[ode-bench]')")


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_loaders_shapes_classes_and_model_output(name: str) -> None:
    _skip(name)
    shape, classes, sizes = DOCUMENTED[name]
    data = problems.load(name)
    assert data.sizes() == dict(zip(("fit", "val", "test"), sizes))
    assert data.classes == classes
    for X in (data.X_fit, data.X_val, data.X_test):
        assert X.dtype == torch.float32 and tuple(X.shape[1:]) == shape
        assert torch.isfinite(X).all()
    if classes is not None:
        assert set(data.y_fit.tolist()) == set(range(classes))
    model = problems.get_problem(name).model(0).eval()
    with torch.no_grad():
        out = model(data.X_test[:5])
    assert out.shape == ((5, classes) if classes else (5, 2 * shape[0] + 1))


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_model_deterministic_per_seed(name: str) -> None:
    p = problems.get_problem(name)
    a, b, c = p.model(3), p.model(3), p.model(4)
    pa, pb, pc = (torch.cat([t.flatten() for t in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_motions_standardised_on_fit_split() -> None:
    _skip("motions-ode")
    data = problems.load("motions-ode")
    mean = data.X_fit.mean((0, 2))
    std = data.X_fit.std((0, 2), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(6), atol=1e-4, rtol=0)


def test_circles_split_fixed_by_seed() -> None:
    load_circles.cache_clear()
    a, b, c = load_circles(0), load_circles(0), load_circles(1)
    assert torch.equal(a.X_fit, b.X_fit) and not torch.equal(a.X_fit, c.X_fit)


def test_hutchinson_estimator_and_exact_trace() -> None:
    """Training mode: eps^T (df/dz) eps, whose mean over eps is tr(df/dz); eval mode: the
    exact trace; both against the Jacobian from torch.func; ell and eps are constants of f."""
    torch.manual_seed(0)
    field = CNFField(CNFNet(8)).double()
    z = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    J = torch.func.vmap(torch.func.jacrev(lambda zz: field.net(t, zz.unsqueeze(0))[0]))(z)
    exact = J.diagonal(dim1=1, dim2=2).sum(1)
    eps = torch.randn(3, 2, dtype=torch.float64)
    s = torch.cat([z, torch.zeros(3, 1, dtype=torch.float64), eps], 1)
    out = field(t, s)
    torch.testing.assert_close(out[:, 2], torch.einsum("bi,bij,bj->b", eps, J, eps))
    assert torch.equal(out[:, 3:], torch.zeros(3, 2, dtype=torch.float64))
    # inside torch.func transforms the same product is a Jacobian-vector product
    per_sample = torch.func.vmap(lambda si: field(t, si.unsqueeze(0))[0])(s)
    torch.testing.assert_close(per_sample, out)
    field.eval()
    torch.testing.assert_close(field(t, s)[:, 2], exact)


def test_flow_nll_of_the_identity_flow() -> None:
    """A field that is zero leaves z = x and ell = 0: -log p(x) is the standard normal's."""
    model = problems.get_problem("circles-cnf").model(0).eval()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    x = torch.randn(4, 2)
    with torch.no_grad():
        nll = flow_nll(model(x))
    ref = -torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(1)
    torch.testing.assert_close(nll, ref)


def test_noise_is_replayed_by_ocnopt_handler() -> None:
    """The update pass of order 2 sees the nominal pass's eps (the handler's context)."""
    from ocnopt.derivatives import DERIVATIVES

    h, m = DERIVATIVES[HutchinsonNoise], HutchinsonNoise()
    x = torch.randn(5, 2)
    out, ctx = h.forward(m, x)
    assert torch.equal(h.replay(m, x, ctx), out) and h.random
    assert torch.equal(out[:, :2], x) and torch.equal(out[:, 2], torch.zeros(5))


@pytest.mark.parametrize("name", list(DOCUMENTED))
@pytest.mark.parametrize("opt", ["torch-adam", "snopt", "snopt-fb"])
def test_problem_trains_a_few_steps(name: str, opt: str) -> None:
    """Six steps on one batch lower its loss (evaluated in eval mode: the exact trace)."""
    _skip(name)
    p, data = problems.get_problem(name), problems.load(name)
    x, y = data.X_fit[:16], data.y_fit[:16]
    spec = registry.parse_optimizer(opt, p, {"stat_every": 2, "inv_every": 2} if "snopt" in opt
                                    else {})
    model = p.model(0)
    before = evaluate(model, x, y, p.loss)[0]
    stepper = spec.make(model, p.loss, 0.02 if "snopt" in opt else 1e-2, 0)
    for _ in range(6):
        assert math.isfinite(stepper.step(x, y))
    assert evaluate(model, x, y, p.loss)[0] < before


def test_snopt_names_and_noadjoint_peers() -> None:
    snopt = registry.parse_optimizer("snopt")
    assert (snopt.order, snopt.backend, snopt.curvature) == (1, "autograd", "ekfac")
    assert snopt.hyper == {**registry.HYPER["ekfac"], **registry.SNOPT_HYPER}
    fb = registry.parse_optimizer("snopt-fb-t1-open")
    assert fb.order == 2 and fb.kwargs["learn_t1"] and not fb.kwargs["t1_feedback"]
    peer = registry.parse_optimizer("torch-adam-noadjoint")
    odenet = problems.get_problem("digits-odenet")
    assert peer.fits(odenet) is None
    assert "no ODE block" in str(peer.fits(problems.get_problem("wine-fcn")))
    model = odenet.model(0)
    peer.make(model, odenet.loss, 1e-3, 0)
    assert all(not m.adjoint for m in model.modules() if type(m).__name__ == "ODEBlock")
    assert "learn_t1" in registry.accepted_hyper("snopt-fb")


def test_circles_twins_draw_the_same_noise() -> None:
    """The flow's Hutchinson noise comes from the model's own generator: torch Adam and
    ocnopt's order-1 Adam take the same steps on circles-cnf (to the adjoint's rounding)."""
    p = problems.get_problem("circles-cnf")
    data = problems.load("circles-cnf")
    x, y = data.X_fit[:32], data.y_fit[:32]
    torch.randn(7)  # the global generator's state does not matter
    a = registry.parse_optimizer("torch-adam", p).make(m1 := p.model(0), p.loss, 1e-2, 0)
    torch.randn(3)
    b = registry.parse_optimizer("autograd-adam", p).make(m2 := p.model(0), p.loss, 1e-2, 0)
    for _ in range(3):
        la, lb = a.step(x, y), b.step(x, y)
        assert la == pytest.approx(lb, rel=1e-5)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("opt, per_step", [("torch-adam", 32), ("torch-adam-noadjoint", 16)])
def test_train_run_records_function_evaluations(opt: str, per_step: int) -> None:
    """rk4 with 4 steps: 16 evaluations per forward solve, 16 more for the adjoint solve (none
    when backpropagating through the solver); evaluation passes are not counted."""
    p = problems.get_problem("digits-odenet")
    data = problems.load("digits-odenet").subset(64)
    result, _ = train_one(p, data, registry.parse_optimizer(opt, p), 1e-3, 0, epochs=1,
                          batch_size=32)
    sol = result["solver"]
    assert result["steps"] == 2 and sol["nfe_per_step"] == per_step
    assert sol["nfe_forward"] == 32 and sol["t1"] == [1.0]
    assert [pt["nfe"] for pt in result["curve"]] == [0, 2 * per_step]
