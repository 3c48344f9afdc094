"""Low-rank Gauss-Newton backend: V_xx^(i) = Z^(i) Z^(i)T propagated by Jacobian products.

docs/method.md, section 4 ("low rank") and section 7 (graphs). The factor Z (stored as
(B, r, *n): r columns per sample) starts at the terminal as one of

- ``"empirical"``: r = 1, Z_T = v_T, the per-sample gradient (the papers' outer-product choice);
- ``"exact"``: the square root of the loss Hessian (r = classes for cross-entropy, r = outputs
  for MSE): then every V_xx is the exact Gauss-Newton one;
- ``"mc"``: r = ``mc_samples`` gradients at labels sampled from the model, scaled 1/sqrt(r).

Per stage, with Z' the factor at the output, a = f_x^T Z' (r vector-Jacobian products) and
W = f_u^T Z' (never formed for Linear/Conv with the built-in curvature models):

    Q_ux^(i) dx^(i) = W^(i) s^(i),  s^(i) = a^(i)T dx^(i)
    (1/B) sum_i W^(i) s^(i) = f_u^T (Z' s) / B       one VJP with per-sample weighted cotangents
    W^(i)T k = <Z'^(i), f_u k>                      one JVP of the stage in u
    V_x^(i) = Q_x^(i) + a^(i) (W^(i)T k),           k = -lr M^{-1} Qbar_u
    Z^(i) <- a^(i) C^(i),  C C^T = I_r - (lr/B) W^(i)T M^{-1} W^(i)   (clipped to PSD)

W^T M^{-1} W has closed forms (``CurvatureModel.per_sample_gram``) for Linear and Conv with
sgd, rmsprop, adam, kfac and ekfac; otherwise per-sample gradients (``torch.func.vmap``) form W.
Stages solved by the adjoint method (``ocnopt.derivatives.ode.AdjointDerivatives``: Neural ODE
blocks, docs/method.md section 12) give Q_x, Qbar_u, a and the per-sample W (B, r, m) from one
backward solve (``backward_expansion``); W^T k, the feedback and the Gram matrices then come from
that W, without JVPs, VJPs or torch.func transforms through the solver.
The Kronecker statistics of kfac/ekfac are built from the propagated factor (so ``"exact"``
gives the Kronecker factors of the exact GGN). Gauss-Newton only; mu*I is not representable.

On a graph the factor has one block Z_j (B, r, *n_j) per live tensor of the augmented state,
sharing the r columns: a = F_X^T Z' passes carried blocks through and adds f_a^T Z'_z to the
blocks of the step's arguments, s^(i) = sum_j <a_j^(i), dx_j^(i)> over the blocks the player
sees (all of them for ``game="cooperative"``), and the value update acts on every block.

Cost per stage: the order-1 backward pass plus r VJPs (a), one JVP (value correction), one
VJP in the update pass (feedback), and the r x r Gram matrices; memory: the factor (B r n) and
the graph pieces kept until the update pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.modules.module as _module_mod
from torch import Tensor, nn
from torch.func import grad, vmap

from ocnopt.curvature.base import CurvatureModel, Solver, StageStatistics, scalar_arg
from ocnopt.derivatives.linear import LinearDerivatives
from ocnopt.derivatives.ode import AdjointDerivatives
from ocnopt.engine import Feedback, QExpansion, Terminal, Trajectory, ValueFunction, bound_blocks
from ocnopt.graph import Graph
from ocnopt.losses import Loss
from ocnopt.stages import Stage

from .autograd import GraphBackend, _vjp, kronecker_statistics, psd_sqrt_factor, sublayer_statistics

TERMINALS = ("empirical", "exact", "mc")
#: the terminal factor whose propagation gives the Kronecker statistics of each fisher_type
TERMINAL_OF_FISHER = {"type-2": "exact", "mc": "mc", "empirical": "empirical"}



@dataclass
class LowRankValue(ValueFunction):
    """V_X blocks (B, *n_j) and the factor blocks Z_j (B, r, *n_j) with
    V_XX^(i) = Z^(i) Z^(i)T, Z the stacked blocks (shared columns).

    ``rho`` (B,), when known: r = 1 and Z_j^(i) = rho_i V_j^(i) for every block. It holds for
    the empirical terminal factor (Z_T = V_T, rho = 1) and is kept by the recursion: Q_X and
    a = F_X^T Z' are then the same vector-Jacobian products up to rho', the value correction
    a (W^T k) and the factor update a C scale a per sample, and so does the trust bound
    (``value_update``)."""

    V: dict[int, Tensor]
    Zb: dict[int, Tensor]
    rho: Tensor | None = None
    bounded: Tensor | None = None  # share of samples whose V_X correction the trust bound cut

    @property
    def Z(self) -> Tensor:
        """The factor of a single-tensor state (a chain)."""
        (z,) = self.Zb.values()
        return z

    def hessian_block(self, j: int) -> Tensor:
        Z = self.Zb[j].flatten(2)
        return Z.transpose(1, 2) @ Z


@dataclass
class LowRankExpansion(QExpansion):
    a_blocks: dict[int, Tensor] = field(default_factory=dict)  # F_X^T Z' per block of X_t
    next_value: LowRankValue | None = None
    piece: tuple[tuple[Tensor, ...], Tensor] | None = None
    x: Tensor | None = None              # the nominal input of a module step
    ctx: Any = None
    Wk: Tensor | None = None             # W^T k = <Z'_z, f_u k> per sample, (B, r) (``quadratic``)
    rho: Tensor | None = None            # Z' = rho V' per sample (``LowRankValue.rho``)
    W: Tensor | None = None              # f_u^T Z' (B, r, m) where the handler forms it (ODE)

    @property
    def a(self) -> Tensor | None:
        """a = f_x^T Z' of a single-block state (a chain); None where no block is tracked."""
        if not self.a_blocks:
            return None
        (a,) = self.a_blocks.values()
        return a


