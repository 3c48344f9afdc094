"""M = diag(sqrt(vhat)) + eps with direction mhat: first-order mode equals ``torch.optim.Adam``
(amsgrad included) and, with decoupled weight decay, ``torch.optim.AdamW``."""

from __future__ import annotations

import math
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


class Adam(DiagonalCurvature):
    name = "adam"
    decoupled = False
    defaults = {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False}

    def check(self, hp: dict[str, Any]) -> None:
        betas = hp["betas"]
        require(isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas),
                "betas", betas, "a pair (beta1, beta2) with each in [0, 1)")
        check_nonneg(hp, "eps")
        require(isinstance(hp["amsgrad"], bool), "amsgrad", hp["amsgrad"], "True or False")

    def coupled_weight_decay(self, hp: dict[str, Any]) -> bool:
        return not self.decoupled

    def _denominator(self, state: State, hp: dict[str, Any]) -> Tensor:
        beta2 = hp["betas"][1]
        v = state["max_exp_avg_sq"] if hp["amsgrad"] else state["exp_avg_sq"]
        bc2_sqrt = math.sqrt(1 - beta2 ** float(state["step"]))
        return v.sqrt().div_(bc2_sqrt).add_(hp["eps"])  # one temporary, same rounding

    def update(self, stage: Stage, states: list[State], grads: list[Tensor], params: Sequence[Tensor],
               stats: StageStatistics | None, hp: dict[str, Any], step: int
               ) -> tuple[list[State], list[Tensor]]:
        beta1, beta2 = hp["betas"]
        wd = hp["weight_decay"]
        self.new_step(step)
        if not hp["amsgrad"] and foreach_ready(grads) and len(grads) > 1:
            fast = self._update_foreach(states, grads, params, hp)
            if fast is not None:
                return fast
        new_states, dirs = [], []
        steps: dict[float, Tensor] = {}  # one 0-dim tensor per count (states are never mutated)
        for st, g, p in zip(states, grads, params):
            k = float(st["step"]) + 1 if "step" in st else 1.0
            if k not in steps:
                steps[k] = torch.scalar_tensor(k)
            new: State = {
                "step": steps[k],
                "exp_avg": buffer_or_zeros(st, "exp_avg", g).lerp(g, 1 - beta1),
                "exp_avg_sq": buffer_or_zeros(st, "exp_avg_sq", g).mul(beta2)
                .addcmul_(g, g, value=1 - beta2),
            }
            if hp["amsgrad"]:
                new["max_exp_avg_sq"] = torch.maximum(
                    buffer_or_zeros(st, "max_exp_avg_sq", g), new["exp_avg_sq"])
            # (m / bc1) / denominator as before, into one fresh tensor
            d = torch.div(new["exp_avg"], 1 - beta1**k).div_(self.denominator(new, hp))
            if self.decoupled and wd != 0:
                d = d.add_(p, alpha=wd)  # u <- u(1 - lr wd) - lr d (d is fresh)
            new_states.append(new)
            dirs.append(d)
        return new_states, dirs

    def _update_foreach(self, states: list[State], grads: list[Tensor], params: Sequence[Tensor],
                        hp: dict[str, Any]) -> tuple[list[State], list[Tensor]] | None:
        """``update``'s arithmetic on one stage's small tensors with multi-tensor ops (the same
        operations in the same order: the same results), keeping each new state's denominator
        for ``denominator`` (order 2 reads it in M^-1 and the Gram matrices); None where the
        tensors are at different step counts."""
        counts: dict[int, float] = {}  # one transfer per step tensor (a stage's share one)
        for st in states:
            t = st.get("step")
            if id(t) not in counts:
                counts[id(t)] = float(t) + 1 if t is not None else 1.0
        if len(set(counts.values())) != 1:
            return None
        (k,) = set(counts.values())
        m, v, denom, d = self._foreach_arithmetic(states, grads, params, hp, k)
        step_t = torch.scalar_tensor(k)
        new: list[State] = [{"step": step_t, "exp_avg": mi, "exp_avg_sq": vi} for mi, vi in zip(m, v)]
        for st, den in zip(new, denom):
            self.keep_denominator(st, hp, den)
        return new, d

    def _foreach_arithmetic(self, states: Sequence[State], grads: list[Tensor],
                            params: Sequence[Tensor], hp: dict[str, Any], k: float
                            ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """``update``'s arithmetic at step count k over the tensors of ``grads`` with
        multi-tensor ops (the same operations in the same order: the same results): the new
        first and second moments, the denominators sqrt(vhat) + eps and the directions."""
        beta1, beta2 = hp["betas"]
        wd, eps = hp["weight_decay"], hp["eps"]
        bc1, bc2_sqrt = 1 - beta1**k, math.sqrt(1 - beta2**k)
        # (scalar_arg: the same results without a wrapped number per tensor on the CPU)
        m = list(torch._foreach_lerp([buffer_or_zeros(st, "exp_avg", g)
                                      for st, g in zip(states, grads)], grads, 1 - beta1))
        v_old = [buffer_or_zeros(st, "exp_avg_sq", g) for st, g in zip(states, grads)]
        v = list(torch._foreach_mul(v_old, scalar_arg(beta2, v_old)))
        torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
        denom = list(torch._foreach_sqrt(v))
        torch._foreach_div_(denom, scalar_arg(bc2_sqrt, denom))
        foreach_add_scalar_(denom, eps)
        d = list(torch._foreach_div(m, scalar_arg(bc1, m)))
        torch._foreach_div_(d, denom)
        if self.decoupled and wd != 0:
            torch._foreach_add_(d, list(params), alpha=wd)
        return m, v, denom, d

    def update_many(self, stages: Sequence[Stage], states: Sequence[list[State]],
                    grads: Sequence[list[Tensor]], stats: Sequence[StageStatistics | None],
                    hp: dict[str, Any], step: int, *, scratch: bool = False
                    ) -> tuple[list[list[State]], list[list[Tensor]]]:
        """``update``'s arithmetic (the same operations in the same order: the same results)
        over every tensor of ``stages``: with ``_foreach`` ops when they are small, else per
        tensor with the temporaries in kept workspaces; per stage for amsgrad or tensors at
        different step counts."""
        flat_states, flat_g, counts = flatten_stages(states, grads)
        ks = {float(st["step"]) + 1 if "step" in st else 1.0 for st in flat_states}
        if hp["amsgrad"] or len(ks) != 1 or not all(g.is_floating_point() for g in flat_g):
            return super().update_many(stages, states, grads, stats, hp, step, scratch=scratch)
        (k,) = ks
        beta1, beta2 = hp["betas"]
        wd = hp["weight_decay"]
        bc1, bc2_sqrt, eps = 1 - beta1**k, math.sqrt(1 - beta2 ** k), hp["eps"]
        params = [p for st in stages for p in st.params]
        m: list[Tensor]
        v: list[Tensor]
        d: list[Tensor]
        if foreach_ready(flat_g):
            m, v, _, d = self._foreach_arithmetic(flat_states, flat_g, params, hp, k)
        else:
            m_old = [buffer_or_zeros(st, "exp_avg", g) for st, g in zip(flat_states, flat_g)]
            v_old = [buffer_or_zeros(st, "exp_avg_sq", g) for st, g in zip(flat_states, flat_g)]
            m, v, d = [], [], []
            for i, (g, p, mo, vo) in enumerate(zip(flat_g, params, m_old, v_old)):
                m.append(mo.lerp(g, 1 - beta1))
                v.append(vo.mul(beta2).addcmul_(g, g, value=1 - beta2))
                den = torch.sqrt(v[-1], out=self.workspace(0, i, g)).div_(bc2_sqrt).add_(eps)
                di = torch.div(m[-1], bc1, out=self.workspace_or_none(scratch, 1, i, g)
                               ).div_(den)
                if self.decoupled and wd != 0:
                    di.add_(p, alpha=wd)
                d.append(di)
        step_t = torch.scalar_tensor(k)  # one 0-dim tensor for all (states are never mutated)
        new = [{"step": step_t, "exp_avg": mi, "exp_avg_sq": vi} for mi, vi in zip(m, v)]
        return split_stages(new, counts), split_stages(d, counts)


class AdamW(Adam):
    name = "adamw"
    decoupled = True
    defaults = {**Adam.defaults, "weight_decay": 1e-2}
