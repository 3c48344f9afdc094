"""The Bellman-expansion engine (SPEC sections 2-4).

Three passes over the chain of stages:

1. ``nominal``: the forward pass x_{t+1} = f_t(x_t, u_t), recording the states xbar_t and what
   the backward pass needs;
2. ``expand``: the backward value recursion from V_T = phi, producing per stage the expansion
   of Q_t (Q_x per sample, Qbar_u, statistics for the curvature model) and the value V_x;
3. ``update_pass``: the forward pass with the new controls, applying each stage's policy
   du_t = k_t (+ K_t dx_t) with dx_t = xhat_t - xbar_t, and returning the loss after the step.

The derivatives come from a ``Backend`` (``ocnopt.backends``); the engine only orchestrates.
Shapes: B batch, n state (per sample, any shape), m control.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .curvature.base import StageStatistics
from .losses import Loss
from .stages import Stage


@dataclass
class Trajectory:
    """The nominal pass: states xbar_t (t = 0..T), per-stage replay contexts and the
    backend's handles for the backward pass (autograd graph pieces)."""

    states: list[Tensor]
    contexts: list[Any]
    handles: Any = None

    @property
    def output(self) -> Tensor:
        return self.states[-1]


@dataclass
class Terminal:
    """The terminal cost at x_T: mean loss J_T = mean_i phi^(i), per-sample value gradient
    V_x^(i) = grad phi^(i) (not divided by B) and, when asked for, a terminal factor
    (B, r, *out) for the Kronecker statistics (type-2 or sampled Fisher)."""

    loss: Tensor
    V_x: Tensor
    factor: Tensor | None = None


@dataclass
class QExpansion:
    """Expansion of Q_t around the nominal trajectory.

    Q_x = f_x^T V'_x (per sample, (B, *n)); Q_u = l_u + (1/B) sum_i f_u^T V'_x^(i) (one tensor
    per parameter of the stage); ``stats``: the curvature model's statistics, if requested.
    """

    Q_x: Tensor | None
    Q_u: list[Tensor]
    stats: StageStatistics | None = None


@dataclass
class Policy:
    """Affine feedback policy of one stage: du = k + K(dx). ``feedback`` is None at order 1."""

    k: list[Tensor]
    feedback: Callable[[Tensor], list[Tensor]] | None = None


@dataclass
class StageDiagnostics:
    index: int
    name: str
    k_norm: float
    feedback_norm: float = 0.0


@dataclass
class StepResult:
    """What one ``OCNOpt.step`` did: loss before (and after, when computed), whether the step
    was skipped as non-finite, and per-stage diagnostics."""

    loss: Tensor
    loss_after: float | None = None
    skipped: bool = False
    predicted_change: float | None = None
    stages: list[StageDiagnostics] = field(default_factory=list)


class BellmanEngine:
    """Orchestrates the nominal pass, the backward value recursion and the update pass."""

    def __init__(self, stages: Sequence[Stage], loss: Loss, backend: Any):
        self.stages = list(stages)
        self.loss = loss
        self.backend = backend

    # -- 1. nominal forward pass -----------------------------------------------------------------
    def nominal(self, inputs: Tensor, *, input_value: bool = False) -> Trajectory:
        """Forward pass recording the states; ``input_value`` also records what V_x at x_0
        needs (one extra product for the first stage)."""
        return self.backend.forward(self.stages, inputs, input_value=input_value)

    # -- terminal cost -----------------------------------------------------------------------
    def terminal(self, traj: Trajectory, targets: Tensor, *, fisher_type: str | None = None,
                 generator: torch.Generator | None = None) -> Terminal:
        out = traj.output.detach()
        self.loss.check(out, targets)
        loss, V_x = self.loss.value_gradient(out, targets)
        factor = None
        if fisher_type == "type-2":
            factor = self.loss.hessian_sqrt(out, targets)
        elif fisher_type == "mc":
            factor = self.loss.sample_gradient(out, generator).unsqueeze(1)
        return Terminal(loss, V_x, factor)

    # -- 2. backward value recursion ----------------------------------------------------------
    def expand(self, traj: Trajectory, terminal: Terminal, *, need_stats: Sequence[bool],
               keep_values: bool = False) -> tuple[list[QExpansion], list[Tensor | None]]:
        """First-order value recursion V_x = Q_x = f_x^T V'_x (backprop, SPEC 4) with Qbar_u
        and the requested statistics per stage. Returns the expansions and, when
        ``keep_values``, V_x at every stage input (None where not computed)."""
        return self.backend.backward(self.stages, traj, terminal, need_stats=need_stats,
                                     keep_values=keep_values)

    # -- 3. forward update pass ---------------------------------------------------------------
    @torch.no_grad()
    def update_pass(self, traj: Trajectory, policies: Sequence[Policy | None],
                    targets: Tensor | None = None) -> tuple[list[Tensor], float | None]:
        """Apply du_t = k_t + K_t dx_t stage by stage (dx_0 = 0) and return the new states
        xhat_t and the loss at xhat_T (None without targets)."""
        x = traj.states[0]
        states = [x]
        for t, (stage, policy) in enumerate(zip(self.stages, policies)):
            if policy is not None:
                du = list(policy.k)
                if policy.feedback is not None:
                    dx = x - traj.states[t]
                    du = [a + b for a, b in zip(du, policy.feedback(dx))]
                for p, d in zip(stage.params, du):
                    p.add_(d)
            x = stage.replay(x, traj.contexts[t])
            states.append(x)
        loss_after = None
        if targets is not None:
            loss_after = float(self.loss.per_sample(x, targets).mean())
        return states, loss_after

    @torch.no_grad()
    def apply_open_loop(self, policies: Sequence[Policy | None]) -> None:
        """u_t <- u_t + k_t for every stage (order 1: no feedback, no forward pass needed)."""
        for stage, policy in zip(self.stages, policies):
            if policy is not None:
                for p, d in zip(stage.params, policy.k):
                    p.add_(d)
