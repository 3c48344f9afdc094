"""Exact autograd backend: derivatives of each stage by ``torch.autograd`` / ``torch.func``.

First-order terms (docs/method.md section 3): the nominal pass cuts the autograd graph at every
stage input, so the backward value recursion is one vector-Jacobian product per stage,

    (Q_x, B * Qbar_u) = (f_x^T V'_x, sum_i f_u^(i)T V'_x^(i)),

which costs exactly one backpropagation. Order 2 adds, from per-sample Jacobians of the stage
function (``torch.func.vmap(jacrev)``), the full matrices (docs/method.md section 2)

    Q_xx = f_x^T V'_xx f_x + V'_x . f_xx,   Q_ux = f_u^T V'_xx f_x + V'_x . f_ux,
    Qbar_uu = E_i[f_u^T V'_xx f_u + V'_x . f_uu],

where the contraction terms V'_x . f_ab are Hessians of psi(x, u) = <V'_x, f(x, u)> and are
dropped under Gauss-Newton. Works for any stage ``torch.func`` can differentiate.

Cost per stage (n_in, n_out per-sample state sizes, m control size, B batch, e bytes per
entry): memory e * (B (n_out n_in + n_out m + n_in^2 + m n_in + n_out^2) + m^2 [if Qbar_uu]);
time O(B n_out (n_in^2 + m n_in)) plus O(B n_out m^2) for Qbar_uu. ``memory_budget`` (bytes)
bounds the first; a stage over budget is refused with its sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import hessian, jacfwd, jacrev, vmap

from ocnopt.curvature.base import Solver, StageStatistics, scalar_arg
from ocnopt.derivatives.ode import AdjointDerivatives
from ocnopt.engine import (
    Feedback,
    QExpansion,
    Terminal,
    Trajectory,
    ValueFunction,
    bound_blocks,
)
from ocnopt.graph import Graph
from ocnopt.stages import Stage

from .base import Backend

DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes


class MemoryBudgetError(RuntimeError):
    """The exact backend would need more memory for a stage than its budget allows."""


@dataclass
class SecondOrderTerms:
    """Per-sample second-order terms of one step on the augmented state, flattened:
    F_X (B, n_out, n_in), F_u (B, n_out, m), Q_XX (B, n_in, n_in), Q_uX (B, m, n_in),
    Qbar_uu (m, m) or None, and psi_uu (m, m) mean contraction term (None under GN)."""

    f_x: Tensor
    f_u: Tensor | None
    Q_xx: Tensor
    Q_ux: Tensor | None
    Q_uu: Tensor | None
    psi_uu: Tensor | None


@dataclass
class ExactValue(ValueFunction):
    """Value at X_t: V_X blocks (B, *n_j) and V_XX (B, N, N) full per sample over the blocks
    in ``layout`` order (N = sum of the blocks' sizes)."""

    V: dict[int, Tensor]
    V_xx: Tensor
    layout: tuple[int, ...]
    bounded: Tensor | None = None

    def _offset(self, j: int) -> tuple[int, int]:
        o = 0
        for i in self.layout:
            n = self.V[i][0].numel()
            if i == j:
                return o, n
            o += n
        raise KeyError(j)

    def hessian_block(self, j: int) -> Tensor:
        o, n = self._offset(j)
        if len(self.layout) == 1:
            return self.V_xx
        return self.V_xx[:, o:o + n, o:o + n]

    def flat(self) -> Tensor:
        return _cat_blocks([self.V[j] for j in self.layout])


@dataclass
class ExactExpansion(QExpansion):
    terms: SecondOrderTerms | None = None
    next_value: ExactValue | None = None
    layout: tuple[int, ...] = ()  # blocks of X_t, in the order of the flattened matrices
    shapes: dict[int, torch.Size] = field(default_factory=dict)


def _cat_blocks(blocks: Sequence[Tensor]) -> Tensor:
    """(B, *n_j) blocks -> (B, sum n_j); one block is only reshaped."""
    B = blocks[0].shape[0]
    if len(blocks) == 1:
        return blocks[0].reshape(B, -1)
    return torch.cat([b.reshape(B, -1) for b in blocks], dim=1)


def _split_blocks(flat: Tensor, layout: Sequence[int], shapes: Mapping[int, torch.Size]
                  ) -> dict[int, Tensor]:
    """(B, N) -> blocks (B, *shape_j) in ``layout`` order."""
    if len(layout) == 1:
        j = layout[0]
        return {j: flat.reshape(flat.shape[0], *shapes[j])}
    sizes = [math.prod(shapes[j]) for j in layout]
    return {j: c.reshape(flat.shape[0], *shapes[j])
            for j, c in zip(layout, flat.split(sizes, dim=1))}


#: torch's autograd engine, called as ``torch.autograd.grad`` calls it (without its Python-side
#: checks of the arguments, which the engine's own call sites satisfy); None where this torch
#: has no such attribute (``_vjp`` then calls ``torch.autograd.grad``)
_ENGINE = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)


