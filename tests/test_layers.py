"""Layer handlers beyond Linear/Conv (docs/method.md, "Layers").

* order 1 with BatchNorm (training and eval mode), LayerNorm, GroupNorm, Embedding, PReLU,
  Hardswish equals torch.optim on a deep copy, running statistics included (updated exactly
  once per step, also at order 2 and with ``track_loss_after``);
* BatchNorm's ``functional`` is the per-sample map with the nominal batch statistics frozen
  (its Jacobians equal the analytic ones) and ``replay`` reproduces the nominal output;
* kfac/ekfac use the diagonal fallback on parameters without Kronecker factors (an
  independent computation of -lr (D + damping)^-1 g) while the Linear layers keep K-FAC;
* order 2 runs with norms in the chain and reproduces order 1 without feedback and value
  correction (bit for bit);
* ``handler_for`` and ``check`` refuse what cannot be a stage, naming the class.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap

import ocnopt
from ocnopt.derivatives import DERIVATIVES, GENERIC, handler_for
from ocnopt.derivatives.norm import BatchNormDerivatives

DT = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-12}


# ---- models and data --------------------------------------------------------------------------
def bn1d() -> nn.Sequential:  # a bias before a BatchNorm has zero gradient: left out
    return nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def bn2d() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(27, 3))


def layernorm() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))


def groupnorm() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                         nn.Linear(36, 3))


def embedding() -> nn.Sequential:
    return nn.Sequential(nn.Embedding(10, 3, padding_idx=0), nn.Flatten(), nn.Linear(15, 3))


def prelu() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.PReLU(6), nn.Linear(6, 3))


def hardswish() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 6), nn.Hardswish(), nn.Linear(6, 3))


MODELS = {"bn1d": bn1d, "bn2d": bn2d, "layernorm": layernorm, "groupnorm": groupnorm,
          "embedding": embedding, "prelu": prelu, "hardswish": hardswish}
INPUTS = {"bn2d": (2, 5, 5), "groupnorm": (2, 5, 5), "embedding": None}


def build(name: str, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return MODELS[name]().to(DT)


def batches(name: str, n: int, B: int = 8, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = INPUTS.get(name, (4,))
    out = []
    for _ in range(n):
        if shape is None:  # token indices, 0 is the padding index
            x = torch.randint(0, 10, (B, 5), generator=g)
        else:
            x = torch.randn(B, *shape, generator=g, dtype=DT)
        out.append((x, torch.randint(0, 3, (B,), generator=g)))
    return out


def assert_same_state(model: nn.Module, ref: nn.Module) -> None:
    """Parameters and buffers (running statistics) equal; counters exactly."""
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for key in got:
        if got[key].is_floating_point():
            torch.testing.assert_close(got[key], want[key], **TOL, msg=lambda m, k=key: f"{k}: {m}")
        else:
            assert torch.equal(got[key], want[key]), key


def torch_twin(model: nn.Module, curvature: str, lr: float) -> torch.optim.Optimizer:
    if curvature == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=lr)


# ---- order 1 against torch.optim -------------------------------------------------------------
@pytest.mark.parametrize("track", [False, True])
@pytest.mark.parametrize("curvature", ["sgd", "adam"])
@pytest.mark.parametrize("name", list(MODELS))
def test_order1_equals_torch_optim_running_statistics_included(name, curvature, track):
    model = build(name)
    ref = copy.deepcopy(model)
    hp = {"momentum": 0.9} if curvature == "sgd" else {}
    opt = ocnopt.OCNOpt(model, curvature=curvature, lr=0.05, order=1, track_loss_after=track, **hp)
    twin = torch_twin(ref, curvature, 0.05)
    for x, y in batches(name, 3):
        loss = opt.step(x, y)
        twin.zero_grad()
        ref_loss = F.cross_entropy(ref(x), y)
        ref_loss.backward()
        twin.step()
        torch.testing.assert_close(loss, ref_loss.detach(), **TOL)
    assert_same_state(model, ref)
    if name.startswith("bn"):
        assert int(model[1].num_batches_tracked) == 3


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_options_follow_torch(momentum, affine, track):
    torch.manual_seed(3)
    bn = nn.BatchNorm1d(6, affine=affine, momentum=momentum, track_running_stats=track)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), bn, nn.Tanh(), nn.Linear(6, 3)).to(DT)
    ref = copy.deepcopy(model)
    opt = ocnopt.OCNOpt(model, curvature="adam", lr=0.05)
    twin = torch_twin(ref, "adam", 0.05)
    for x, y in batches("bn1d", 3):
        opt.step(x, y)
        twin.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        twin.step()
    assert_same_state(model, ref)


def test_batchnorm_in_eval_mode_uses_running_statistics_and_keeps_them():
    model = build("bn2d")
    with torch.no_grad():  # non-trivial running statistics
        for x, _ in batches("bn2d", 2, seed=7):
            model(x)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num" in k}
    ref = copy.deepcopy(model)
    opt = ocnopt.OCNOpt(model, curvature="adam", lr=0.05, track_loss_after=True)
    twin = torch_twin(ref, "adam", 0.05)
    for x, y in batches("bn2d", 3):
        opt.step(x, y)
        twin.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        twin.step()
    assert_same_state(model, ref)
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("backend", ["lowrank", "autograd"])
def test_running_statistics_updated_once_per_step_at_order2(backend):
    """Order 2 replays BatchNorm in the update pass: the running statistics after each step are
    those of one torch forward pass of the model as it was before the step."""
    model = build("bn1d")
    opt = ocnopt.OCNOpt(model, curvature="adam", lr=0.05, order=2, backend=backend)
    for x, y in batches("bn1d", 3):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin(x)  # one training-mode forward pass
        opt.step(x, y)
        for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
            want = twin.state_dict()[key]
            got = model.state_dict()[key]
            assert torch.equal(got, want), key
    assert int(model[1].num_batches_tracked) == 3
    assert any(s.feedback_norm > 0 for s in opt.last_step.stages)


# ---- BatchNorm's handler ---------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 5), (7, 5, 3, 2)])
def test_batchnorm_functional_freezes_the_nominal_statistics(shape):
    torch.manual_seed(0)
    bn = (nn.BatchNorm1d(5) if len(shape) == 2 else nn.BatchNorm2d(5)).to(DT)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    x = torch.randn(*shape, dtype=DT)
    h = DERIVATIVES[type(bn)]
    assert isinstance(h, BatchNormDerivatives)
    reference = copy.deepcopy(bn)
    out, ctx = h.forward(bn, x)
    reference(x)  # one torch forward: the same running statistics
    assert torch.equal(bn.running_mean, reference.running_mean)
    assert torch.equal(bn.running_var, reference.running_var)
    assert int(bn.num_batches_tracked) == 1

    # replay at unchanged parameters: the nominal output, running statistics untouched
    replayed = h.replay(bn, x, ctx)
    assert torch.equal(replayed, out)
    assert torch.equal(bn.running_mean, reference.running_mean)
    assert int(bn.num_batches_tracked) == 1

    # per-sample Jacobians with mean and biased variance as constants, computed independently
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dims, unbiased=False)
    view = (-1, *([1] * (x.dim() - 2)))
    inv = 1.0 / torch.sqrt(var + bn.eps)
    params = {"weight": bn.weight.detach(), "bias": bn.bias.detach()}

    def f(p, xi):
        return h.functional(bn, p, xi.unsqueeze(0), ctx).squeeze(0)

    J_p, J_x = vmap(jacrev(f, argnums=(0, 1)), in_dims=(None, 0))(params, x)
    n = x[0].numel()
    C = x.shape[1]
    spatial = n // C
    # dy/dx: diagonal, w_c / sqrt(var_c + eps) on channel c
    diag = (bn.weight.detach() * inv).repeat_interleave(spatial)
    want_x = torch.diag(diag).expand(x.shape[0], n, n)
    torch.testing.assert_close(J_x.reshape(x.shape[0], n, n), want_x, **TOL)
    # dy/dw_c = (x - mean_c) / sqrt(var_c + eps) on channel c, dy/db_c = 1 on channel c
    xhat = (x - mean.reshape(view)) * inv.reshape(view)
    onehot = torch.eye(C, dtype=DT).reshape(1, C, *([1] * (x.dim() - 2)), C)
    want_w = (xhat.unsqueeze(-1) * onehot).reshape(x.shape[0], n, C)
    want_b = onehot.expand(x.shape[0], *x.shape[1:], C).reshape(x.shape[0], n, C)
    torch.testing.assert_close(J_p["weight"].reshape(x.shape[0], n, C), want_w, **TOL)
    torch.testing.assert_close(J_p["bias"].reshape(x.shape[0], n, C), want_b, **TOL)
    # at the nominal input the frozen map gives the nominal output (up to rounding)
    torch.testing.assert_close(h.functional(bn, params, x, ctx), out.detach(), **TOL)


def test_batchnorm_replay_uses_the_batch_statistics_of_its_own_input():
    torch.manual_seed(1)
    bn = nn.BatchNorm1d(4).to(DT)
    x = torch.randn(6, 4, dtype=DT)
    h = DERIVATIVES[nn.BatchNorm1d]
    _, ctx = h.forward(bn, x)
    stats = bn.running_mean.clone(), bn.running_var.clone()
    x2 = 3 * x + 1
    want = F.batch_norm(x2, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    assert torch.equal(h.replay(bn, x2, ctx), want)
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])


def test_channel_dropout_replays_one_mask_per_sample_and_channel():
    torch.manual_seed(0)
    drop = nn.Dropout2d(0.5)
    h = DERIVATIVES[nn.Dropout2d]
    x = torch.randn(4, 6, 3, 3, dtype=DT)
    out, mask = h.forward(drop, x)
    assert mask.shape == (4, 6, 1, 1)
    assert set(mask.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(h.replay(drop, x, mask), out)
    kept = out.ne(0).flatten(2)  # whole channels kept or dropped
    assert torch.equal(kept.all(-1) | ~kept.any(-1), torch.ones(4, 6, dtype=torch.bool))


# ---- kfac / ekfac: the diagonal fallback -----------------------------------------------------
def kfac_reference_step(model, x, y, state, lr, damping, decay, step, norm_index):
    """One kfac step computed independently: K-FAC on the Linear layers (inverses refreshed
    every step), -lr (D + damping)^-1 g on the norm's parameters, D = EMA of g^2."""
    inputs, outputs = {}, {}

    def record(i):
        def hook(module, args, out):
            inputs[i] = args[0].detach()
            out.retain_grad()
            outputs[i] = out
        return hook

    hooks = [m.register_forward_hook(record(i)) for i, m in enumerate(model)
             if isinstance(m, nn.Linear)]
    loss = F.cross_entropy(model(x), y)
    model.zero_grad()
    loss.backward()
    for hk in hooks:
        hk.remove()
    B = x.shape[0]
    with torch.no_grad():
        for i, m in enumerate(model):
            if isinstance(m, nn.Linear):
                a = inputs[i]
                g = outputs[i].grad * B  # per-sample output gradients
                A, G = a.T @ a / B, g.T @ g / B
                if i in state:
                    A = decay * state[i][0] + (1 - decay) * A
                    G = decay * state[i][1] + (1 - decay) * G
                state[i] = (A, G)
                eye_a, eye_g = torch.eye(A.shape[0], dtype=DT), torch.eye(G.shape[0], dtype=DT)
                Ai, Gi = torch.linalg.inv(A + damping * eye_a), torch.linalg.inv(G + damping * eye_g)
                m.weight -= lr * Gi @ m.weight.grad @ Ai
                if m.bias is not None:
                    m.bias -= lr * Gi @ m.bias.grad
            elif i == norm_index:
                for name, p in m.named_parameters():
                    sq = p.grad.square()
                    key = (i, name)
                    D = sq if key not in state else decay * state[key] + (1 - decay) * sq
                    state[key] = D
                    p -= lr * p.grad / (D + damping)


