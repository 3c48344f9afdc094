"""The Neural ODE benchmark problems (docs/ode.md), after SNOpt's three applications, offline.

* ``digits-odenet``: scikit-learn digits as 1x8x8 images; conv stem (16 ch, stride 2: 4x4), an
  ODE block with F = conv-ReLU-conv (3x3, time as an extra input channel), flatten, Linear.
* ``motions-ode``: UEA BasicMotions (6 accelerometer/gyroscope channels x 100 steps, 4 classes,
  40 train / 40 test) from sktime's bundled ``load_basic_motions`` (``pip install
  'ocnopt[ode-bench]'``); fit/val from the 40 training series (32/8, stratified), test = the 40
  test series; standardised per channel with the fit split's statistics. Conv1d encoder (k5,
  stride 2: 100 -> 50, 16 ch), an ODE block with F = Conv1d-ReLU-Conv1d (time as a channel),
  average pool, Linear 16-4.
* ``circles-cnf``: 2-D concentric circles (scikit-learn ``make_circles``, 2000 points, noise
  0.05, factor 0.5, standardised); a continuous normalizing flow, FFJORD-style: dz/dt = f(t, z)
  with three concat-squash Linear layers (hidden 32, tanh), and d ell/dt = tr(df/dz) estimated
  by Hutchinson's estimator eps^T (df/dz) eps during training (eps ~ N(0, I) drawn per sample
  and step, carried in the ODE state so that every solve of the step sees the same eps;
  the exact trace in eval mode). Loss and metric: the negative log-likelihood
  -log p(x) = |z(t1)|^2 / 2 + log(2 pi) - ell(t1), in nats per point. The identity flow (the
  initial one, nearly) has 1 + log(2 pi) = 2.838 on standardised data; the target, 2.82, is a
  first step below it (torch Adam at lr 0.1 reaches 2.72 after 216 steps: these flows train
  for thousands of steps, the runs here for about a hundred).

Every ODE block uses rk4 with a fixed step (``ODE_SOLVER``), so a step's function evaluations
are fixed by t1 (docs/method.md section 12); its time grid for kfac/ekfac statistics is
``GRID_STEP``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .deps import require
from .problems import SPLIT_SEED, Dataset, Problem, _split, _standardise, _tensors, load_digits

#: the solver of every block: rk4, 4 steps on [0, 1] (16 evaluations of F per solve)
ODE_SOLVER: dict[str, Any] = {"method": "rk4", "options": {"step_size": 0.25}}
#: the time grid of the Kronecker statistics (SNOpt's released default is 0.01; 0.05 here keeps
#: a statistics step's extra cost at 21 evaluations of F and its gradient on [0, 1])
GRID_STEP = 0.05
HIDDEN = 16


# ---- fields ---------------------------------------------------------------------------------------
class ConcatConv(nn.Module):
    """A convolution of [t, x]: the time as an extra input channel (``dim`` 1 or 2)."""

    def __init__(self, c_in: int, c_out: int, dim: int = 2, kernel: int = 3):
        super().__init__()
        conv = nn.Conv2d if dim == 2 else nn.Conv1d
        self.conv = conv(c_in + 1, c_out, kernel, padding=kernel // 2)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = torch.ones_like(x[:, :1]) * t
        return self.conv(torch.cat([tt, x], 1))


class ConvField(nn.Module):
    """F(t, x) = conv(t, ReLU(conv(t, x))), channels kept."""

    def __init__(self, channels: int = HIDDEN, dim: int = 2):
        super().__init__()
        self.c1 = ConcatConv(channels, channels, dim)
        self.c2 = ConcatConv(channels, channels, dim)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.c2(t, torch.relu(self.c1(t, x)))


def ode_block(func: nn.Module, adjoint: bool = True, **kw: Any) -> nn.Module:
    require("torchdiffeq", "the Neural ODE problems")
    from ..ode import ODEBlock

    return ODEBlock(func, t0=0.0, t1=1.0, grid_step=GRID_STEP, adjoint=adjoint,
                    **{**ODE_SOLVER, **kw})


def digits_odenet(step_size: float | None = None) -> nn.Sequential:
    """Conv2d 1-16 3x3 stride 2 + ReLU (8x8 -> 4x4), ODE block (ConvField 16 ch on 4x4),
    flatten, Linear 256-10 (global pooling of the 16 channels instead loses the digits'
    spatial layout: Adam reaches 25 % test accuracy in 2 epochs there, 90 % here).
    ``step_size``: rk4's step instead of ``ODE_SOLVER``'s 0.25."""
    kw: dict[str, Any] = {} if step_size is None else {"options": {"step_size": step_size}}
    return nn.Sequential(nn.Conv2d(1, HIDDEN, 3, stride=2, padding=1), nn.ReLU(),
                         ode_block(ConvField(HIDDEN, 2), **kw), nn.Flatten(),
                         nn.Linear(HIDDEN * 16, 10))


def motions_ode() -> nn.Sequential:
    """Conv1d 6-16 k5 stride 2 + ReLU, ODE block (ConvField 16 ch, 1-D), average pool,
    Linear 16-4."""
    return nn.Sequential(nn.Conv1d(6, HIDDEN, 5, stride=2, padding=2), nn.ReLU(),
                         ode_block(ConvField(HIDDEN, 1)), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                         nn.Linear(HIDDEN, 4))


# ---- the continuous normalizing flow ------------------------------------------------------------
class ConcatSquashLinear(nn.Module):
    """FFJORD's layer: (W x + b) * sigmoid(W_g t + b_g) + w_s t."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.layer = nn.Linear(d_in, d_out)
        self.gate = nn.Linear(1, d_out)
        self.shift = nn.Linear(1, d_out, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = torch.ones_like(x[:, :1]) * t
        return self.layer(x) * torch.sigmoid(self.gate(tt)) + self.shift(tt)


class CNFNet(nn.Module):
    """f(t, z): concat-squash Linear 2-h, tanh, h-h, tanh, h-2."""

    def __init__(self, hidden: int = 32, dim: int = 2):
        super().__init__()
        self.l1 = ConcatSquashLinear(dim, hidden)
        self.l2 = ConcatSquashLinear(hidden, hidden)
        self.l3 = ConcatSquashLinear(hidden, dim)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.l3(t, torch.tanh(self.l2(t, torch.tanh(self.l1(t, z)))))


class CNFField(nn.Module):
    """The flow's field on the state s = [z (d), ell (1), eps (d)]:
    ds/dt = [f(t, z), eps^T (df/dz) eps, 0] in training (Hutchinson), [f, tr(df/dz), 0] in
    eval mode (exact, d vector-Jacobian products). The estimator's product is a
    vector-Jacobian product by autograd (create_graph where gradients flow), or a
    Jacobian-vector product (``torch.func.jvp``) inside torch.func transforms (ocnopt's
    per-sample products of order 2), which cannot call ``torch.autograd.grad``."""

    def __init__(self, net: nn.Module, dim: int = 2):
        super().__init__()
        self.net, self.dim = net, dim

    def forward(self, t: Tensor, s: Tensor) -> Tensor:
        d = self.dim
        z, eps = s[:, :d], s[:, d + 1:]
        if torch._C._functorch.is_functorch_wrapped_tensor(s):
            f, jv = torch.func.jvp(lambda zz: self.net(t, zz), (z,), (eps,))[:2]
            div = (jv * eps).sum(1, keepdim=True)
            return torch.cat([f, div, torch.zeros_like(eps)], 1)
        create = torch.is_grad_enabled()
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            f = self.net(t, z)
            if self.training:
                (vj,) = torch.autograd.grad(f, z, eps, create_graph=create)
                div = (vj * eps).sum(1, keepdim=True)
            else:
                div = sum(torch.autograd.grad(f[:, i].sum(), z, create_graph=create,
                                              retain_graph=True)[0][:, i] for i in range(d))
                div = div.unsqueeze(1)  # type: ignore[union-attr]
        return torch.cat([f, div, torch.zeros_like(eps)], 1)


class HutchinsonNoise(nn.Module):
    """x (B, d) -> [x, 0, eps] (B, 2d + 1): the flow's initial state, eps ~ N(0, I) per sample
    in training mode (zeros in eval mode, where the field takes the exact trace), drawn from
    the module's own generator, seeded from torch's global one when the module is built (so a
    model built from a seed draws the same noise under every optimizer, one draw per training
    step). As a step of ``ocnopt.OCNOpt`` the draw of the nominal pass is replayed in the
    update pass."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))

    def draw(self, x: Tensor) -> Tensor:
        if not self.training:
            return torch.zeros_like(x)
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype).to(x.device)

    def forward(self, x: Tensor) -> Tensor:
        return self.augment(x, self.draw(x))

    @staticmethod
    def augment(x: Tensor, eps: Tensor) -> Tensor:
        return torch.cat([x, x.new_zeros(x.shape[0], 1), eps], 1)


def _register_noise() -> None:
    """ocnopt's handler of ``HutchinsonNoise``: the noise is the context of the nominal pass."""
    from ..derivatives import DERIVATIVES
    from ..derivatives.base import StageDerivatives

    class NoiseDerivatives(StageDerivatives):
        random = True

        def forward(self, module: nn.Module, x: Tensor) -> tuple[Tensor, Any]:
            eps = module.draw(x)  # type: ignore[operator]
            return HutchinsonNoise.augment(x, eps), eps

        def replay(self, module: nn.Module, x: Tensor, ctx: Any) -> Tensor:
            return HutchinsonNoise.augment(x, ctx if ctx is not None else torch.zeros_like(x))

        def functional(self, module: nn.Module, params: dict[str, Tensor], x: Tensor,
                       ctx: Any) -> Tensor:
            return self.replay(module, x, ctx)

    DERIVATIVES.setdefault(HutchinsonNoise, NoiseDerivatives())


_register_noise()


def circles_cnf(hidden: int = 32) -> nn.Sequential:
    """HutchinsonNoise, then the flow's ODE block on [0, 1] (rk4, 4 steps)."""
    return nn.Sequential(HutchinsonNoise(), ode_block(CNFField(CNFNet(hidden))))


LOG_2PI = math.log(2 * math.pi)


def flow_nll(out: Tensor, target: Tensor | None = None) -> Tensor:
    """Per-sample -log p(x) = |z|^2 / 2 + (d/2) log(2 pi) - ell from the flow's output state
    [z (d), ell, eps (d)] (``target`` unused)."""
    d = (out.shape[1] - 1) // 2
    z, ell = out[:, :d], out[:, d]
    return 0.5 * z.pow(2).sum(1) + 0.5 * d * LOG_2PI - ell


class FlowNLL(nn.Module):
    """``flow_nll`` averaged over the batch (the torch peers' loss)."""

    def forward(self, out: Tensor, target: Tensor | None = None) -> Tensor:
        return flow_nll(out, target).mean()


# ---- data -----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def load_motions(split_seed: int = SPLIT_SEED) -> Dataset:
    """UEA BasicMotions via sktime's bundled ``load_basic_motions`` (module docstring)."""
    try:
        from sktime.datasets import load_basic_motions
    except ImportError as err:
        raise ImportError("problem motions-ode needs sktime (its bundled UEA BasicMotions "
                          "data): pip install 'ocnopt[ode-bench]' (or pip install sktime)"
                          ) from err
    X, y = load_basic_motions(split="train", return_type="numpy3D")
    X_te, y_te = load_basic_motions(split="test", return_type="numpy3D")
    classes = sorted(set(y) | set(y_te))
    code = {c: i for i, c in enumerate(classes)}
    y, y_te = np.array([code[c] for c in y]), np.array([code[c] for c in y_te])
    X_fit, y_fit, X_val, y_val, X_te, y_te = _split(X, y, split_seed, stratify=True,
                                                    test=(X_te, y_te))
    mean = X_fit.mean((0, 2), keepdims=True)
    std = X_fit.std((0, 2), keepdims=True)
    std = np.where(std > 0, std, 1.0)
    parts = tuple(a if i % 2 else (a - mean) / std
                  for i, a in enumerate((X_fit, y_fit, X_val, y_val, X_te, y_te)))
    return _tensors("motions", parts, len(classes), (6, 100),
                    {"source": "sktime.datasets.load_basic_motions (UEA BasicMotions)",
                     "classes": classes})


CIRCLES_SAMPLES = 2000


@functools.lru_cache(maxsize=4)
def load_circles(split_seed: int = SPLIT_SEED) -> Dataset:
    """``make_circles(2000, noise=0.05, factor=0.5)``, standardised with the fit split's
    statistics (one scalar, the shape kept round); targets are zeros (density estimation)."""
    make_circles = require("sklearn.datasets", "the circles data (make_circles)").make_circles
    X, labels = make_circles(CIRCLES_SAMPLES, noise=0.05, factor=0.5,
                             random_state=1000 + split_seed)
    parts = _split(X, labels, split_seed, stratify=True)
    X_fit, _, X_val, _, X_te, _ = _standardise(parts, per_feature=False)
    zeros = [np.zeros(len(a)) for a in (X_fit, X_val, X_te)]
    out = (X_fit, zeros[0], X_val, zeros[1], X_te, zeros[2])
    return _tensors("circles", out, None, (2,),
                    {"source": "sklearn.datasets.make_circles(2000, noise=0.05, factor=0.5)"})


# ---- the problems ---------------------------------------------------------------------------------
_SNOPT = "damping 0.05, statistics every 10 steps, eigenvalue running average 0.75"
ODE_PROBLEMS: list[Problem] = [
    Problem("digits-odenet", "scikit-learn digits as 1x8x8 images, 10 classes",
            "Conv2d 1-16 stride 2 + ReLU (4x4), ODE block (F = conv3x3-ReLU-conv3x3, 16 ch, time "
            "as a channel; rk4, 4 steps on [0, 1]), flatten, Linear 256-10", "cross_entropy",
            lambda seed: load_digits(seed, image=True), digits_odenet, epochs=10, batch_size=64,
            target=0.95, exact="no"),
    # the same with 20 rk4 steps: the memory of backpropagation through the solver grows with
    # the steps, the adjoint's does not (the overhead protocol)
    Problem("digits-odenet-fine", "scikit-learn digits as 1x8x8 images, 10 classes",
            "digits-odenet's network with rk4 steps of 0.05 (20 steps on [0, 1])",
            "cross_entropy", lambda seed: load_digits(seed, image=True),
            lambda: digits_odenet(step_size=0.05), epochs=10, batch_size=64, target=0.95,
            exact="no"),
    Problem("motions-ode", "UEA BasicMotions (sktime), 6 channels x 100 steps, 4 classes",
            "Conv1d 6-16 k5 stride 2 + ReLU, ODE block (F = conv1d k3-ReLU-conv1d k3, 16 ch, "
            "time as a channel; rk4, 4 steps on [0, 1]), average pool, Linear 16-4",
            "cross_entropy", load_motions, motions_ode, epochs=30, batch_size=8, target=0.9,
            exact="no"),
    Problem("circles-cnf", "2-D concentric circles (make_circles, noise 0.05), density",
            "continuous normalizing flow: concat-squash Linear 2-32-32-2 (tanh), Hutchinson "
            "trace in training, exact in evaluation; rk4, 4 steps on [0, 1]", "nll",
            load_circles, circles_cnf, epochs=10, batch_size=64, target=2.82, exact="no"),
]
