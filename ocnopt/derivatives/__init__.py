"""Per-layer-type derivatives; ``DERIVATIVES`` maps module classes to their handler.

Adding a layer type means adding its handler here (one file per family); every backend and
curvature model then supports it through the ``StageDerivatives`` interface. ``handler_for``
picks a module's handler: the table's, else the generic ``torch.func`` one for other leaf
modules, else a ``TypeError`` saying why.
"""

from __future__ import annotations

from torch import nn

from .base import StageDerivatives
from .conv import ConvDerivatives
from .elementwise import DropoutDerivatives, ElementwiseDerivatives, EvalOnlyDerivatives
from .embedding import EmbeddingDerivatives
from .generic import GenericDerivatives, PReLUDerivatives
from .linear import LinearDerivatives
from .norm import BatchNormDerivatives

_elementwise = ElementwiseDerivatives()
_batchnorm = BatchNormDerivatives()
_channel_dropout = DropoutDerivatives(channelwise=True)
_eval_only = EvalOnlyDerivatives()
GENERIC = GenericDerivatives()

DERIVATIVES: dict[type[nn.Module], StageDerivatives] = {
    nn.Linear: LinearDerivatives(),
    nn.Conv1d: ConvDerivatives(1),
    nn.Conv2d: ConvDerivatives(2),
    nn.Dropout: DropoutDerivatives(),
    nn.Dropout1d: _channel_dropout,
    nn.Dropout2d: _channel_dropout,
    nn.Dropout3d: _channel_dropout,
    nn.BatchNorm1d: _batchnorm,
    nn.BatchNorm2d: _batchnorm,
    nn.BatchNorm3d: _batchnorm,
    nn.Embedding: EmbeddingDerivatives(),
    nn.RReLU: _eval_only,
    nn.AlphaDropout: _eval_only,
    nn.FeatureAlphaDropout: _eval_only,
    # per-sample layers with parameters of no Kronecker structure: the generic torch.func forms
    # (listed so that the chain builder accepts them; handler_for gives any other leaf module
    # the same handler)
    nn.LayerNorm: GENERIC,
    nn.GroupNorm: GENERIC,
    nn.PReLU: PReLUDerivatives(),
    **{
        cls: _elementwise
        for cls in (
            nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.Softplus, nn.SiLU,
            nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.ReLU6, nn.Mish, nn.SELU, nn.CELU,
            nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Softmax, nn.LogSoftmax,
            nn.Flatten, nn.Unflatten, nn.Identity,
            nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
            nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        )
    },
}

#: layer families the generic handler must not take, with the reason
_REFUSED: tuple[tuple[tuple[type, ...], str], ...] = (
    ((nn.RNNBase,), "returns a tuple (output, hidden state); a stage must return one tensor"),
    ((nn.MultiheadAttention, nn.Bilinear),
     "takes several input tensors; a stage maps one tensor to one tensor"),
    ((nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
      nn.TransformerEncoderLayer, nn.TransformerDecoderLayer),
     "is a container with its own forward() and dropout inside"),
    ((nn.SyncBatchNorm,), "synchronises batch statistics across processes; use nn.BatchNorm*d"),
    ((nn.EmbeddingBag,), "is not supported; use nn.Embedding followed by a pooling layer"),
    ((nn.modules.lazy.LazyModuleMixin,),  # type: ignore[attr-defined]
     "has uninitialised parameters; run one forward pass before building the optimizer"),
)


def supported_modules() -> list[str]:
    """Names of the layer types with their own handler, for error messages and docs (other
    leaf modules go through the generic handler)."""
    return sorted(cls.__name__ for cls in DERIVATIVES)


def _generic_refusal(module: nn.Module) -> str | None:
    for classes, why in _REFUSED:
        if isinstance(module, classes):
            return why
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        return ("track_running_stats=True updates running statistics in every forward pass, "
                "the update pass's included; use track_running_stats=False")
    own = any(True for _ in module.parameters(recurse=False))
    if any(True for _ in module.children()) and not own:
        return ("is a container with its own forward(): write it as nn.Sequential(...) of "
                "supported layers (nested Sequentials are flattened)")
    return None


def refusal_of(module: nn.Module) -> str | None:
    """Why ``module`` cannot be a stage (a sentence), or None: its handler's ``refusal``, or
    the generic handler's rules for a module without a handler of its own."""
    handler = DERIVATIVES.get(type(module))
    return handler.refusal(module) if handler is not None else _generic_refusal(module)


def handler_for(module: nn.Module) -> StageDerivatives:
    """The handler of ``module``: the table's (``DERIVATIVES``, exact type), else the generic
    ``torch.func`` handler for another leaf module (no child modules, or parameters of its
    own). Raises ``TypeError`` naming the class and why it is refused (random in training
    mode: RReLU, AlphaDropout; sparse or max_norm embeddings; recurrent layers; containers;
    ...) with the list of layers that have their own handler."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"a stage must be a torch.nn.Module, got {type(module).__name__}")
    handler = DERIVATIVES.get(type(module))
    why = refusal_of(module)
    if why is not None:
        raise TypeError(
            f"unsupported module {type(module).__name__}: {why}. Layers with their own handler: "
            f"{', '.join(supported_modules())}; other leaf modules (no child modules, or "
            "parameters of their own) use the generic torch.func handler")
    return handler if handler is not None else GENERIC


__all__ = ["DERIVATIVES", "GENERIC", "GenericDerivatives", "StageDerivatives", "handler_for",
           "refusal_of",
           "supported_modules"]
