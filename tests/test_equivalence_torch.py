"""Identity 1 of docs/method.md section 10 against torch itself: order-1 OCNOpt is
backpropagation plus the base optimizer.

* ``test_matches_torch_optim``: for random chains (MLPs and small Conv1d/Conv2d nets with
  stride, padding, dilation, groups and pooling) and random hyper-parameters, several
  ``OCNOpt.step`` calls with curvature sgd / rmsprop / adam / adamw leave the parameters equal
  to those of ``torch.optim.SGD / RMSprop / Adam / AdamW`` run on a deep copy of the model with
  the mean loss (``nn.CrossEntropyLoss()`` / ``nn.MSELoss()``), batch after batch.
* ``test_value_gradient_is_batch_times_autograd``: the engine's per-stage value V_x (at every
  stage input, x_0 and x_T included) equals B times ``torch.autograd.grad`` of the mean loss
  w.r.t. that activation in a plain forward pass, and Qbar_u equals the parameter gradient.

The references are independent of ocnopt: plain modules, torch losses, torch optimizers and
torch autograd on the whole graph. Each example is described by a ``Chain`` (printed by
hypothesis on failure) and built by ``Chain.build``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from _chains import Layer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ocnopt

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Tolerances: elementwise |p - p_ref| <= rtol * |p_ref| + atol + motion * max|p_ref - p_init|,
# i.e. relative to the parameter and to the distance the parameters travelled (each step's
# rounding error is relative to the step, and steps may cancel, leaving a parameter much
# smaller than the path that produced it).
# float64: both sides compute the same quantities in a different order (ocnopt divides the
# summed per-sample vector-Jacobian products by B, torch backpropagates the mean), so they
# differ by a few ulps per operation, amplified by the conditioning of the chain (observed
# <= 1e-13 relative); 1e-10 is ~10^6 ulps of slack and far below any real discrepancy (a wrong
# factor, sign, bias correction, buffer or hyper-parameter changes a step by >= 1e-6).
TOL64 = {"rtol": 1e-10, "atol": 1e-12, "motion": 1e-10}
# float32: eps = 1.2e-7. Gradients are sums over the batch, positions and layers, and narrow
# chains (widths down to 1, no activations, B = 1) are ill-conditioned: observed gradient
# differences reach 3e-5 relative; RMSprop/Adam steps are g / sqrt(v), so that relative error
# reaches the step, and it accumulates over <= 4 steps. Hence 1e-5 relative to the parameter
# and 1e-3 relative to the distance travelled (~30x the worst case seen in 1600 examples).
# float64 is the precise check; float32 checks that nothing is silently up- or down-cast.
TOL32 = {"rtol": 1e-5, "atol": 1e-6, "motion": 1e-3}
CLOSE64 = {"rtol": 1e-10, "atol": 1e-12}  # V_x and Qbar_u: one backward pass, no steps


def assert_params_close(p: torch.Tensor, p_ref: torch.Tensor, p_init: torch.Tensor,
                        tol: dict[str, float], what: str) -> None:
    motion = float((p_ref - p_init).abs().max()) if p_ref.numel() else 0.0
    torch.testing.assert_close(p, p_ref, rtol=tol["rtol"], atol=tol["atol"] + tol["motion"] * motion,
                               msg=lambda m: f"{what}: {m}")


# ---- chain descriptions -----------------------------------------------------------------------
@dataclass(frozen=True)
class Chain:
    """A network as data: per-sample input shape, layers, per-sample output shape."""

    in_shape: tuple[int, ...]
    layers: tuple[Layer, ...]
    out_shape: tuple[int, ...]

    def build(self, seed: int, dtype: torch.dtype) -> nn.Sequential:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = nn.Sequential(*(layer.build() for layer in self.layers))
        return model.to(dtype)

    @property
    def depth(self) -> int:
        return sum(layer.name in ("Linear", "Conv1d", "Conv2d") for layer in self.layers)


ACTIVATIONS = [
    Layer("ReLU"), Layer("LeakyReLU", (("negative_slope", 0.2),)), Layer("Tanh"),
    Layer("Sigmoid"), Layer("GELU"), Layer("GELU", (("approximate", "tanh"),)), Layer("ELU"),
    Layer("ELU", (("alpha", 0.5),)), Layer("Softplus"), Layer("Softplus", (("beta", 2.0),)),
    Layer("SiLU"),
]
NO_OPS = [Layer("Identity"), Layer("Dropout", (("p", 0.0),))]


@st.composite
def activation(draw) -> list[Layer]:
    """An activation (or none), sometimes followed by an Identity or Dropout(p=0)."""
    out = [draw(st.sampled_from(ACTIVATIONS))] if draw(st.integers(0, 4)) else []
    if draw(st.integers(0, 3)) == 0:
        out.append(draw(st.sampled_from(NO_OPS)))
    return out


def _conv_len(L: int, k: int, s: int, p: int, d: int) -> int:
    return (L + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def conv_layer(draw, dims: int, shape: tuple[int, ...]) -> tuple[Layer, tuple[int, ...]]:
    C, spatial = shape[0], shape[1:]
    groups = draw(st.sampled_from([g for g in (1, 2, 3) if C % g == 0]))
    out_ch = groups * draw(st.integers(1, 8 // groups))
    ks, ss, ps, ds, out = [], [], [], [], []
    for L in spatial:
        s, p, d = draw(st.integers(1, 2)), draw(st.integers(0, 2)), draw(st.integers(1, 2))
        k = min(draw(st.integers(1, 3)), (L + 2 * p - 1) // d + 1)  # output length >= 1
        ks.append(k), ss.append(s), ps.append(p), ds.append(d)
        out.append(_conv_len(L, k, s, p, d))

    def arg(v: list[int]) -> int | tuple[int, ...]:
        return v[0] if dims == 1 else tuple(v)

    layer = Layer(f"Conv{dims}d", (
        ("in_channels", C), ("out_channels", out_ch), ("kernel_size", arg(ks)),
        ("stride", arg(ss)), ("padding", arg(ps)), ("dilation", arg(ds)), ("groups", groups),
        ("bias", draw(st.booleans())),
    ))
    return layer, (out_ch, *out)


@st.composite
def pool_layer(draw, dims: int, shape: tuple[int, ...]) -> tuple[list[Layer], tuple[int, ...]]:
    C, spatial = shape[0], shape[1:]
    kind = draw(st.sampled_from(["none", "max", "avg", "adaptive"]))
    if kind == "none":
        return [], shape
    if kind == "adaptive":
        o = [draw(st.integers(1, 3)) for _ in spatial]
        size = o[0] if dims == 1 else tuple(o)
        return [Layer(f"AdaptiveAvgPool{dims}d", (("output_size", size),))], (C, *o)
    k = draw(st.integers(1, min(3, *spatial)))
    s = draw(st.integers(1, 2))
    p = draw(st.integers(0, k // 2))
    name = f"MaxPool{dims}d" if kind == "max" else f"AvgPool{dims}d"
    out = [_conv_len(L, k, s, p, 1) for L in spatial]
    return [Layer(name, (("kernel_size", k), ("stride", s), ("padding", p)))], (C, *out)


@st.composite
def chains(draw, loss: str, kinds: tuple[str, ...] = ("mlp", "conv1d", "conv2d")) -> Chain:
    """Random chains with 1-5 parameterised layers of widths 1-8 ending in a Linear (always for
    cross-entropy, whose outputs must be (B, classes)); with MSE a conv chain may also end in
    its (B, C, *spatial) feature map."""
    kind = draw(st.sampled_from(kinds))
    out_dim = draw(st.integers(2, 6)) if loss == "cross_entropy" else draw(st.integers(1, 8))
    layers: list[Layer] = []
    if kind == "mlp":
        in_shape: tuple[int, ...] = (draw(st.integers(1, 8)),)
        n_hidden = draw(st.integers(0, 4))
        width = in_shape[0]
    else:
        dims = 1 if kind == "conv1d" else 2
        in_shape = (draw(st.integers(1, 4)),
                    *(draw(st.integers(1, 8 if dims == 1 else 6)) for _ in range(dims)))
        shape = in_shape
        n_conv = draw(st.integers(1, 3))
        for _ in range(n_conv):
            conv, shape = draw(conv_layer(dims, shape))
            layers.append(conv)
            layers += draw(activation())
            pool, shape = draw(pool_layer(dims, shape))
            layers += pool
        if loss == "mse" and draw(st.booleans()):  # the feature map is the output
            return Chain(in_shape, tuple(layers), shape)
        layers.append(Layer("Flatten"))
        width = int(torch.Size(shape).numel())
        n_hidden = draw(st.integers(0, 4 - n_conv))
    for _ in range(n_hidden):
        w = draw(st.integers(1, 8))
        layers.append(Layer("Linear", (("in_features", width), ("out_features", w),
                                       ("bias", draw(st.booleans())))))
        layers += draw(activation())
        width = w
    layers.append(Layer("Linear", (("in_features", width), ("out_features", out_dim),
                                   ("bias", draw(st.booleans())))))
    return Chain(in_shape, tuple(layers), (out_dim,))


def make_batch(chain: Chain, loss: str, B: int, seed: int, dtype: torch.dtype,
               prob_targets: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *chain.in_shape, generator=g, dtype=dtype)
    if loss == "mse":
        y = torch.randn(B, *chain.out_shape, generator=g, dtype=dtype)
    elif prob_targets:
        y = torch.randn(B, *chain.out_shape, generator=g, dtype=dtype).softmax(1)
    else:
        y = torch.randint(chain.out_shape[0], (B,), generator=g)
    return x, y


TORCH_LOSS = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss}


# ---- hyper-parameters -------------------------------------------------------------------------
def _wd() -> st.SearchStrategy[float]:
    return st.one_of(st.just(0.0), st.floats(1e-4, 0.1))


@st.composite
def sgd_hp(draw) -> dict[str, Any]:
    momentum = draw(st.one_of(st.just(0.0), st.floats(0.1, 0.95)))
    nesterov = momentum > 0 and draw(st.booleans())
    dampening = 0.0 if (nesterov or momentum == 0) else draw(
        st.one_of(st.just(0.0), st.floats(0.05, 0.5)))
    return {"lr": draw(st.floats(1e-3, 0.3)), "momentum": momentum, "dampening": dampening,
            "nesterov": nesterov, "weight_decay": draw(_wd())}


@st.composite
def rmsprop_hp(draw) -> dict[str, Any]:
    return {"lr": draw(st.floats(1e-3, 0.05)), "alpha": draw(st.floats(0.5, 0.999)),
            "eps": draw(st.sampled_from([1e-8, 1e-6, 1e-3])), "centered": draw(st.booleans()),
            "momentum": draw(st.one_of(st.just(0.0), st.floats(0.1, 0.9))),
            "weight_decay": draw(_wd())}


@st.composite
def adam_hp(draw) -> dict[str, Any]:
    return {"lr": draw(st.floats(1e-3, 0.05)),
            "betas": (draw(st.floats(0.0, 0.95)), draw(st.floats(0.5, 0.9999))),
            "eps": draw(st.sampled_from([1e-8, 1e-6, 1e-3])), "amsgrad": draw(st.booleans()),
            "weight_decay": draw(_wd())}


CASES = {
    "sgd": (torch.optim.SGD, sgd_hp()),
    "rmsprop": (torch.optim.RMSprop, rmsprop_hp()),
    "adam": (torch.optim.Adam, adam_hp()),
    "adamw": (torch.optim.AdamW, adam_hp()),
}


@st.composite
def problems(draw, loss_names: tuple[str, ...] = ("cross_entropy", "mse")):
    loss = draw(st.sampled_from(loss_names))
    chain = draw(chains(loss))
    return {
        "loss": loss,
        "chain": chain,
        "batch": draw(st.integers(1, 16)),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "prob_targets": loss == "cross_entropy" and draw(st.integers(0, 3)) == 0,
    }


# ---- 8.1: the update equals torch.optim's --------------------------------------------------------
@pytest.mark.parametrize("curvature", sorted(CASES))
@SETTINGS
@given(data=st.data())
def test_matches_torch_optim(curvature: str, data: st.DataObject) -> None:
    torch_cls, hp_strategy = CASES[curvature]
    problem = data.draw(problems(), label="problem")
    hp = data.draw(hp_strategy, label="hyper-parameters")
    dtype = data.draw(st.sampled_from([torch.float64, torch.float64, torch.float32]),
                      label="dtype")
    steps = data.draw(st.integers(3, 4), label="steps")
    chain, loss, B, seed = problem["chain"], problem["loss"], problem["batch"], problem["seed"]
    tol = TOL64 if dtype == torch.float64 else TOL32

    model = chain.build(seed, dtype)
    ref = copy.deepcopy(model)
    opt = ocnopt.OCNOpt(model, loss=loss, curvature=curvature, **hp)
    ref_opt = torch_cls(ref.parameters(), **hp)
    ref_loss = TORCH_LOSS[loss]()

    init = [p.detach().clone() for p in ref.parameters()]
    any_grad = False
    for k in range(steps):
        x, y = make_batch(chain, loss, B, seed + 1 + k, dtype, problem["prob_targets"])
        loss_before = opt.step(x, y)

        ref_opt.zero_grad()
        expected_loss = ref_loss(ref(x), y)
        expected_loss.backward()
        any_grad |= any(bool(q.grad.abs().max() > 0) for q in ref.parameters())
        ref_opt.step()

        assert opt.step_count == k + 1
        torch.testing.assert_close(loss_before, expected_loss.detach(),
                                   rtol=tol["rtol"], atol=tol["atol"])
        for (name, p), q, q0 in zip(model.named_parameters(), ref.parameters(), init):
            assert_params_close(p.detach(), q.detach(), q0, tol, f"step {k}, {name}")
    # not vacuous: whenever a gradient was non-zero the parameters moved
    if any_grad:
        assert any(not torch.equal(a, q) for a, q in zip(init, ref.parameters()))


# ---- 8.1: V_x at every stage input is B times autograd's gradient ---------------------------------
def _reference_values(model: nn.Sequential, loss: str, x: torch.Tensor, y: torch.Tensor):
    """Plain forward with retained activations; grads of the mean loss w.r.t. every stage input
    (and the output) and w.r.t. every parameter."""
    x0 = x.clone().requires_grad_(True)
    acts = [x0]
    for module in model:
        acts.append(module(acts[-1]))
    mean_loss = TORCH_LOSS[loss]()(acts[-1], y)
    params = list(model.parameters())
    grads = torch.autograd.grad(mean_loss, acts + params)
    return grads[:len(acts)], dict(zip([n for n, _ in model.named_parameters()],
                                       grads[len(acts):]))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@SETTINGS
@given(data=st.data())
def test_value_gradient_is_batch_times_autograd(loss: str, data: st.DataObject) -> None:
    problem = data.draw(problems((loss,)), label="problem")
    chain, B, seed = problem["chain"], problem["batch"], problem["seed"]
    model = chain.build(seed, torch.float64)
    x, y = make_batch(chain, loss, B, seed + 1, torch.float64, problem["prob_targets"])
    dx_ref, dparams_ref = _reference_values(copy.deepcopy(model), loss, x, y)

    opt = ocnopt.OCNOpt(model, loss=loss, curvature="sgd")
    engine = opt.engine
    T = len(engine.stages)
    assert T == len(chain.layers)
    traj = engine.nominal(x, input_value=True)
    term = engine.terminal(traj, y)
    expansions, values = engine.expand(traj, term, need_stats=[False] * T, keep_values=True)

    assert len(values) == T + 1
    for t in range(T + 1):
        assert values[t] is not None, f"V_x at stage {t} was not kept"
        assert values[t].shape == dx_ref[t].shape
        torch.testing.assert_close(values[t], B * dx_ref[t], **CLOSE64,
                                   msg=lambda m, t=t: f"V_x at the input of stage {t}: {m}")
    # Qbar_u (no weight decay) is the gradient of the mean loss
    for stage, exp in zip(engine.stages, expansions):
        assert len(exp.Q_u) == len(stage.params)
        for pname, q in zip(stage.param_names, exp.Q_u):
            torch.testing.assert_close(q, dparams_ref[f"{stage.name}.{pname}"], **CLOSE64)
    # the terminal value gradient is the per-sample loss gradient, not divided by B
    torch.testing.assert_close(term.V_x, B * dx_ref[T], **CLOSE64)
