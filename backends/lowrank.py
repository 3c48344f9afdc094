"""Low-rank Gauss-Newton backend: V_xx^(i) = Z^(i) Z^(i)T propagated by Jacobian products.

SPEC 4 ("low rank"). The factor Z (stored as (B, r, *n): r columns per sample) starts at the
terminal as one of

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
The Kronecker statistics of kfac/ekfac are built from the propagated factor (so ``"exact"``
gives the Kronecker factors of the exact GGN). Gauss-Newton only; mu*I is not representable.

Cost per stage: the order-1 backward pass plus r VJPs (a), one JVP (value correction), one
VJP in the update pass (feedback), and the r x r Gram matrices; memory: the factor (B r n) and
the graph pieces kept until the update pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from ocnopt.curvature.base import Solver
from ocnopt.engine import QExpansion, Terminal, Trajectory, bound_correction_with_share
from ocnopt.losses import Loss
from ocnopt.stages import Stage

from .autograd import GraphBackend, kronecker_statistics, psd_sqrt_factor

TERMINALS = ("empirical", "exact", "mc")
#: the terminal factor whose propagation gives the Kronecker statistics of each fisher_type
TERMINAL_OF_FISHER = {"type-2": "exact", "mc": "mc", "empirical": "empirical"}


@dataclass
class LowRankValue:
    """V_x (B, *n) and the factor Z (B, r, *n) with V_xx^(i) = sum_c Z[i, c] Z[i, c]^T.

    ``rho`` (B,), when known: r = 1 and Z^(i) = rho_i V_x^(i). It holds for the empirical
    terminal factor (Z_T = V_T, rho = 1) and is kept by the recursion: Q_x and a = f_x^T Z' are
    then the same vector-Jacobian product up to rho', the value correction a (W^T k) and the
    factor update a C scale a per sample, and so does the trust bound (``value_update``)."""

    V_x: Tensor
    Z: Tensor
    rho: Tensor | None = None
    bounded: Tensor | None = None  # share of samples whose V_x correction the trust bound cut


def parallel_ratio(value: LowRankValue) -> Tensor | None:
    """rho with Z[:, 0] = rho V_x per sample (B,), or None where it is not known."""
    return value.rho


@dataclass
class LowRankExpansion(QExpansion):
    a: Tensor | None = None              # f_x^T Z', (B, r, *n_in); None at an input without grad
    next_value: LowRankValue | None = None
    piece: tuple[Tensor, Tensor] | None = None
    x: Tensor | None = None
    ctx: Any = None
    Wk: Tensor | None = None             # W^T k = <Z', f_u k> per sample, (B, r) (``quadratic``)
    kQ: Tensor | None = None             # k . Qbar_u = mean_i <V'_x, f_u k> when Q_u is not formed
    rho: Tensor | None = None            # Z' = rho V'_x per sample (``parallel_ratio``)


def _inner(Z: Tensor, v: Tensor) -> Tensor:
    """<Z[:, c], v> per sample: (B, r, *n), (B, *n) -> (B, r)."""
    return torch.einsum("brn,bn->br", Z.flatten(2), v.reshape(v.shape[0], -1))


def _combine(Z: Tensor, s: Tensor) -> Tensor:
    """sum_c s[:, c] Z[:, c]: (B, r, *n), (B, r) -> (B, *n)."""
    return torch.einsum("brn,br->bn", Z.flatten(2), s).reshape(Z.shape[0], *Z.shape[2:])


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

    def check_options(self, *, gauss_newton: bool, mu: float, needs_full: bool) -> None:
        if not gauss_newton:
            raise ValueError("backend 'lowrank' is Gauss-Newton by construction: "
                             "gauss_newton=False is accepted only by backend 'autograd'")
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
    def check_second_order(self, stages: Sequence[Stage], traj: Trajectory, *, need_quu: bool
                           ) -> None:
        if need_quu:
            self.check_options(gauss_newton=True, mu=0.0, needs_full=True)

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
        return LowRankValue(terminal.V_x, Z, rho)

    @staticmethod
    def value_hessian(value: LowRankValue) -> Tensor:
        Z = value.Z.flatten(2)
        return Z.transpose(1, 2) @ Z

    def expand_stage(self, stage: Stage, t: int, traj: Trajectory, value: LowRankValue, *,
                     gauss_newton: bool, need_quu: bool, need_stats: bool, keep: bool = False,
                     stats_from_value: bool = True, skip_u: bool = False) -> LowRankExpansion:
        piece = traj.handles[t]
        xin, out = piece
        B = xin.shape[0]
        Z = value.Z
        stats = None
        if need_stats and stage.kronecker:
            stats = kronecker_statistics(stage, xin, value.V_x, Z if stats_from_value else None)
        rho = parallel_ratio(value)
        a = None
        if xin.requires_grad and rho is None:
            a = self._vjp_columns(xin, out, Z)
        Q_x, Q_u = self.first_order(stage, piece, value.V_x, B, retain=True, control=not skip_u)
        if rho is not None and Q_x is not None and xin.requires_grad:
            a = (Q_x * rho.reshape(B, *[1] * (Q_x.dim() - 1))).unsqueeze(1)  # f_x^T (rho V'_x)
        return LowRankExpansion(Q_x=Q_x, Q_u=Q_u, stats=stats, a=a, next_value=value,
                                piece=piece, x=traj.states[t], ctx=traj.contexts[t], rho=rho)

    @staticmethod
    def _vjp_columns(xin: Tensor, out: Tensor, Z: Tensor) -> Tensor:
        """f_x^T Z[:, c] for every column c: (B, r, *n_in)."""
        cols = [torch.autograd.grad(out, xin, Z[:, c], retain_graph=True)[0]
                for c in range(Z.shape[1])]
        return torch.stack(cols, 1)

    def _fu_k(self, stage: Stage, exp: LowRankExpansion, k: list[Tensor]) -> Tensor:
        params = {n: p.detach() for n, p in zip(stage.param_names, stage.params)}
        tangent = dict(zip(stage.param_names, k))
        assert exp.x is not None
        return stage.derivatives.param_jvp(stage.module, params, exp.x, exp.ctx, tangent)

    def quadratic(self, stage: Stage, exp: LowRankExpansion, k: list[Tensor]) -> Tensor:
        """k^T Qbar_uu k = (1/B) sum_i |W^(i)T k|^2 with W^T k = <Z', f_u k>."""
        assert exp.next_value is not None
        fu_k = self._fu_k(stage, exp, k)
        Wk = exp.Wk = _inner(exp.next_value.Z, fu_k)  # value_update reuses it
        if exp.Q_u is None:  # k . Qbar_u = (1/B) sum_i <V'_x^(i), f_u k> (predicted change)
            exp.kQ = (exp.next_value.V_x * fu_k).sum() / fu_k.shape[0]
        return Wk.square().sum() / Wk.shape[0]

    def feedback(self, stage: Stage, exp: LowRankExpansion, minv: Solver, lr: float, B: int
                 ) -> Callable[[Tensor], list[Tensor]] | None:
        """K dx = -lr M^{-1} f_u^T (Z' s) / B with s^(i) = a^(i)T dx^(i): one VJP on the kept
        graph piece with per-sample weighted cotangents."""
        if exp.a is None:  # stage 0: dx_0 = 0
            return None
        a, Z = exp.a, exp.next_value.Z  # type: ignore[union-attr]
        xin, out = exp.piece  # type: ignore[misc]
        rows = stage.kronecker and stage.derivatives.exact_rows(stage.module)
        x = exp.x
        assert x is not None

        def K(dx: Tensor) -> list[Tensor]:
            s = _inner(a, dx)
            solved = minv.cached_feedback(s) if rows else None
            if solved is not None:  # from the Gram matrices' products (value_update)
                return [v.mul(-lr / B) for v in solved]
            cot = _combine(Z, s)
            if rows:  # the curvature model's closed form on the rows, if it has one
                d = stage.derivatives
                solved = minv.solve_rows(d.kfac_input(stage.module, x),
                                         d.kfac_output(stage.module, cot.unsqueeze(1))[:, 0])
                if solved is not None:
                    return [v.mul(-lr / B) for v in solved]
            g = torch.autograd.grad(out, stage.params, cot, retain_graph=True)
            return [v.mul(-lr) for v in minv([x / B for x in g])]

        return K

    def value_update(self, stage: Stage, exp: LowRankExpansion, value: LowRankValue,
                     minv: Solver | None, lr: float, B: int, *, value_correction: bool,
                     mu: float, clip: bool, trust: float | None = None) -> LowRankValue:
        V_x, a = exp.Q_x, exp.a
        if a is None or V_x is None:
            raise RuntimeError(f"{stage}: the value at the network input was not recorded; "
                               "run the nominal pass with input_value=True")
        rho = exp.rho
        if not (value_correction and minv is not None):
            return LowRankValue(V_x, a, rho)
        Zn = value.Z
        if exp.Wk is not None and minv.solves_direction(exp.Q_u):
            Wk = exp.Wk  # the policy's k is -lr M^-1 Qbar_u: W^T k is known (quadratic)
        else:
            Wk = _inner(Zn, self._fu_k(stage, exp, [v.mul(-lr) for v in minv(exp.Q_u)]))
        S = self.gram(stage, exp, minv)
        if rho is not None:  # r = 1, a = rho' Q_x: every update is a per-sample scalar
            kappa = rho * Wk[:, 0]  # V_x = Q_x (1 + kappa); the trust bound is |kappa| <= trust
            bounded = None
            if trust is not None:
                bounded = (kappa.abs() > trust).to(kappa.dtype).mean()
                kappa = kappa.clamp(-trust, trust)
            c = (1 - (lr / B) * S[:, 0, 0]).clamp_min(0).sqrt()
            view = (-1, *[1] * (V_x.dim() - 1))
            one_k = 1 + kappa
            Z = (V_x * (rho * c).reshape(view)).unsqueeze(1)
            V_x = V_x * one_k.reshape(view)
            safe = trust is not None and trust < 1  # 1 + kappa >= 1 - trust > 0: no check
            new_rho = rho * c / one_k if safe or bool((one_k != 0).all()) else None
            return LowRankValue(V_x, Z, new_rho, bounded)
        bounded = None
        if trust is not None:
            V_x, bounded = bound_correction_with_share(V_x, V_x + _combine(a, Wk), trust)
        else:
            V_x = V_x + _combine(a, Wk)
        r = S.shape[-1]
        eye = torch.eye(r, dtype=S.dtype, device=S.device)
        C = psd_sqrt_factor(eye - (lr / B) * S)
        Z = torch.einsum("bcn,bcd->bdn", a.flatten(2), C).reshape(a.shape)
        return LowRankValue(V_x, Z, bounded=bounded)

    def gram(self, stage: Stage, exp: LowRankExpansion, minv: Solver) -> Tensor:
        """Per-sample W^T M^{-1} W (B, r, r): the curvature model's closed form for Kronecker
        stages, else per-sample gradients formed explicitly by torch.func.vmap."""
        Z = exp.next_value.Z  # type: ignore[union-attr]
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
        params = tuple(p.detach() for p in stage.params)
        names = stage.param_names
        cdim = 0 if isinstance(exp.ctx, Tensor) else None

        def psi(ps: tuple[Tensor, ...], xi: Tensor, ci: Any, zi: Tensor) -> Tensor:
            c = None if ci is None else ci.unsqueeze(0)
            y = stage.functional(dict(zip(names, ps)), xi.unsqueeze(0), c)
            return (y.squeeze(0) * zi).sum()

        per_sample = vmap(vmap(grad(psi), in_dims=(None, None, None, 0)),
                          in_dims=(None, 0, cdim, 0))(params, x, exp.ctx, Z)  # (B, r, *shape)
        W = stage.flatten(list(per_sample), lead=2)
        MW = stage.flatten(minv(list(per_sample)), lead=2)
        return torch.einsum("bcm,bdm->bcd", W, MW)
