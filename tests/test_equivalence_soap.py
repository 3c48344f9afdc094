"""Order-1 OCNOpt with curvature soap / shampoo is pytorch-optimizer's SOAP / Shampoo step for
step; their curvature models (M^{-1}, M, per-sample Gram matrices) are what order 2 needs.

* ``test_matches_pytorch_optimizer``: random chains (MLPs, Conv1d/Conv2d nets), random
  hyper-parameters with eigenbasis / inverse-root refreshes every 1-3 steps, float64 to 1e-10
  relative and float32 to float tolerance. The twin is driven with the gradient ocnopt's
  curvature model received, and that gradient is checked against torch autograd of the mean
  loss at ocnopt's parameters, at every step. Why not the twin's own gradient: SOAP's bases are
  eigenvectors of rank-deficient factors (a batch gradient has rank <= B), whose null-space
  eigenvectors are any basis of it, chosen by rounding; the gradients of ocnopt and of autograd
  agree to ~1e-16 but not bit for bit, which picks another basis there and a different Adam
  step in it (observed differences of order 1 after a few steps). With the same gradient every
  factor is the same to the bit and the parameters agree to a few ulps.
* ``test_harness_peer_equals_ocnopt``: through the benchmark harness's own loop, the peers
  ``soap`` / ``shampoo`` and ``autograd-soap`` / ``autograd-shampoo`` end at the same
  parameters, on a problem whose factors have full rank from the first step (square layers,
  B >= width: the eigenbasis is unique, so the twin may use its own gradients).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_equivalence_torch import TOL32, TOL64, TORCH_LOSS, assert_params_close, chains, make_batch
from torch import nn

import ocnopt

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

SETTINGS = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# the gradient handed to the curvature model against autograd's at the same parameters
# (one backward pass; float32: sums over the batch and positions in another order)
GRAD64 = {"rtol": 1e-9, "atol": 1e-12}
GRAD32 = {"rtol": 1e-4, "atol": 1e-6}
# the harness check lets the twin compute its own gradients (see its docstring)
HARNESS64 = {"rtol": 1e-9, "atol": 1e-12, "motion": 1e-8}


@st.composite
def soap_hp(draw) -> dict[str, Any]:
    return {"lr": draw(st.floats(1e-3, 2e-2)),
            "betas": (draw(st.floats(0.0, 0.95)), draw(st.floats(0.5, 0.999))),
            "shampoo_beta": draw(st.one_of(st.none(), st.floats(0.5, 0.99))),
            "precondition_frequency": draw(st.integers(1, 3)),
            "max_precondition_dim": draw(st.sampled_from([10000, 4])),
            "precondition_1d": draw(st.booleans()), "correct_bias": draw(st.booleans()),
            "normalize_gradient": draw(st.booleans()),
            "eps": draw(st.sampled_from([1e-8, 1e-6])),
            "weight_decay": draw(st.one_of(st.just(0.0), st.floats(1e-4, 0.1)))}


@st.composite
def shampoo_hp(draw) -> dict[str, Any]:
    decouple = draw(st.booleans())
    return {"lr": draw(st.floats(1e-4, 3e-3)),
            "momentum": draw(st.one_of(st.just(0.0), st.floats(0.1, 0.9))),
            "weight_decay": draw(st.one_of(st.just(0.0), st.floats(1e-4, 0.1))),
            "weight_decouple": decouple, "fixed_decay": decouple and draw(st.booleans()),
            "preconditioning_compute_steps": draw(st.integers(1, 3)),
            "matrix_eps": draw(st.sampled_from([1e-6, 1e-4]))}


TWINS = {"soap": ("SOAP", soap_hp()), "shampoo": ("Shampoo", shampoo_hp())}


def record_gradients(opt: ocnopt.OCNOpt) -> dict[int, torch.Tensor]:
    """Keep the gradient each parameter's curvature update receives (by parameter id)."""
    seen: dict[int, torch.Tensor] = {}
    update = opt.model_.update

    def spy(stage, states, grads, params, *args, **kwargs):
        for p, g in zip(params, grads):
            seen[id(p)] = g.clone()
        return update(stage, states, grads, params, *args, **kwargs)

    opt.model_.update = spy  # type: ignore[method-assign]
    return seen