@pytest.mark.parametrize("name, index", [("bn1d", 1), ("layernorm", 1), ("embedding", 0),
                                         ("prelu", 1)])
def test_kfac_diagonal_fallback_on_norm_parameters_matches_an_independent_step(name, index):
    model = build(name)
    ref = copy.deepcopy(model)
    lr, damping, decay = 0.1, 0.3, 0.8
    opt = ocnopt.OCNOpt(model, curvature="kfac", lr=lr, damping=damping, stat_decay=decay,
                        inv_every=1)
    state: dict = {}
    for step, (x, y) in enumerate(batches(name, 3, B=16)):
        opt.step(x, y)
        kfac_reference_step(ref, x, y, state, lr, damping, decay, step, norm_index=index)
        assert_same_state(model, ref)
    # the fallback's state lives in the parameters' own state dicts
    for p in model[index].parameters():
        assert {"diag", "diag_damping"} <= set(opt.state[p])


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_diagonal_fallback_state_round_trips_and_momentum_applies(curvature):
    model = build("layernorm")
    twin = copy.deepcopy(model)
    hp = {"curvature": curvature, "lr": 0.1, "damping": 0.3, "momentum": 0.5}
    opt = ocnopt.OCNOpt(model, **hp)
    data = batches("layernorm", 4)
    for x, y in data[:2]:
        opt.step(x, y)
    twin.load_state_dict(model.state_dict())
    opt2 = ocnopt.OCNOpt(twin, **hp)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    p = model[1].weight
    assert "momentum_buffer" in opt.state[p]
    for x, y in data[2:]:
        before = p.detach().clone()
        opt.step(x, y)
        opt2.step(x, y)
        assert not torch.equal(before, p)
    assert_same_state(model, twin)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_ekfac_and_kfac_step_norm_parameters_with_the_same_fallback(curvature):
    """One step from the same start: the norm's parameters move by -lr (g^2 + damping)^-1 g
    (the first D is g^2) whatever the Kronecker model of the Linear layers."""
    model = build("bn1d")
    ref = copy.deepcopy(model)
    x, y = batches("bn1d", 1, B=16)[0]
    opt = ocnopt.OCNOpt(model, curvature=curvature, lr=0.1, damping=0.3)
    opt.step(x, y)
    F.cross_entropy(ref(x), y).backward()
    for p, q in zip(model[1].parameters(), ref[1].parameters()):
        want = q.detach() - 0.1 * q.grad / (q.grad.square() + 0.3)
        torch.testing.assert_close(p.detach(), want, **TOL)


