"""``OCNOpt``: the Bellman-expansion optimizer as a ``torch.optim.Optimizer``.

A thin class over the engine (``engine.py``), a backend (``ocnopt.backends``) and a curvature
model (``curvature/``): it owns ``param_groups`` (every hyper-parameter lives there, so LR
schedulers work) and ``state`` (one dict per parameter, plus the key ``"ocnopt"`` for the step
counter, the skip counter and the sampling generator), so ``state_dict`` round-trips it all.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .backends import make_backend
from .curvature import CURVATURES, CurvatureModel
from .curvature.base import check_nonneg
from .engine import BellmanEngine, Controls, StepConfig, StepResult
from .graph import build_graph
from .losses import Loss, make_loss
from .stages import Stage

GAMES = ("cooperative", "nash")


class NonFiniteStepWarning(RuntimeWarning):
    """A step produced a non-finite loss or update and was skipped (warned once)."""


_COMMON = {"lr", "weight_decay"}
_STRUCTURAL = ("order", "backend", "curvature", "loss", "feedback", "value_correction",
               "gauss_newton", "track_loss_after", "seed", "game", "leaf_modules")


class OCNOpt(torch.optim.Optimizer):
    """Optimal-control neural optimizer.

    Args:
        model: the network: any ``nn.Module`` that ``torch.fx`` can trace (residual and
            multi-branch networks; every supported layer call is a step, every other tensor
            operation a control-free step), an ``nn.Sequential`` chain (nested Sequentials
            flattened), or a single layer. docs/method.md section 7.
        loss: ``"cross_entropy"``, ``"mse"``, a torch loss module with mean reduction, or a
            per-sample callable ``fn(output, target) -> (B,)``. The objective is the batch mean.
        lr: learning rate (scales open-loop and feedback parts); default per curvature model
            (sgd 1e-3, rmsprop 1e-2, adam/adamw 1e-3, kfac/ekfac 3e-2, full 1: ``DEFAULT_LR``).
        curvature: the model M of Q_uu: ``"sgd"``, ``"rmsprop"``, ``"adam"``, ``"adamw"``,
            ``"kfac"``, ``"ekfac"``, ``"shampoo"``, ``"soap"`` (pytorch-optimizer's Shampoo and
            SOAP), ``"full"`` (E[Q_uu] from the exact backend).
        backend: who computes the derivatives (every backend does orders 1 and 2):
            ``"autograd"`` (exact, full per-sample matrices: small networks, "vanilla DDP"),
            ``"lowrank"`` (Gauss-Newton factor V_xx = Z Z^T, scalable), ``"backpack"``
            (Kronecker factors from BackPACK, rank-1 value-gradient feedback), or a
            ``Backend`` instance.
        order: 1 (backpropagation: the first-order truncation of the Bellman equation) or 2
            (DDP: V_xx propagated, affine feedback policies du = k + K dx applied in the update
            pass).
        game: order 2 on graphs: ``"cooperative"`` (default; DDP on the augmented chain: a
            player's feedback sees every carried state) or ``"nash"`` (a player's feedback
            ignores the states that depend on a simultaneous player's output). On a chain both
            are DDPNOpt. docs/method.md section 7.
        leaf_modules: module classes to run as one step each (not traced into), e.g. a block
            whose forward has data-dependent control flow.
        feedback: order 2: apply the feedback part K dx in the update pass.
        value_correction: order 2: subtract the policy terms from V_x and V_xx (SPEC 4).
        gauss_newton: drop the contraction terms V'_x . f_ab (Gauss-Newton) or keep them.
        psd_clip: clip V_xx to the PSD cone after each stage (eigenvalues < 0 set to 0).
        mu: value regularisation V_xx + mu I (a hyper-parameter in ``param_groups``).
        trust: order 2: trust bound of the second-order corrections (a hyper-parameter in
            ``param_groups``, default 0.5): in the update pass the feedback part K dx of a stage
            is scaled down to at most ``trust`` times the norm of its open-loop step k, and the
            value correction of each sample's V_x to at most ``trust`` times the norm of its
            Q_x. ``None`` turns the bound off (the plain recursion of SPEC 3-4).
        memory_budget: bytes the exact backend may use per stage for full matrices.
        backend_options: keyword arguments of the backend given by name, e.g.
            ``{"terminal": "exact"}`` for ``backend="lowrank"`` (terminal factor "empirical",
            "exact" or "mc", and ``mc_samples``).
        weight_decay: l_t(u) = wd/2 |u|^2 in the objective (decoupled for ``adamw``); default 0
            (1e-2 for ``adamw``, as torch).
        track_loss_after: also compute the loss after the step with an extra forward pass
            (``last_step.loss_after``); at order 1 this costs one forward pass.
        seed: seed of the generator used to sample labels (``fisher_type="mc"``).
        **hyperparameters: the curvature model's hyper-parameters, with torch's names:
            sgd: momentum, dampening, nesterov; rmsprop: alpha, eps, centered, momentum;
            adam/adamw: betas, eps, amsgrad; kfac/ekfac: damping (number or callable of the
            step), stat_every, inv_every, stat_decay, momentum, fisher_type
            ("empirical", "type-2", "mc"); full: damping, eig_floor; soap: betas,
            shampoo_beta, precondition_frequency, max_precondition_dim, merge_dims,
            precondition_1d, correct_bias, normalize_gradient, data_format, eps, weight_decay
            (decoupled, as SOAP); shampoo: momentum, weight_decouple, fixed_decay,
            preconditioning_compute_steps, matrix_eps.
    """

    DEFAULT_LR = {"sgd": 1e-3, "rmsprop": 1e-2, "adam": 1e-3, "adamw": 1e-3,
                  "kfac": 3e-2, "ekfac": 3e-2, "full": 1.0, "soap": 3e-3, "shampoo": 1e-3}

    def __init__(
        self,
        model: nn.Module,
        loss: str | Loss | nn.Module | Callable[[Tensor, Tensor], Tensor] = "cross_entropy",
        lr: float | None = None,
        curvature: str = "adam",
        backend: str = "autograd",
        order: int = 1,
        weight_decay: float | None = None,
        feedback: bool = True,
        value_correction: bool = True,
        gauss_newton: bool = True,
        psd_clip: bool = True,
        mu: float = 0.0,
        trust: float | None = 0.5,
        memory_budget: int | None = None,
        backend_options: dict[str, Any] | None = None,
        track_loss_after: bool = False,
        seed: int = 0,
        game: str = "cooperative",
        leaf_modules: tuple[type[nn.Module], ...] = (),
        **hyperparameters: Any,
    ):
        if not isinstance(curvature, str) or curvature not in CURVATURES:
            raise ValueError(f"invalid curvature={curvature!r}: accepted {sorted(CURVATURES)}")
        if order not in (1, 2) or isinstance(order, bool):
            raise ValueError(f"invalid order={order!r}: accepted 1 (backpropagation) or 2 "
                             "(DDP with feedback)")
        if game not in GAMES:
            raise ValueError(f"invalid game={game!r}: accepted {GAMES}")
        for name, flag in (("feedback", feedback), ("value_correction", value_correction),
                           ("gauss_newton", gauss_newton), ("psd_clip", psd_clip),
                           ("track_loss_after", track_loss_after)):
            if not isinstance(flag, bool):
                raise TypeError(f"invalid {name}={flag!r}: accepted True or False")
        self.curvature_name = curvature
        self.model_: CurvatureModel = CURVATURES[curvature]()
        options = dict(backend_options or {})
        if memory_budget is not None:
            options["memory_budget"] = memory_budget
        if options and not isinstance(backend, str):
            raise ValueError("memory_budget / backend_options apply to a backend given by name; "
                             "configure the backend instance instead")
        try:
            self.backend = make_backend(backend, **options)
        except TypeError as err:
            raise TypeError(f"invalid backend option for backend={backend!r}: {err}") from err
        self.backend.check_options(gauss_newton=gauss_newton, mu=mu,
                                   needs_full=self.model_.needs_full)
        if (order == 2 or self.model_.needs_full) and not self.backend.second_order_capable:
            raise ValueError(f"order={order} with curvature={curvature!r} needs a backend with "
                             f"second-order terms; backend={backend!r} has none (use 'autograd')")
        self._fisher_given = "fisher_type" in hyperparameters
        if order == 2 and self._fisher_given and isinstance(backend, str):
            self.backend.follow_fisher(hyperparameters["fisher_type"], given=options)
        self.feedback = feedback
        self.value_correction = value_correction
        self.gauss_newton = gauss_newton
        self.psd_clip = psd_clip
        self.loss_fn = make_loss(loss)
        self.order = order
        self.track_loss_after = bool(track_loss_after)
        self.game = game
        self.graph = build_graph(model, leaf_modules=leaf_modules)
        self.stages: list[Stage] = self.graph.stages
        if order == 2 or self.model_.needs_full:
            _refuse_tied(self.stages, order, curvature)
        self.backend.prepare(self.graph, self.loss_fn)
        self.engine = BellmanEngine(self.graph, self.loss_fn, self.backend)

        accepted = {"weight_decay": 0.0, "mu": 0.0, "trust": 0.5, **self.model_.defaults}
        unknown = sorted(set(hyperparameters) - set(accepted))
        if unknown:
            raise TypeError(
                f"unknown hyper-parameter(s) {unknown} for curvature {curvature!r}; accepted: "
                f"lr, {', '.join(sorted(accepted))} (and the options {', '.join(_STRUCTURAL)})"
            )
        if lr is None:
            lr = self.DEFAULT_LR[curvature]
        hp = {**accepted, **hyperparameters, "lr": lr, "mu": mu, "trust": trust}
        if weight_decay is not None:
            hp["weight_decay"] = weight_decay
        self._check(hp)
        params = [p for st in self.stages for p, own in zip(st.params, st.owned) if own]
        super().__init__(params, hp)
        # a CPU generator whatever the model's device: the same labels on every device, and
        # checkpoints that load on any device (a CUDA generator's state does not fit a CPU one)
        self.generator = torch.Generator()
        self.generator.manual_seed(int(seed))
        self._meta_set({"step": 0, "skipped_steps": 0})
        self._warned_nonfinite = False
        self.last_step: StepResult | None = None

    # -- validation ---------------------------------------------------------------------------
    def _check(self, hp: dict[str, Any]) -> None:
        lr = hp["lr"]
        if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr)
                and lr >= 0):
            raise ValueError(f"invalid lr={lr!r}: accepted a finite number >= 0")
        check_nonneg(hp, "weight_decay", "mu")
        trust = hp.get("trust")
        if trust is not None and not (isinstance(trust, (int, float)) and not isinstance(trust, bool)
                                      and math.isfinite(trust) and trust > 0):
            raise ValueError(f"invalid trust={trust!r}: accepted a finite number > 0 or None "
                             "(no bound on the second-order corrections)")
        self.model_.check(hp)
        if "fisher_type" in hp:  # honoured by the backend or refused, never ignored
            self.backend.check_fisher(hp["fisher_type"], order=self.order,
                                      explicit=self._fisher_given)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "param_groups", None):
            raise ValueError("OCNOpt takes its parameters from the model's stages; "
                             "add_param_group is not supported")
        super().add_param_group(param_group)

    # -- state --------------------------------------------------------------------------------
    @property
    def _meta(self) -> dict[str, Any]:
        """The optimizer's own entry of ``state`` (torch packs non-parameter keys as they are)."""
        return self.state["ocnopt"]  # type: ignore[index]

    def _meta_set(self, meta: dict[str, Any]) -> None:
        self.state["ocnopt"] = meta  # type: ignore[index]

    @property
    def step_count(self) -> int:
        """Completed (not skipped) steps."""
        return int(self._meta["step"])

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because the loss or the update was not finite."""
        return int(self._meta["skipped_steps"])

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        # a snapshot: later steps must not change a checkpoint kept in memory
        sd["state"]["ocnopt"] = {**self._meta, "generator": self.generator.get_state(),
                                 "curvature": self.curvature_name}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        meta = state_dict.get("state", {}).get("ocnopt")
        if meta is None:
            raise ValueError("state_dict has no 'ocnopt' entry: it was not saved by OCNOpt")
        if meta.get("curvature", self.curvature_name) != self.curvature_name:
            raise ValueError(f"state_dict was saved with curvature={meta['curvature']!r}, this "
                             f"optimizer uses curvature={self.curvature_name!r}")
        super().load_state_dict(state_dict)
        meta = dict(self._meta)
        self._meta_set(meta)
        if "generator" in meta:
            self.generator.set_state(meta["generator"])

    # -- the step -----------------------------------------------------------------------------
    def step(self, inputs: Tensor | None = None, targets: Tensor | None = None  # type: ignore[override]
             ) -> Tensor:
        """One Bellman step on the batch (inputs, targets); returns the loss before the step.

        ``last_step`` holds the loss after the step (when computed), whether the step was
        skipped as non-finite, the predicted change (second-order pass) and per-player
        diagnostics (norms of the open-loop step k and of the feedback part K dX, the trust
        bound's factor and cut share).
        """
        if inputs is None or callable(inputs):
            raise TypeError(
                "OCNOpt.step(inputs, targets) takes the batch, not a closure: it runs the forward "
                "pass, the backward value recursion and the update itself (order 2 needs the "
                "batch again for the update pass). Replace `loss.backward(); opt.step()` by "
                "`loss = opt.step(inputs, targets)` (the loss before the step is returned)")
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise TypeError(f"step(inputs, targets) takes tensors, got "
                            f"{type(inputs).__name__} and {type(targets).__name__}")
        if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs and targets must share the batch dimension, got shapes "
                             f"{tuple(inputs.shape)} and {tuple(targets.shape)}")
        hp = self.param_groups[0]
        self._check(hp)
        meta = self._meta
        model = self.model_
        config = StepConfig(
            order=self.order, lr=float(hp["lr"]),
            weight_decay=float(hp["weight_decay"]) if model.coupled_weight_decay(hp) else 0.0,
            feedback=self.feedback, value_correction=self.value_correction,
            gauss_newton=self.gauss_newton, mu=float(hp.get("mu", 0.0)), clip=self.psd_clip,
            trust=hp.get("trust"), game=self.game, fisher_type=hp.get("fisher_type"),
            track_loss_after=self.track_loss_after)
        self._generator_state = self.generator.get_state()
        outcome = self.engine.step(inputs, targets, config, _OptimizerControls(self, hp))
        if outcome.skipped is not None:
            return self._skip(outcome.loss, outcome.skipped)
        for params, states in outcome.new_states.values():
            for p, s in zip(params, states):
                self.state[p] = s
        meta["step"] = int(meta["step"]) + 1
        self.last_step = outcome.result
        return outcome.loss

    def _backup_params(self) -> list[Tensor]:
        """A copy of the parameters before the update pass (restored if it ends non-finite),
        in buffers kept between steps: no allocation per step."""
        params = self.param_groups[0]["params"]
        buf = getattr(self, "_backup", None)
        if buf is None or any(b.shape != p.shape or b.dtype != p.dtype or b.device != p.device
                              for b, p in zip(buf, params)):
            buf = self._backup = [torch.empty_like(p, memory_format=torch.preserve_format)
                                  for p in params]
        with torch.no_grad():
            for b, p in zip(buf, params):
                b.copy_(p)
        return buf

    def _skip(self, loss: Tensor, what: str) -> Tensor:
        self.generator.set_state(self._generator_state)  # a skipped step draws no labels
        self._meta["skipped_steps"] += 1
        if not self._warned_nonfinite:
            warnings.warn(
                f"OCNOpt step skipped: the {what} is not finite (loss={float(loss)}); parameters "
                "and optimizer state are unchanged. Further skips are counted in "
                "optimizer.skipped_steps without warning.",
                NonFiniteStepWarning, stacklevel=3)
            self._warned_nonfinite = True
        self.last_step = StepResult(loss=loss, skipped=True)
        return loss


class _OptimizerControls(Controls):
    """The optimizer's state as the engine reads it for one step."""

    def __init__(self, opt: OCNOpt, hp: dict[str, Any]):
        self.opt, self.model, self.hp = opt, opt.model_, hp
        self.step = int(opt._meta["step"])
        self.generator = opt.generator

    def states(self, control: Stage) -> list[dict[str, Any]]:
        return [self.opt.state[p] for p in control.params]

    def backup(self) -> list[Tensor]:
        return self.opt._backup_params()

    def restore(self, backup: list[Tensor]) -> None:
        with torch.no_grad():
            for p, b in zip(self.opt.param_groups[0]["params"], backup):
                p.copy_(b)


def _refuse_tied(stages: list[Stage], order: int, curvature: str) -> None:
    """Order 2 (and curvature "full") with a parameter used by several steps: refused."""
    uses: dict[int, list[Stage]] = {}
    names: dict[int, str] = {}
    for st in stages:
        for n, p in zip(st.param_names, st.params):
            uses.setdefault(id(p), []).append(st)
            names.setdefault(id(p), f"{st.name}.{n}")
    for pid, users in uses.items():
        if len(users) > 1:
            where = ", ".join(f"step {u.index} (model.{u.name})" for u in users)
            raise ValueError(
                f"parameter model.{names[pid]} is used by {len(users)} steps ({where}): tied "
                f"parameters are supported at order 1 only (their gradient summed over the uses); "
                f"order={order} with curvature={curvature!r} treats each step's parameters as "
                "its own control. Untie them (copy.deepcopy) or use order=1")
