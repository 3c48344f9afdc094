"""The BackPACK backend: Kronecker factors from BackPACK, rank-1 value-gradient feedback."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ocnopt


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(),
                         nn.Linear(4, 3)).double()


def data(B=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (B,), generator=g))


def factors(opt):
    return {st.index: (opt.state[st.params[0]]["A"], opt.state[st.params[0]]["G"])
            for st in opt.stages if st.has_control}


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_kflr_factors_equal_lowrank_exact_factors(loss):
    """With value_correction off, BackPACK's KFLR factors of Linear stages equal the factors
    the lowrank backend builds from the propagated exact terminal factor."""
    x, y = data()
    if loss == "mse":
        y = torch.randn(len(y), 3, dtype=torch.float64)
    common = dict(loss=loss, curvature="kfac", order=2, value_correction=False, lr=0.0,
                  stat_decay=0.0, inv_every=1)
    bp = ocnopt.OCNOpt(mlp(), backend="backpack", **common)
    low = ocnopt.OCNOpt(mlp(), backend="lowrank", backend_options={"terminal": "exact"},
                        fisher_type="type-2", **common)
    bp.step(x, y)
    low.step(x, y)
    for (A1, G1), (A2, G2) in zip(factors(bp).values(), factors(low).values()):
        torch.testing.assert_close(A1, A2, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(G1, G2, rtol=1e-10, atol=1e-14)


def test_sampled_kfac_factors_match_kflr_in_expectation():
    """BackPACK KFAC draws mc_samples labels: G is an unbiased estimate of KFLR's G. With
    4000 samples the relative error of G is about 1/sqrt(4000) ~ 1.6%: tolerance 10%."""
    x, y = data(B=16)
    common = dict(curvature="kfac", lr=0.0, stat_decay=0.0, inv_every=1)
    torch.manual_seed(1)
    mc = ocnopt.OCNOpt(mlp(), backend="backpack",
                       backend_options={"extension": "kfac", "mc_samples": 4000}, **common)
    exact = ocnopt.OCNOpt(mlp(), backend="backpack", **common)
    mc.step(x, y)
    exact.step(x, y)
    for (A1, G1), (A2, G2) in zip(factors(mc).values(), factors(exact).values()):
        torch.testing.assert_close(A1, A2)
        assert torch.linalg.norm(G1 - G2) <= 0.1 * torch.linalg.norm(G2)


@pytest.mark.parametrize("curv", ["sgd", "adam"])
@pytest.mark.parametrize("order", [1, 2])
def test_backpack_first_order_modes_are_the_autograd_ones(curv, order):
    """Identities 1 / 2 (docs/method.md section 10): without Kronecker statistics the
    BackPACK backend is backprop at order 1 and, with feedback and value correction off, at
    order 2."""
    x, y = data()
    m1, m2 = mlp(), mlp()
    a = ocnopt.OCNOpt(m1, curvature=curv, lr=0.05)
    b = ocnopt.OCNOpt(m2, curvature=curv, lr=0.05, backend="backpack", order=order,
                      feedback=False, value_correction=False)
    for s in range(3):
        x, y = data(seed=s)
        a.step(x, y)
        b.step(x, y)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_kfac_with_feedback_trains_and_leaves_grad_alone():
    model = mlp()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    opt = ocnopt.OCNOpt(model, curvature="kfac", backend="backpack", order=2, lr=0.2,
                        damping=0.1, set_grad=False)  # set_grad=True would write Qbar_u there
    x, y = data(B=32)
    first = float(opt.step(x, y))
    for _ in range(20):
        opt.step(x, y)
    assert opt.last_step.loss_after < 0.7 * first
    assert all(torch.all(p.grad == 7.0) for p in model.parameters())
    assert not any(hasattr(p, "kflr") for p in model.parameters())
    assert any(s.feedback_norm > 0 for s in opt.last_step.stages)


def test_user_modules_are_not_extended():
    model = mlp()
    ocnopt.OCNOpt(model, curvature="kfac", backend="backpack").step(*data())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_unsupported_module_is_refused_with_backpacks_list():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"GELU at stage position 1 .*Supported by BackPACK: .*Linear"):
        ocnopt.OCNOpt(model, curvature="kfac", backend="backpack")


def test_loss_without_backpack_extension_is_refused():
    def hinge(out, y):
        return (1 - out.gather(1, y[:, None])).clamp_min(0).squeeze(1)

    with pytest.raises(ValueError, match="supports loss 'cross_entropy' or 'mse'"):
        ocnopt.OCNOpt(mlp(), loss=hinge, curvature="kfac", backend="backpack")


def test_invalid_extension_is_refused():
    with pytest.raises(ValueError, match=r"invalid extension='kfc'.*kflr"):
        ocnopt.OCNOpt(mlp(), curvature="kfac", backend="backpack",
                      backend_options={"extension": "kfc"})


def test_ekfac_on_a_cnn_runs_all_extensions_to_a_lower_loss():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 16, 4))
    x, y = torch.randn(16, 1, 4, 4), torch.randint(0, 4, (16,))
    for ext in ("kflr", "kfac", "kfra"):
        model = copy.deepcopy(base)
        opt = ocnopt.OCNOpt(model, curvature="ekfac", backend="backpack", order=2, lr=0.1,
                            damping=0.1, backend_options={"extension": ext})
        first = float(opt.step(x, y))
        for _ in range(10):
            opt.step(x, y)
        assert opt.last_step.loss_after < first
