"""Exact autograd backend: derivatives of each stage by ``torch.autograd`` / ``torch.func``.

First-order terms (SPEC 4): the nominal pass cuts the autograd graph at every stage input, so
the backward value recursion is one vector-Jacobian product per stage,

    (Q_x, B * Qbar_u) = (f_x^T V'_x, sum_i f_u^(i)T V'_x^(i)),

which costs exactly one backpropagation. Order 2 adds, from per-sample Jacobians of the stage
function (``torch.func.vmap(jacrev)``), the full matrices (SPEC 2)

    Q_xx = f_x^T V'_xx f_x + V'_x . f_xx,   Q_ux = f_u^T V'_xx f_x + V'_x . f_ux,
    Qbar_uu = E_i[f_u^T V'_xx f_u + V'_x . f_uu],

where the contraction terms V'_x . f_ab are Hessians of psi(x, u) = <V'_x, f(x, u)> and are
dropped under Gauss-Newton. Works for any stage ``torch.func`` can differentiate.

Cost per stage (n_in, n_out per-sample state sizes, m control size, B batch, e bytes per
entry): memory e * (B (n_out n_in + n_out m + n_in^2 + m n_in + n_out^2) + m^2 [if Qbar_uu]);
time O(B n_out (n_in^2 + m n_in)) plus O(B n_out m^2) for Qbar_uu. ``memory_budget`` (bytes)
bounds the first; a stage over budget is refused with its sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import hessian, jacfwd, jacrev, vmap

from ocnopt.curvature.base import StageStatistics
from ocnopt.engine import QExpansion, Terminal, Trajectory, bound_correction_with_share
from ocnopt.stages import Stage

from .base import Backend

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes


class MemoryBudgetError(RuntimeError):
    """The exact backend would need more memory for a stage than its budget allows."""


@dataclass
class SecondOrderTerms:
    """Per-sample second-order terms of one stage, flattened: f_x (B, n_out, n_in),
    f_u (B, n_out, m), Q_xx (B, n_in, n_in), Q_ux (B, m, n_in), Qbar_uu (m, m) or None,
    and psi_uu (m, m) mean contraction term (None under Gauss-Newton)."""

    f_x: Tensor
    f_u: Tensor | None
    Q_xx: Tensor
    Q_ux: Tensor | None
    Q_uu: Tensor | None
    psi_uu: Tensor | None


@dataclass
class ExactValue:
    """Value at a stage input: V_x (B, *n) and V_xx (B, n, n), full per sample."""

    V_x: Tensor
    V_xx: Tensor
    bounded: Tensor | None = None  # share of samples whose V_x correction the trust bound cut


@dataclass
class ExactExpansion(QExpansion):
    terms: SecondOrderTerms | None = None
    next_value: ExactValue | None = None


Solver = Callable[[list[Tensor]], list[Tensor]]


class GraphBackend(Backend):
    """The nominal pass on per-stage graph pieces and the first-order value recursion (one VJP
    per stage): shared by every backend that computes derivatives with torch.autograd."""

    # -- nominal pass ---------------------------------------------------------------------------
    def forward(self, stages: Sequence[Stage], inputs: Tensor, *, input_value: bool = False
                ) -> Trajectory:
        states, contexts, pieces = [inputs.detach()], [], []
        x = inputs.detach()
        with torch.enable_grad():
            for t, stage in enumerate(stages):
                grad_in = (t > 0 or input_value) and x.is_floating_point()
                xin = x.detach().requires_grad_(True) if grad_in else x
                out, ctx = stage.forward(xin)
                pieces.append((xin, out))
                contexts.append(ctx)
                x = out.detach()
                states.append(x)
        return Trajectory(states, contexts, pieces)

    # -- first order ----------------------------------------------------------------------------
    def first_order(self, stage: Stage, piece: tuple[Tensor, Tensor], V_x: Tensor, B: int,
                    retain: bool = False, control: bool = True
                    ) -> tuple[Tensor | None, list[Tensor] | None]:
        """(Q_x, Qbar_u - l_u) = (f_x^T V'_x, (1/B) sum_i f_u^T V'_x) by one VJP; without
        ``control`` Qbar_u is not formed (None: the curvature model does not read it)."""
        xin, out = piece
        wants_x = xin.requires_grad
        wrt = ([xin] if wants_x else []) + (list(stage.params) if control else [])
        grads = torch.autograd.grad(out, wrt, grad_outputs=V_x, retain_graph=retain) if wrt else ()
        Q_x = grads[0] if wants_x else None
        return Q_x, [g.div_(B) for g in grads[int(wants_x):]] if control else None

    def backward(self, stages: Sequence[Stage], traj: Trajectory, terminal: Terminal, *,
                 need_stats: Sequence[bool], keep_values: bool = False,
                 skip_u: Sequence[bool] | None = None
                 ) -> tuple[list[QExpansion], list[Tensor | None]]:
        T = len(stages)
        B = terminal.V_x.shape[0]
        V_x: Tensor | None = terminal.V_x
        Z = terminal.factor  # (B, r, *n) or None
        last_stats = max((t for t in range(T) if need_stats[t]), default=-1)
        expansions: list[QExpansion] = [None] * T  # type: ignore[list-item]
        values: list[Tensor | None] = [None] * (T + 1)
        values[T] = terminal.V_x if keep_values else None
        for t in reversed(range(T)):
            stage = stages[t]
            xin, out = traj.handles[t]
            stats = kronecker_statistics(stage, xin, V_x, Z) if need_stats[t] else None
            if Z is not None and xin.requires_grad and t <= last_stats:
                Z = torch.stack([
                    torch.autograd.grad(out, xin, Z[:, c], retain_graph=True)[0]
                    for c in range(Z.shape[1])
                ], 1)
            Q_x, Q_u = self.first_order(stage, traj.handles[t], V_x, B,  # type: ignore[arg-type]
                                        control=not (skip_u and skip_u[t]))
            expansions[t] = QExpansion(Q_x=Q_x, Q_u=Q_u, stats=stats)
            V_x = Q_x
            if keep_values:
                values[t] = Q_x
        return expansions, values



class AutogradBackend(GraphBackend):
    """Exact backend: full per-sample matrices (vanilla DDP)."""

    name = "autograd"
    second_order_capable = True

    def __init__(self, memory_budget: int = DEFAULT_MEMORY_BUDGET):
        if not (isinstance(memory_budget, int) and memory_budget > 0):
            raise ValueError(f"invalid memory_budget={memory_budget!r}: accepted a positive "
                             "integer number of bytes")
        self.memory_budget = memory_budget

    def check_fisher(self, fisher_type: str, *, order: int, explicit: bool) -> None:
        if order == 2 and fisher_type not in ("empirical", "type-2"):
            raise ValueError(
                f"invalid fisher_type={fisher_type!r} for backend 'autograd' at order 2: the "
                "Kronecker statistics come from the propagated V_xx, whose terminal is the exact "
                "loss Hessian; accepted 'type-2' or 'empirical' (or backend 'lowrank' with "
                "backend_options={'terminal': 'mc'})")

    # -- second order (SPEC 2-4 with full per-sample matrices) -----------------------------------
    def check_second_order(self, stages: Sequence[Stage], traj: Trajectory, *, need_quu: bool
                           ) -> None:
        """Refuse, before any work, a stage whose full matrices exceed the memory budget."""
        for t, stage in enumerate(stages):
            self.check_budget(stage, traj.states[t], traj.states[t + 1],
                              need_quu and stage.has_control)

    def check_budget(self, stage: Stage, x: Tensor, y: Tensor, need_quu: bool) -> None:
        B, n, n1, m = x.shape[0], x[0].numel(), y[0].numel(), stage.control_size
        entries = B * (n1 * n + n1 * m + n * n + m * n + n1 * n1) + (m * m if need_quu else 0)
        need = entries * x.element_size()
        if need > self.memory_budget:
            raise MemoryBudgetError(
                f"exact backend: {stage} needs about {need / 2**20:.1f} MiB for its full "
                f"matrices (B={B}, n_in={n}, n_out={n1}, m={m}), over memory_budget="
                f"{self.memory_budget / 2**20:.1f} MiB; raise OCNOpt(memory_budget=...), use a "
                "smaller batch, or a scalable backend"
            )

    def terminal_value(self, loss: Any, traj: Trajectory, terminal: Terminal, *,
                       targets: Tensor | None = None, generator: Any = None) -> ExactValue:
        V_xx = terminal.V_xx
        if V_xx is None:
            if targets is None:
                raise ValueError("the exact backend needs the terminal Hessian or the targets")
            V_xx = loss.hessian(traj.output.detach(), targets)
        return ExactValue(terminal.V_x, V_xx)

    @staticmethod
    def value_hessian(value: ExactValue) -> Tensor:
        return value.V_xx

    def expand_stage(self, stage: Stage, t: int, traj: Trajectory, value: ExactValue, *,
                     gauss_newton: bool, need_quu: bool, need_stats: bool, keep: bool = False,
                     stats_from_value: bool = True, skip_u: bool = False) -> ExactExpansion:
        """The exact expansion of stage t (``skip_u`` is ignored: Qbar_u is always formed)."""
        piece = traj.handles[t]
        x, y = traj.states[t], traj.states[t + 1]
        terms = self.second_order_terms(stage, x, traj.contexts[t], y, value.V_x, value.V_xx,
                                        gauss_newton=gauss_newton, need_quu=need_quu)
        stats = None
        if need_stats:
            Z = None
            if stats_from_value and stage.kronecker:  # rows of a square root of V'_xx
                Z = psd_sqrt_factor(value.V_xx).reshape(y.shape[0], -1, *y.shape[1:])
            stats = (kronecker_statistics(stage, piece[0], value.V_x, Z) if stage.kronecker
                     else StageStatistics())
        B = x.shape[0]
        Q_x, Q_u = self.first_order(stage, piece, value.V_x, B)
        if Q_x is None:  # input of stage 0 without grad: f_x^T V'_x from the Jacobian
            Q_x = torch.einsum("bkn,bk->bn", terms.f_x, value.V_x.reshape(B, -1)).reshape(x.shape)
        return ExactExpansion(Q_x=Q_x, Q_u=Q_u, stats=stats, Q_xx=terms.Q_xx, Q_ux=terms.Q_ux,
                              Q_uu=terms.Q_uu, terms=terms, next_value=value)

    def quadratic(self, stage: Stage, exp: ExactExpansion, k: list[Tensor]) -> Tensor:
        """k^T Qbar_uu k (without l_uu) = E_i[(f_u k)^T V'_xx (f_u k)] + k^T psi_uu k."""
        terms, value = exp.terms, exp.next_value
        assert terms is not None and terms.f_u is not None and value is not None
        k_flat = stage.flatten(k)
        fu_k = torch.einsum("bkm,m->bk", terms.f_u, k_flat)
        quad = (fu_k * (value.V_xx @ fu_k.unsqueeze(-1))[..., 0]).sum() / fu_k.shape[0]
        if terms.psi_uu is not None:
            quad = quad + k_flat @ terms.psi_uu @ k_flat
        return quad

    def feedback(self, stage: Stage, exp: ExactExpansion, minv: Solver, lr: float, B: int
                 ) -> Callable[[Tensor], list[Tensor]]:
        """K dx = -lr M^{-1} (1/B) sum_i Q_ux^(i) dx^(i)."""
        Q_ux = exp.Q_ux
        assert Q_ux is not None

        def K(dx: Tensor) -> list[Tensor]:
            s = torch.einsum("bmn,bn->m", Q_ux, dx.reshape(dx.shape[0], -1)) / B
            return [v.mul(-lr) for v in minv(stage.unflatten(s))]

        return K

    def value_update(self, stage: Stage, exp: ExactExpansion, value: ExactValue,
                     minv: Solver | None, lr: float, B: int, *, value_correction: bool,
                     mu: float, clip: bool, trust: float | None = None) -> ExactValue:
        """V_x = Q_x - lr Q_ux^T M^{-1} Qbar_u (its correction bounded by ``trust`` |Q_x| per
        sample); V_xx = Q_xx - (lr/B) Q_ux^T M^{-1} Q_ux + mu I, projected onto the PSD cone
        when ``clip``."""
        V_x, V_xx = exp.Q_x, exp.Q_xx
        assert V_x is not None and V_xx is not None
        bounded = None
        if value_correction and minv is not None:
            Q_ux = exp.Q_ux
            assert Q_ux is not None
            assert exp.Q_u is not None  # the exact backend always forms Qbar_u
            M_Qu = stage.flatten(minv(exp.Q_u))
            corrected = V_x - lr * torch.einsum("bmn,m->bn", Q_ux, M_Qu).reshape(V_x.shape)
            if trust is None:
                V_x = corrected
            else:
                V_x, bounded = bound_correction_with_share(V_x, corrected, trust)
            M_Qux = stage.flatten(minv(stage.unflatten(Q_ux.transpose(1, 2))), lead=2)
            V_xx = V_xx - (lr / B) * torch.einsum("bmn,bkm->bnk", Q_ux, M_Qux)
        if mu:
            V_xx = V_xx + mu * torch.eye(V_xx.shape[-1], dtype=V_xx.dtype, device=V_xx.device)
        if clip:
            V_xx = psd_clip(V_xx)
        return ExactValue(V_x, V_xx, bounded)

    def second_order_terms(self, stage: Stage, x: Tensor, ctx: Any, y: Tensor, V_x: Tensor,
                           V_xx: Tensor, *, gauss_newton: bool, need_quu: bool
                           ) -> SecondOrderTerms:
        """Second-order terms of stage ``stage`` at the nominal state ``x`` (B, *n_in) with
        output ``y``, from V'_x (B, *n_out) and V'_xx (B, n_out, n_out). The caller checks
        the memory budget first (``check_budget``)."""
        B, n, n1 = x.shape[0], x[0].numel(), y[0].numel()
        has_u = stage.has_control
        u = stage.flatten([p.detach() for p in stage.params]) if has_u else x.new_zeros(0)
        cdim = 0 if isinstance(ctx, Tensor) else None

        def f(u_flat: Tensor, xi: Tensor, ci: Any) -> Tensor:
            params = dict(zip(stage.param_names, stage.unflatten(u_flat))) if has_u else {}
            c = None if ci is None else ci.unsqueeze(0)
            return stage.functional(params, xi.unsqueeze(0), c).reshape(-1)

        x = x.detach()
        if has_u:
            f_u, f_x = vmap(jacrev(f, argnums=(0, 1)), in_dims=(None, 0, cdim))(u, x, ctx)
            f_u = f_u.reshape(B, n1, -1)
        else:
            f_u = None
            f_x = vmap(jacrev(f, argnums=1), in_dims=(None, 0, cdim))(u, x, ctx)
        f_x = f_x.reshape(B, n1, n)
        Vf_x = V_xx @ f_x
        Q_xx = f_x.transpose(1, 2) @ Vf_x
        Q_ux = f_u.transpose(1, 2) @ Vf_x if f_u is not None else None
        Q_uu = None
        if need_quu and f_u is not None:
            Q_uu = torch.einsum("bkm,bkl->ml", f_u, V_xx @ f_u) / B
        psi_uu = None
        if not gauss_newton:
            v = V_x.detach().reshape(B, -1)

            def psi(u_flat: Tensor, xi: Tensor, ci: Any, vi: Tensor) -> Tensor:
                return (vi * f(u_flat, xi, ci)).sum()

            psi_xx = vmap(hessian(psi, argnums=1), in_dims=(None, 0, cdim, 0))(u, x, ctx, v)
            Q_xx = Q_xx + psi_xx.reshape(B, n, n)
            if has_u:
                psi_ux = vmap(jacfwd(jacrev(psi, argnums=0), argnums=1),
                              in_dims=(None, 0, cdim, 0))(u, x, ctx, v)
                Q_ux = Q_ux + psi_ux.reshape(B, -1, n)  # type: ignore[operator]

                def psi_sum(u_flat: Tensor) -> Tensor:
                    return vmap(psi, in_dims=(None, 0, cdim, 0))(u_flat, x, ctx, v).sum() / B

                psi_uu = jacfwd(jacrev(psi_sum))(u)
                if Q_uu is not None:
                    Q_uu = Q_uu + psi_uu
        return SecondOrderTerms(f_x, f_u, Q_xx, Q_ux, Q_uu, psi_uu)


def psd_clip(V: Tensor) -> Tensor:
    """Project symmetric matrices (B, n, n) onto the PSD cone (negative eigenvalues -> 0).

    The eigen-decomposition runs in float64; if it fails to converge (many repeated or tiny
    eigenvalues), it is retried on V + 1e-12 max|V| I."""
    V = 0.5 * (V + V.transpose(1, 2))
    if not bool(torch.isfinite(V).all()):  # left to the optimizer's non-finite guard
        return V
    V64 = V.to(torch.float64)
    try:
        evals, evecs = torch.linalg.eigh(V64)
    except RuntimeError:
        scale = V64.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-300)
        eye = torch.eye(V.shape[-1], dtype=torch.float64, device=V.device)
        evals, evecs = torch.linalg.eigh(V64 + 1e-12 * scale * eye)
    if bool((evals >= 0).all()):
        return V
    return ((evecs * evals.clamp_min(0).unsqueeze(1)) @ evecs.transpose(1, 2)).to(V.dtype)


def psd_sqrt_factor(V: Tensor) -> Tensor:
    """Rows Z (B, n, n) with Z^T Z = PSD part of V (B, n, n): the symmetric square root."""
    V64 = 0.5 * (V + V.transpose(1, 2)).to(torch.float64)
    evals, evecs = torch.linalg.eigh(V64)
    root = (evecs * evals.clamp_min(0).sqrt().unsqueeze(1)) @ evecs.transpose(1, 2)
    return root.to(V.dtype)


def kronecker_statistics(stage: Stage, xin: Tensor, V_x: Tensor | None, Z: Tensor | None
                         ) -> StageStatistics:
    """Kronecker factor rows of a stage: inputs, and output cotangents (V'_x for the empirical
    Fisher, the propagated terminal factor Z otherwise)."""
    g = V_x.unsqueeze(1) if Z is None else Z  # type: ignore[union-attr]
    d = stage.derivatives
    return StageStatistics(a=d.kfac_input(stage.module, xin.detach()),
                           g=d.kfac_output(stage.module, g), gradient_rows=Z is None)
