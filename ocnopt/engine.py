"""The Bellman-expansion engine (docs/method.md, sections 2-4 and 7).

Three passes over the steps of a graph (``ocnopt.graph``; a chain is the special case):

1. ``nominal``: the forward pass z_t = f_t(a_t, u_t), recording every tensor xbar_j and what
   the backward pass needs;
2. ``expand`` (order 1) / ``second_order``: the backward value recursion from V_T = phi on the
   augmented state X_t (one block per live tensor), producing per step the expansion of Q_t
   (Q_X per sample, Qbar_u, statistics for the curvature model), the policy and V_X;
3. ``update_pass``: the forward pass with the new controls, applying each step's policy
   du_t = k_t (+ K_t dX_t) with dX_t = Xhat_t - Xbar_t blockwise, and returning the loss
   after the step.

The derivatives come from a ``Backend`` (``ocnopt.backends``), the value function's
representation (``ValueFunction``) is the backend's; the engine only orchestrates, through the
declared methods of both. Shapes: B batch, n state (per sample, any shape), m control,
r rank. Value ids: 0 is the network input, t + 1 the output of step t (``ocnopt.stages``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .curvature.base import CurvatureModel, Solver, StageStatistics
from .distributed import NO_COMM, Collective
from .losses import Loss
from .profiling import profiled, region
from .stages import Stage

if TYPE_CHECKING:  # pragma: no cover
    from .graph import Graph


@dataclass
class Trajectory:
    """The nominal pass: every tensor xbar_j by value id (``states[0]`` the input,
    ``states[t + 1]`` the output of step t), per-step replay contexts, the backend's handles
    for the backward pass (per step: the leaves of its inputs and its output), which values
    carry a value block (``tracked``: floating tensors; the input only when asked for), and
    per-trajectory data a backend keeps for its later calls (``backend_data``)."""

    states: list[Tensor]
    contexts: list[Any]
    handles: Any = None
    tracked: list[bool] = field(default_factory=list)
    targets: Tensor | None = None  # set by ``terminal``
    generator: torch.Generator | None = None  # set by ``terminal``: the step's sampler
    backend_data: dict[str, Any] = field(default_factory=dict)
    #: the output with its autograd graph, for a connected pass that recorded nothing per
    #: step (the model's own forward: ``states`` then holds the input and the output only)
    final: Tensor | None = None

    @property
    def output(self) -> Tensor:
        return self.states[-1]


@dataclass
class Terminal:
    """The terminal cost at x_T: mean loss J_T = mean_i phi^(i), per-sample value gradient
    V_x^(i) = grad phi^(i) (not divided by B) and, when asked for, a terminal factor
    (B, r, *out) for the Kronecker statistics (type-2 or sampled Fisher)."""

    loss: Tensor
    V_x: Tensor
    factor: Tensor | None = None
    V_xx: Tensor | None = None  # (B, n, n) flattened terminal Hessian, for order 2


class ValueFunction(abc.ABC):
    """The quadratic model of the value function at the augmented state X_t, per sample:
    V_X as one block per live tensor (``V``: value id -> (B, *n_j)), V_XX in the backend's
    representation (full matrix, low-rank factor, Kronecker), and ``bounded``: the share of
    samples whose V_X correction the trust bound cut at the step that produced it (None:
    no bound)."""

    V: dict[int, Tensor]
    bounded: Tensor | None

    @abc.abstractmethod
    def hessian_block(self, j: int) -> Tensor:
        """The diagonal block V_{x_j x_j} (B, n_j, n_j), dense."""

    @property
    def V_x(self) -> Tensor:
        """The one block of a single-tensor state (a chain)."""
        (v,) = self.V.values()
        return v


@dataclass
class QExpansion:
    """Expansion of Q_t around the nominal trajectory, for one step.

    ``Q_args``: f_a^T V'_z per input a of the step (per sample, None where the input carries
    no value block); ``Q_X``: Q_X = F_X^T V'_X over the blocks of X_t (carried blocks and
    arguments, the fork rule); ``Q_u``: l_u + (1/B) sum_i f_u^T V'_z^(i), one tensor per
    parameter (None where the step was asked not to form it because the curvature model does
    not read it: ``CurvatureModel.gradient_unused``); ``stats``: the curvature model's
    statistics, if requested; ``kQ``: k . Qbar_u, set by ``Backend.quadratic`` when Q_u is not
    formed. Second order (exact backend), flattened over the blocks of X_t per sample:
    Q_xx (B, n, n), Q_ux (B, m, n), Qbar_uu (m, m) (only when computed).
    """

    Q_args: list[Tensor | None]
    Q_u: list[Tensor] | None
    stats: StageStatistics | None = None
    Q_X: dict[int, Tensor] = field(default_factory=dict)
    Q_xx: Tensor | None = None
    Q_ux: Tensor | None = None
    Q_uu: Tensor | None = None
    kQ: Tensor | None = None

    @property
    def Q_x(self) -> Tensor | None:
        """f_x^T V'_x of a one-input step (the chain's Q_x)."""
        return self.Q_args[0] if len(self.Q_args) == 1 else None


class Feedback:
    """The feedback part of a policy, dX -> K dX = -lr M^{-1} (1/B) sum_i Q_uX^(i) dX^(i).

    ``blocks``: the value ids of X_t it reads (the live tensors minus, for ``game="nash"``, the
    blocks that depend on a simultaneous player). Called with a mapping value id -> dx_j, or
    with one tensor for a single-block state (a chain)."""

    def __init__(self, fn: Callable[[Mapping[int, Tensor]], list[Tensor]], blocks: Sequence[int]):
        self.fn, self.blocks = fn, tuple(blocks)

    def __call__(self, dX: Mapping[int, Tensor] | Tensor) -> list[Tensor]:
        if isinstance(dX, Tensor):
            if len(self.blocks) != 1:
                raise ValueError(f"feedback over blocks {self.blocks}: pass dX as a mapping "
                                 "value id -> tensor")
            dX = {self.blocks[0]: dX}
        return self.fn(dX)


@dataclass
class Policy:
    """Affine feedback policy of one step: du = k + K(dX). ``feedback`` is None at order 1."""

    k: list[Tensor]
    feedback: Feedback | None = None
    #: the parameters k moves (the step's own; None: all of the step's parameters)
    params: list[Tensor] | None = None
    k_norm: Tensor | None = None  # |k| when the caller has it (the update pass's trust bound)
    feedback_scale: Tensor | None = None  # set by the update pass: the trust bound's factor
    #: k = alpha * direction when the caller has the direction d (alpha = -lr): the update
    #: pass then moves u by ``add_(d, alpha=alpha)``, the same rounding as order 1's update
    direction: list[Tensor] | None = None
    alpha: float = 1.0


@dataclass
class SecondOrderPass:
    """Result of the second-order backward pass: policies and expansions per step, values by
    value id (V_x[j] and V_xx[j]: the block of tensor j in the value at X_j, the state right
    after j was produced, when kept) and the predicted change of the objective
    sum_t (k_t . Qbar_u + 1/2 k_t^T Qbar_uu k_t)."""

    policies: list[Policy | None]
    expansions: list[QExpansion | None]
    V_x: list[Tensor | None]
    V_xx: list[Tensor | None]
    predicted_change: float
    #: per step, the share of samples whose V_X correction the trust bound cut (None: no bound)
    value_bounded: list[Tensor | None] | None = None


PolicyFn = Callable[[Stage, list[Tensor] | None, StageStatistics | None],
                    tuple[list[Tensor], Any]]


@dataclass
class StageDiagnostics:
    """Per player (step with a control): |k|, |K dX| (after the trust bound), the factor the
    trust bound applied to K dX (1: not cut) and the share of samples whose V_X correction it
    cut."""

    index: int
    name: str
    k_norm: float
    feedback_norm: float = 0.0
    feedback_scale: float = 1.0
    value_bounded: float = 0.0


@dataclass
class StepResult:
    """What one ``OCNOpt.step`` did: loss before (and after, when computed), whether the step
    was skipped as non-finite, and per-player diagnostics."""

    loss: Tensor
    loss_after: float | None = None
    skipped: bool = False
    predicted_change: float | None = None
    stages: list[StageDiagnostics] = field(default_factory=list)
    #: |Qbar_u| before the ``max_grad_norm`` clip (order 1: global; order 2: over the players'
    #: norms, each clipped on its own); None where Qbar_u was not formed everywhere
    grad_norm: float | None = None
    #: the steps with Kronecker factors that ran on the diagonal fallback (``kfac_max_dim``)
    diagonal_fallback: list[str] = field(default_factory=list)
    #: Neural ODE blocks (``ocnopt.ode``): function evaluations of this step's solves
    #: (``{"nfe_forward": .., "nfe_backward": ..}``, summed over the blocks; None without
    #: blocks) and the integration-time updates of the blocks with ``learn_t1``
    solver: dict[str, int] | None = None
    t1_updates: list[Any] = field(default_factory=list)
    #: order 1: ``stages`` not made yet; ``materialize`` makes them (``OCNOpt.last_step`` does
    #: on first read, from the step's directions, which nothing changes before the next step)
    pending: Callable[[], list[StageDiagnostics]] | None = field(default=None, repr=False,
                                                                  compare=False)

    def materialize(self) -> StepResult:
        """Make the per-player diagnostics left for later (order 1); returns self."""
        if self.pending is not None:
            self.stages, self.pending = self.pending(), None
        return self


@dataclass
class StepConfig:
    """The options of one step (structural options and the hyper-parameters the engine
    reads): ``weight_decay`` is the coupled l_t(u) = wd/2 |u|^2 (0 when decoupled),
    ``fisher_type`` the curvature model's (None: empirical), ``trust`` the bound of order 2,
    ``game`` "cooperative" or "nash"."""

    order: int
    lr: float
    weight_decay: float = 0.0
    feedback: bool = True
    value_correction: bool = True
    gauss_newton: bool = True
    mu: float = 0.0
    clip: bool = True
    trust: float | None = None
    game: str = "cooperative"
    fisher_type: str | None = None
    track_loss_after: bool = False
    #: form Qbar_u for every player and return it (``StepOutcome.grads``), for ``.grad``
    set_grad: bool = False
    #: clip Qbar_u's norm before the curvature model (order 1 global, order 2 per player)
    max_grad_norm: float | None = None


class Controls(abc.ABC):
    """What the engine needs from the optimizer's state for one step: the curvature model,
    the hyper-parameters, the step counter, the sampling generator, the curvature state of a
    control (read only: the step returns the new states) and a parameter backup."""

    model: Any
    hp: dict[str, Any]
    step: int
    generator: torch.Generator | None

    @abc.abstractmethod
    def states(self, control: Stage) -> list[dict[str, Any]]:
        """The curvature state of each parameter of ``control``."""

    @abc.abstractmethod
    def backup(self) -> Any:
        """A copy of every parameter (taken before the update pass)."""

    @abc.abstractmethod
    def restore(self, backup: Any) -> None:
        """Put the parameters of ``backup`` back."""


@dataclass
class StepOutcome:
    """What ``BellmanEngine.step`` did: the loss before; ``skipped`` names what was not finite
    ("loss", "update", "value expansion"; parameters untouched); else ``new_states`` (per
    player: its parameters and their new curvature states, to commit) and ``result``."""

    loss: Tensor
    skipped: str | None = None
    new_states: dict[int, tuple[list[Tensor], list[dict[str, Any]]]] = field(default_factory=dict)
    result: StepResult | None = None
    #: per player: its parameters and Qbar_u (clipped, without weight decay), when formed
    grads: dict[int, tuple[Sequence[Tensor], list[Tensor]]] = field(default_factory=dict)


def weight_positions(stage: Stage, traj: Trajectory) -> int:
    """Weight-sharing positions P of a step's output per sample (1 for a Linear on vectors):
    the layer handler's count."""
    if stage.is_function:
        return 1
    return stage.derivatives.positions(stage.module, traj.states[stage.output][0].numel())


