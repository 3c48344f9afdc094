"""The optimizers a benchmark compares, by name, all driven through one ``Stepper`` interface.

ocnopt's modes are named ``<backend>-<curvature>[-fb[-nash]]``:

* ``<backend>-<curvature>``: ``order=1`` (backpropagation + the base optimizer given by the
  curvature model), e.g. ``autograd-adam`` (= torch Adam), ``autograd-kfac``;
* ``<backend>-<curvature>-fb``: ``order=2`` with the feedback policies du = k + K dx and the
  value correction, e.g. ``lowrank-kfac-fb``; ``autograd-full-fb`` is vanilla DDP (exact
  value Hessians, full curvature), for small problems only; on graph networks the library's
  default game (``game="cooperative"``, not passed);
* ``<backend>-<curvature>-fb-nash``: the same with ``game="nash"`` (feedback Nash: a layer's
  feedback ignores the parts of the state that depend on a simultaneous layer's output, e.g.
  a parallel branch; on a chain there are no simultaneous layers and both games coincide).

backend in autograd, lowrank, backpack; curvature in sgd, rmsprop, adam, adamw, kfac, ekfac,
full (full only with autograd), shampoo, soap.

The peers, which nobody here wrote, run through the same loop:

* ``torch-sgd`` (``torch.optim.SGD``, momentum 0.9), ``torch-rmsprop``, ``torch-adam``;
* ``curvlinops-kfac``: p <- p - lr (K + damping)^-1 g with curvlinops'
  ``KFACInverseLinearOperator`` of a ``KFACLinearOperator`` (Monte-Carlo Fisher, one sample)
  rebuilt on the current batch every ``update_every`` steps (10, as ocnopt's ``inv_every``);
  it covers Linear and Conv2d layers, normalisation layers (BatchNorm, ...) take the plain
  gradient step, other layers with parameters (Conv1d) are refused.
* ``soap``, ``shampoo``: ``pytorch_optimizer.SOAP`` / ``Shampoo`` at their documented defaults
  (ocnopt's ``autograd-soap`` / ``autograd-shampoo`` are the same steps).
* ``emsa``: E-MSA (Li, Chen, Tai and E, JMLR 2018), the earlier optimal-control optimizer:
  per-layer maximisation of the augmented Hamiltonian (``ocnopt.bench.emsa``), chains only.

Hyper-parameters other than the learning rate are fixed per family (``HYPER``) and recorded in
every result; the learning rate has a hand-set default (``DEFAULT_LR``, not tuned on any split)
and the ``sweep`` protocol chooses it on the validation split.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .problems import Problem

BACKENDS = ("autograd", "lowrank", "backpack")
CURVATURES = ("sgd", "rmsprop", "adam", "adamw", "kfac", "ekfac", "full", "shampoo", "soap")
PEERS = ("torch-sgd", "torch-rmsprop", "torch-adam", "curvlinops-kfac", "soap", "shampoo")

#: hand-set learning rates (not tuned on any split); the sweep grid is centred on them
DEFAULT_LR = {"sgd": 0.05, "rmsprop": 1e-3, "adam": 3e-3, "adamw": 3e-3, "kfac": 0.02,
              "ekfac": 0.02, "full": 0.3,
              # pytorch-optimizer's defaults (its SOAP and Shampoo are the peers)
              "soap": 3e-3, "shampoo": 1e-3}
#: the other hyper-parameters, fixed per family (torch's names)
HYPER: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.9}, "rmsprop": {}, "adam": {}, "adamw": {},
    # K-FAC: the library default damping 1e-3 lets the step blow up on these small problems;
    # the Fisher is the library's default (empirical at order 1 and with backend lowrank)
    "kfac": {"damping": 0.1},
    "ekfac": {"damping": 0.1},
    "full": {"damping": 0.1},
    # pytorch-optimizer's defaults (SOAP: weight decay 1e-2, decoupled), as the peers
    "shampoo": {}, "soap": {},
}
CURVLINOPS_KFAC: dict[str, Any] = {"damping": 0.1, "fisher_type": "mc", "update_every": 10}

#: the default comparison of ``ocnopt bench run`` (order 1 and order 2 against the peers)
DEFAULT_SET = ("torch-sgd", "torch-adam", "curvlinops-kfac", "autograd-sgd", "autograd-adam",
               "autograd-kfac", "lowrank-adam-fb", "lowrank-kfac-fb")


class Stepper(Protocol):
    """One optimizer bound to one model: ``step`` does a whole training step on a batch and
    returns the loss before it; ``skipped`` counts steps the optimizer refused (non-finite)."""

    @property
    def skipped(self) -> int: ...

    def step(self, inputs: Tensor, targets: Tensor) -> float: ...


def torch_loss(name: str) -> nn.Module:
    return nn.CrossEntropyLoss() if name == "cross_entropy" else nn.MSELoss()


class TorchStepper:
    """A ``torch.optim`` optimizer: zero_grad, forward, backward, step."""

    def __init__(self, model: nn.Module, loss: str, optimizer: torch.optim.Optimizer):
        self.model, self.loss_fn, self.opt = model, torch_loss(loss), optimizer
        self.skipped = 0

    def step(self, inputs: Tensor, targets: Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(inputs), targets)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


#: normalisation layers whose parameters the curvlinops peer steps by the plain gradient
NORM_LAYERS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                            nn.LayerNorm, nn.GroupNorm)


def split_kfac_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(parameters of Linear and Conv2d layers, which curvlinops' K-FAC covers; parameters of
    normalisation layers, ``NORM_LAYERS``); ``ValueError`` naming any other layer that owns
    trainable parameters (e.g. Conv1d, which curvlinops' K-FAC does not support)."""
    kfac: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    for name, mod in model.named_modules():
        own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            kfac += own
        elif isinstance(mod, NORM_LAYERS):
            other += own
        else:
            raise ValueError(
                f"curvlinops-kfac: layer {name or 'model'!r} ({type(mod).__name__}) has parameters "
                "that curvlinops' K-FAC does not cover; accepted: Linear and Conv2d (K-FAC), "
                f"{', '.join(c.__name__ for c in NORM_LAYERS)} (plain gradient)")
    return kfac, other


