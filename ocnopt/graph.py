"""Graphs as augmented-state chains (docs/method.md, section 7).

``build_graph(model)`` turns any ``nn.Module`` that ``torch.fx`` can trace into steps in
topological order (``ocnopt.stages.Stage``): every call of a supported layer is a module step
with that layer's parameters as its control, every other tensor-valued operation (``add``,
``cat``, ``flatten``, ``view``, ``mean``, ``relu``, ``getitem``, ...) a control-free function
step. ``nn.Sequential`` chains (and a single layer) are built directly, without tracing.

The augmented state before step t, X_t, is the tuple of tensors produced before t (the
network input included) that are read at step t or later; step t maps X_t to
X_{t+1} = X_t minus the tensors last read at t, plus z_t. That chain is Markov, so the
Bellman recursion applies to it blockwise (one block per live tensor).

Operations on shapes and constants only (``x.size(0)``, ``x.shape``, arithmetic on them,
``torch.arange(n)``) are not steps: they are evaluated inside the step that uses them, from
that step's inputs (so a per-sample evaluation sees per-sample shapes). A call returning a
tuple that is only indexed (``torch.chunk(x, 2)[0]``) is evaluated inside each indexing step.

Players: every step with parameters. Two players are simultaneous when neither step is an
ancestor of the other (the branches of an inception block, a residual branch and its
projection shortcut).
"""

from __future__ import annotations

import builtins
import operator
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .derivatives import DERIVATIVES, GENERIC, StageDerivatives, refusal_of, supported_modules
from .stages import FunctionDerivatives, FunctionStep, Stage, module_params

#: in-place operators and their out-of-place twins (each step's inputs are its own tensors)
_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub,
                 operator.imul: operator.mul, operator.itruediv: operator.truediv,
                 operator.ifloordiv: operator.floordiv, operator.ipow: operator.pow,
                 operator.imatmul: operator.matmul}
#: calls that draw random numbers (replayed from the recorded generator state)
_RANDOM_FUNCTIONS = {
    torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint,
    torch.randint_like, torch.randperm, torch.bernoulli, torch.multinomial, torch.normal,
    torch.poisson, torch.nn.functional.dropout, torch.nn.functional.dropout1d,
    torch.nn.functional.dropout2d, torch.nn.functional.dropout3d,
    torch.nn.functional.alpha_dropout, torch.nn.functional.feature_alpha_dropout,
    torch.nn.functional.rrelu, torch.nn.functional.gumbel_softmax, torch.dropout,
}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_",
                   "geometric_", "log_normal_", "cauchy_", "multinomial"}
_STATIC_METHODS = {"size", "dim", "ndimension", "numel", "nelement", "get_device", "type",
                   "is_contiguous", "element_size"}
_STATIC_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad"}


class GraphError(TypeError):
    """A model that ocnopt cannot see as a graph of steps (named, with what to do)."""


def handler_for(module: nn.Module, where: str, *, leaf: bool = False) -> StageDerivatives:
    """The layer handler of ``module`` (``where`` names it in errors): the table's, else the
    generic ``torch.func`` one; ``TypeError`` naming the module, where it is and why it cannot
    be a step, with the supported layers. ``leaf``: the user named its class in
    ``leaf_modules``: a container is then one step, run as it is."""
    if leaf and type(module) not in DERIVATIVES:
        return GENERIC
    why = refusal_of(module)
    if why is not None:
        raise GraphError(
            f"unsupported module {type(module).__name__} at {where}: {why}. Supported layers: "
            f"{', '.join(supported_modules())}; any other leaf module that maps one tensor to one "
            "tensor (no child modules, or parameters of its own) uses the generic torch.func "
            "handler")
    return DERIVATIVES.get(type(module), GENERIC)