def _gather_tied(stages: Sequence[Stage], grads: Sequence[list[Tensor] | None]
                 ) -> list[list[Tensor] | None]:
    """Qbar_u per control: a parameter used by several steps (weight tying) gets the sum of
    its gradients over the uses, in its first user's control (as autograd sums them)."""
    owner: dict[int, tuple[int, int]] = {}
    out: list[list[Tensor] | None] = []
    for st, g in zip(stages, grads):
        if g is None or not st.has_control:
            out.append(g)
            continue
        mine: list[Tensor] = []
        for i, (p, gi) in enumerate(zip(st.params, g)):
            if st.owned[i]:
                owner[id(p)] = (st.index, len(mine))
                mine.append(gi)
        out.append(mine)
    for st, g in zip(stages, grads):
        if g is None or not st.shared:
            continue
        for i, (p, gi) in enumerate(zip(st.params, g)):
            if not st.owned[i]:
                o, pos = owner[id(p)]
                target = out[o]
                assert target is not None
                target[pos] = target[pos] + gi
    return out


class no_grad_fast:
    """``torch.no_grad()`` for the per-step path: the grad mode set and restored directly
    (torch's context object costs about 1.5 us per use, this one a fifth of that)."""

    __slots__ = ("prev",)

    def __enter__(self) -> None:
        self.prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)

    def __exit__(self, *exc: Any) -> None:
        torch._C._set_grad_enabled(self.prev)


