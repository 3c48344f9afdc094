"""Curvature models M_t of Q_uu (docs/method.md section 4): small objects with explicit state.

optax-style: ``update`` is a pure function of (state, Qbar_u, statistics, hyper-parameters)
returning the new state and the open-loop direction d with du = -lr * d; it never mutates its
inputs, so the optimizer can drop the new state when a step is not finite. ``solve`` applies
M^{-1} (including damping) to any control-shaped vector: the feedback and value-correction
terms of order 2 use it, and the moment buffers never see those terms (docs/method.md section 4, choice).

State is a list of dicts, one per parameter of the stage (the dicts of
``torch.optim.Optimizer.state``), so ``state_dict()`` round-trips it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..distributed import NO_COMM, Collective
from ..stages import Stage

State = dict[str, Any]


@dataclass
class StageStatistics:
    """What a curvature model needs from one stage's backward pass.

    Kronecker models: a, input-factor rows (B, P, d_in); g, output-factor rows
    (B, r, P, d_out), un-normalised per-sample cotangents (the value gradient for the
    empirical Fisher, propagated terminal factors otherwise);
    A = sum_{b,p} a a^T / (B P) and G = sum_{b,r,p} g g^T / B.
    Full model: Q_uu, the batch mean E_i[Q_uu^(i)] + l_uu, flattened (m, m).
    ``A``/``G`` given (BackPACK backend): the Kronecker factors to use instead of the rows'.
    ``sublayers``: per Kronecker layer inside a stage (an ODE block, docs/method.md section 12).
    """

    a: Tensor | None = None
    g: Tensor | None = None
    Q_uu: Tensor | None = None
    A: Tensor | None = None  # Kronecker factors computed elsewhere (BackPACK): used as given
    G: Tensor | None = None
    #: g holds the per-sample value gradients (r = 1): sum_{b,p} g a^T / B is Qbar_u's weight
    gradient_rows: bool = False
    #: a A^{-1} and g G^{-1} (B, 1, P, d_out) of this step, left by a model that formed them
    #: (shared with the Gram matrices)
    aA: Tensor | None = None
    gG: Tensor | None = None
    #: a stage that is not a Kronecker layer as a whole but holds some (an ODE block's field,
    #: ``StageDerivatives.sublayers``): each layer's factors (A, G given), by its name, and
    #: ``samples()``, which yields the rows (a, g) of every layer per sample of those factors
    #: (per grid time: the factors are their average), for the EKFAC eigenvalue correction
    sublayers: dict[str, StageStatistics] | None = None
    samples: Callable[[], Iterable[dict[str, tuple[Tensor, Tensor]]]] | None = None


class CurvatureModel:
    """A curvature model M of Q_uu for one stage. Subclasses define the arithmetic."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    needs_kronecker: ClassVar[bool] = False
    needs_full: ClassVar[bool] = False  # needs E[Q_uu] from the exact backend
    #: ``per_sample_gram`` takes ``cache=`` and leaves there what ``cached_feedback`` reuses
    caches_rows: ClassVar[bool] = False
    #: data-parallel communication (``ocnopt.distributed``, set by ``OCNOpt``): a model whose
    #: statistics are batch means makes them global with ``comm.mean`` (docs/method.md section 13)
    comm: Collective = NO_COMM
    #: data parallel: invert the factors of stage t on rank t % P only and broadcast them
    #: (False: every process inverts every factor)
    split_inversions: bool = True

    def check(self, hp: dict[str, Any]) -> None:
        """Raise ``ValueError`` for an invalid hyper-parameter (named, with accepted values)."""

    def prefetch(self, items: Sequence[tuple[Stage, list[State], StageStatistics | None]],
                 hp: dict[str, Any], step: int) -> None:
        """Data parallel, order 1: called once per step with every player's (stage, state,
        statistics) before their ``update`` calls, so a model can start its communication for
        all of them at once (K-FAC's split inversions). Default: nothing."""

    def coupled_weight_decay(self, hp: dict[str, Any]) -> bool:
        """Whether weight decay belongs to the objective (l_u = wd*u in Q_u, as torch does for
        SGD/RMSprop/Adam) rather than being applied decoupled (AdamW)."""
        return True

    def wants_statistics(self, step: int, hp: dict[str, Any], states: list[State]) -> bool:
        """Whether this step must deliver ``StageStatistics`` to ``update``."""
        return False

    def uses_statistics(self, stage: Stage, hp: dict[str, Any]) -> bool:
        """Whether ``stage`` ever reads statistics (False: none asked for, whatever
        ``wants_statistics`` says; e.g. a Kronecker model's layer on its diagonal fallback)."""
        return True

    def check_memory(self, stages: Sequence[Stage], hp: dict[str, Any], budget: int) -> None:
        """Refuse, before anything is allocated, a stage whose curvature state would exceed
        ``budget`` bytes (``MemoryBudgetError`` naming the layer, the shapes and the bytes)."""

    def fallback_stages(self, stages: Sequence[Stage], hp: dict[str, Any]) -> list[str]:
        """Names of the stages this model runs on a fallback instead of its own form."""
        return []

    def update(
        self,
        stage: Stage,
        states: list[State],
        grads: list[Tensor],
        params: Sequence[Tensor],
        stats: StageStatistics | None,
        hp: dict[str, Any],
        step: int,
    ) -> tuple[list[State], list[Tensor]]:
        raise NotImplementedError

    def update_many(
        self,
        stages: Sequence[Stage],
        states: Sequence[list[State]],
        grads: Sequence[list[Tensor]],
        stats: Sequence[StageStatistics | None],
        hp: dict[str, Any],
        step: int,
        *,
        scratch: bool = False,
    ) -> tuple[list[list[State]], list[list[Tensor]]]:
        """``update`` of several stages at once (order 1: every player of a step), per stage
        (new states, directions d; the caller moves u <- u - lr d). ``scratch``: the
        directions are read once before the next call (the order-1 step), so they may live in
        the model's workspace (``workspace``) or be Qbar_u itself; else each is a tensor the
        caller may keep. The default calls ``update`` per stage; the diagonal models run the
        same arithmetic over all tensors with torch's multi-tensor (``_foreach``) ops when
        they are small (``FOREACH_MAX_NUMEL``), else per tensor into kept workspaces (no
        allocation per step for the temporaries)."""
        out_states, out_dirs = [], []
        for stage, st, g, s in zip(stages, states, grads, stats):
            new, dirs = self.update(stage, st, g, stage.params, s, hp, step)
            out_states.append(new)
            out_dirs.append(dirs)
        return out_states, out_dirs

    def workspace_or_none(self, keep: bool, slot: int, i: int, like: Tensor) -> Tensor | None:
        """``workspace(slot, i, like)`` when ``keep``, else None (an ``out=`` that allocates)."""
        return self.workspace(slot, i, like) if keep else None

    def workspace(self, slot: int, i: int, like: Tensor) -> Tensor:
        """A tensor shaped like ``like`` kept by this model between steps (``slot``: which
        temporary, ``i``: which parameter), for results of ``update_many`` that do not
        outlive the step (temporaries, the scaled steps)."""
        ws: dict[tuple[int, int], Tensor] = self.__dict__.setdefault("_workspace", {})
        t = ws.get((slot, i))
        if t is None or t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
            t = ws[(slot, i)] = torch.empty_like(like)
        return t

    def solve(self, stage: Stage, states: list[State], v: list[Tensor], hp: dict[str, Any]) -> list[Tensor]:
        """M^{-1} v for the current state (no moment buffers). Each tensor of ``v`` may carry
        leading column dimensions: (..., *param.shape)."""
        raise NotImplementedError

    def apply(self, stage: Stage, states: list[State], v: list[Tensor], hp: dict[str, Any]) -> list[Tensor]:
        """M v (the curvature model itself), same shapes as ``solve``; used by diagnostics."""
        raise NotImplementedError

    def gradient_unused(self, stage: Stage, hp: dict[str, Any], B: int, P: int, *,
                        gradient_rows: bool) -> bool:
        """Whether ``update`` will not read Qbar_u's tensors for ``stage`` at a statistics step
        whose rows are the gradient's (``gradient_rows``), with B samples and P positions per
        sample: the backend may then skip forming them (K-FAC's direction from the rows)."""
        return False

    def direction_is_solve(self, hp: dict[str, Any]) -> bool:
        """Whether ``update``'s direction is exactly M^{-1} Qbar_u (no moments, no decoupled
        terms), so the backends may reuse it instead of solving again."""
        return False

    def solve_rows(self, stage: Stage, states: list[State], hp: dict[str, Any], a: Tensor,
                   g: Tensor) -> list[Tensor] | None:
        """M^{-1} applied to the control gradient built from rows, (sum_{b,p} g_bp a_bp^T,
        sum_{b,p} g_bp) for (weight, bias), with a (B, P, d_in) and g (B, P, d_out), when this
        model has a form cheaper than forming the gradient first; else None."""
        return None

    def per_sample_gram(self, stage: Stage, states: list[State], hp: dict[str, Any], a: Tensor,
                        g: Tensor) -> Tensor | None:
        """Closed form of w_c^(i)T M^{-1} w_d^(i) for per-sample, per-column control gradients
        w_c^(i) = (sum_p g_icp a_ip^T, sum_p g_icp) of a Kronecker stage (weight, bias), from
        input rows a (B, P, d_in) and output rows g (B, r, P, d_out): a (B, r, r) tensor, or
        None where this model has no closed form (the backend then forms w explicitly)."""
        return None


    def cached_feedback(self, stage: Stage, states: list[State], cache: dict[str, Any],
                        s: Tensor) -> list[Tensor] | None:
        """M^{-1} sum_{i,c} s_ic w_ic from what ``per_sample_gram`` left in ``cache`` this step
        (models with ``caches_rows``), or None."""
        return None


