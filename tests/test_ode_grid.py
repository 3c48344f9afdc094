"""Kronecker statistics of the layers inside an ODE block on the time grid t_j = t1 - j h
(docs/method.md section 12): equal to an explicit average over j of per-time factors, with
x(t_j) from a tight forward solve, a(t_j) = d<V, x(t1)>/dx(t_j) by autograd through a tight
solve from t_j to t1, and the factors of each Linear (and Conv2d, by F.unfold) written out by
hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ocnopt.ode import ODEBlock

torchdiffeq = pytest.importorskip("torchdiffeq")
D = torch.float64


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 5), nn.Linear(5, 3)
        self.c = nn.Parameter(torch.randn(5) * 0.3)

    def forward(self, t, x):
        return self.l2(torch.tanh(self.l1(x) + t * self.c))


def state_and_adjoint(f: nn.Module, x0: torch.Tensor, V: torch.Tensor, tj: float, t1: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """x(t_j) by a tight forward solve and a(t_j) = d<V, x(t1)>/dx(t_j) by autograd through a
    tight solve from t_j to t1."""
    with torch.no_grad():
        xj = torchdiffeq.odeint(f, x0, torch.tensor([0.0, tj], dtype=D), rtol=1e-11, atol=1e-13)[-1] \
            if tj > 0 else x0
    xr = xj.clone().requires_grad_(True)
    out = torchdiffeq.odeint(f, xr, torch.tensor([tj, t1], dtype=D), rtol=1e-11, atol=1e-13)[-1] \
        if tj < t1 else xr
    (aj,) = torch.autograd.grad((out * V).sum(), xr)
    return xj, aj


def test_grid_statistics_are_average_of_factors():
    torch.manual_seed(0)
    blk = ODEBlock(Field(), t1=0.5, method="dopri5", rtol=1e-10, atol=1e-12).to(D)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, generator=g, dtype=D)
    V = torch.randn(4, 3, generator=g, dtype=D)
    with torch.no_grad():
        x1 = blk(x0)
    stats = blk.grid_statistics(x1, V, grid_step=0.1)
    times = [0.5 - 0.1 * j for j in range(6)]
    assert torch.allclose(blk.grid_times(0.1, x1), torch.tensor(times, dtype=D))
    f = blk.func
    A1 = G1 = A2 = G2 = 0
    for tj in times:
        xj, aj = state_and_adjoint(f, x0, V, tj, 0.5)
        with torch.no_grad():
            h = torch.tanh(f.l1(xj) + tj * f.c)
            g2 = aj                                  # cotangent of l2's output
            g1 = (aj @ f.l2.weight) * (1 - h * h)    # cotangent of l1's output
            A1 = A1 + xj.T @ xj / 4
            G1 = G1 + g1.T @ g1 / 4
            A2 = A2 + h.T @ h / 4
            G2 = G2 + g2.T @ g2 / 4
    n = len(times)
    for name, (A, G) in (("l1", (A1 / n, G1 / n)), ("l2", (A2 / n, G2 / n))):
        torch.testing.assert_close(stats[name][0], A, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(stats[name][1], G, rtol=1e-7, atol=1e-9)
    assert set(stats) == {"l1", "l2"}


def test_invalid_grid_step():
    blk = ODEBlock(Field())
    with pytest.raises(ValueError, match="invalid grid_step=0"):
        blk.grid_times(0, torch.zeros(1))


@pytest.mark.parametrize("grid_step", [0.1, 0.15])
def test_expansion_solve_gives_the_grid_statistics(grid_step):
    """The same factors from the expansion's one backward solve (t0 added as the last output
    time when the grid does not reach it)."""
    torch.manual_seed(0)
    blk = ODEBlock(Field(), t1=0.5, method="dopri5", rtol=1e-10, atol=1e-12).to(D)
    g = torch.Generator().manual_seed(1)
    x0, V = torch.randn(4, 3, generator=g, dtype=D), torch.randn(4, 3, generator=g, dtype=D)
    with torch.no_grad():
        x1 = blk(x0)
    ref = blk.grid_statistics(x1, V, grid_step=grid_step)
    cols = blk.backward_expansion(x1, V, None, torch.ones(4, dtype=D), grid_step=grid_step)
    plain = blk.backward_expansion(x1, V, None, torch.ones(4, dtype=D))
    assert cols.grid is not None and plain.grid is None and set(cols.grid) == set(ref)
    for n in ref:
        torch.testing.assert_close(cols.grid[n][0], ref[n][0], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(cols.grid[n][1], ref[n][1], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(cols.Q_x, plain.Q_x, rtol=1e-8, atol=1e-10)


class ConvField(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, t, x):
        return self.conv2(torch.tanh(self.conv1(x)))


def test_grid_statistics_of_conv_layers_are_average_of_factors():
    """Conv2d layers inside the field: A = mean_j sum_{b,p} patch patch^T / (B P) of the unfolded
    input at x(t_j), G = mean_j sum_{b,p} g g^T / B of the output cotangent at a(t_j), written
    out with F.unfold and autograd."""
    torch.manual_seed(0)
    blk = ODEBlock(ConvField(), t1=0.5, method="dopri5", rtol=1e-10, atol=1e-12).to(D)
    g = torch.Generator().manual_seed(2)
    B, S = 3, 4
    x0 = torch.randn(B, 2, S, S, generator=g, dtype=D)
    V = torch.randn(B, 2, S, S, generator=g, dtype=D)
    with torch.no_grad():
        x1 = blk(x0)
    stats = blk.grid_statistics(x1, V, grid_step=0.25)
    times = [0.5, 0.25, 0.0]
    f = blk.func
    P = S * S
    acc = {n: [0, 0] for n in ("conv1", "conv2")}
    for tj in times:
        xj, aj = state_and_adjoint(f, x0, V, tj, 0.5)
        z1 = f.conv1(xj.detach()).requires_grad_(True)
        h = torch.tanh(z1)
        (g1,) = torch.autograd.grad((f.conv2(h) * aj).sum(), z1)
        for name, inp, cot in (("conv1", xj, g1), ("conv2", h.detach(), aj)):
            a = torch.nn.functional.unfold(inp, 3, padding=1).transpose(1, 2)  # (B, P, C k k)
            gg = cot.flatten(2).transpose(1, 2)                                  # (B, P, C_out)
            acc[name][0] = acc[name][0] + torch.einsum("bpi,bpj->ij", a, a) / (B * P)
            acc[name][1] = acc[name][1] + torch.einsum("bpi,bpj->ij", gg, gg) / B
    assert set(stats) == {"conv1", "conv2"}
    for name, (A, G) in acc.items():
        torch.testing.assert_close(stats[name][0], A / len(times), rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(stats[name][1], G / len(times), rtol=1e-7, atol=1e-9)
