"""Exact autograd backend: derivatives of each stage by ``torch.autograd`` / ``torch.func``.

First order (SPEC 4): the nominal pass cuts the autograd graph at every stage input, so the
backward value recursion is one vector-Jacobian product per stage,

    (Q_x, B * Qbar_u) = (f_x^T V'_x, sum_i f_u^(i)T V'_x^(i)),

which costs exactly one backpropagation. Terminal factors for type-2 / sampled Fisher
statistics propagate through the same graph pieces column by column (Z_t = f_x^T Z_{t+1}).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ocnopt.curvature.base import StageStatistics
from ocnopt.engine import QExpansion, Terminal, Trajectory
from ocnopt.stages import Stage

from .base import Backend


class AutogradBackend(Backend):
    name = "autograd"

    def forward(self, stages: Sequence[Stage], inputs: Tensor, *, input_value: bool = False
                ) -> Trajectory:
        states, contexts, pieces = [inputs.detach()], [], []
        x = inputs.detach()
        with torch.enable_grad():
            for t, stage in enumerate(stages):
                xin = x.requires_grad_(True) if (t > 0 or input_value) and x.is_floating_point() else x
                out, ctx = stage.forward(xin)
                pieces.append((xin, out))
                contexts.append(ctx)
                x = out.detach()
                states.append(x)
        return Trajectory(states, contexts, pieces)

    def backward(self, stages: Sequence[Stage], traj: Trajectory, terminal: Terminal, *,
                 need_stats: Sequence[bool], keep_values: bool = False
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
            stats = None
            if need_stats[t]:
                g = V_x.unsqueeze(1) if Z is None else Z  # type: ignore[union-attr]
                d = stage.derivatives
                stats = StageStatistics(a=d.kfac_input(stage.module, xin.detach()),
                                        g=d.kfac_output(stage.module, g))
            wants_x = xin.requires_grad
            if Z is not None and wants_x and t <= last_stats:
                Z = torch.stack([
                    torch.autograd.grad(out, xin, Z[:, c], retain_graph=True)[0]
                    for c in range(Z.shape[1])
                ], 1)
            wrt = ([xin] if wants_x else []) + list(stage.params)
            grads = torch.autograd.grad(out, wrt, grad_outputs=V_x) if wrt else ()
            Q_x = grads[0] if wants_x else None
            Q_u = [g.div_(B) for g in grads[int(wants_x):]]
            expansions[t] = QExpansion(Q_x=Q_x, Q_u=Q_u, stats=stats)
            V_x = Q_x
            if keep_values:
                values[t] = Q_x
        return expansions, values
