"""BackPACK backend: Kronecker factors from BackPACK, rank-1 value-gradient feedback.

docs/backends.md ("backpack"). The curvature statistics of the kfac/ekfac models come from BackPACK
(backpack-for-pytorch) second-order extensions, chosen by ``extension``:

- ``"kflr"``: exact GGN Kronecker factors (KFLR); for Linear stages they equal the lowrank
  backend's ``"exact"`` factors;
- ``"kfac"``: the same with the loss Hessian replaced by ``mc_samples`` sampled labels (KFAC);
- ``"kfra"``: Kronecker factors from recursively averaged GGN blocks (KFRA).

BackPACK's normalisation is kept as it is: for Linear stages A = E[a a^T] and G equal the
library's; for convolutions BackPACK sums A over output positions (A_backpack = P * A) and
builds G from spatially averaged backpropagated factors. For ekfac the eigenvalue correction
uses the empirical per-sample gradients. The rest (value recursion, feedback with the rank-1
outer product of each sample's value gradient: DDPNOpt's practical algorithm, value
correction) is the lowrank backend with the empirical terminal factor.

BackPACK runs on an extended *twin* of the network whose modules share the parameters of the
user's modules, in a separate forward/backward pass on the same batch at statistics steps: the
user's modules are never extended, and extended modules never enter ``torch.func`` transforms.
A chain's twin is an ``nn.Sequential`` of copies of its layers; a graph's twin is a copy of the
model converted by BackPACK's own ``torch.fx`` converter (``extend(..., use_converter=True)``),
which supports what BackPACK supports and says so otherwise.
Cost at a statistics step: one extra forward and backward pass plus BackPACK's extension work.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ocnopt.curvature.base import StageStatistics
from ocnopt.engine import QExpansion, Terminal, Trajectory, ValueFunction
from ocnopt.graph import Graph
from ocnopt.losses import CrossEntropy, Loss, MeanSquaredError
from ocnopt.stages import Stage

from .lowrank import LowRankBackend, LowRankExpansion

EXTENSIONS = ("kflr", "kfac", "kfra")


def _extension(name: str, mc_samples: int) -> Any:
    from backpack import extensions

    return {"kflr": lambda: extensions.KFLR(), "kfac": lambda: extensions.KFAC(mc_samples),
            "kfra": lambda: extensions.KFRA()}[name]()


def supported_by_backpack(extension: Any) -> list[type[nn.Module]]:
    """Module classes the BackPACK extension has a handler for."""
    table = getattr(extension, "_BackpropExtension__module_extensions", {})
    return sorted(table, key=lambda c: c.__name__)


class BackpackBackend(LowRankBackend):
    name = "backpack"
    connected_first_order = False  # order 1 runs BackPACK's own backward (``backward``)

    def __init__(self, extension: str = "kflr", mc_samples: int = 1):
        super().__init__(terminal="empirical")
        if extension not in EXTENSIONS:
            raise ValueError(f"invalid extension={extension!r}: accepted {EXTENSIONS}")
        if not (isinstance(mc_samples, int) and mc_samples >= 1):
            raise ValueError(f"invalid mc_samples={mc_samples!r}: accepted an integer >= 1")
        self.extension = extension
        self.mc_samples = mc_samples
        self._twin: nn.Module | None = None
        self._loss: nn.Module | None = None
        self._stages: list[Stage] = []

    # -- construction --------------------------------------------------------------------------
    def prepare(self, graph: Graph, loss: Loss) -> None:
        try:
            from backpack import extend
        except ImportError as err:  # pragma: no cover - installed with the test extra
            raise ImportError("backend 'backpack' needs backpack-for-pytorch: "
                              "pip install 'ocnopt[backpack]'") from err
        stages = graph.stages
        self._stages = list(stages)
        ext = _extension(self.extension, self.mc_samples)
        supported = supported_by_backpack(ext)
        names = ", ".join(c.__name__ for c in supported)
        for st in stages:
            if not st.is_function and type(st.module) not in supported:
                raise TypeError(
                    f"backend 'backpack': module {type(st.module).__name__} at stage position "
                    f"{st.index} (model.{st.name}) is not supported: BackPACK's "
                    f"{type(ext).__name__} extension has no handler for it. Supported by "
                    f"BackPACK: {names}. Use backend 'lowrank' or 'autograd' for this model"
                )
        if isinstance(loss, CrossEntropy):
            self._loss = extend(nn.CrossEntropyLoss())
        elif isinstance(loss, MeanSquaredError):
            self._loss = extend(nn.MSELoss())
        else:
            raise ValueError(f"backend 'backpack' supports loss 'cross_entropy' or 'mse' (BackPACK's "
                             f"loss extensions), got {loss.name!r}")
        if graph.chain:
            self._twin = extend(nn.Sequential(*[_share(st.module) for st in stages
                                                if not st.is_function]))
            return
        twin = _share(graph.root)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._twin = extend(twin, use_converter=True)
        except Exception as err:  # BackPACK's converter names what it cannot convert
            raise TypeError(f"backend 'backpack': BackPACK's graph converter cannot convert model "
                            f"{type(graph.root).__name__}: {type(err).__name__}: {err}. Use backend "
                            "'lowrank' or 'autograd' for this model") from err

    def check_options(self, *, gauss_newton: bool, mu: float, needs_full: bool,
                      psd_clip: bool = True) -> None:
        super().check_options(gauss_newton=gauss_newton, mu=mu, needs_full=needs_full,
                              psd_clip=psd_clip)

    def follow_fisher(self, fisher_type: str, *, given: Mapping[str, object]) -> None:
        """The extension chooses the statistics (``check_fisher`` refuses fisher_type)."""

    def check_fisher(self, fisher_type: str, *, order: int, explicit: bool) -> None:
        if explicit or fisher_type != "empirical":
            raise ValueError(
                f"invalid fisher_type={fisher_type!r} for backend 'backpack': its Kronecker "
                f"factors come from BackPACK's extension (now {self.extension!r}), chosen by "
                "backend_options={'extension': 'kflr' (type-2), 'kfac' (mc) or 'kfra'}; leave "
                "fisher_type out")

    # -- BackPACK statistics ------------------------------------------------------------------
    def factors(self, stages: Sequence[Stage], traj: Trajectory) -> dict[int, tuple[Tensor, Tensor]]:
        """(A, G) per Kronecker stage from one BackPACK pass on the batch of ``traj``."""
        from backpack import backpack

        assert self._twin is not None and self._loss is not None
        if traj.targets is None:
            raise RuntimeError("BackPACK statistics need the targets (engine.terminal first)")
        field = self.extension
        params = [p for st in stages for p in st.params]
        saved = [p.grad for p in params]
        for p in params:  # backward accumulates in place: keep the user's .grad out of it
            p.grad = None
        devices = [p.device for p in params[:1] if p.device.type == "cuda"]
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                    backpack(_extension(self.extension, self.mc_samples)), \
                    warnings.catch_warnings():
                if traj.generator is not None:  # BackPACK samples with the global RNG: seed it
                    seed = torch.randint(0, 2**62, (1,), generator=traj.generator,
                                         device=traj.generator.device)
                    torch.manual_seed(int(seed))
                # the network input needs no gradient: torch notes that the hooks still fire
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss = self._loss(self._twin(traj.states[0]), traj.targets)
                loss.backward()
            out: dict[int, tuple[Tensor, Tensor]] = {}
            for st in stages:
                if st.kronecker and "weight" in st.param_names:
                    w = st.params[st.param_names.index("weight")]
                    G, A = getattr(w, field)
                    out[st.index] = (A.detach(), G.detach())
        finally:
            for p, g in zip(params, saved):
                p.grad = g
                if hasattr(p, field):
                    delattr(p, field)
        return out

    def _attach(self, stages: Sequence[Stage], traj: Trajectory, stats: list[Any]) -> None:
        if not any(s is not None for s in stats):
            return
        factors = self.factors(stages, traj)
        for t, s in enumerate(stats):
            if s is not None and t in factors:
                s.A, s.G = factors[t]

    # -- order 1 -----------------------------------------------------------------------------
    def backward(self, graph: Graph, traj: Trajectory, terminal: Terminal, *,
                 need_stats: Sequence[bool], keep_values: bool = False,
                 skip_u: Sequence[bool] | None = None
                 ) -> tuple[list[QExpansion], list[Tensor | None]]:
        expansions, values = super().backward(
            graph, traj, Terminal(terminal.loss, terminal.V_x), need_stats=need_stats,
            keep_values=keep_values, skip_u=skip_u)
        self._attach(graph.stages, traj, [e.stats for e in expansions])
        return expansions, values

    # -- order 2 -----------------------------------------------------------------------------
    def expand_stage(self, stage: Stage, traj: Trajectory, value: ValueFunction, *,
                     gauss_newton: bool, need_quu: bool, need_stats: bool, keep: bool = False,
                     stats_from_value: bool = True, skip_u: bool = False) -> LowRankExpansion:
        exp = super().expand_stage(stage, traj, value, gauss_newton=gauss_newton,
                                   need_quu=need_quu, need_stats=need_stats, keep=keep,
                                   skip_u=skip_u,
                                   stats_from_value=False)  # rows: empirical (for ekfac)
        if exp.stats is not None:
            cache = traj.backend_data.get("backpack_factors")
            if cache is None:
                cache = traj.backend_data["backpack_factors"] = self.factors(self._stages, traj)
            if stage.index in cache:
                exp.stats.A, exp.stats.G = cache[stage.index]
        return exp


def _share(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are the original's (the same tensors)."""
    twin = copy.deepcopy(module)
    for name, p in module.named_parameters():
        owner, _, leaf = name.rpartition(".")
        setattr(twin.get_submodule(owner) if owner else twin, leaf, p)
    return twin


__all__ = ["BackpackBackend", "EXTENSIONS", "StageStatistics"]
