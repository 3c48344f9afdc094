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
and the ``sweep`` protocol chooses it on the validation split. Any of them can be overridden per
invocation (``ocnopt bench ... --hp key=value`` or ``--hp name:key=value``): ``parse_hp`` reads
the values, ``resolve_hp`` assigns them to the optimizers that accept the key
(``accepted_hyper``), ``parse_optimizer(name, problem, hp)`` applies them; the overrides are
recorded with the optimizer (``OptimizerSpec.config()["overrides"]``).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .deps import require
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

#: the default comparison of ``ocnopt bench run`` (order 1 and order 2 against the peers a user
#: would pick instead, SOAP and Shampoo included: both take less time per step than the order-2
#: modes on every problem, docs/soap.md)
DEFAULT_SET = ("torch-sgd", "torch-adam", "curvlinops-kfac", "soap", "shampoo", "autograd-sgd",
               "autograd-adam", "autograd-kfac", "lowrank-adam-fb", "lowrank-kfac-fb")


class Stepper(Protocol):
    """One optimizer bound to one model: ``step`` does a whole training step on a batch and
    returns the loss before it; ``skipped`` counts steps the optimizer refused (non-finite)."""

    @property
    def skipped(self) -> int: ...

    def step(self, inputs: Tensor, targets: Tensor) -> float: ...


def torch_loss(name: str) -> nn.Module:
    if name == "nll":  # a flow's negative log-likelihood (ode_problems)
        from .ode_problems import FlowNLL

        return FlowNLL()
    return nn.CrossEntropyLoss() if name == "cross_entropy" else nn.MSELoss()


def ocnopt_loss(name: str) -> Any:
    """The ``loss`` argument of ``ocnopt.OCNOpt`` for a problem's loss name."""
    if name == "nll":
        from .ode_problems import flow_nll

        return flow_nll
    return name


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
        curvlinops = require("curvlinops", "optimizer curvlinops-kfac")
        self._K, self._Kinv = curvlinops.KFACLinearOperator, curvlinops.KFACInverseLinearOperator
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

        self.opt = ocnopt.OCNOpt(model, loss=ocnopt_loss(loss), **kwargs)

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
    #: the hyper-parameters set by the invocation (``--hp``), already merged into ``hyper``
    overrides: dict[str, Any] = field(default_factory=dict)
    #: optional modules the optimizer imports (``check_available`` gives the install hint)
    requires: tuple[str, ...] = ()

    #: the keyword arguments of ``ocnopt.OCNOpt`` (all but lr and seed)
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: peers with their own limits: problem -> None when it runs there, else the reason
    refusal: Callable[[Problem], str | None] | None = None
    #: data-parallel processes the stepper runs on (``bench.parallel``; recorded when > 1)
    nproc: int = 1

    @property
    def exact(self) -> bool:
        """Runs the exact backend's full matrices (order 2 with autograd, or curvature full)."""
        return self.backend == "autograd" and (self.order == 2 or self.curvature == "full")

    def make(self, model: nn.Module, loss: str, lr: float, seed: int) -> Stepper:
        return self.factory(model, loss, lr, seed)

    def check_available(self) -> None:
        """``ImportError`` with the ``pip install 'ocnopt[...]'`` hint if a module it needs is
        missing."""
        for module in self.requires:
            require(module, f"optimizer {self.name}")

    def config(self) -> dict[str, Any]:
        """What a result file records about the optimizer."""
        out: dict[str, Any] = {"name": self.name, "family": self.family,
                               "description": self.description, "hyper": dict(self.hyper),
                               "overrides": dict(self.overrides)}
        if self.family == "ocnopt":
            out.update(order=self.order, backend=self.backend, curvature=self.curvature,
                       options=dict(self.options))
        if self.nproc > 1:
            out["nproc"] = self.nproc
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
                ocnopt.OCNOpt(problem.model(0), loss=ocnopt_loss(problem.loss), lr=spec.default_lr,
                              **spec.kwargs)
        except (TypeError, ValueError, NotImplementedError) as err:
            reason = f"ocnopt.OCNOpt refuses it: {err}"
        _REFUSALS[key] = reason
    return _REFUSALS[key]


#: torch peers: name -> (torch.optim class, DEFAULT_LR key, fixed hyper-parameters)
TORCH_PEERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "torch-sgd": ("SGD", "sgd", {"momentum": 0.9}),
    "torch-rmsprop": ("RMSprop", "rmsprop", {}),
    "torch-adam": ("Adam", "adam", {}),
}
PYTORCH_OPTIMIZER_PEERS = {"soap": "SOAP", "shampoo": "Shampoo"}


