"""Neural ODE blocks (docs/method.md, section 12).

``ODEBlock(func, t0, t1, ...)`` is an ``nn.Module`` mapping x(t0) to x(t1) with
dx/dt = func(t, x), solved by torchdiffeq's ``odeint_adjoint`` (``pip install -e ".[ode]"``):
backpropagation through it is the adjoint method, at memory O(1) in the number of solver steps.
It is usable in any model, with ``torch.optim`` or with ``ocnopt.OCNOpt``, where it is one step
of the graph with control theta = the parameters of ``func``.

The second-order expansion of the block (Gauss-Newton, running cost 0) comes from one backward
solve from t1 to t0 of the state together with the adjoint and the factor columns
(``ODEBlock.backward_expansion``):

    dx/dt   = F(t, x)                 x(t1) = the nominal output
    da/dt   = -F_x^T a                a(t1) = V'_x            (Q_x = a(t0))
    dg/dt   = -F_theta^T a            g(t1) = 0               (Qbar_u = mean_i g^(i)(t0))
    dq_r/dt = -F_x^T q_r              q_r(t1) = Z'_r          (a_r = q_r(t0))
    dp_r/dt = -F_theta^T q_r          p_r(t1) = 0             (W_r = p_r(t0), per sample)

With the empirical rank-1 factor Z' = rho V'_x the columns are q = rho a and p = rho g (g per
sample; no extra columns). The forward sensitivity dd/dt = F_x d + F_theta k, d(t0) = 0,
solved alongside the state gives f_u k = d(t1) (``ODEBlock.param_jvp``).

Function evaluations are counted per block: ``nfe_forward`` (forward solves) and
``nfe_backward`` (adjoint and expansion solves) since the last ``reset_nfe()``;
``solver_statistics(model)`` sums them over a model's blocks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from .derivatives import DERIVATIVES
from .derivatives.ode import AdjointColumns, GridStatistics, ODEDerivatives

try:  # optional dependency: pip install -e ".[ode]"
    import torchdiffeq
except ImportError:  # pragma: no cover
    torchdiffeq = None


def _solvers() -> tuple[str, ...]:
    from torchdiffeq._impl.odeint import SOLVERS

    return tuple(sorted(SOLVERS))


@dataclass
class T1Update:
    """One update of the integration time (docs/method.md section 12): s = dJ/dt1, Q_T, Q_TT,
    the step dt1 and t1 after it."""

    s: float
    Q_T: float
    Q_TT: float
    dt1: float
    t1: float


@dataclass
class SolverStatistics:
    """Function evaluations of the ODE blocks of a model since their last ``reset_nfe``."""

    nfe_forward: int = 0
    nfe_backward: int = 0


class ODEBlock(nn.Module):
    """x(t1) from x(t0) = the input, dx/dt = func(t, x), by torchdiffeq's ``odeint_adjoint``.

    ``func``: an ``nn.Module`` called as ``func(t, x)`` on a batch (B, *n) -> (B, *n), acting on
    each sample alone (no batch coupling: the expansion of order 2 takes per-sample products);
    ``method``, ``rtol``, ``atol``, ``options``: torchdiffeq's (fixed-step solvers take
    ``options={"step_size": h}`` or ``{"grid_constructor": ...}``), used for the forward and
    every backward solve. t0 and t1 are buffers, in ``state_dict``. ``adjoint=False``:
    backpropagation through the solver's operations (``odeint``: memory grows with the number of
    steps; the baseline of the adjoint method); the order-2 expansion is the backward solve
    either way. ``grid_step``: the time grid t_j = t1 - j grid_step of the Kronecker statistics
    of the Linear/Conv layers inside ``func`` (curvature kfac, ekfac; ``grid_rows``).

    ``learn_t1``: t1 is a control with its own update (``update_t1``, docs/method.md section 12):
    step size ``t1_lr``, regulariser (c/2) t1^2 with c = ``t1_reg``, every ``t1_every`` calls,
    t1 kept >= ``t1_min`` (default t0 + (t1 - t0)/100), ``t1_feedback`` the second-order update
    with feedback on the parameters' move (False: the open-loop first-order one).
    """

    t0: Tensor
    t1: Tensor

    def __init__(self, func: nn.Module, t0: float = 0.0, t1: float = 1.0, method: str = "dopri5",
                 rtol: float = 1e-3, atol: float = 1e-3, options: Mapping[str, Any] | None = None,
                 learn_t1: bool = False, t1_lr: float = 0.1, t1_reg: float = 0.0,
                 t1_every: int = 1, t1_min: float | None = None, t1_feedback: bool = True,
                 adjoint: bool = True, grid_step: float = 0.01):
        super().__init__()
        if torchdiffeq is None:  # pragma: no cover
            raise ImportError("ODEBlock needs torchdiffeq: pip install -e \".[ode]\"")
        if not isinstance(func, nn.Module):
            raise TypeError(f"func must be a torch.nn.Module called as func(t, x), got "
                            f"{type(func).__name__}")
        if method not in _solvers():
            raise ValueError(f"invalid method={method!r}: accepted torchdiffeq's {_solvers()}")
        if not (float(t1) > float(t0)):
            raise ValueError(f"invalid t1={t1!r} with t0={t0!r}: accepted t1 > t0")
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if not (isinstance(tol, (int, float)) and tol > 0):
                raise ValueError(f"invalid {name}={tol!r}: accepted a positive number")
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"options must be a mapping (torchdiffeq's solver options) or None, "
                            f"got {type(options).__name__}")
        if not (isinstance(grid_step, (int, float)) and grid_step > 0):
            raise ValueError(f"invalid grid_step={grid_step!r}: accepted a positive number")
        self.func = func
        #: the time grid of the Kronecker statistics of the layers inside func (kfac, ekfac)
        self.grid_step = float(grid_step)
        self.method, self.rtol, self.atol = method, float(rtol), float(atol)
        self.options = dict(options) if options is not None else None
        self.adjoint = bool(adjoint)
        t1_min = float(t0) + (float(t1) - float(t0)) / 100 if t1_min is None else t1_min
        self.t0_value = float(t0)
        self.configure_t1(learn_t1=bool(learn_t1), t1_lr=t1_lr, t1_reg=t1_reg,
                          t1_every=t1_every, t1_min=t1_min, t1_feedback=bool(t1_feedback))
        #: s = dJ/dt1 of the last backward expansion (learn_t1), and the updates made so far
        self.t1_grad: Tensor | None = None
        #: Qbar_theta and the parameters at the last backward expansion (learn_t1)
        self._t1_ref: tuple[list[Tensor], list[Tensor]] | None = None
        self.t1_history: list[T1Update] = []
        self._t1_calls = 0
        self.register_buffer("t0", torch.tensor(float(t0), dtype=torch.float64))
        self.register_buffer("t1", torch.tensor(float(t1), dtype=torch.float64))
        self.nfe_forward = 0
        self.nfe_backward = 0
        self._forward_solve = False

    def configure_t1(self, *, learn_t1: bool | None = None, t1_lr: float | None = None,
                     t1_reg: float | None = None, t1_every: int | None = None,
                     t1_min: float | None = None, t1_feedback: bool | None = None) -> None:
        """Set the integration time's hyper-parameters (class docstring); None keeps a value.
        ``ValueError`` naming the argument for an invalid one. ``ocnopt.OCNOpt`` calls it at
        every step with its own hyper-parameters of the same names (docs/method.md section 12)."""
        t0 = self.t0_value
        checks = (
            ("learn_t1", learn_t1, lambda v: isinstance(v, bool), "True or False"),
            ("t1_lr", t1_lr, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
             and v > 0, "a positive number"),
            ("t1_reg", t1_reg, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
             and v >= 0, "a number >= 0"),
            ("t1_every", t1_every, lambda v: isinstance(v, int) and not isinstance(v, bool)
             and v >= 1, "an integer >= 1"),
            ("t1_min", t1_min, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
             and float(v) > t0, f"a number > t0 = {t0:g}"),
            ("t1_feedback", t1_feedback, lambda v: isinstance(v, bool), "True or False"))
        for name, value, ok, accepted in checks:
            if value is not None and not ok(value):
                if name == "t1_min":
                    raise ValueError(f"invalid t1_min={value!r} with t0={t0!r}: accepted "
                                     "t1_min > t0")
                raise ValueError(f"invalid {name}={value!r}: accepted {accepted}")
        if learn_t1 is not None:
            self.learn_t1 = learn_t1
        if t1_lr is not None:
            self.t1_lr = float(t1_lr)
        if t1_reg is not None:
            self.t1_reg = float(t1_reg)
        if t1_every is not None:
            self.t1_every = t1_every
        if t1_min is not None:
            self.t1_min = float(t1_min)
        if t1_feedback is not None:
            self.t1_feedback = t1_feedback

    def extra_repr(self) -> str:
        return (f"t0={float(self.t0):g}, t1={float(self.t1):g}, method={self.method!r}, "
                f"rtol={self.rtol:g}, atol={self.atol:g}"
                + (f", options={self.options}" if self.options else "")
                + (", learn_t1=True" if self.learn_t1 else "")
                + ("" if self.adjoint else ", adjoint=False"))

    # -- counters ---------------------------------------------------------------------------------
    def reset_nfe(self) -> None:
        """Set both function-evaluation counters to 0."""
        self.nfe_forward = 0
        self.nfe_backward = 0

    def _count(self, n: int = 1) -> None:
        if self._forward_solve:
            self.nfe_forward += n
        else:
            self.nfe_backward += n

    def _times(self, like: Tensor, backward: bool = False) -> Tensor:
        t = torch.stack([self.t0, self.t1]).to(like.dtype)
        return t.flip(0) if backward else t

    def _params(self) -> tuple[Tensor, ...]:
        return tuple(p for p in self.func.parameters() if p.requires_grad)

    def _solver_kwargs(self) -> dict[str, Any]:
        return {"rtol": self.rtol, "atol": self.atol, "method": self.method,
                "options": dict(self.options) if self.options is not None else None}

    # -- the forward solve ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """x(t1); backpropagation runs torchdiffeq's adjoint solve."""
        def field(t: Tensor, y: Tensor) -> Tensor:
            self._count()
            return self.func(t, y)

        self._forward_solve = True
        try:
            if torch.is_grad_enabled() and self.adjoint:
                out = torchdiffeq.odeint_adjoint(field, x, self._times(x),
                                                 adjoint_params=self._params(),
                                                 **self._solver_kwargs())
            else:
                out = torchdiffeq.odeint(field, x, self._times(x), **self._solver_kwargs())
        finally:
            self._forward_solve = False
        return out[-1]

    # -- the integration time as a control ------------------------------------------------------
    def t1_gradient(self, x_out: Tensor, V: Tensor) -> Tensor:
        """s = E_batch[<F(t1, x(t1)), V'_x>] = dJ/dt1 (``V``: V'_x at x(t1) per sample, not
        divided by B, so the batch mean is the derivative of the mean loss)."""
        with torch.no_grad():
            self._count()
            F = self.func(self.t1.to(x_out.dtype), x_out)
            return (F * V).reshape(V.shape[0], -1).sum(1).mean()

    def update_t1(self, s: Tensor | float | None = None, Q_theta: list[Tensor] | None = None,
                  dtheta: list[Tensor] | None = None) -> T1Update | None:
        """The update of t1 with L = J + (c/2) t1^2 (docs/method.md section 12):

            Q_T = c t1 + s,  Q_TT = c + s^2,
            dt1 = -t1_lr (Q_T + s <Qbar_theta, dtheta>) / Q_TT,   t1 <- max(t1_min, t1 + dt1)

        with ``dtheta`` the parameter change applied in this step (the feedback on the
        parameters' move; ``t1_feedback=False``: the open loop, Q_TT = 1 and no feedback term).
        ``s``, ``Q_theta`` and ``dtheta`` default to what the last backward expansion recorded:
        its s, its Qbar_theta and the parameters' change since it (so after an order-2 step,
        ``update_t1()`` needs no argument). Runs every ``t1_every`` calls (None otherwise); the
        update is appended to ``t1_history``."""
        if not self.learn_t1:
            raise ValueError("update_t1 needs ODEBlock(..., learn_t1=True)")
        self._t1_calls += 1
        if (self._t1_calls - 1) % self.t1_every:
            return None
        if s is None:
            if self.t1_grad is None:
                raise ValueError("update_t1: no s = dJ/dt1 given and no backward expansion ran")
            s = self.t1_grad
        if self._t1_ref is not None and Q_theta is None and dtheta is None:
            Q_theta = self._t1_ref[0]
            dtheta = [p.detach() - p0 for p, p0 in zip(self._params(), self._t1_ref[1])]
        s = float(s)
        t1, c = float(self.t1), self.t1_reg
        Q_T = c * t1 + s
        closed = self.t1_feedback and dtheta is not None and Q_theta is not None
        if closed:
            assert Q_theta is not None and dtheta is not None
            fb = float(sum(torch.vdot(q.flatten(), d.flatten()) for q, d in zip(Q_theta, dtheta)))
            Q_TT = c + s * s
            dt1 = -self.t1_lr * (Q_T + s * fb) / Q_TT if Q_TT > 0 else 0.0
        else:
            Q_TT = 1.0
            dt1 = -self.t1_lr * Q_T
        new = max(self.t1_min, t1 + dt1)
        with torch.no_grad():
            self.t1.fill_(new)
        upd = T1Update(s, Q_T, Q_TT, dt1, new)
        self.t1_history.append(upd)
        return upd

    # -- derivatives for ocnopt's engine ---------------------------------------------------------
    def _named(self, params: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """``func``'s parameters by its own names, from names relative to the block."""
        if params is None:
            return {n: p.detach() for n, p in self.func.named_parameters() if p.requires_grad}
        return {n.removeprefix("func."): p for n, p in params.items()}

    def param_jvp(self, params: Mapping[str, Tensor] | None, x: Tensor,
                  tangent: Mapping[str, Tensor]) -> Tensor:
        """f_u k = d(t1): the forward sensitivity dd/dt = F_x d + F_theta k, d(t0) = 0, solved
        alongside the state from x(t0) = ``x`` (``tangent``: k by parameter name, relative to
        the block or to ``func``)."""
        ps = self._named(params)
        k = self._named(dict(tangent))
        names = list(ps)

        def aug(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            y, d = state
            self._count()

            def f(pv: tuple[Tensor, ...], yy: Tensor) -> Tensor:
                return functional_call(self.func, dict(zip(names, pv)), (t, yy))

            res = jvp(f, (tuple(ps[n] for n in names), y), (tuple(k[n] for n in names), d))
            return res[0], res[1]

        with torch.no_grad():
            x = x.detach()
            sol = torchdiffeq.odeint(aug, (x, torch.zeros_like(x)), self._times(x),
                                     **self._solver_kwargs())
        return sol[1][-1]

    # -- Kronecker statistics on the time grid ---------------------------------------------------
    def kronecker_layers(self) -> dict[str, nn.Module]:
        """The layers inside ``func`` with Kronecker factors (Linear, Conv: their handler's
        ``kronecker``) and a trainable weight, by name in ``func``."""
        out = {}
        for name, m in self.func.named_modules():
            d = DERIVATIVES.get(type(m))
            w = getattr(m, "weight", None)
            if d is not None and d.kronecker and isinstance(w, Tensor) and w.requires_grad:
                out[name] = m
        return out

    def rows_at(self, t: Tensor, x: Tensor, cot: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """K-FAC rows of every Kronecker layer inside ``func`` at time t, by name in ``func``:
        a (B, P, d_in), the layer's input rows at state ``x`` (B, *n), and g (B, r, P, d_out),
        the rows of the output cotangents of <cot_c, F(t, x)> per sample and column (``cot``:
        (B, r, *n), e.g. the adjoint a(t) as one column)."""
        layers = self.kronecker_layers()
        seen: dict[str, tuple[Tensor, Tensor]] = {}
        hooks = [m.register_forward_hook(
            lambda mod, inp, out, n=n: seen.__setitem__(n, (inp[0].detach(), out)))
            for n, m in layers.items()]
        try:
            with torch.enable_grad():
                xx = x.detach()
                F = self.func(t, xx)
                self._count()
                outs = [seen[n][1] for n in layers]
                cols = [torch.autograd.grad(F, outs, cot[:, c], retain_graph=True, allow_unused=True)
                        for c in range(cot.shape[1])]
        finally:
            for h in hooks:
                h.remove()
        result = {}
        for i, (n, m) in enumerate(layers.items()):
            d = DERIVATIVES[type(m)]
            gs = [torch.zeros_like(seen[n][1]) if c[i] is None else c[i] for c in cols]
            result[n] = (d.kfac_input(m, seen[n][0]), d.kfac_output(m, torch.stack(gs, 1)))
        return result

    def factors_at(self, t: Tensor, x: Tensor, cot: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """K-FAC factors of every Kronecker layer inside ``func`` at time t: A = sum a a^T /
        (B P) over the layer's input rows at state ``x`` (B, *n), G = sum g g^T / B over the
        rows of the output cotangents of <cot_c, F(t, x)> per sample and column (``cot``:
        (B, r, *n), e.g. the adjoint a(t) as one column); the rows are ``rows_at``'s."""
        B = x.shape[0]
        result = {}
        for n, (a, g) in self.rows_at(t, x, cot).items():
            A = torch.einsum("bpi,bpj->ij", a, a) / (B * a.shape[1])
            G = torch.einsum("brpi,brpj->ij", g, g) / B
            result[n] = (A, G)
        return result

    def grid_times(self, grid_step: float, like: Tensor) -> Tensor:
        """t_j = t1 - j grid_step for j = 0, 1, ... while t_j >= t0 (decreasing)."""
        if not (isinstance(grid_step, (int, float)) and grid_step > 0):
            raise ValueError(f"invalid grid_step={grid_step!r}: accepted a positive number")
        t0, t1 = float(self.t0), float(self.t1)
        J = int((t1 - t0) / grid_step + 1e-9)
        return torch.tensor([t1 - j * grid_step for j in range(J + 1)], dtype=like.dtype,
                            device=like.device)

    def grid_solution(self, x_out: Tensor, V: Tensor, grid_step: float
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """(t_j, x(t_j), a(t_j)) on the grid ``grid_times``: one backward solve of the state
        and the adjoint, dx/dt = F, da/dt = -F_x^T a, from x(t1) = ``x_out``, a(t1) = ``V``.
        Memory: the grid's J states and adjoints (J B n numbers each), whatever the solver's
        number of steps."""
        times = self.grid_times(grid_step, x_out)

        def aug(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            y, adj = state
            self._count()
            with torch.enable_grad():
                yy = y.detach().requires_grad_(True)
                F = self.func(t, yy)
                (gx,) = torch.autograd.grad(F, yy, adj)
            return F.detach(), -gx

        with torch.no_grad():
            if len(times) > 1:
                xs, adjs = torchdiffeq.odeint(aug, (x_out.detach(), V.detach()), times,
                                              **self._solver_kwargs())
            else:
                xs, adjs = x_out.detach().unsqueeze(0), V.detach().unsqueeze(0)
        return times, xs, adjs

    def grid_statistics(self, x_out: Tensor, V: Tensor, grid_step: float = 0.01
                        ) -> dict[str, tuple[Tensor, Tensor]]:
        """The K-FAC factors of the Kronecker layers inside ``func`` averaged over the time grid
        t_j = t1 - j grid_step (``grid_times``): A = mean_j A(t_j), G = mean_j G(t_j), with the
        rows at x(t_j) and the output cotangents from the adjoint a(t_j) (``factors_at``), both
        from one backward solve from x(t1) = ``x_out``, a(t1) = ``V`` (per sample)."""
        return self._grid_average(*self.grid_solution(x_out, V, grid_step))

    def _grid_average(self, times: Tensor, xs: Tensor, adjs: Tensor
                      ) -> dict[str, tuple[Tensor, Tensor]]:
        """mean_j of ``factors_at(t_j, x(t_j), a(t_j))`` per layer."""
        total: dict[str, tuple[Tensor, Tensor]] = {}
        for j, t in enumerate(times):
            for n, (A, G) in self.factors_at(t, xs[j], adjs[j].unsqueeze(1)).items():
                total[n] = (A, G) if n not in total else (total[n][0] + A, total[n][1] + G)
        return {n: (A / len(times), G / len(times)) for n, (A, G) in total.items()}

    def grid_rows(self, x_out: Tensor, V: Tensor, grid_step: float | None = None
                  ) -> GridStatistics | None:
        """The statistics kfac/ekfac read for the layers inside ``func`` (docs/method.md
        section 12), by name relative to the block (``func.<name>``): the factors of
        ``grid_statistics`` and a callable that yields, per grid time t_j, each layer's rows
        (a, g) of ``rows_at`` (recomputed from the stored x(t_j), a(t_j): the EKFAC eigenvalue
        correction needs them in the new eigenbasis). None when ``func`` has no such layer.
        ``grid_step`` defaults to the block's."""
        if not self.kronecker_layers():
            return None
        h = self.grid_step if grid_step is None else grid_step
        times, xs, adjs = self.grid_solution(x_out, V, h)
        factors = {f"func.{n}": f for n, f in self._grid_average(times, xs, adjs).items()}

        def rows() -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
            for j, t in enumerate(times):
                yield {f"func.{n}": r for n, r in self.rows_at(t, xs[j], adjs[j].unsqueeze(1)).items()}

        return GridStatistics(factors, rows, len(times))

    def backward_expansion(self, x_out: Tensor, V: Tensor, Z: Tensor | None,
                           rho: Tensor | None, grid_step: float | None = None) -> AdjointColumns:
        """One backward solve from t1 to t0 of the state, the adjoint and the factor columns
        (module docstring): Q_x = a(t0) (B, *n), Qbar_u = mean_i g^(i)(t0) (per parameter),
        the columns a = q(t0) (B, r, *n) and W = p(t0) (B, r, m) with m the flattened
        parameters of ``func`` in ``named_parameters`` order.

        ``x_out``: the nominal x(t1); ``V``: V'_x at x(t1) per sample (not divided by B);
        ``Z``: the factor Z' (B, r, *n), or None with ``rho`` (B,): Z' = rho V' (r = 1, the
        columns are rho a and rho g: g is solved per sample and no q, p columns are added).
        ``grid_step``: also the grid statistics of ``grid_statistics`` (``AdjointColumns.grid``),
        from the same solve (its solution at the grid times)."""
        ps = self._named(None)
        names = list(ps)
        pv = tuple(ps[n] for n in names)
        B = x_out.shape[0]
        per_sample_g = Z is None
        if Z is None and rho is None:
            raise ValueError("backward_expansion needs the factor Z or the ratio rho")

        def f1(pvals: tuple[Tensor, ...], t: Tensor, xi: Tensor) -> Tensor:
            return functional_call(self.func, dict(zip(names, pvals)), (t, xi.unsqueeze(0)))[0]

        def sample(t: Tensor, xi: Tensor, ci: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
            # ci: (c, *n) columns of one sample -> F, F_x^T ci, F_theta^T ci (c, *shape)
            res = vjp(lambda pp, xx: f1(pp, t, xx), pv, xi)
            pulled = vmap(res[1])(ci)
            return res[0], pulled[1], pulled[0]

        def flat(gp: tuple[Tensor, ...], lead: int) -> Tensor:
            return torch.cat([g.reshape(*g.shape[:lead], -1) for g in gp], dim=-1)

        def aug(t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            y, cols = state[0], state[1]  # cols: (B, c, *n), column 0 the adjoint a
            self._count()
            out, gx, gp = vmap(sample, in_dims=(None, 0, 0))(t, y, cols)
            gflat = flat(gp, 2)  # (B, c, m)
            if per_sample_g:
                return out, -gx, -gflat[:, 0]
            return out, -gx, -gflat[:, 0].sum(0), -gflat[:, 1:]

        if self.learn_t1:
            self.t1_grad = self.t1_gradient(x_out, V)
        with torch.no_grad():
            cols = V.unsqueeze(1) if Z is None else torch.cat([V.unsqueeze(1), Z], 1)
            m = sum(p.numel() for p in pv)
            zeros_g = x_out.new_zeros(B, m) if per_sample_g else x_out.new_zeros(m)
            state: tuple[Tensor, ...] = (x_out.detach(), cols.detach(), zeros_g)
            if not per_sample_g:
                assert Z is not None
                state = state + (x_out.new_zeros(B, Z.shape[1], m),)
            times = self._times(x_out, backward=True)
            if grid_step is not None:
                grid = self.grid_times(grid_step, x_out)
                times = grid if float(grid[-1]) <= float(self.t0) + 1e-12 * max(1.0, abs(
                    float(self.t0))) else torch.cat([grid, times[-1:]])
            sol = torchdiffeq.odeint(aug, state, times, **self._solver_kwargs())
            end = [s[-1] for s in sol]
        grid_factors: dict[str, tuple[Tensor, Tensor]] | None = None
        if grid_step is not None:
            J = len(self.grid_times(grid_step, x_out))
            total: dict[str, tuple[Tensor, Tensor]] = {}
            for j in range(J):
                for n, (A, G) in self.factors_at(times[j], sol[0][j], sol[1][j][:, :1]).items():
                    total[n] = (A, G) if n not in total else (total[n][0] + A, total[n][1] + G)
            grid_factors = {n: (A / J, G / J) for n, (A, G) in total.items()}
        cols_0 = end[1]
        Q_x = cols_0[:, 0]
        if per_sample_g:
            assert rho is not None
            g = end[2]  # (B, m)
            Q_u_flat = g.mean(0)
            view = (-1, *[1] * (Q_x.dim() - 1))
            a = (Q_x * rho.reshape(view)).unsqueeze(1)
            W = (g * rho.unsqueeze(1)).unsqueeze(1)
        else:
            Q_u_flat = end[2] / B
            a, W = cols_0[:, 1:], end[3]
        Q_u = [c.reshape(p.shape) for c, p in zip(Q_u_flat.split([p.numel() for p in pv]), pv)]
        if self.learn_t1:
            self._t1_ref = (Q_u, [p.detach().clone() for p in pv])
        return AdjointColumns(Q_x=Q_x, Q_u=Q_u, a=a, W=W, grid=grid_factors)


def solver_statistics(model: nn.Module) -> SolverStatistics:
    """Function evaluations of every ``ODEBlock`` in ``model`` since their last ``reset_nfe``:
    forward solves and backward (adjoint, expansion) solves."""
    stats = SolverStatistics()
    for m in model.modules():
        if isinstance(m, ODEBlock):
            stats.nfe_forward += m.nfe_forward
            stats.nfe_backward += m.nfe_backward
    return stats


def reset_solver_statistics(model: nn.Module) -> None:
    """``reset_nfe`` on every ``ODEBlock`` of ``model``."""
    for m in model.modules():
        if isinstance(m, ODEBlock):
            m.reset_nfe()


DERIVATIVES[ODEBlock] = ODEDerivatives()

__all__ = ["ODEBlock", "SolverStatistics", "T1Update", "solver_statistics", "reset_solver_statistics"]