# ---- order 2 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["lowrank", "autograd"])
@pytest.mark.parametrize("name", ["bn1d", "layernorm", "bn2d"])
def test_order2_without_feedback_and_correction_is_order1_bit_for_bit(name, backend):
    m1, m2 = build(name), build(name)
    o1 = ocnopt.OCNOpt(m1, curvature="adam", lr=0.05, order=1)
    o2 = ocnopt.OCNOpt(m2, curvature="adam", lr=0.05, order=2, backend=backend, feedback=False,
                       value_correction=False)
    for x, y in batches(name, 3):
        assert torch.equal(o1.step(x, y), o2.step(x, y))
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("backend", ["lowrank", "autograd"])
@pytest.mark.parametrize("name", ["bn1d", "bn2d", "layernorm", "groupnorm", "prelu", "hardswish"])
@pytest.mark.parametrize("curvature", ["adam", "kfac"])
def test_order2_with_norms_steps_with_feedback(name, backend, curvature):
    model = build(name)
    opt = ocnopt.OCNOpt(model, curvature=curvature, lr=0.05, order=2, backend=backend)
    for x, y in batches(name, 2):
        loss = opt.step(x, y)
        assert torch.isfinite(loss)
        assert not opt.last_step.skipped
        assert opt.last_step.loss_after is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(s.feedback_norm > 0 for s in opt.last_step.stages)