class CurvlinopsKFACStepper:
    """K-FAC from curvlinops: p <- p - lr (K + damping I)^-1 grad for the parameters of Linear
    and Conv2d layers, K rebuilt every ``update_every`` steps from the current batch (its
    inverse is cached in between).

    The parameters of normalisation layers (BatchNorm, LayerNorm, GroupNorm: ``NORM_LAYERS``),
    which curvlinops' K-FAC does not cover, take the plain gradient step p <- p - lr grad (no
    preconditioner); any other layer with parameters (e.g. Conv1d) is refused with
    ``ValueError``. Building K runs the model forward on the batch; the BatchNorm running
    statistics are restored afterwards, so that only the training step itself updates them."""

    def __init__(self, model: nn.Module, loss: str, lr: float, damping: float,
                 fisher_type: str, update_every: int, seed: int):
        from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

        self._K, self._Kinv = KFACLinearOperator, KFACInverseLinearOperator
        self.model, self.loss_fn = model, torch_loss(loss)
        self.kfac_params, self.other_params = split_kfac_params(model)
        self.params = self.kfac_params + self.other_params
        self.lr, self.damping, self.fisher_type = lr, damping, fisher_type
        self.update_every, self.seed = update_every, seed
        self.k = 0
        self.skipped = 0
        self.inverse: Any = None

    def step(self, inputs: Tensor, targets: Tensor) -> float:
        if self.k % self.update_every == 0:
            buffers = [b.clone() for b in self.model.buffers()]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                K = self._K(self.model, self.loss_fn, self.kfac_params, [(inputs, targets)],
                            fisher_type=self.fisher_type, check_deterministic=False,
                            seed=self.seed * 100_003 + self.k)
                K.compute_kronecker_factors()
                self.inverse = self._Kinv(K, damping=self.damping)
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
        self.k += 1
        loss = self.loss_fn(self.model(inputs), targets)
        grads = torch.autograd.grad(loss, self.params)
        n = len(self.kfac_params)
        direction = list(self.inverse @ list(grads[:n])) + list(grads[n:])
        with torch.no_grad():
            for p, d in zip(self.params, direction):
                p.sub_(d, alpha=self.lr)
        return float(loss.detach())


