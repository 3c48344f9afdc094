"""The E-MSA peer (ocnopt.bench.emsa): its fixed point on a linear least-squares chain is the
least-squares solution, and one outer iteration on a two-layer network equals the paper's
update (forward states, backward co-states, gradient ascent on the augmented Hamiltonian)
written out independently here."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ocnopt.bench import optimizers as registry
from ocnopt.bench import problems
from ocnopt.bench.emsa import EMSA, chain_layers


def _data(n: int = 40, d: int = 3, k: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = torch.randn(k, d, generator=g, dtype=torch.float64)
    Y = X @ W.T + 0.3 + 0.1 * torch.randn(n, k, generator=g, dtype=torch.float64)
    return X, Y


def _lstsq(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    A = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    sol = torch.linalg.lstsq(A, Y).solution  # (d + 1, k)
    return sol[:-1].T, sol[-1]


def test_least_squares_solution_is_a_fixed_point() -> None:
    X, Y = _data()
    W, b = _lstsq(X, Y)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[0].weight.copy_(W)
        model[0].bias.copy_(b)
    opt = EMSA(model, "mse", lr=0.1, rho=1.0, inner_steps=5, inner="sgd")
    for _ in range(3):
        opt.step(X, Y)
    # lstsq's solution is stationary to ~1e-12; a move of the order of lr would be 1e-1
    torch.testing.assert_close(model[0].weight.detach(), W, atol=1e-9, rtol=0)
    torch.testing.assert_close(model[0].bias.detach(), b, atol=1e-9, rtol=0)


def test_linear_chain_reaches_least_squares_solution() -> None:
    """Two Linear layers without activation: the end-to-end map W2 W1 x + W2 b1 + b2 must reach
    the least-squares fit and the loss its minimum."""
    X, Y = _data()
    W, b = _lstsq(X, Y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    opt = EMSA(model, "mse", lr=0.3, rho=0.05, inner_steps=2, inner="sgd")
    for _ in range(2000):
        opt.step(X, Y)
    W1, b1, W2, b2 = (q.detach() for q in model.parameters())
    torch.testing.assert_close(W2 @ W1, W, atol=1e-6, rtol=0)
    torch.testing.assert_close(W2 @ b1 + b2, b, atol=1e-6, rtol=0)
    best = nn.functional.mse_loss(X @ W.T + b, Y)
    assert float(nn.functional.mse_loss(model(X).detach(), Y)) == pytest.approx(float(best), rel=1e-9)


def test_one_iteration_matches_the_paper_two_layers() -> None:
    """Linear-Tanh-Linear, cross-entropy, S = 5: the states, co-states and two gradient-ascent
    steps on each layer's augmented Hamiltonian written out by hand."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x0 = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])
    lr, rho, wd, steps = 0.3, 0.7, 0.01, 2
    W1, b1, W2, b2 = (q.detach().clone() for q in model.parameters())
    S = len(y)
    # forward states and backward co-states of theta^k (the paper's steps 1-2)
    x1 = torch.tanh(x0 @ W1.T + b1)
    x2 = x1 @ W2.T + b2
    p2 = -(torch.softmax(x2, 1) - nn.functional.one_hot(y, 2).double()) / S
    p1 = p2 @ W2
    p0 = (p1 * (1 - x1**2)) @ W1

    def h0(W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        f = torch.tanh(x0 @ W.T + b)
        hx = (p1 * (1 - f**2)) @ W  # grad_x of p1 . tanh(W x + b)
        return ((p1 * f).sum() - wd / 2 * ((W**2).sum() + (b**2).sum())
                - rho / 2 * ((x1 - f) ** 2).sum() - rho / 2 * ((p0 - hx) ** 2).sum())

    def grad_h1(W: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = x2 - (x1 @ W.T + b)  # forward residual
        e = p1 - p2 @ W  # backward residual
        gW = p2.T @ x1 - wd * W + rho * r.T @ x1 + rho * p2.T @ e
        gb = p2.sum(0) - wd * b + rho * r.sum(0)
        return gW, gb

    A, a, B, c = W1.clone(), b1.clone(), W2.clone(), b2.clone()
    for _ in range(steps):
        gA, ga = torch.func.grad(h0, argnums=(0, 1))(A, a)
        gB, gc = grad_h1(B, c)
        A, a, B, c = A + lr * gA, a + lr * ga, B + lr * gB, c + lr * gc

    opt = EMSA(model, "cross_entropy", lr=lr, rho=rho, inner_steps=steps, inner="sgd",
               weight_decay=wd)
    xs, ps, _ = opt.states_costates(x0, y)
    for mine, ref in zip(xs, (x0, x1, x2)):
        torch.testing.assert_close(mine, ref)
    for mine, ref in zip(ps, (p0, p1, p2)):
        torch.testing.assert_close(mine, ref)
    loss = opt.step(x0, y)
    assert loss == pytest.approx(float(nn.functional.cross_entropy(x2, y)))
    for mine, ref in zip(model.parameters(), (A, a, B, c)):
        torch.testing.assert_close(mine.detach(), ref, atol=1e-12, rtol=1e-10)
    assert not torch.allclose(A, W1)  # the update moved the weights


def test_lbfgs_inner_solver_reaches_the_exact_maximiser() -> None:
    """The paper's inner solver (10 L-BFGS iterations, the default): on a one-layer linear chain
    with the mse loss the augmented Hamiltonian is a concave quadratic in (W, b), so one outer
    iteration must land on its maximiser, computed here by one Newton step on the Hamiltonian
    written out by hand (co-states with the 1/S of the mean loss, sums over samples)."""
    X, Y = _data(n=12)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    W0, b0 = (q.detach().clone() for q in model.parameters())
    rho = 0.5
    S, k = Y.shape
    v = X @ W0.T + b0  # x_1 of theta^k
    p1 = -2.0 * (v - Y) / (S * k)  # -grad of mse_loss (mean over S x k entries)
    p0 = p1 @ W0

    def htilde(theta: torch.Tensor) -> torch.Tensor:
        W, b = theta[:6].reshape(2, 3), theta[6:]
        f = X @ W.T + b
        return ((p1 * f).sum() - rho / 2 * ((v - f) ** 2).sum()
                - rho / 2 * ((p0 - p1 @ W) ** 2).sum())

    th0 = torch.cat([W0.reshape(-1), b0])
    g = torch.func.grad(htilde)(th0)
    Hm = torch.func.hessian(htilde)(th0)
    assert bool((torch.linalg.eigvalsh(Hm) < 0).all())  # concave: one maximiser
    best = th0 - torch.linalg.solve(Hm, g)
    opt = EMSA(model, "mse", rho=rho)
    assert (opt.inner, opt.inner_steps, opt.lr) == ("lbfgs", 10, 1.0)
    opt.step(X, Y)
    mine = torch.cat([model[0].weight.detach().reshape(-1), model[0].bias.detach()])
    move = float((best - th0).norm())
    assert move > 0.1  # the maximiser is a real move
    # L-BFGS stops when Htilde changes by < 1e-9 (torch's tolerance_change): within 1e-4 of it
    assert float((mine - best).norm()) < 1e-4 * move


def test_rho_zero_first_inner_step_is_a_gradient_step() -> None:
    """At theta^k the rho terms have zero gradient, so one ascent step on Htilde is one
    gradient-descent step on the loss."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)).double()
    ref = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2)).double()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    EMSA(model, lr=0.1, rho=3.0, inner_steps=1, inner="sgd").step(x, y)
    torch.optim.SGD(ref.parameters(), lr=0.1).zero_grad()
    nn.functional.cross_entropy(ref(x), y).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach() - 0.1 * q.grad)


def test_refusals() -> None:
    with pytest.raises(TypeError, match="nn.Sequential chain"):
        EMSA(problems.DigitsResNet())
    with pytest.raises(ValueError, match="keeps buffers"):
        chain_layers(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    with pytest.raises(ValueError, match="inner='newton'"):
        EMSA(nn.Sequential(nn.Linear(2, 2)), inner="newton")
    with pytest.raises(ValueError, match="rho=-1"):
        EMSA(nn.Sequential(nn.Linear(2, 2)), rho=-1)
    spec = registry.parse_optimizer("emsa")
    assert spec.fits(problems.get_problem("digits-resnet")) is not None
    assert spec.fits(problems.get_problem("digits-fcn")) is None
    assert "emsa" in registry.all_names()


def test_chain_layers_groups_activations() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2))
    layers = chain_layers(model)
    assert [len(layer) for layer in layers] == [1, 2, 1]
