"""``OCNOpt``: the Bellman-expansion optimizer as a ``torch.optim.Optimizer``.

A thin class over the engine (``engine.py``), a backend (``ocnopt.backends``) and a curvature
model (``curvature/``): it owns ``param_groups`` (every hyper-parameter lives there, so LR
schedulers work) and ``state`` (one dict per parameter, plus the key ``"ocnopt"`` for the step
counter, the skip counter and the sampling generator), so ``state_dict`` round-trips it all.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .backends import make_backend
from .curvature import CURVATURES, CurvatureModel
from .curvature.base import check_nonneg
from .engine import BellmanEngine, Policy, StageDiagnostics, StepResult
from .losses import Loss, make_loss
from .stages import build_stages


class NonFiniteStepWarning(RuntimeWarning):
    """A step produced a non-finite loss or update and was skipped (warned once)."""


_COMMON = {"lr", "weight_decay"}
_STRUCTURAL = ("order", "backend", "curvature", "loss", "feedback", "value_correction",
               "gauss_newton", "track_loss_after", "seed")


class OCNOpt(torch.optim.Optimizer):
    """Optimal-control neural optimizer.

    Args:
        model: the network as an ``nn.Sequential`` chain (nested Sequentials flattened).
        loss: ``"cross_entropy"``, ``"mse"``, a torch loss module with mean reduction, or a
            per-sample callable ``fn(output, target) -> (B,)``. The objective is the batch mean.
        lr: learning rate (scales open-loop and feedback parts); default per curvature model
            (sgd 1e-3, rmsprop 1e-2, adam/adamw 1e-3, kfac/ekfac 1e-1 ... as ``DEFAULT_LR``).
        curvature: the model M of Q_uu: ``"sgd"``, ``"rmsprop"``, ``"adam"``, ``"adamw"``,
            ``"kfac"``, ``"ekfac"``.
        backend: who computes the derivatives: ``"autograd"`` (exact).
        order: 1 (backpropagation: the first-order truncation of the Bellman equation).
        weight_decay: l_t(u) = wd/2 |u|^2 in the objective (decoupled for ``adamw``); default 0
            (1e-2 for ``adamw``, as torch).
        track_loss_after: also compute the loss after the step with an extra forward pass
            (``last_step.loss_after``); at order 1 this costs one forward pass.
        seed: seed of the generator used to sample labels (``fisher_type="mc"``).
        **hyperparameters: the curvature model's hyper-parameters, with torch's names:
            sgd: momentum, dampening, nesterov; rmsprop: alpha, eps, centered, momentum;
            adam/adamw: betas, eps, amsgrad; kfac/ekfac: damping (number or callable of the
            step), stat_every, inv_every, stat_decay, momentum, fisher_type
            ("empirical", "type-2", "mc").
    """

    DEFAULT_LR = {"sgd": 1e-3, "rmsprop": 1e-2, "adam": 1e-3, "adamw": 1e-3,
                  "kfac": 1e-1, "ekfac": 1e-1}

    def __init__(
        self,
        model: nn.Module,
        loss: str | Loss | nn.Module | Callable[[Tensor, Tensor], Tensor] = "cross_entropy",
        lr: float | None = None,
        curvature: str = "adam",
        backend: str = "autograd",
        order: int = 1,
        weight_decay: float | None = None,
        track_loss_after: bool = False,
        seed: int = 0,
        **hyperparameters: Any,
    ):
        if not isinstance(curvature, str) or curvature not in CURVATURES:
            raise ValueError(f"invalid curvature={curvature!r}: accepted {sorted(CURVATURES)}")
        if order not in (1,):
            if order == 2:
                raise NotImplementedError("order=2 (DDP feedback policies) is not implemented "
                                          "yet; accepted: order=1")
            raise ValueError(f"invalid order={order!r}: accepted 1")
        self.curvature_name = curvature
        self.model_: CurvatureModel = CURVATURES[curvature]()
        self.backend = make_backend(backend)
        self.loss_fn = make_loss(loss)
        self.order = order
        self.track_loss_after = bool(track_loss_after)
        self.stages = build_stages(model)
        self.engine = BellmanEngine(self.stages, self.loss_fn, self.backend)

        accepted = {**{"weight_decay": 0.0}, **self.model_.defaults}
        unknown = sorted(set(hyperparameters) - set(accepted))
        if unknown:
            raise TypeError(
                f"unknown hyper-parameter(s) {unknown} for curvature {curvature!r}; accepted: "
                f"lr, {', '.join(sorted(accepted))} (and the options {', '.join(_STRUCTURAL)})"
            )
        if lr is None:
            lr = self.DEFAULT_LR[curvature]
        hp = {**accepted, **hyperparameters, "lr": lr}
        if weight_decay is not None:
            hp["weight_decay"] = weight_decay
        self._check(hp)
        params = [p for st in self.stages for p in st.params]
        super().__init__(params, hp)
        self.generator = torch.Generator(device=params[0].device)
        self.generator.manual_seed(int(seed))
        self.state["ocnopt"] = {"step": 0, "skipped_steps": 0}
        self._warned_nonfinite = False
        self.last_step: StepResult | None = None

    # -- validation ---------------------------------------------------------------------------
    def _check(self, hp: dict[str, Any]) -> None:
        lr = hp["lr"]
        if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr)
                and lr >= 0):
            raise ValueError(f"invalid lr={lr!r}: accepted a finite number >= 0")
        check_nonneg(hp, "weight_decay")
        self.model_.check(hp)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "param_groups", None):
            raise ValueError("OCNOpt takes its parameters from the model's stages; "
                             "add_param_group is not supported")
        super().add_param_group(param_group)

    # -- state --------------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Completed (not skipped) steps."""
        return int(self.state["ocnopt"]["step"])

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because the loss or the update was not finite."""
        return int(self.state["ocnopt"]["skipped_steps"])

    def state_dict(self) -> dict[str, Any]:
        self.state["ocnopt"]["generator"] = self.generator.get_state()
        self.state["ocnopt"]["curvature"] = self.curvature_name
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        meta = state_dict.get("state", {}).get("ocnopt")
        if meta is None:
            raise ValueError("state_dict has no 'ocnopt' entry: it was not saved by OCNOpt")
        if meta.get("curvature", self.curvature_name) != self.curvature_name:
            raise ValueError(f"state_dict was saved with curvature={meta['curvature']!r}, this "
                             f"optimizer uses curvature={self.curvature_name!r}")
        super().load_state_dict(state_dict)
        meta = self.state["ocnopt"]
        self.state["ocnopt"] = dict(meta)
        if "generator" in meta:
            self.generator.set_state(meta["generator"])

    # -- the step -----------------------------------------------------------------------------
    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        """One Bellman step on the batch (inputs, targets); returns the loss before the step.

        ``last_step`` holds the loss after the step (when computed), whether the step was
        skipped as non-finite, and per-stage diagnostics.
        """
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise TypeError(f"step(inputs, targets) takes tensors, got "
                            f"{type(inputs).__name__} and {type(targets).__name__}")
        if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs and targets must share the batch dimension, got shapes "
                             f"{tuple(inputs.shape)} and {tuple(targets.shape)}")
        group = self.param_groups[0]
        hp = group
        self._check(hp)
        meta = self.state["ocnopt"]
        k = int(meta["step"])
        model = self.model_
        stage_states = [[self.state[p] for p in st.params] for st in self.stages]
        need_stats = [st.has_control and model.wants_statistics(k, hp, s)
                      for st, s in zip(self.stages, stage_states)]
        fisher = hp.get("fisher_type") if any(need_stats) else None
        if fisher == "empirical":
            fisher = None

        try:
            traj = self.engine.nominal(inputs)
        except RuntimeError as err:
            raise ValueError(f"inputs of shape {tuple(inputs.shape)} do not fit the model: {err}"
                             ) from err
        terminal = self.engine.terminal(traj, targets, fisher_type=fisher,
                                        generator=self.generator)
        if not torch.isfinite(terminal.loss):
            return self._skip(terminal.loss, "loss")
        expansions, _ = self.engine.expand(traj, terminal, need_stats=need_stats)

        lr = float(hp["lr"])
        coupled = model.coupled_weight_decay(hp)
        wd = float(hp["weight_decay"])
        new_states: list[list[dict[str, Any]]] = []
        policies: list[Policy | None] = []
        checks: list[Tensor] = []
        for st, states, exp in zip(self.stages, stage_states, expansions):
            if not st.has_control:  # no control, no curvature state
                new_states.append([])
                policies.append(None)
                continue
            Q_u = exp.Q_u
            if coupled and wd != 0:
                Q_u = [g.add(p, alpha=wd) for g, p in zip(Q_u, st.params)]
            with torch.no_grad():
                states_new, dirs = model.update(st, states, Q_u, st.params, exp.stats, hp, k)
            new_states.append(states_new)
            policies.append(Policy(k=[d.mul(-lr) for d in dirs]))
            checks += [d.sum() for d in dirs]
        if checks and not bool(torch.isfinite(torch.stack(checks).sum())):
            return self._skip(terminal.loss, "update")

        self.engine.apply_open_loop(policies)
        for st, states in zip(self.stages, new_states):
            for p, s in zip(st.params, states):
                self.state[p] = s
        meta["step"] = k + 1
        loss_after = None
        if self.track_loss_after:
            with torch.no_grad():
                out = self.engine.update_pass(traj, [None] * len(self.stages), targets)
            loss_after = out[1]
        controlled = [(st, pol) for st, pol in zip(self.stages, policies) if pol is not None]
        with torch.no_grad():
            norms = torch.stack([torch.stack([d.square().sum() for d in pol.k]).sum().sqrt()
                                 for _, pol in controlled]).tolist()
        self.last_step = StepResult(
            loss=terminal.loss,
            loss_after=loss_after,
            stages=[StageDiagnostics(st.index, st.name, n) for (st, _), n in zip(controlled, norms)],
        )
        return terminal.loss

    def _skip(self, loss: Tensor, what: str) -> Tensor:
        self.state["ocnopt"]["skipped_steps"] += 1
        if not self._warned_nonfinite:
            warnings.warn(
                f"OCNOpt step skipped: the {what} is not finite (loss={float(loss)}); parameters "
                "and optimizer state are unchanged. Further skips are counted in "
                "optimizer.skipped_steps without warning.",
                NonFiniteStepWarning, stacklevel=3)
            self._warned_nonfinite = True
        self.last_step = StepResult(loss=loss, skipped=True)
        return loss