class OCNOptStepper:
    """``ocnopt.OCNOpt``: ``step(x, y)`` is the whole step."""

    def __init__(self, model: nn.Module, loss: str, **kwargs: Any):
        import ocnopt

        self.opt = ocnopt.OCNOpt(model, loss=loss, **kwargs)

    @property
    def skipped(self) -> int:
        return self.opt.skipped_steps

    def step(self, inputs: Tensor, targets: Tensor) -> float:
        return float(self.opt.step(inputs, targets))


@dataclass(frozen=True)
class OptimizerSpec:
    """A named optimizer: how to build its stepper, its fixed hyper-parameters, its default lr."""

    name: str
    family: str  # "ocnopt", "torch", "curvlinops" or "pytorch-optimizer"
    default_lr: float
    hyper: dict[str, Any]
    description: str
    factory: Callable[[nn.Module, str, float, int], Stepper]
    order: int | None = None  # ocnopt: 1 or 2
    backend: str | None = None
    curvature: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    #: the keyword arguments of ``ocnopt.OCNOpt`` (all but lr and seed)
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: peers with their own limits: problem -> None when it runs there, else the reason
    refusal: Callable[[Problem], str | None] | None = None

    @property
    def exact(self) -> bool:
        """Runs the exact backend's full matrices (order 2 with autograd, or curvature full)."""
        return self.backend == "autograd" and (self.order == 2 or self.curvature == "full")

    def make(self, model: nn.Module, loss: str, lr: float, seed: int) -> Stepper:
        return self.factory(model, loss, lr, seed)

    def config(self) -> dict[str, Any]:
        """What a result file records about the optimizer."""
        out: dict[str, Any] = {"name": self.name, "family": self.family,
                               "description": self.description, "hyper": dict(self.hyper)}
        if self.family == "ocnopt":
            out.update(order=self.order, backend=self.backend, curvature=self.curvature,
                       options=dict(self.options))
        return out

    def fits(self, problem: Problem) -> str | None:
        """None when the optimizer runs on the problem, else the reason why not."""
        if self.name in problem.unsupported:
            return problem.unsupported[self.name]
        if self.exact and problem.exact == "no":
            return (f"{self.name} forms the exact backend's full per-sample matrices; "
                    f"{problem.name} is too large for them")
        if self.family == "ocnopt":
            return _ocnopt_refusal(problem, self)
        if self.refusal is not None:
            return self.refusal(problem)
        return None


_REFUSALS: dict[tuple[Any, ...], str | None] = {}


def _ocnopt_refusal(problem: Problem, spec: OptimizerSpec) -> str | None:
    """Why ``ocnopt.OCNOpt`` refuses to be built on the problem's network with the spec's
    options (its ``TypeError`` / ``ValueError`` / ``NotImplementedError``), None when it accepts
    it: the library decides (e.g. layers or graph structure it does not handle yet, options it
    does not know). Cached per problem and options."""
    key = (problem.name, id(problem.build), problem.loss, spec.default_lr,
           tuple(sorted((k, repr(v)) for k, v in spec.kwargs.items())))
    if key not in _REFUSALS:
        import ocnopt

        reason = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ocnopt.OCNOpt(problem.model(0), loss=problem.loss, lr=spec.default_lr,
                              **spec.kwargs)
        except (TypeError, ValueError, NotImplementedError) as err:
            reason = f"ocnopt.OCNOpt refuses it: {err}"
        _REFUSALS[key] = reason
    return _REFUSALS[key]


