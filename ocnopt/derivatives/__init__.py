"""Per-layer-type derivatives; ``DERIVATIVES`` maps module classes to their handler.

Adding a layer type means adding its handler here (one file per family); every backend and
curvature model then supports it through the ``StageDerivatives`` interface.
"""

from __future__ import annotations

from torch import nn

from .base import StageDerivatives
from .conv import ConvDerivatives
from .elementwise import DropoutDerivatives, ElementwiseDerivatives
from .linear import LinearDerivatives

_elementwise = ElementwiseDerivatives()

DERIVATIVES: dict[type[nn.Module], StageDerivatives] = {
    nn.Linear: LinearDerivatives(),
    nn.Conv1d: ConvDerivatives(1),
    nn.Conv2d: ConvDerivatives(2),
    nn.Dropout: DropoutDerivatives(),
    **{
        cls: _elementwise
        for cls in (
            nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.Softplus, nn.SiLU,
            nn.Flatten, nn.Identity,
            nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
            nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
        )
    },
}


def supported_modules() -> list[str]:
    """Names of the supported layer types, for error messages and docs."""
    return sorted(cls.__name__ for cls in DERIVATIVES)


__all__ = ["DERIVATIVES", "StageDerivatives", "supported_modules"]