# ---- handler_for, check, positions -----------------------------------------------------------
@pytest.mark.parametrize("module, match", [
    (nn.RReLU(), r"RReLU: draws random numbers in training mode"),
    (nn.AlphaDropout(0.2), r"AlphaDropout: draws random numbers in training mode"),
    (nn.Embedding(5, 2, sparse=True), r"Embedding: sparse=True"),
    (nn.Embedding(5, 2, max_norm=1.0), r"Embedding: max_norm=1.0 renormalises the weight"),
    (nn.Embedding(5, 2, scale_grad_by_freq=True), r"Embedding: scale_grad_by_freq=True"),
    (nn.LSTM(3, 3), r"LSTM: returns a tuple"),
    (nn.Sequential(nn.Linear(2, 2)), r"Sequential: is a container"),
    (nn.InstanceNorm1d(3, track_running_stats=True), r"InstanceNorm1d: track_running_stats"),
])
def test_handler_for_refuses_with_the_class_and_the_reason(module, match):
    with pytest.raises(TypeError, match=match + r".*Layers with their own handler: .*Linear"):
        handler_for(module)


class Scale(nn.Module):
    """A custom leaf module with a parameter: y = s * x."""

    def __init__(self, n: int):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return self.s * x


def test_handler_for_gives_table_and_generic_handlers():
    assert handler_for(nn.Linear(2, 3)) is DERIVATIVES[nn.Linear]
    assert handler_for(nn.RReLU().eval()) is DERIVATIVES[nn.RReLU]
    for module in (nn.PReLU(), nn.Mish(), nn.Hardsigmoid(), Scale(3), nn.Upsample(scale_factor=2)):
        h = handler_for(module)
        assert not h.kronecker
        assert h is GENERIC or h is DERIVATIVES[type(module)]