_FOUND: dict[torch.device, tuple[Tensor, Tensor]] = {}


def all_finite(ts: Sequence[Tensor]) -> bool:
    """Whether every entry of every tensor is finite: one multi-tensor check (torch's
    ``_amp_foreach_non_finite_check_and_unscale_`` with scale 1, which leaves the values
    as they are) and one transfer; per-tensor norms where it does not apply."""
    if not ts:
        return True
    device = ts[0].device
    try:
        found, one = _FOUND[device]
    except KeyError:
        found, one = _FOUND.setdefault(device, (torch.zeros(1, device=device),
                                                torch.ones((), device=device)))
    try:
        found.zero_()
        torch._amp_foreach_non_finite_check_and_unscale_(list(ts), found, one)
        return not found.item()
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        # (another device per tensor, an older torch): the norms, which a non-finite
        # entry makes non-finite
        return all(math.isfinite(v) for v in torch.stack(
            [torch.linalg.vector_norm(t.detach().double()).cpu() for t in ts]).tolist())


def _aliases(a: Sequence[Tensor], bs: Sequence[Sequence[Tensor]]) -> bool:
    """Whether a tensor of ``a`` is one of ``bs`` (by identity)."""
    return not set(map(id, a)).isdisjoint([id(b) for bb in bs for b in bb])


def _diagnostics_fn(players: list[int], names: list[str], dirs: list[list[Tensor]],
                    lr: float) -> Callable[[], list[StageDiagnostics]]:
    """The per-player diagnostics of an order-1 step: |k| = lr |d| (one multi-tensor norm
    and one transfer when called)."""

    def make() -> list[StageDiagnostics]:
        flat = [d for ds in dirs for d in ds]
        with no_grad_fast():
            norms = torch.stack(torch._foreach_norm(flat)).tolist() if flat else []
        out, i = [], 0
        for t, name, ds in zip(players, names, dirs):
            sq = math.fsum(v * v for v in norms[i:i + len(ds)])
            out.append(StageDiagnostics(t, name, lr * math.sqrt(sq)))
            i += len(ds)
        return out

    return make


def _move(params: list[Tensor], policy: Policy) -> None:
    """u <- u + k for a policy's parameters: ``add_(d, alpha)`` where the policy has its
    direction (the rounding of order 1's update), else ``add_(k)``."""
    if policy.direction is None:
        torch._foreach_add_(params, list(policy.k))
    else:
        torch._foreach_add_(params, list(policy.direction), alpha=policy.alpha)


def _norm(ts: Sequence[Tensor]) -> Tensor:
    return torch.stack([torch.linalg.vector_norm(t) for t in ts]).square().sum().sqrt()


def _stacked_norm(ts: Sequence[Tensor]) -> Tensor:
    """|(t_1, ..., t_n)| as the norm of the tensors' norms (one multi-tensor norm)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(ts))))


def clip_factor(norm: Tensor, max_norm: float) -> Tensor:
    """min(1, max_norm / (norm + 1e-6)), as torch's ``clip_grad_norm_``."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def bound_correction(Q_x: Tensor, V_x: Tensor, trust: float) -> Tensor:
    """Q_x + c (V_x - Q_x) with the largest c <= 1 per sample such that the correction's norm
    is at most ``trust`` times |Q_x| (the trust bound of the value correction)."""
    return bound_correction_with_share(Q_x, V_x, trust)[0]


def bound_correction_with_share(Q_x: Tensor, V_x: Tensor, trust: float) -> tuple[Tensor, Tensor]:
    """``bound_correction`` and the share of samples it cut (a 0-dim tensor)."""
    (out,), share = bound_blocks([Q_x], [V_x], trust)
    return out, share


def bound_blocks(Q: Sequence[Tensor], V: Sequence[Tensor], trust: float
                 ) -> tuple[list[Tensor], Tensor]:
    """``bound_correction`` on a state of several blocks: the per-sample norms are those of
    the stacked blocks (one factor c per sample for all blocks)."""
    delta = [v - q for q, v in zip(Q, V)]
    B = delta[0].shape[0]

    def norm(ts: Sequence[Tensor]) -> Tensor:
        if len(ts) == 1:
            return torch.linalg.vector_norm(ts[0].reshape(B, -1), dim=1)
        return torch.stack([torch.linalg.vector_norm(t.reshape(B, -1), dim=1)
                            for t in ts]).square().sum(0).sqrt()

    dn, qn = norm(delta), norm(Q)
    cut = dn > trust * qn
    scale = torch.where(cut, trust * qn / dn.clamp_min(torch.finfo(dn.dtype).tiny),
                        torch.ones_like(dn))
    out = [q + d * scale.reshape(B, *([1] * (d.dim() - 1))) for q, d in zip(Q, delta)]
    return out, cut.to(dn.dtype).mean()


