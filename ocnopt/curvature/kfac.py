"""K-FAC: M = (A + damping I) (x) (G + damping I) per Kronecker stage (docs/method.md section 4).

A = E[a a^T] over samples and weight-sharing positions (divided by P), G = E[g g^T] summed
over positions and factor columns (curvlinops' "expand" convention), both running averages
updated every ``stat_every`` steps; the damped inverses are recomputed every ``inv_every``
steps in float64 (Cholesky, eigen-decomposition as fallback), keeping the previous inverses if
both fail; with ``inv_dtype="factor"`` the Cholesky runs in the factors' own dtype (float32
for a float32 model, as curvlinops and kfac-pytorch), redone in float64 where it fails.
Weight and bias are preconditioned separately: the weight by G^-1 X A^-1, the bias by G^-1
(curvlinops' ``separate_weight_and_bias=True``). Only stages with Kronecker structure (Linear,
Conv1d, Conv2d) carry a control among the supported layers.
With ``fisher_type="empirical"`` and the MSE loss, G is the covariance of the gradients of the
per-sample loss phi = mean_k (x_k - y_k)^2, which is exactly 1/C times curvlinops' G (and EKFAC
eigenvalue corrections), C the size of the output's last dimension (its features), because
curvlinops multiplies the mean-reduced ``MSELoss`` by sqrt(C) before taking gradients; A, and
G for the type-2 Fisher or the empirical cross-entropy Fisher, equal curvlinops' factors.
Stages with a control but no Kronecker factors (norm affine parameters, embeddings, PReLU,
...) use the diagonal fallback of ``curvature/fallback.py``: M = diag(D) + damping with D a
running average of Qbar_u^2 (kfac and ekfac alike), and so do Kronecker stages whose factor
side d_in or d_out exceeds the hyper-parameter ``kfac_max_dim`` (None: no limit), the usual
K-FAC practice for huge layers (a 25088-input Linear's A alone is 2.5 GB in float32).
A stage that holds Kronecker layers without being one (an ODE block: ``sublayer_views``)
preconditions each of them with its own factors (``StageStatistics.sublayers``: averaged over
the block's time grid, docs/method.md section 12), its head state being its weight's, and its
other parameters with the diagonal fallback.

Memory guard: before any factor is allocated, ``check_memory`` estimates per Kronecker stage
(d_in^2 + d_out^2) entries for the factors, as many for their inverses (eigenbases for
ekfac), in the parameter's dtype, plus the float64 workspace of the larger side's inversion
(2 d^2 entries of 8 bytes), and raises ``MemoryBudgetError`` over ``memory_budget``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..distributed import NO_COMM, Collective
from ..stages import Stage
from .base import (
    CurvatureModel,
    StageStatistics,
    State,
    check_damping,
    check_period,
    check_unit,
    damping_at,
    eigh64,
    require,
    rows_gram,
    weight_bias_gram,
)
from .fallback import DiagonalFallback
from .sgd import sgd_direction

FISHER_TYPES = ("empirical", "type-2", "mc")


class CurvatureWarning(RuntimeWarning):
    """A curvature factor could not be decomposed; the previous one is kept."""


def kronecker_factors(stage: Stage, stats: StageStatistics) -> tuple[Tensor, Tensor]:
    """Batch estimates A = sum a a^T / (B P), G = sum g g^T / B (or the given factors)."""
    if stats.A is not None and stats.G is not None:
        return stats.A, stats.G
    a, g = stats.a, stats.g
    assert a is not None and g is not None
    B, P = a.shape[0], a.shape[1]
    a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])  # (rows, d): one product each
    return torch.mm(a2.T, a2).div_(B * P), torch.mm(g2.T, g2).div_(B)


def _rows_times(rows: Tensor, M: Tensor) -> Tensor:
    """rows (..., d) @ M (d, d) as one matrix product."""
    return (rows.reshape(-1, rows.shape[-1]) @ M).reshape(rows.shape)


def ema(old: Tensor | None, new: Tensor, decay: float) -> Tensor:
    """Running average; the first estimate is taken as is (no zero-initialisation bias)."""
    return new if old is None else old.mul(decay).add_(new, alpha=1 - decay)


INV_DTYPES = ("float64", "factor")


def damped_inverse(M: Tensor, damping: float, inv_dtype: str = "float64") -> Tensor | None:
    """(M + damping I)^{-1}: Cholesky of 0.5 (M + M^T) + damping I (3-4x faster than an
    eigen-decomposition) in float64, or with ``inv_dtype="factor"`` in M's own dtype
    (curvlinops' and kfac-pytorch's practice: float32 for a float32 model, 2-3x cheaper), where
    a Cholesky that fails or ends non-finite is redone in float64; in float64, when
    M + damping I is not positive definite, the eigen-decomposition of M with negative
    eigenvalues clipped to 0; None when both fail."""
    dtype = M.dtype if inv_dtype == "factor" else torch.float64
    S = M.to(dtype)
    S = S + S.T
    S.mul_(0.5).diagonal().add_(damping)  # (the entries of 0.5 (M + M^T) + damping I)
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) == 0:
        inv = torch.cholesky_inverse(L)
    elif dtype != torch.float64:
        return damped_inverse(M, damping)
    else:
        eig = eigh64(M)
        if eig is None:
            return None
        evals, evecs = eig
        inv = (evecs / (evals.clamp_min(0) + damping)) @ evecs.T
    if not torch.isfinite(inv).all():
        return damped_inverse(M, damping) if dtype != torch.float64 else None
    return inv.to(M.dtype)


def factor_sides(stage: Stage) -> tuple[int, int]:
    """(d_in, d_out) of a Kronecker stage's weight (d_out, ...): the sides of A and G."""
    w = stage.params[stage.param_names.index("weight")]
    return w.numel() // w.shape[0], w.shape[0]


