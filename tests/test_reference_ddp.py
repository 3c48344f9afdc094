"""The dense augmented-chain DDP oracle (tests/reference_ddp.py), validated before it is used on
graphs (the graph identity of docs/method.md's test list).

1. On an nn.Sequential chain the augmented state is the chain's state, so one step of the
   oracle equals one step of OCNOpt(order=2, curvature="full", backend="autograd",
   trust=None): parameters, predicted change and loss after the step.
2. On graphs (residual, inception, projection shortcut), without feedback and value correction
   the propagated V_XX is the Gauss-Newton (resp. exact) Hessian of the loss w.r.t. the
   augmented state, so each player's step is -lr (G_u + wd I + damping I)^{-1} (grad + wd u)
   with G_u the GGN (resp. Hessian) block of the mean loss, computed here by torch.func on the
   whole model: an independent check of the graph layout, the fork rule and the block Jacobians.
3. The augmented-state layout and the feedback Nash masks on small graphs, and the games.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from torch import nn

import ocnopt
from tests._graphs import GRAPHS, graph_batch, make_graph
from tests.reference_ddp import build_steps, dense_ddp_step, floored_solve, nash_masks

RTOL = 1e-9


def chain(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def data(B: int, loss: str, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, generator=g, dtype=torch.float64)
    if loss == "mse":
        return x, torch.randn(B, 3, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (B,), generator=g)


def engine_step(model: nn.Module, x, y, *, loss, lr, damping, weight_decay, gauss_newton, **flags):
    model = copy.deepcopy(model)
    opt = ocnopt.OCNOpt(model, loss=loss, curvature="full", backend="autograd", order=2, lr=lr,
                        damping=damping, weight_decay=weight_decay, trust=None,
                        gauss_newton=gauss_newton, track_loss_after=True, **flags)
    opt.step(x, y)
    step = opt.last_step
    return dict(model.named_parameters()), step.predicted_change, step.loss_after


def assert_close(a, b, rtol=RTOL):
    """|a - b| <= rtol |b| (norm-wise: small entries of a large step carry its rounding)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64).detach()
    assert float(torch.linalg.vector_norm(a - b)) <= rtol * float(torch.linalg.vector_norm(b)), (a, b)


def assert_same_step(model, ref_params, params, rtol=RTOL):
    """The steps (new - old parameters, all tensors stacked) agree norm-wise."""
    old = {k: p.detach() for k, p in model.named_parameters()}
    assert_close(torch.cat([(ref_params[k] - old[k]).reshape(-1) for k in old]),
                 torch.cat([(params[k].detach() - old[k]).reshape(-1) for k in old]), rtol)


