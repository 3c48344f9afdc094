"""M = diag(sqrt(v)) + eps, v the EMA of g*g: first-order mode equals ``torch.optim.RMSprop``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..stages import Stage
from .base import (
    DiagonalCurvature,
    StageStatistics,
    State,
    buffer_or_zeros,
    check_nonneg,
    flatten_stages,
    foreach_add_scalar_,
    foreach_ready,
    require,
    scalar_arg,
    split_stages,
)


class RMSprop(DiagonalCurvature):
    name = "rmsprop"
    defaults = {"alpha": 0.99, "eps": 1e-8, "centered": False, "momentum": 0.0}

    def check(self, hp: dict[str, Any]) -> None:
        check_nonneg(hp, "alpha", "eps", "momentum")
        require(hp["alpha"] <= 1, "alpha", hp["alpha"], "a number in [0, 1]")
        require(isinstance(hp["centered"], bool), "centered", hp["centered"], "True or False")

    @staticmethod
    def _denominator(state: State, hp: dict[str, Any]) -> Tensor:
        v = state["square_avg"]
        if hp["centered"]:
            v = v.addcmul(state["grad_avg"], state["grad_avg"], value=-1)
        return v.sqrt().add_(hp["eps"])

    def update(self, stage: Stage, states: list[State], grads: list[Tensor], params: Sequence[Tensor],
               stats: StageStatistics | None, hp: dict[str, Any], step: int
               ) -> tuple[list[State], list[Tensor]]:
        alpha, new_states, dirs = hp["alpha"], [], []
        self.new_step(step)
        for st, g in zip(states, grads):
            sq = buffer_or_zeros(st, "square_avg", g)
            new: State = {"step": st.get("step", 0) + 1,
                          "square_avg": sq.mul(alpha).addcmul_(g, g, value=1 - alpha)}
            if hp["centered"]:
                ga = buffer_or_zeros(st, "grad_avg", g)
                new["grad_avg"] = ga.lerp(g, 1 - alpha)
            denom = self._denominator(new, hp)  # a fresh tensor: divide into it
            d = torch.div(g, denom, out=denom)
            if hp["momentum"] > 0:
                buf = buffer_or_zeros(st, "momentum_buffer", g)
                new["momentum_buffer"] = d = buf.mul(hp["momentum"]).add_(d)
            new_states.append(new)
            dirs.append(d)
        return new_states, dirs

    def update_many(self, stages: Sequence[Stage], states: Sequence[list[State]],
                    grads: Sequence[list[Tensor]], stats: Sequence[StageStatistics | None],
                    hp: dict[str, Any], step: int, *, scratch: bool = False
                    ) -> tuple[list[list[State]], list[list[Tensor]]]:
        """``update``'s arithmetic (the same results) over every tensor of ``stages``: with
        ``_foreach`` ops when they are small, else per tensor with the temporaries in kept
        workspaces; per stage where ``centered``."""
        flat_states, flat_g, counts = flatten_stages(states, grads)
        if hp["centered"] or not all(g.is_floating_point() for g in flat_g):
            return super().update_many(stages, states, grads, stats, hp, step, scratch=scratch)
        alpha, momentum, eps = hp["alpha"], hp["momentum"], hp["eps"]
        sq_old = [buffer_or_zeros(st, "square_avg", g) for st, g in zip(flat_states, flat_g)]
        buf_old = [buffer_or_zeros(st, "momentum_buffer", g) for st, g in zip(flat_states, flat_g)
                   ] if momentum > 0 else []
        buf: list[Tensor] = []
        sq: list[Tensor]
        d: list[Tensor]
        if foreach_ready(flat_g):
            # (scalar_arg: the same results without a wrapped number per tensor on the CPU)
            sq = list(torch._foreach_mul(sq_old, scalar_arg(alpha, sq_old)))
            torch._foreach_addcmul_(sq, flat_g, flat_g, value=1 - alpha)
            denom = torch._foreach_sqrt(sq)
            foreach_add_scalar_(denom, eps)
            d = list(torch._foreach_div(flat_g, denom))
            if momentum > 0:
                buf = list(torch._foreach_mul(buf_old, scalar_arg(momentum, buf_old)))
                torch._foreach_add_(buf, d)
                d = buf
        else:
            sq, d = [], []
            for i, g in enumerate(flat_g):
                sq.append(sq_old[i].mul(alpha).addcmul_(g, g, value=1 - alpha))
                den = torch.sqrt(sq[-1], out=self.workspace_or_none(scratch, 0, i, g))
                di = torch.div(g, den.add_(eps), out=den)
                if momentum > 0:
                    buf.append(buf_old[i].mul(momentum).add_(di))
                    di = buf[-1]
                d.append(di)
        new: list[State] = [{"step": st.get("step", 0) + 1, "square_avg": s}
                            for st, s in zip(flat_states, sq)]
        for n, b in zip(new, buf):
            n["momentum_buffer"] = b
        return split_stages(new, counts), split_stages(d, counts)

    def direction_is_solve(self, hp: dict[str, Any]) -> bool:
        return hp["momentum"] == 0


