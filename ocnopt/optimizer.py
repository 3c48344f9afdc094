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
from typing import Any, cast

import torch
from torch import Tensor, nn

from .backends import make_backend
from .backends.autograd import DEFAULT_MEMORY_BUDGET
from .curvature import CURVATURES, CurvatureModel
from .curvature.base import check_nonneg
from .derivatives.ode import AdjointDerivatives
from .distributed import Collective, make_collective
from .engine import (
    BellmanEngine,
    Controls,
    StepConfig,
    StepOutcome,
    StepResult,
    no_grad_fast,
)
from .graph import build_graph
from .losses import Loss, make_loss
from .profiling import profiled
from .stages import Stage

GAMES = ("cooperative", "nash")


class NonFiniteStepWarning(RuntimeWarning):
    """A step produced a non-finite loss or update and was skipped (warned once)."""


_COMMON = {"lr", "weight_decay"}
_STRUCTURAL = ("order", "backend", "curvature", "loss", "feedback", "value_correction",
               "gauss_newton", "track_loss_after", "seed", "game", "leaf_modules", "set_grad")
#: hyper-parameters of the integration time of the model's ODE blocks (``ODEBlock.configure_t1``,
#: docs/method.md section 12); accepted when the model has an ODE block, None: the block's value
T1_KEYS = ("learn_t1", "t1_lr", "t1_reg", "t1_every", "t1_min", "t1_feedback")

#: curvature models whose eps underflows in float16 (their steps would all be skipped)
_HALF_UNSAFE = ("adam", "adamw", "rmsprop")


def default_backend(order: int, *, needs_full: bool, gauss_newton: bool, mu: float) -> str:
    """The backend ``OCNOpt(backend=None)`` resolves to: order 1 "autograd" (backpropagation);
    order 2 (or curvature "full") "lowrank", the scalable one, except where only "autograd"
    can: curvature "full" (E[Q_uu] as a matrix), ``gauss_newton=False`` or ``mu > 0``."""
    if order == 1 and not needs_full:
        return "autograd"
    if needs_full or not gauss_newton or mu:
        return "autograd"
    return "lowrank"


def integer_targets(targets: Tensor) -> Tensor:
    """Class indices of any integer dtype as int64 (the dtype every backend indexes with)."""
    if targets.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        return targets.long()
    return targets