def parallel_ratio(value: LowRankValue) -> Tensor | None:
    """rho with Z_j = rho V_j per sample (B,), or None where it is not known."""
    return value.rho


def _inner(Z: Tensor, v: Tensor) -> Tensor:
    """<Z[:, c], v> per sample: (B, r, *n), (B, *n) -> (B, r)."""
    if Z.dim() == 3:
        return torch.linalg.vecdot(Z, v.unsqueeze(1))
    return torch.linalg.vecdot(Z.flatten(2), v.reshape(v.shape[0], 1, -1))


def _combine(Z: Tensor, s: Tensor) -> Tensor:
    """sum_c s[:, c] Z[:, c]: (B, r, *n), (B, r) -> (B, *n) (one batched product; r = 1: one
    product per sample)."""
    if Z.shape[1] == 1:
        return Z[:, 0] * s.reshape(s.shape[0], *[1] * (Z.dim() - 2))
    if Z.dim() == 3:
        return (s.unsqueeze(1) @ Z).squeeze(1)
    return (s.unsqueeze(1) @ Z.flatten(2)).reshape(Z.shape[0], *Z.shape[2:])


def _rows_gradient(stage: Stage, a: Tensor, g: Tensor) -> list[Tensor] | None:
    """The control gradient of a stage with exact factor rows (a Linear or convolution) from
    its rows, (sum_{b,p} g_bp a_bp^T, sum_{b,p} g_bp) for (weight, bias), a (B, P, d_in) and
    g (B, P, d_out): the vector-Jacobian product in u without the autograd engine; None for
    a stage with other parameters."""
    g2 = g.flatten(0, 1)
    out = []
    for name, p in zip(stage.param_names, stage.params):
        if name == "weight":
            out.append((g2.T @ a.flatten(0, 1)).reshape(p.shape))
        elif name == "bias":
            out.append(g2.sum(0))
        else:
            return None
    return out


