"""How one layer type differentiates: the generic part shared by every stage.

BackPACK-style split: a ``StageDerivatives`` object knows the derivatives of ONE layer type
(forward with recorded context, vector-Jacobian and Jacobian-vector products, closed forms
used by the curvature models) and nothing about which quantity a backend or curvature model
builds from them.

Shapes: B batch, P weight-sharing positions (1 for a plain Linear on (B, d_in)),
d_in / d_out the fan-in / fan-out of a Kronecker-factored layer, r factor columns.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call


def _inplace(module: nn.Module) -> bool:
    """``getattr(module, "inplace", False)`` without ``nn.Module.__getattr__``'s
    AttributeError for the modules that have no such attribute (most): the instance's
    attribute (nn.ReLU(inplace=True) sets it there), else the class's."""
    d = module.__dict__
    if "inplace" in d:
        return bool(d["inplace"])
    return bool(getattr(module, "inplace", False)) if hasattr(type(module), "inplace") else False


class StageDerivatives:
    """Generic derivatives of a stage ``x_{t+1} = f(x_t, u_t)`` via ``torch.func``.

    Subclasses override what has a closed form. ``kronecker`` says whether the layer type has
    Kronecker factors ``A = E[a a^T]`` and ``G = E[g g^T]`` (Linear and convolutions).
    """

    kronecker: bool = False
    #: the stage draws random numbers; its context makes later evaluations draw the same
    random: bool = False
    #: ``forward`` is the module's own call (same operations, same random draws; any context
    #: it records consumes nothing): order 1 may then run the model's own forward instead
    #: of the steps one by one (``Graph.direct``)
    plain_forward: bool = True
    #: ``param_jvp`` reads the values of ``params`` (False: only the tangent, a linear layer)
    jvp_reads_params: bool = True

    # ---- checks ------------------------------------------------------------------------------
    def refusal(self, module: nn.Module) -> str | None:
        """Why this module's configuration is not supported (a sentence), or None."""
        return None

    def check(self, module: nn.Module, where: str) -> None:
        """Raise ``TypeError`` naming ``where`` (e.g. "stage position 3 (model.layer1.0.conv1)")
        when this module's configuration cannot be a stage."""
        why = self.refusal(module)
        if why is not None:
            raise TypeError(f"{type(module).__name__} at {where}: {why}")

    def sublayers(self, module: nn.Module) -> dict[str, nn.Module]:
        """Kronecker layers inside a stage that is not one as a whole (an ODE block's field),
        by name relative to the stage (their parameters are ``<name>.weight``, ``<name>.bias``
        of the stage's control); kfac/ekfac precondition each with its own factors. Empty for
        ordinary layers."""
        return {}

    def positions(self, module: nn.Module, out_sample_numel: int) -> int:
        """Weight-sharing positions P of the stage's output per sample: out_sample_numel / d_out
        for a Kronecker layer with a trainable weight (1 for a Linear on vectors), 1 otherwise."""
        if not self.kronecker:
            return 1
        w = getattr(module, "weight", None)
        if not isinstance(w, Tensor) or not w.requires_grad:
            return 1
        return max(1, out_sample_numel // w.shape[0])

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, module: nn.Module, x: Tensor) -> tuple[Tensor, Any]:
        """Nominal forward pass ``f(x, u)``; returns the output and a context that makes the
        forward pass replayable (e.g. a dropout mask) in the update pass. A context that is a
        tensor is per sample along dim 0: the backends slice it with the input (``vmap``) and
        hand ``functional`` the (1, ...) slice of a sample, or the whole (B, ...) tensor."""
        if _inplace(module):
            x = x.clone()
        return module(x), None

    def replay(self, module: nn.Module, x: Tensor, ctx: Any) -> Tensor:
        """Forward pass with the randomness of the nominal pass (``ctx``) held fixed."""
        if _inplace(module):
            x = x.clone()
        return module(x)

    def functional(self, module: nn.Module, params: dict[str, Tensor], x: Tensor, ctx: Any) -> Tensor:
        """``f(x, u)`` as a pure function of ``params`` (for ``torch.func`` transforms)."""
        if not params:
            return self.replay(module, x, ctx)
        return functional_call(module, params, (x,))

    def param_jvp(self, module: nn.Module, params: dict[str, Tensor], x: Tensor, ctx: Any,
                  tangent: dict[str, Tensor]) -> Tensor:
        """f_u k: the change of the output along the control direction ``tangent``."""
        names = list(params)

        def fn(*ps: Tensor) -> Tensor:
            return self.functional(module, dict(zip(names, ps)), x, ctx)

        return torch.func.jvp(fn, tuple(params.values()), tuple(tangent[n] for n in names))[1]

    def per_sample_param_grads(self, module: nn.Module, names: list[str], x: Tensor, ctx: Any,
                               cot: Tensor) -> list[Tensor] | None:
        """Per-sample, per-column parameter gradients f_u^(i)T cot_ic, one tensor
        (B, r, *param.shape) per name in ``names``, from output cotangents ``cot``
        (B, r, *out), where the layer has a closed form; None: the backend forms them by
        ``torch.func.vmap`` over ``functional``."""
        return None

    # ---- Kronecker closed forms (Linear / Conv only) ------------------------------------------
    def exact_rows(self, module: nn.Module) -> bool:
        """Whether ``kfac_input``/``kfac_output`` rows give the exact per-sample gradients
        sum_p g_p a_p^T (False where the Kronecker factors use an approximation)."""
        return False

    def kfac_input(self, module: nn.Module, x: Tensor) -> Tensor:
        """Rows ``a`` of the input factor, shape (B, P, d_in); None for a layer type without
        Kronecker factors (``kronecker`` False: the Kronecker curvature models use their
        diagonal fallback there and read no rows)."""
        if not self.kronecker:  # statistics of a non-Kronecker stage: empty rows
            return None  # type: ignore[return-value]
        raise NotImplementedError(f"{type(module).__name__} has no Kronecker factors")

    def kfac_output(self, module: nn.Module, g: Tensor) -> Tensor:
        """Rows ``g`` of the output factor from output cotangents (B, r, *out) -> (B, r, P, d_out);
        None for a layer type without Kronecker factors (see ``kfac_input``)."""
        if not self.kronecker:  # statistics of a non-Kronecker stage: empty rows
            return None  # type: ignore[return-value]
        raise NotImplementedError(f"{type(module).__name__} has no Kronecker factors")

    def weight_matrix_shape(self, module: nn.Module) -> tuple[int, int]:
        """(d_out, d_in) of the weight seen as a matrix acting on the rows of ``kfac_input``."""
        raise NotImplementedError(f"{type(module).__name__} has no Kronecker factors")


def param_dict(module: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters of ``module`` (its control ``u``), by local name."""
    return {name: p for name, p in module.named_parameters(recurse=True) if p.requires_grad}


def as_tuple(v: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


__all__ = ["StageDerivatives", "param_dict", "as_tuple", "torch"]
