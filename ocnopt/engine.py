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
    targets: Tensor | None = None  # set by ``terminal``
    generator: torch.Generator | None = None  # set by ``terminal``: the step's sampler

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
    V_xx: Tensor | None = None  # (B, n, n) flattened terminal Hessian, for order 2


@dataclass
class QExpansion:
    """Expansion of Q_t around the nominal trajectory.

    Q_x = f_x^T V'_x (per sample, (B, *n)); Q_u = l_u + (1/B) sum_i f_u^T V'_x^(i) (one tensor
    per parameter of the stage; None where the step was asked not to form it because the
    curvature model does not read it: ``CurvatureModel.gradient_unused``); ``stats``: the
    curvature model's statistics, if requested.
    """

    Q_x: Tensor | None
    Q_u: list[Tensor] | None
    stats: StageStatistics | None = None
    # second order (exact backend), flattened per sample: Q_xx (B, n, n), Q_ux (B, m, n),
    # Qbar_uu (m, m) including l_uu (only when computed)
    Q_xx: Tensor | None = None
    Q_ux: Tensor | None = None
    Q_uu: Tensor | None = None


@dataclass
class Policy:
    """Affine feedback policy of one stage: du = k + K(dx). ``feedback`` is None at order 1."""

    k: list[Tensor]
    feedback: Callable[[Tensor], list[Tensor]] | None = None
    k_norm: Tensor | None = None  # |k| when the caller has it (the update pass's trust bound)
    feedback_scale: Tensor | None = None  # set by the update pass: the trust bound's factor


@dataclass
class SecondOrderPass:
    """Result of the second-order backward pass: policies, expansions, values (V_x per sample
    and V_xx (B, n, n) per stage input, when kept) and the predicted change of the objective
    sum_t (k_t . Qbar_u + 1/2 k_t^T Qbar_uu k_t)."""

    policies: list[Policy | None]
    expansions: list[QExpansion | None]
    V_x: list[Tensor | None]
    V_xx: list[Tensor | None]
    predicted_change: float
    #: per stage, the share of samples whose V_x correction the trust bound cut (None: no bound)
    value_bounded: list[Tensor | None] | None = None


PolicyFn = Callable[[Stage, list[Tensor] | None, StageStatistics | None],
                    tuple[list[Tensor], Callable[[list[Tensor]], list[Tensor]]]]


@dataclass
class StageDiagnostics:
    """Per controlled stage: |k|, |K dx| (after the trust bound), the factor the trust bound
    applied to K dx (1: not cut) and the share of samples whose V_x correction it cut."""

    index: int
    name: str
    k_norm: float
    feedback_norm: float = 0.0
    feedback_scale: float = 1.0
    value_bounded: float = 0.0


@dataclass
class StepResult:
    """What one ``OCNOpt.step`` did: loss before (and after, when computed), whether the step
    was skipped as non-finite, and per-stage diagnostics."""

    loss: Tensor
    loss_after: float | None = None
    skipped: bool = False
    predicted_change: float | None = None
    stages: list[StageDiagnostics] = field(default_factory=list)


def _norm(ts: Sequence[Tensor]) -> Tensor:
    return torch.stack([torch.linalg.vector_norm(t) for t in ts]).square().sum().sqrt()


def bound_correction(Q_x: Tensor, V_x: Tensor, trust: float) -> Tensor:
    """Q_x + c (V_x - Q_x) with the largest c <= 1 per sample such that the correction's norm
    is at most ``trust`` times |Q_x| (the trust bound of the value correction)."""
    return bound_correction_with_share(Q_x, V_x, trust)[0]


