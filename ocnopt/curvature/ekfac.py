"""EKFAC: K-FAC's eigenbasis with the diagonal re-estimated in that basis (docs/method.md section 4).

M = (Q_G (x) Q_A) diag(s + damping) (Q_G (x) Q_A)^T with Q_A, Q_G the eigenvectors of the
K-FAC factors (refreshed every ``inv_every`` steps, in float64, keeping the previous basis if a
decomposition fails) and s the running average of E_i[(Q_G^T Gw_i Q_A)^2], Gw_i the per-sample
(per factor column) weight gradient sum_p g_ip a_ip^T. The bias uses Q_G alone. When the basis
changes, s restarts from the current batch's estimate in the new basis (choice: the old
diagonal lives in the old basis), so statistics are also collected at every basis refresh.
Damping is added to the corrected eigenvalues ("exact" damping, as curvlinops' EKFAC inverse).
Stages without Kronecker factors use kfac's diagonal fallback (``curvature/fallback.py``).
Kronecker layers inside an ODE block's field use their factors averaged over the block's time
grid, and s the average over the grid times of each time's estimate (docs/method.md section 12).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from einops import einsum
from torch import Tensor

from ..distributed import NO_COMM, Collective
from ..stages import Stage
from .base import StageStatistics, State, damping_at, diagonal_gram, eigh64
from .fallback import DiagonalFallback
from .kfac import KFAC, CurvatureWarning, ema

_CHUNK_ELEMENTS = 2**24  # bound on B_chunk * r * d_out * d_in for per-sample gradients


def eigenbasis_scales(stats: StageStatistics, QA: Tensor, QG: Tensor) -> tuple[Tensor, Tensor]:
    """Batch estimates of the corrected eigenvalues for (weight, bias):
    s_w = mean_b sum_r (Q_G^T Gw_br Q_A)^2 and s_b = mean_b sum_r (Q_G^T sum_p g_brp)^2."""
    assert stats.a is not None and stats.g is not None
    a = stats.a @ QA          # (B, P, d_in)
    g = stats.g @ QG          # (B, r, P, d_out)
    B, r, P, d_out = g.shape
    if P == 1:  # (g_o a_i)^2 = g_o^2 a_i^2: no per-sample gradient needed
        s_w = einsum(g[:, :, 0].square(), a[:, 0].square(), "b r o, b i -> o i") / B
    else:
        per_chunk = max(1, _CHUNK_ELEMENTS // max(1, r * d_out * a.shape[-1]))
        s_w = a.new_zeros(d_out, a.shape[-1])
        for lo in range(0, B, per_chunk):
            gw = einsum(g[lo:lo + per_chunk], a[lo:lo + per_chunk], "b r p o, b p i -> b r o i")
            s_w += gw.square().sum((0, 1))
        s_w /= B
    s_b = g.sum(2).square().sum((0, 1)) / B
    return s_w, s_b


class EKFAC(KFAC):
    name = "ekfac"
    caches_rows = False  # its Gram is in the eigenbasis
    defaults = {k: v for k, v in KFAC.defaults.items() if k != "inv_dtype"}  # eigh in float64

    @classmethod
    def _direction_from_rows(cls, stage: Stage, st: State, stats: StageStatistics | None,
                             hp: dict[str, Any], comm: Collective = NO_COMM
                             ) -> list[Tensor] | None:
        return None  # the eigenvalue-corrected diagonal needs the dense gradient

    def gradient_unused(self, stage: Stage, hp: dict[str, Any], B: int, P: int, *,
                        gradient_rows: bool) -> bool:
        return False

    def _due(self, st: State, hp: dict[str, Any], step: int) -> bool:
        return step % hp["inv_every"] == 0 or "QA" not in st

    def _decomposition(self, stage: Stage, new: State, st: State, hp: dict[str, Any],
                       step: int) -> list[Tensor]:
        """[eigenvalues of A, Q_A, eigenvalues of G, Q_G] in float64; a failed decomposition
        is marked by NaN eigenvalues (so the mark reaches every process with a broadcast)."""
        parts: list[Tensor] = []
        for M in (new["A"], new["G"]):
            e = eigh64(M)
            if e is None:
                d = M.shape[0]
                e = (M.new_full((d,), float("nan"), dtype=torch.float64),
                     M.new_zeros((d, d), dtype=torch.float64))
            parts += list(e)
        return parts

    def _placeholders(self, new: State) -> list[Tensor]:
        out = []
        for M in (new["A"], new["G"]):
            d = M.shape[0]
            out += [M.new_empty((d,), dtype=torch.float64), M.new_empty((d, d), dtype=torch.float64)]
        return out

    @staticmethod
    def _rebase(stage: Stage, st: State, new: State, parts: Sequence[Tensor] | None) -> bool:
        """Q_A, Q_G into ``new`` from a decomposition's parts (the previous basis kept where
        it failed); whether the basis changed."""
        if parts is None:
            return False
        failed = not all(bool(torch.isfinite(parts[i]).all()) for i in (0, 2))
        if failed and "QA" in st:
            warnings.warn(f"stage {stage.index}: eigen-decomposition of a K-FAC factor failed;"
                          " keeping the previous eigenbasis", CurvatureWarning, stacklevel=6)
            return False
        if failed:
            raise RuntimeError(f"stage {stage.index}: eigen-decomposition of the first K-FAC "
                               "factors failed and there is no previous basis to keep")
        new["QA"] = parts[1].to(new["A"].dtype)
        new["QG"] = parts[3].to(new["G"].dtype)
        return True

    def _finish(self, stage: Stage, st: State, new: State, parts: Sequence[Tensor] | None,
                stats: StageStatistics | None, hp: dict[str, Any], step: int) -> State:
        rebased = self._rebase(stage, st, new, parts)
        if stats is not None:
            s_w, s_b = self.comm.mean(eigenbasis_scales(stats, new["QA"], new["QG"]),
                                      tag="statistics")
            self._set_scales(new, st, s_w, s_b, rebased, hp)
        new["damping"] = damping_at(hp, step)
        return new

    def _refresh_basis(self, stage: Stage, st: State, stats: StageStatistics | None,
                       hp: dict[str, Any], step: int) -> tuple[State, bool]:
        """The factors' running averages, the eigenbasis (refreshed every ``inv_every`` steps)
        and the damping, without the corrected eigenvalues; also whether the basis changed."""
        new = self._factors(stage, st, stats, hp)
        rebased = self._rebase(stage, st, new, self._fresh_parts(stage, new, st, hp, step))
        new["damping"] = damping_at(hp, step)
        return new, rebased

    @staticmethod
    def _set_scales(new: State, st: State, s_w: Tensor, s_b: Tensor, rebased: bool,
                    hp: dict[str, Any]) -> None:
        """The corrected eigenvalues: a running average of the batch estimates, restarted
        from them when the basis changed."""
        decay = hp["stat_decay"]
        fresh = rebased or "scale" not in st
        new["scale"] = s_w if fresh else ema(st["scale"], s_w, decay)
        new["scale_bias"] = s_b if fresh else ema(st["scale_bias"], s_b, decay)

    def _refresh_layers(self, layers: list[tuple[str, Stage, list[int]]], states: list[State],
                        stats: StageStatistics | None, hp: dict[str, Any], step: int
                        ) -> dict[str, State]:
        """Per Kronecker layer inside the stage: the basis from its grid factors, and the
        corrected eigenvalues as the average over the grid times of each time's estimate
        (``eigenbasis_scales`` of that time's rows in the new basis; ``stats.samples``, one
        pass over the grid for all layers)."""
        subs = stats.sublayers if stats is not None and stats.sublayers is not None else {}
        heads, rebased = {}, {}
        for name, view, idx in layers:
            heads[name], rebased[name] = self._refresh_basis(view, states[idx[0]], subs.get(name),
                                                             hp, step)
        if stats is None or stats.samples is None:
            return heads
        total: dict[str, tuple[Tensor, Tensor]] = {}
        n = 0
        for rows in stats.samples():
            n += 1
            for name, _, _ in layers:
                a, g = rows[name]
                s_w, s_b = eigenbasis_scales(StageStatistics(a=a, g=g), heads[name]["QA"],
                                             heads[name]["QG"])
                total[name] = (s_w, s_b) if name not in total else \
                    (total[name][0] + s_w, total[name][1] + s_b)
        for name, _, idx in layers:
            s_w, s_b = self.comm.mean([total[name][0] / n, total[name][1] / n], tag="statistics")
            self._set_scales(heads[name], states[idx[0]], s_w, s_b, rebased[name], hp)
        return heads

    def precondition(self, stage: Stage, st: State, v: list[Tensor]) -> list[Tensor]:
        return self._scaled(stage, st, v, -1.0)

    def _scaled(self, stage: Stage, st: State, v: list[Tensor], power: float) -> list[Tensor]:
        """(Q diag(s + damping)^power Q^T) v, with leading column dims allowed."""
        QA, QG, damping = st["QA"], st["QG"], st["damping"]
        out = []
        for name, x, p in zip(stage.param_names, v, stage.params):
            lead = x.shape[: x.dim() - p.dim()]
            if name == "weight":
                X = QG.T @ x.reshape(*lead, p.shape[0], -1) @ QA
                X = X * (st["scale"] + damping).pow(power)
                out.append((QG @ X @ QA.T).reshape(x.shape))
            else:
                out.append(((x @ QG) * (st["scale_bias"] + damping).pow(power)) @ QG.T)
        return out

    def solve_rows(self, stage: Stage, states: list[State], hp: dict[str, Any], a: Tensor,
                   g: Tensor) -> list[Tensor] | None:
        return None  # the back-rotation costs as much as solving the formed gradient

    def per_sample_gram(self, stage: Stage, states: list[State], hp: dict[str, Any], a: Tensor,
                        g: Tensor, cache: dict[str, Any] | None = None) -> Tensor | None:
        """The diagonal closed form in the Kronecker eigenbasis (rows rotated by Q_A, Q_G);
        ``cache`` is unused (``caches_rows`` is False)."""
        if not (self.kronecker(stage, hp) and stage.derivatives.exact_rows(stage.module)):
            return None
        st = states[0]
        D = {"weight": st["scale"] + st["damping"], "bias": st["scale_bias"] + st["damping"]}
        return diagonal_gram(stage, a @ st["QA"], g @ st["QG"], D)

    def apply(self, stage: Stage, states: list[State], v: list[Tensor], hp: dict[str, Any]) -> list[Tensor]:
        if not self.kronecker(stage, hp):
            if self.layers(stage, hp):
                return self._per_layer(stage, states, v, hp, inverse=False)
            return DiagonalFallback.apply(states, v)
        return self._scaled(stage, states[0], v, 1.0)

    def wants_statistics(self, step: int, hp: dict[str, Any], states: list[State]) -> bool:
        # a new basis needs a fresh diagonal: collect statistics at basis refreshes too
        return (step % hp["stat_every"] == 0 or step % hp["inv_every"] == 0
                or not any("QA" in st for st in states))
