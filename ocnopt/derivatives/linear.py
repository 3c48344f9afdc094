"""Derivatives of ``nn.Linear``: h = U a (+ b), on inputs (B, ..., d_in)."""

from __future__ import annotations

from einops import rearrange
from torch import Tensor, nn

from .base import StageDerivatives


class LinearDerivatives(StageDerivatives):
    """Closed forms: the input factor rows are the inputs, the output factor rows the output
    cotangents; extra leading dimensions beyond the batch are weight-sharing positions P."""

    kronecker = True

    def kfac_input(self, module: nn.Module, x: Tensor) -> Tensor:
        # (B, ..., d_in) -> (B, P, d_in)
        return rearrange(x, "b ... d -> b (...) d")

    def kfac_output(self, module: nn.Module, g: Tensor) -> Tensor:
        # (B, r, ..., d_out) -> (B, r, P, d_out)
        return rearrange(g, "b r ... d -> b r (...) d")

    def weight_matrix_shape(self, module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, nn.Linear)
        return module.out_features, module.in_features
