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
    V_xx: Tensor | None = None  # (B, n, n) flattened terminal Hessian, for order 2


@dataclass
class QExpansion:
    """Expansion of Q_t around the nominal trajectory.

    Q_x = f_x^T V'_x (per sample, (B, *n)); Q_u = l_u + (1/B) sum_i f_u^T V'_x^(i) (one tensor
    per parameter of the stage); ``stats``: the curvature model's statistics, if requested.
    """

    Q_x: Tensor | None
    Q_u: list[Tensor]
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


PolicyFn = Callable[[Stage, list[Tensor], StageStatistics | None],
                    tuple[list[Tensor], Callable[[list[Tensor]], list[Tensor]]]]


def psd_clip(V: Tensor) -> Tensor:
    """Project symmetric matrices (B, n, n) onto the PSD cone (negative eigenvalues -> 0)."""
    V = 0.5 * (V + V.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(V)
    if bool((evals >= 0).all()):
        return V
    return (evecs * evals.clamp_min(0).unsqueeze(1)) @ evecs.transpose(1, 2)


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
                 generator: torch.Generator | None = None, hessian: bool = False) -> Terminal:
        """V_T = phi at x_T: loss, per-sample gradient, and (``hessian``) V_xx = d^2 phi."""
        out = traj.output.detach()
        self.loss.check(out, targets)
        loss, V_x = self.loss.value_gradient(out, targets)
        factor = None
        if fisher_type == "type-2":
            factor = self.loss.hessian_sqrt(out, targets)
        elif fisher_type == "mc":
            factor = self.loss.sample_gradient(out, generator).unsqueeze(1)
        V_xx = self.loss.hessian(out, targets) if hessian else None
        return Terminal(loss, V_x, factor, V_xx)

    # -- 2. backward value recursion ----------------------------------------------------------
    def expand(self, traj: Trajectory, terminal: Terminal, *, need_stats: Sequence[bool],
               keep_values: bool = False) -> tuple[list[QExpansion], list[Tensor | None]]:
        """First-order value recursion V_x = Q_x = f_x^T V'_x (backprop, SPEC 4) with Qbar_u
        and the requested statistics per stage. Returns the expansions and, when
        ``keep_values``, V_x at every stage input (None where not computed)."""
        return self.backend.backward(self.stages, traj, terminal, need_stats=need_stats,
                                     keep_values=keep_values)

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
    ) -> SecondOrderPass:
        """Second-order backward value recursion (SPEC 2-4) with the policy of every stage.

        Per stage, from V'_x and V'_xx: the Q expansion (backend), the curvature model's step
        (``policy_fn`` returns the open-loop step k = -lr d and the solver v -> M^{-1} v), the
        feedback K dx = -lr M^{-1} (1/B) sum_i Q_ux^(i) dx^(i), and the value update
        V_x = Q_x - lr Q_ux^T M^{-1} Qbar_u, V_xx = Q_xx - (lr/B) Q_ux^T M^{-1} Q_ux (+ mu I,
        clipped to PSD). ``weight_decay`` is the coupled l_t(u) = wd/2 |u|^2.
        """
        from ocnopt.backends.autograd import kronecker_statistics

        backend = self.backend
        T = len(self.stages)
        B = terminal.V_x.shape[0]
        V_x: Tensor = terminal.V_x
        V_xx = terminal.V_xx
        if V_xx is None:
            raise ValueError("second-order pass needs the terminal Hessian (hessian=True)")
        Z = terminal.factor
        policies: list[Policy | None] = [None] * T
        expansions: list[QExpansion | None] = [None] * T
        Vx_list: list[Tensor | None] = [None] * (T + 1)
        Vxx_list: list[Tensor | None] = [None] * (T + 1)
        if keep:
            Vx_list[T], Vxx_list[T] = V_x, V_xx
        predicted = V_x.new_zeros(())
        for t, stage in enumerate(self.stages):  # refuse before any work is done
            backend.check_budget(stage, traj.states[t], traj.states[t + 1],
                                 need_quu and stage.has_control)
        for t in reversed(range(T)):
            stage = self.stages[t]
            piece = traj.handles[t]
            x, y = traj.states[t], traj.states[t + 1]
            terms = backend.second_order(stage, x, traj.contexts[t], y, V_x, V_xx,
                                         gauss_newton=gauss_newton,
                                         need_quu=need_quu and stage.has_control)
            m = stage.control_size
            eye_m = torch.eye(m, dtype=V_x.dtype, device=V_x.device) if m else None
            Q_uu = terms.Q_uu
            if Q_uu is not None and weight_decay:
                Q_uu = Q_uu + weight_decay * eye_m
            stats = None
            if need_stats[t]:
                stats = (kronecker_statistics(stage, piece[0], V_x, Z) if stage.kronecker
                         else StageStatistics())
                stats.Q_uu = Q_uu
            if Z is not None and t > 0:
                Zf = torch.einsum("bkn,brk->brn", terms.f_x, Z.flatten(2))
                Z = Zf.reshape(B, Zf.shape[1], *x.shape[1:])
            Q_x, Q_u = backend.first_order(stage, piece, V_x, B)
            if Q_x is None:  # input of stage 0 without grad: f_x^T V'_x from the Jacobian
                Q_x = torch.einsum("bkn,bk->bn", terms.f_x, V_x.reshape(B, -1)).reshape(x.shape)
            V_x_new, V_xx_new = Q_x, terms.Q_xx
            if stage.has_control:
                if weight_decay:
                    Q_u = [g.add(p.detach(), alpha=weight_decay) for g, p in zip(Q_u, stage.params)]
                k, minv = policy_fn(stage, Q_u, stats)
                Q_ux = terms.Q_ux
                assert Q_ux is not None and terms.f_u is not None
                k_flat, Qu_flat = stage.flatten(k), stage.flatten(Q_u)
                fu_k = torch.einsum("bkm,m->bk", terms.f_u, k_flat)
                quad = torch.einsum("bk,bkl,bl->", fu_k, V_xx, fu_k) / B
                quad = quad + weight_decay * k_flat.square().sum()
                if terms.psi_uu is not None:
                    quad = quad + k_flat @ terms.psi_uu @ k_flat
                predicted = predicted + k_flat @ Qu_flat + 0.5 * quad
                policies[t] = Policy(k=k, feedback=_feedback(stage, Q_ux, minv, lr, B)
                                     if feedback else None)
                if value_correction:
                    M_Qu = stage.flatten(minv(Q_u))
                    V_x_new = Q_x - lr * torch.einsum("bmn,m->bn", Q_ux, M_Qu).reshape(Q_x.shape)
                    M_Qux = stage.flatten(minv(stage.unflatten(Q_ux.transpose(1, 2))), lead=2)
                    V_xx_new = V_xx_new - (lr / B) * torch.einsum("bmn,bkm->bnk", Q_ux, M_Qux)
            if mu:
                V_xx_new = V_xx_new + mu * torch.eye(V_xx_new.shape[-1], dtype=V_x.dtype,
                                                     device=V_x.device)
            if clip:
                V_xx_new = psd_clip(V_xx_new)
            expansions[t] = QExpansion(Q_x=Q_x, Q_u=Q_u, stats=stats, Q_xx=terms.Q_xx,
                                       Q_ux=terms.Q_ux, Q_uu=Q_uu) if keep else None
            V_x, V_xx = V_x_new, V_xx_new
            if keep:
                Vx_list[t], Vxx_list[t] = V_x, V_xx
        return SecondOrderPass(policies, expansions, Vx_list, Vxx_list, float(predicted))

    # -- 3. forward update pass ---------------------------------------------------------------
    @torch.no_grad()
    def update_pass(self, traj: Trajectory, policies: Sequence[Policy | None],
                    targets: Tensor | None = None
                    ) -> tuple[list[Tensor], float | None, list[float]]:
        """Apply du_t = k_t + K_t dx_t stage by stage (dx_0 = 0); return the new states
        xhat_t, the loss at xhat_T (None without targets) and the norm of each stage's
        feedback part K_t dx_t (0 without feedback)."""
        x = traj.states[0]
        states = [x]
        fb_norms: list[Tensor] = []
        for t, (stage, policy) in enumerate(zip(self.stages, policies)):
            if policy is not None:
                du = list(policy.k)
                if policy.feedback is not None:
                    fb = policy.feedback(x - traj.states[t])
                    fb_norms.append(torch.stack([f.square().sum() for f in fb]).sum().sqrt())
                    du = [a + b for a, b in zip(du, fb)]
                else:
                    fb_norms.append(x.new_zeros(()))
                for p, d in zip(stage.params, du):
                    p.add_(d)
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


def _feedback(stage: Stage, Q_ux: Tensor, minv: Callable[[list[Tensor]], list[Tensor]],
              lr: float, B: int) -> Callable[[Tensor], list[Tensor]]:
    """K dx = -lr M^{-1} (1/B) sum_i Q_ux^(i) dx^(i)."""

    def K(dx: Tensor) -> list[Tensor]:
        s = torch.einsum("bmn,bn->m", Q_ux, dx.reshape(dx.shape[0], -1)) / B
        return [v.mul(-lr) for v in minv(stage.unflatten(s))]

    return K