class Solver:
    """v -> M^{-1} v for one stage with the state of the current step; also exposes the
    model's closed-form per-sample Gram matrices to the backends."""

    def __init__(self, model: CurvatureModel, stage: Stage, states: list[State],
                 hp: dict[str, Any]):
        self.model, self.stage, self.states, self.hp = model, stage, states, hp

        self._known: tuple[list[Tensor] | None, list[Tensor]] | None = None
        self.cache: dict[str, Any] = {}  # products of this step shared between calls

    def remember(self, v: list[Tensor] | None, solved: list[Tensor]) -> None:
        """Record that M^{-1} v = solved (the model's direction), to skip solving again; v is
        None where Qbar_u was not formed (``CurvatureModel.gradient_unused``)."""
        self._known = (v, solved)

    def __call__(self, v: list[Tensor] | None) -> list[Tensor]:
        if self._known is not None and v is self._known[0]:
            return self._known[1]
        if v is None:
            raise RuntimeError("M^-1 Qbar_u was asked for a step that did not form Qbar_u")
        return self.model.solve(self.stage, self.states, v, self.hp)

    def solve_rows(self, a: Tensor, g: Tensor) -> list[Tensor] | None:
        return self.model.solve_rows(self.stage, self.states, self.hp, a, g)

    def gram(self, a: Tensor, g: Tensor) -> Tensor | None:
        if self.model.caches_rows:
            return self.model.per_sample_gram(self.stage, self.states, self.hp, a, g,  # type: ignore[call-arg]
                                              cache=self.cache)
        return self.model.per_sample_gram(self.stage, self.states, self.hp, a, g)

    def cached_feedback(self, s: Tensor) -> list[Tensor] | None:
        """M^{-1} sum_{i,c} s_ic w_ic from the products the Gram matrices of this step left in
        ``cache`` (models with ``caches_rows``), or None."""
        if not (self.model.caches_rows and self.cache):
            return None
        return self.model.cached_feedback(self.stage, self.states, self.cache, s)

    def solves_direction(self, v: list[Tensor] | None) -> bool:
        """Whether the model's direction of this step is exactly M^{-1} v (``remember``)."""
        return self._known is not None and v is self._known[0]


