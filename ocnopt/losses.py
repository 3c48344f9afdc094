"""Terminal costs phi(x_T, y) and their value derivatives (docs/method.md section 1).

Per-sample quantities are NOT divided by the batch size: ``value_gradient`` returns
v_T^(i) = grad phi(x_T^(i), y^(i)), which is B times what autograd returns for the mean loss.
Terminal factors for the Kronecker statistics and the low-rank value Hessian:

- ``hessian_sqrt``: columns S^(i) (r of them) with S S^T = d^2 phi / dx_T^2 ("type-2"/"exact");
- ``sample_gradient``: the gradient of phi at a label sampled from the model ("mc").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Loss:
    """A per-sample loss phi with the derivatives the engine needs. Subclass for closed forms."""

    name = "loss"

    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def mean(self, output: Tensor, target: Tensor) -> Tensor:
        """J = mean_i phi^(i), rounded as ``value_gradient``'s mean loss."""
        return self.per_sample(output, target).mean()

    def check(self, output: Tensor, target: Tensor) -> None:
        """Raise ``ValueError`` when ``target`` does not fit ``output``."""

    def value_gradient(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(mean loss J_T, per-sample gradient v_T of shape output.shape)."""
        with torch.enable_grad():
            out = output.detach().requires_grad_(True)
            phi = self.per_sample(out, target)
            (grad,) = torch.autograd.grad(phi.sum(), out)
        return phi.detach().mean(), grad

    def hessian_sqrt(self, output: Tensor, target: Tensor) -> Tensor:
        """S of shape (B, r, *out) with sum_c S[:, c] S[:, c]^T = d^2 phi / dx^2 (per sample)."""
        B = output.shape[0]
        flat = output.detach().reshape(B, -1)

        def phi_one(o: Tensor, y: Tensor) -> Tensor:
            return self.per_sample(o.reshape(1, *output.shape[1:]), y.unsqueeze(0)).sum()

        H = torch.func.vmap(torch.func.hessian(phi_one))(flat, target)
        evals, evecs = torch.linalg.eigh(H)
        S = evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)  # (B, n, r)
        return S.transpose(1, 2).reshape(B, -1, *output.shape[1:])

    def hessian(self, output: Tensor, target: Tensor) -> Tensor:
        """d^2 phi / dx_T^2 per sample, flattened: (B, n, n) with n = output[0].numel()."""
        S = self.hessian_sqrt(output, target).flatten(2)  # (B, r, n)
        return S.transpose(1, 2) @ S

    def sample_gradient(self, output: Tensor, generator: torch.Generator | None) -> Tensor:
        raise NotImplementedError(
            f"fisher_type='mc' needs label sampling, which the loss {self.name!r} does not "
            "define; use fisher_type='empirical' or 'type-2'"
        )


class CrossEntropy(Loss):
    """phi(x, y) = -log softmax(x)_y for logits (B, C) and class indices (B,) or class
    probabilities (B, C). Mean over the batch equals ``torch.nn.CrossEntropyLoss()``."""

    name = "cross_entropy"

    def check(self, output: Tensor, target: Tensor) -> None:
        if output.dim() != 2:
            raise ValueError(
                f"loss 'cross_entropy' needs model outputs of shape (B, classes), got "
                f"{tuple(output.shape)}"
            )
        B, C = output.shape
        if target.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            if target.shape != (B,):
                raise ValueError(
                    f"targets must have shape ({B},) of class indices (or ({B}, {C}) of "
                    f"probabilities) for outputs {tuple(output.shape)}, got {tuple(target.shape)}"
                )
            if B and target.device.type != "cpu":  # on the CPU: ``value_gradient``
                self.check_range(C, target)
        elif target.shape != output.shape:
            raise ValueError(
                f"targets must be class indices of shape ({B},) or probabilities of shape "
                f"({B}, {C}), got {tuple(target.shape)} of dtype {target.dtype}"
            )

    @staticmethod
    def check_range(C: int, target: Tensor) -> None:
        """Class indices in [0, C), else ``ValueError`` with the range found."""
        lo, hi = (int(v) for v in torch.aminmax(target))  # one reduction
        if lo < 0 or hi >= C:
            raise ValueError(f"targets must be class indices in [0, {C}), got values in "
                             f"[{lo}, {hi}]")

    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target, reduction="none")

    def mean(self, output: Tensor, target: Tensor) -> Tensor:
        if target.is_floating_point():
            return super().mean(output, target)
        return F.cross_entropy(output, target)  # log_softmax and nll_loss: value_gradient's

    def value_gradient(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        logp = F.log_softmax(output.detach(), dim=1)
        if target.is_floating_point():
            loss = -(target * logp).sum(1)
            grad = logp.exp() * target.sum(1, keepdim=True) - target
        else:
            if target.dtype != torch.int64:
                target = target.long()
            try:  # (CPU: an index out of range raises here, checked only then)
                mean = F.nll_loss(logp, target)  # -mean_i logp_(i, y_i), as torch's loss
            except (RuntimeError, IndexError):
                self.check_range(logp.shape[1], target)
                raise
            grad = logp.exp()
            # p - e_y: adding -1 rounds as subtracting 1
            grad.scatter_add_(1, target.unsqueeze(1), self._minus_one(grad))
            return mean, grad
        return loss.mean(), grad

    def _minus_one(self, like: Tensor) -> Tensor:
        """A (B, 1) tensor of -1 like ``like`` (kept between steps of the same shape)."""
        key = (like.shape[0], like.dtype, like.device)
        cached = getattr(self, "_minus_one_cache", None)
        if cached is None or cached[0] != key:
            cached = self._minus_one_cache = (
                key, torch.full((like.shape[0], 1), -1.0, dtype=like.dtype, device=like.device))
        return cached[1]

    def hessian_sqrt(self, output: Tensor, target: Tensor) -> Tensor:
        # columns sqrt(p_c) (e_c - p): sum_c p_c (e_c - p)(e_c - p)^T = diag(p) - p p^T
        p = F.softmax(output.detach(), dim=1)
        eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        return p.sqrt().unsqueeze(2) * (eye.unsqueeze(0) - p.unsqueeze(1))

    def sample_gradient(self, output: Tensor, generator: torch.Generator | None) -> Tensor:
        p = F.softmax(output.detach(), dim=1)
        at = generator.device if generator is not None else p.device  # draws on its device
        y = torch.multinomial(p.to(at), 1, generator=generator).squeeze(1).to(p.device)
        return p - F.one_hot(y, p.shape[1]).to(p.dtype)


class MeanSquaredError(Loss):
    """phi(x, y) = mean_k (x_k - y_k)^2 over the K entries of one sample; the batch mean equals
    ``torch.nn.MSELoss()`` (mean over all B*K entries)."""

    name = "mse"

    def check(self, output: Tensor, target: Tensor) -> None:
        if target.shape != output.shape:
            raise ValueError(
                f"targets must have the shape of the model outputs {tuple(output.shape)} for "
                f"loss 'mse', got {tuple(target.shape)}"
            )

    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        return (output - target).pow(2).flatten(1).mean(1)

    def value_gradient(self, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        K = output[0].numel()
        diff = output.detach() - target
        return diff.pow(2).flatten(1).mean(1).mean(), diff * (2.0 / K)

    def hessian_sqrt(self, output: Tensor, target: Tensor) -> Tensor:
        B, K = output.shape[0], output[0].numel()
        eye = torch.eye(K, dtype=output.dtype, device=output.device) * math.sqrt(2.0 / K)
        return eye.expand(B, K, K).reshape(B, K, *output.shape[1:]).clone()

    def sample_gradient(self, output: Tensor, generator: torch.Generator | None) -> Tensor:
        K = output[0].numel()
        at = generator.device if generator is not None else output.device
        eps = torch.randn(output.shape, generator=generator, dtype=output.dtype, device=at)
        return eps.to(output.device) * math.sqrt(2.0 / K)


class CallableLoss(Loss):
    """A user's per-sample loss ``fn(output, target) -> (B,)``; derivatives by autograd."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]):
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        phi = self.fn(output, target)
        if not isinstance(phi, Tensor) or phi.shape != (output.shape[0],):
            got = tuple(phi.shape) if isinstance(phi, Tensor) else type(phi).__name__
            raise ValueError(
                f"loss callable {self.name!r} must return per-sample losses of shape "
                f"({output.shape[0]},), got {got}; use reduction='none'"
            )
        return phi


LOSSES: dict[str, type[Loss]] = {"cross_entropy": CrossEntropy, "mse": MeanSquaredError}


def make_loss(loss: str | Loss | Callable[[Tensor, Tensor], Tensor] | nn.Module) -> Loss:
    """Resolve the ``loss`` argument of ``OCNOpt``: a name, a ``Loss``, a torch loss module
    with mean reduction, or a per-sample callable."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(
                f"loss must be one of {sorted(LOSSES)} or a per-sample callable, got {loss!r}"
            )
        return LOSSES[loss]()
    if isinstance(loss, (nn.CrossEntropyLoss, nn.MSELoss)):
        if loss.reduction != "mean" or float(getattr(loss, "label_smoothing", 0.0)) or (
            getattr(loss, "weight", None) is not None
        ):
            raise ValueError(
                f"loss {loss} is accepted only with reduction='mean', no class weights and no "
                "label smoothing; pass a per-sample callable for anything else"
            )
        return CrossEntropy() if isinstance(loss, nn.CrossEntropyLoss) else MeanSquaredError()
    if callable(loss):
        return CallableLoss(loss)
    raise TypeError(
        f"loss must be a name in {sorted(LOSSES)}, a torch loss module or a per-sample callable, "
        f"got {type(loss).__name__}"
    )