def _vjp(output: Tensor, cotangent: Tensor, inputs: Sequence[Tensor], retain: bool = False
         ) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(output, inputs, cotangent, retain_graph=retain,
    allow_unused=True)`` (None for an input the output does not depend on); ``cotangent`` has
    the output's shape and dtype."""
    if _ENGINE is not None:
        try:
            return tuple(_ENGINE.run_backward((output,), (cotangent,), retain, False,
                                              tuple(inputs), True, False))
        except TypeError:  # another signature: the public function
            pass
    return torch.autograd.grad(output, inputs, grad_outputs=cotangent, retain_graph=retain,
                               allow_unused=True)


def _run_step(stage: Stage, xs: tuple[Tensor, ...]) -> tuple[Tensor, Any]:
    """A step's nominal forward on the tensors it reads: (its output, its replay context);
    ``TypeError`` when the step does not return one tensor."""
    out, ctx = stage.forward(stage.handler_input(xs))
    if not isinstance(out, Tensor):
        raise TypeError(f"{stage} returned {type(out).__name__}: a step must return one tensor")
    return out, ctx


def _player_lists(stages: Sequence[Stage]) -> tuple[list[tuple[int, int, int]], list[Tensor]]:
    """(step, first index, count) of each player's parameters in the flat list of every
    player's parameters, and that list."""
    where: list[tuple[int, int, int]] = []
    wrt: list[Tensor] = []
    for t, stage in enumerate(stages):
        if stage.has_control:
            where.append((t, len(wrt), len(stage.params)))
            wrt.extend(stage.params)
    return where, wrt


#: ``backward_connected``'s expansion of a step without Qbar_u or statistics (shared, read
#: only), and its ``Q_args`` (not formed on the connected path)
_NO_ARGS: list[Tensor | None] = []
_NOTHING = QExpansion(Q_args=_NO_ARGS, Q_u=None)


