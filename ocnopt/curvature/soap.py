"""SOAP: Adam in the eigenbasis of Shampoo's factors (docs/method.md, curvature models).

The arithmetic is that of ``pytorch_optimizer.SOAP`` (same hyper-parameters, names and
defaults), per parameter u of shape (d_1, ..., d_k) (after merging small axes when
``merge_dims``; a 1-D parameter has one factor only with ``precondition_1d``):

* factors GG_j = EMA_{shampoo_beta}(G_(j) G_(j)^T), G_(j) the gradient unfolded along axis j
  (``shampoo_beta`` None: beta2), for every axis with d_j <= ``max_precondition_dim``;
* eigenbases Q_j: ``eigh`` of GG_j at the first step (columns by decreasing eigenvalue), then
  every ``precondition_frequency`` steps one power iteration GG_j Q_j, re-sorted by the estimated
  eigenvalues (v is permuted the same way), and a QR decomposition (in float32, as SOAP);
* rotation Q^T x = x x_1 Q_1 ... x_k Q_k (identity along axes without a factor), Q x its inverse;
* moments m = EMA_{beta1}(g) in the parameter's coordinates, v = EMA_{beta2}((Q^T g)^2) in the
  rotated ones, both updated from SOAP's second step on: the first step only initialises the
  factors and the bases and does not move the parameters.

Curvature model, with t = step - 1 the bias-correction count of SOAP and bc_i = 1 - beta_i^t
(1 without ``correct_bias``)::

    M = Q diag((sqrt(v) + eps) / sqrt(bc2)) Q^T,     M^{-1} x = sqrt(bc2) Q((Q^T x) / (sqrt(v) + eps))

and the direction is M^{-1}(m / bc1) (divided by its root-mean-square + eps with
``normalize_gradient``). M is that of the current state (bases and v after the step's refresh),
the one the next step uses (moments aside); at the first step bc2 = 0: M^{-1} = 0 (no step).
Weight decay is decoupled as SOAP applies it, after the step: u <- (u - lr d)(1 - lr wd), i.e.
the direction d (1 - lr wd) + wd u; it is not part of the objective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from ..stages import Stage
from .base import (
    CurvatureModel,
    StageStatistics,
    State,
    check_nonneg,
    diagonal_weight_gram,
    require,
)

DATA_FORMATS = ("channels_first", "channels_last")


def merge_small_dims(shape: Sequence[int], max_dim: int) -> list[int]:
    """pytorch-optimizer's merge: adjacent axes merged while their product is <= max_dim
    (a shape that merges into one axis gives [1], as SOAP's helper)."""
    merged: list[int] = []
    product = 1
    for dim in shape:
        product *= dim
        if product > max_dim:
            merged.append(product // dim)
            product = dim
    merged.append(product)
    return merged if len(merged) > 1 else [1]


class _Layout:
    """How SOAP reshapes one parameter: merged axes, channels-last permutation, factor axes."""

    def __init__(self, shape: torch.Size, hp: dict[str, Any]):
        self.shape = shape
        self.merge = bool(hp["merge_dims"])
        self.max_dim = int(hp["max_precondition_dim"])
        self.permute = hp["data_format"] == "channels_last" and len(shape) == 4
        if self.merge:
            pshape = (shape[0], shape[3], shape[1], shape[2]) if self.permute else tuple(shape)
            self.merged = merge_small_dims(pshape, self.max_dim)
            require(math.prod(self.merged) == math.prod(shape), "merge_dims", True,
                    f"shapes whose small axes do not all merge into one (pytorch-optimizer's SOAP "
                    f"reshapes {tuple(shape)} into {self.merged} and fails); a parameter of this "
                    "shape needs merge_dims=False")

    def merged_view(self, x: Tensor) -> Tensor:
        if self.permute:
            x = x.permute(0, 3, 1, 2)
        return x.reshape(self.merged)

    def project(self, x: Tensor, Q: list[Tensor | None], backward: bool = False) -> Tensor:
        """SOAP's ``project``: Q^T x (forward) or Q x (backward), x shaped like the parameter."""
        original_shape = x.shape
        permuted_shape = original_shape
        if self.merge:
            if self.permute:
                permuted_shape = x.permute(0, 3, 1, 2).shape
            x = self.merged_view(x)
        for mat in Q:
            if mat is not None:
                x = torch.tensordot(x, mat, dims=[[0], [1 if backward else 0]])
            else:
                x = x.permute([*range(1, x.dim()), 0])
        if self.merge:
            x = x.reshape(permuted_shape).permute(0, 2, 3, 1) if self.permute else x.reshape(original_shape)
        return x

    def project_columns(self, x: Tensor, Q: list[Tensor | None], backward: bool = False) -> Tensor:
        """``project`` of each column of x (..., *shape)."""
        lead = x.shape[: x.dim() - len(self.shape)]
        if not lead:
            return self.project(x, Q, backward)
        flat = x.reshape(-1, *self.shape)
        out = torch.vmap(lambda y: self.project(y, Q, backward))(flat)
        return out.reshape(x.shape)


def init_factors(g: Tensor, layout: _Layout, hp: dict[str, Any]) -> list[Tensor | None]:
    """Zero factors for the axes SOAP preconditions (None: identity along that axis)."""
    max_dim = layout.max_dim
    if g.dim() == 1:
        if not hp["precondition_1d"] or g.shape[0] > max_dim:
            return [None]
        return [g.new_zeros(g.shape[0], g.shape[0])]
    shape = layout.merged if layout.merge else list(g.shape)
    return [None if d > max_dim else g.new_zeros(d, d) for d in shape]


def accumulate(GG: list[Tensor | None], g: Tensor, layout: _Layout, beta: float,
               hp: dict[str, Any]) -> list[Tensor | None]:
    """GG_j <- lerp(GG_j, G_(j) G_(j)^T, 1 - beta) (new tensors; SOAP's order of operations)."""
    out = list(GG)
    if g.dim() == 1:
        if hp["precondition_1d"] and g.shape[0] <= layout.max_dim:
            assert GG[0] is not None
            out[0] = GG[0].lerp((g.unsqueeze(1) @ g.unsqueeze(0)).to(GG[0].dtype), 1.0 - beta)
        return out
    if layout.merge:
        g = layout.merged_view(g)
    for idx, dim in enumerate(g.shape):
        if dim <= layout.max_dim:
            factor = GG[idx]
            assert factor is not None
            others = [*chain(range(idx), range(idx + 1, g.dim()))]
            outer = torch.tensordot(g, g, dims=[others, others])
            out[idx] = factor.lerp(outer.to(factor.dtype), 1.0 - beta)
    return out


def eigenbases(GG: list[Tensor | None]) -> list[Tensor | None]:
    """Eigenvectors of each factor (+ 1e-30 I), columns by decreasing eigenvalue; NaN for a
    factor that is not finite (the optimizer then skips the step as non-finite)."""
    out: list[Tensor | None] = []
    for m in GG:
        if m is None:
            out.append(None)
            continue
        if not bool(torch.isfinite(m).all()):
            out.append(torch.full_like(m, float("nan")))
            continue
        try:
            _, q = torch.linalg.eigh(m + 1e-30 * torch.eye(m.shape[0], device=m.device, dtype=m.dtype))
        except RuntimeError:
            _, q = torch.linalg.eigh(m.to(torch.float64) + 1e-30 * torch.eye(
                m.shape[0], device=m.device, dtype=torch.float64))
            q = q.to(m.dtype)
        out.append(torch.flip(q, dims=[1]))
    return out


def refresh_bases(GG: list[Tensor | None], Q: list[Tensor | None], exp_avg_sq: Tensor,
                  layout: _Layout) -> tuple[list[Tensor | None], Tensor]:
    """One power iteration and QR per factor, v re-sorted along with the basis (SOAP's
    ``get_orthogonal_matrix_qr``)."""
    original_shape = exp_avg_sq.shape
    permuted_shape = exp_avg_sq.permute(0, 3, 1, 2).shape if layout.permute else original_shape
    v = layout.merged_view(exp_avg_sq) if layout.merge else exp_avg_sq
    out: list[Tensor | None] = []
    for ind, (m, o) in enumerate(zip(GG, Q)):
        if m is None or o is None:
            out.append(None)
            continue
        product = m @ o
        if not bool(torch.isfinite(product).all()):  # skipped as non-finite by the optimizer
            out.append(torch.full_like(o, float("nan")))
            continue
        est_eig = (o * product).sum(dim=0)
        order = torch.argsort(est_eig, descending=True)
        v = v.index_select(ind, order)
        power_iter = product.index_select(1, order)
        q, _ = torch.linalg.qr(power_iter.to(torch.float32))
        out.append(q.to(power_iter.dtype))
    if layout.merge:
        v = v.reshape(permuted_shape).permute(0, 2, 3, 1) if layout.permute else v.reshape(original_shape)
    return out, v


def rotate_rows(a: Tensor, Q: list[Tensor | None], in_shape: Sequence[int]) -> Tensor:
    """Rows a (..., d_in) of a weight's input axes (in_shape, flattened row-major) rotated
    along each axis by its basis: a x_j Q_j."""
    lead = a.shape[:-1]
    x = a.reshape(*lead, *in_shape)
    L = len(lead)
    for j, mat in enumerate(Q):
        if mat is not None:
            x = (x.movedim(L + j, -1) @ mat).movedim(-1, L + j)
    return x.reshape(a.shape)


class SOAP(CurvatureModel):
    name = "soap"
    defaults = {"betas": (0.95, 0.95), "shampoo_beta": None, "weight_decay": 1e-2,
                "precondition_frequency": 10, "max_precondition_dim": 10000, "merge_dims": False,
                "precondition_1d": False, "correct_bias": True, "normalize_gradient": False,
                "data_format": "channels_first", "eps": 1e-8}

    def check(self, hp: dict[str, Any]) -> None:
        betas = hp["betas"]
        require(isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas),
                "betas", betas, "a pair (beta1, beta2) with each in [0, 1)")
        sb = hp["shampoo_beta"]
        require(sb is None or (isinstance(sb, (int, float)) and not isinstance(sb, bool)
                               and 0.0 <= sb <= 1.0),
                "shampoo_beta", sb, "None (beta2) or a number in [0, 1]")
        for key in ("precondition_frequency", "max_precondition_dim"):
            v = hp[key]
            require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, key, v, "an integer >= 1")
        for key in ("merge_dims", "precondition_1d", "correct_bias", "normalize_gradient"):
            require(isinstance(hp[key], bool), key, hp[key], "True or False")
        require(hp["data_format"] in DATA_FORMATS, "data_format", hp["data_format"],
                f"one of {DATA_FORMATS}")
        check_nonneg(hp, "eps")

    def coupled_weight_decay(self, hp: dict[str, Any]) -> bool:
        return False  # decoupled, after the step (see the module docstring)

    @staticmethod
    def _t(state: State) -> float:
        """SOAP's bias-correction count: steps taken minus the initialising one."""
        return float(state["step"]) - 1.0

    def _scale(self, state: State, hp: dict[str, Any]) -> tuple[float, float]:
        """(sqrt(bc2), bc1) at the state's step (1, 1 without ``correct_bias``)."""
        if not hp["correct_bias"]:
            return 1.0, 1.0
        beta1, beta2 = hp["betas"]
        t = self._t(state)
        return math.sqrt(1.0 - math.pow(beta2, t)), 1.0 - math.pow(beta1, t)

    def update(self, stage: Stage, states: list[State], grads: list[Tensor], params: Sequence[Tensor],
               stats: StageStatistics | None, hp: dict[str, Any], step: int
               ) -> tuple[list[State], list[Tensor]]:
        beta1, beta2 = hp["betas"]
        sb = hp["shampoo_beta"] if hp["shampoo_beta"] is not None else beta2
        eps, wd, lr = hp["eps"], hp["weight_decay"], hp["lr"]
        new_states, dirs = [], []
        for st, g, p in zip(states, grads, params):
            layout = _Layout(g.shape, hp)
            if "Q" not in st:  # SOAP's first step: factors and bases only
                GG = accumulate(init_factors(g, layout, hp), g, layout, sb, hp)
                new_states.append({"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(g),
                                   "exp_avg_sq": torch.zeros_like(g), "GG": GG, "Q": eigenbases(GG)})
                # no step; a non-finite gradient must still skip it (its factors would stay)
                dirs.append(torch.zeros_like(g) if bool(torch.isfinite(g).all())
                            else torch.full_like(g, float("nan")))
                continue
            new: State = {"step": torch.tensor(float(st["step"]) + 1.0)}
            Q = st["Q"]
            g_rot = layout.project(g, Q)
            exp_avg = st["exp_avg"].lerp(g, 1.0 - beta1)
            exp_avg_sq = st["exp_avg_sq"].lerp(g_rot.square(), 1.0 - beta2)
            de_nom = exp_avg_sq.sqrt().add_(eps)
            d = layout.project(layout.project(exp_avg, Q) / de_nom, Q, backward=True)
            if hp["normalize_gradient"]:
                d = d.div(torch.mean(d.square()).sqrt_().add_(eps))
            bc2_sqrt, bc1 = self._scale(new, hp)
            d = d.mul(bc2_sqrt / bc1)
            if wd != 0:
                d = d.mul_(1.0 - lr * wd).add_(p.detach(), alpha=wd)
            GG = accumulate(st["GG"], g, layout, sb, hp)
            t = int(self._t(new))
            if t > 0 and t % hp["precondition_frequency"] == 0:
                Q, exp_avg_sq = refresh_bases(GG, Q, exp_avg_sq, layout)
            new.update(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, GG=GG, Q=Q)
            new_states.append(new)
            dirs.append(d)
        return new_states, dirs

    # -- M and M^{-1} -------------------------------------------------------------------------
    def _scaled(self, stage: Stage, states: list[State], v: list[Tensor], hp: dict[str, Any],
                inverse: bool) -> list[Tensor]:
        out = []
        for st, x, p in zip(states, v, stage.params):
            layout = _Layout(p.shape, hp)
            bc2_sqrt, _ = self._scale(st, hp)
            denom = st["exp_avg_sq"].sqrt().add(hp["eps"])
            if inverse:
                y = layout.project_columns(x, st["Q"]) / denom * bc2_sqrt
                out.append(layout.project_columns(y, st["Q"], backward=True))
            else:  # the bases are orthogonal to float32 only (QR in float32): invert them
                P = [None if q is None else torch.linalg.inv(q).T for q in st["Q"]]
                y = layout.project_columns(x, P) * denom / bc2_sqrt
                out.append(layout.project_columns(y, P, backward=True))
        return out

    def solve(self, stage: Stage, states: list[State], v: list[Tensor], hp: dict[str, Any]) -> list[Tensor]:
        """M^{-1} v = sqrt(bc2) Q((Q^T v) / (sqrt(v) + eps)) per parameter (0 at the first step)."""
        return self._scaled(stage, states, v, hp, inverse=True)

    def apply(self, stage: Stage, states: list[State], v: list[Tensor], hp: dict[str, Any]) -> list[Tensor]:
        """M v = Q^{-T}((sqrt(v) + eps) (Q^{-1} v)) / sqrt(bc2), the exact inverse of ``solve``
        (Q^{-1} = Q^T up to the float32 QR of the refreshes; diagnostics: O(d^3) per call;
        infinite at the first step)."""
        return self._scaled(stage, states, v, hp, inverse=False)

    def per_sample_gram(self, stage: Stage, states: list[State], hp: dict[str, Any], a: Tensor,
                        g: Tensor) -> Tensor | None:
        """w_c^T M^{-1} w_d in closed form for a Kronecker stage with exact rows and unmerged
        axes: the diagonal form of ``diagonal_weight_gram`` on the rows rotated into the
        eigenbasis (g x_1 Q_1, a x_j Q_j over the weight's input axes), plus the bias term
        (rotated by its own basis when ``precondition_1d``). None otherwise."""
        if hp["merge_dims"] or not (stage.kronecker and stage.derivatives.exact_rows(stage.module)):
            return None
        out = None
        for name, st, p in zip(stage.param_names, states, stage.params):
            bc2_sqrt, _ = self._scale(st, hp)
            D = st["exp_avg_sq"].sqrt().add(hp["eps"]) / bc2_sqrt
            Q = st["Q"]
            if name == "weight":
                if p[0].numel() != a.shape[-1]:
                    return None
                gr = g if Q[0] is None else g @ Q[0]
                ar = rotate_rows(a, Q[1:], p.shape[1:])
                term = diagonal_weight_gram(ar, gr, D)
            else:
                gs = g.sum(2)
                gs = gs if Q[0] is None else gs @ Q[0]
                term = (gs / D) @ gs.transpose(1, 2)
            out = term if out is None else out + term
        return out
