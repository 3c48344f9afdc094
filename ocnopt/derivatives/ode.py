"""Derivatives of a stage solved by the adjoint method (Neural ODE blocks, docs/method.md
section 12).

Such a stage cannot be differentiated by ``torch.func`` transforms (the solver is not
transformable); its vector-Jacobian products are backward solves. ``AdjointDerivatives``
declares what the low-rank backend asks of it instead of per-sample ``torch.func`` products:
``backward_expansion`` returns, from ONE backward solve, Q_x, Qbar_u and the factor columns
a = f_x^T Z' and W = f_u^T Z' (per sample), from which the backend forms W^T k, the feedback
(1/B) sum_i W^(i) s^(i) and the Gram matrices W^T M^{-1} W without further solves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .base import StageDerivatives


@dataclass
class AdjointColumns:
    """The expansion of an adjoint stage at its input, per sample: Q_x = f_x^T V'_x (B, *n),
    Qbar_u = (1/B) sum_i f_u^T V'_x^(i) (one tensor per parameter), a = f_x^T Z' (B, r, *n)
    and W = f_u^T Z' (B, r, m), m the stage's flattened control."""

    Q_x: Tensor
    Q_u: list[Tensor]
    a: Tensor
    W: Tensor
    #: K-FAC factors (A, G) of the Kronecker layers inside the stage averaged over a time grid,
    #: by layer name (ODE blocks, when asked for with ``grid_step``)
    grid: dict[str, tuple[Tensor, Tensor]] | None = None


@dataclass
class GridStatistics:
    """Kronecker statistics of the layers inside an adjoint stage on a time grid t_j
    (docs/method.md section 12), by layer name relative to the stage: ``factors`` (A, G)
    averaged over the J grid times, and ``rows()``, which yields per grid time each layer's
    rows (a (B, P, d_in), g (B, r, P, d_out)) whose factors those are."""

    factors: dict[str, tuple[Tensor, Tensor]]
    rows: Callable[[], Iterator[dict[str, tuple[Tensor, Tensor]]]]
    n_times: int


class AdjointDerivatives(StageDerivatives):
    """A stage whose derivatives are solves of adjoint equations (declared interface)."""

    def backward_expansion(self, module: nn.Module, out: Tensor, V: Tensor, Z: Tensor | None,
                           rho: Tensor | None, grid_step: float | None = None) -> AdjointColumns:
        """From the nominal output ``out``, V'_x (B, *n) and the factor Z' (B, r, *n) at the
        output, or ``rho`` (B,) with Z' = rho V'_x (then Z is None): Q_x, Qbar_u, a and W in
        one backward solve (``grid_step``: and the Kronecker statistics on the time grid)."""
        raise NotImplementedError(f"{type(module).__name__} has no backward expansion")

    def grid_rows(self, module: nn.Module, out: Tensor, V: Tensor) -> GridStatistics | None:
        """The Kronecker statistics of the stage's ``sublayers`` from the nominal output
        ``out`` and V'_x (B, *n) there, or None where it has none."""
        return None

    def functional(self, module: nn.Module, params: dict[str, Tensor], x: Tensor, ctx: Any) -> Tensor:
        raise TypeError(
            f"{type(module).__name__} is solved by the adjoint method and cannot be "
            "differentiated by torch.func transforms: the exact backend ('autograd') and "
            "backend 'backpack' do not support it at order 2; use backend 'lowrank' (or order 1)")


class ODEDerivatives(AdjointDerivatives):
    """``ocnopt.ode.ODEBlock``: x(t1) from x(t0), dx/dt = func(t, x); control = func's
    parameters. No Kronecker structure as a whole: kfac/ekfac precondition each Linear/Conv
    inside ``func`` (``sublayers``) with its factors averaged over the block's time grid
    (``grid_rows``), and the other parameters of ``func`` with their diagonal fallback."""

    def sublayers(self, module: nn.Module) -> dict[str, nn.Module]:
        """The Linear/Conv layers inside ``func`` with a trainable weight, as ``func.<name>``."""
        return {f"func.{n}": m for n, m in module.kronecker_layers().items()}  # type: ignore[operator]

    def grid_rows(self, module: nn.Module, out: Tensor, V: Tensor) -> GridStatistics | None:
        return module.grid_rows(out, V)  # type: ignore[operator]

    def refusal(self, module: nn.Module) -> str | None:
        """Layers inside ``func`` that the per-sample expansion cannot honour: batch
        normalisation (couples the samples) and, in training mode, dropout (new random numbers
        at every evaluation of the field, forward and backward solves alike)."""
        func = getattr(module, "func", None)
        if not isinstance(func, nn.Module):
            return None
        for name, m in func.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                return (f"its field has {type(m).__name__} at func.{name}, which couples the "
                        "samples of a batch; use a per-sample normalisation (GroupNorm, LayerNorm)")
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
                return (f"its field has {type(m).__name__} at func.{name} in training mode: new "
                        "random numbers at every evaluation of the field; remove it or call "
                        "eval() on it")
        return None

    def forward(self, module: nn.Module, x: Tensor) -> tuple[Tensor, Any]:
        return module(x), None

    def replay(self, module: nn.Module, x: Tensor, ctx: Any) -> Tensor:
        return module(x)

    def param_jvp(self, module: nn.Module, params: dict[str, Tensor], x: Tensor, ctx: Any,
                  tangent: dict[str, Tensor]) -> Tensor:
        """f_u k by the forward sensitivity equation solved alongside the state."""
        return module.param_jvp(params, x, tangent)  # type: ignore[operator]

    def backward_expansion(self, module: nn.Module, out: Tensor, V: Tensor, Z: Tensor | None,
                           rho: Tensor | None, grid_step: float | None = None) -> AdjointColumns:
        return module.backward_expansion(out, V, Z, rho, grid_step)  # type: ignore[operator]


__all__ = ["AdjointColumns", "AdjointDerivatives", "GridStatistics", "ODEDerivatives"]