def _kw(hp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in hp.items())


def _peer(name: str, overrides: dict[str, Any], hp: dict[str, Any]) -> OptimizerSpec:
    """A peer with the problem's ``overrides`` and then the invocation's ``hp`` applied."""
    merged = {**overrides, **hp}
    if name in TORCH_PEERS:
        cls_name, key, fixed = TORCH_PEERS[name]
        lr = merged.pop("lr", DEFAULT_LR[key])
        kw = {**fixed, **merged}
        desc = (f"torch.optim.{cls_name}, momentum {kw['momentum']:g}"
                if name == "torch-sgd" and set(kw) == {"momentum"}
                else f"torch.optim.{cls_name}" + (f"({_kw(kw)})" if kw else ""))

        def make(m: nn.Module, loss: str, lr: float, seed: int) -> Stepper:
            return TorchStepper(m, loss, getattr(torch.optim, cls_name)(m.parameters(), lr=lr,
                                                                        **kw))

        return OptimizerSpec(name, "torch", lr, kw, desc, make, overrides=dict(hp))
    if name in PYTORCH_OPTIMIZER_PEERS:
        return _pytorch_optimizer_peer(name, merged, hp)
    lr = merged.pop("lr", DEFAULT_LR["kfac"])
    kw = {**CURVLINOPS_KFAC, **merged}
    return OptimizerSpec(
        name, "curvlinops", lr, kw,
        f"curvlinops KFACInverseLinearOperator(KFACLinearOperator({kw['fisher_type']} Fisher), "
        f"damping {kw['damping']:g}) @ grad, rebuilt on the current batch every "
        f"{kw['update_every']} steps (Linear, Conv2d); normalisation layers: plain gradient",
        lambda m, loss, lr, seed: CurvlinopsKFACStepper(m, loss, lr, seed=seed, **kw),
        overrides=dict(hp), requires=("curvlinops",))


def _pytorch_optimizer_peer(name: str, merged: dict[str, Any], hp: dict[str, Any]
                            ) -> OptimizerSpec:
    """``pytorch_optimizer.SOAP`` / ``Shampoo`` at their defaults (overrides by the problem and
    the invocation)."""
    lr = merged.pop("lr", DEFAULT_LR[name])
    cls_name = PYTORCH_OPTIMIZER_PEERS[name]

    def make(m: nn.Module, loss: str, lr: float, seed: int) -> Stepper:
        pytorch_optimizer = require("pytorch_optimizer", f"optimizer {name}")
        return TorchStepper(m, loss, getattr(pytorch_optimizer, cls_name)(m.parameters(), lr=lr,
                                                                            **merged))

    desc = f"pytorch_optimizer.{cls_name} " + (f"({_kw(merged)})" if merged else "at its defaults")
    return OptimizerSpec(name, "pytorch-optimizer", lr, dict(merged), desc, make,
                         overrides=dict(hp), requires=("pytorch_optimizer",))


#: OCNOpt arguments the harness sets itself (from the name, the problem and the run)
_OCNOPT_FIXED = ("self", "model", "loss", "seed", "curvature", "backend", "order")


def accepted_hyper(name: str) -> list[str]:
    """The hyper-parameters ``--hp`` may set on the optimizer ``name`` (``lr`` for all): the
    keyword arguments of its torch.optim / pytorch-optimizer class, curvlinops-kfac's damping,
    fisher_type and update_every, or for an ocnopt mode the arguments of ``ocnopt.OCNOpt``
    that the name does not fix plus its curvature model's hyper-parameters."""
    if name in ODE_PEERS:
        name = ODE_PEERS[name]
    if name in TORCH_PEERS:
        params = inspect.signature(getattr(torch.optim, TORCH_PEERS[name][0])).parameters
    elif name in PYTORCH_OPTIMIZER_PEERS:
        mod = require("pytorch_optimizer", f"optimizer {name}")
        params = inspect.signature(getattr(mod, PYTORCH_OPTIMIZER_PEERS[name])).parameters
    elif name == "curvlinops-kfac":
        return sorted({"lr", *CURVLINOPS_KFAC})
    else:
        import ocnopt
        from ocnopt.curvature import CURVATURES as MODELS
        from ocnopt.optimizer import T1_KEYS

        curvature = str(parse_optimizer(name).curvature)
        params = inspect.signature(ocnopt.OCNOpt).parameters
        # T1_KEYS: accepted by OCNOpt on models with an ODE block (refused elsewhere by it)
        extra = {"weight_decay", "mu", "trust", *MODELS[curvature].defaults, *T1_KEYS}
        return sorted({"lr", *extra, *(k for k, p in params.items() if k not in _OCNOPT_FIXED
                                       and p.kind is not p.VAR_KEYWORD)})
    return sorted({"lr", *(k for k, p in params.items() if k not in ("self", "params")
                           and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))})