def _peer(name: str, overrides: dict[str, Any]) -> OptimizerSpec:
    if name == "torch-sgd":
        return OptimizerSpec(name, "torch", DEFAULT_LR["sgd"], {"momentum": 0.9},
                             "torch.optim.SGD, momentum 0.9",
                             lambda m, loss, lr, seed: TorchStepper(
                                 m, loss, torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)))
    if name == "torch-rmsprop":
        return OptimizerSpec(name, "torch", DEFAULT_LR["rmsprop"], {}, "torch.optim.RMSprop",
                             lambda m, loss, lr, seed: TorchStepper(
                                 m, loss, torch.optim.RMSprop(m.parameters(), lr=lr)))
    if name == "torch-adam":
        return OptimizerSpec(name, "torch", DEFAULT_LR["adam"], {}, "torch.optim.Adam",
                             lambda m, loss, lr, seed: TorchStepper(
                                 m, loss, torch.optim.Adam(m.parameters(), lr=lr)))
    if name in ("soap", "shampoo"):
        return _pytorch_optimizer_peer(name, overrides)
    lr = overrides.pop("lr", DEFAULT_LR["kfac"])
    hp: dict[str, Any] = {**CURVLINOPS_KFAC, **overrides}
    return OptimizerSpec(
        name, "curvlinops", lr, hp,
        f"curvlinops KFACInverseLinearOperator(KFACLinearOperator({hp['fisher_type']} Fisher), "
        f"damping {hp['damping']:g}) @ grad, rebuilt on the current batch every "
        f"{hp['update_every']} steps (Linear, Conv2d); normalisation layers: plain gradient",
        lambda m, loss, lr, seed: CurvlinopsKFACStepper(m, loss, lr, seed=seed, **hp))


def _pytorch_optimizer_peer(name: str, overrides: dict[str, Any]) -> OptimizerSpec:
    """``pytorch_optimizer.SOAP`` / ``Shampoo`` at their defaults (overrides by the problem)."""
    lr = overrides.pop("lr", DEFAULT_LR[name])
    cls_name = {"soap": "SOAP", "shampoo": "Shampoo"}[name]

    def make(m: nn.Module, loss: str, lr: float, seed: int) -> Stepper:
        import pytorch_optimizer

        return TorchStepper(m, loss, getattr(pytorch_optimizer, cls_name)(m.parameters(), lr=lr,
                                                                            **overrides))

    return OptimizerSpec(name, "pytorch-optimizer", lr, dict(overrides),
                         f"pytorch_optimizer.{cls_name} at its defaults", make)


