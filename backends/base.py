"""The backend contract: every method the engine and the optimizer call, declared.

A backend computes the derivatives of the Bellman expansion per step of a graph
(``ocnopt.graph.Graph``; a chain is the special case). Order 1 needs ``forward`` and
``backward``; a backend with ``second_order_capable = True`` also implements the
second-order interface below, in its own representation of the value function
(``ocnopt.engine.ValueFunction``: full, low-rank or Kronecker) and of the expansion
(a subclass of ``ocnopt.engine.QExpansion``). A new backend is written against this class
alone: the engine reads no other attribute of a backend, its values or its expansions.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ocnopt.curvature.base import Solver
from ocnopt.engine import Feedback, QExpansion, Terminal, Trajectory, ValueFunction
from ocnopt.graph import Graph
from ocnopt.losses import Loss
from ocnopt.stages import Stage


class Backend(abc.ABC):
    """Computes, per step, the terms of the Q expansion from the value at the next state."""

    name = "base"
    #: whether the backend implements the second-order interface (order 2, curvature "full")
    second_order_capable = False

    # -- construction ---------------------------------------------------------------------------
    def prepare(self, graph: Graph, loss: Loss) -> None:  # noqa: B027 (optional hook)
        """Called once by ``OCNOpt`` with the graph and the loss: refuse what the backend
        cannot handle, build what it needs."""

    def check_options(self, *, gauss_newton: bool, mu: float, needs_full: bool,  # noqa: B027 (optional hook)
                      psd_clip: bool = True) -> None:
        """Refuse optimizer options the backend cannot honour (named, with what it accepts)."""

    def follow_fisher(self, fisher_type: str, *, given: Mapping[str, object]) -> None:  # noqa: B027 (optional hook)
        """Order 2 with ``fisher_type`` given: adopt the statistics it asks for where one of the
        backend's options chooses them and is not in ``given`` (the options the user passed),
        e.g. ``LowRankBackend``'s terminal."""

    def check_fisher(self, fisher_type: str, *, order: int, explicit: bool) -> None:  # noqa: B027 (optional hook)
        """Refuse a ``fisher_type`` (``explicit``: passed by the user) that the backend would
        not honour at this order, naming what it accepts, instead of ignoring it."""

    # -- order 1 --------------------------------------------------------------------------------
    @abc.abstractmethod
    def forward(self, graph: Graph, inputs: Tensor, *, input_value: bool = False) -> Trajectory:
        """The nominal pass: every tensor of the graph and the handles of the backward pass."""

    @abc.abstractmethod
    def backward(self, graph: Graph, traj: Trajectory, terminal: Terminal, *,
                 need_stats: Sequence[bool], keep_values: bool = False,
                 skip_u: Sequence[bool] | None = None
                 ) -> tuple[list[QExpansion], list[Tensor | None]]:
        """Order 1: the expansions of every step and (``keep_values``) V_x by value id; where
        ``skip_u[t]``, Q_u may be left None (the curvature model's ``gradient_unused``)."""

    #: order 1 may run as one backward over a connected nominal graph: the backend then
    #: implements ``forward_connected`` and ``backward_connected``
    connected_first_order = False

    def forward_connected(self, graph: Graph, inputs: Tensor, *, record: bool = True
                          ) -> Trajectory:
        """The nominal pass of order 1 for ``backward_connected`` (``connected_first_order``);
        ``record=False`` (only for a ``Graph.direct`` graph, and no statistics asked for):
        the model's own forward, with the input and the output only."""
        raise NotImplementedError

    def backward_connected(self, graph: Graph, traj: Trajectory, terminal: Terminal, *,
                           need_stats: Sequence[bool], skip_u: Sequence[bool] | None = None
                           ) -> list[QExpansion]:
        """Order 1 as one backward over ``forward_connected``'s trajectory: per step Q_u
        (None where ``skip_u[t]``) and the statistics asked for; ``Q_args`` may be None."""
        raise NotImplementedError

    # -- order 2 --------------------------------------------------------------------------------
    def _no_second_order(self) -> NotImplementedError:
        return NotImplementedError(f"backend {self.name!r} has no second-order terms; use "
                                   "backend 'lowrank' or 'autograd'")

    def check_second_order(self, graph: Graph, traj: Trajectory, *, need_quu: bool) -> None:
        """Refuse, before any work, what the second-order pass cannot do on this trajectory."""
        raise self._no_second_order()

    def terminal_value(self, loss: Loss, traj: Trajectory, terminal: Terminal, *,
                       targets: Tensor | None = None, generator: Any = None) -> ValueFunction:
        """V_T = phi at the output: one block, the output's."""
        raise self._no_second_order()

    def expand_stage(self, stage: Stage, traj: Trajectory, value: ValueFunction, *,
                     gauss_newton: bool, need_quu: bool, need_stats: bool, keep: bool = False,
                     stats_from_value: bool = True, skip_u: bool = False) -> QExpansion:
        """The expansion of Q at step ``stage`` from the value at X_{t+1}."""
        raise self._no_second_order()

    def quadratic(self, stage: Stage, exp: QExpansion, k: list[Tensor]) -> Tensor:
        """k^T Qbar_uu k without l_uu; sets ``exp.kQ`` = k . Qbar_u where Q_u is None."""
        raise self._no_second_order()

    def feedback(self, stage: Stage, exp: QExpansion, minv: Solver, lr: float, B: int, *,
                 ignore: frozenset[int] = frozenset()) -> Feedback | None:
        """K dX = -lr M^{-1} (1/B) sum_i Q_uX^(i) dX^(i) over the blocks of X_t not in
        ``ignore``; None where no block can move (dx_0 = 0)."""
        raise self._no_second_order()

    def value_update(self, stage: Stage, exp: QExpansion, value: ValueFunction,
                     minv: Solver | None, lr: float, B: int, *, value_correction: bool,
                     mu: float, clip: bool, trust: float | None = None) -> ValueFunction:
        """V at X_t: V_X = Q_X - lr Q_uX^T M^{-1} Qbar_u (bounded by ``trust``), V_XX =
        Q_XX - (lr/B) Q_uX^T M^{-1} Q_uX (+ mu I, clipped to PSD when ``clip``)."""
        raise self._no_second_order()


def tracked_values(graph: Graph, inputs: Tensor, outputs: Sequence[Tensor], input_value: bool
                   ) -> list[bool]:
    """Which tensors carry a value block: floating step outputs, and the input when asked."""
    first = input_value and inputs.is_floating_point()
    return [first] + [torch.is_floating_point(z) for z in outputs]