CASES = [  # (loss, lr, damping, weight_decay)
    ("cross_entropy", 1.0, 1e-3, 0.0),
    ("cross_entropy", 0.5, 1e-2, 1e-2),
    ("mse", 1.0, 1e-3, 0.0),
    ("mse", 0.7, 1e-3, 5e-2),
]


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("gauss_newton", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_reference_equals_chain_engine(B, gauss_newton, case):
    """params after one step, predicted change and loss after equal the chain engine's."""
    loss, lr, damping, wd = case
    model = chain(seed=B + 7 * int(gauss_newton))
    x, y = data(B, loss)
    ref_params, ref_pred, ref_after = dense_ddp_step(
        model, x, y, loss=loss, lr=lr, damping=damping, weight_decay=wd, gauss_newton=gauss_newton)
    params, pred, after = engine_step(model, x, y, loss=loss, lr=lr, damping=damping,
                                      weight_decay=wd, gauss_newton=gauss_newton)
    moved = sum(float((ref_params[k] - p.detach()).abs().max()) for k, p in model.named_parameters())
    assert moved > 1e-3  # the step is not trivial
    assert_same_step(model, ref_params, params)
    assert_close(ref_pred, pred)
    assert_close(ref_after, after)


@pytest.mark.parametrize("flags", [dict(feedback=False), dict(value_correction=False),
                                   dict(feedback=False, value_correction=False), dict(psd_clip=False)])
def test_reference_flags_equal_chain_engine(flags):
    """feedback / value correction / PSD clip switched off: still the chain engine's step."""
    x, y = data(3, "cross_entropy")
    model = chain(seed=3)
    kw = dict(loss="cross_entropy", lr=1.0, damping=1e-3, weight_decay=1e-2, gauss_newton=False)
    ref_params, ref_pred, ref_after = dense_ddp_step(model, x, y, **kw, **flags)
    params, pred, after = engine_step(model, x, y, **kw, **flags)
    assert_same_step(model, ref_params, params)
    assert_close(ref_pred, pred)
    assert_close(ref_after, after)


def test_feedback_matters_on_chain():
    """The comparison above can fail: without feedback the step differs (B = 3, Newton)."""
    x, y = data(3, "cross_entropy")
    model = chain(seed=3)
    kw = dict(loss="cross_entropy", lr=1.0, damping=1e-3, gauss_newton=False)
    with_fb = dense_ddp_step(model, x, y, **kw)[0]
    without = dense_ddp_step(model, x, y, **kw, feedback=False)[0]
    assert max(float((with_fb[k] - without[k]).abs().max()) for k in with_fb) > 1e-4


def test_lr_zero_keeps_everything():
    """lr = 0: parameters unchanged, predicted change 0, loss after = loss before."""
    x, y = data(2, "mse")
    model = chain()
    params, pred, after = dense_ddp_step(model, x, y, loss="mse", lr=0.0, damping=1e-3)
    for name, p in model.named_parameters():
        assert torch.equal(params[name], p.detach())
    assert pred == 0.0
    assert after == pytest.approx(float(nn.functional.mse_loss(model(x).detach(), y)), rel=1e-12)


def test_augmented_state_layout_residual():
    """Residual block: x stays live until the add; the lin1 output is dropped after tanh."""
    _, inp, steps, result = build_steps(make_graph("residual"))
    names = [[b.name for b in s.blocks_in] for s in steps]
    assert [s.node.name for s in steps] == ["lin1", "tanh", "lin2", "add", "head"]
    assert names == [["x"], ["x", "lin1"], ["x", "tanh"], ["x", "lin2"], ["add"]]
    assert [b.name for b in steps[-1].blocks_out] == ["head"] and result.name == "head"
    _, _, steps, _ = build_steps(make_graph("residual"), include_input=False)
    assert [[b.name for b in s.blocks_in] for s in steps] == [[], ["lin1"], ["tanh"], ["lin2"], ["add"]]


def test_nash_masks_inception():
    """Inception: b1 and b2 ignore the block of the simultaneous branch a; the head sees all."""
    _, _, steps, _ = build_steps(make_graph("inception"))
    masks = nash_masks(steps)
    by_name = {steps[t].node.name: dict(zip([b.name for b in steps[t].blocks_in], m))
               for t, m in masks.items()}
    assert by_name == {"a": {"x": True}, "b1": {"x": True, "a": False},
                       "b2": {"a": False, "tanh": True}, "head": {"cat": True}}
    assert all(all(m) for m in nash_masks(build_steps(make_graph("residual"))[2]).values())


def test_refuses_unsupported():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return operator.sub(self.lin(x), x)

    with pytest.raises(TypeError, match="unsupported function"):
        dense_ddp_step(Odd().double(), torch.zeros(1, 2, dtype=torch.float64),
                       torch.zeros(1, dtype=torch.long), lr=1.0, damping=1e-3)
    with pytest.raises(ValueError, match="invalid game='stackelberg'"):
        dense_ddp_step(chain(), *data(1, "mse"), loss="mse", lr=1.0, damping=1e-3, game="stackelberg")


def block_newton_steps(model, x, y, *, loss, lr, damping, weight_decay, exact):
    """Per player (a module's parameters), from torch.func on the whole model: the step
    -lr M^{-1} (grad + wd u) with M = G + wd I + damping I (floored when indefinite), G the
    GGN block (1/B) sum_i J_i^T H_i J_i (``exact=False``) or the Hessian block of the mean loss
    (``exact=True``), and sum over players of k . g + 1/2 k^T (G + wd I) k."""
    from torch.func import functional_call, grad, hessian, jacrev

    base = {k: p.detach() for k, p in model.named_parameters()}
    players: dict[str, list[str]] = {}
    for k in base:
        players.setdefault(k.rsplit(".", 1)[0], []).append(k)

    def phi(out, yi):
        if loss == "mse":
            return (out - yi).square().mean()
        return -torch.log_softmax(out, 0)[yi]

    new, predicted = dict(base), 0.0
    for names in players.values():
        sizes = [base[k].numel() for k in names]
        u = torch.cat([base[k].reshape(-1) for k in names])

        def out(uf, i, names=names, sizes=sizes):
            p = dict(base)
            p.update({k: c.reshape(base[k].shape) for k, c in zip(names, uf.split(sizes))})
            return functional_call(model, p, (x[i:i + 1],)).reshape(-1)

        def mean_loss(uf, out=out):
            return torch.stack([phi(out(uf, i), y[i]) for i in range(x.shape[0])]).mean()

        g = grad(mean_loss)(u) + weight_decay * u
        if exact:
            G = hessian(mean_loss)(u)
        else:
            G = torch.stack([jacrev(out)(u, i).T @ hessian(phi)(out(u, i), y[i]) @ jacrev(out)(u, i)
                             for i in range(x.shape[0])]).mean(0)
        G = G + weight_decay * torch.eye(u.numel(), dtype=u.dtype)
        k = -lr * floored_solve(G, damping, 1e-6) @ g
        predicted += float(k @ g + 0.5 * k @ G @ k)
        offset = 0
        for name in names:
            new[name] = base[name] + k[offset:offset + base[name].numel()].reshape(base[name].shape)
            offset += base[name].numel()
    return new, predicted


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_graph_open_loop_equals_block_newton(name, exact):
    """Graphs, no feedback, no value correction (no PSD clip under Newton): the reference's step
    is the block Gauss-Newton / Newton step of torch.func on the whole model."""
    model = make_graph(name, seed=2)
    x, y = graph_batch(3, "cross_entropy")
    kw = dict(loss="cross_entropy", lr=0.8, damping=0.5, weight_decay=1e-2)
    ref_params, ref_pred, _ = dense_ddp_step(model, x, y, **kw, gauss_newton=not exact,
                                             feedback=False, value_correction=False, psd_clip=not exact)
    params, pred = block_newton_steps(model, x, y, **kw, exact=exact)
    assert_same_step(model, ref_params, params)
    assert_close(ref_pred, pred)


@pytest.mark.parametrize("gauss_newton", [True, False])
def test_reference_games(gauss_newton):
    """nash == cooperative where no players are simultaneous (residual, exactly); they differ on
    the inception block and the projection shortcut (Gauss-Newton); the value recursion, hence
    the open-loop steps and the predicted change, is the same in both games."""
    kw = dict(loss="cross_entropy", lr=1.0, damping=1e-2 if gauss_newton else 1.0,
              gauss_newton=gauss_newton)
    x, y = graph_batch(3, "cross_entropy")
    model = make_graph("residual", seed=3)
    coop, nash = (dense_ddp_step(model, x, y, **kw, game=g) for g in ("cooperative", "nash"))
    assert all(torch.equal(coop[0][k], nash[0][k]) for k in coop[0]) and coop[1] == nash[1]
    for name in ("inception", "projection"):
        model = make_graph(name, seed=3)
        coop, nash = (dense_ddp_step(model, x, y, **kw, game=g) for g in ("cooperative", "nash"))
        assert coop[1] == nash[1]
        open_loop = [dense_ddp_step(model, x, y, **kw, game=g, feedback=False)[0]
                     for g in ("cooperative", "nash")]
        assert all(torch.equal(open_loop[0][k], open_loop[1][k]) for k in coop[0])
        if gauss_newton:
            diff = torch.cat([(coop[0][k] - nash[0][k]).reshape(-1) for k in coop[0]])
            step = torch.cat([(coop[0][k] - p.detach()).reshape(-1) for k, p in model.named_parameters()])
            assert float(diff.norm() / step.norm()) > 1e-3


def conv_chain(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(8, 3)).double()


@pytest.mark.parametrize("gauss_newton", [True, False])
def test_reference_equals_chain_engine_conv(gauss_newton):
    """Conv2d, ReLU, AvgPool2d, Flatten, Linear as a chain: the chain engine's step."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2,), generator=g)
    model = conv_chain()
    kw = dict(loss="cross_entropy", lr=1.0, damping=0.1, weight_decay=1e-2, gauss_newton=gauss_newton)
    ref_params, ref_pred, ref_after = dense_ddp_step(model, x, y, **kw)
    params, pred, after = engine_step(model, x, y, **kw)
    assert_same_step(model, ref_params, params)
    assert_close(ref_pred, pred)
    assert_close(ref_after, after)


class Gated(nn.Module):
    """y = head(flatten(relu(a(x)) * tanh(b(x)))): call_function mul and relu, method flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.a(x)) * torch.tanh(self.b(x))
        return self.head(h.flatten(1))


@pytest.mark.parametrize("exact", [False, True])
def test_gated_graph_open_loop_equals_block_newton(exact):
    torch.manual_seed(6)
    model = Gated().double()
    x, y = graph_batch(3, "mse")
    kw = dict(loss="mse", lr=1.0, damping=0.3, weight_decay=0.0)
    ref_params, ref_pred, _ = dense_ddp_step(model, x, y, **kw, gauss_newton=not exact,
                                             feedback=False, value_correction=False, psd_clip=not exact)
    params, pred = block_newton_steps(model, x, y, **kw, exact=exact)
    assert_same_step(model, ref_params, params)
    assert_close(ref_pred, pred)
