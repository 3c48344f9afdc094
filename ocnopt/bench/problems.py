"""The benchmark problems (docs/benchmarks.md): offline data, fixed splits, the networks.

Every problem has three splits, fixed by ``split_seed`` (default 0) and independent of the
training seeds:

* ``test``: held out once (scikit-learn problems: stratified 30 %; mnist1d: the 1000 test
  samples of ``make_dataset``; quadratic: 30 %). Only ever evaluated, never used to choose.
* ``val``: 20 % of the remaining training data (stratified), used by the ``sweep`` protocol to
  choose the learning rate.
* ``fit``: the other 80 %: every protocol trains on it (so a learning rate chosen on ``val``
  transfers to the ``train`` protocol unchanged).

Inputs are standardised with statistics of the ``fit`` split only (per feature for the
fully-connected problems, one scalar for the images). mnist1d comes standardised by
``make_dataset`` itself and is used as generated.

Shapes (N = samples): wine-fcn (N, 13), 3 classes; digits-fcn and digits-deep (N, 64), 10
classes; digits-cnn (N, 1, 8, 8), 10 classes; mnist1d-mlp (N, 40), 10 classes; mnist1d-cnn
(N, 1, 40), 10 classes; quadratic (N, 100) with targets (N, 1); the graph networks
digits-resnet and digits-inception (N, 1, 8, 8), mnist1d-resnet (N, 1, 40), 10 classes.

The Neural ODE problems digits-odenet (N, 1, 8, 8), 10 classes; motions-ode (N, 6, 100), 4
classes (sktime's UEA BasicMotions); circles-cnf (N, 2), density (negative log-likelihood) are
defined in ``ode_problems`` and registered here.

The graph networks are plain ``nn.Module`` classes (residual adds, ``torch.cat`` of branches,
BatchNorm) whose ``forward`` ``torch.fx.symbolic_trace`` traces; they are trained in train mode
and evaluated in eval mode (BatchNorm's running statistics).
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .deps import require

SPLIT_SEED = 0
TEST_FRACTION = 0.3
VAL_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    """Tensors of the three splits (inputs float32, class indices int64 or regression targets)."""

    name: str
    X_fit: Tensor
    y_fit: Tensor
    X_val: Tensor
    y_val: Tensor
    X_test: Tensor
    y_test: Tensor
    classes: int | None  # None for regression
    meta: dict[str, Any] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {"fit": len(self.y_fit), "val": len(self.y_val), "test": len(self.y_test)}

    def subset(self, n: int | None) -> Dataset:
        """The first ``n`` samples of every split (the splits are already shuffled)."""
        if n is None:
            return self
        return Dataset(self.name, self.X_fit[:n], self.y_fit[:n], self.X_val[:n], self.y_val[:n],
                       self.X_test[:n], self.y_test[:n], self.classes, dict(self.meta))


@dataclass(frozen=True)
class Problem:
    """A benchmark problem: its data, its network and the defaults of its protocols."""

    name: str
    description: str
    network: str
    loss: str  # "cross_entropy", "mse" or "nll" (a flow's output: ode_problems.flow_nll)
    load: Callable[[int], Dataset]
    build: Callable[[], nn.Module]
    epochs: int  # default epochs of the train protocol
    batch_size: int
    target: float  # time-to-target: test accuracy to reach (mse: test loss to go under)
    #: which exact-backend modes (order 2 "autograd-*-fb", curvature "full") run here:
    #: "default" (in the default and "all" sets), "on-request" (only when named), "no"
    exact: str = "on-request"
    #: peers and backends that cannot handle a layer of the network: name -> reason
    unsupported: dict[str, str] = field(default_factory=dict)
    #: hyper-parameter overrides for this problem, by curvature ("kfac") or peer name
    hyper: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        """accuracy (cross_entropy), mse, or nll (a flow's negative log-likelihood)."""
        return {"cross_entropy": "accuracy", "nll": "nll"}.get(self.loss, "mse")

    def model(self, seed: int) -> nn.Module:
        """The network with its initial weights drawn from ``seed`` (global RNG untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build()


# ---- splits -------------------------------------------------------------------------------------
def _split(X: np.ndarray, y: np.ndarray, seed: int, stratify: bool, test: tuple | None = None
           ) -> tuple[np.ndarray, ...]:
    """(X_fit, y_fit, X_val, y_val, X_test, y_test); ``test`` given: split only fit/val."""
    train_test_split = require("sklearn.model_selection", "splitting the benchmark data"
                               ).train_test_split

    if test is None:
        X, X_te, y, y_te = train_test_split(X, y, test_size=TEST_FRACTION, random_state=seed,
                                            stratify=y if stratify else None)
    else:
        X_te, y_te = test
    X_fit, X_val, y_fit, y_val = train_test_split(X, y, test_size=VAL_FRACTION, random_state=seed,
                                                  stratify=y if stratify else None)
    return X_fit, y_fit, X_val, y_val, X_te, y_te


def _standardise(parts: tuple[np.ndarray, ...], per_feature: bool) -> tuple[np.ndarray, ...]:
    X_fit, y_fit, X_val, y_val, X_te, y_te = parts
    if per_feature:
        mean, std = X_fit.mean(0), X_fit.std(0)
        std = np.where(std > 0, std, 1.0)
    else:
        mean, std = X_fit.mean(), X_fit.std()
    return ((X_fit - mean) / std, y_fit, (X_val - mean) / std, y_val, (X_te - mean) / std, y_te)


def _tensors(name: str, parts: tuple[np.ndarray, ...], classes: int | None,
             shape: tuple[int, ...], meta: dict[str, Any]) -> Dataset:
    X_fit, y_fit, X_val, y_val, X_te, y_te = parts

    def xs(a: np.ndarray) -> Tensor:
        return torch.tensor(np.asarray(a, dtype=np.float32).reshape(-1, *shape))

    def ys(a: np.ndarray) -> Tensor:
        if classes is None:
            return torch.tensor(np.asarray(a, dtype=np.float32).reshape(-1, 1))
        return torch.tensor(np.asarray(a, dtype=np.int64))

    return Dataset(name, xs(X_fit), ys(y_fit), xs(X_val), ys(y_val), xs(X_te), ys(y_te),
                   classes, meta)


# ---- loaders ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def load_wine(split_seed: int = SPLIT_SEED) -> Dataset:
    """scikit-learn ``load_wine`` (178 x 13, 3 classes, bundled with scikit-learn)."""
    sk_load = require("sklearn.datasets", "the wine data (load_wine)").load_wine

    X, y = sk_load(return_X_y=True)
    parts = _standardise(_split(X, y, split_seed, stratify=True), per_feature=True)
    return _tensors("wine", parts, 3, (13,), {"source": "sklearn.datasets.load_wine"})


@functools.lru_cache(maxsize=16)
def load_digits(split_seed: int = SPLIT_SEED, image: bool = False) -> Dataset:
    """scikit-learn ``load_digits`` (1797 8x8 images, 10 classes, bundled with scikit-learn);
    flattened to 64 features (standardised per feature) or as 1x8x8 images (one scalar)."""
    sk_load = require("sklearn.datasets", "the digits data (load_digits)").load_digits

    X, y = sk_load(return_X_y=True)
    parts = _standardise(_split(X, y, split_seed, stratify=True), per_feature=not image)
    shape = (1, 8, 8) if image else (64,)
    return _tensors("digits", parts, 10, shape, {"source": "sklearn.datasets.load_digits"})


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> dict[str, np.ndarray]:
    """``mnist1d.data.make_dataset()`` with its default arguments: 5000 samples, 4000 train /
    1000 test, seed 42, generated locally (no download; ``get_dataset`` would fetch a pickle).

    make_dataset seeds Python's and NumPy's global generators; their states are restored."""
    os.environ.setdefault("MPLBACKEND", "Agg")  # mnist1d.utils imports pyplot
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # pragma: no cover - installed with the bench extra
        raise ImportError("problem mnist1d needs the mnist1d package: pip install 'ocnopt[bench]'"
                          ) from err
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


@functools.lru_cache(maxsize=16)
def load_mnist1d(split_seed: int = SPLIT_SEED, channel: bool = False) -> Dataset:
    """mnist1d (40-sample signals, 10 classes): fit/val from the 4000 training samples, test =
    the 1000 test samples; as (N, 40) or (N, 1, 40)."""
    d = _mnist1d_arrays()
    parts = _split(d["x"], d["y"], split_seed, stratify=True, test=(d["x_test"], d["y_test"]))
    shape = (1, 40) if channel else (40,)
    return _tensors("mnist1d", parts, 10, shape,
                    {"source": "mnist1d.data.make_dataset(get_dataset_args())"})


QUAD_DIM = 100
QUAD_SAMPLES = 2000
QUAD_NOISE = 0.1
QUAD_EIGS = (1e-2, 1.0)


@functools.lru_cache(maxsize=16)
def load_quadratic(split_seed: int = SPLIT_SEED) -> Dataset:
    """A noisy quadratic with a known Hessian: inputs x ~ N(0, S), S = Q diag(s) Q^T with s
    log-spaced in [1e-2, 1] (condition number 100) and Q a random rotation; targets
    y = w*^T x + eps, eps ~ N(0, 0.1^2). For the linear model u (100 parameters) the expected
    loss E (u^T x - y)^2 = (u - w*)^T S (u - w*) + 0.01: Hessian 2 S, minimum 0.01."""
    rng = np.random.default_rng(1000 + split_seed)
    s = np.geomspace(QUAD_EIGS[0], QUAD_EIGS[1], QUAD_DIM)
    Q, _ = np.linalg.qr(rng.standard_normal((QUAD_DIM, QUAD_DIM)))
    w = rng.standard_normal(QUAD_DIM)
    X = (rng.standard_normal((QUAD_SAMPLES, QUAD_DIM)) * np.sqrt(s)) @ Q.T
    y = X @ w + QUAD_NOISE * rng.standard_normal(QUAD_SAMPLES)
    parts = _split(X, y, split_seed, stratify=False)
    meta = {"source": "synthetic", "hessian_eigenvalues": (2 * s).tolist(),
            "noise_variance": QUAD_NOISE**2, "condition_number": float(s[-1] / s[0])}
    return _tensors("quadratic", parts, None, (QUAD_DIM,), meta)


# ---- networks -----------------------------------------------------------------------------------
def fcn(d_in: int, hidden: int, classes: int, layers: int = 5,
        activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """``layers`` Linear layers of width ``hidden`` with ``activation`` between them."""
    widths = [d_in] + [hidden] * (layers - 1) + [classes]
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        mods.append(nn.Linear(a, b))
        if i < layers - 1:
            mods.append(activation())
    return nn.Sequential(*mods)


def digits_cnn() -> nn.Sequential:
    """4 conv 3x3 (32 channels, padding 1) with ReLU on 1x8x8, then Linear 2048-32, Linear 32-10."""
    mods: list[nn.Module] = []
    for c_in in (1, 32, 32, 32):
        mods += [nn.Conv2d(c_in, 32, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*mods, nn.Flatten(), nn.Linear(32 * 64, 32), nn.ReLU(), nn.Linear(32, 10))


def mnist1d_cnn() -> nn.Sequential:
    """3 Conv1d (25 channels, kernel 5, stride 2, padding 2: 40 -> 20 -> 10 -> 5) with ReLU, as
    mnist1d's reference CNN, then a Linear head 125-10."""
    mods: list[nn.Module] = []
    for c_in in (1, 25, 25):
        mods += [nn.Conv1d(c_in, 25, 5, stride=2, padding=2), nn.ReLU()]
    return nn.Sequential(*mods, nn.Flatten(), nn.Linear(25 * 5, 10))


# ---- graph networks (residual and multi-branch; plain modules that torch.fx traces) -------------
class _Block2d(nn.Module):
    """Residual block y = ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + s(x)), s the identity, or a
    1x1 conv (stride ``stride``) + BN projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """digits-resnet on 1x8x8: stem conv3x3 (16 ch)-BN-ReLU; residual blocks 16 -> 16,
    16 -> 32 (stride 2, 1x1 conv + BN projection shortcut: 8x8 -> 4x4), 32 -> 32; global
    average pool; Linear 32-10. 38 k parameters."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.block1 = _Block2d(16, 16)
        self.block2 = _Block2d(16, 32, stride=2)
        self.block3 = _Block2d(32, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = self.block3(self.block2(self.block1(h)))
        return self.head(torch.mean(h, dim=(2, 3)))


class _Inception(nn.Module):
    """Four parallel branches concatenated on the channels: 1x1; 1x1 -> 3x3; 1x1 -> 5x5
    (padding 2); maxpool 3x3 (stride 1, padding 1) -> 1x1; every conv followed by ReLU;
    ``width`` channels per branch (output 4 ``width``), spatial size kept."""

    def __init__(self, c_in: int, width: int = 8):
        super().__init__()
        self.b1 = nn.Conv2d(c_in, width, 1)
        self.b3_reduce = nn.Conv2d(c_in, width, 1)
        self.b3 = nn.Conv2d(width, width, 3, padding=1)
        self.b5_reduce = nn.Conv2d(c_in, width, 1)
        self.b5 = nn.Conv2d(width, width, 5, padding=2)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.bp = nn.Conv2d(c_in, width, 1)

    def forward(self, x: Tensor) -> Tensor:
        y1 = torch.relu(self.b1(x))
        y3 = torch.relu(self.b3(torch.relu(self.b3_reduce(x))))
        y5 = torch.relu(self.b5(torch.relu(self.b5_reduce(x))))
        yp = torch.relu(self.bp(self.pool(x)))
        return torch.cat([y1, y3, y5, yp], dim=1)


class DigitsInception(nn.Module):
    """digits-inception on 1x8x8: stem conv3x3 (16 ch)-BN-ReLU; inception blocks 16 -> 32 and
    32 -> 32 (4 branches of 8 channels); adaptive average pool; flatten; Linear 32-10. 6.5 k
    parameters."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.inc1 = _Inception(16)
        self.inc2 = _Inception(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.stem(x)))
        h = self.pool(self.inc2(self.inc1(h)))
        return self.head(torch.flatten(h, 1))


class _Block1d(nn.Module):
    """Residual block y = ReLU(BN(conv1d k3(ReLU(BN(conv1d k3(x))))) + x), length kept."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + x)


class Mnist1dResNet(nn.Module):
    """mnist1d-resnet on 1x40: stem conv1d k5 (32 ch, padding 2)-BN-ReLU; 3 residual blocks of
    32 channels (conv1d k3-BN-ReLU-conv1d k3-BN + identity, ReLU after the add); global average
    pool over the 40 positions; Linear 32-10. 19 k parameters."""

    def __init__(self, channels: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv1d(1, channels, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm1d(channels)
        self.blocks = nn.Sequential(*(_Block1d(channels) for _ in range(3)))
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(torch.relu(self.bn(self.stem(x))))
        return self.head(torch.mean(h, dim=2))


# digits-cnn: the Linear head's input factor A is 2049 x 2049; ocnopt inverts it through a float64
# eigen-decomposition (seconds on one core), so the inverses (and curvlinops' rebuilds) are
# refreshed every 50 steps instead of 10 there. K-FAC's default lr 0.02 diverges on this network
# (both implementations); 0.005 was chosen on the validation split (seed 0, 2 epochs).
_CNN_KFAC: dict[str, dict[str, Any]] = {
    "kfac": {"inv_every": 50, "lr": 0.005}, "ekfac": {"inv_every": 50, "lr": 0.005},
    "curvlinops-kfac": {"update_every": 50, "lr": 0.005}}
_CONV1D = "curvlinops' K-FAC supports Linear and Conv2d layers only (this network has Conv1d)"

PROBLEMS: dict[str, Problem] = {p.name: p for p in [
    Problem("wine-fcn", "scikit-learn wine, 13 features, 3 classes", "5 Linear, hidden 16, Tanh",
            "cross_entropy", load_wine, lambda: fcn(13, 16, 3), epochs=40, batch_size=16,
            target=0.95, exact="default"),
    Problem("digits-fcn", "scikit-learn digits, 64 features, 10 classes",
            "5 Linear, hidden 32, Tanh", "cross_entropy", load_digits, lambda: fcn(64, 32, 10),
            epochs=20, batch_size=32, target=0.95),
    Problem("digits-cnn", "scikit-learn digits as 1x8x8 images, 10 classes",
            "4 Conv2d 3x3 (32 ch, pad 1) + ReLU, Linear 2048-32, Linear 32-10", "cross_entropy",
            lambda seed: load_digits(seed, image=True), digits_cnn, epochs=5, batch_size=32,
            target=0.95, exact="no", hyper=_CNN_KFAC),
    Problem("mnist1d-mlp", "mnist1d (make_dataset defaults), 40 features, 10 classes",
            "MLP 40-100-100-10, ReLU", "cross_entropy", load_mnist1d,
            lambda: fcn(40, 100, 10, layers=3, activation=nn.ReLU), epochs=20, batch_size=64,
            target=0.6, exact="no"),
    Problem("mnist1d-cnn", "mnist1d as 1x40 signals, 10 classes",
            "3 Conv1d (25 ch, kernel 5, stride 2) + ReLU, Linear 125-10", "cross_entropy",
            lambda seed: load_mnist1d(seed, channel=True), mnist1d_cnn, epochs=10, batch_size=64,
            target=0.6, exact="no", unsupported={"curvlinops-kfac": _CONV1D}),
    Problem("quadratic", "noisy quadratic, 100 parameters, Hessian eigenvalues 2e-2..2 known",
            "Linear 100-1 without bias", "mse", load_quadratic,
            lambda: nn.Sequential(nn.Linear(QUAD_DIM, 1, bias=False)), epochs=10, batch_size=32,
            target=0.02, exact="default"),
    # graph networks: residual and multi-branch modules (not nn.Sequential), BatchNorm
    Problem("digits-resnet", "scikit-learn digits as 1x8x8 images, 10 classes",
            "ResNet: conv stem 16 ch, 3 residual blocks (conv-BN-ReLU-conv-BN + skip, one with a "
            "1x1 conv + BN projection and stride 2), global average pool, Linear 32-10",
            "cross_entropy", lambda seed: load_digits(seed, image=True), DigitsResNet,
            epochs=10, batch_size=32, target=0.95, exact="no"),
    Problem("digits-inception", "scikit-learn digits as 1x8x8 images, 10 classes",
            "conv stem 16 ch-BN-ReLU, 2 inception blocks (1x1; 1x1-3x3; 1x1-5x5; maxpool-1x1; 8 ch "
            "each, concatenated), adaptive average pool, Linear 32-10", "cross_entropy",
            lambda seed: load_digits(seed, image=True), DigitsInception, epochs=20,
            batch_size=32, target=0.95, exact="no"),
    Problem("mnist1d-resnet", "mnist1d as 1x40 signals, 10 classes",
            "Conv1d ResNet: stem k5 32 ch-BN-ReLU, 3 residual blocks (conv1d k3-BN-ReLU-conv1d k3-BN "
            "+ skip), global average pool, Linear 32-10", "cross_entropy",
            lambda seed: load_mnist1d(seed, channel=True), Mnist1dResNet, epochs=10, batch_size=64,
            target=0.9, exact="no", unsupported={"curvlinops-kfac": _CONV1D}),
]}


def random_mlp(width: int = 512, batch: int = 256, seed: int = 0, batches: int = 4) -> Problem:
    """``mlp784-w<width>``: MLP 784-width-width-10 (ReLU) on random data, for timing only (not
    in ``PROBLEMS``: random labels make its accuracy meaningless). The fit split holds
    ``batches`` minibatches of ``batch`` N(0, 1) inputs with uniform random labels (drawn from
    ``seed`` + 1); val and test one minibatch each. Used by ``benchmarks/scaling.py`` and
    ``benchmarks/baseline_overhead.py`` (docs/performance.md)."""
    name = f"mlp784-w{width}"

    def data(_split_seed: int) -> Dataset:
        g = torch.Generator().manual_seed(seed + 1)
        n = batches * batch
        X = torch.randn(n + 2 * batch, 784, generator=g)
        y = torch.randint(0, 10, (n + 2 * batch,), generator=g)
        return Dataset(name, X[:n], y[:n], X[n:n + batch], y[n:n + batch], X[n + batch:],
                       y[n + batch:], 10, {"random": True})

    return Problem(name, "random N(0, 1) inputs, random labels (timing only)",
                   f"MLP 784-{width}-{width}-10, ReLU", "cross_entropy", data,
                   lambda: fcn(784, width, 10, layers=3, activation=nn.ReLU), epochs=1,
                   batch_size=batch, target=1.0, exact="no")


def get_problem(name: str) -> Problem:
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}: accepted {', '.join(PROBLEMS)}")
    return PROBLEMS[name]


def load(problem: str | Problem, split_seed: int = SPLIT_SEED, subset: int | None = None) -> Dataset:
    """The problem's data (offline), split by ``split_seed``, each split cut to ``subset``."""
    p = get_problem(problem) if isinstance(problem, str) else problem
    return p.load(split_seed).subset(subset)


# digits-deep: the vanishing-gradient problem (a deep chain of saturating activations)
DEEP_LAYERS = 12
PROBLEMS["digits-deep"] = Problem(
    "digits-deep", "scikit-learn digits, 64 features, 10 classes",
    f"{DEEP_LAYERS} Linear, hidden 32, Sigmoid (saturating: gradients vanish with depth)",
    "cross_entropy", load_digits, lambda: fcn(64, 32, 10, layers=DEEP_LAYERS, activation=nn.Sigmoid),
    epochs=20, batch_size=32, target=0.9)


def _register_ode_problems() -> None:
    """digits-odenet, motions-ode, circles-cnf (``ode_problems``; torchdiffeq is imported
    when a network is built)."""
    from .ode_problems import ODE_PROBLEMS

    for p in ODE_PROBLEMS:
        PROBLEMS[p.name] = p


_register_ode_problems()