def _plain(module: nn.Module) -> bool:
    """No hooks (the module's or global) and no parametrization: the module computes exactly
    its textbook function, so autograd's backward of it is the closed form below."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module_mod._global_forward_hooks
                or _module_mod._global_forward_pre_hooks or _module_mod._global_backward_hooks
                or _module_mod._global_backward_pre_hooks
                or "parametrizations" in module._modules)  # (no __getattr__ raising)


def _closed_first_order(stage: Stage, traj: Trajectory, V_z: Tensor, B: int, *, control: bool
                        ) -> tuple[list[Tensor | None], list[Tensor] | None] | None:
    """``GraphBackend.first_order`` without the autograd engine for the stages whose backward
    is one or two kernels: ``nn.Linear`` on vectors (f_x^T V' = V' U, sum_i V'_i x_i^T, sum_i
    V'_i), ``nn.ReLU`` and ``nn.Tanh`` (their backward kernels on the output). The same
    kernels on the same operands as autograd's backward of these modules (AddmmBackward,
    MmBackward, ReluBackward, TanhBackward): the same bits. None for any other stage."""
    module = stage.module
    kind = type(module)
    if stage.is_function or kind not in _CLOSED or not _plain(module):
        return None
    (x_leaf,), _ = traj.handles[stage.index]
    if kind is nn.Linear:
        x = traj.states[stage.inputs[0]]
        names = stage.param_names
        if (x.dim() != 2 or names not in (["weight", "bias"], ["weight"])
                or stage.params[0] is not module.weight):
            return None
        Q_x = V_z.mm(stage.params[0].detach()) if x_leaf.requires_grad else None
        if not control:
            return [Q_x], None
        Q_u = [V_z.t().mm(x)] + ([V_z.sum(0)] if len(names) == 2 else [])
        torch._foreach_div_(Q_u, scalar_arg(B, Q_u))  # (one call: g.div_(B)'s bits)
        return [Q_x], Q_u
    if not x_leaf.requires_grad:
        return [None], None if not control else []
    y = traj.states[stage.output]
    if kind is nn.ReLU:
        return [torch.ops.aten.threshold_backward(V_z, y, 0)], None if not control else []
    return [torch.ops.aten.tanh_backward(V_z, y)], None if not control else []


_CLOSED = (nn.Linear, nn.ReLU, nn.Tanh)


def _add(blocks: dict[int, Tensor], j: int, v: Tensor) -> None:
    """blocks[j] += v (the fork rule), without changing a tensor another block holds."""
    blocks[j] = v if j not in blocks else blocks[j] + v


class LowRankBackend(GraphBackend):
    """Order 1 is the autograd backend's backpropagation; order 2 propagates Z."""

    name = "lowrank"
    second_order_capable = True

    def __init__(self, terminal: str = "empirical", mc_samples: int = 1):
        if terminal not in TERMINALS:
            raise ValueError(f"invalid terminal={terminal!r}: accepted {TERMINALS}")
        if not (isinstance(mc_samples, int) and mc_samples >= 1):
            raise ValueError(f"invalid mc_samples={mc_samples!r}: accepted an integer >= 1")
        self.terminal = terminal
        self.mc_samples = mc_samples

    def check_options(self, *, gauss_newton: bool, mu: float, needs_full: bool,
                      psd_clip: bool = True) -> None:
        """Refuses gauss_newton=False, mu > 0, curvature 'full' and psd_clip=False: V_xx is
        kept as the factor Z Z^T, PSD by construction (C C^T is always clipped), so the
        unclipped recursion is not representable; backend 'autograd' honours each of them."""
        if not gauss_newton:
            raise ValueError(f"backend {self.name!r} is Gauss-Newton by construction: "
                             "gauss_newton=False is accepted only by backend 'autograd'")
        if not psd_clip:
            raise ValueError(f"invalid psd_clip=False for backend {self.name!r}: its V_xx = Z Z^T "
                             "is a factor, PSD by construction (C C^T is always clipped), so an "
                             "unclipped V_xx cannot be represented; accepted psd_clip=True (or "
                             "backend 'autograd', which honours psd_clip=False)")
        if mu:
            raise ValueError(f"invalid mu={mu!r} for backend 'lowrank': mu*I is not a low-rank "
                             "term; accepted mu=0 (use backend 'autograd' for mu > 0)")
        if needs_full:
            raise ValueError("curvature 'full' needs E[Q_uu] as a matrix, which backend "
                             "'lowrank' never forms; accepted: sgd, rmsprop, adam, adamw, kfac, "
                             "ekfac (or backend 'autograd')")

    def follow_fisher(self, fisher_type: str, *, given: Mapping[str, object]) -> None:
        if "terminal" not in given:
            self.terminal = TERMINAL_OF_FISHER.get(fisher_type, self.terminal)

    def check_fisher(self, fisher_type: str, *, order: int, explicit: bool) -> None:
        if order != 2 or fisher_type == "empirical":
            return  # order 1: the terminal factor of fisher_type; "empirical": from V_x
        if TERMINAL_OF_FISHER.get(fisher_type) != self.terminal:
            fisher_of = {v: k for k, v in TERMINAL_OF_FISHER.items()}
            accepted = " or ".join(repr(f) for f in sorted({"empirical",
                                                             fisher_of[self.terminal]}))
            raise ValueError(
                f"invalid fisher_type={fisher_type!r} for backend 'lowrank' at order 2 with "
                f"terminal={self.terminal!r}: the Kronecker statistics come from the propagated "
                f"factor Z; accepted fisher_type {accepted} with this terminal (or leave the "
                "terminal out: it then follows fisher_type)")

    # -- second-order interface --------------------------------------------------------------
    def check_second_order(self, graph: Graph, traj: Trajectory, *, need_quu: bool) -> None:
        if need_quu:
            self.check_options(gauss_newton=True, mu=0.0, needs_full=True, psd_clip=True)

    def terminal_value(self, loss: Loss, traj: Trajectory, terminal: Terminal, *,
                       targets: Tensor | None = None, generator: Any = None) -> LowRankValue:
        out = traj.output.detach()
        if self.terminal == "empirical":
            Z = terminal.V_x.unsqueeze(1)
        elif self.terminal == "exact":
            if targets is None:
                raise ValueError("terminal='exact' needs the targets")
            Z = loss.hessian_sqrt(out, targets)
        else:
            Z = torch.stack([loss.sample_gradient(out, generator)
                             for _ in range(self.mc_samples)], 1) / self.mc_samples**0.5
        rho = None
        if self.terminal == "empirical":
            rho = torch.ones(Z.shape[0], dtype=Z.dtype, device=Z.device)
        T = len(traj.states) - 1
        return LowRankValue({T: terminal.V_x}, {T: Z}, rho)

    def expand_stage(self, stage: Stage, traj: Trajectory, value: ValueFunction, *,
                     gauss_newton: bool, need_quu: bool, need_stats: bool, keep: bool = False,
                     stats_from_value: bool = True, skip_u: bool = False) -> LowRankExpansion:
        assert isinstance(value, LowRankValue)
        t = stage.index
        piece = traj.handles[t]
        leaves, out = piece
        z = stage.output
        B = out.shape[0]
        if z not in value.V:  # an output without a value block (a random mask): transparent
            return LowRankExpansion(Q_args=[None] * len(leaves), Q_u=None, Q_X=dict(value.V),
                                    a_blocks=dict(value.Zb), next_value=value, piece=piece,
                                    rho=value.rho)
        V_z, Z = value.V[z], value.Zb[z]
        stats = None
        if need_stats:
            stats = kronecker_statistics(stage, leaves[0], V_z, Z if stats_from_value else None) \
                if stage.kronecker else StageStatistics()
        rho = parallel_ratio(value)
        if isinstance(stage.derivatives, AdjointDerivatives):  # one backward solve: Q_x, a, W
            return self._expand_adjoint(stage, traj, value, stats, rho)
        a_args: list[Tensor | None] = [None] * len(leaves)
        if rho is None:
            a_args = [self._vjp_columns(x, out, Z) if x.requires_grad else None for x in leaves]
        closed = _closed_first_order(stage, traj, V_z, B, control=not skip_u)
        Q_args, Q_u = closed if closed is not None else self.first_order(
            stage, piece, V_z, B, retain=True, control=not skip_u)
        if rho is not None:  # f_x^T (rho V'_z)
            a_args = [None if q is None else q.unsqueeze(1) * rho.reshape(B, *[1] * q.dim())
                      for q in Q_args]
        Q_X = {j: v for j, v in value.V.items() if j != z}
        a_X = {j: v for j, v in value.Zb.items() if j != z}
        for j, q, a in zip(stage.inputs, Q_args, a_args):
            if q is not None:
                _add(Q_X, j, q)
                _add(a_X, j, a)  # type: ignore[arg-type]
        x = traj.states[stage.inputs[0]] if not stage.is_function else None
        return LowRankExpansion(Q_args=Q_args, Q_u=Q_u, stats=stats, Q_X=Q_X, a_blocks=a_X,
                                next_value=value, piece=piece, x=x, ctx=traj.contexts[t],
                                rho=rho)

    @staticmethod
    def _expand_adjoint(stage: Stage, traj: Trajectory, value: LowRankValue,
                        stats: StageStatistics | None, rho: Tensor | None) -> LowRankExpansion:
        """A stage solved by the adjoint method (``AdjointDerivatives``, an ODE block): Q_x,
        Qbar_u, a = f_x^T Z' and the per-sample W = f_u^T Z' from its one backward solve."""
        z, j = stage.output, stage.inputs[0]
        if stats is not None:  # the grid factors of the layers inside (kfac, ekfac)
            stats = sublayer_statistics(stage, traj.states[z], value.V[z])
        cols = stage.derivatives.backward_expansion(  # type: ignore[attr-defined]
            stage.module, traj.states[z], value.V[z], None if rho is not None else value.Zb[z], rho)
        Q_X = {i: v for i, v in value.V.items() if i != z}
        a_X = {i: v for i, v in value.Zb.items() if i != z}
        tracked = traj.tracked[j]
        if tracked:
            _add(Q_X, j, cols.Q_x)
            _add(a_X, j, cols.a)
        return LowRankExpansion(Q_args=[cols.Q_x if tracked else None], Q_u=cols.Q_u, stats=stats,
                                Q_X=Q_X, a_blocks=a_X, next_value=value, piece=traj.handles[stage.index],
                                x=traj.states[j], ctx=traj.contexts[stage.index], rho=rho, W=cols.W)

    @staticmethod
    def _vjp_columns(xin: Tensor, out: Tensor, Z: Tensor) -> Tensor:
        """f_x^T Z[:, c] for every column c: (B, r, *n_in)."""
        cols = [_vjp(out, Z[:, c], (xin,), retain=True)[0] for c in range(Z.shape[1])]
        return torch.stack([torch.zeros_like(xin) if c is None else c for c in cols], 1)

    def _fu_k(self, stage: Stage, exp: LowRankExpansion, k: list[Tensor]) -> Tensor:
        params = ({n: p.detach() for n, p in zip(stage.param_names, stage.params)}
                  if stage.derivatives.jvp_reads_params else {})
        tangent = dict(zip(stage.param_names, k))
        assert exp.x is not None
        return stage.derivatives.param_jvp(stage.module, params, exp.x, exp.ctx, tangent)

    def quadratic(self, stage: Stage, exp: QExpansion, k: list[Tensor]) -> Tensor:
        """k^T Qbar_uu k = (1/B) sum_i |W^(i)T k|^2 with W^T k = <Z'_z, f_u k>."""
        assert isinstance(exp, LowRankExpansion) and exp.next_value is not None
        z = stage.output
        if exp.W is not None:  # W formed by the handler: W^T k directly
            exp.Wk = torch.einsum("brm,m->br", exp.W, stage.flatten(k))
            assert exp.Q_u is not None
            return exp.Wk.square().sum() / exp.Wk.shape[0]
        fu_k = self._fu_k(stage, exp, k)
        Wk = exp.Wk = _inner(exp.next_value.Zb[z], fu_k)  # value_update reuses it
        if exp.Q_u is None:  # k . Qbar_u = (1/B) sum_i <V'_z^(i), f_u k> (predicted change)
            exp.kQ = (exp.next_value.V[z] * fu_k).sum() / fu_k.shape[0]
        return (Wk * Wk).sum() / Wk.shape[0]

    def feedback(self, stage: Stage, exp: QExpansion, minv: Solver, lr: float, B: int, *,
                 ignore: frozenset[int] = frozenset()) -> Feedback | None:
        """K dX = -lr M^{-1} f_u^T (Z'_z s) / B with s^(i) = sum_j a_j^(i)T dx_j^(i) over the
        blocks not in ``ignore``: one VJP on the kept graph piece with per-sample weighted
        cotangents."""
        assert isinstance(exp, LowRankExpansion) and exp.next_value is not None
        a_X = exp.a_blocks
        blocks = [j for j in a_X if j != 0 and j not in ignore]  # dx_0 = 0
        if not blocks:
            return None
        Z = exp.next_value.Zb[stage.output]
        xin, out = exp.piece  # type: ignore[misc]
        rows = stage.kronecker and stage.derivatives.exact_rows(stage.module)
        x = exp.x
        assert x is not None
        # a Linear on vectors whose model has no closed form on the rows: the gradient directly
        linear_2d = (rows and x.dim() == 2 and isinstance(stage.derivatives, LinearDerivatives)
                     and set(stage.param_names) <= {"weight", "bias"}
                     and type(minv.model).solve_rows is CurvatureModel.solve_rows)

        def K(dX: Mapping[int, Tensor]) -> list[Tensor]:
            s = None
            for j in blocks:
                term = _inner(a_X[j], dX[j])
                s = term if s is None else s + term
            assert s is not None
            s = s * (-lr / B)  # (everything below is linear in s: the factor on (B, r) only)
            if exp.W is not None:  # sum_i W^(i) s^(i) from the handler's W
                return minv(stage.unflatten(torch.einsum("brm,br->m", exp.W, s)))
            solved = minv.cached_feedback(s) if rows else None
            if solved is not None:  # from the Gram matrices' products (value_update)
                return solved
            cot = _combine(Z, s)
            if linear_2d:  # (sum_i cot_i x_i^T, sum_i cot_i): the rows are x and cot
                return minv([cot.T @ x if name == "weight" else cot.sum(0)
                             for name in stage.param_names])
            if rows:  # the curvature model's closed form on the rows, if it has one
                d = stage.derivatives
                a_rows = d.kfac_input(stage.module, x)
                g_rows = d.kfac_output(stage.module, cot.unsqueeze(1))[:, 0]
                solved = minv.solve_rows(a_rows, g_rows)
                if solved is not None:
                    return solved
                g = _rows_gradient(stage, a_rows, g_rows)
                if g is not None:
                    return minv(g)
            g = [torch.zeros_like(p) if v is None else v
                 for v, p in zip(_vjp(out, cot, stage.params, retain=True), stage.params)]
            return minv(g)

        return Feedback(K, blocks)

    def value_update(self, stage: Stage, exp: QExpansion, value: ValueFunction,
                     minv: Solver | None, lr: float, B: int, *, value_correction: bool,
                     mu: float, clip: bool, trust: float | None = None) -> LowRankValue:
        assert isinstance(exp, LowRankExpansion)
        Q_X, a_X = exp.Q_X, exp.a_blocks
        rho = exp.rho
        if not (value_correction and minv is not None) or not Q_X:
            return LowRankValue(dict(Q_X), dict(a_X), rho)
        Zn = exp.next_value.Zb[stage.output]  # type: ignore[union-attr]
        if exp.Wk is not None and minv.solves_direction(exp.Q_u):
            Wk = exp.Wk  # the policy's k is -lr M^-1 Qbar_u: W^T k is known (quadratic)
        elif exp.W is not None:
            Wk = torch.einsum("brm,m->br", exp.W, stage.flatten([v.mul(-lr) for v in minv(exp.Q_u)]))
        else:
            Wk = _inner(Zn, self._fu_k(stage, exp, minv(exp.Q_u))).mul_(-lr)  # (f_u linear)
        S = self.gram(stage, exp, minv)
        if rho is not None:  # r = 1, a = rho' Q_X: every update is a per-sample scalar
            kappa = rho * Wk.reshape(-1)  # V_X = Q_X (1 + kappa); the trust bound: |kappa| <= trust
            bounded = None
            if trust is not None:
                bounded = kappa.abs().gt_(trust).mean()  # (gt_ writes 1.0 / 0.0 in place)
                kappa.clamp_(-trust, trust)
            c = torch.rsub(S.reshape(-1), 1, alpha=lr / B).clamp_min_(0).sqrt_()  # (1 - lr/B S)^(1/2)
            one_k = kappa.add_(1)
            rc = rho * c
            V, Zb = {}, {}
            cols: dict[int, tuple[Tensor, Tensor]] = {}  # (rho c, 1 + kappa) shaped per dim
            for j, q in Q_X.items():
                d = q.dim()
                if d not in cols:
                    view = (-1, *[1] * (d - 1))
                    cols[d] = (rc.reshape(view), one_k.reshape(view))
                rc_d, one_d = cols[d]
                Zb[j] = (q * rc_d).unsqueeze(1)
                V[j] = q * one_d
            safe = trust is not None and trust < 1  # 1 + kappa >= 1 - trust > 0: no check
            new_rho = rc / one_k if safe or bool((one_k != 0).all()) else None
            return LowRankValue(V, Zb, new_rho, bounded)
        keys = list(Q_X)
        corrected = [Q_X[j] + _combine(a_X[j], Wk) for j in keys]
        bounded = None
        if trust is not None:
            out, bounded = bound_blocks([Q_X[j] for j in keys], corrected, trust)
            V = dict(zip(keys, out))
        else:
            V = dict(zip(keys, corrected))
        r = S.shape[-1]
        eye = torch.eye(r, dtype=S.dtype, device=S.device)
        C = psd_sqrt_factor(eye - (lr / B) * S)
        Zb = {j: torch.einsum("bcn,bcd->bdn", a.flatten(2), C).reshape(a.shape)
              for j, a in a_X.items()}
        return LowRankValue(V, Zb, bounded=bounded)

    def gram(self, stage: Stage, exp: LowRankExpansion, minv: Solver) -> Tensor:
        """Per-sample W^T M^{-1} W (B, r, r): the curvature model's closed form for Kronecker
        stages, else per-sample gradients formed explicitly by torch.func.vmap."""
        if exp.W is not None:  # W formed by the handler (stages solved by the adjoint method)
            MW = stage.flatten(minv(stage.unflatten(exp.W)), lead=2)
            return torch.einsum("bcm,bdm->bcd", exp.W, MW)
        Z = exp.next_value.Zb[stage.output]  # type: ignore[union-attr]
        x = exp.x
        assert x is not None
        if stage.kronecker:
            d = stage.derivatives
            st = exp.stats  # the statistics' input rows are those of x: no second unfold
            rows = st.a if st is not None and st.a is not None else d.kfac_input(stage.module, x)
            if (exp.rho is not None and st is not None and st.gradient_rows and st.g is not None
                    and st.gG is not None):  # Z' rows = rho V'_x rows: Z' G^-1 = rho (g G^-1)
                scale = exp.rho.reshape(-1, *[1] * (st.g.dim() - 1))
                g = st.g * scale
                minv.cache["gG"] = (g, st.gG * scale)
            else:
                g = d.kfac_output(stage.module, Z)
            S = minv.gram(rows, g)
            if S is not None:
                return S
        closed = stage.derivatives.per_sample_param_grads(stage.module, stage.param_names, x,
                                                          exp.ctx, Z)
        if closed is not None:  # the layer's closed form (B, r, *shape) per parameter
            W = stage.flatten(closed, lead=2)
            MW = stage.flatten(minv(closed), lead=2)
            return torch.einsum("bcm,bdm->bcd", W, MW)
        params = tuple(p.detach() for p in stage.params)
        names = stage.param_names
        cdim = 0 if isinstance(exp.ctx, Tensor) else None

        def psi(ps: tuple[Tensor, ...], xi: Tensor, ci: Any, zi: Tensor) -> Tensor:
            c = ci.unsqueeze(0) if cdim == 0 else ci
            y = stage.functional(dict(zip(names, ps)), xi.unsqueeze(0), c)
            return (y.squeeze(0) * zi).sum()

        try:
            per_sample = vmap(vmap(grad(psi), in_dims=(None, None, None, 0)),
                              in_dims=(None, 0, cdim, 0))(params, x, exp.ctx, Z)  # (B, r, *shape)
        except RuntimeError as err:
            if "random" not in str(err):
                raise
            raise ValueError(
                f"{stage} draws random numbers in training mode (dropout or stochastic depth "
                "inside the block), which its per-sample gradients at order 2 (torch.func.vmap) "
                "cannot replay: put that block in eval mode, or train at order 1") from err
        W = stage.flatten(list(per_sample), lead=2)
        MW = stage.flatten(minv(list(per_sample)), lead=2)
        return torch.einsum("bcm,bdm->bcd", W, MW)