def bound_correction_with_share(Q_x: Tensor, V_x: Tensor, trust: float) -> tuple[Tensor, Tensor]:
    """``bound_correction`` and the share of samples it cut (a 0-dim tensor)."""
    delta = V_x - Q_x
    B = delta.shape[0]
    dn = torch.linalg.vector_norm(delta.reshape(B, -1), dim=1)
    qn = torch.linalg.vector_norm(Q_x.reshape(B, -1), dim=1)
    cut = dn > trust * qn
    scale = torch.where(cut, trust * qn / dn.clamp_min(torch.finfo(dn.dtype).tiny),
                        torch.ones_like(dn))
    return Q_x + delta * scale.reshape(B, *([1] * (delta.dim() - 1))), cut.to(dn.dtype).mean()


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
                 generator: torch.Generator | None = None, hessian: bool = False) -> Terminal:
        """V_T = phi at x_T: loss, per-sample gradient, and (``hessian``) V_xx = d^2 phi."""
        out = traj.output.detach()
        self.loss.check(out, targets)
        traj.targets, traj.generator = targets, generator
        loss, V_x = self.loss.value_gradient(out, targets)
        factor = None
        if not torch.isfinite(loss):  # the step will be skipped: sample nothing
            return Terminal(loss, V_x)
        if fisher_type == "type-2":
            factor = self.loss.hessian_sqrt(out, targets)
        elif fisher_type == "mc":
            factor = self.loss.sample_gradient(out, generator).unsqueeze(1)
        V_xx = self.loss.hessian(out, targets) if hessian else None
        return Terminal(loss, V_x, factor, V_xx)

    # -- 2. backward value recursion ----------------------------------------------------------
    def expand(self, traj: Trajectory, terminal: Terminal, *, need_stats: Sequence[bool],
               keep_values: bool = False, skip_u: Sequence[bool] | None = None
               ) -> tuple[list[QExpansion], list[Tensor | None]]:
        """First-order value recursion V_x = Q_x = f_x^T V'_x (backprop, SPEC 4) with Qbar_u
        and the requested statistics per stage. Returns the expansions and, when
        ``keep_values``, V_x at every stage input (None where not computed)."""
        return self.backend.backward(self.stages, traj, terminal, need_stats=need_stats,
                                     keep_values=keep_values, skip_u=skip_u)

    def second_order(
        self,
        traj: Trajectory,
        terminal: Terminal,
        policy_fn: PolicyFn,
        *,
        lr: float,
        weight_decay: float = 0.0,
        feedback: bool = True,
        value_correction: bool = True,
        gauss_newton: bool = True,
        mu: float = 0.0,
        clip: bool = True,
        need_stats: Sequence[bool],
        need_quu: bool = False,
        keep: bool = False,
        targets: Tensor | None = None,
        generator: torch.Generator | None = None,
        stats_from_value: bool = True,
        trust: float | None = None,
        skip_u: Sequence[bool] | None = None,
    ) -> SecondOrderPass:
        """Second-order backward value recursion (SPEC 2-4) with the policy of every stage.

        Per stage, from the value at the next stage: the Q expansion (backend), the curvature
        model's step (``policy_fn`` returns the open-loop step k = -lr d and the solver
        v -> M^{-1} v), the feedback K dx = -lr M^{-1} (1/B) sum_i Q_ux^(i) dx^(i), and the
        value update V_x = Q_x - lr Q_ux^T M^{-1} Qbar_u, V_xx = Q_xx - (lr/B) Q_ux^T M^{-1}
        Q_ux (+ mu I, clipped to PSD), each in the backend's representation of V_xx.
        ``weight_decay`` is the coupled l_t(u) = wd/2 |u|^2 (added to Q_u and Q_uu here).
        Kronecker statistics come from the propagated value Hessian V'_xx (its per-sample
        square-root factor) when ``stats_from_value``, else from V'_x (empirical Fisher).
        """
        backend = self.backend
        T = len(self.stages)
        B = terminal.V_x.shape[0]
        backend.check_second_order(self.stages, traj, need_quu=need_quu)
        value = backend.terminal_value(self.loss, traj, terminal, targets=targets,
                                       generator=generator)
        policies: list[Policy | None] = [None] * T
        expansions: list[QExpansion | None] = [None] * T
        Vx_list: list[Tensor | None] = [None] * (T + 1)
        Vxx_list: list[Tensor | None] = [None] * (T + 1)
        if keep:
            Vx_list[T], Vxx_list[T] = value.V_x, backend.value_hessian(value)
        predicted = terminal.V_x.new_zeros(())
        bounded: list[Tensor | None] = [None] * T
        for t in reversed(range(T)):
            stage = self.stages[t]
            exp = backend.expand_stage(stage, t, traj, value, gauss_newton=gauss_newton,
                                       need_quu=need_quu and stage.has_control,
                                       need_stats=need_stats[t], keep=keep,
                                       stats_from_value=stats_from_value,
                                       skip_u=bool(skip_u and skip_u[t]))
            if exp.Q_uu is not None and weight_decay:
                exp.Q_uu = exp.Q_uu + weight_decay * torch.eye(
                    exp.Q_uu.shape[0], dtype=exp.Q_uu.dtype, device=exp.Q_uu.device)
            if exp.stats is not None and need_quu:
                exp.stats.Q_uu = exp.Q_uu
            minv = None
            if stage.has_control:
                if weight_decay:  # Qbar_u is formed whenever weight decay is in it
                    assert exp.Q_u is not None
                    exp.Q_u = [g.add(p.detach(), alpha=weight_decay)
                               for g, p in zip(exp.Q_u, stage.params)]
                k, minv = policy_fn(stage, exp.Q_u, exp.stats)
                quad = backend.quadratic(stage, exp, k)
                if weight_decay:
                    quad = quad + weight_decay * sum(kk.square().sum() for kk in k)
                kQ = getattr(exp, "kQ", None) if exp.Q_u is None else sum(
                    torch.vdot(kk.flatten(), g.flatten()) for kk, g in zip(k, exp.Q_u))
                assert kQ is not None, "a backend that skips Qbar_u gives k . Qbar_u"
                predicted = predicted + kQ + 0.5 * quad
                policies[t] = Policy(k=k, feedback=backend.feedback(stage, exp, minv, lr, B)
                                     if feedback else None)
            if t > 0 or keep:
                value = backend.value_update(stage, exp, value, minv, lr, B,
                                             value_correction=value_correction and minv is not None,
                                             mu=mu, clip=clip, trust=trust)
                bounded[t] = getattr(value, "bounded", None)
            expansions[t] = exp if keep else None
            if keep:
                Vx_list[t], Vxx_list[t] = value.V_x, backend.value_hessian(value)
        return SecondOrderPass(policies, expansions, Vx_list, Vxx_list, float(predicted), bounded)

    # -- 3. forward update pass ---------------------------------------------------------------
    @torch.no_grad()
    def update_pass(self, traj: Trajectory, policies: Sequence[Policy | None],
                    targets: Tensor | None = None, trust: float | None = None
                    ) -> tuple[list[Tensor], float | None, list[float]]:
        """Apply du_t = k_t + K_t dx_t stage by stage (dx_0 = 0); return the new states
        xhat_t, the loss at xhat_T (None without targets) and the norm of each stage's
        feedback part K_t dx_t (0 without feedback)."""
        x = traj.states[0]
        states = [x]
        fb_norms: list[Tensor] = []
        for t, (stage, policy) in enumerate(zip(self.stages, policies)):
            if policy is not None:
                if policy.feedback is not None:  # before u changes: it may use the kept graph
                    fb = policy.feedback(x - traj.states[t])
                    fb_norm = _norm(fb)
                    scale = torch.ones_like(fb_norm)
                    if trust is not None:
                        k_norm = policy.k_norm if policy.k_norm is not None else _norm(policy.k)
                        scale = torch.where(fb_norm > 0, torch.clamp(trust * k_norm / fb_norm,
                                                                     max=1.0), scale)
                        fb_norm = fb_norm * scale
                    policy.feedback_scale = scale
                    for p, k, f in zip(stage.params, policy.k, fb):  # u + k + scale K dx
                        p.add_(k).addcmul_(f, scale)
                    fb_norms.append(fb_norm)
                else:
                    for p, k in zip(stage.params, policy.k):
                        p.add_(k)
                    fb_norms.append(x.new_zeros(()))
            x = stage.replay(x, traj.contexts[t])
            states.append(x)
        loss_after = None
        if targets is not None:
            loss_after = float(self.loss.per_sample(x, targets).mean())
        norms = torch.stack(fb_norms).tolist() if fb_norms else []
        return states, loss_after, norms

    @torch.no_grad()
    def apply_open_loop(self, policies: Sequence[Policy | None]) -> None:
        """u_t <- u_t + k_t for every stage (order 1: no feedback, no forward pass needed)."""
        for stage, policy in zip(self.stages, policies):
            if policy is not None:
                for p, d in zip(stage.params, policy.k):
                    p.add_(d)