def factor_bytes(stage: Stage) -> int:
    """The estimate of the module docstring: factors, inverses, float64 inversion workspace."""
    d_in, d_out = factor_sides(stage)
    size = stage.params[0].element_size()
    return 2 * (d_in * d_in + d_out * d_out) * size + 2 * max(d_in, d_out) ** 2 * 8


def sublayer_views(stage: Stage) -> list[tuple[str, Stage, list[int]]]:
    """The Kronecker layers inside a stage that is not one as a whole (an ODE block's field:
    ``StageDerivatives.sublayers``), each as a stage of its own: (name, a view whose control
    is the layer's weight (and bias), the indices of those parameters in ``stage.params``)."""
    if stage.kronecker or stage.shared or not stage.has_control:
        return []
    from ..derivatives import DERIVATIVES

    out = []
    for name, mod in stage.derivatives.sublayers(stage.module).items():
        names = [p for p in ("weight", "bias") if f"{name}.{p}" in stage.param_names]
        if "weight" not in names or type(mod) not in DERIVATIVES:
            continue
        idx = [stage.param_names.index(f"{name}.{p}") for p in names]
        view = Stage(stage.index, f"{stage.name}.{name}", mod, DERIVATIVES[type(mod)], names,
                     [stage.params[i] for i in idx])
        out.append((name, view, idx))
    return out


