"""Derivatives of ``nn.Conv1d`` and ``nn.Conv2d`` (stride, padding, dilation, groups).

A convolution is a Linear layer applied to input patches: W (C_out, C_in/groups * k) acts on
the unfolded input (B, P, C_in/groups * k) with P the output positions. For groups > 1 the
patches are averaged over channel groups (the convention of curvlinops' K-FAC).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor, nn

from .base import StageDerivatives, as_tuple


def _padding(module: Any, n: int) -> tuple[int, ...]:
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * n
        # padding="same": symmetric only when dilation*(k-1) is even
        pads = []
        for k, d in zip(as_tuple(module.kernel_size, n), as_tuple(module.dilation, n)):
            total = d * (k - 1)
            if total % 2:
                raise NotImplementedError(
                    f"{module}: padding='same' with an even effective kernel is asymmetric; "
                    "Kronecker factors need symmetric integer padding"
                )
            pads.append(total // 2)
        return tuple(pads)
    return as_tuple(padding, n)


class ConvDerivatives(StageDerivatives):
    kronecker = True

    def __init__(self, dims: int):
        self.dims = dims

    def param_jvp(self, module, params, x, ctx, tangent):  # type: ignore[no-untyped-def]
        # affine in (weight, bias): f_u k is the convolution with the tangent as parameters
        # (padding modes included), without the primal pass torch.func.jvp would add
        return module._conv_forward(x, tangent["weight"], tangent.get("bias"))

    def _as_2d(self, x: Tensor) -> Tensor:
        return x.unsqueeze(-2) if self.dims == 1 else x

    def kfac_input(self, module: Any, x: Tensor) -> Tensor:
        if getattr(module, "padding_mode", "zeros") != "zeros":
            x = _pad_nonzero(module, x, self.dims)
            padding = (0,) * self.dims
        else:
            padding = _padding(module, self.dims)
        groups = module.groups
        x = rearrange(x, "b (g c) ... -> b g c ...", g=groups)
        x = reduce(x, "b g c ... -> b c ...", "mean")
        x = self._as_2d(x)
        ks = as_tuple(module.kernel_size, self.dims)
        st = as_tuple(module.stride, self.dims)
        dl = as_tuple(module.dilation, self.dims)
        if self.dims == 1:
            ks, st, dl, padding = (1, ks[0]), (1, st[0]), (1, dl[0]), (0, padding[0])
        cols = F.unfold(x, ks, dilation=dl, padding=padding, stride=st)
        return rearrange(cols, "b ck p -> b p ck")

    def kfac_output(self, module: nn.Module, g: Tensor) -> Tensor:
        # (B, r, C_out, *spatial) -> (B, r, P, C_out)
        return rearrange(g, "b r c ... -> b r (...) c")

    def exact_rows(self, module: Any) -> bool:
        return bool(module.groups == 1)

    def weight_matrix_shape(self, module: Any) -> tuple[int, int]:
        w = module.weight
        return w.shape[0], w[0].numel()


def _pad_nonzero(module: Any, x: Tensor, dims: int) -> Tensor:
    pads: list[int] = []
    for p in reversed(_padding(module, dims)):
        pads += [p, p]
    return F.pad(x, pads, mode=module.padding_mode)