def weight_bias_gram(stage: Stage, a: Tensor, g: Tensor, w_weight: Any, w_bias: Any) -> Tensor:
    """Helper for closed forms: sum over the stage's parameters of the per-sample Gram terms,
    ``w_weight(a, g)`` for "weight" and ``w_bias(g.sum(2))`` for "bias" (each (B, r, r))."""
    out = None
    for name in stage.param_names:
        term = w_weight(a, g) if name == "weight" else w_bias(g.sum(2))
        out = term if out is None else out + term
    assert out is not None
    return out


# ---- validation helpers ---------------------------------------------------------------------
def require(cond: bool, name: str, value: Any, accepted: str) -> None:
    if not cond:
        raise ValueError(f"invalid {name}={value!r}: accepted {accepted}")


def check_nonneg(hp: dict[str, Any], *names: str) -> None:
    for n in names:
        v = hp[n]
        require(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
                n, v, "a finite number >= 0")


def check_unit(hp: dict[str, Any], name: str) -> None:
    v = hp[name]
    require(isinstance(v, (int, float)) and 0.0 <= v < 1.0, name, v, "a number in [0, 1)")


def check_period(hp: dict[str, Any], name: str) -> None:
    v = hp[name]
    require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, v, "an integer >= 1")


def check_damping(hp: dict[str, Any]) -> None:
    d = hp["damping"]
    if callable(d):
        return
    require(isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) and d >= 0,
            "damping", d, "a finite number >= 0 or a callable of the step returning one")