class GraphBackend(Backend):
    """The nominal pass on per-step graph pieces and the first-order value recursion (one VJP
    per step, value derivatives added where a tensor is read twice: the fork rule): shared by
    every backend that computes derivatives with torch.autograd."""

    # -- nominal pass ---------------------------------------------------------------------------
    def forward(self, graph: Graph, inputs: Tensor, *, input_value: bool = False) -> Trajectory:
        x0 = inputs.detach()
        states = [x0]
        tracked = [bool(input_value and x0.is_floating_point())]
        contexts, pieces = [], []
        with torch.enable_grad():
            for stage in graph.stages:
                leaves = tuple(states[j].detach().requires_grad_(True) if tracked[j] else states[j]
                               for j in stage.inputs)
                out, ctx = _run_step(stage, leaves)
                pieces.append((leaves, out))
                contexts.append(ctx)
                states.append(out.detach())
                tracked.append(bool(out.requires_grad and out.is_floating_point()))
        return Trajectory(states, contexts, pieces, tracked)

    #: order 1 runs as one autograd call over a connected nominal graph (``forward_connected``,
    #: ``backward_connected``)
    connected_first_order = True

    def forward_connected(self, graph: Graph, inputs: Tensor, *, record: bool = True
                          ) -> Trajectory:
        """The nominal pass of order 1 without cutting the autograd graph between steps: every
        step reads the outputs of earlier steps as they are (no detached leaves), so
        ``backward_connected`` backpropagates the whole graph in one call. ``handles[t]``
        holds (the tensors step t read, its output); ``states`` hold the detached values.
        ``record=False`` (a ``Graph.direct`` graph): the model's own forward, ``root(x)``,
        the same operations without the per-step bookkeeping; ``states`` = [input, output]
        and ``final`` the output with its graph (nothing per step is kept)."""
        x0 = inputs.detach()
        if not record:
            with torch.enable_grad():
                out = graph.root(x0)
            if not isinstance(out, Tensor):
                raise TypeError(f"the model returned {type(out).__name__}: the network must "
                                "return one tensor")
            return Trajectory([x0, out.detach()], [], None, [], final=out)
        states, live = [x0], [x0]
        tracked = [False]
        contexts, pieces = [], []
        with torch.enable_grad():
            for stage in graph.stages:
                inputs_ = stage.inputs
                xs = (live[inputs_[0]],) if len(inputs_) == 1 else tuple(live[j] for j in inputs_)
                out, ctx = _run_step(stage, xs)
                pieces.append((xs, out))
                contexts.append(ctx)
                live.append(out)
                states.append(out.detach())
                tracked.append(bool(out.requires_grad and out.is_floating_point()))
        return Trajectory(states, contexts, pieces, tracked)

    def backward_connected(self, graph: Graph, traj: Trajectory, terminal: Terminal, *,
                           need_stats: Sequence[bool], skip_u: Sequence[bool] | None = None
                           ) -> list[QExpansion]:
        """Order 1 on a trajectory of ``forward_connected``, as one vector-Jacobian product of
        the whole graph, (B * Qbar_u for every step, V'_z at the outputs of the steps whose
        statistics are asked for) = (sum_i f_u^(i)T V'_z^(i), ...) with V'_x = the terminal
        V_x: the same products as ``backward``'s per-step calls, summed by autograd where a
        tensor is read twice (the fork rule). Qbar_u is then divided by B. ``Q_args`` are not
        formed (empty): the order-1 step reads Qbar_u and the statistics only (Kronecker factors,
        and an ODE block's grid factors from V'_z at its output, ``sublayer_statistics``).

        With a terminal factor Z (``fisher_type`` "mc" or "type-2": the Kronecker G from the
        propagated columns of Z instead of V'_z), each column Z_c is backpropagated through the
        retained graph first, one vector-Jacobian product of the whole graph per column taken
        at the outputs of the Kronecker steps with statistics only (no parameter gradients):
        the same products as ``backward``'s column VJPs per step, summed by autograd where a
        tensor is read twice."""
        stages = graph.stages
        T = len(stages)
        B = terminal.V_x.shape[0]
        final = traj.final if traj.final is not None else traj.handles[T - 1][1]
        factor = terminal.factor
        wrt: list[Tensor] = []
        where: list[tuple[int, int, int]] = []  # (step, first index in wrt, count) of Qbar_u
        vz_at: dict[int, int] = {}  # step -> index in wrt of V'_z (statistics)
        z_wrt: list[Tensor] = []  # outputs where the columns of the terminal factor are read
        z_at: dict[int, int] = {}  # step -> index in z_wrt
        plain = not skip_u and not any(need_stats)
        if plain:  # Qbar_u of every player and nothing else: the same lists at every step
            cached = self.__dict__.get("_plain_wrt")
            if cached is None or cached[0] is not graph:
                cached = self._plain_wrt = (graph, *_player_lists(stages))
            where, wrt = cached[1], cached[2]
        for t, stage in enumerate([] if plain else stages):
            if stage.has_control and not (skip_u and skip_u[t]):
                where.append((t, len(wrt), len(stage.params)))
                wrt.extend(stage.params)
            if need_stats[t] and t < T - 1 and _reads_output_value(stage):
                out = traj.handles[t][1]
                if out.requires_grad:
                    if factor is not None and stage.kronecker:
                        z_at[t] = len(z_wrt)
                        z_wrt.append(out)
                    else:
                        vz_at[t] = len(wrt)
                        wrt.append(out)
        # the columns first, keeping the graph for Qbar_u's product
        z_cols = [_vjp(final, factor[:, c], z_wrt, retain=True) for c in range(factor.shape[1])] \
            if z_wrt and factor is not None else []
        if not vz_at and B & (B - 1) == 0:
            # B a power of two and no V'_z read: 1/B in the seed, (V_x / B), is exact, and so
            # is every product of the backward: the bits of dividing after, one pass less
            grads = _vjp(final, terminal.V_x / B, wrt) if wrt else ()
        else:
            grads = _vjp(final, terminal.V_x, wrt) if wrt else ()
            found = [g for t, i, n in where for g in grads[i:i + n] if g is not None]
            if found:  # (one call: the same divisions as g.div_(B))
                torch._foreach_div_(found, scalar_arg(B, found))
        # an expansion per step with Qbar_u or statistics; the others share an empty one
        # (nothing is formed for them, and the order-1 step reads nothing there)
        expansions = [_NOTHING] * T
        for t, i, n in where:
            expansions[t] = QExpansion(Q_args=_NO_ARGS, Q_u=[
                torch.zeros_like(p) if g is None else g
                for g, p in zip(grads[i:i + n], stages[t].params)])
        for t, stage in enumerate(stages):
            if not need_stats[t]:
                continue
            if expansions[t] is _NOTHING:
                expansions[t] = QExpansion(Q_args=_NO_ARGS, Q_u=None)
            if not _reads_output_value(stage):
                expansions[t].stats = StageStatistics()
                continue
            Z, V_z = None, None
            if t == T - 1:
                V_z, Z = terminal.V_x, factor
            elif t in z_at:  # (V'_z is not read with Z)
                cols = [c[z_at[t]] for c in z_cols]
                if any(c is None for c in cols):  # the output does not reach the loss
                    zero = torch.zeros_like(traj.states[stage.output])
                    cols = [zero if c is None else c for c in cols]
                Z = torch.stack(cols, 1)  # type: ignore[arg-type]
            else:
                g = grads[vz_at[t]] if t in vz_at else None
                V_z = torch.zeros_like(traj.states[stage.output]) if g is None else g
            if stage.kronecker:
                expansions[t].stats = kronecker_statistics(stage, traj.states[stage.inputs[0]],
                                                           V_z, Z)
            else:
                assert V_z is not None  # (only Kronecker steps read Z)
                expansions[t].stats = sublayer_statistics(stage, traj.states[stage.output], V_z)
        return expansions

    # -- first order ----------------------------------------------------------------------------
    def first_order(self, stage: Stage, piece: tuple[tuple[Tensor, ...], Tensor], V_z: Tensor,
                    B: int, retain: bool = False, control: bool = True
                    ) -> tuple[list[Tensor | None], list[Tensor] | None]:
        """(f_a^T V'_z per input, Qbar_u - l_u = (1/B) sum_i f_u^T V'_z) by one VJP; inputs
        without a value block get None; without ``control`` Qbar_u is not formed (None: the
        curvature model does not read it)."""
        leaves, out = piece
        wrt_x = [x for x in leaves if x.requires_grad]
        params = list(stage.params) if control else []
        wrt = wrt_x + params
        grads = _vjp(out, V_z, wrt, retain) if wrt else ()
        it = iter(grads)
        Q_args: list[Tensor | None] = []
        for x in leaves:
            if x.requires_grad:
                g = next(it)
                Q_args.append(torch.zeros_like(x) if g is None else g)
            else:
                Q_args.append(None)
        if not control:
            return Q_args, None
        Q_u = [torch.zeros_like(p) if g is None else g for g, p in zip(it, params)]
        found = [g for g in grads[len(wrt_x):] if g is not None]
        if found:  # (one call: the same divisions as g.div_(B))
            torch._foreach_div_(found, scalar_arg(B, found))
        return Q_args, Q_u

    def backward(self, graph: Graph, traj: Trajectory, terminal: Terminal, *,
                 need_stats: Sequence[bool], keep_values: bool = False,
                 skip_u: Sequence[bool] | None = None
                 ) -> tuple[list[QExpansion], list[Tensor | None]]:
        stages = graph.stages
        T = len(stages)
        B = terminal.V_x.shape[0]
        V: dict[int, Tensor] = {T: terminal.V_x}
        Zs: dict[int, Tensor] | None = None if terminal.factor is None else {T: terminal.factor}
        # the columns of Z are propagated down to the first step whose statistics read them
        first_stats = min((t for t in range(T) if need_stats[t]), default=T)
        expansions: list[QExpansion] = [None] * T  # type: ignore[list-item]
        values: list[Tensor | None] = [None] * (T + 1)
        for t in reversed(range(T)):
            stage = stages[t]
            leaves, out = traj.handles[t]
            V_z = V.pop(stage.output, None)
            if V_z is None:  # read by no step that differentiates it (shape only)
                V_z = torch.zeros_like(out)
            if keep_values:
                values[stage.output] = V_z
            Z = Zs.pop(stage.output, None) if Zs is not None else None
            stats = None
            if need_stats[t]:
                stats = kronecker_statistics(stage, leaves[0], V_z, Z) if stage.kronecker \
                    else sublayer_statistics(stage, out, V_z)
            if Z is not None and t > first_stats:
                for j, x in zip(stage.inputs, leaves):
                    if x.requires_grad:
                        cols = torch.stack([torch.autograd.grad(out, x, Z[:, c], retain_graph=True,
                                                                allow_unused=True)[0]
                                            for c in range(Z.shape[1])], 1)
                        assert Zs is not None
                        Zs[j] = cols if j not in Zs else Zs[j] + cols
            Q_args, Q_u = self.first_order(stage, traj.handles[t], V_z, B,
                                           control=not (skip_u and skip_u[t]))
            for j, q in zip(stage.inputs, Q_args):
                if q is not None:
                    V[j] = q if j not in V else V[j] + q
            expansions[t] = QExpansion(Q_args=Q_args, Q_u=Q_u, stats=stats)
        if keep_values and 0 in V:
            values[0] = V[0]
        return expansions, values


