"""M = I: first-order mode equals ``torch.optim.SGD`` (momentum, dampening, nesterov)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..stages import Stage
from .base import (
    CurvatureModel,
    StageStatistics,
    State,
    check_nonneg,
    flatten_stages,
    foreach_ready,
    require,
    rows_gram,
    scalar_arg,
    split_stages,
    weight_bias_gram,
)


def sgd_direction(
    grad: Tensor, buf: Tensor | None, momentum: float, dampening: float, nesterov: bool
) -> tuple[Tensor, Tensor | None]:
    """torch.optim.SGD's direction d (param -= lr * d) and new momentum buffer."""
    if momentum == 0:
        return grad, None
    if buf is None:
        buf = grad.clone()
    elif dampening == 0:  # g + momentum b in one operation (torch: b momentum, then + g)
        buf = grad.add(buf, alpha=momentum)
    else:
        buf = buf.mul(momentum).add_(grad, alpha=1 - dampening)
    d = grad.add(buf, alpha=momentum) if nesterov else buf
    return d, buf


class SGD(CurvatureModel):
    name = "sgd"
    defaults = {"momentum": 0.0, "dampening": 0.0, "nesterov": False}

    def check(self, hp: dict[str, Any]) -> None:
        check_nonneg(hp, "momentum", "dampening")
        require(isinstance(hp["nesterov"], bool), "nesterov", hp["nesterov"], "True or False")
        if hp["nesterov"]:
            require(hp["momentum"] > 0 and hp["dampening"] == 0, "nesterov", True,
                    "only with momentum > 0 and dampening = 0 (as torch.optim.SGD)")

    def update(self, stage: Stage, states: list[State], grads: list[Tensor], params: Sequence[Tensor],
               stats: StageStatistics | None, hp: dict[str, Any], step: int
               ) -> tuple[list[State], list[Tensor]]:
        new_states, dirs = [], []
        for st, g in zip(states, grads):
            d, buf = sgd_direction(g, st.get("momentum_buffer"), hp["momentum"], hp["dampening"],
                                   hp["nesterov"])
            new_states.append({} if buf is None else {"momentum_buffer": buf})
            dirs.append(d)
        return new_states, dirs

    def update_many(self, stages: Sequence[Stage], states: Sequence[list[State]],
                    grads: Sequence[list[Tensor]], stats: Sequence[StageStatistics | None],
                    hp: dict[str, Any], step: int, *, scratch: bool = False
                    ) -> tuple[list[list[State]], list[list[Tensor]]]:
        """``update``'s arithmetic (the same results) over every tensor of ``stages``: with
        ``_foreach`` ops when they are small, else per tensor; per stage while some momentum
        buffers are still absent. The direction is Qbar_u itself (no momentum) or the new
        momentum buffer (no copy: the caller reads it)."""
        flat_states, flat_g, counts = flatten_stages(states, grads)
        momentum = hp["momentum"]
        if not all(g.is_floating_point() for g in flat_g):
            return super().update_many(stages, states, grads, stats, hp, step, scratch=scratch)
        new_states: list[State]
        d: list[Tensor]
        if momentum == 0:
            d, new_states = list(flat_g), [{} for _ in flat_g]
        else:
            bufs = [st.get("momentum_buffer") for st in flat_states]
            if any(b is None for b in bufs):
                return super().update_many(stages, states, grads, stats, hp, step, scratch=scratch)
            old = [b for b in bufs if b is not None]
            new: list[Tensor]
            damp = hp["dampening"]
            if foreach_ready(flat_g):
                if damp == 0:  # g + momentum b in one operation, as ``sgd_direction``
                    new = list(torch._foreach_add(flat_g, old, alpha=momentum))
                else:  # (scalar_arg: the same results without a wrapped number per tensor)
                    new = list(torch._foreach_mul(old, scalar_arg(momentum, old)))
                    torch._foreach_add_(new, flat_g, alpha=1 - damp)
            elif damp == 0:
                new = [g.add(b, alpha=momentum) for b, g in zip(old, flat_g)]
            else:
                new = [b.mul(momentum).add_(g, alpha=1 - damp) for b, g in zip(old, flat_g)]
            d = list(torch._foreach_add(flat_g, new, alpha=momentum)) if hp["nesterov"] else new
            new_states = [{"momentum_buffer": b} for b in new]
        return split_stages(new_states, counts), split_stages(d, counts)

    def solve(self, stage: Stage, states: list[State], v: list[Tensor], hp: dict[str, Any]) -> list[Tensor]:
        return list(v)

    apply = solve

    def direction_is_solve(self, hp: dict[str, Any]) -> bool:
        return hp["momentum"] == 0

    def per_sample_gram(self, stage: Stage, states: list[State], hp: dict[str, Any], a: Tensor,
                        g: Tensor) -> Tensor | None:
        """w_c^T w_d = sum_{p,q} (g_cp . g_dq)(a_p . a_q) + (sum_p g_cp).(sum_q g_dq)."""
        return weight_bias_gram(
            stage, a, g,
            lambda a, g: rows_gram(g, g, a @ a.transpose(1, 2)),
            lambda gs: gs @ gs.transpose(1, 2))
