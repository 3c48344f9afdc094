"""M = E_i[Q_uu^(i)] + l_uu + damping I: the full curvature model of the exact backend.

Needs the batch-mean Q_uu of every stage, which only the exact autograd backend computes
(propagating V_xx, with or without the contraction terms). First-order mode (no feedback, no
value correction) is then a block-diagonal Gauss-Newton (or Newton) step per stage. M is
factorised by Cholesky; when it is not positive definite (Newton mode, small damping) its
eigenvalues are replaced by their absolute values (saddle-free Newton: a direction of negative
curvature is descended, not climbed) and floored at max(damping, eig_floor * max|eigenvalue|)
(choice). The factorised
inverse of the current step is kept in the state so that ``solve`` applies it to the feedback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..stages import Stage
from .base import CurvatureModel, StageStatistics, State, check_damping, check_nonneg, damping_at


def floored_inverse(M: Tensor, damping: float, eig_floor: float) -> tuple[Tensor, Tensor]:
    """(M_used, M_used^{-1}) with M_used = M + damping I, or, when that is not positive
    definite, the matrix with eigenvalues max(|lambda|, floor)."""
    m = M.shape[0]
    eye = torch.eye(m, dtype=M.dtype, device=M.device)
    Md = 0.5 * (M + M.T) + damping * eye
    L, info = torch.linalg.cholesky_ex(Md.to(torch.float64))
    if int(info) == 0:
        return Md, torch.cholesky_inverse(L).to(M.dtype)
    evals, evecs = torch.linalg.eigh(Md.to(torch.float64))
    floor = max(damping, eig_floor * float(evals.abs().max()), torch.finfo(torch.float64).tiny)
    evals = evals.abs().clamp_min(floor)  # negative curvature flipped (saddle-free), floored
    used = (evecs * evals) @ evecs.T
    return used.to(M.dtype), ((evecs / evals) @ evecs.T).to(M.dtype)


class Full(CurvatureModel):
    name = "full"
    needs_full = True
    defaults = {"damping": 1e-3, "eig_floor": 1e-6}

    def check(self, hp: dict[str, Any]) -> None:
        check_damping(hp)
        check_nonneg(hp, "eig_floor")

    def wants_statistics(self, step: int, hp: dict[str, Any], states: list[State]) -> bool:
        return True

    def update(self, stage: Stage, states: list[State], grads: list[Tensor], params: Sequence[Tensor],
               stats: StageStatistics | None, hp: dict[str, Any], step: int
               ) -> tuple[list[State], list[Tensor]]:
        if stats is None or stats.Q_uu is None:
            raise RuntimeError(f"curvature 'full' needs Q_uu of {stage}: use backend='autograd'")
        M, M_inv = floored_inverse(stats.Q_uu, damping_at(hp, step), hp["eig_floor"])
        head = {"M": M, "M_inv": M_inv}
        direction = stage.unflatten(M_inv @ stage.flatten(grads))
        return [head] + [{} for _ in states[1:]], direction

    def direction_is_solve(self, hp: dict[str, Any]) -> bool:
        return True

    def _mul(self, stage: Stage, mat: Tensor, v: list[Tensor]) -> list[Tensor]:
        lead = v[0].dim() - stage.params[0].dim()
        return stage.unflatten(stage.flatten(v, lead) @ mat)  # mat symmetric

    def solve(self, stage: Stage, states: list[State], v: list[Tensor], hp: dict[str, Any]) -> list[Tensor]:
        return self._mul(stage, states[0]["M_inv"], v)

    def apply(self, stage: Stage, states: list[State], v: list[Tensor], hp: dict[str, Any]) -> list[Tensor]:
        return self._mul(stage, states[0]["M"], v)