def test_generic_handler_per_sample_jacobian_of_a_custom_module():
    torch.manual_seed(0)
    m = Scale(4).to(DT)
    h = handler_for(m)
    x = torch.randn(5, 4, dtype=DT)
    params = {"s": m.s.detach()}
    J = vmap(jacrev(lambda p, xi: h.functional(m, p, xi.unsqueeze(0), None).squeeze(0)),
             in_dims=(None, 0))(params, x)["s"]
    torch.testing.assert_close(J, torch.diag_embed(x), **TOL)


@pytest.mark.parametrize("shape, n", [((5, 4), 4), ((5, 4, 3), 4), ((5, 4), 1)])
def test_prelu_functional_per_sample_jacobians(shape, n):
    torch.manual_seed(0)
    m = nn.PReLU(n, init=0.3).to(DT)
    with torch.no_grad():
        m.weight.uniform_(0.1, 0.9)
    h = handler_for(m)
    x = torch.randn(*shape, dtype=DT)
    params = {"weight": m.weight.detach()}

    def f(p, xi):
        return h.functional(m, p, xi.unsqueeze(0), None).squeeze(0)

    J_p, J_x = vmap(jacrev(f, argnums=(0, 1)), in_dims=(None, 0))(params, x)
    torch.testing.assert_close(h.functional(m, params, x, None), m(x).detach(), **TOL)
    w = m.weight.detach().reshape(-1, *([1] * (x.dim() - 2))) if n > 1 else m.weight.detach()
    slope = torch.where(x >= 0, torch.ones_like(x), w * torch.ones_like(x))
    k = x[0].numel()
    torch.testing.assert_close(J_x.reshape(-1, k, k), torch.diag_embed(slope.reshape(-1, k)), **TOL)
    neg = torch.where(x >= 0, torch.zeros_like(x), x)  # dy/dw_c = min(0, x) on channel c
    if n > 1:
        onehot = torch.eye(n, dtype=DT).reshape(1, n, *([1] * (x.dim() - 2)), n)
        want = (neg.unsqueeze(-1) * onehot).reshape(-1, k, n)
    else:
        want = neg.reshape(-1, k, 1)
    torch.testing.assert_close(J_p["weight"].reshape(-1, k, n), want, **TOL)


def test_rrelu_in_training_mode_is_refused_when_the_step_runs():
    """Refused at construction in training mode; built in eval mode, a step after switching
    back to training mode is refused too."""
    model = nn.Sequential(nn.Linear(4, 6), nn.RReLU(), nn.Linear(6, 3)).to(DT)
    with pytest.raises(TypeError, match=r"RReLU at stage position 1 \(model.1\): draws random"):
        ocnopt.OCNOpt(model, curvature="sgd")
    model.eval()
    opt = ocnopt.OCNOpt(model, curvature="sgd")
    x, y = batches("prelu", 1)[0]
    opt.step(x, y)
    model.train()
    with pytest.raises(TypeError, match="RReLU at a stage: draws random numbers"):
        opt.step(x, y)


