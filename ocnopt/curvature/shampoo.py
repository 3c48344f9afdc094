"""Shampoo: one inverse-root factor per axis of each parameter (docs/method.md, curvature models).

The arithmetic is that of ``pytorch_optimizer.Shampoo`` (same hyper-parameters, names and
defaults). Per parameter u with k axes and the gradient g:

* g' = lerp(g, b, momentum) with b the previous direction (the gradient itself at the first
  step), then g' + wd u (coupled weight decay, after the momentum, as Shampoo);
* factors L_j <- L_j + G'_(j) G'_(j)^T, G'_(j) the unfolding of g' along axis j, starting from
  ``matrix_eps`` I; every ``preconditioning_compute_steps`` steps H_j = L_j^{-1/(2k)} (by SVD);
* direction d = g' x_1 H_1 ... x_{k-1} H_{k-1} x_k H_k^T (= H_1 G' H_2 for a matrix), kept as b.

Curvature model: M^{-1} = H_1 (x) ... (x) H_k^T acting axis by axis as above (the inverse roots
of the current state), M its inverse (pseudo-inverse of each factor: diagnostics only); the
direction is M^{-1} g' (M^{-1} Qbar_u without momentum and weight decay).
With ``weight_decouple`` the decay is applied to the parameters before the step,
u <- u (1 - lr wd) (1 - wd with ``fixed_decay``), i.e. the direction d + wd u (d + wd u / lr).
Weight decay is never part of the objective here (Shampoo adds it after the momentum).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..stages import Stage
from .base import (
    CurvatureModel,
    StageStatistics,
    State,
    check_nonneg,
    require,
    rows_gram,
)


def inverse_root(matrix: Tensor, power: float) -> Tensor:
    """matrix^{-1/power} by SVD (pytorch-optimizer's ``compute_power_svd``); NaN where the
    matrix is not finite (the optimizer then skips the step as non-finite)."""
    if not bool(torch.isfinite(matrix).all()):
        return torch.full_like(matrix, float("nan"))
    dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
    u, s, vh = torch.linalg.svd(matrix.to(dtype), full_matrices=False)
    s.pow_(-1.0 / power)
    return ((u * s.unsqueeze(-2)) @ vh).to(matrix.dtype)


def along_axes(x: Tensor, mats: Sequence[Tensor], first: int) -> Tensor:
    """x with axis first + j multiplied by mats[j] (x_j <- sum_i M[j]_{ji'} x_i'), the last
    matrix transposed (Shampoo's orientation: G' @ H for the last axis)."""
    n = len(mats)
    for j, mat in enumerate(mats):
        m = mat if j == n - 1 else mat.T
        x = (x.movedim(first + j, -1) @ m).movedim(-1, first + j)
    return x


class Shampoo(CurvatureModel):
    name = "shampoo"
    defaults = {"momentum": 0.0, "weight_decay": 0.0, "weight_decouple": False,
                "fixed_decay": False, "preconditioning_compute_steps": 1, "matrix_eps": 1e-6}

    def check(self, hp: dict[str, Any]) -> None:
        m = hp["momentum"]
        require(isinstance(m, (int, float)) and not isinstance(m, bool) and 0.0 <= m <= 1.0,
                "momentum", m, "a number in [0, 1]")
        for key in ("weight_decouple", "fixed_decay"):
            require(isinstance(hp[key], bool), key, hp[key], "True or False")
        n = hp["preconditioning_compute_steps"]
        require(isinstance(n, int) and not isinstance(n, bool) and n >= 1,
                "preconditioning_compute_steps", n, "an integer >= 1")
        check_nonneg(hp, "matrix_eps")
        if hp["weight_decouple"] and hp["fixed_decay"] and hp.get("weight_decay", 0) and hp["lr"] == 0:
            raise ValueError("invalid lr=0 with weight_decouple=True, fixed_decay=True and "
                             "weight_decay > 0: accepted lr > 0 (the decay u(1 - wd) is the step "
                             "-lr d with d = wd u / lr)")

    def coupled_weight_decay(self, hp: dict[str, Any]) -> bool:
        return False  # Shampoo adds it after the momentum (see the module docstring)

    def direction_is_solve(self, hp: dict[str, Any]) -> bool:
        return hp["momentum"] == 0 and hp["weight_decay"] == 0

    def update(self, stage: Stage, states: list[State], grads: list[Tensor], params: Sequence[Tensor],
               stats: StageStatistics | None, hp: dict[str, Any], step: int
               ) -> tuple[list[State], list[Tensor]]:
        momentum, wd, lr = hp["momentum"], hp["weight_decay"], hp["lr"]
        new_states, dirs = [], []
        for st, g, p in zip(states, grads, params):
            if "step" not in st:  # Shampoo's init_group
                pre = [torch.eye(d, device=g.device).to(g.dtype).mul_(hp["matrix_eps"]) for d in g.shape]
                inv = [g.new_zeros(d, d) for d in g.shape]
                buf = g.clone() if momentum > 0 else None
                k = 1
            else:
                pre = [st[f"pre_cond_{j}"] for j in range(g.dim())]
                inv = [st[f"inv_pre_cond_{j}"] for j in range(g.dim())]
                buf = st.get("momentum_buffer")
                k = int(st["step"]) + 1
            grad = g
            if momentum > 0:
                assert buf is not None
                grad = grad.lerp(buf, momentum)
            decoupled = None
            if wd != 0:
                if hp["weight_decouple"]:
                    decoupled = wd if hp["fixed_decay"] is False else wd / lr
                else:
                    grad = grad.add(p.detach(), alpha=wd)
            order, original_size = grad.dim(), grad.size()
            statistics_grad = grad
            new: State = {"step": torch.tensor(k)}
            compute = k % hp["preconditioning_compute_steps"] == 0
            for j, dim in enumerate(original_size):
                unfolded = statistics_grad.movedim(j, 0).reshape(dim, -1)
                P = torch.addmm(pre[j], unfolded, unfolded.t())
                grad = grad.transpose(0, j).contiguous()
                transposed_size = grad.size()
                grad = grad.view(dim, -1)
                H = inverse_root(P, 2 * order) if compute else inv[j]
                if j == order - 1:
                    grad = (grad.t() @ H).view(original_size)
                else:
                    grad = (H @ grad).view(transposed_size)
                new[f"pre_cond_{j}"], new[f"inv_pre_cond_{j}"] = P, H
            new["momentum_buffer"] = grad  # as Shampoo: kept whatever the momentum
            d = grad if decoupled is None else grad.add(p.detach(), alpha=decoupled)
            new_states.append(new)
            dirs.append(d)
        return new_states, dirs

    # -- M and M^{-1} -------------------------------------------------------------------------
    @staticmethod
    def _factors(st: State, n: int) -> list[Tensor]:
        return [st[f"inv_pre_cond_{j}"] for j in range(n)]

    def solve(self, stage: Stage, states: list[State], v: list[Tensor], hp: dict[str, Any]) -> list[Tensor]:
        """M^{-1} x = x x_1 H_1 ... x_k H_k^T per parameter, x with leading column dims."""
        return [along_axes(x, self._factors(st, p.dim()), x.dim() - p.dim())
                for st, x, p in zip(states, v, stage.params)]

    def apply(self, stage: Stage, states: list[State], v: list[Tensor], hp: dict[str, Any]) -> list[Tensor]:
        """M x with the pseudo-inverses of the H_j (diagnostics: O(d^3) per call)."""
        return [along_axes(x, [torch.linalg.pinv(H) for H in self._factors(st, p.dim())],
                           x.dim() - p.dim())
                for st, x, p in zip(states, v, stage.params)]

    def per_sample_gram(self, stage: Stage, states: list[State], hp: dict[str, Any], a: Tensor,
                        g: Tensor) -> Tensor | None:
        """w_c^T M^{-1} w_d for a Kronecker stage with exact rows: for the weight
        sum_{p,q} (g_cp . H_1 g_dq)(a_p . A(a_q)), A the factors of the input axes applied as
        M^{-1} applies them to the weight (``along_axes``), plus the bias term
        (sum_p g_cp) . H_b^T (sum_q g_dq); None without exact rows."""
        if not (stage.kronecker and stage.derivatives.exact_rows(stage.module)):
            return None
        out = None
        for name, st, p in zip(stage.param_names, states, stage.params):
            H = self._factors(st, p.dim())
            if name == "weight":
                if p[0].numel() != a.shape[-1]:
                    return None
                B, P = a.shape[:2]
                a_in = a.reshape(B, P, *p.shape[1:])
                if p.dim() == 2:  # the input axis is the last one: a x_2 H_2^T
                    aA = a @ H[1]
                else:
                    aA = (along_axes(a_in.unsqueeze(2), [torch.eye(1, dtype=a.dtype, device=a.device),
                                                         *H[1:]], 2)).reshape(a.shape)
                gH = g @ H[0].T  # H_1 g_dq
                term = rows_gram(g, gH, a @ aA.transpose(1, 2))
            else:
                gs = g.sum(2)
                term = gs @ (gs @ H[0]).transpose(1, 2)
            out = term if out is None else out + term
        return out