def _set_grad(p: Tensor, g: Tensor | None) -> None:
    """p.grad = g (cast to p's dtype), the commit of ``OCNOpt.step``'s gradients."""
    if g is not None and (g.requires_grad or g.dtype != p.dtype):
        g = g.detach().to(p.dtype)
    p.grad = g


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
            ``Backend`` instance. ``None`` (default) resolves by ``default_backend``: order 1
            "autograd"; order 2 "lowrank", except "autograd" where only it can (curvature
            "full", ``gauss_newton=False``, ``mu > 0``); ``self.backend_name`` says which.
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
        value_correction: order 2: subtract the policy terms from V_x and V_xx (docs/method.md section 6).
        gauss_newton: drop the contraction terms V'_x . f_ab (Gauss-Newton) or keep them.
        psd_clip: clip V_xx to the PSD cone after each stage (eigenvalues < 0 set to 0).
            ``psd_clip=False`` is honoured by backend "autograd" only: "lowrank" and "backpack"
            keep V_xx = Z Z^T as a factor, PSD by construction (their C C^T is always clipped),
            so they refuse it (ValueError) rather than ignore it.
        mu: value regularisation V_xx + mu I (a hyper-parameter in ``param_groups``).
        trust: order 2: trust bound of the second-order corrections (a hyper-parameter in
            ``param_groups``, default 0.5): in the update pass the feedback part K dx of a stage
            is scaled down to at most ``trust`` times the norm of its open-loop step k, and the
            value correction of each sample's V_x to at most ``trust`` times the norm of its
            Q_x. ``None`` turns the bound off (the plain recursion of docs/method.md section 6).
        memory_budget: bytes one layer may hold (default 2 GiB, the autograd backend's
            ``DEFAULT_MEMORY_BUDGET``): the exact backend's full matrices of one step (backend
            "autograd"), and the curvature state of one layer for kfac/ekfac (its Kronecker
            factors A (d_in, d_in) and G (d_out, d_out), their inverses or eigenbases, and the
            float64 workspace of the inversion), checked before anything is allocated: a layer
            over it raises ``MemoryBudgetError`` naming the layer, the factor shapes and the
            bytes (use ``kfac_max_dim`` to put such layers on the diagonal fallback).
        backend_options: keyword arguments of the backend given by name, e.g.
            ``{"terminal": "exact"}`` for ``backend="lowrank"`` (terminal factor "empirical",
            "exact" or "mc", and ``mc_samples``).
        weight_decay: l_t(u) = wd/2 |u|^2 in the objective (decoupled for ``adamw``); default 0
            (1e-2 for ``adamw``, as torch).
        track_loss_after: also compute the loss after the step with an extra forward pass
            (``last_step.loss_after``); at order 1 this costs one forward pass.
        seed: seed of the generator used to sample labels (``fisher_type="mc"``).
        set_grad: after every step that is not skipped, each parameter's ``.grad`` holds
            Qbar_u, the batch-mean gradient of the objective without the weight-decay term
            (torch's convention), clipped by ``max_grad_norm`` when set; a tied parameter gets
            the sum over its uses. Skipped steps and failed steps leave ``.grad`` unchanged.
            ``False`` keeps ``.grad`` untouched and lets kfac skip forming Qbar_u where its
            direction comes from the statistics' rows (faster on wide layers, small batches).
        process_group: data-parallel training (docs/method.md section 13, docs/distributed.md).
            ``None`` (default): the default ``torch.distributed`` group when it is initialised
            with more than one process (e.g. launched with torchrun), else one process;
            ``False``: one process whatever torch.distributed says; or a ``ProcessGroup``.
            Each process calls ``step(inputs, targets)`` with its own shard of the global batch
            (shards may differ in size); the optimizer all-reduces the batch means (Qbar_u, the
            curvature statistics, the feedback sums, the loss, the predicted change) so that
            every process keeps the same parameters and optimizer state, equal to one process
            on the concatenated batch. No DistributedDataParallel wrapper is needed: a
            DDP-wrapped model is accepted and its ``.module`` optimized (DDP's own gradient
            all-reduce never runs: the step does not call ``backward`` on the wrapper). The
            parameters and buffers of rank 0 are broadcast at construction (as DDP does), and
            the buffers (BatchNorm running statistics) after every step. ``self.comm`` counts
            the bytes communicated (``comm.bytes_by_tag``).
        split_inversions: data parallel, kfac/ekfac: the factors of stage t are inverted
            (eigen-decomposed) on rank t % P only and broadcast, as kfac-pytorch does; False:
            every process inverts every factor (no broadcast).
        max_grad_norm: a hyper-parameter in ``param_groups`` (default None: no clip): Qbar_u
            is scaled by min(1, max_grad_norm / (|Qbar_u| + 1e-6)) inside the step, before the
            curvature model sees it (as ``clip_grad_norm_`` before ``optimizer.step()``), weight
            decay added after the clip. Order 1: |Qbar_u| is the global norm over every
            parameter. Order 2: Qbar_u of a step is formed in the backward recursion after the
            later steps' policies, so the global norm is not known when the curvature model
            needs it: each player's Qbar_u is clipped by its own norm. The clip scales the
            open-loop term k = -lr M^{-1} Qbar_u and the value correction that uses it; the
            feedback K dX = -lr M^{-1} Q_uX dX is not clipped (its trust bound caps it at
            ``trust`` |k|, so it shrinks with k). ``last_step.grad_norm``: the norm before the
            clip.
        **hyperparameters: the curvature model's hyper-parameters, with torch's names:
            sgd: momentum, dampening, nesterov; rmsprop: alpha, eps, centered, momentum;
            adam/adamw: betas, eps, amsgrad; kfac/ekfac: damping (number or callable of the
            step), stat_every, inv_every, stat_decay, momentum, fisher_type
            ("empirical", "type-2", "mc"; default by loss: "type-2" for "mse", exact and as
            cheap as the empirical Fisher there, "empirical" otherwise, docs/method.md section
            4), kfac_max_dim (None: no limit; layers whose factor side d_in or d_out exceeds it
            use the diagonal fallback, listed in ``last_step.diagonal_fallback``; backend
            "backpack" still has BackPACK compute every layer's factors), kfac only:
            inv_dtype ("float64", the default, or "factor": the Cholesky inversions in the
            factors' dtype, float32 for a float32 model, as curvlinops; redone in float64 where
            they fail); full: damping,
            eig_floor; soap: betas,
            shampoo_beta, precondition_frequency, max_precondition_dim, merge_dims,
            precondition_1d, correct_bias, normalize_gradient, data_format, eps, weight_decay
            (decoupled, as SOAP); shampoo: momentum, weight_decouple, fixed_decay,
            preconditioning_compute_steps, matrix_eps.
            Models with an ``ocnopt.ode.ODEBlock`` also take its integration-time settings
            learn_t1, t1_lr, t1_reg, t1_every, t1_min, t1_feedback (``ODEBlock.configure_t1``;
            None, the default: the block's own value). They live in ``param_groups`` (and so in
            ``state_dict``) and are applied to every block at each step; t1 itself is a buffer
            of the block, in the model's ``state_dict`` (docs/method.md section 12).

    Precision: float16 parameters are refused with adam, adamw and rmsprop (their eps
    underflows in float16 and every step would be skipped): keep the model in float32 (or
    bfloat16) and run the forward in reduced precision with ``torch.autocast`` around
    ``step`` (``with torch.autocast("cpu", dtype=torch.bfloat16): opt.step(x, y)``), which is
    supported at order 1 (the forward runs in reduced precision, Qbar_u, the curvature state
    and the update stay in the parameters' dtype); order 2 refuses autocast (RuntimeError).

    A step is atomic: an exception raised inside ``step`` leaves the parameters, the model's
    buffers (BatchNorm running statistics), ``.grad``, the optimizer state and the sampling
    generator as they were before the call.
    """

    DEFAULT_LR = {"sgd": 1e-3, "rmsprop": 1e-2, "adam": 1e-3, "adamw": 1e-3,
                  "kfac": 3e-2, "ekfac": 3e-2, "full": 1.0, "soap": 3e-3, "shampoo": 1e-3}

    def __init__(
        self,
        model: nn.Module,
        loss: str | Loss | nn.Module | Callable[[Tensor, Tensor], Tensor] = "cross_entropy",
        lr: float | None = None,
        curvature: str = "adam",
        backend: str | Any | None = None,
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
        set_grad: bool = True,
        process_group: Any = None,
        split_inversions: bool = True,
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
                           ("track_loss_after", track_loss_after), ("set_grad", set_grad),
                           ("split_inversions", split_inversions)):
            if not isinstance(flag, bool):
                raise TypeError(f"invalid {name}={flag!r}: accepted True or False")
        ddp_group = getattr(model, "process_group", None) if _is_ddp_wrapper(model) else None
        if _is_ddp_wrapper(model):  # DDP's own all-reduce never runs (no backward on it)
            model = cast(nn.Module, model.module)
        self.comm: Collective = make_collective(
            process_group if process_group is not None else ddp_group)
        self.curvature_name = curvature
        self.model_: CurvatureModel = CURVATURES[curvature]()
        self.model_.comm = self.comm
        self.model_.split_inversions = split_inversions
        if backend is None:
            backend = default_backend(order, needs_full=self.model_.needs_full,
                                      gauss_newton=gauss_newton, mu=mu)
        self.backend_name = backend if isinstance(backend, str) else type(backend).__name__
        if isinstance(model, nn.Module):  # else build_graph names what it accepts
            _refuse_meta(model)
            _refuse_half(model, curvature)
        options = dict(backend_options or {})
        if memory_budget is not None and not (isinstance(memory_budget, int)
                                              and not isinstance(memory_budget, bool)
                                              and memory_budget > 0):
            raise ValueError(f"invalid memory_budget={memory_budget!r}: accepted a positive "
                             "integer number of bytes or None")
        self.memory_budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
        if memory_budget is not None and backend == "autograd":
            options["memory_budget"] = memory_budget
        if options and not isinstance(backend, str):
            raise ValueError("memory_budget / backend_options apply to a backend given by name; "
                             "configure the backend instance instead")
        try:
            self.backend = make_backend(backend, **options)
        except TypeError as err:
            raise TypeError(f"invalid backend option for backend={backend!r}: {err}") from err
        self.backend.check_options(gauss_newton=gauss_newton, mu=mu,
                                   needs_full=self.model_.needs_full, psd_clip=psd_clip)
        if (order == 2 or self.model_.needs_full) and not self.backend.second_order_capable:
            raise ValueError(f"order={order} with curvature={curvature!r} needs a backend with "
                             f"second-order terms; backend={backend!r} has none (use backend "
                             "'lowrank' or 'autograd')")
        self._fisher_given = "fisher_type" in hyperparameters
        self.loss_fn = make_loss(loss)
        if not self._fisher_given and "fisher_type" in self.model_.defaults \
                and self.loss_fn.name == "mse":  # type-2 where the backend honours it
            hyperparameters = {**hyperparameters, "fisher_type": "type-2"}
            try:
                if order == 2 and isinstance(backend, str):
                    self.backend.follow_fisher("type-2", given=options)
                self.backend.check_fisher("type-2", order=order, explicit=False)
            except ValueError:  # e.g. backpack (its extension chooses), or a fixed terminal
                hyperparameters["fisher_type"] = "empirical"
        elif order == 2 and self._fisher_given and isinstance(backend, str):
            self.backend.follow_fisher(hyperparameters["fisher_type"], given=options)
        self.feedback = feedback
        self.value_correction = value_correction
        self.gauss_newton = gauss_newton
        self.psd_clip = psd_clip
        self.set_grad = set_grad
        self.order = order
        self.track_loss_after = bool(track_loss_after)
        self.game = game
        self.graph = build_graph(model, leaf_modules=leaf_modules)
        self.stages: list[Stage] = self.graph.stages
        #: the Neural ODE blocks among the steps (solver statistics, learned integration time)
        self._ode_blocks: list[Any] = [st.module for st in self.stages
                            if isinstance(st.derivatives, AdjointDerivatives)]
        if self._ode_blocks:  # the t1 hyper-parameters are the optimizer's too (None: the block's)
            t1_hp = {k: hyperparameters.get(k) for k in T1_KEYS}
            for b in self._ode_blocks:
                b.configure_t1(**t1_hp)
        if order == 1 and any(getattr(b, "learn_t1", False) for b in self._ode_blocks):
            raise ValueError(
                "ODEBlock(learn_t1=True) needs order=2 here: s = dJ/dt1 comes from the block's "
                "backward expansion; at order 1 call block.update_t1(s=block.t1_gradient(...)) "
                "yourself, or use order=2 (docs/method.md section 12)")
        if order == 2 or self.model_.needs_full:
            _refuse_tied(self.stages, order, curvature)
        if self.comm.active and any(getattr(b, "learn_t1", False) for b in self._ode_blocks):
            raise ValueError("ODEBlock(learn_t1=True) is not supported in data-parallel training "
                             "(its s = dJ/dt1 is a per-process batch mean); use learn_t1=False or "
                             "process_group=False")
        self.backend.prepare(self.graph, self.loss_fn)
        self.engine = BellmanEngine(self.graph, self.loss_fn, self.backend)
        self.engine.comm = self.comm

        accepted = {"weight_decay": 0.0, "mu": 0.0, "trust": 0.5, "max_grad_norm": None,
                    **self.model_.defaults,
                    **({k: None for k in T1_KEYS} if self._ode_blocks else {})}
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
        self._module = model
        #: the modules that hold buffers (their tensors are read at every step: model.to()
        #: replaces them; the modules stay)
        self._buffer_modules = [m for m in model.modules() if m._buffers]
        self._warned_nonfinite = False
        self._last_step: StepResult | None = None
        #: the hyper-parameters last validated by ``step`` (``_frozen``)
        self._checked_hp: tuple[Any, ...] | None = None
        #: the structural options ``_config`` (the step's ``StepConfig``) was made with
        self._config_options: tuple[Any, ...] | None = None
        self._config: StepConfig | None = None
        if self.comm.active:  # every process starts from rank 0's parameters and buffers
            self._broadcast_from_rank0(params, tag="setup")

    def _broadcast_from_rank0(self, params: list[Tensor], tag: str) -> None:
        """Parameters (``params``) and the model's buffers := rank 0's (data parallel)."""
        live = params + [b for m in self._buffer_modules for b in m._buffers.values()
                         if b is not None]
        if not live:
            return
        with torch.no_grad():
            for t, v in zip(live, self.comm.broadcast(live, src=0, tag=tag)):
                t.copy_(v)

    # -- validation ---------------------------------------------------------------------------
    def _check(self, hp: dict[str, Any]) -> None:
        lr = hp["lr"]
        if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr)
                and lr >= 0):
            raise ValueError(f"invalid lr={lr!r}: accepted a finite number >= 0")
        dtype = min((p.dtype for st in self.stages for p in st.params if p.is_floating_point()),
                    key=lambda d: torch.finfo(d).max, default=None)
        if dtype is not None and lr > torch.finfo(dtype).max:  # (the step scales by -lr)
            raise ValueError(f"invalid lr={lr!r}: accepted a finite number >= 0 that the "
                             f"parameters' dtype {str(dtype).replace('torch.', '')} can hold "
                             f"(at most {torch.finfo(dtype).max:.3g})")
        check_nonneg(hp, "weight_decay", "mu")
        trust = hp.get("trust")
        if trust is not None and not (isinstance(trust, (int, float)) and not isinstance(trust, bool)
                                      and math.isfinite(trust) and trust > 0):
            raise ValueError(f"invalid trust={trust!r}: accepted a finite number > 0 or None "
                             "(no bound on the second-order corrections)")
        clip = hp.get("max_grad_norm")
        if clip is not None and not (isinstance(clip, (int, float)) and not isinstance(clip, bool)
                                     and math.isfinite(clip) and clip > 0):
            raise ValueError(f"invalid max_grad_norm={clip!r}: accepted a finite number > 0 or "
                             "None (no clip)")
        self.model_.check(hp)
        self.model_.check_memory(self.stages, hp, self.memory_budget)
        if "fisher_type" in hp:  # honoured by the backend or refused, never ignored
            self.backend.check_fisher(hp["fisher_type"], order=self.order,
                                      explicit=self._fisher_given)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "param_groups", None):
            raise ValueError("OCNOpt takes its parameters from the model's stages; "
                             "add_param_group is not supported")
        super().add_param_group(param_group)

    @property
    def last_step(self) -> StepResult | None:
        """What the last call of ``step`` did (``StepResult``); order 1 makes its per-player
        diagnostics here, at the first read after the step."""
        r = self._last_step
        return r.materialize() if r is not None and r.pending is not None else r

    @last_step.setter
    def last_step(self, value: StepResult | None) -> None:
        self._last_step = value

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
    @profiled("ocnopt.step")
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
        if inputs.shape[0] == 0:
            raise ValueError(f"empty batch: inputs of shape {tuple(inputs.shape)}; step needs at "
                             "least one sample (the objective is the batch mean)")
        if torch.is_inference_mode_enabled():
            raise RuntimeError("OCNOpt.step was called under torch.inference_mode(): the step "
                               "differentiates the model and updates the parameters, which "
                               "inference mode forbids; call it outside the inference_mode block")
        autocast = _autocast_dtype(inputs.device.type) if self.order == 2 else None
        if autocast is not None:
            raise RuntimeError(
                f"OCNOpt.step at order 2 was called under torch.autocast "
                f"({autocast}): the second-order terms would "
                "mix reduced and full precision; autocast is supported at order 1 (wrap step in "
                "it there), at order 2 call step outside the autocast block")
        if inputs.is_meta or targets.is_meta:
            raise ValueError("inputs/targets are on the meta device (no data): pass tensors on "
                             "the model's device")
        if inputs.is_inference():  # made under inference_mode: a normal tensor with its values
            inputs = inputs.clone()
        if targets.is_inference():
            targets = targets.clone()
        targets = integer_targets(targets)
        hp = self.param_groups[0]
        items = tuple(hp.items())
        try:
            same = items == self._checked_hp
        except Exception:  # a value whose == is not a truth value (a tensor)
            same = False
        model = self.model_
        if not same:  # validated once per setting
            self._check(hp)
            self._checked_hp = items if _immutable(hp) else None
        options = (self.order, self.feedback, self.value_correction, self.gauss_newton,
                   self.psd_clip, self.game, self.track_loss_after, self.set_grad)
        if not same or options != self._config_options:  # the step's options, once per setting
            self._config_options = options if same or self._checked_hp is not None else None
            self._config = StepConfig(
                order=self.order, lr=float(hp["lr"]),
                weight_decay=float(hp["weight_decay"]) if model.coupled_weight_decay(hp)
                else 0.0,
                feedback=self.feedback, value_correction=self.value_correction,
                gauss_newton=self.gauss_newton, mu=float(hp.get("mu", 0.0)), clip=self.psd_clip,
                trust=hp.get("trust"), game=self.game, fisher_type=hp.get("fisher_type"),
                track_loss_after=self.track_loss_after, set_grad=self.set_grad,
                max_grad_norm=hp.get("max_grad_norm"))
        config = self._config
        assert config is not None
        #: taken when the engine first asks for the generator (``_OptimizerControls``)
        self._generator_state: Tensor | None = None
        snapshot = self._snapshot()
        for block in self._ode_blocks:
            block.reset_nfe()
            block.configure_t1(**{k: hp.get(k) for k in T1_KEYS})
            if self.order == 1 and block.learn_t1:
                raise ValueError("learn_t1=True needs order=2: s = dJ/dt1 comes from the block's "
                                 "backward expansion (docs/method.md section 12)")
        try:
            outcome = self.engine.step(inputs, targets, config, _OptimizerControls(self, hp))
            if outcome.skipped is not None:
                return self._skip(outcome.loss, outcome.skipped, snapshot)
            self._commit(outcome)
            if self.comm.active and self._buffer_modules:  # rank 0's running statistics
                self._broadcast_from_rank0([], tag="buffers")
        except BaseException:
            self._rollback(snapshot)
            raise
        assert outcome.result is not None
        outcome.result.diagonal_fallback = model.fallback_stages(self.stages, hp)
        if self._ode_blocks:
            outcome.result.solver = {
                "nfe_forward": sum(int(b.nfe_forward) for b in self._ode_blocks),
                "nfe_backward": sum(int(b.nfe_backward) for b in self._ode_blocks)}
            outcome.result.t1_updates = [u for b in self._ode_blocks
                                         if getattr(b, "learn_t1", False)
                                         for u in [b.update_t1()] if u is not None]
        self.last_step = outcome.result
        return outcome.loss

    # -- atomic steps -------------------------------------------------------------------------
    def _snapshot(self) -> dict[str, Any]:
        """What ``_rollback`` restores: buffers (copies: BatchNorm statistics are small), the
        ``.grad`` and state entries (references: a step replaces them, never mutates them),
        the counters and the generator. The parameters are copied by the engine before it
        moves them (``Controls.backup``)."""
        params = self.param_groups[0]["params"]
        self._backup_taken = False
        live = [b for m in self._buffer_modules for b in m._buffers.values() if b is not None]
        buffers = []
        if live:
            with torch.no_grad():
                buffers = [b.clone() for b in live]
        return {"live": live, "buffers": buffers, "grads": [p.grad for p in params],
                "state": dict(self.state),  # (a shallow copy: the entries are replaced)
                "meta": dict(self._meta),
                "last_step": self._last_step}

    def _rollback(self, snap: dict[str, Any]) -> None:
        params = self.param_groups[0]["params"]
        with torch.no_grad():
            if self._backup_taken:
                for p, b in zip(params, self._backup):
                    p.copy_(b)
            for b, old in zip(snap["live"], snap["buffers"]):
                b.copy_(old)
        for p, g in zip(params, snap["grads"]):
            p.grad = g
        for p in params:
            if p in snap["state"]:
                self.state[p] = snap["state"][p]
            else:
                self.state.pop(p, None)
        self._meta_set(snap["meta"])
        if self._generator_state is not None:
            self.generator.set_state(self._generator_state)
        self.last_step = snap["last_step"]

    def _commit(self, outcome: StepOutcome) -> None:
        """The new curvature states, ``.grad`` (Qbar_u) and the step counter."""
        state = self.state
        for params, states in outcome.new_states.values():
            state.update(zip(params, states))
        if self.set_grad:
            for owners, grads in outcome.grads.values():
                for p, g in zip(owners, grads):
                    _set_grad(p, g)
        meta = dict(self._meta)
        meta["step"] = int(meta["step"]) + 1
        self._meta_set(meta)

    def _backup_params(self) -> list[Tensor]:
        """A copy of the parameters before the update pass (restored if it ends non-finite),
        in buffers kept between steps: no allocation per step."""
        params = self.param_groups[0]["params"]
        buf = getattr(self, "_backup", None)
        # (a parameter moved to another device still copies to and from its buffer exactly)
        if buf is None or [b.shape for b in buf] != [p.shape for p in params] \
                or [b.dtype for b in buf] != [p.dtype for p in params]:
            buf = self._backup = [torch.empty_like(p, memory_format=torch.preserve_format)
                                  for p in params]
        with no_grad_fast():
            torch._foreach_copy_(buf, params)
        self._backup_taken = True
        return buf

    def _skip(self, loss: Tensor, what: str, snap: dict[str, Any]) -> Tensor:
        if self._generator_state is not None:  # a skipped step draws no labels
            self.generator.set_state(self._generator_state)
        with torch.no_grad():  # a skipped step leaves the buffers as they were, too
            for b, old in zip(snap["live"], snap["buffers"]):
                b.copy_(old)
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

    @property  # type: ignore[override]
    def generator(self) -> torch.Generator:  # type: ignore[override]
        """The sampling generator; its state is kept (restored by a skipped or failed step)
        from the first time the step asks for it."""
        opt = self.opt
        if opt._generator_state is None:
            opt._generator_state = opt.generator.get_state()
        return opt.generator

    def states(self, control: Stage) -> list[dict[str, Any]]:
        return [self.opt.state[p] for p in control.params]

    def backup(self) -> list[Tensor]:
        return self.opt._backup_params()

    def restore(self, backup: list[Tensor]) -> None:
        with torch.no_grad():
            for p, b in zip(self.opt.param_groups[0]["params"], backup):
                p.copy_(b)


def _is_ddp_wrapper(model: Any) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


_IMMUTABLE = (int, float, str, bool, type(None))


def _immutable(hp: dict[str, Any]) -> bool:
    """Whether every hyper-parameter of a group (not "params") is immutable (numbers, strings,
    None, tuples of those): a validated setting then stays valid until a value is replaced (a
    list or a tensor could change in place, and is validated at every step)."""
    for k, v in hp.items():
        if k == "params":
            continue
        if isinstance(v, tuple):
            if not all(type(x) in _IMMUTABLE for x in v):
                return False
        elif type(v) not in _IMMUTABLE:
            return False
    return True


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


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of an enabled ``torch.autocast`` on ``device_type``, else None (torch >= 2.4
    API, with the per-device functions of earlier versions as fallback)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        enabled = (torch.is_autocast_cpu_enabled() if device_type == "cpu"
                   else torch.is_autocast_enabled())
    if not enabled:
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return (torch.get_autocast_cpu_dtype() if device_type == "cpu"
                else torch.get_autocast_gpu_dtype())


def _refuse_meta(model: nn.Module) -> None:
    """A model on the meta device has no values to optimize."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise ValueError(f"model.{name} is on the meta device (shape only, no data): "
                             "materialize the model first, e.g. model.to_empty(device='cpu') and "
                             "initialise its parameters (or load a state_dict)")


def _refuse_half(model: nn.Module, curvature: str) -> None:
    """float16 parameters with a model whose eps underflows in float16."""
    if curvature not in _HALF_UNSAFE:
        return
    for name, p in model.named_parameters():
        if p.dtype == torch.float16:
            raise ValueError(
                f"model.{name} is float16, which curvature={curvature!r} does not support: its "
                "eps (1e-8) underflows in float16 and every step would be skipped as "
                "non-finite. Keep the parameters in float32 (model.float()) and run the forward "
                "in reduced precision with `with torch.autocast(device_type, "
                "dtype=torch.bfloat16): opt.step(x, y)`, or use bfloat16 parameters")
