"""Derivatives of ``nn.BatchNorm1d/2d/3d`` (LayerNorm and GroupNorm act per sample: the
generic handler covers them).

In training mode (or without running statistics) BatchNorm normalises with the batch mean and
biased variance, which couples the samples of a batch (choices, docs/method.md "Layers"):

- ``forward`` (nominal pass) runs the module as torch does, so the running statistics (and
  ``num_batches_tracked``) are updated exactly once per step, and the first-order value
  recursion differentiates through the batch statistics (order 1 is exact);
- ``replay`` (update pass) normalises with the batch statistics of its own input and leaves
  the running statistics untouched;
- ``functional`` (per-sample second-order terms) treats the nominal batch statistics as
  constants, y = (x - mean) / sqrt(var + eps) * w + b, a per-sample map that ``vmap`` can
  slice. The context is a ``BatchStatistics`` of the nominal input: the (mean, biased var)
  pair is computed when first asked for (order 1 never asks).

In eval mode with running statistics the three use the running statistics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import StageDerivatives


def _uses_batch_statistics(module: Any) -> bool:
    """torch's rule: batch statistics in training mode, or when no running statistics exist."""
    return bool(module.training or (module.running_mean is None and module.running_var is None))


class BatchStatistics:
    """The nominal batch's per-channel mean and biased variance, computed on first use."""

    def __init__(self, x: Tensor):
        self.x = x
        self._mean_var: tuple[Tensor, Tensor] | None = None

    def mean_var(self) -> tuple[Tensor, Tensor]:
        if self._mean_var is None:
            dims = [0, *range(2, self.x.dim())]
            with torch.no_grad():
                var, mean = torch.var_mean(self.x, dims, unbiased=False)
            self._mean_var = (mean, var)
        return self._mean_var


class BatchNormDerivatives(StageDerivatives):
    """BatchNorm with batch statistics recorded by the nominal pass (see the module docstring)."""

    def forward(self, module: nn.Module, x: Tensor) -> tuple[Tensor, Any]:
        out = module(x)  # the nominal pass: running statistics updated once, as torch does
        if not _uses_batch_statistics(module):
            return out, None
        return out, BatchStatistics(x.detach())

    def replay(self, module: nn.Module, x: Tensor, ctx: Any) -> Tensor:
        bn: Any = module
        bn._check_input_dim(x)
        if _uses_batch_statistics(bn):  # batch statistics of x, running statistics untouched
            return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                            bn.eps)

    @staticmethod
    def normalized(module: nn.Module, x: Tensor, ctx: Any) -> Tensor:
        """xhat = (x - mean) / sqrt(var + eps) with the statistics ``functional`` uses."""
        mean, var = (module.running_mean, module.running_var) if ctx is None else ctx.mean_var()
        assert isinstance(mean, Tensor) and isinstance(var, Tensor)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        return (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + float(module.eps))  # type: ignore[arg-type]

    def param_jvp(self, module, params, x, ctx, tangent):  # type: ignore[no-untyped-def]
        """f_u k = xhat * k_w + k_b: affine in (w, b) with the statistics held (no primal pass)."""
        shape = (1, -1, *([1] * (x.dim() - 2)))
        out = None
        if "weight" in tangent:
            out = self.normalized(module, x, ctx) * tangent["weight"].reshape(shape)
        if "bias" in tangent:
            b = tangent["bias"].reshape(shape)
            out = b.expand(x.shape) if out is None else out + b
        return out

    def per_sample_param_grads(self, module: nn.Module, names: list[str], x: Tensor, ctx: Any,
                               cot: Tensor) -> list[Tensor] | None:
        """w_ic = (sum_positions cot_ic * xhat_i, sum_positions cot_ic) for (weight, bias)."""
        dims = tuple(range(3, cot.dim()))
        out = []
        for name in names:
            if name == "weight":
                xn = self.normalized(module, x, ctx).unsqueeze(1)
                out.append((cot * xn).sum(dims) if dims else cot * xn)
            else:
                out.append(cot.sum(dims) if dims else cot)
        return out

    def functional(self, module: nn.Module, params: dict[str, Tensor], x: Tensor, ctx: Any) -> Tensor:
        """(x - mean) / sqrt(var + eps) * w + b with mean, var the nominal batch statistics
        (``ctx``, constants) or the running statistics (eval mode, ``ctx`` None)."""
        mean, var = (module.running_mean, module.running_var) if ctx is None else ctx.mean_var()
        assert isinstance(mean, Tensor) and isinstance(var, Tensor)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        eps = float(module.eps)  # type: ignore[arg-type]
        y = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
        w = params.get("weight", module.weight)
        b = params.get("bias", module.bias)
        if isinstance(w, Tensor):
            y = y * w.reshape(shape)
        if isinstance(b, Tensor):
            y = y + b.reshape(shape)
        return y
