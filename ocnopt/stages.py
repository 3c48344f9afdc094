"""The network as steps of a dynamical system (docs/method.md, sections 1 and 7).

Step t reads some earlier tensors (its arguments a_t: the network input or outputs of earlier
steps) and its control u_t (the trainable parameters it owns, shared by the batch) and
produces one tensor z_t = f_t(a_t, u_t). A chain (``nn.Sequential``) is the special case where
step t reads exactly the output of step t-1; any network ``torch.fx`` can trace is a graph of
such steps (``ocnopt.graph``). Tensors are named by *value ids*: 0 is the network input and
t + 1 the output of step t, so on a chain the value id of the input of step t is t.

Module steps (``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d``, ...) read one tensor and are
differentiated by their layer handler (``ocnopt.derivatives``); function steps (``add``,
``cat``, ``flatten``, ``relu``, ...) read any number of tensors, own no control and are
differentiated generically through ``torch.func``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .derivatives import StageDerivatives
from .derivatives.base import param_dict

#: what a step's handler receives as its input: one tensor (module steps) or a tuple (functions)
StepInput = Any


class FunctionStep(nn.Module):
    """The module of a function step: ``forward`` evaluates the traced call (no parameters)."""

    def __init__(self, call: Callable[[tuple[Tensor, ...], Any], Tensor], label: str):
        super().__init__()
        self.call, self.label = call, label

    def forward(self, *xs: Tensor) -> Tensor:
        return self.call(xs, None)

    def extra_repr(self) -> str:
        return self.label


class FunctionDerivatives(StageDerivatives):
    """Derivatives of a control-free function step ``z = fn(*args, **kwargs)``: the generic
    ``torch.func`` forms on a call whose tensor arguments are the step's inputs (a tuple, in
    the order of ``Stage.inputs``) and whose other arguments are constants of the trace
    (numbers, shapes recorded in the nominal pass, buffers).

    ``random``: the call draws random numbers (``F.dropout``, ``torch.rand_like``, a stochastic
    depth mask, ...). The nominal pass then records the random generator's state as its
    context and every later evaluation (the update pass) runs from that state, so it draws the
    same numbers (the shapes are the same); the global stream advances once per step."""

    def __init__(self, call: Callable[[tuple[Tensor, ...], Any], Tensor], label: str,
                 random: bool = False):
        self.call = call
        self.label = label
        self.random = random

    def forward(self, module: Any, x: StepInput) -> tuple[Tensor, Any]:
        if not self.random:
            return self.call(x, None), None
        device = x[0].device if x else torch.device("cpu")
        state = (torch.get_rng_state(),
                 torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        return self.call(x, None), state

    def replay(self, module: Any, x: StepInput, ctx: Any) -> Tensor:
        if ctx is None:
            return self.call(x, ctx)
        cpu, cuda = ctx
        device = x[0].device
        with torch.random.fork_rng(devices=[device] if cuda is not None else []):
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, device)
            return self.call(x, None)

    def functional(self, module: Any, params: dict[str, Tensor], x: StepInput, ctx: Any) -> Tensor:
        return self.replay(module, x, ctx)

    def __repr__(self) -> str:
        return f"FunctionDerivatives({self.label})"


@dataclass(eq=False)
class Stage:
    """One time step: its module (None for a function step), its derivatives, its control and
    where it sits in the graph.

    ``inputs``: value ids of the tensors the step reads, in the order its handler takes them;
    ``output``: the value id it produces (``index + 1``); ``frees``: the value ids whose last
    read is this step (they leave the augmented state after it). ``param_names``/``params``:
    the trainable parameters the step uses; ``owned[i]`` is False where ``params[i]`` is also
    used by an earlier step (weight tying), which then owns it as its control.
    """

    index: int
    name: str
    module: nn.Module  # a FunctionStep for a function step
    derivatives: StageDerivatives
    param_names: list[str] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)
    inputs: tuple[int, ...] = ()
    output: int = -1
    frees: tuple[int, ...] = ()
    owned: list[bool] = field(default_factory=list)
    #: a parameter of this step is used by another step too (weight tying)
    shared: bool = False

    def __post_init__(self) -> None:
        #: a function step (its handler takes the tuple of its inputs); else a module step
        self.is_function = isinstance(self.derivatives, FunctionDerivatives)
        if self.output < 0:
            self.output = self.index + 1
        if not self.inputs:
            self.inputs = (self.index,)
        if not self.owned:
            self.owned = [True] * len(self.params)

    @property
    def has_control(self) -> bool:
        return bool(self.params)

    @property
    def kronecker(self) -> bool:
        """Whether curvature models with Kronecker factors (kfac, ekfac) apply to this step:
        a Linear/Conv handler, and no parameter shared with another step."""
        return self.derivatives.kronecker and self.has_control and not self.shared

    def handler_input(self, xs: tuple[Tensor, ...]) -> StepInput:
        """What the handler takes for the tensors ``xs`` read (in ``inputs`` order)."""
        return xs if self.is_function else xs[0]

    def forward(self, x: StepInput) -> tuple[Tensor, Any]:
        return self.derivatives.forward(self.module, x)

    def replay(self, x: StepInput, ctx: Any) -> Tensor:
        return self.derivatives.replay(self.module, x, ctx)

    def functional(self, params: dict[str, Tensor], x: StepInput, ctx: Any = None) -> Tensor:
        """f_t(x, u) as a pure function of ``params`` (a dict keyed by ``param_names``)."""
        return self.derivatives.functional(self.module, params, x, ctx)

    @property
    def control_size(self) -> int:
        """m, the number of entries of the control u_t."""
        return sum(p.numel() for p in self.params)

    def flatten(self, tensors: list[Tensor], lead: int = 0) -> Tensor:
        """Concatenate per-parameter tensors (with ``lead`` leading dims) into (..., m)."""
        return torch.cat([t.reshape(*t.shape[:lead], -1) for t in tensors], dim=-1)

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Split (..., m) into per-parameter tensors of shape (..., *param.shape)."""
        lead = flat.shape[:-1]
        chunks = flat.split([p.numel() for p in self.params], dim=-1)
        return [c.reshape(*lead, *p.shape) for c, p in zip(chunks, self.params)]

    def control_view(self) -> Stage:
        """This step restricted to the parameters it owns (its control), for the curvature
        model: itself when it owns all of them."""
        if all(self.owned):
            return self
        keep = [i for i, o in enumerate(self.owned) if o]
        return Stage(self.index, self.name, self.module, self.derivatives,
                     [self.param_names[i] for i in keep], [self.params[i] for i in keep],
                     self.inputs, self.output, self.frees, shared=True)

    def __repr__(self) -> str:
        kind = self.module.label if isinstance(self.module, FunctionStep) else \
            type(self.module).__name__
        return f"Stage({self.index}, {self.name!r}, {kind})"


def module_params(module: nn.Module) -> tuple[list[str], list[Tensor]]:
    """The trainable parameters of ``module`` (its control u), by local name."""
    params = param_dict(module)
    names = [n for n, p in params.items() if isinstance(p, nn.Parameter)]
    return names, [params[n] for n in names]


def build_stages(model: nn.Module, *, leaf_modules: tuple[type[nn.Module], ...] = ()) -> list[Stage]:
    """The steps of ``model`` in topological order (see ``ocnopt.graph.build_graph``)."""
    from .graph import build_graph

    return build_graph(model, leaf_modules=leaf_modules).stages