def parse_value(text: str) -> Any:
    """A ``--hp`` value: a Python literal (``0.1``, ``1e-3``, ``(0.9, 0.99)``, ``0.9,0.99``,
    ``True``, ``None``; lists become tuples), ``true`` / ``false`` / ``none`` in any case, or
    else the text itself (``nash``, ``type-2``)."""
    text = text.strip()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        low = text.lower()
        return {"true": True, "false": False, "none": None}.get(low, text)
    return tuple(value) if isinstance(value, list) else value


def parse_hp(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """``["key=value", "name:key=value", ...]`` -> ``{"*": {key: value}, name: {key: value}}``
    (``"*"``: every optimizer that accepts the key; a later item wins over an earlier one).
    ``ValueError`` naming the item otherwise."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        lhs, eq, rhs = item.partition("=")
        target, colon, key = lhs.rpartition(":")
        key, target = key.strip(), target.strip()
        if not eq or not key.isidentifier() or (colon and not target):
            raise ValueError(f"--hp {item!r}: expected key=value or optimizer:key=value (e.g. "
                             "damping=0.01, lowrank-kfac-fb:trust=1, torch-adam:betas=0.9,0.99)")
        out.setdefault(target or "*", {})[key] = parse_value(rhs)
    return out


def resolve_hp(names: list[str], hp: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per optimizer name, the hyper-parameters of ``hp`` (``parse_hp``) that apply to it: the
    common ones (``"*"``) it accepts, then its own (which win). ``ValueError`` if a common key
    is accepted by none of ``names``, if ``name:`` names an optimizer not in ``names``, or if
    an optimizer does not accept a key given for it."""
    accepted = {n: accepted_hyper(n) for n in names}
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in hp.get("*", {}).items():
        takers = [n for n in names if key in accepted[n]]
        if not takers:
            raise ValueError(f"--hp {key}={value!r}: none of the optimizers {', '.join(names)} "
                             f"has a hyper-parameter {key!r}")
        for n in takers:
            out[n][key] = value
    for name, own in hp.items():
        if name == "*":
            continue
        if name not in out:
            raise ValueError(f"--hp {name}:...: optimizer {name!r} is not among the selected "
                             f"ones ({', '.join(names)})")
        for key, value in own.items():
            if key not in accepted[name]:
                raise ValueError(f"--hp {name}:{key}={value!r}: optimizer {name!r} has no "
                                 f"hyper-parameter {key!r}; accepted: "
                                 f"{', '.join(accepted[name])}")
            out[name][key] = value
    return out


def parse_optimizer(name: str, problem: Problem | None = None,
                    hp: dict[str, Any] | None = None) -> OptimizerSpec:
    """The optimizer called ``name`` (with the hyper-parameter overrides of ``problem``, keyed
    by curvature or by peer name, then those of the invocation ``hp``, already resolved for
    this optimizer by ``resolve_hp``; ``"lr"`` in either replaces the default learning rate);
    ``ValueError`` naming what is accepted otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {type(name).__name__}")
    overrides = problem.hyper if problem is not None else {}
    hp = dict(hp or {})
    if name in SNOPT:
        return snopt_spec(name, {**overrides.get(name, {}), **hp}, hp)
    if name in ODE_PEERS:
        return ode_peer(name, {**overrides.get(name, {}), **hp}, hp)
    if name in OC_PEERS:
        return emsa_spec({**overrides.get(name, {}), **hp})
    if name in PEERS:
        return _peer(name, dict(overrides.get(name, {})), hp)
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
    extra = {**overrides.get(curvature, {}), **hp}
    lr = extra.pop("lr", DEFAULT_LR[curvature])
    hyper = {**HYPER[curvature], **extra}
    kwargs: dict[str, Any] = {"curvature": curvature, "backend": backend, "order": order}
    options: dict[str, Any] = {}
    if feedback:
        kwargs["feedback"] = True
        options["feedback"] = True
    if nash:
        kwargs["game"] = "nash"
        options["game"] = "nash"
    kwargs.update(hyper)  # the invocation's --hp wins over what the name says (e.g. game)
    for key in ("feedback", "game"):
        if key in hp:
            options[key] = hp[key]
    what = "vanilla DDP (exact value Hessians, full curvature)" if name == "autograd-full-fb" else (
        f"order {order}{' with feedback' if feedback else ''}{', game nash' if nash else ''}, "
        f"curvature {curvature}, backend {backend}")
    if hp:
        what += f"; {_kw({k: v for k, v in hp.items() if k != 'lr'})}".rstrip("; ")
    requires = ("backpack",) if backend == "backpack" else ()
    return OptimizerSpec(
        name, "ocnopt", lr, hyper, f"ocnopt: {what}",
        lambda m, loss, lr, seed: OCNOptStepper(m, loss, lr=lr, seed=seed, **kwargs),
        order=order, backend=backend, curvature=curvature, options=options, kwargs=kwargs,
        overrides=hp, requires=requires)


def all_names() -> list[str]:
    """Every optimizer name the registry accepts."""
    names = list(PEERS) + list(OC_PEERS) + list(SNOPT) + list(ODE_PEERS)
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


def select(problem: Problem, names: list[str] | None,
           hp: dict[str, dict[str, Any]] | None = None) -> list[OptimizerSpec]:
    """The optimizers named (``None`` or ``["default"]``: ``DEFAULT_SET``; ``["all"]``: every one
    in ``ALL_SET`` that fits the problem), with the invocation's hyper-parameters ``hp``
    (``parse_hp``; assigned by ``resolve_hp``). Named ones that do not fit raise ``ValueError``;
    a missing optional dependency raises ``ImportError`` with the install hint."""
    if not names or names == ["default"]:
        specs = [parse_optimizer(n, problem) for n in DEFAULT_SET]
        specs = [s for s in specs if s.fits(problem) is None]
    elif names == ["all"]:
        specs = [parse_optimizer(n, problem) for n in ALL_SET]
        specs = [s for s in specs if s.fits(problem) is None
                 and not (s.exact and problem.exact != "default")]
    else:
        specs = []
        for n in names:
            s = parse_optimizer(n, problem)
            if s.name not in [t.name for t in specs]:
                specs.append(s)
    if hp:
        per = resolve_hp([s.name for s in specs], hp)
        specs = [parse_optimizer(s.name, problem, per[s.name]) if per[s.name] else s
                 for s in specs]
    for s in specs:
        s.check_available()
        reason = s.fits(problem)
        if reason is not None:
            raise ValueError(f"optimizer {s.name!r} does not run on {problem.name}"
                             f"{' with ' + _kw(s.overrides) if s.overrides else ''}: {reason}")
        if s.overrides and s.family != "ocnopt":
            _check_peer(s, problem)
    return specs


def _check_peer(spec: OptimizerSpec, problem: Problem) -> None:
    """Build the peer once on the problem's network: its constructor checks the values of the
    invocation's hyper-parameters (e.g. torch's Adam refuses betas outside [0, 1))."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec.make(problem.model(0), problem.loss, spec.default_lr, 0)
    except (TypeError, ValueError) as err:
        raise ValueError(f"optimizer {spec.name!r} refuses {_kw(spec.overrides)}: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                         ) from err


def lr_grid(center: float, points: int = 9, decades: float = 4.0) -> list[float]:
    """``points`` log-spaced learning rates over ``decades`` decades centred on ``center``."""
    if points < 2:
        return [float(center)]
    lo = math.log10(center) - decades / 2
    return [float(10 ** (lo + decades * i / (points - 1))) for i in range(points)]


def hp_label(hp: dict[str, dict[str, Any]] | None) -> str:
    """``parse_hp``'s result as text for a table title: ``"damping=0.01; lowrank-kfac-fb:
    trust=1"``; empty when nothing was set."""
    parts = []
    for target, kv in (hp or {}).items():
        text = ", ".join(f"{k}={_text(v)}" for k, v in kv.items())
        parts.append(text if target == "*" else f"{target}: {text}")
    return "; ".join(parts)


def _text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_text(x) for x in v) + ")"
    return format(v, "g") if isinstance(v, float) else str(v)


