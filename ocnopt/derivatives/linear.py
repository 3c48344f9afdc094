"""Derivatives of ``nn.Linear``: h = U a (+ b), on inputs (B, ..., d_in)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from .base import StageDerivatives


class LinearDerivatives(StageDerivatives):
    """Closed forms: the input factor rows are the inputs, the output factor rows the output
    cotangents; extra leading dimensions beyond the batch are weight-sharing positions P."""

    kronecker = True
    jvp_reads_params = False  # f_u k = x k_U^T + k_b

    def kfac_input(self, module: nn.Module, x: Tensor) -> Tensor:
        # (B, ..., d_in) -> (B, P, d_in) (einops' "b ... d -> b (...) d", without its parsing)
        return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])

    def kfac_output(self, module: nn.Module, g: Tensor) -> Tensor:
        # (B, r, ..., d_out) -> (B, r, P, d_out)
        return g.reshape(g.shape[0], g.shape[1], math.prod(g.shape[2:-1]), g.shape[-1])

    def exact_rows(self, module: nn.Module) -> bool:
        return True

    def param_jvp(self, module, params, x, ctx, tangent):  # type: ignore[no-untyped-def]
        if "weight" in tangent:  # x k_U^T + k_b as one linear map (one kernel)
            return F.linear(x, tangent["weight"], tangent.get("bias"))
        return tangent["bias"].expand(*x.shape[:-1], -1)

    def weight_matrix_shape(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, nn.Linear)
        return module.out_features, module.in_features