@dataclass
class Graph:
    """The steps of a network in topological order, with what the games need.

    ``ancestors[t]``: indices of the steps step t depends on; ``players``: steps with
    parameters; ``nash_ignored[t]``: value ids of the augmented state X_t that depend on the
    output of a player simultaneous with player t (``game="nash"`` drops them from t's
    feedback); ``live[t]``: the value ids in X_t; ``chain``: built from ``nn.Sequential``;
    ``direct``: ``root(x)`` runs the same operations with the same random draws as the steps
    one by one (every step's ``plain_forward``), so a pass that records nothing per step (order
    1 without statistics) may call the model itself."""

    stages: list[Stage]
    root: nn.Module
    chain: bool
    ancestors: list[frozenset[int]] = field(default_factory=list)
    live: list[tuple[int, ...]] = field(default_factory=list)
    nash_ignored: list[frozenset[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        T = len(self.stages)
        self.direct = all(st.derivatives.plain_forward for st in self.stages)
        anc: list[frozenset[int]] = []
        for st in self.stages:
            a: set[int] = set()
            for j in st.inputs:
                if j > 0:
                    a.add(j - 1)
                    a |= anc[j - 1]
            anc.append(frozenset(a))
        self.ancestors = anc
        last_read = {0: -1}
        for st in self.stages:
            for j in st.inputs:
                last_read[j] = st.index
        self.live = []
        for t in range(T):
            self.live.append(tuple(j for j in range(t + 1) if last_read.get(j, -1) >= t))
        players = [st.index for st in self.stages if st.has_control]
        self.nash_ignored = []
        for t in range(T):
            if t not in players:
                self.nash_ignored.append(frozenset())
                continue
            sim = {m for m in players if m != t and m not in anc[t] and t not in anc[m]}
            ignored = set()
            for j in self.live[t]:
                if j > 0 and ({j - 1} | anc[j - 1]) & sim:
                    ignored.add(j)
            self.nash_ignored.append(frozenset(ignored))

    def simultaneous(self, n: int, m: int) -> bool:
        """Whether players n and m are simultaneous (neither is an ancestor of the other)."""
        return n != m and m not in self.ancestors[n] and n not in self.ancestors[m]


def _flatten(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for name, child in module._modules.items():  # named_children() hides repeats
            if child is not None:
                out += _flatten(child, f"{prefix}.{name}" if prefix else name)
        return out
    return [(prefix or type(module).__name__, module)]


def _is_leaf(module: nn.Module, leaf_modules: tuple[type[nn.Module], ...]) -> bool:
    """A module that is one step: a supported layer, a class named in ``leaf_modules``, a
    module that owns parameters directly, or a torch.nn layer without children."""
    if isinstance(module, nn.Sequential):
        return False
    if type(module) in DERIVATIVES or isinstance(module, leaf_modules):
        return True
    if any(True for _ in module.parameters(recurse=False)):
        return True
    return module.__module__.startswith("torch.nn") and not any(True for _ in module.children())


def _finish(stages: list[Stage], root: nn.Module, chain: bool) -> Graph:
    if not stages:
        raise ValueError("model has no layers: an empty nn.Sequential is not a network")
    users: dict[int, list[int]] = {}
    for st in stages:
        for p in st.params:
            users.setdefault(id(p), [])
            if st.index not in users[id(p)]:
                users[id(p)].append(st.index)
    for st in stages:
        st.owned = [users[id(p)][0] == st.index for p in st.params]
        st.shared = any(len(users[id(p)]) > 1 for p in st.params)
    if not users:
        raise ValueError("model has no trainable parameters: nothing to optimise")
    last_read: dict[int, int] = {}
    for st in stages:
        for j in st.inputs:
            last_read[j] = st.index
    for st in stages:
        st.frees = tuple(j for j in st.inputs if last_read[j] == st.index)
    return Graph(stages, root, chain)


def _chain(model: nn.Module, flat: list[tuple[str, nn.Module]],
           leaf_modules: tuple[type[nn.Module], ...]) -> Graph:
    stages = []
    for position, (name, module) in enumerate(flat):
        where = f"stage position {position} (model.{name})"
        handler = handler_for(module, where, leaf=isinstance(module, leaf_modules))
        names, params = module_params(module)
        stages.append(Stage(position, name, module, handler, names, params,
                            inputs=(position,), output=position + 1))
    return _finish(stages, model, chain=True)


def build_graph(model: nn.Module, *, leaf_modules: tuple[type[nn.Module], ...] = ()) -> Graph:
    """The graph of steps of ``model``.

    ``nn.Sequential`` (nested Sequentials flattened) and single layers are chains; any other
    module is traced with ``torch.fx`` (modules of the classes in ``leaf_modules`` are one step
    each, run as they are). Raises ``TypeError`` naming the module (and the line) that cannot be
    traced or the layer that cannot be a step, with what to do.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    leaf_modules = tuple(leaf_modules)
    if isinstance(model, nn.Sequential) or _is_leaf(model, leaf_modules):
        flat = _flatten(model, "")
        if all(_is_leaf(m, leaf_modules) for _, m in flat):
            return _chain(model, flat, leaf_modules)
    return _trace(model, leaf_modules)


# ---- tracing ---------------------------------------------------------------------------------
class _Tracer(torch.fx.Tracer):
    def __init__(self, leaf_modules: tuple[type[nn.Module], ...]):
        super().__init__()
        self.leaf_types = leaf_modules

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_leaf(m, self.leaf_types)


def _user_frame(err: BaseException) -> str:
    """file:line: code of the innermost frame of ``err``'s traceback outside torch."""
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    found = ""
    for frame in traceback.extract_tb(err.__traceback__):
        if not frame.filename.startswith(torch_dir) and "ocnopt/graph.py" not in frame.filename:
            found = f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return found


@dataclass
class _Ref:
    """A tensor argument of a step's expression: the value with this id."""

    vid: int


class _Expr:
    """A node evaluated inside a step: ``fn(*args, **kwargs)`` whose arguments may hold
    ``_Ref`` (step inputs) and nested ``_Expr`` (shape arithmetic, tuple producers)."""

    def __init__(self, fn: Callable[..., Any], args: Any, kwargs: Any):
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __call__(self, env: dict[int, Tensor]) -> Any:
        return self.fn(*_fill(self.args, env), **_fill(self.kwargs, env))


def _fill(obj: Any, env: dict[int, Tensor]) -> Any:
    if isinstance(obj, _Ref):
        return env[obj.vid]
    if isinstance(obj, _Expr):
        return obj(env)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_fill(o, env) for o in obj)
    if isinstance(obj, dict):
        return {k: _fill(v, env) for k, v in obj.items()}
    if isinstance(obj, slice):
        return slice(_fill(obj.start, env), _fill(obj.stop, env), _fill(obj.step, env))
    return obj


def _refs(obj: Any, out: list[int]) -> list[int]:
    if isinstance(obj, _Ref):
        if obj.vid not in out:
            out.append(obj.vid)
    elif isinstance(obj, _Expr):
        _refs(obj.args, out)
        _refs(obj.kwargs, out)
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            _refs(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _refs(o, out)
    elif isinstance(obj, slice):
        _refs((obj.start, obj.stop, obj.step), out)
    return out


def _target(node: torch.fx.Node) -> Callable[..., Any]:
    """The callable of a call_function / call_method node, in-place forms made out of place."""
    if node.op == "call_function":
        fn = node.target
        return _OUT_OF_PLACE.get(fn, fn)  # type: ignore[arg-type,return-value]
    name = str(node.target)
    if name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name[:-1]):
        name = name[:-1]

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, name)(*args, **kwargs)

    method.__name__ = name
    return method


def _is_random(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target) in _RANDOM_METHODS
    if node.op != "call_function":
        return False
    target = node.target
    # torchvision's stochastic depth is an fx leaf function (torch.fx.wrap): known by name, so
    # that importing ocnopt does not import torchvision
    return target in _RANDOM_FUNCTIONS or (
        getattr(target, "__name__", "") == "stochastic_depth"
        and str(getattr(target, "__module__", "")).startswith("torchvision"))


def _is_static(node: torch.fx.Node) -> bool:
    if node.op == "call_method" and node.target in _STATIC_METHODS:
        return True
    if node.op == "call_function" and node.target in (getattr, builtins.getattr):
        return len(node.args) > 1 and node.args[1] in _STATIC_ATTRS
    return node.op == "call_function" and node.target is builtins.len


def _trace(model: nn.Module, leaf_modules: tuple[type[nn.Module], ...]) -> Graph:
    name = type(model).__name__
    try:
        fx_graph = _Tracer(leaf_modules).trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError, ...
        where = _user_frame(err)
        raise GraphError(
            f"model {name} cannot be traced by torch.fx ({type(err).__name__}: {err})"
            f"{' at ' + where if where else ''}. ocnopt needs the network as a static graph "
            "of layer calls and tensor operations: move data-dependent control flow (if/for on "
            "tensor values) out of forward(), or make the module that contains it one step "
            "with OCNOpt(model, leaf_modules=(ThatModule,)) (it then runs as it is and is "
            "differentiated as a whole)") from err
    fx_graph = torch.fx.GraphModule(model, fx_graph).graph  # the purity check needs a module
    fx_graph.eliminate_dead_code()
    nodes = list(fx_graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # args hold a default value
    if len(required) != 1:
        raise GraphError(f"model {name}.forward takes {len(required)} tensor inputs "
                         f"({', '.join(n.name for n in required)}); OCNOpt.step(inputs, targets) "
                         "passes one: wrap the model so that forward takes one tensor")
    users: dict[torch.fx.Node, list[torch.fx.Node]] = {n: list(n.users) for n in nodes}
    kind: dict[torch.fx.Node, str] = {}   # "input", "const", "inline", "step"
    value: dict[torch.fx.Node, Any] = {}  # input/step: _Ref; const: the object; inline: _Expr
    stages: list[Stage] = []
    modules = dict(model.named_modules())

    def arg_of(obj: Any) -> Any:
        return torch.fx.node.map_aggregate(
            obj, lambda a: value[a] if isinstance(a, torch.fx.Node) else a)

    def inputs_dependent(node: torch.fx.Node) -> bool:
        return any(kind[a] in ("input", "step") or (kind[a] == "inline" and dependent[a])
                   for a in node.all_input_nodes)

    dependent: dict[torch.fx.Node, bool] = {}
    random: dict[torch.fx.Node, bool] = {}  # the node, or an inline node it evaluates, draws
    static: dict[torch.fx.Node, bool] = {}  # shape arithmetic (evaluated inside its users)
    output_node: torch.fx.Node | None = None
    for node in nodes:
        if node.op == "placeholder":
            if node is required[0]:
                kind[node], value[node] = "input", _Ref(0)
            else:
                kind[node], value[node] = "const", node.args[0]
            continue
        if node.op == "get_attr":
            obj = model
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            if isinstance(obj, nn.Parameter) and obj.requires_grad:
                raise GraphError(
                    f"model {name}.forward uses the parameter '{node.target}' directly, outside "
                    "a call of the module that owns it; ocnopt needs every parameter to be the "
                    "control of a step: move it into a small module of its own (a module that "
                    "owns parameters is one step) or name the owner in OCNOpt(..., leaf_modules=)")
            kind[node], value[node] = "const", obj
            continue
        if node.op == "output":
            output_node = node
            continue
        where = f"node {node.name} (model.{node.target})" if node.op == "call_module" \
            else f"node {node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"
        if node.op == "call_module":
            module = modules[str(node.target)]
            tensors = [a for a in node.all_input_nodes if kind[a] in ("input", "step")]
            if node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], torch.fx.Node) \
                    or kind[node.args[0]] not in ("input", "step"):
                raise GraphError(
                    f"module {type(module).__name__} at {where} is called with "
                    f"{len(node.args)} positional and {len(node.kwargs)} keyword arguments "
                    f"({len(tensors)} tensors): a module step takes exactly one tensor; "
                    "wrap the call in a module of its own and name its class in leaf_modules")
            if users[node] and all(u.op == "call_function" and u.target is operator.getitem
                                   for u in users[node]):
                raise GraphError(f"module {type(module).__name__} at {where} returns a tuple: a "
                                 "step must return one tensor")
            handler = handler_for(module, where, leaf=isinstance(module, leaf_modules))
            names, params = module_params(module)
            t = len(stages)
            stages.append(Stage(t, str(node.target), module, handler, names, params,
                                inputs=(value[node.args[0]].vid,), output=t + 1))
            kind[node], value[node] = "step", _Ref(t + 1)
            continue
        # call_function / call_method
        fn = _target(node)
        args, kwargs = arg_of(node.args), dict(arg_of(dict(node.kwargs)))
        if kwargs.get("inplace") is True:
            kwargs["inplace"] = False
        expr = _Expr(fn, args, kwargs)
        tuple_producer = bool(users[node]) and all(
            u.op == "call_function" and u.target is operator.getitem for u in users[node])
        dependent[node] = inputs_dependent(node)
        random[node] = _is_random(node) or any(
            random.get(a, False) for a in node.all_input_nodes if kind[a] == "inline")
        # shape arithmetic: a static node, or a call on static nodes and constants only
        static[node] = _is_static(node) or (bool(node.all_input_nodes) and not random[node] and all(
            kind[a] == "const" or static.get(a, False) for a in node.all_input_nodes))
        if static[node] or not dependent[node] or tuple_producer:
            kind[node], value[node] = "inline", expr
            continue
        inputs = tuple(_refs((args, kwargs), []))
        label = getattr(fn, "__name__", str(node.target))

        def call(xs: tuple[Tensor, ...], ctx: Any, _expr: _Expr = expr,
                 _inputs: tuple[int, ...] = inputs) -> Tensor:
            return _expr(dict(zip(_inputs, xs)))

        t = len(stages)
        stages.append(Stage(t, node.name, FunctionStep(call, label),
                            FunctionDerivatives(call, label, random=random[node]),
                            inputs=inputs, output=t + 1))
        kind[node], value[node] = "step", _Ref(t + 1)
    assert output_node is not None
    out = output_node.args[0]
    if not isinstance(out, torch.fx.Node) or kind.get(out) != "step":
        raise GraphError(f"model {name}.forward must return one tensor computed from its input "
                         f"(got {type(out).__name__}): return the network output only")
    if value[out].vid != len(stages):
        raise GraphError(f"model {name}: the output is not the last operation of forward() "
                         "after unused operations are removed; ocnopt cannot order its steps")
    return _finish(stages, model, chain=False)


__all__ = ["Graph", "GraphError", "build_graph", "handler_for"]