# ---- E-MSA, the earlier optimal-control optimizer ----------------------------------------------
#: optimal-control peers (not in the ``all`` set: chains only, and slow)
OC_PEERS = ("emsa",)
#: E-MSA's hyper-parameters: the paper's (Li et al. 2018, Section 5): 10 L-BFGS iterations per
#: layer on the augmented Hamiltonian, rho = 1 (the one value it states); lr = L-BFGS's step 1
EMSA_HYPER: dict[str, Any] = {"rho": 1.0, "inner_steps": 10, "inner": "lbfgs", "weight_decay": 0.0}
DEFAULT_LR["emsa"] = 1.0


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
        f"E-MSA (Li et al. 2018): {hp['inner_steps']} {hp['inner']} iterations per layer on the "
        f"augmented Hamiltonian, rho {hp['rho']:g}", make, refusal=_emsa_refusal)


# ---- Neural ODEs: SNOpt, and backpropagation through the solver ----------------------------------
#: SNOpt (Liu, Chen, Theodorou 2021) as ocnopt runs it: EKFAC whose Kronecker layers inside an
#: ODE block use factors averaged over the block's time grid (docs/method.md section 12); name ->
#: (backend, order). ``snopt``: order 1 (SNOpt's practical first-order algorithm);
#: ``snopt-fb``: order 2 with the feedback policies (low-rank expansion from the backward solve)
SNOPT = {"snopt": ("autograd", 1), "snopt-fb": ("lowrank", 2),
         "snopt-fb-t1": ("lowrank", 2), "snopt-fb-t1-open": ("lowrank", 2)}