def run_against_twin(curvature: str, model: nn.Module, loss: str, hp: dict[str, Any],
                     batches: list[tuple[torch.Tensor, torch.Tensor]], tol: dict[str, float],
                     gtol: dict[str, float], twin_kwargs: dict[str, Any] | None = None) -> None:
    twin = copy.deepcopy(model)
    opt = ocnopt.OCNOpt(model, loss=loss, curvature=curvature, **hp)
    grads = record_gradients(opt)
    twin_opt = getattr(pytorch_optimizer, TWINS[curvature][0])(twin.parameters(), **hp,
                                                              **(twin_kwargs or {}))
    init = [p.detach().clone() for p in twin.parameters()]
    signal = False  # a gradient after step 0 is non-zero (dead ReLU chains have none)
    for k, (x, y) in enumerate(batches):
        at = copy.deepcopy(model)  # autograd's gradient at ocnopt's parameters
        TORCH_LOSS[loss]()(at(x), y).backward()
        opt.step(x, y)
        for (name, p), q, r in zip(model.named_parameters(), twin.parameters(), at.parameters()):
            g = grads[id(p)]
            torch.testing.assert_close(g, r.grad, rtol=gtol["rtol"],
                                       atol=gtol["atol"] * max(1.0, float(r.grad.abs().max())),
                                       msg=lambda m, what=f"gradient, step {k}, {name}": f"{what}: {m}")
            q.grad = g.clone()
            signal = signal or (k > 0 and bool(g.ne(0).any()))  # SOAP: step 0 initialises
        twin_opt.step()
        for (name, p), q, q0 in zip(model.named_parameters(), twin.parameters(), init):
            assert_params_close(p.detach(), q.detach(), q0, tol, f"step {k}, {name}")
    if curvature == "soap" and signal:  # not vacuous: after SOAP's initialising step they move
        assert any(not torch.equal(a, q) for a, q in zip(init, twin.parameters()))


@pytest.mark.parametrize("curvature", sorted(TWINS))
@SETTINGS
@given(data=st.data())
def test_matches_pytorch_optimizer(curvature: str, data: st.DataObject) -> None:
    loss = data.draw(st.sampled_from(["cross_entropy", "mse"]), label="loss")
    chain = data.draw(chains(loss), label="chain")
    B = data.draw(st.integers(1, 12), label="batch")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    hp = data.draw(TWINS[curvature][1], label="hyper-parameters")
    dtype = data.draw(st.sampled_from([torch.float64, torch.float64, torch.float32]), label="dtype")
    steps = data.draw(st.integers(4, 6), label="steps")
    model = chain.build(seed, dtype)
    batches = [make_batch(chain, loss, B, seed + 1 + k, dtype) for k in range(steps)]
    f64 = dtype == torch.float64
    run_against_twin(curvature, model, loss, hp, batches, TOL64 if f64 else TOL32,
                     GRAD64 if f64 else GRAD32)