class AutogradBackend(GraphBackend):
    """Exact backend: full per-sample matrices over the augmented state (vanilla DDP)."""

    name = "autograd"
    second_order_capable = True

    def __init__(self, memory_budget: int = DEFAULT_MEMORY_BUDGET):
        if not (isinstance(memory_budget, int) and memory_budget > 0):
            raise ValueError(f"invalid memory_budget={memory_budget!r}: accepted a positive "
                             "integer number of bytes")
        self.memory_budget = memory_budget

    def check_fisher(self, fisher_type: str, *, order: int, explicit: bool) -> None:
        if order == 2 and fisher_type not in ("empirical", "type-2"):
            raise ValueError(
                f"invalid fisher_type={fisher_type!r} for backend 'autograd' at order 2: the "
                "Kronecker statistics come from the propagated V_xx, whose terminal is the exact "
                "loss Hessian; accepted 'type-2' or 'empirical' (or backend 'lowrank' with "
                "backend_options={'terminal': 'mc'})")

    # -- second order (full per-sample matrices on the augmented state) --------------------------
    @staticmethod
    def _layouts(graph: Graph, traj: Trajectory, stage: Stage) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(blocks of X_t, blocks of X_{t+1}) that carry a value block, in value-id order."""
        t = stage.index
        after = graph.live[t + 1] if t + 1 < len(graph.live) else (stage.output,)
        X0 = tuple(j for j in graph.live[t] if traj.tracked[j])
        X1 = tuple(j for j in after if traj.tracked[j])
        return X0, X1

    def check_second_order(self, graph: Graph, traj: Trajectory, *, need_quu: bool) -> None:
        """Refuse, before any work, a step whose full matrices exceed the memory budget."""
        for stage in graph.stages:
            if stage.is_function and stage.derivatives.random and traj.tracked[stage.output]:
                raise ValueError(
                    f"backend 'autograd' at order 2: {stage} draws random numbers on the value's "
                    "path (dropout, ...), which its per-sample Jacobians (torch.func.vmap) cannot "
                    "replay; use backend 'lowrank', or nn.Dropout modules (their mask is recorded)")
            X0, X1 = self._layouts(graph, traj, stage)
            n = sum(traj.states[j][0].numel() for j in X0)
            n1 = sum(traj.states[j][0].numel() for j in X1)
            self.check_budget(stage, traj.states[0].shape[0], n, n1,
                              need_quu and stage.has_control, traj.output.element_size())

    def check_budget(self, stage: Stage, B: int, n: int, n1: int, need_quu: bool,
                     element_size: int) -> None:
        m = stage.control_size
        entries = B * (n1 * n + n1 * m + n * n + m * n + n1 * n1) + (m * m if need_quu else 0)
        need = entries * element_size
        if need > self.memory_budget:
            raise MemoryBudgetError(
                f"exact backend: {stage} needs about {need / 2**20:.1f} MiB for its full "
                f"matrices (B={B}, n_in={n}, n_out={n1}, m={m}), over memory_budget="
                f"{self.memory_budget / 2**20:.1f} MiB; raise OCNOpt(memory_budget=...), use a "
                "smaller batch, or backend 'lowrank'"
            )

    def terminal_value(self, loss: Any, traj: Trajectory, terminal: Terminal, *,
                       targets: Tensor | None = None, generator: Any = None) -> ExactValue:
        V_xx = terminal.V_xx
        if V_xx is None:
            if targets is None:
                raise ValueError("the exact backend needs the terminal Hessian or the targets")
            V_xx = loss.hessian(traj.output.detach(), targets)
        T = len(traj.states) - 1
        return ExactValue({T: terminal.V_x}, V_xx, (T,))

    def expand_stage(self, stage: Stage, traj: Trajectory, value: ValueFunction, *,
                     gauss_newton: bool, need_quu: bool, need_stats: bool, keep: bool = False,
                     stats_from_value: bool = True, skip_u: bool = False) -> ExactExpansion:
        """The exact expansion of step t on the augmented state (``skip_u`` is ignored:
        Qbar_u is always formed)."""
        assert isinstance(value, ExactValue)
        t = stage.index
        piece = traj.handles[t]
        X1 = value.layout
        z = stage.output
        if z not in value.V:  # an output without a value block (a random mask): transparent
            return ExactExpansion(Q_args=[None] * len(stage.inputs), Q_u=None, Q_X=dict(value.V),
                                  Q_xx=value.V_xx, next_value=value, layout=value.layout,
                                  shapes={j: traj.states[j].shape[1:] for j in value.layout})
        X0 = tuple(sorted({j for j in X1 if j != z}
                          | {j for j in stage.inputs if traj.tracked[j]}))
        shapes = {j: traj.states[j].shape[1:] for j in set(X0) | set(X1)}
        terms = self.second_order_terms(stage, traj, X0, X1, value, gauss_newton=gauss_newton,
                                        need_quu=need_quu)
        stats = None
        if need_stats:
            stats = StageStatistics()
            if stage.kronecker:
                y = traj.states[z]
                Z = None
                if stats_from_value:  # rows of a square root of V'_zz
                    Z = psd_sqrt_factor(value.hessian_block(z)).reshape(y.shape[0], -1, *y.shape[1:])
                stats = kronecker_statistics(stage, piece[0][0], value.V[z], Z)
        B = traj.states[0].shape[0]
        Q_args, Q_u = self.first_order(stage, piece, value.V[z], B)
        Q_X: dict[int, Tensor] = {}
        for j in X0:
            if j in value.V and j != z:
                Q_X[j] = value.V[j]
        for j, q in zip(stage.inputs, Q_args):
            if q is not None:
                Q_X[j] = q if j not in Q_X else Q_X[j] + q
        return ExactExpansion(Q_args=Q_args, Q_u=Q_u, stats=stats, Q_X=Q_X, Q_xx=terms.Q_xx,
                              Q_ux=terms.Q_ux, Q_uu=terms.Q_uu, terms=terms, next_value=value,
                              layout=X0, shapes=shapes)

    def quadratic(self, stage: Stage, exp: QExpansion, k: list[Tensor]) -> Tensor:
        """k^T Qbar_uu k (without l_uu) = E_i[(F_u k)^T V'_XX (F_u k)] + k^T psi_uu k."""
        assert isinstance(exp, ExactExpansion)
        terms, value = exp.terms, exp.next_value
        assert terms is not None and terms.f_u is not None and value is not None
        k_flat = stage.flatten(k)
        fu_k = torch.einsum("bkm,m->bk", terms.f_u, k_flat)
        quad = (fu_k * (value.V_xx @ fu_k.unsqueeze(-1))[..., 0]).sum() / fu_k.shape[0]
        if terms.psi_uu is not None:
            quad = quad + k_flat @ terms.psi_uu @ k_flat
        return quad

    def feedback(self, stage: Stage, exp: QExpansion, minv: Solver, lr: float, B: int, *,
                 ignore: frozenset[int] = frozenset()) -> Feedback | None:
        """K dX = -lr M^{-1} (1/B) sum_i Q_uX^(i) dX^(i), the ignored blocks of dX set to 0."""
        assert isinstance(exp, ExactExpansion)
        Q_ux = exp.Q_ux
        assert Q_ux is not None
        layout = exp.layout
        blocks = [j for j in layout if j != 0 and j not in ignore]
        if not blocks:
            return None

        def K(dX: Mapping[int, Tensor]) -> list[Tensor]:
            flat = _cat_blocks([dX[j] if j in blocks else torch.zeros(
                B, *exp.shapes[j], dtype=Q_ux.dtype, device=Q_ux.device) for j in layout])
            s = torch.einsum("bmn,bn->m", Q_ux, flat) / B
            return [v.mul(-lr) for v in minv(stage.unflatten(s))]

        return Feedback(K, blocks)

    def value_update(self, stage: Stage, exp: QExpansion, value: ValueFunction,
                     minv: Solver | None, lr: float, B: int, *, value_correction: bool,
                     mu: float, clip: bool, trust: float | None = None) -> ExactValue:
        """V_X = Q_X - lr Q_uX^T M^{-1} Qbar_u (its correction bounded by ``trust`` |Q_X| per
        sample); V_XX = Q_XX - (lr/B) Q_uX^T M^{-1} Q_uX + mu I, projected onto the PSD cone
        when ``clip``."""
        assert isinstance(exp, ExactExpansion)
        layout = exp.layout
        Q_X, V_xx = exp.Q_X, exp.Q_xx
        assert V_xx is not None
        if not layout:
            return ExactValue({}, V_xx, ())
        V = {j: Q_X[j] for j in layout}
        bounded = None
        if value_correction and minv is not None:
            Q_ux = exp.Q_ux
            assert Q_ux is not None
            assert exp.Q_u is not None  # the exact backend always forms Qbar_u
            M_Qu = stage.flatten(minv(exp.Q_u))
            corr = _split_blocks(torch.einsum("bmn,m->bn", Q_ux, M_Qu), layout, exp.shapes)
            corrected = [V[j] - lr * corr[j] for j in layout]
            if trust is None:
                V = dict(zip(layout, corrected))
            else:
                out, bounded = bound_blocks([V[j] for j in layout], corrected, trust)
                V = dict(zip(layout, out))
            M_Qux = stage.flatten(minv(stage.unflatten(Q_ux.transpose(1, 2))), lead=2)
            V_xx = V_xx - (lr / B) * torch.einsum("bmn,bkm->bnk", Q_ux, M_Qux)
        if mu:
            V_xx = V_xx + mu * torch.eye(V_xx.shape[-1], dtype=V_xx.dtype, device=V_xx.device)
        if clip:
            V_xx = psd_clip(V_xx)
        return ExactValue(V, V_xx, layout, bounded)

    def second_order_terms(self, stage: Stage, traj: Trajectory, X0: tuple[int, ...],
                           X1: tuple[int, ...], value: ExactValue, *, gauss_newton: bool,
                           need_quu: bool) -> SecondOrderTerms:
        """Second-order terms of step ``stage`` on the augmented state: F maps the flattened
        blocks X0 of X_t (and the step's untracked inputs, held fixed) to the blocks X1 of
        X_{t+1}; carried blocks pass through. From V'_X (B, n_out) and V'_XX (B, n_out, n_out).
        The caller checks the memory budget first (``check_second_order``)."""
        t = stage.index
        states = traj.states
        B = states[0].shape[0]
        shapes = {j: states[j].shape[1:] for j in set(X0) | set(X1) | set(stage.inputs)}
        sizes = [math.prod(shapes[j]) for j in X0]
        n, n1 = sum(sizes), sum(math.prod(shapes[j]) for j in X1)
        consts = tuple(j for j in stage.inputs if j not in X0)
        has_u = stage.has_control
        u = stage.flatten([p.detach() for p in stage.params]) if has_u else states[0].new_zeros(0)
        ctx = traj.contexts[t]
        cdim = 0 if isinstance(ctx, Tensor) else None
        z = stage.output
        single = len(X0) == 1 and X0 == stage.inputs and X1 == (z,)  # a chain step: F = f

        def F(u_flat: Tensor, xi: Tensor, ci: Any, consts_i: tuple[Tensor, ...]) -> Tensor:
            params = dict(zip(stage.param_names, stage.unflatten(u_flat))) if has_u else {}
            c = ci.unsqueeze(0) if cdim == 0 else ci
            env = {j: v.unsqueeze(0) for j, v in zip(consts, consts_i)}
            if single:
                env[X0[0]] = xi.reshape(1, *shapes[X0[0]])
            else:
                for j, v in zip(X0, xi.split(sizes)):
                    env[j] = v.reshape(1, *shapes[j])
            xs = tuple(env[j] for j in stage.inputs)
            env[z] = stage.functional(params, stage.handler_input(xs), c)
            if single:
                return env[z].reshape(-1)
            return torch.cat([env[j].reshape(-1) for j in X1])

        X = _cat_blocks([states[j] for j in X0]) if X0 else states[0].new_zeros(B, 0)
        C = tuple(states[j] for j in consts)
        dims = (None, 0, cdim, 0)
        if has_u and n:
            f_u, f_x = vmap(jacrev(F, argnums=(0, 1)), in_dims=dims)(u, X, ctx, C)
            f_u = f_u.reshape(B, n1, -1)
        elif has_u:
            f_u = vmap(jacrev(F, argnums=0), in_dims=dims)(u, X, ctx, C).reshape(B, n1, -1)
            f_x = X.new_zeros(B, n1, 0)
        else:
            f_u = None
            f_x = vmap(jacrev(F, argnums=1), in_dims=dims)(u, X, ctx, C) if n else \
                X.new_zeros(B, n1, 0)
        f_x = f_x.reshape(B, n1, n)
        V_xx = value.V_xx
        Vf_x = V_xx @ f_x
        Q_xx = f_x.transpose(1, 2) @ Vf_x
        Q_ux = f_u.transpose(1, 2) @ Vf_x if f_u is not None else None
        Q_uu = None
        if need_quu and f_u is not None:
            Q_uu = torch.einsum("bkm,bkl->ml", f_u, V_xx @ f_u) / B
        psi_uu = None
        if not gauss_newton:
            v = value.flat().detach()

            def psi(u_flat: Tensor, xi: Tensor, ci: Any, consts_i: tuple[Tensor, ...],
                    vi: Tensor) -> Tensor:
                return (vi * F(u_flat, xi, ci, consts_i)).sum()

            pdims = (None, 0, cdim, 0, 0)
            if n:
                psi_xx = vmap(hessian(psi, argnums=1), in_dims=pdims)(u, X, ctx, C, v)
                Q_xx = Q_xx + psi_xx.reshape(B, n, n)
            if has_u:
                if n:
                    psi_ux = vmap(jacfwd(jacrev(psi, argnums=0), argnums=1),
                                  in_dims=pdims)(u, X, ctx, C, v)
                    Q_ux = Q_ux + psi_ux.reshape(B, -1, n)  # type: ignore[operator]

                def psi_sum(u_flat: Tensor) -> Tensor:
                    return vmap(psi, in_dims=pdims)(u_flat, X, ctx, C, v).sum() / B

                psi_uu = jacfwd(jacrev(psi_sum))(u)
                if Q_uu is not None:
                    Q_uu = Q_uu + psi_uu
        return SecondOrderTerms(f_x, f_u, Q_xx, Q_ux, Q_uu, psi_uu)


def psd_clip(V: Tensor) -> Tensor:
    """Project symmetric matrices (B, n, n) onto the PSD cone (negative eigenvalues -> 0).

    The eigen-decomposition runs in float64; if it fails to converge (many repeated or tiny
    eigenvalues), it is retried on V + 1e-12 max|V| I."""
    V = 0.5 * (V + V.transpose(1, 2))
    if not bool(torch.isfinite(V).all()):  # left to the optimizer's non-finite guard
        return V
    V64 = V.to(torch.float64)
    try:
        evals, evecs = torch.linalg.eigh(V64)
    except RuntimeError:
        scale = V64.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-300)
        eye = torch.eye(V.shape[-1], dtype=torch.float64, device=V.device)
        evals, evecs = torch.linalg.eigh(V64 + 1e-12 * scale * eye)
    if bool((evals >= 0).all()):
        return V
    return ((evecs * evals.clamp_min(0).unsqueeze(1)) @ evecs.transpose(1, 2)).to(V.dtype)