def damping_at(hp: dict[str, Any], step: int) -> float:
    d = hp["damping"]
    value = d(step) if callable(d) else d
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"invalid damping={value!r} returned by the damping callable at step {step}: "
                         "accepted a finite number >= 0")
    return value


def eigh64(M: Tensor) -> tuple[Tensor, Tensor] | None:
    """Eigen-decomposition in float64; None when it fails or is not finite."""
    try:
        evals, evecs = torch.linalg.eigh(M.to(torch.float64))
    except RuntimeError:
        return None
    if not (torch.isfinite(evals).all() and torch.isfinite(evecs).all()):
        return None
    return evals, evecs


Registry = dict[str, Callable[[], CurvatureModel]]


_GRAM_CHUNK = 2**24  # bound on B_chunk * r * d_out * d_in when per-sample gradients are formed


def rows_gram(gL: Tensor, g: Tensor, M: Tensor) -> Tensor:
    """sum_{p,q} (gL_cp . g_dq) M_pq per sample: gL, g (B, r, P, d_out), M (B, P, P) -> (B, r, r),
    as two batched products (a multi-operand einsum would search a contraction path per call)."""
    B, r, P, d = g.shape
    Y = (M.unsqueeze(1) @ g).reshape(B, r, P * d)  # sum_q M_pq g_dq: (B, r, P, d_out)
    return gL.reshape(B, r, P * d) @ Y.transpose(1, 2)