@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_soap_merge_dims_matches(data_format: str) -> None:
    """merge_dims on shapes SOAP can merge (its helper turns a shape that merges into one axis
    into [1] and fails, so: no biases, 4-D conv weights merged to (12, 9), axes > 12 kept)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Tanh(), nn.Flatten(),
                          nn.Linear(64, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False)).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 6, 6, generator=g, dtype=torch.float64),
                torch.randint(3, (6,), generator=g)) for _ in range(5)]
    hp = {"lr": 0.01, "merge_dims": True, "max_precondition_dim": 12, "precondition_frequency": 2,
          "data_format": data_format}
    run_against_twin("soap", model, "cross_entropy", hp, batches, TOL64, GRAD64)


def test_soap_merge_dims_refuses_what_soap_cannot_merge() -> None:
    model = nn.Sequential(nn.Linear(3, 2)).double()
    opt = ocnopt.OCNOpt(model, loss="mse", curvature="soap", lr=0.01, merge_dims=True)
    with pytest.raises(ValueError, match=r"invalid merge_dims=True.*\(3,\).*\[1\]|invalid merge_dims=True"):
        opt.step(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))


@pytest.mark.parametrize("hp, match", [
    ({"betas": (0.9, 1.0)}, "betas"), ({"shampoo_beta": 2.0}, "shampoo_beta"),
    ({"precondition_frequency": 0}, "precondition_frequency"),
    ({"data_format": "nhwc"}, "data_format"), ({"precondition_1d": 1}, "precondition_1d"),
])
def test_soap_rejects_invalid_hyper_parameters(hp: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=f"invalid {match}="):
        ocnopt.OCNOpt(nn.Sequential(nn.Linear(2, 2)), curvature="soap", lr=0.1, **hp)


@pytest.mark.parametrize("hp, match", [
    ({"momentum": 1.5}, "momentum"), ({"preconditioning_compute_steps": 0}, "preconditioning_compute_steps"),
    ({"matrix_eps": -1.0}, "matrix_eps"), ({"weight_decouple": "yes"}, "weight_decouple"),
])
def test_shampoo_rejects_invalid_hyper_parameters(hp: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=f"invalid {match}="):
        ocnopt.OCNOpt(nn.Sequential(nn.Linear(2, 2)), curvature="shampoo", lr=0.1, **hp)


# ---- through the benchmark harness ------------------------------------------------------------
@pytest.mark.parametrize("name", ["soap", "shampoo"])
def test_harness_peer_equals_ocnopt(name: str) -> None:
    """``train_one`` with the peer and with ``autograd-<name>`` at the default learning rate:
    the same parameters after 2 epochs of 3 minibatches, in float64. The twin uses its own
    (autograd) gradients here, so the eigenbases must be unique: every factor has full rank
    from the first step (4x4 layers, 16 samples) and distinct eigenvalues; the bases then move
    by ~1e-16 / (relative eigenvalue gap) and the parameters agree to HARNESS64."""
    pytest.importorskip("sklearn")
    from ocnopt.bench import optimizers as registry
    from ocnopt.bench import problems, protocols

    g = torch.Generator().manual_seed(3)
    X = torch.randn(48, 4, generator=g, dtype=torch.float64)
    y = torch.randint(4, (48,), generator=g)
    data = problems.Dataset("square", X, y, X[:8], y[:8], X[:8], y[:8], classes=4)
    problem = problems.Problem(
        "square", "random data, 4 features, 4 classes", "3 Linear 4x4, Tanh", "cross_entropy",
        lambda seed: data,
        lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                              nn.Linear(4, 4)).double(),
        epochs=2, batch_size=16, target=0.5)
    finals = []
    for opt_name in (name, f"autograd-{name}"):
        spec = registry.parse_optimizer(opt_name)
        assert spec.default_lr == registry.DEFAULT_LR[name]
        models: list[nn.Module] = []

        def make(m, loss, lr, seed, spec=spec, models=models):
            models.append(m)
            return spec.factory(m, loss, lr, seed)

        result, _ = protocols.train_one(problem, data, dataclasses.replace(spec, factory=make),
                                        spec.default_lr, 0, epochs=2, batch_size=16)
        assert result["steps"] == 6 and not result["diverged"]
        finals.append([p.detach().clone() for p in models[0].parameters()])
    init = list(problem.model(0).parameters())
    for p, q, q0 in zip(finals[1], finals[0], init):
        assert not torch.equal(q, q0.detach())
        assert_params_close(p, q, q0.detach(), HARNESS64, name)


# ---- order 2: M^{-1}, M and the per-sample Gram matrices ------------------------------------------
MODEL_CASES = {
    "soap": {"lr": 0.01, "precondition_frequency": 2, "weight_decay": 0.0},
    "soap-1d-small-axes": {"lr": 0.01, "precondition_frequency": 2, "precondition_1d": True,
                           "max_precondition_dim": 4, "weight_decay": 0.0},
    "shampoo": {"lr": 1e-3},
    "shampoo-momentum": {"lr": 1e-3, "momentum": 0.5, "weight_decay": 0.1,
                         "preconditioning_compute_steps": 2},
}


def _curvature(case: str) -> str:
    return case.split("-")[0]


def _trained(case: str, module: nn.Module, in_shape: tuple[int, ...], steps: int = 4
             ) -> tuple[ocnopt.OCNOpt, torch.Generator]:
    g = torch.Generator().manual_seed(2)
    opt = ocnopt.OCNOpt(nn.Sequential(module), loss=lambda out, y: out.flatten(1).square().sum(1),
                        curvature=_curvature(case), **MODEL_CASES[case])
    for _ in range(steps):
        opt.step(torch.randn(5, *in_shape, generator=g, dtype=torch.float64), torch.zeros(5))
    return opt, g


GRAM_CASES = {
    "linear": (lambda: nn.Linear(3, 5), (3,)),
    "linear-no-bias": (lambda: nn.Linear(6, 2, bias=False), (6,)),
    "linear-positions": (lambda: nn.Linear(3, 4), (2, 3)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), (2, 5)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 4, 4)),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_solve_inverts_apply_with_column_dims(case: str, layer: str) -> None:
    """apply(solve(v)) = v and solve(apply(v)) = v for v with two leading column dims, and each
    column solved alone gives the same as the batch."""
    torch.manual_seed(0)
    build, shape = GRAM_CASES[layer]
    opt, g = _trained(case, build().double(), shape)
    stage, hp = opt.stages[0], opt.param_groups[0]
    states = [opt.state[p] for p in stage.params]
    v = [torch.randn(2, 3, *p.shape, generator=g, dtype=torch.float64) for p in stage.params]
    s = opt.model_.solve(stage, states, v, hp)
    for x, y in zip(opt.model_.apply(stage, states, s, hp), v):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)
    for x, y in zip(opt.model_.solve(stage, states, opt.model_.apply(stage, states, v, hp), hp), v):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)
    one = opt.model_.solve(stage, states, [x[1, 2] for x in v], hp)
    for x, y in zip(one, s):
        torch.testing.assert_close(x, y[1, 2], rtol=1e-12, atol=1e-14)


def test_soap_solve_is_the_documented_matrix_and_the_direction_solves_the_moment() -> None:
    """For a Linear weight, M^{-1} = sqrt(bc2) (Q_1 (x) Q_2) diag(1 / (sqrt(v) + eps))
    (Q_1 (x) Q_2)^T on the row-major vec, and a step without a basis refresh (and without
    weight decay) returns M^{-1}(m / bc1) of its new state."""
    torch.manual_seed(0)
    opt, g = _trained("soap", nn.Linear(3, 4).double(), (3,))
    stage, hp = opt.stages[0], opt.param_groups[0]
    w = stage.params[0]
    st = opt.state[w]
    t = float(st["step"]) - 1
    K = torch.kron(st["Q"][0], st["Q"][1])
    Minv = math.sqrt(1 - 0.95**t) * (K / (st["exp_avg_sq"].sqrt() + hp["eps"]).reshape(1, -1)) @ K.T
    V = torch.randn(4, 3, generator=g, dtype=torch.float64)
    got = opt.model_.solve(stage, [st, opt.state[stage.params[1]]], [V, torch.zeros(4, dtype=V.dtype)],
                           hp)[0]
    torch.testing.assert_close(got.reshape(-1), Minv @ V.reshape(-1), rtol=1e-12, atol=1e-14)
    # the next step, with no basis refresh (it would change Q after the direction was taken)
    hp = {**hp, "precondition_frequency": 100}
    states = [opt.state[p] for p in stage.params]
    grads = [torch.randn_like(p) for p in stage.params]
    new, dirs = opt.model_.update(stage, states, grads, list(stage.params), None, hp, 5)
    bc1 = 1 - 0.95 ** (float(new[0]["step"]) - 1)
    for d, m in zip(dirs, opt.model_.solve(stage, new, [s["exp_avg"] / bc1 for s in new], hp)):
        torch.testing.assert_close(d, m, rtol=1e-12, atol=1e-14)


def test_shampoo_solve_is_the_kronecker_product_and_the_direction() -> None:
    """M^{-1} vec(V) = (H_1 (x) H_2^T) vec(V) (row-major) for a Linear weight; without momentum
    and weight decay the direction is M^{-1} g of the new state (``direction_is_solve``)."""
    torch.manual_seed(0)
    opt, g = _trained("shampoo", nn.Linear(3, 4).double(), (3,))
    stage, hp = opt.stages[0], opt.param_groups[0]
    assert opt.model_.direction_is_solve(hp)
    st = opt.state[stage.params[0]]
    H1, H2 = st["inv_pre_cond_0"], st["inv_pre_cond_1"]
    torch.testing.assert_close(H2 @ H2 @ H2 @ H2, torch.linalg.inv(st["pre_cond_1"]), rtol=1e-8, atol=0)
    V = torch.randn(4, 3, generator=g, dtype=torch.float64)
    got = opt.model_.solve(stage, [st, opt.state[stage.params[1]]], [V, torch.zeros(4, dtype=V.dtype)],
                           hp)[0]
    torch.testing.assert_close(got.reshape(-1), torch.kron(H1, H2.T.contiguous()) @ V.reshape(-1), rtol=1e-12,
                               atol=1e-14)
    states = [opt.state[p] for p in stage.params]
    grads = [torch.randn_like(p) for p in stage.params]
    new, dirs = opt.model_.update(stage, states, grads, list(stage.params), None, hp, 4)
    for d, m in zip(dirs, opt.model_.solve(stage, new, grads, hp)):
        torch.testing.assert_close(d, m, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
@pytest.mark.parametrize("r", [1, 3])
@pytest.mark.parametrize("layer", sorted(GRAM_CASES))
def test_per_sample_gram_equals_explicit_per_sample_gradients(case: str, r: int, layer: str) -> None:
    """S[i, c, d] = w_ic^T M^{-1} w_id in closed form equals the same with w_ic the gradient of
    <Z_ic, f(x_i, u)> (torch.func.vmap) and M^{-1} the model's ``solve``."""
    from torch.func import grad, vmap

    torch.manual_seed(0)
    build, shape = GRAM_CASES[layer]
    module = build().double()
    opt, g = _trained(case, module, shape)
    stage, hp = opt.stages[0], opt.param_groups[0]
    states = [opt.state[p] for p in stage.params]
    B = 5
    x = torch.randn(B, *shape, generator=g, dtype=torch.float64)
    Z = torch.randn(B, r, *module(x).shape[1:], generator=g, dtype=torch.float64)
    d = stage.derivatives
    S = opt.model_.per_sample_gram(stage, states, hp, d.kfac_input(module, x), d.kfac_output(module, Z))
    assert S is not None

    params = tuple(p.detach() for p in stage.params)

    def psi(ps, xi, zi):
        return (stage.functional(dict(zip(stage.param_names, ps)), xi.unsqueeze(0))[0] * zi).sum()

    w = vmap(vmap(grad(psi), in_dims=(None, None, 0)), in_dims=(None, 0, 0))(params, x, Z)
    Mw = opt.model_.solve(stage, states, list(w), hp)
    S_ref = sum(torch.einsum("bc...,bd...->bcd", wi, mi) for wi, mi in zip(w, Mw))
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature", ["soap", "shampoo"])
def test_order2_without_feedback_and_value_correction_is_order1(curvature: str) -> None:
    """backend lowrank, order 2, feedback=False, value_correction=False: the order-1 steps, bit
    for bit; with both on (lowrank-<model>-fb) the steps stay finite and differ."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(3, (8,), generator=g))
               for _ in range(5)]
    hp = MODEL_CASES["soap" if curvature == "soap" else "shampoo-momentum"]
    runs = {}
    for label, kw in [("order1", {}),
                      ("order2", {"order": 2, "backend": "lowrank", "feedback": False,
                                  "value_correction": False}),
                      ("fb", {"order": 2, "backend": "lowrank"})]:
        model = copy.deepcopy(base)
        opt = ocnopt.OCNOpt(model, curvature=curvature, **hp, **kw)
        for x, y in batches:
            assert torch.isfinite(opt.step(x, y)) and not opt.last_step.skipped
        runs[label] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(runs["order1"], runs["order2"]))
    assert all(torch.isfinite(p).all() for p in runs["fb"])
    assert not all(torch.equal(p, q) for p, q in zip(runs["order1"], runs["fb"]))


def test_registry_names() -> None:
    """The models have every mode name, the peers are pytorch-optimizer's classes at their
    defaults, and the 'all' set holds them with their order-2 lowrank modes."""
    from ocnopt.bench import optimizers as registry

    names = set(registry.all_names())
    for c in ("soap", "shampoo"):
        assert {c, f"autograd-{c}", f"lowrank-{c}", f"backpack-{c}", f"lowrank-{c}-fb",
                f"autograd-{c}-fb"} <= names
        assert {c, f"autograd-{c}", f"lowrank-{c}-fb"} <= set(registry.ALL_SET)
        peer = registry.parse_optimizer(c)
        assert peer.family == "pytorch-optimizer" and peer.hyper == {}
        model = nn.Sequential(nn.Linear(2, 2))
        stepper = peer.make(model, "cross_entropy", peer.default_lr, 0)
        defaults = getattr(pytorch_optimizer, TWINS[c][0])(model.parameters()).defaults
        assert stepper.opt.defaults == {**defaults, "lr": peer.default_lr}
        assert peer.default_lr == defaults["lr"]
        fb = registry.parse_optimizer(f"lowrank-{c}-fb")
        assert (fb.order, fb.backend, fb.curvature) == (2, "lowrank", c)
