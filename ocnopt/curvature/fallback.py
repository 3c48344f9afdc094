"""Diagonal fallback of the Kronecker curvature models (kfac, ekfac) for stages whose layer type
has no Kronecker factors: BatchNorm/LayerNorm/GroupNorm affine parameters, embeddings, PReLU,
any parameter of the generic handler (docs/method.md, "Layers").

Per parameter tensor, elementwise (choice):

    D <- stat_decay D + (1 - stat_decay) Qbar_u^2     every ``stat_every`` steps
                                                      (the first estimate taken as is)
    M = diag(D) + damping,     d = M^{-1} Qbar_u      (+ heavy-ball momentum as kfac's)

with Qbar_u the batch gradient of the stage (coupled weight decay included) and damping the
kfac/ekfac hyper-parameter at the current step. D is the squared *batch* gradient, not a
per-sample second moment: it needs nothing beyond Qbar_u (no statistics from the backend) and
is a diagonal empirical-Fisher proxy of the same kind as RMSprop's. State: ``diag`` (D) and
``diag_damping`` in each parameter's own state dict (``momentum_buffer`` with momentum), so
``state_dict`` round-trips it. ``per_sample_gram`` has no closed form here (None): the
backends form the per-sample gradients with ``torch.func.vmap``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..stages import Stage
from .base import State, damping_at
from .sgd import sgd_direction


class DiagonalFallback:
    """M = diag(D) + damping per parameter, D a running average of Qbar_u^2 (module docstring).
    Used by ``KFAC`` and ``EKFAC`` for every stage with a control but no Kronecker factors."""

    @staticmethod
    def update(stage: Stage, states: list[State], grads: list[Tensor], hp: dict[str, Any],
               step: int) -> tuple[list[State], list[Tensor]]:
        if len(grads) != len(states):
            raise RuntimeError(f"{stage}: the diagonal fallback needs Qbar_u, which was not formed")
        damping = damping_at(hp, step)
        decay = float(hp["stat_decay"])
        new_states, dirs = [], []
        for st, g in zip(states, grads):
            new = dict(st)
            old = st.get("diag")
            if old is None:
                new["diag"] = g.square()
            elif step % hp["stat_every"] == 0:
                new["diag"] = old.mul(decay).addcmul_(g, g, value=1 - decay)
            new["diag_damping"] = damping
            d = g / (new["diag"] + damping)
            if hp["momentum"] > 0:
                d, new["momentum_buffer"] = sgd_direction(d, st.get("momentum_buffer"),
                                                          hp["momentum"], 0.0, False)
            new_states.append(new)
            dirs.append(d)
        return new_states, dirs

    @staticmethod
    def solve(states: list[State], v: list[Tensor]) -> list[Tensor]:
        """(D + damping)^{-1} v; v may carry leading column dimensions."""
        return [x / (st["diag"] + st["diag_damping"]) for st, x in zip(states, v)]

    @staticmethod
    def apply(states: list[State], v: list[Tensor]) -> list[Tensor]:
        """(D + damping) v."""
        return [x * (st["diag"] + st["diag_damping"]) for st, x in zip(states, v)]