def psd_sqrt_factor(V: Tensor) -> Tensor:
    """Rows Z (B, n, n) with Z^T Z = PSD part of V (B, n, n): the symmetric square root."""
    V64 = 0.5 * (V + V.transpose(1, 2)).to(torch.float64)
    evals, evecs = torch.linalg.eigh(V64)
    root = (evecs * evals.clamp_min(0).sqrt().unsqueeze(1)) @ evecs.transpose(1, 2)
    return root.to(V.dtype)


def _reads_output_value(stage: Stage) -> bool:
    """Whether a step's statistics are formed from V'_z at its output: a Kronecker layer's
    factors, or an ODE block's grid factors of the layers inside it (``sublayer_statistics``)."""
    return stage.kronecker or isinstance(stage.derivatives, AdjointDerivatives)


def sublayer_statistics(stage: Stage, out: Tensor, V_z: Tensor) -> StageStatistics:
    """Statistics of a stage without Kronecker factors as a whole: those of the Kronecker
    layers inside it (``StageStatistics.sublayers``), for an ODE block its grid factors from the
    adjoint of V'_x = ``V_z`` at its output ``out`` (docs/method.md section 12); else empty."""
    if not isinstance(stage.derivatives, AdjointDerivatives):
        return StageStatistics()
    grid = stage.derivatives.grid_rows(stage.module, out.detach(), V_z.detach())
    if grid is None:
        return StageStatistics()
    return StageStatistics(sublayers={n: StageStatistics(A=A, G=G)
                                      for n, (A, G) in grid.factors.items()},
                           samples=grid.rows)


def kronecker_statistics(stage: Stage, xin: Tensor, V_x: Tensor | None, Z: Tensor | None
                         ) -> StageStatistics:
    """Kronecker factor rows of a stage: inputs, and output cotangents (V'_x for the empirical
    Fisher, the propagated terminal factor Z otherwise)."""
    g = V_x.unsqueeze(1) if Z is None else Z  # type: ignore[union-attr]
    d = stage.derivatives
    return StageStatistics(a=d.kfac_input(stage.module, xin.detach()),
                           g=d.kfac_output(stage.module, g), gradient_rows=Z is None)