def parse_optimizer(name: str, problem: Problem | None = None) -> OptimizerSpec:
    """The optimizer called ``name`` (with the hyper-parameter overrides of ``problem``, keyed
    by curvature or by peer name; ``"lr"`` there replaces the default learning rate);
    ``ValueError`` naming what is accepted otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {type(name).__name__}")
    overrides = problem.hyper if problem is not None else {}
    if name in OC_PEERS:
        return emsa_spec(dict(overrides.get(name, {})))
    if name in PEERS:
        return _peer(name, dict(overrides.get(name, {})))
    parts = name.split("-")
    feedback = len(parts) >= 3 and parts[2] == "fb"
    nash = len(parts) == 4 and feedback and parts[3] == "nash"
    if len(parts) not in (2, 3, 4) or (len(parts) == 3 and not feedback) \
            or (len(parts) == 4 and not nash) \
            or parts[0] not in BACKENDS or parts[1] not in CURVATURES:
        raise ValueError(
            f"unknown optimizer {name!r}: accepted {', '.join(PEERS + OC_PEERS)} or "
            f"<backend>-<curvature>[-fb[-nash]] with backend in {{{', '.join(BACKENDS)}}} and "
            f"curvature in {{{', '.join(CURVATURES)}}} ('-fb': order 2 with feedback, cooperative "
            "game; '-fb-nash': order 2, game 'nash')")
    backend, curvature = parts[0], parts[1]
    if curvature == "full" and backend != "autograd":
        raise ValueError(f"unknown optimizer {name!r}: curvature 'full' needs E[Q_uu] as a matrix, "
                         "which only backend 'autograd' forms (use autograd-full or autograd-full-fb)")
    order = 2 if feedback else 1
    extra = dict(overrides.get(curvature, {}))
    lr = extra.pop("lr", DEFAULT_LR[curvature])
    hp = {**HYPER[curvature], **extra}
    kwargs = {"curvature": curvature, "backend": backend, "order": order, **hp}
    options: dict[str, Any] = {}
    if feedback:
        kwargs["feedback"] = True
        options["feedback"] = True
    if nash:
        kwargs["game"] = "nash"
        options["game"] = "nash"
    what = "vanilla DDP (exact value Hessians, full curvature)" if name == "autograd-full-fb" else (
        f"order {order}{' with feedback' if feedback else ''}{', game nash' if nash else ''}, "
        f"curvature {curvature}, backend {backend}")
    return OptimizerSpec(
        name, "ocnopt", lr, hp, f"ocnopt: {what}",
        lambda m, loss, lr, seed: OCNOptStepper(m, loss, lr=lr, seed=seed, **kwargs),
        order=order, backend=backend, curvature=curvature, options=options, kwargs=kwargs)


def all_names() -> list[str]:
    """Every optimizer name the registry accepts."""
    names = list(PEERS) + list(OC_PEERS)
    for fb in ("", "-fb", "-fb-nash"):
        for b in BACKENDS:
            for c in CURVATURES:
                if c == "full" and b != "autograd":
                    continue
                names.append(f"{b}-{c}{fb}")
    return names


#: the ``all`` set: peers, every order-1 mode of the autograd backend (the other backends give
#: the same order-1 step), every order-2 mode of the scalable backends, and the exact ones
ALL_SET = (*PEERS, *(f"autograd-{c}" for c in CURVATURES),
           "lowrank-adam-fb", "lowrank-kfac-fb", "lowrank-ekfac-fb", "backpack-kfac-fb",
           "lowrank-soap-fb", "lowrank-shampoo-fb",
           "autograd-adam-fb", "autograd-kfac-fb", "autograd-full-fb")


def select(problem: Problem, names: list[str] | None) -> list[OptimizerSpec]:
    """The optimizers named (``None`` or ``["default"]``: ``DEFAULT_SET``; ``["all"]``: every one
    in ``ALL_SET`` that fits the problem). Named ones that do not fit raise ``ValueError``."""
    if not names or names == ["default"]:
        specs = [parse_optimizer(n, problem) for n in DEFAULT_SET]
        return [s for s in specs if s.fits(problem) is None]
    if names == ["all"]:
        specs = [parse_optimizer(n, problem) for n in ALL_SET]
        return [s for s in specs if s.fits(problem) is None
                and not (s.exact and problem.exact != "default")]
    specs = []
    for n in names:
        s = parse_optimizer(n, problem)
        reason = s.fits(problem)
        if reason is not None:
            raise ValueError(f"optimizer {n!r} does not run on {problem.name}: {reason}")
        if s.name not in [t.name for t in specs]:
            specs.append(s)
    return specs


def lr_grid(center: float, points: int = 9, decades: float = 4.0) -> list[float]:
    """``points`` log-spaced learning rates over ``decades`` decades centred on ``center``."""
    if points < 2:
        return [float(center)]
    lo = math.log10(center) - decades / 2
    return [float(10 ** (lo + decades * i / (points - 1))) for i in range(points)]


# ---- E-MSA, the earlier optimal-control optimizer ----------------------------------------------
#: optimal-control peers (not in the ``all`` set: chains only, and slow)
OC_PEERS = ("emsa",)
#: E-MSA's hyper-parameters: hand-set on digits-fcn (5 epochs, seed 0); rho = 1 with Adam's
#: lr 3e-3 diverges there, rho = 0.1 and 0.01 both train
EMSA_HYPER: dict[str, Any] = {"rho": 0.1, "inner_steps": 3, "inner": "adam", "weight_decay": 0.0}
DEFAULT_LR["emsa"] = 3e-3


def _emsa_refusal(problem: Problem) -> str | None:
    from .emsa import chain_layers

    try:
        chain_layers(problem.model(0))
    except (TypeError, ValueError) as err:
        return str(err)
    return None


def emsa_spec(overrides: dict[str, Any]) -> OptimizerSpec:
    """E-MSA (``ocnopt.bench.emsa.EMSA``) with ``EMSA_HYPER`` (overrides by the problem; ``"lr"``
    there replaces the inner optimizer's default learning rate)."""
    lr = overrides.pop("lr", DEFAULT_LR["emsa"])
    hp = {**EMSA_HYPER, **overrides}

    def make(m: nn.Module, loss: str, lr: float, seed: int) -> Stepper:
        from .emsa import EMSA

        return EMSA(m, loss, lr=lr, **hp)

    return OptimizerSpec(
        "emsa", "emsa", lr, hp,
        f"E-MSA (Li et al. 2018): {hp['inner_steps']} {hp['inner']} steps per layer on the "
        f"augmented Hamiltonian, rho {hp['rho']:g}", make, refusal=_emsa_refusal)
