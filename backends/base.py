"""The backend interface: the nominal forward pass and the backward value recursion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from ocnopt.engine import QExpansion, Terminal, Trajectory
from ocnopt.losses import Loss
from ocnopt.stages import Stage


class Backend:
    """Computes, per stage, the terms of the Q expansion from the value at the next stage."""

    name = "base"
    #: whether the backend implements the second-order interface (order 2, curvature "full"):
    #: check_second_order, terminal_value, expand_stage, quadratic, feedback, value_update,
    #: value_hessian (see ``AutogradBackend`` for their contracts)
    second_order_capable = False

    def prepare(self, stages: Sequence[Stage], loss: Loss) -> None:
        """Called once by ``OCNOpt`` with the chain and the loss: refuse what the backend
        cannot handle, build what it needs."""

    def follow_fisher(self, fisher_type: str, *, given: Mapping[str, object]) -> None:
        """Order 2 with ``fisher_type`` given: adopt the statistics it asks for where one of the
        backend's options chooses them and is not in ``given`` (the options the user passed),
        e.g. ``LowRankBackend``'s terminal."""

    def check_fisher(self, fisher_type: str, *, order: int, explicit: bool) -> None:
        """Refuse a ``fisher_type`` (``explicit``: passed by the user) that the backend would
        not honour at this order, naming what it accepts, instead of ignoring it."""

    def forward(self, stages: Sequence[Stage], inputs: Tensor, *, input_value: bool = False
                ) -> Trajectory:
        raise NotImplementedError

    def backward(self, stages: Sequence[Stage], traj: Trajectory, terminal: Terminal, *,
                 need_stats: Sequence[bool], keep_values: bool = False,
                 skip_u: Sequence[bool] | None = None
                 ) -> tuple[list[QExpansion], list[Tensor | None]]:
        """Order 1: the expansions of every stage; where ``skip_u[t]``, Q_u may be left None
        (the curvature model's ``gradient_unused``)."""
        raise NotImplementedError