@pytest.mark.parametrize("module, match", [
    (nn.MaxPool2d(2, return_indices=True), r"MaxPool2d at stage position 3 \(model\.layer1\.0\): "
                                           r"return_indices=True"),
    (nn.Flatten(0), r"Flatten at stage position 3 \(model\.layer1\.0\): start_dim=0 mixes the "
                    r"samples"),
    (nn.Embedding(4, 2, max_norm=2.0), r"Embedding at stage position 3 \(model\.layer1\.0\): "
                                       r"max_norm=2\.0"),
])
def test_check_names_where(module, match):
    h = DERIVATIVES[type(module)]
    with pytest.raises(TypeError, match=match):
        h.check(module, "stage position 3 (model.layer1.0)")
    for fine in (nn.MaxPool2d(2), nn.Flatten(), nn.Embedding(4, 2)):
        DERIVATIVES[type(fine)].check(fine, "stage position 3 (model.layer1.0)")


@pytest.mark.parametrize("module, shape, want", [
    (nn.Linear(4, 3), (3,), 1),
    (nn.Linear(4, 3), (5, 3), 5),
    (nn.Conv2d(2, 3, 3), (3, 4, 4), 16),
    (nn.Conv1d(2, 3, 3), (3, 7), 7),
    (nn.BatchNorm2d(3), (3, 4, 4), 1),
    (nn.LayerNorm(6), (6,), 1),
])
def test_positions(module, shape, want):
    n = int(torch.Size(shape).numel())
    assert handler_for(module).positions(module, n) == want
    if isinstance(module, nn.Linear):
        module.weight.requires_grad_(False)  # frozen weight: not a Kronecker control
        assert handler_for(module).positions(module, n) == 1


def test_embedding_first_stage_at_order2_lowrank():
    """Integer inputs: no value gradient at the input; the low-rank backend's order 2 runs
    (the exact backend takes per-sample f_x by jacrev, which an integer input does not have)."""
    model = build("embedding")
    opt = ocnopt.OCNOpt(model, curvature="kfac", lr=0.05, order=2, backend="lowrank")
    for x, y in batches("embedding", 2):
        assert torch.isfinite(opt.step(x, y))
        assert not opt.last_step.skipped


def test_positions_agree_with_the_optimizers_count_on_a_trajectory():
    from ocnopt.engine import weight_positions

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(2), nn.Linear(25, 4),
                          nn.LayerNorm(4), nn.Flatten(), nn.Linear(12, 3)).to(DT)
    opt = ocnopt.OCNOpt(model, curvature="sgd")
    x = torch.randn(2, 2, 5, 5, dtype=DT)
    traj = opt.engine.nominal(x)
    for t, st in enumerate(opt.stages):
        n = traj.states[t + 1][0].numel()
        got = handler_for(st.module).positions(st.module, n)
        expected = n // st.params[0].shape[0] if st.kronecker else 1  # out / d_out
        assert got == expected == weight_positions(st, traj), st


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_closed_forms_equal_torch_func(dims, train):
    """BatchNorm's param_jvp and per-sample parameter gradients (closed forms used by the
    low-rank backend) equal torch.func.jvp / vmap(grad) of ``functional``."""
    from torch.func import grad, jvp, vmap

    torch.manual_seed(0)
    module = (nn.BatchNorm1d(3) if dims == 1 else nn.BatchNorm2d(3)).to(DT)
    module.train(train)
    x = torch.randn(5, 3, *([4] * dims), dtype=DT)
    h = handler_for(module)
    _, ctx = h.forward(module, x)
    names = ["weight", "bias"]
    params = {n: getattr(module, n).detach().clone() for n in names}
    tangent = {n: torch.randn_like(p) for n, p in params.items()}
    got = h.param_jvp(module, params, x, ctx, tangent)
    ref = jvp(lambda w, b: h.functional(module, {"weight": w, "bias": b}, x, ctx),
              tuple(params.values()), tuple(tangent.values()))[1]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn(5, 2, *x.shape[1:], dtype=DT)
    closed = h.per_sample_param_grads(module, names, x, ctx, cot)
    cdim = 0 if isinstance(ctx, torch.Tensor) else None

    def psi(ps, xi, ci, zi):
        c = ci.unsqueeze(0) if cdim == 0 else ci
        return (h.functional(module, dict(zip(names, ps)), xi.unsqueeze(0), c)[0] * zi).sum()

    ref_w = vmap(vmap(grad(psi), in_dims=(None, None, None, 0)), in_dims=(None, 0, cdim, 0))(
        tuple(params.values()), x, ctx, cot)
    for g, r in zip(closed, ref_w):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