class BellmanEngine:
    """Orchestrates the nominal pass, the backward value recursion and the update pass."""

    def __init__(self, graph: Graph, loss: Loss, backend: Any):
        from ocnopt.backends.base import Backend

        if not isinstance(backend, Backend):
            raise TypeError(f"backend must be an ocnopt.backends.Backend, got {type(backend).__name__}")
        self.graph = graph
        self.stages = graph.stages
        self.loss = loss
        self.backend: Backend = backend
        #: per step, the control its curvature model sees (its own parameters)
        self.controls = [st.control_view() if st.has_control else st for st in self.stages]
        self._tied = any(st.shared for st in self.stages)
        #: the players (steps with parameters of their own), their controls and parameters
        self._players = [st.index for st in self.stages
                         if st.has_control and self.controls[st.index].params]
        self._player_views = [self.controls[t] for t in self._players]
        self._player_params = [p for v in self._player_views for p in v.params]
        #: order-1 diagnostics are made on first read (``StepResult.pending``) where the
        #: directions are small (at most ``FOREACH_MAX_NUMEL`` entries: kept until then)
        from .curvature.base import FOREACH_MAX_NUMEL
        self._lazy_diagnostics = sum(p.numel() for p in self._player_params) <= FOREACH_MAX_NUMEL
        #: ``_need_stats`` of a model that never asks for statistics
        self._no_stats = [False] * len(self.stages)
        #: data-parallel communication (``ocnopt.distributed``; the identity on one process):
        #: every batch mean below is made global by one of its calls (docs/method.md section 13)
        self.comm: Collective = NO_COMM

    # -- 1. nominal forward pass -----------------------------------------------------------------
    @profiled("ocnopt.nominal")
    def nominal(self, inputs: Tensor, *, input_value: bool = False) -> Trajectory:
        """Forward pass recording the states; ``input_value`` also records what V_x at the
        network input needs (its block is tracked)."""
        return self.backend.forward(self.graph, inputs, input_value=input_value)

    # -- terminal cost -----------------------------------------------------------------------
    @profiled("ocnopt.terminal")
    def terminal(self, traj: Trajectory, targets: Tensor, *, fisher_type: str | None = None,
                 generator: torch.Generator | None = None, hessian: bool = False) -> Terminal:
        """V_T = phi at x_T: loss, per-sample gradient, and (``hessian``) V_xx = d^2 phi."""
        out = traj.output.detach()
        self.loss.check(out, targets)
        traj.targets, traj.generator = targets, generator
        loss, V_x = self.loss.value_gradient(out, targets)
        factor = None
        if fisher_type not in ("type-2", "mc") and not hessian:
            return Terminal(loss, V_x)  # (the engine checks that the loss is finite)
        if not torch.isfinite(loss):  # the step will be skipped: sample nothing
            return Terminal(loss, V_x)
        if fisher_type == "type-2":
            factor = self.loss.hessian_sqrt(out, targets)
        elif fisher_type == "mc":
            factor = self.loss.sample_gradient(out, generator).unsqueeze(1)
        V_xx = self.loss.hessian(out, targets) if hessian else None
        return Terminal(loss, V_x, factor, V_xx)

    # -- 2. backward value recursion ----------------------------------------------------------
    @profiled("ocnopt.backward")
    def expand(self, traj: Trajectory, terminal: Terminal, *, need_stats: Sequence[bool],
               keep_values: bool = False, skip_u: Sequence[bool] | None = None
               ) -> tuple[list[QExpansion], list[Tensor | None]]:
        """First-order value recursion V_X = Q_X = F_X^T V'_X (backprop, docs/method.md
        section 4) with Qbar_u and the requested statistics per step. Returns the expansions
        and, when ``keep_values``, V_x of every tensor by value id (None where not tracked)."""
        return self.backend.backward(self.graph, traj, terminal, need_stats=need_stats,
                                     keep_values=keep_values, skip_u=skip_u)

    @profiled("ocnopt.backward")
    def second_order(
        self,
        traj: Trajectory,
        terminal: Terminal,
        policy_fn: PolicyFn,
        *,
        lr: float,
        weight_decay: float = 0.0,
        feedback: bool = True,
        value_correction: bool = True,
        gauss_newton: bool = True,
        mu: float = 0.0,
        clip: bool = True,
        need_stats: Sequence[bool],
        need_quu: bool = False,
        keep: bool = False,
        targets: Tensor | None = None,
        generator: torch.Generator | None = None,
        stats_from_value: bool = True,
        trust: float | None = None,
        skip_u: Sequence[bool] | None = None,
        game: str = "cooperative",
        controls: Sequence[bool] | None = None,
        gradient: Callable[[Stage, list[Tensor]], list[Tensor]] | None = None,
    ) -> SecondOrderPass:
        """Second-order backward value recursion (docs/method.md sections 2-4, 7) with the
        policy of every player.

        Per step, from the value at X_{t+1}: the Q expansion (backend), the curvature model's
        step (``policy_fn`` returns the open-loop step k = -lr d and the solver
        v -> M^{-1} v), the feedback K dX = -lr M^{-1} (1/B) sum_i Q_uX^(i) dX^(i) (for
        ``game="nash"`` without the blocks of dX that depend on a simultaneous player), and
        the value update V_X = Q_X - lr Q_uX^T M^{-1} Qbar_u, V_XX = Q_XX - (lr/B) Q_uX^T
        M^{-1} Q_uX (+ mu I, clipped to PSD), each in the backend's representation of V_XX.
        ``weight_decay`` is the coupled l_t(u) = wd/2 |u|^2 (added to Q_u and Q_uu here).
        Kronecker statistics come from the propagated value Hessian V'_xx (its per-sample
        square-root factor) when ``stats_from_value``, else from V'_x (empirical Fisher).
        ``controls[t]`` False: step t has parameters but no policy of its own (tied weights).
        ``gradient(stage, Qbar_u)`` (when given) sees each player's Qbar_u before the weight
        decay is added and returns the Qbar_u to use (the ``max_grad_norm`` clip).
        """
        backend = self.backend
        graph = self.graph
        T = len(self.stages)
        B = self.comm.total(terminal.V_x.shape[0])  # the global batch (feedback, value update)
        comm = self.comm
        backend.check_second_order(graph, traj, need_quu=need_quu)
        value = backend.terminal_value(self.loss, traj, terminal, targets=targets,
                                       generator=generator)
        policies: list[Policy | None] = [None] * T
        expansions: list[QExpansion | None] = [None] * T
        Vx_list: list[Tensor | None] = [None] * (T + 1)
        Vxx_list: list[Tensor | None] = [None] * (T + 1)
        if keep:
            Vx_list[T], Vxx_list[T] = value.V[T], value.hessian_block(T)
        # the predicted change sum_t (k_t . Qbar_u + k_t^T Qbar_uu k_t / 2), summed once at the
        # end: the products k . Qbar_u of every player in one multi-tensor multiply
        dot_k: list[Tensor] = []
        dot_q: list[Tensor] = []
        given_kQ: list[Tensor] = []
        quads: list[Tensor] = []
        bounded: list[Tensor | None] = [None] * T
        for t in reversed(range(T)):
            stage = self.stages[t]
            player = stage.has_control and (controls is None or controls[t])
            exp = backend.expand_stage(stage, traj, value, gauss_newton=gauss_newton,
                                       need_quu=need_quu and player,
                                       need_stats=need_stats[t], keep=keep,
                                       stats_from_value=stats_from_value,
                                       skip_u=bool(skip_u and skip_u[t]))
            if comm.active:  # hook: Qbar_u and E[Q_uu] are batch means (local ones here)
                self._reduce_expansion(exp)
            if exp.Q_uu is not None and weight_decay:
                exp.Q_uu = exp.Q_uu + weight_decay * torch.eye(
                    exp.Q_uu.shape[0], dtype=exp.Q_uu.dtype, device=exp.Q_uu.device)
            if exp.stats is not None and need_quu:
                exp.stats.Q_uu = exp.Q_uu
            minv = None
            if player:
                if gradient is not None and exp.Q_u is not None:
                    exp.Q_u = gradient(stage, exp.Q_u)
                if weight_decay:  # Qbar_u is formed whenever weight decay is in it
                    assert exp.Q_u is not None
                    exp.Q_u = [g.add(p.detach(), alpha=weight_decay)
                               for g, p in zip(exp.Q_u, stage.params)]
                k, minv = policy_fn(stage, exp.Q_u, exp.stats)
                quad = backend.quadratic(stage, exp, k)
                if comm.active:  # hook: k^T Qbar_uu k (and k . Qbar_u when not formed): means
                    quad, exp.kQ = self._reduce_quadratic(quad, exp.kQ if exp.Q_u is None
                                                          else None)
                if weight_decay:
                    quad = quad + weight_decay * sum(kk.square().sum() for kk in k)
                if exp.Q_u is None:
                    assert exp.kQ is not None, "a backend that skips Qbar_u gives k . Qbar_u"
                    given_kQ.append(exp.kQ.reshape(()))
                else:
                    dot_k.extend(k)
                    dot_q.extend(exp.Q_u)
                quads.append(quad.reshape(()))
                ignore = graph.nash_ignored[t] if game == "nash" else frozenset()
                policies[t] = Policy(k=k, feedback=backend.feedback(stage, exp, minv, lr, B,
                                                                    ignore=ignore)
                                     if feedback else None)
            if t > 0 or keep:
                value = backend.value_update(stage, exp, value, minv, lr, B,
                                             value_correction=value_correction and minv is not None,
                                             mu=mu, clip=clip, trust=trust)
                bounded[t] = value.bounded
            expansions[t] = exp if keep else None
            if keep and t in value.V:
                Vx_list[t], Vxx_list[t] = value.V[t], value.hessian_block(t)
        predicted = 0.0
        if quads:
            terms = [d.sum() for d in torch._foreach_mul(dot_k, dot_q)] if dot_k else []
            predicted = float(torch.stack(terms + given_kQ).sum() + 0.5 * torch.stack(quads).sum()
                              if terms or given_kQ else 0.5 * torch.stack(quads).sum())
        return SecondOrderPass(policies, expansions, Vx_list, Vxx_list, predicted, bounded)

    # -- one optimizer step ----------------------------------------------------------------------
    def step(self, inputs: Tensor, targets: Tensor, config: StepConfig, controls: Controls
             ) -> StepOutcome:
        """One Bellman step on the batch: nominal pass, terminal cost, the backward recursion
        (order 1: backprop, ``_first_order_step``; order 2 or curvature "full": the
        second-order pass with the policies, ``_second_order_step``), the finiteness checks
        and the update (order 1 open loop, order 2 the update pass). Parameters are moved in
        place only by a step that succeeds (restored from ``controls.backup`` when the update
        pass ends non-finite); the curvature states of the step are returned, not committed."""
        curv = controls.model
        hp, k = controls.hp, controls.step
        need_stats = self._need_stats(curv, hp, k, controls)
        fisher = config.fisher_type if need_stats is not self._no_stats and any(need_stats) \
            else None
        if fisher == "empirical":
            fisher = None
        second = config.order == 2 or curv.needs_full
        # order 1 as one backward over a connected forward (the backend's fast path): the
        # same products as the per-step VJPs (the terminal factor's columns too: type-2 / mc
        # statistics); not for tied parameters (their Qbar_u is gathered per owner)
        connected = (not second and not self._tied and self.backend.connected_first_order)
        try:
            if connected:
                # nothing recorded per step where nothing reads it: the model's own forward
                record = (not self.graph.direct or config.track_loss_after
                          or (need_stats is not self._no_stats and any(need_stats)))
                with region("ocnopt.nominal"):
                    traj = self.backend.forward_connected(self.graph, inputs, record=record)
            else:
                traj = self.nominal(inputs)
        except RuntimeError as err:
            raise ValueError(f"inputs of shape {tuple(inputs.shape)} do not fit the model: {err}"
                             ) from err
        # (a step that samples nothing takes no generator, whose state is then not kept)
        terminal = self.terminal(traj, targets, fisher_type=fisher,
                                 generator=None if connected and fisher != "mc"
                                 else controls.generator)
        # hook: the global batch B and the global mean loss (a non-finite loss on any process
        # is non-finite on every one: all skip)
        B, terminal.loss = self.comm.begin(inputs.shape[0], terminal.loss)
        if not math.isfinite(terminal.loss.item()):
            return StepOutcome(terminal.loss, skipped="loss")
        skip_u = self._skip_u(config, curv, hp, need_stats, traj, B)
        if second:
            return self._second_order_step(traj, terminal, targets, config, controls,
                                           need_stats, skip_u)
        return self._first_order_step(traj, terminal, targets, config, controls, need_stats,
                                      skip_u, connected)

    def _need_stats(self, curv: CurvatureModel, hp: dict[str, Any], k: int, controls: Controls
                    ) -> list[bool]:
        """Per step, whether the curvature model asks for statistics at step ``k``
        (``self._no_stats``, shared, for a model that never does)."""
        if type(curv).wants_statistics is CurvatureModel.wants_statistics:  # never any
            return self._no_stats
        views = self.controls
        return [st.has_control and any(st.owned) and curv.uses_statistics(st, hp)
                and curv.wants_statistics(k, hp, controls.states(views[st.index]))
                for st in self.stages]

    def _skip_u(self, config: StepConfig, curv: CurvatureModel, hp: dict[str, Any],
                need_stats: list[bool], traj: Trajectory, B: int) -> list[bool] | None:
        """Per step, whether Qbar_u's tensors may be left unformed: the curvature model will
        not read them (its direction comes from the statistics' rows, which are the
        gradient's with the empirical Fisher); order 2 also needs M^-1 Qbar_u for the value
        correction: the direction when it is that solve, i.e. without momentum. None: none."""
        if (config.set_grad or config.max_grad_norm is not None or not any(need_stats)
                or not (config.order == 1 or curv.direction_is_solve(hp))):
            return None
        gradient_rows = config.fisher_type in (None, "empirical")
        return [need_stats[t] and st.kronecker
                and curv.gradient_unused(st, hp, B, weight_positions(st, traj),
                                         gradient_rows=gradient_rows)
                for t, st in enumerate(self.stages)]

    def _first_order_step(self, traj: Trajectory, terminal: Terminal, targets: Tensor,
                          config: StepConfig, controls: Controls, need_stats: list[bool],
                          skip_u: list[bool] | None, connected: bool) -> StepOutcome:
        """Order 1: Qbar_u of every player from one backward (backprop), every player's
        curvature update at once (``CurvatureModel.update_many``: the directions d), the
        finiteness check of the steps k = -lr d, and u <- u + k in one multi-tensor call (or
        the update pass when the loss after the step is asked for)."""
        stages, curv, hp = self.stages, controls.model, controls.hp
        if connected:
            with region("ocnopt.backward"):
                expansions = self.backend.backward_connected(
                    self.graph, traj, terminal, need_stats=need_stats, skip_u=skip_u)
        else:
            expansions, _ = self.expand(traj, terminal, need_stats=need_stats, skip_u=skip_u)
        # the batch quantities of order 1: Qbar_u per player (expansions[t].Q_u) and the
        # curvature statistics (expansions[t].stats)
        grads = [e.Q_u for e in expansions]
        if self.comm.active:  # hook: Qbar_u of every step, one bucketed all-reduce
            grads = self._reduce_gradients(grads)
        if self._tied:
            grads = _gather_tied(stages, grads)
        players, p_views = self._players, self._player_views
        player_norms: list[Tensor] = []
        if config.max_grad_norm is not None and players:  # the global norm, as torch's clip
            with torch.no_grad():
                norm = _norm([g for t in players for g in grads[t] or ()])
                player_norms.append(norm)
                c = clip_factor(norm, config.max_grad_norm)
                grads = [None if g is None else [x * c for x in g] for g in grads]
        p_states = [controls.states(v) for v in p_views]
        if self.comm.active:  # hook: the model may start its communication for all players
            curv.prefetch([(v, s, expansions[t].stats)
                           for t, v, s in zip(players, p_views, p_states)], hp, controls.step)
        lr, wd = config.lr, config.weight_decay
        grads_out: dict[int, tuple[Sequence[Tensor], list[Tensor]]] = {}
        p_grads: list[list[Tensor]] = []
        for t, view in zip(players, p_views):
            Q_u = grads[t]
            if config.set_grad and Q_u is not None:
                grads_out[t] = (view.params, Q_u)
            if wd:  # gradient_unused is False with weight decay: Q_u was formed
                assert Q_u is not None
                Q_u = [g.add(p.detach(), alpha=wd) for g, p in zip(Q_u, view.params)]
            p_grads.append(Q_u if Q_u is not None else [])
        if not players:
            return StepOutcome(terminal.loss, result=StepResult(loss=terminal.loss))
        # every player's curvature update at once (one multi-tensor pass for the diagonal
        # models): the directions d, the step k = -lr d
        with no_grad_fast(), region("ocnopt.curvature"):
            upds, dirs = curv.update_many(p_views, p_states, p_grads,
                                          [expansions[t].stats for t in players], hp,
                                          controls.step, scratch=True)
        flat = [d for ds in dirs for d in ds]
        names = [stages[t].name for t in players]
        # |k| = lr |d| per player: left for the first read of ``last_step`` where the
        # directions stay as they are until then and are small (kept at most until the next
        # step); else now (the directions are Qbar_u, which ``.grad`` exposes, or large)
        pending = None
        if self._lazy_diagnostics and not _aliases(flat, [g for _, g in grads_out.values()]):
            pending = _diagnostics_fn(players, names, dirs, lr)
        loss_after = None
        params = self._player_params
        if config.track_loss_after:  # the update pass: u + k, then the loss at the output
            policies: list[Policy | None] = [None] * len(stages)
            for t, view, ds in zip(players, p_views, dirs):
                policies[t] = Policy(k=list(torch._foreach_mul(ds, -lr)), params=view.params,
                                     direction=ds, alpha=-lr)
            backup = controls.backup()
            _, loss_after, _ = self.update_pass(traj, policies, targets)
            finite = loss_after is not None and math.isfinite(loss_after)
        else:
            with no_grad_fast():
                backup = controls.backup()  # restored on an exception or a non-finite update
                self.apply_directions(params, flat, -lr)
            finite = True
        # a step that leaves a parameter non-finite (d not finite, or lr d or u + k beyond the
        # dtype's range) is undone and skipped: one check of every parameter after the move
        if not finite or not all_finite(params):
            controls.restore(backup)
            return StepOutcome(terminal.loss, skipped="update")
        result = StepResult(loss=terminal.loss, loss_after=loss_after,
                            grad_norm=float(player_norms[0]) if player_norms else None)
        if pending is None:
            result.stages = _diagnostics_fn(players, names, dirs, lr)()
        else:
            result.pending = pending
        return StepOutcome(terminal.loss,
                           new_states={t: (view.params, upd)
                                       for t, view, upd in zip(players, p_views, upds)},
                           result=result, grads=grads_out)

    def _second_order_step(self, traj: Trajectory, terminal: Terminal, targets: Tensor,
                           config: StepConfig, controls: Controls, need_stats: list[bool],
                           skip_u: list[bool] | None) -> StepOutcome:
        """Order 2 (or curvature "full"): the second-order backward pass with every player's
        policy (``second_order``), then the update pass (order 2, or the loss after the step
        asked for) or the open-loop update."""
        stages, views, curv, hp = self.stages, self.controls, controls.model, controls.hp
        k = controls.step
        gradient_rows = config.fisher_type in (None, "empirical")
        lr, wd = config.lr, config.weight_decay
        new_states: dict[int, list[dict[str, Any]]] = {}
        directions: dict[int, list[Tensor]] = {}
        grads_out: dict[int, tuple[Sequence[Tensor], list[Tensor]]] = {}
        player_norms: list[Tensor] = []

        def gradient(stage: Stage, Q_u: list[Tensor]) -> list[Tensor]:
            """One player's Qbar_u, clipped by its own norm, recorded for ``.grad``."""
            if config.max_grad_norm is not None:
                norm = _norm(Q_u)
                player_norms.append(norm)
                c = clip_factor(norm, config.max_grad_norm)
                Q_u = [g * c for g in Q_u]
            if config.set_grad:
                grads_out[stage.index] = (views[stage.index].params, Q_u)
            return Q_u

        def policy_fn(stage: Stage, Q_u: list[Tensor] | None, stats: Any) -> tuple[list[Tensor], Any]:
            view = views[stage.index]
            states = controls.states(view)
            with torch.no_grad(), region("ocnopt.curvature"):  # Q_u None: not formed, no grads
                upd, dirs = curv.update(view, states, Q_u if Q_u is not None else [],
                                        view.params, stats, hp, k)
            new_states[stage.index] = upd
            directions[stage.index] = dirs
            solver = Solver(curv, view, upd, hp)
            if stats is not None and stats.aA is not None:
                solver.cache["aA"] = (stats.a, stats.aA)  # a A^-1 of the direction: Gram reuses it
            if curv.direction_is_solve(hp):  # d = M^{-1} Qbar_u: reuse it in the value update
                solver.remember(Q_u, dirs)
            return [d.mul(-lr) for d in dirs], solver

        with torch.no_grad():
            try:
                result = self.second_order(
                    traj, terminal, policy_fn, lr=lr, weight_decay=wd,
                    feedback=config.order == 2 and config.feedback,
                    value_correction=config.order == 2 and config.value_correction,
                    gauss_newton=config.gauss_newton, mu=config.mu, clip=config.clip,
                    need_stats=need_stats, need_quu=curv.needs_full, targets=targets,
                    generator=controls.generator,
                    stats_from_value=not gradient_rows,
                    trust=config.trust if config.order == 2 else None, skip_u=skip_u,
                    game=config.game,
                    gradient=gradient if config.set_grad or config.max_grad_norm is not None
                    else None)
            except torch.linalg.LinAlgError:  # a decomposition of non-finite matrices
                return StepOutcome(terminal.loss, skipped="value expansion")
        policies, predicted = result.policies, result.predicted_change
        bounded = result.value_bounded
        controlled = [(st, pol) for st, pol in zip(stages, policies) if pol is not None]
        for st, pol in controlled:  # u moves by add_(d, alpha=-lr), as at order 1
            pol.direction, pol.alpha = directions[st.index], -lr
        update_pass = config.order == 2 or config.track_loss_after
        with torch.no_grad():
            # squared norms |k|^2 per player, without a parameter-sized temporary per tensor
            if update_pass:  # as tensors: the update pass's trust bound reads |k|
                # (one multi-tensor norm; the squares summed per player)
                counts = [len(pol.k) for _, pol in controlled]
                flat_k = [d for _, pol in controlled for d in pol.k]
                squares = (torch.stack(torch._foreach_norm(flat_k)).square() if flat_k
                           else terminal.V_x.new_zeros(0))
                k_norms = (squares.reshape(len(counts), counts[0]).sum(1)
                           if len(set(counts)) == 1 else
                           torch.stack([c.sum() for c in squares.split(counts)]))
                sq_norms = k_norms.tolist()
            else:  # one multi-tensor norm and one transfer; squares summed here
                norms = torch.stack(torch._foreach_norm(
                    [d for _, pol in controlled for d in pol.k])).tolist()
                sq_norms, i = [], 0
                for _, pol in controlled:
                    sq_norms.append(math.fsum(v * v for v in norms[i:i + len(pol.k)]))
                    i += len(pol.k)
        if not all(map(math.isfinite, sq_norms)):
            return StepOutcome(terminal.loss, skipped="update")
        if update_pass:
            for (_, pol), n in zip(controlled, k_norms.sqrt()):
                pol.k_norm = n

        loss_after, fb_norms = None, [0.0] * len(controlled)
        if update_pass:  # order 2: the update pass is the step
            backup = controls.backup()
            _, loss_after, norms = self.update_pass(
                traj, policies, targets, trust=config.trust if config.order == 2 else None)
            fb_norms = norms or fb_norms
            if loss_after is None or not math.isfinite(loss_after) \
                    or not all(map(math.isfinite, fb_norms)):
                controls.restore(backup)
                return StepOutcome(terminal.loss, skipped="update")
        else:
            controls.backup()  # an exception while moving the parameters restores them
            self.apply_open_loop(policies)
        n = len(controlled)
        # the trust bound's diagnostics, converted at once
        one, zero = terminal.V_x.new_ones(()), terminal.V_x.new_zeros(())
        stacked = torch.stack(
            [one if pol.feedback_scale is None else pol.feedback_scale.reshape(())
             for _, pol in controlled]
            + [zero if bounded is None or bounded[st.index] is None
               else bounded[st.index].reshape(()).to(zero.dtype)  # type: ignore[union-attr]
               for st, _ in controlled]) if controlled else zero.new_zeros(0)
        if self.comm.active:  # hook: the shares the trust bound cut are batch means
            stacked = torch.cat([stacked[:n], *self.comm.mean([stacked[n:]], tag="diagnostics")])
        values = stacked.tolist()
        scales, cut = values[:n], values[n:]
        diagnostics = [StageDiagnostics(st.index, st.name, float(nk) ** 0.5, fb, sc, vb)
                       for (st, _), nk, fb, sc, vb in zip(controlled, sq_norms, fb_norms,
                                                          scales, cut)]
        return StepOutcome(terminal.loss, new_states={st.index: (views[st.index].params,
                                                                 new_states[st.index])
                                                      for st, _ in controlled},
                           result=StepResult(loss=terminal.loss, loss_after=loss_after,
                                             predicted_change=predicted, stages=diagnostics,
                                             grad_norm=float(_norm(player_norms))
                                             if player_norms else None),
                           grads=grads_out)

    # -- data-parallel hooks (docs/method.md section 13) ----------------------------------------
    def _reduce_gradients(self, grads: list[list[Tensor] | None]) -> list[list[Tensor] | None]:
        """Qbar_u of every step (local batch means) -> global batch means, in one call."""
        flat = [g for gs in grads if gs is not None for g in gs]
        if not flat:
            return grads
        it = iter(self.comm.mean(flat, tag="gradient"))
        return [None if gs is None else [next(it) for _ in gs] for gs in grads]

    def _reduce_expansion(self, exp: QExpansion) -> None:
        """Order 2: a step's Qbar_u and E[Q_uu] (local batch means) -> global ones."""
        parts = (exp.Q_u or []) + ([exp.Q_uu] if exp.Q_uu is not None else [])
        if not parts:
            return
        out = list(self.comm.mean(parts, tag="gradient"))
        if exp.Q_uu is not None:
            exp.Q_uu = out.pop()
        if exp.Q_u is not None:
            exp.Q_u = out

    def _reduce_quadratic(self, quad: Tensor, kQ: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """k^T Qbar_uu k and (where Qbar_u was not formed) k . Qbar_u: global batch means."""
        if kQ is None:
            (quad,) = self.comm.mean([quad], tag="predicted change")
            return quad, None
        quad, kQ = self.comm.mean([quad, kQ.to(quad.dtype)], tag="predicted change")
        return quad, kQ

    # -- 3. forward update pass ---------------------------------------------------------------
    @profiled("ocnopt.update")
    @torch.no_grad()
    def update_pass(self, traj: Trajectory, policies: Sequence[Policy | None],
                    targets: Tensor | None = None, trust: float | None = None
                    ) -> tuple[list[Tensor], float | None, list[float]]:
        """Apply du_t = k_t + K_t dX_t step by step (dx_0 = 0), replaying the graph with the
        new controls; return the new tensors Xhat by value id, the loss at the output (None
        without targets) and the norm of each player's feedback part K_t dX_t (0 without
        feedback)."""
        nominal = traj.states
        states = [nominal[0]]
        live: dict[int, Tensor] = {0: nominal[0]}
        fb_norms: list[Tensor] = []
        for stage, policy in zip(self.stages, policies):
            if policy is not None:
                if policy.feedback is not None:  # before u changes: it may use the kept graph
                    fb: Sequence[Tensor] = policy.feedback.fn(
                        {j: live[j] - nominal[j] for j in policy.feedback.blocks})
                    # hook: -lr M^-1 (1/B) sum_i Q_uX^(i) dX^(i), the sum over every process
                    fb = self.comm.sum(fb, tag="feedback")
                    fb_norm = _stacked_norm(fb)
                    if trust is not None:
                        k_norm = policy.k_norm if policy.k_norm is not None else _norm(policy.k)
                        # min(1, trust |k| / |K dX|), 1 where K dX = 0 (0/0 -> nan -> 1)
                        scale = (k_norm * trust / fb_norm).clamp_(max=1.0).nan_to_num_(1.0)
                        fb_norm = fb_norm * scale
                    else:
                        scale = torch.ones_like(fb_norm)
                    policy.feedback_scale = scale
                    params = list(policy.params or stage.params)  # u + k + s K dX
                    _move(params, policy)
                    torch._foreach_addcmul_(params, list(fb), [scale] * len(params))
                    fb_norms.append(fb_norm)
                else:
                    _move(list(policy.params or stage.params), policy)
                    fb_norms.append(states[0].new_zeros(()))
            if stage.is_function:
                z = stage.replay(tuple(live[j] for j in stage.inputs), traj.contexts[stage.index])
            else:
                z = stage.replay(live[stage.inputs[0]], traj.contexts[stage.index])
            for j in stage.frees:
                del live[j]
            live[stage.output] = z
            states.append(z)
        loss_after = None
        if targets is not None:
            after = self.loss.mean(states[-1], targets)
            (after,) = self.comm.mean([after], tag="loss after")  # hook: the global mean
            loss_after = float(after)
        norms = torch.stack(fb_norms).tolist() if fb_norms else []
        return states, loss_after, norms

    @profiled("ocnopt.update")
    def apply_directions(self, params: list[Tensor], directions: list[Tensor], alpha: float
                         ) -> None:
        """u <- u + alpha d for every parameter (order 1: k = -lr d), one multi-tensor call
        (called with gradients off)."""
        torch._foreach_add_(params, directions, alpha=alpha)

    @profiled("ocnopt.update")
    @torch.no_grad()
    def apply_open_loop(self, policies: Sequence[Policy | None]) -> None:
        """u_t <- u_t + k_t for every player (order 1: no feedback, no forward pass needed)."""
        params = [p for stage, policy in zip(self.stages, policies) if policy is not None
                  for p in (policy.params or stage.params)]
        if not params:
            return
        given = [pol for pol in policies if pol is not None]
        alphas = {pol.alpha for pol in given if pol.direction is not None}
        if len(alphas) == 1 and all(pol.direction is not None for pol in given):
            torch._foreach_add_(params, [d for pol in given for d in pol.direction or ()],
                                alpha=alphas.pop())  # u <- u + alpha d, k = alpha d
        else:
            torch._foreach_add_(params, [d for pol in given for d in pol.k])


__all__ = ["BellmanEngine", "StepConfig", "Controls", "StepOutcome", "weight_positions",
           "Trajectory", "Terminal", "ValueFunction", "QExpansion", "Policy", "Feedback",
           "SecondOrderPass", "StepResult", "StageDiagnostics", "bound_correction",
           "bound_correction_with_share", "bound_blocks"]