#: the integration time as a control (docs/method.md section 12): ``snopt-fb-t1`` learns t1
#: with the feedback on the parameters' move, ``snopt-fb-t1-open`` with the open-loop update;
#: L = J + (t1_reg/2) t1^2
SNOPT_T1: dict[str, dict[str, Any]] = {
    "snopt-fb-t1": {"learn_t1": True, "t1_feedback": True, "t1_lr": 0.1, "t1_reg": 0.1},
    "snopt-fb-t1-open": {"learn_t1": True, "t1_feedback": False, "t1_lr": 0.1, "t1_reg": 0.1}}
#: SNOpt's released defaults (damping 0.05, eigenvalue running average 0.75), statistics and
#: eigenbases every 10 steps instead of 100 (the reduced runs here have a few hundred steps)
SNOPT_HYPER: dict[str, Any] = {"damping": 0.05, "stat_every": 10, "inv_every": 10,
                               "stat_decay": 0.75}
DEFAULT_LR["snopt"] = 0.05
#: backpropagation through the solver's operations (``ODEBlock(adjoint=False)``): the memory
#: baseline of the adjoint method; name -> the torch peer it runs
ODE_PEERS = {"torch-sgd-noadjoint": "torch-sgd", "torch-adam-noadjoint": "torch-adam"}


def _ode_refusal(problem: Problem) -> str | None:
    if not any(type(m).__name__ == "ODEBlock" for m in problem.model(0).modules()):
        return f"{problem.name} has no ODE block"
    return None


def snopt_spec(name: str, merged: dict[str, Any], hp: dict[str, Any]) -> OptimizerSpec:
    """``snopt`` / ``snopt-fb``: ekfac with ``SNOPT_HYPER`` (overrides by the problem under the
    name, then the invocation's)."""
    backend, order = SNOPT[name]
    base = f"{backend}-ekfac" + ("-fb" if order == 2 else "")
    t1 = SNOPT_T1.get(name, {})
    spec = parse_optimizer(base, None, {"lr": DEFAULT_LR["snopt"], **SNOPT_HYPER, **t1,
                                        **merged})
    desc = (f"SNOpt: ekfac with the grid factors of the layers inside the ODE blocks, order "
            f"{order}{' with feedback' if order == 2 else ''}, backend {backend}; "
            + _kw({k: v for k, v in spec.hyper.items()
                   if k in SNOPT_HYPER or k in t1 or k in merged}))
    return dataclasses.replace(spec, name=name, description=desc, overrides=dict(hp))


def ode_peer(name: str, merged: dict[str, Any], hp: dict[str, Any]) -> OptimizerSpec:
    """A torch peer on the model with every ODE block backpropagating through the solver
    (``adjoint=False``)."""
    base = _peer(ODE_PEERS[name], merged, {})
    inner = base.factory

    def make(m: nn.Module, loss: str, lr: float, seed: int) -> Stepper:
        for block in m.modules():
            if type(block).__name__ == "ODEBlock":
                block.adjoint = False  # type: ignore[assignment]
        return inner(m, loss, lr, seed)

    return dataclasses.replace(base, name=name, factory=make, overrides=dict(hp),
                               description=base.description + ", backpropagation through the "
                               "solver (odeint, no adjoint)", refusal=_ode_refusal)
