"""Identity 1 of docs/method.md section 10 for the Kronecker curvature models: order-1 OCNOpt
with curvature kfac / ekfac is the K-FAC / EKFAC step computed by curvlinops, an independent
implementation.

With ``stat_every = inv_every = 1`` and ``stat_decay = 0`` the factors are those of the current
batch, so every step must equal

    p <- p - lr * KFACInverseLinearOperator(K, damping) @ (grad of the mean loss + wd * p)

(plus heavy-ball momentum on the preconditioned direction), K = curvlinops'
``KFACLinearOperator`` (exact-damped ``EKFACLinearOperator`` for ekfac) on the same batch.

Conventions (checked in ``test_factors_match_curvlinops``): A and, for the type-2 Fisher and
the cross-entropy empirical Fisher, G are curvlinops' factors. For the empirical Fisher of the
MSE loss ocnopt's G is the covariance of the gradients of the per-sample loss
phi = mean_k (x_k - y_k)^2, while curvlinops multiplies the mean-reduced ``MSELoss`` by sqrt(C)
(C = output features) before taking gradients, so its G (and its EKFAC eigenvalue corrections)
are exactly C times ocnopt's; the step reference divides them by C.

For ekfac the reference uses ocnopt's Kronecker eigenbases after checking that they
diagonalise curvlinops' factors (see ``use_eigenbasis``: inside a repeated eigenvalue any
basis is valid and EKFAC's re-estimated diagonal depends on the choice); curvlinops computes
the corrected eigenvalues and the damped inverse itself.

``test_mc_factor_is_unbiased``: the sampled ("mc") G averaged over many label draws converges
to the type-2 G (the loss Hessian propagated), within a Monte-Carlo tolerance.

curvlinops supports Linear and Conv2d layers only, so the random chains are made of those
(stride, padding, dilation, groups, bias or not), activations, pooling and Flatten.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from _chains import Layer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import ocnopt

curvlinops = pytest.importorskip("curvlinops")
from curvlinops import (  # noqa: E402
    EKFACLinearOperator,
    KFACInverseLinearOperator,
    KFACLinearOperator,
)

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# float64 throughout. Both sides build the same factors from the same per-sample quantities in
# a different order; ocnopt inverts (F + damping I) through an eigen-decomposition, curvlinops
# through a Cholesky factorisation. Steps are compared while the damped Kronecker product has
# a condition number <= 1e8 (damping >= 0.05 at O(1) factors; see ``damped_condition``), so
# factors agree to ~1e-14 and steps to ~1e-12 of their size. Parameters are
# compared elementwise to 1e-9 of their value plus 1e-9 of the distance they travelled (steps
# may cancel, leaving an entry much smaller than the path that produced it; observed worst case
# ~1e-12 of that scale), which is still 1e6 times below any real discrepancy.
TOL = {"rtol": 1e-9, "atol": 1e-12}
MOTION = 1e-9


def assert_params_close(p: torch.Tensor, p_ref: torch.Tensor, p_init: torch.Tensor,
                        what: str) -> None:
    motion = float((p_ref - p_init).abs().max()) if p_ref.numel() else 0.0
    torch.testing.assert_close(p, p_ref, rtol=TOL["rtol"], atol=TOL["atol"] + MOTION * motion,
                               msg=lambda m: f"{what}: {m}")


def assert_factor_close(F: torch.Tensor, F_ref: torch.Tensor, what: str) -> None:
    """Kronecker factors: 1e-9 relative, entries near zero measured against the largest one."""
    scale = float(F_ref.abs().max()) if F_ref.numel() else 0.0
    torch.testing.assert_close(F, F_ref, rtol=1e-9, atol=1e-11 * scale,
                               msg=lambda m: f"{what}: {m}")


# ---- chain descriptions (Linear / Conv2d chains) ------------------------------------------------
@dataclass(frozen=True)
class Chain:
    in_shape: tuple[int, ...]
    layers: tuple[Layer, ...]
    out_dim: int

    def build(self, seed: int) -> nn.Sequential:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = nn.Sequential(*(layer.build() for layer in self.layers))
        return model.double()


ACTIVATIONS = [Layer("ReLU"), Layer("LeakyReLU", (("negative_slope", 0.2),)), Layer("Tanh"),
               Layer("Sigmoid"), Layer("GELU"), Layer("ELU"), Layer("Softplus"), Layer("SiLU")]


def _conv_len(L: int, k: int, s: int, p: int, d: int) -> int:
    return (L + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def chains(draw, loss: str) -> Chain:
    """1-5 parameterised layers: 0-2 Conv2d (each maybe followed by an activation and a
    pooling layer), Flatten, then Linear layers of widths 1-8 with activations."""
    out_dim = draw(st.integers(2, 6)) if loss == "cross_entropy" else draw(st.integers(1, 6))
    n_conv = draw(st.integers(0, 2))
    layers: list[Layer] = []
    if n_conv:
        shape = (draw(st.integers(1, 4)), draw(st.integers(2, 6)), draw(st.integers(2, 6)))
        in_shape: tuple[int, ...] = shape
        for _ in range(n_conv):
            C, spatial = shape[0], shape[1:]
            groups = draw(st.sampled_from([g for g in (1, 2) if C % g == 0]))
            out_ch = groups * draw(st.integers(1, 6 // groups))
            ks, ss, ps, ds, out = [], [], [], [], []
            for L in spatial:
                s, p, d = draw(st.integers(1, 2)), draw(st.integers(0, 1)), draw(st.integers(1, 2))
                k = min(draw(st.integers(1, 3)), (L + 2 * p - 1) // d + 1)
                ks.append(k), ss.append(s), ps.append(p), ds.append(d)
                out.append(_conv_len(L, k, s, p, d))
            layers.append(Layer("Conv2d", (
                ("in_channels", C), ("out_channels", out_ch), ("kernel_size", tuple(ks)),
                ("stride", tuple(ss)), ("padding", tuple(ps)), ("dilation", tuple(ds)),
                ("groups", groups), ("bias", draw(st.booleans())))))
            shape = (out_ch, *out)
            if draw(st.booleans()):
                layers.append(draw(st.sampled_from(ACTIVATIONS)))
            pool = draw(st.sampled_from(["none", "max", "avg", "adaptive"]))
            if pool == "adaptive":
                o = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
                layers.append(Layer("AdaptiveAvgPool2d", (("output_size", o),)))
                shape = (out_ch, *o)
            elif pool != "none" and min(shape[1:]) >= 2:
                layers.append(Layer("MaxPool2d" if pool == "max" else "AvgPool2d",
                                    (("kernel_size", 2), ("stride", 1))))
                shape = (out_ch, shape[1] - 1, shape[2] - 1)
        layers.append(Layer("Flatten"))
        width = int(torch.Size(shape).numel())
    else:
        width = draw(st.integers(1, 8))
        in_shape = (width,)
    for _ in range(draw(st.integers(0, 3 - n_conv // 2))):
        w = draw(st.integers(1, 8))
        layers.append(Layer("Linear", (("in_features", width), ("out_features", w),
                                       ("bias", draw(st.booleans())))))
        if draw(st.integers(0, 3)):
            layers.append(draw(st.sampled_from(ACTIVATIONS)))
        width = w
    layers.append(Layer("Linear", (("in_features", width), ("out_features", out_dim),
                                   ("bias", draw(st.booleans())))))
    return Chain(in_shape, tuple(layers), out_dim)


def make_batch(chain: Chain, loss: str, B: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *chain.in_shape, generator=g, dtype=torch.float64)
    if loss == "mse":
        y = torch.randn(B, chain.out_dim, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(chain.out_dim, (B,), generator=g)
    return x, y


TORCH_LOSS = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss}


@st.composite
def problems(draw, loss_names: tuple[str, ...] = ("cross_entropy", "mse")):
    loss = draw(st.sampled_from(loss_names))
    return {"loss": loss, "chain": draw(chains(loss)), "batch": draw(st.integers(1, 12)),
            "seed": draw(st.integers(0, 2**31 - 1))}


def kronecker_modules(model: nn.Sequential) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_children() if isinstance(m, (nn.Linear, nn.Conv2d))}


def curvlinops_operator(model: nn.Module, loss: str, x: torch.Tensor, y: torch.Tensor,
                        fisher_type: str, ekfac: bool = False) -> KFACLinearOperator:
    cls = EKFACLinearOperator if ekfac else KFACLinearOperator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        K = cls(model, TORCH_LOSS[loss](), list(model.parameters()), [(x, y)],
                fisher_type=fisher_type, check_deterministic=False)
        K.compute_kronecker_factors()
    return K


class Decay:
    """A damping schedule: damping(step) = d0 / (1 + step)."""

    def __init__(self, d0: float):
        self.d0 = d0

    def __call__(self, step: int) -> float:
        return self.d0 / (1 + step)

    def __repr__(self) -> str:
        return f"Decay({self.d0!r})"


# ---- the factors: A and G against curvlinops ----------------------------------------------------
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@SETTINGS
@given(data=st.data())
def test_factors_match_curvlinops(loss: str, fisher_type: str, data: st.DataObject) -> None:
    problem = data.draw(problems((loss,)), label="problem")
    chain, B, seed = problem["chain"], problem["batch"], problem["seed"]
    model = chain.build(seed)
    x, y = make_batch(chain, loss, B, seed + 1)
    K = curvlinops_operator(copy.deepcopy(model), loss, x, y, fisher_type)

    opt = ocnopt.OCNOpt(model, loss=loss, curvature="kfac", lr=0.0, damping=1.0,
                        stat_decay=0.0, inv_every=1, fisher_type=fisher_type)
    opt.step(x, y)
    # curvlinops takes gradients of sqrt(C) * MSELoss(mean) for the empirical Fisher
    scale = chain.out_dim if (loss, fisher_type) == ("mse", "empirical") else 1
    modules = kronecker_modules(model)
    assert set(modules) == set(K._gradient_covariances)
    for name, module in modules.items():
        state = opt.state[module.weight]
        assert_factor_close(state["A"], K._input_covariances[name], f"A of layer {name}")
        assert_factor_close(scale * state["G"], K._gradient_covariances[name],
                            f"G of layer {name} (times {scale})")


# ---- the step: several K-FAC / EKFAC steps against curvlinops ------------------------------------
@pytest.mark.parametrize("fisher_type", ["type-2", "empirical"])
@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
@SETTINGS
@given(data=st.data())
def test_step_matches_curvlinops(curvature: str, fisher_type: str, data: st.DataObject) -> None:
    problem = data.draw(problems(), label="problem")
    chain, loss, B, seed = problem["chain"], problem["loss"], problem["batch"], problem["seed"]
    d0 = data.draw(st.floats(0.05, 1.0), label="damping")
    damping = Decay(d0) if data.draw(st.booleans(), label="schedule") else d0
    lr = data.draw(st.floats(0.01, 0.2), label="lr")
    momentum = data.draw(st.one_of(st.just(0.0), st.floats(0.1, 0.9)), label="momentum")
    wd = data.draw(st.one_of(st.just(0.0), st.floats(1e-4, 0.1)), label="weight_decay")
    steps = data.draw(st.integers(2, 3), label="steps")
    ekfac = curvature == "ekfac"

    model = chain.build(seed)
    ref = copy.deepcopy(model)
    opt = ocnopt.OCNOpt(model, loss=loss, curvature=curvature, lr=lr, damping=damping,
                        stat_every=1, inv_every=1, stat_decay=0.0, momentum=momentum,
                        weight_decay=wd, fisher_type=fisher_type)
    params = list(ref.parameters())
    init = [p.detach().clone() for p in params]
    bufs: list[torch.Tensor] | None = None
    for k in range(steps):
        x, y = make_batch(chain, loss, B, seed + 1 + k)
        d_k = damping(k) if callable(damping) else damping
        opt.step(x, y)

        K = curvlinops_operator(ref, loss, x, y, fisher_type, ekfac=ekfac)
        if k > 0 and damped_condition(K, d_k) > 1e8:
            # K-FAC with B = 1 and little damping can blow up within a few steps (logits 1e7,
            # A 1e12); rounding then decides the digits of further steps on either side
            event("stopped: the K-FAC trajectory left the well-conditioned regime")
            break
        C = chain.out_dim if (loss, fisher_type) == ("mse", "empirical") else 1
        for name in K._gradient_covariances:  # curvlinops' sqrt(C) loss scaling
            K._gradient_covariances[name] /= C
        if ekfac:
            use_eigenbasis(K, opt, model, k)
            K.compute_eigenvalue_correction()
            for corrections in K._corrected_eigenvalues.values():
                for pos in corrections:
                    corrections[pos] /= C
        Kinv = KFACInverseLinearOperator(K, damping=d_k, use_exact_damping=ekfac)
        grads = torch.autograd.grad(TORCH_LOSS[loss]()(ref(x), y), params)
        direction = Kinv @ [g + wd * p.detach() for g, p in zip(grads, params)]
        if momentum > 0:
            bufs = [d.clone() for d in direction] if bufs is None else [
                b * momentum + d for b, d in zip(bufs, direction)]
            direction = bufs
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(lr * d)

        for (name, p), q, q0 in zip(model.named_parameters(), params, init):
            assert_params_close(p.detach(), q.detach(), q0, f"step {k}, {name}")


def damped_condition(K: KFACLinearOperator, damping: float) -> float:
    """Largest condition number of (A + damping I) (x) (G + damping I) over the layers."""
    worst = 1.0
    for name, G in K._gradient_covariances.items():
        cond = 1.0
        for F in (K._input_covariances.get(name), G):
            if F is not None:
                cond *= (float(torch.linalg.eigvalsh(F).max().clamp_min(0)) + damping) / damping
        worst = max(worst, cond)
    return worst


def use_eigenbasis(K: EKFACLinearOperator, opt: ocnopt.OCNOpt, model: nn.Sequential,
                   step: int) -> None:
    """Hand ocnopt's Kronecker eigenbases (Q_A, Q_G of this step) to curvlinops' EKFAC after
    checking that they are orthonormal eigenbases of curvlinops' own factors.

    EKFAC depends on the basis chosen inside a repeated eigenvalue (the diagonal is re-estimated
    there), and repeated eigenvalues are common on these small chains: an MSE type-2 G of the
    last layer is (2/C) I, and a 1x2 kernel with padding 1 on a width-1 map makes A
    block-diagonal with two equal blocks. Two independent ``eigh`` calls on factors that differ
    in the last ulp then pick different (equally valid) bases. Checking Q^T F Q = diag instead
    of comparing bases keeps the test independent of that arbitrary choice; curvlinops still
    computes the corrected eigenvalues and the damped inverse itself."""
    for name, module in kronecker_modules(model).items():
        opt_state = opt.state[module.weight]
        for factor, key, dest in (
            (K._input_covariances.get(name), "QA", K._input_covariances_eigenvectors),
            (K._gradient_covariances.get(name), "QG", K._gradient_covariances_eigenvectors),
        ):
            Q = opt_state[key]
            eye = torch.eye(Q.shape[0], dtype=Q.dtype)
            torch.testing.assert_close(Q.T @ Q, eye, rtol=0, atol=1e-12,
                                       msg=lambda m, n=name, s=key: f"step {step}, {n}: {s}: {m}")
            D = Q.T @ factor @ Q
            off = D - torch.diag(D.diagonal())
            assert float(off.abs().max()) <= 1e-10 * float(factor.abs().max()) + 1e-300, (
                f"step {step}, layer {name}: ocnopt's {key} does not diagonalise curvlinops' "
                f"factor (largest off-diagonal {float(off.abs().max()):.2e})")
            dest[name] = Q


# ---- the sampled Fisher is an unbiased estimate of the type-2 one ---------------------------------
DRAWS = 3000  # label draws in total (the batch repeated ceil(DRAWS / B) times)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@settings(SETTINGS, max_examples=8)
@given(data=st.data())
def test_mc_factor_is_unbiased(loss: str, data: st.DataObject) -> None:
    """G from one sampled label per sample is random; repeating the batch R times averages R
    independent draws per sample (A is unchanged), and E[G_mc] = G_type-2 (the loss Hessian
    propagated). The relative Frobenius error of a K x K covariance estimated from N draws is
    about sqrt((K + 1) / N) (K = outputs); over 420 layers of random chains the observed error
    never exceeded 2x that, so 5x is a safe bound (<= 0.23 at N = 3000) that still rejects a
    biased sampler (a factor 2 in the noise scale alone is a relative error >= 0.5)."""
    problem = data.draw(problems((loss,)), label="problem")
    chain, B, seed = problem["chain"], problem["batch"], problem["seed"]
    model = chain.build(seed)
    x, y = make_batch(chain, loss, B, seed + 1)
    R = -(-DRAWS // B)
    xr, yr = x.repeat(R, *(1,) * (x.dim() - 1)), y.repeat(R, *(1,) * (y.dim() - 1))
    tol = 5 * math.sqrt((chain.out_dim + 1) / (R * B))

    hp = {"lr": 0.0, "damping": 1.0, "stat_decay": 0.0, "inv_every": 1}
    mc = copy.deepcopy(model)
    opt_mc = ocnopt.OCNOpt(mc, loss=loss, curvature="kfac", fisher_type="mc", seed=seed, **hp)
    opt_mc.step(xr, yr)
    opt_t2 = ocnopt.OCNOpt(model, loss=loss, curvature="kfac", fisher_type="type-2", **hp)
    opt_t2.step(x, y)

    for (name, m_mc), m_t2 in zip(kronecker_modules(mc).items(),
                                  kronecker_modules(model).values()):
        s_mc, s_t2 = opt_mc.state[m_mc.weight], opt_t2.state[m_t2.weight]
        assert_factor_close(s_mc["A"], s_t2["A"], f"A of layer {name}")
        G_mc, G_t2 = s_mc["G"], s_t2["G"]
        if bool(G_t2.abs().max() == 0):  # dead layer: nothing reaches it, sampled or not
            assert bool(G_mc.abs().max() == 0)
            continue
        assert not torch.equal(G_mc, G_t2), "the sampled G equals the type-2 G exactly"
        err = float(torch.linalg.matrix_norm(G_mc - G_t2) / torch.linalg.matrix_norm(G_t2))
        assert err <= tol, (f"layer {name}: the mean of {R * B} sampled G's is {err:.3f} "
                            f"(relative Frobenius) from the type-2 G; tolerance {tol:.3f}")