def diagonal_weight_gram(a: Tensor, g: Tensor, D: Tensor) -> Tensor:
    """sum_{o,i} W_co W_do / D_oi for the per-sample weight gradients W_c = sum_p g_cp a_p^T of
    rows a (B, P, d_in) and g (B, r, P, d_out), D shaped like the weight (d_out, ...): (B, r, r).
    Without weight sharing (P = 1) no per-sample gradient is formed:
    sum_o g_co g_do t_o with t_o = sum_i a_i^2 / D_oi."""
    Dinv = 1.0 / D.reshape(D.shape[0], -1)
    if a.shape[1] == 1:
        g0 = g[:, :, 0]
        t = a[:, 0].square() @ Dinv.T
        return (g0 * t.unsqueeze(1)) @ g0.transpose(1, 2)
    B, r, _, d_out = g.shape
    step = max(1, _GRAM_CHUNK // max(1, r * d_out * a.shape[-1]))
    parts = []
    for lo in range(0, B, step):
        w = (g[lo:lo + step].transpose(2, 3) @ a[lo:lo + step].unsqueeze(1)).flatten(2)
        parts.append((w * Dinv.reshape(1, 1, -1)) @ w.transpose(1, 2))
    return torch.cat(parts)


def diagonal_gram(stage: Stage, a: Tensor, g: Tensor, D: dict[str, Tensor]) -> Tensor:
    """sum_params w_c^T D^{-1} w_d for per-sample gradients given by rows (see
    ``CurvatureModel.per_sample_gram``): ``diagonal_weight_gram`` plus the bias term. One
    column without weight sharing (r = P = 1, a Linear stage at order 2 with the empirical
    factor): sum_o g_o^2 (t_o + 1 / D_bias,o), t_o = sum_i a_i^2 / D_oi, in one contraction."""
    B, r, P, d_out = g.shape
    names = list(stage.param_names)
    if r == 1 and P == 1 and names in (["weight", "bias"], ["weight"]):
        t = a.reshape(B, -1).square() @ D["weight"].reshape(d_out, -1).reciprocal().T
        if "bias" in D:
            t = t.add_(D["bias"].reciprocal())
        return torch.linalg.vecdot(g.reshape(B, d_out).square(), t).reshape(B, 1, 1)
    return weight_bias_gram(stage, a, g, lambda a, g: diagonal_weight_gram(a, g, D["weight"]),
                            lambda gs: (gs / D["bias"]) @ gs.transpose(1, 2))


def flatten_stages(states: Sequence[list[State]], grads: Sequence[list[Tensor]]
                   ) -> tuple[list[State], list[Tensor], list[int]]:
    """The states and gradients of several stages as two flat lists, and the count per stage
    (``split_stages`` undoes it)."""
    return ([s for ss in states for s in ss], [g for gs in grads for g in gs],
            [len(gs) for gs in grads])


def split_stages(flat: Sequence[Any], counts: Sequence[int]) -> list[list[Any]]:
    """A flat list back into one list per stage (``counts`` from ``flatten_stages``)."""
    out, i = [], 0
    for n in counts:
        out.append(list(flat[i:i + n]))
        i += n
    return out


#: the multi-tensor path of ``update_many`` takes the tensors of a step up to this many
#: entries in all (there Python per operation dominates); larger ones go per tensor into kept
#: workspaces (there allocating and first touching the temporaries dominates)
FOREACH_MAX_NUMEL = 1 << 16


def foreach_ready(grads: Sequence[Tensor]) -> bool:
    """Whether the multi-tensor path applies: some tensors, all real floating point (the
    ``_foreach`` ops give the same elementwise results as the per-tensor ones), at most
    ``FOREACH_MAX_NUMEL`` entries in all."""
    return (bool(grads) and all(g.is_floating_point() for g in grads)
            and sum(g.numel() for g in grads) <= FOREACH_MAX_NUMEL)


_SCALARS: dict[tuple[float, torch.dtype], Tensor] = {}


def scalar_arg(value: float, ts: Sequence[Tensor]) -> float | Tensor:
    """``value`` as the scalar argument of a multi-tensor op over ``ts``: on the CPU a 0-dim
    tensor of their dtype (kept), elsewhere (or for mixed dtypes) the number itself. The
    results are the same; the CPU ``_foreach`` ops wrap a Python number into a new tensor for
    every tensor of the list (about 1.5 us each: 15 us of a 10-tensor op), a 0-dim tensor
    they take as it is."""
    t0 = ts[0]
    if t0.device.type != "cpu":
        return value
    dtype = t0.dtype
    for t in ts:
        if t.dtype is not dtype:
            return value
    key = (value, dtype)
    s = _SCALARS.get(key)
    if s is None:
        if len(_SCALARS) > 256:  # (bias corrections change every step)
            _SCALARS.clear()
        s = _SCALARS[key] = torch.full((), value, dtype=dtype)
    return s


def foreach_add_scalar_(ts: Sequence[Tensor], value: float) -> None:
    """t += value for every t of ``ts`` (``torch._foreach_add_``; on the CPU with the 0-dim
    tensor as a list, the form without a wrapped number per tensor)."""
    ts = list(ts)
    s = scalar_arg(value, ts)
    if isinstance(s, Tensor):
        torch._foreach_add_(ts, [s] * len(ts))
    else:
        torch._foreach_add_(ts, s)


def buffer_or_zeros(state: State, key: str, like: Tensor) -> Tensor:
    """state[key], or zeros shaped like ``like`` when absent. Allocates only then:
    ``state.get(key, torch.zeros_like(g))`` allocates and fills a parameter-sized tensor at
    every step, which costs a page-faulting allocation per buffer and step."""
    buf = state.get(key)
    return torch.zeros_like(like) if buf is None else buf


class DiagonalCurvature(CurvatureModel):
    """M = diag(D) with D = ``_denominator(state)`` per parameter (rmsprop, adam)."""

    def _denominator(self, state: State, hp: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    def denominator(self, state: State, hp: dict[str, Any]) -> Tensor:
        """``_denominator(state, hp)``, computed once per state dict and setting (states are
        never mutated: order 2 asks for D several times per stage, in M^-1 of the direction,
        the Gram matrices, the feedback and the value correction). Read only: the tensor is
        shared between the calls. The kept values are dropped when a new step begins
        (``new_step``)."""
        cache: dict[Any, tuple[State, Tensor]] = self.__dict__.setdefault("_denominators", {})
        key = self._denominator_key(state, hp)
        hit = cache.get(key)
        if hit is not None and hit[0] is state:
            return hit[1]
        den = self._denominator(state, hp)
        cache[key] = (state, den)  # (holding the state: its id is not reused meanwhile)
        return den

    @staticmethod
    def _denominator_key(state: State, hp: dict[str, Any]) -> tuple[Any, ...]:
        betas = hp.get("betas")
        return (id(state), hp["eps"], None if betas is None else tuple(betas), hp.get("amsgrad"),
                hp.get("centered"))

    def keep_denominator(self, state: State, hp: dict[str, Any], den: Tensor) -> None:
        """Record ``_denominator(state, hp)`` = ``den`` (computed by ``update`` with the same
        operations), so ``denominator`` does not compute it again this step."""
        cache: dict[Any, tuple[State, Tensor]] = self.__dict__.setdefault("_denominators", {})
        cache[self._denominator_key(state, hp)] = (state, den)

    def new_step(self, step: int) -> None:
        """Drop the denominators kept for earlier steps (``denominator``)."""
        if self.__dict__.get("_denominators_step") != step:
            self.__dict__["_denominators"] = {}
            self.__dict__["_denominators_step"] = step

    def solve(self, stage: Stage, states: list[State], v: list[Tensor], hp: dict[str, Any]) -> list[Tensor]:
        return [x / self.denominator(st, hp) for st, x in zip(states, v)]

    def apply(self, stage: Stage, states: list[State], v: list[Tensor], hp: dict[str, Any]) -> list[Tensor]:
        return [x * self.denominator(st, hp) for st, x in zip(states, v)]

    def per_sample_gram(self, stage: Stage, states: list[State], hp: dict[str, Any], a: Tensor,
                        g: Tensor) -> Tensor | None:
        """w_c^T D^{-1} w_d with D the diagonal of M (weight (d_out, d_in), bias (d_out,))."""
        if stage.kronecker and stage.derivatives.exact_rows(stage.module):
            D = {n: self.denominator(st, hp) for n, st in zip(stage.param_names, states)}
            return diagonal_gram(stage, a, g, D)
        return None
