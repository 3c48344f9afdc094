"""Derivatives of ``nn.Linear``: h = U a (+ b), on inputs (B, ..., d_in)."""

from __future__ import annotations

import math

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
        out = x @ tangent["weight"].T if "weight" in tangent else None
        if "bias" in tangent:
            out = tangent["bias"].expand(*x.shape[:-1], -1) if out is None else out + tangent["bias"]
        return out

    def weight_matrix_shape(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, nn.Linear)
        return module.out_features, module.in_features