class KFAC(CurvatureModel):
    name = "kfac"
    #: (step, stage index) -> (state with the new averages, wait for the decomposition), from
    #: ``prefetch`` (data parallel, order 1)
    _pending: dict[tuple[int, int], tuple[State, Callable[[], list[Tensor]] | None]]

    def __init__(self) -> None:
        self._pending = {}
    needs_kronecker = True
    defaults = {"damping": 1e-1, "stat_every": 1, "inv_every": 10, "stat_decay": 0.95,
                "momentum": 0.0, "fisher_type": "empirical", "kfac_max_dim": None,
                "inv_dtype": "float64"}

    @staticmethod
    def kronecker(stage: Stage, hp: dict[str, Any]) -> bool:
        """Whether ``stage`` uses the Kronecker factors: it has them, and their sides are
        within ``kfac_max_dim``."""
        limit = hp.get("kfac_max_dim")
        if limit is None or not stage.kronecker or "weight" not in stage.param_names:
            return stage.kronecker
        return max(factor_sides(stage)) <= limit

    def layers(self, stage: Stage, hp: dict[str, Any]) -> list[tuple[str, Stage, list[int]]]:
        """The Kronecker layers inside ``stage`` (``sublayer_views``) this model preconditions
        with their own factors (sides within ``kfac_max_dim``); the other parameters of the
        stage use the diagonal fallback."""
        if stage.kronecker:
            return []
        return [lv for lv in sublayer_views(stage) if self.kronecker(lv[1], hp)]

    def uses_statistics(self, stage: Stage, hp: dict[str, Any]) -> bool:
        return self.kronecker(stage, hp) or bool(self.layers(stage, hp))

    def fallback_stages(self, stages: Sequence[Stage], hp: dict[str, Any]) -> list[str]:
        if hp.get("kfac_max_dim") is None:  # (every step: none without a limit)
            return []
        return [st.name for st in stages if st.kronecker and not self.kronecker(st, hp)]

    def check_memory(self, stages: Sequence[Stage], hp: dict[str, Any], budget: int) -> None:
        from ..backends.autograd import MemoryBudgetError

        views = [v for st in stages for v in [st] + [lv[1] for lv in sublayer_views(st)]]
        for st in views:
            if not (st.has_control and self.kronecker(st, hp) and "weight" in st.param_names):
                continue
            need = factor_bytes(st)
            if need > budget:
                d_in, d_out = factor_sides(st)
                raise MemoryBudgetError(
                    f"curvature {self.name!r}: layer model.{st.name} ({st}) needs about "
                    f"{need / 2**20:.1f} MiB ({need} bytes) for its Kronecker factors A "
                    f"({d_in}, {d_in}) and G ({d_out}, {d_out}), their inverses and the float64 "
                    f"inversion workspace, over memory_budget={budget / 2**20:.1f} MiB; set "
                    f"kfac_max_dim < {max(d_in, d_out)} (the layer then uses the diagonal "
                    "fallback), raise OCNOpt(memory_budget=...), or use curvature 'adam'")

    def check(self, hp: dict[str, Any]) -> None:
        check_damping(hp)
        check_period(hp, "stat_every")
        check_period(hp, "inv_every")
        check_unit(hp, "stat_decay")
        check_unit(hp, "momentum")
        require(hp["fisher_type"] in FISHER_TYPES, "fisher_type", hp["fisher_type"],
                f"one of {FISHER_TYPES}")
        limit = hp.get("kfac_max_dim")
        require(limit is None or (isinstance(limit, int) and not isinstance(limit, bool)
                                  and limit >= 1),
                "kfac_max_dim", limit, "an integer >= 1 or None (no limit)")
        if "inv_dtype" in self.defaults:
            require(hp.get("inv_dtype") in INV_DTYPES, "inv_dtype", hp.get("inv_dtype"),
                    f"one of {INV_DTYPES}")

    def wants_statistics(self, step: int, hp: dict[str, Any], states: list[State]) -> bool:
        # "A" sits in the head state (the weight's) of each Kronecker layer of the stage
        return step % hp["stat_every"] == 0 or not any("A" in st for st in states)

    # -- statistics and inverses --------------------------------------------------------------
    def _factors(self, stage: Stage, st: State, stats: StageStatistics | None,
                 hp: dict[str, Any], reduced: tuple[Tensor, Tensor] | None = None) -> State:
        """The state with the running averages of A and G updated from ``stats`` (their
        global batch means: ``reduced`` when ``prefetch`` all-reduced them already)."""
        new = dict(st)
        if stats is not None:
            A, G = reduced if reduced is not None else self.comm.mean_symmetric(
                kronecker_factors(stage, stats), tag="statistics")
            new["A"] = ema(st.get("A"), A, hp["stat_decay"])
            new["G"] = ema(st.get("G"), G, hp["stat_decay"])
        return new

    def _due(self, st: State, hp: dict[str, Any], step: int) -> bool:
        """Whether the inverses are recomputed at this step."""
        return step % hp["inv_every"] == 0 or "A_inv" not in st

    def _decomposition(self, stage: Stage, new: State, st: State, hp: dict[str, Any],
                       step: int) -> list[Tensor]:
        """[(A + damping I)^-1, (G + damping I)^-1] of the averages in ``new`` (the previous
        inverse, else a damped diagonal, where an inversion fails)."""
        damping = damping_at(hp, step)
        out = []
        for key in ("A", "G"):
            inv = damped_inverse(new[key], damping, hp.get("inv_dtype", "float64"))
            if inv is None:
                warnings.warn(f"stage {stage.index}: eigen-decomposition of factor {key} "
                              "failed; keeping the previous inverse", CurvatureWarning,
                              stacklevel=5)
                inv = st.get(f"{key}_inv")
                if inv is None:  # nothing to keep: damped diagonal
                    inv = torch.diag(1.0 / (new[key].diagonal().clamp_min(0) + damping
                                            + torch.finfo(new[key].dtype).tiny))
            out.append(inv)
        return out

    def _placeholders(self, new: State) -> list[Tensor]:
        """Buffers shaped like ``_decomposition``'s result (a non-owner's broadcast target)."""
        return [torch.empty_like(new["A"]), torch.empty_like(new["G"])]

    def _finish(self, stage: Stage, st: State, new: State, parts: Sequence[Tensor] | None,
                stats: StageStatistics | None, hp: dict[str, Any], step: int) -> State:
        """The new state from the averages and (when refreshed) the decomposition's parts."""
        if parts is not None:
            new["A_inv"], new["G_inv"] = parts
        return new

    def _refresh(self, stage: Stage, st: State, stats: StageStatistics | None,
                 hp: dict[str, Any], step: int) -> State:
        pending = self._pending.pop((step, stage.index), None)
        if pending is not None:  # started by ``prefetch``: wait for the owner's broadcast
            new, wait = pending
            parts = wait() if wait is not None else None
        else:
            new = self._factors(stage, st, stats, hp)
            parts = self._fresh_parts(stage, new, st, hp, step)
        return self._finish(stage, st, new, parts, stats, hp, step)

    def _fresh_parts(self, stage: Stage, new: State, st: State, hp: dict[str, Any], step: int
                     ) -> list[Tensor] | None:
        """The decomposition of the averages in ``new`` when due (None otherwise): computed
        here, or (split inversions) by the stage's owner and broadcast."""
        if not self._due(st, hp, step):
            return None
        parts = self._decomposition(stage, new, st, hp, step) \
            if self.inverts_here(stage) else self._placeholders(new)
        if self.comm.active and self.split_inversions:
            parts = list(self.comm.broadcast(parts, src=self.comm.owner(stage.index),
                                             tag="inverses"))
        return parts

    def prefetch(self, items: Sequence[tuple[Stage, list[State], StageStatistics | None]],
                 hp: dict[str, Any], step: int) -> None:
        """Data parallel with ``split_inversions``, before the directions of a step (order 1,
        where every player's statistics are known at once): all-reduce every player's A and G
        in one call, then every process decomposes the factors of the stages it owns while the
        broadcasts of the others' are in flight (asynchronous, in stage order on every
        process), so the inversions of different stages run in parallel; ``update`` waits for
        a stage's broadcast when it needs it."""
        self._pending = {}
        if not (self.comm.active and self.split_inversions):
            return
        heads = [(st, states[0], stats) for st, states, stats in items
                 if self.kronecker(st, hp)]
        flat = [f for st, _, stats in heads if stats is not None
                for f in kronecker_factors(st, stats)]
        reduced = iter(self.comm.mean_symmetric(flat, tag="statistics")) if flat else iter(())
        for stage, head, stats in heads:
            pair = (next(reduced), next(reduced)) if stats is not None else None
            new = self._factors(stage, head, stats, hp, reduced=pair)
            wait = None
            if self._due(head, hp, step):
                parts = self._decomposition(stage, new, head, hp, step) \
                    if self.inverts_here(stage) else self._placeholders(new)
                wait = self.comm.broadcast_async(parts, src=self.comm.owner(stage.index),
                                                 tag="inverses")
            self._pending[(step, stage.index)] = (new, wait)

    def inverts_here(self, stage: Stage) -> bool:
        """Whether this process inverts the factors of ``stage``: always on one process or
        with ``split_inversions`` off, else on rank ``stage.index % P`` only (kfac-pytorch's
        distribution of the inversions; the result is broadcast)."""
        comm = self.comm
        return not (comm.active and self.split_inversions) or comm.owner(stage.index) == comm.rank

    def precondition(self, stage: Stage, st: State, v: list[Tensor]) -> list[Tensor]:
        """K-FAC inverse applied to (weight, bias): G^-1 V A^-1 and G^-1 b; tensors may carry
        leading column dimensions (..., *param.shape)."""
        A_inv, G_inv = st["A_inv"], st["G_inv"]
        out = []
        for name, x, p in zip(stage.param_names, v, stage.params):
            lead = x.shape[: x.dim() - p.dim()]
            if name == "weight":
                X = x.reshape(*lead, p.shape[0], -1)
                out.append((G_inv @ X @ A_inv).reshape(x.shape))
            else:
                out.append(x @ G_inv)  # G symmetric: (G^-1 b)^T = b^T G^-1
        return out

    def update(self, stage: Stage, states: list[State], grads: list[Tensor], params: Sequence[Tensor],
               stats: StageStatistics | None, hp: dict[str, Any], step: int
               ) -> tuple[list[State], list[Tensor]]:
        if not self.kronecker(stage, hp):
            layers = self.layers(stage, hp)
            if layers:
                return self._update_layers(stage, layers, states, grads, stats, hp, step)
            return DiagonalFallback.update(stage, states, grads, hp, step)
        head = self._refresh(stage, states[0], stats, hp, step)
        # data parallel with Qbar_u formed (global already): preconditioning it costs no
        # communication, the rows' direction one more all-reduce of the parameter's size
        dirs = None if self.comm.active and grads else \
            self._direction_from_rows(stage, head, stats, hp, self.comm)
        if dirs is None:
            if not grads:
                raise RuntimeError(f"{stage}: Qbar_u was not formed but the direction needs it")
            dirs = self.precondition(stage, head, grads)
        new_states = [head] + [dict(s) for s in states[1:]]
        if hp["momentum"] > 0:
            for i, (s, d) in enumerate(zip(new_states, dirs)):
                dirs[i], buf = sgd_direction(d, s.get("momentum_buffer"), hp["momentum"], 0.0, False)
                s["momentum_buffer"] = buf
        return new_states, dirs

    def update_many(self, stages: Sequence[Stage], states: Sequence[list[State]],
                    grads: Sequence[list[Tensor]], stats: Sequence[StageStatistics | None],
                    hp: dict[str, Any], step: int, *, scratch: bool = False
                    ) -> tuple[list[list[State]], list[list[Tensor]]]:
        """``update`` of every player of an order-1 step: bitwise the default (``update`` per
        stage). A Kronecker stage at a step that neither collects statistics nor inverts (the
        plain steps between refreshes: its state is kept as is) takes G^-1 X A^-1 and G^-1 b
        directly (``precondition``'s two matrix products and one vector product, without
        ``update``'s bookkeeping). Momentum, data parallel (``prefetch``'s pending refreshes)
        and subclasses that change the preconditioner or its state (EKFAC) take the
        default."""
        if (hp["momentum"] > 0 or self.comm.active
                or type(self).precondition is not KFAC.precondition
                or type(self)._finish is not KFAC._finish or type(self)._due is not KFAC._due):
            return super().update_many(stages, states, grads, stats, hp, step, scratch=scratch)
        inv_every = hp["inv_every"]
        out_states: list[list[State]] = []
        out_dirs: list[list[Tensor]] = []
        for stage, st, g, s in zip(stages, states, grads, stats):
            head = st[0] if st else None
            if (s is None and g and head is not None and "A_inv" in head
                    and step % inv_every != 0 and self.kronecker(stage, hp)):
                A_inv, G_inv = head["A_inv"], head["G_inv"]
                dirs = []
                for name, x, p in zip(stage.param_names, g, stage.params):
                    if name == "weight":
                        X = x if x.dim() == 2 else x.reshape(p.shape[0], -1)
                        d = torch.mm(torch.mm(G_inv, X), A_inv)
                        dirs.append(d if x.dim() == 2 else d.reshape(x.shape))
                    else:
                        dirs.append(x @ G_inv)
                out_states.append([dict(x) for x in st])
            else:
                new, dirs = self.update(stage, st, g, stage.params, s, hp, step)
                out_states.append(new)
            out_dirs.append(dirs)
        return out_states, out_dirs

    # -- stages holding Kronecker layers (an ODE block's field, docs/method.md section 12) ------
    def _refresh_layers(self, layers: list[tuple[str, Stage, list[int]]], states: list[State],
                        stats: StageStatistics | None, hp: dict[str, Any], step: int
                        ) -> dict[str, State]:
        """The new head state of each layer from its own factors (``stats.sublayers``)."""
        subs = stats.sublayers if stats is not None and stats.sublayers is not None else {}
        return {name: self._refresh(view, states[idx[0]], subs.get(name), hp, step)
                for name, view, idx in layers}

    def _update_layers(self, stage: Stage, layers: list[tuple[str, Stage, list[int]]],
                       states: list[State], grads: list[Tensor], stats: StageStatistics | None,
                       hp: dict[str, Any], step: int) -> tuple[list[State], list[Tensor]]:
        """Each Kronecker layer inside ``stage`` preconditioned with its own factors (its head
        state is its weight's), the stage's other parameters with the diagonal fallback."""
        if len(grads) != len(states):
            raise RuntimeError(f"{stage}: Qbar_u was not formed but the direction needs it")
        heads = self._refresh_layers(layers, states, stats, hp, step)
        new_states: list[State | None] = [None] * len(states)
        dirs: list[Tensor | None] = [None] * len(states)
        for name, view, idx in layers:
            d = self.precondition(view, heads[name], [grads[i] for i in idx])
            for k, (i, di) in enumerate(zip(idx, d)):
                new = heads[name] if k == 0 else dict(states[i])
                if hp["momentum"] > 0:
                    di, new["momentum_buffer"] = sgd_direction(di, states[i].get("momentum_buffer"),
                                                               hp["momentum"], 0.0, False)
                new_states[i], dirs[i] = new, di
        rest = [i for i in range(len(states)) if dirs[i] is None]
        if rest:
            st_r, d_r = DiagonalFallback.update(stage, [states[i] for i in rest],
                                                [grads[i] for i in rest], hp, step)
            for i, st_i, d_i in zip(rest, st_r, d_r):
                new_states[i], dirs[i] = st_i, d_i
        return new_states, dirs  # type: ignore[return-value]

    def _per_layer(self, stage: Stage, states: list[State], v: list[Tensor], hp: dict[str, Any],
                   inverse: bool) -> list[Tensor]:
        """M^-1 v (``inverse``) or M v for a stage holding Kronecker layers."""
        out: list[Tensor | None] = [None] * len(v)
        for _, view, idx in self.layers(stage, hp):
            sub = [v[i] for i in idx]
            res = self.precondition(view, states[idx[0]], sub) if inverse else \
                self.apply(view, [states[i] for i in idx], sub, hp)
            for i, r in zip(idx, res):
                out[i] = r
        rest = [i for i in range(len(v)) if out[i] is None]
        if rest:
            fb = DiagonalFallback.solve if inverse else DiagonalFallback.apply
            for i, r in zip(rest, fb([states[i] for i in rest], [v[i] for i in rest])):
                out[i] = r
        return out  # type: ignore[return-value]

    def solve(self, stage: Stage, states: list[State], v: list[Tensor], hp: dict[str, Any]) -> list[Tensor]:
        if not self.kronecker(stage, hp):
            if self.layers(stage, hp):
                return self._per_layer(stage, states, v, hp, inverse=True)
            return DiagonalFallback.solve(states, v)
        return self.precondition(stage, states[0], v)

    @staticmethod
    def _rows_cheaper(stage: Stage, hp: dict[str, Any], B: int, P: int) -> bool:
        """The direction from the rows applies: no weight-decay term in Qbar_u, exact rows,
        and B P (d_in^2 + d_out^2 + d_in d_out) < d_in d_out (d_in + d_out)."""
        if hp.get("weight_decay", 0.0) or not stage.derivatives.exact_rows(stage.module) \
                or "weight" not in stage.param_names:
            return False
        w = stage.params[stage.param_names.index("weight")]
        d_out = w.shape[0]
        d_in = w.numel() // d_out
        return B * P * (d_in * d_in + d_out * d_out + d_in * d_out) < d_in * d_out * (d_in + d_out)

    def gradient_unused(self, stage: Stage, hp: dict[str, Any], B: int, P: int, *,
                        gradient_rows: bool) -> bool:
        # the diagonal fallback (no Kronecker factors) reads Qbar_u
        return self.kronecker(stage, hp) and gradient_rows and self._rows_cheaper(stage, hp, B, P)

    @classmethod
    def _direction_from_rows(cls, stage: Stage, st: State, stats: StageStatistics | None,
                             hp: dict[str, Any], comm: Collective = NO_COMM
                             ) -> list[Tensor] | None:
        """G^-1 Qbar_u A^-1 = (g G^-1)^T (a A^-1) / B from the statistics' rows when they are
        the gradient's (empirical Fisher at a statistics step), Qbar_u has no weight-decay term,
        and B P (d_in^2 + d_out^2 + d_in d_out) < d_in d_out (d_in + d_out) (small batches,
        wide layers: the dense products cost more; B the global batch of ``comm``, so that
        every process decides alike, and the local means are made global by ``comm``). Leaves
        a A^-1 in ``stats.aA``."""
        if stats is None or not stats.gradient_rows or stats.a is None or stats.g is None:
            return None
        a, g = stats.a, stats.g[:, 0]
        B, P = a.shape[:2]
        if not cls._rows_cheaper(stage, hp, comm.total(B), P):
            return None
        aA = _rows_times(a, st["A_inv"])
        gG = _rows_times(g, st["G_inv"])
        stats.aA, stats.gG = aA, gG.unsqueeze(1)
        gG = gG.flatten(0, 1)
        out = []
        for name, p in zip(stage.param_names, stage.params):
            if name == "weight":
                out.append((gG.T @ aA.flatten(0, 1)).div_(B).reshape(p.shape))
            else:
                out.append(gG.sum(0).div_(B))
        return list(comm.mean(out, tag="gradient"))  # hook: the local mean -> global

    def direction_is_solve(self, hp: dict[str, Any]) -> bool:
        return hp["momentum"] == 0

    caches_rows = True  # per_sample_gram(..., cache=) keeps a A^-1 and g G^-1 for the feedback

    def per_sample_gram(self, stage: Stage, states: list[State], hp: dict[str, Any], a: Tensor,
                        g: Tensor, cache: dict[str, Any] | None = None) -> Tensor | None:
        """w_c^(i)T M^-1 w_d^(i) for the per-sample control gradients of the rows a (B, P, d_in)
        and g (B, r, P, d_out), in the cheaper of two exact forms:

        - rows: sum_{p,q} (g_cp^T G^-1 g_dq)(a_p^T A^-1 a_q), B P d_in^2 + B P^2 (d_in + r d_out)
          multiply-adds (small P: Linear stages);
        - per-sample gradients W_ic = sum_p g_icp a_ip^T: <W_c, G^-1 W_d A^-1>, B r P d_in d_out
          + B r d_out d_in (d_in + d_out) (many positions: convolutions).

        The bias adds (sum_p g_c)^T G^-1 (sum_p g_d). ``cache`` (a dict) receives what the
        feedback of the same step reuses (``cached_feedback``)."""
        if not (self.kronecker(stage, hp) and stage.derivatives.exact_rows(stage.module)):
            return None
        A_inv, G_inv = states[0]["A_inv"], states[0]["G_inv"]
        B, r, P, d_out = g.shape
        d_in = a.shape[-1]
        by_rows = B * P * d_in * d_in + B * P * P * (d_in + r * d_out)
        by_grads = B * r * (P * d_in * d_out + d_out * d_in * (d_in + d_out))
        if by_grads < by_rows and "weight" in stage.param_names:
            W = (g.transpose(2, 3).reshape(B, r * d_out, P) @ a).reshape(B, r, d_out, d_in)
            MW = G_inv @ (W.reshape(-1, d_in) @ A_inv).reshape(W.shape)
            out = W.reshape(B, r, -1) @ MW.reshape(B, r, -1).transpose(1, 2)  # no layout copy
            gs = g.sum(2) if "bias" in stage.param_names else None
            if gs is not None:
                out = out + torch.einsum("bco,bdo->bcd", gs @ G_inv, gs)
            if cache is not None:
                cache["grads"] = (W, gs)
            return out
        known = cache.get("aA") if cache is not None else None  # from the direction's rows
        aA = known[1] if known is not None and known[0] is a else _rows_times(a, A_inv)
        known = cache.get("gG") if cache is not None else None
        gG = known[1] if known is not None and known[0] is g else _rows_times(g, G_inv)
        if cache is not None:  # the feedback of the same step solves on these rows again
            cache["rows"] = (aA, gG)
        if P == 1 and r == 1:  # one column: per-sample inner products, no batched matmul
            gg = torch.linalg.vecdot(gG.reshape(B, d_out), g.reshape(B, d_out))
            aa = torch.linalg.vecdot(aA.reshape(B, d_in), a.reshape(B, d_in))
            out = gg * aa + gg if "bias" in stage.param_names else gg * aa
            return out.reshape(B, 1, 1)
        if P == 1:  # Linear: (g_c^T G^-1 g_d)(a^T A^-1 a) (+ the bias term), no contraction path
            gg = gG[:, :, 0] @ g[:, :, 0].transpose(1, 2)
            aa = (aA[:, 0] * a[:, 0]).sum(-1).reshape(B, 1, 1)
            return gg * aa + gg if "bias" in stage.param_names else gg * aa
        return weight_bias_gram(
            stage, a, g,
            lambda a, g: rows_gram(gG, g, aA @ a.transpose(1, 2)),
            lambda gs: gG.sum(2) @ gs.transpose(1, 2))

    def cached_feedback(self, stage: Stage, states: list[State], cache: dict[str, Any],
                        s: Tensor) -> list[Tensor] | None:
        """M^-1 sum_{i,c} s_ic w_ic (weight, bias) from what ``per_sample_gram`` left in
        ``cache`` for the same factor rows g: one B P d_in d_out product on the rows
        (g G^-1)^T (a A^-1), or G^-1 (sum s W) A^-1 on the per-sample gradients; None when
        nothing is cached."""
        if "grads" in cache:
            W, gs = cache["grads"]
            A_inv, G_inv = states[0]["A_inv"], states[0]["G_inv"]
            out = []
            for name, p in zip(stage.param_names, stage.params):
                if name == "weight":
                    sW = (s.reshape(1, -1) @ W.reshape(s.numel(), -1)).reshape(W.shape[2:])
                    out.append((G_inv @ sW @ A_inv).reshape(p.shape))
                else:
                    out.append(torch.einsum("bc,bco->o", s, gs) @ G_inv)
            return out
        if "rows" in cache:
            aA, gG = cache["rows"]
            gs = (gG[:, 0] * s.reshape(-1, 1, 1) if gG.shape[1] == 1  # one column: a product
                  else torch.einsum("brpo,br->bpo", gG, s))
            return self.solve_premultiplied_rows(stage, aA, gs)
        return None

    def solve_premultiplied_rows(self, stage: Stage, aA: Tensor, gG: Tensor) -> list[Tensor]:
        """``solve_rows`` on rows already multiplied by the inverses, aA = a A^-1 (B, P, d_in)
        and gG = g G^-1 (B, P, d_out): one product, B P d_in d_out multiply-adds."""
        gG = gG.flatten(0, 1)
        out = []
        for name, p in zip(stage.param_names, stage.params):
            if name == "weight":
                out.append((gG.T @ aA.flatten(0, 1)).reshape(p.shape))
            else:
                out.append(gG.sum(0))
        return out

    def solve_rows(self, stage: Stage, states: list[State], hp: dict[str, Any], a: Tensor,
                   g: Tensor) -> list[Tensor] | None:
        """G^-1 (sum g a^T) A^-1 = (g G^-1)^T (a A^-1): rank <= B P, cheaper than the
        two d^3-sized products when B P < d_in."""
        if not (self.kronecker(stage, hp) and stage.derivatives.exact_rows(stage.module)):
            return None
        A_inv, G_inv = states[0]["A_inv"], states[0]["G_inv"]
        gG = _rows_times(g, G_inv).flatten(0, 1)
        out = []
        for name, p in zip(stage.param_names, stage.params):
            if name == "weight":
                out.append((gG.T @ _rows_times(a, A_inv).flatten(0, 1)).reshape(p.shape))
            else:
                out.append(gG.sum(0))
        return out

    def apply(self, stage: Stage, states: list[State], v: list[Tensor], hp: dict[str, Any]) -> list[Tensor]:
        if not self.kronecker(stage, hp):
            if self.layers(stage, hp):
                return self._per_layer(stage, states, v, hp, inverse=False)
            return DiagonalFallback.apply(states, v)
        # the damped factors whose inverses are in use (diagnostics only: O(d^3))
        G, A = torch.linalg.inv(states[0]["G_inv"]), torch.linalg.inv(states[0]["A_inv"])
        out = []
        for name, x, p in zip(stage.param_names, v, stage.params):
            lead = x.shape[: x.dim() - p.dim()]
            if name == "weight":
                out.append((G @ x.reshape(*lead, p.shape[0], -1) @ A).reshape(x.shape))
            else:
                out.append(x @ G)
        return out
