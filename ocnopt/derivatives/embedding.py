"""Derivatives of ``nn.Embedding``: x_{t+1} = U[x_t] with integer indices x_t.

The input carries no value gradient (indices); the control is the weight U (num, dim). Rows at
``padding_idx`` receive no gradient, as in torch. Refused: ``max_norm`` (the forward pass
renormalises U in place), ``sparse=True`` (sparse gradients) and ``scale_grad_by_freq`` (it
rescales the batch gradient by the index counts of the batch, which is not the derivative of
the forward map, so per-sample terms and the batch gradient would disagree).
"""

from __future__ import annotations

from torch import nn

from .base import StageDerivatives


class EmbeddingDerivatives(StageDerivatives):
    """Embedding lookup: the generic ``torch.func`` forms on integer inputs."""

    def refusal(self, module: nn.Module) -> str | None:
        assert isinstance(module, nn.Embedding)
        if module.max_norm is not None:
            return (f"max_norm={module.max_norm!r} renormalises the weight in place in the forward "
                    "pass, which the update pass cannot replay; use max_norm=None")
        if module.sparse:
            return "sparse=True gives sparse gradients; use sparse=False"
        if module.scale_grad_by_freq:
            return ("scale_grad_by_freq=True rescales the gradient by the batch's index counts, "
                    "which is not the derivative of the forward map; use scale_grad_by_freq=False")
        return None
