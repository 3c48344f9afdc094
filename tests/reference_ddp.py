"""Dense second-order DDP on the augmented chain of a traced network: the test oracle of the
graph identity (docs/method.md, "Networks as graphs" and the identities of the test suite).

Written from the method alone, with plain ``torch.fx`` and ``torch.func``; it shares no code
with the library's engine, backends, curvature models or losses. Small nets only (B <= 3, a
few dozen units): every per-sample matrix is dense and every derivative is a ``jacrev`` or a
``hessian`` of one sample's augmented step map.

The network is ``torch.fx.symbolic_trace(model)``; its compute nodes, in the trace's order,
are the steps t = 0..T-1, node t computing z_t = f_t(a_t, u_t) from its tensor arguments a_t
and its own parameters u_t (empty for add, cat, activations, flatten, pooling). The augmented
state X_t is the tuple of tensors produced before step t (the network input included, unless
``include_input=False``) that are read at step t or later (the output node reads at step T);
blocks are ordered by their producer's position in the graph, and X_t is flattened per sample
into one vector. One step maps X_t to X_{t+1}: carried blocks pass through (identity), z_t is
appended, blocks last read at t are dropped. X_T is the network output alone.

Per sample i (not divided by B), with V' the value at X_{t+1}:

    Q_X = F_X^T V'_X,                       Q_XX = F_X^T V'_XX F_X [+ <V'_X, F>_XX]
    Q_uX = F_u^T V'_XX F_X [+ <V'_X, F>_uX], Q_uu^(i) = F_u^T V'_XX F_u [+ <V'_X, F>_uu]
    Qbar_u = wd u + (1/B) sum_i F_u^T V'_X,  Qbar_uu = wd I + (1/B) sum_i Q_uu^(i)

(the bracketed contraction terms only when ``gauss_newton=False``). Curvature "full":
M = sym(Qbar_uu) + damping I if that is positive definite, else the symmetric matrix with
eigenvalues max(|lambda|, max(damping, eig_floor max|lambda|)). Policy and value:

    k = -lr M^{-1} Qbar_u,          K dX = -lr M^{-1} (1/B) sum_i Q_uX^(i) dX^(i)
    V_X = Q_X - lr Q_uX^T M^{-1} Qbar_u,   V_XX = Q_XX - (lr/B) Q_uX^T M^{-1} Q_uX  (PSD clip)

Predicted change: sum over players of k . Qbar_u + 1/2 k^T Qbar_uu k. The update pass replays
the graph in the same order; before step t, u_t <- u_t + k_t + K_t dX_t with dX_t = Xhat_t -
Xbar_t blockwise. ``game="nash"``: player n's feedback sees dX with zeros in the blocks that
depend on a player simultaneous with n (neither is an ancestor of the other); a block depends
on player m when m produced it or is an ancestor of its producer. The value recursion is the
same in both games.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call, hessian, jacrev

SUPPORTED_MODULES = (nn.Linear, nn.Conv2d, nn.ReLU, nn.Tanh, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AvgPool2d)
SUPPORTED_FUNCTIONS = (operator.add, operator.mul, torch.add, torch.mul, torch.cat, torch.flatten,
                       torch.relu, torch.tanh, F.relu)
SUPPORTED_METHODS = ("flatten", "view", "reshape", "relu", "tanh")


@dataclass
class Step:
    """One compute node of the trace: its position, node, parameters (name -> tensor, the
    model's names) and the live blocks before (``blocks_in``) and after (``blocks_out``)."""

    index: int
    node: fx.Node
    params: dict[str, Tensor]
    blocks_in: list[fx.Node] = field(default_factory=list)
    blocks_out: list[fx.Node] = field(default_factory=list)


def _check_node(gm: fx.GraphModule, node: fx.Node) -> None:
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, SUPPORTED_MODULES):
            raise TypeError(f"reference DDP: unsupported module {type(mod).__name__} at node "
                            f"{node.name!r}; supported {[m.__name__ for m in SUPPORTED_MODULES]}")
    elif node.op == "call_function":
        if node.target not in SUPPORTED_FUNCTIONS:
            raise TypeError(f"reference DDP: unsupported function {node.target} at node {node.name!r}")
    elif node.op == "call_method":
        if node.target not in SUPPORTED_METHODS:
            raise TypeError(f"reference DDP: unsupported method {node.target!r} at node {node.name!r}")
    elif node.op not in ("placeholder", "output"):
        raise TypeError(f"reference DDP: unsupported node op {node.op!r} at node {node.name!r}")


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def build_steps(model: nn.Module, *, include_input: bool = True
                ) -> tuple[fx.GraphModule, fx.Node, list[Step], fx.Node]:
    """Trace ``model`` and lay out the augmented chain: (graph module, input node, steps,
    output tensor node)."""
    gm = fx.symbolic_trace(model)
    nodes = list(gm.graph.nodes)
    for node in nodes:
        _check_node(gm, node)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise TypeError(f"reference DDP: the model must take one tensor input, got {len(placeholders)}")
    out_node = next(n for n in nodes if n.op == "output")
    (result,) = out_node.args
    if not isinstance(result, fx.Node):
        raise TypeError("reference DDP: the model must return one tensor")
    compute = [n for n in nodes if n.op not in ("placeholder", "output")]
    position = {n: i for i, n in enumerate(nodes)}
    step_of = {n: t for t, n in enumerate(compute)}
    T = len(compute)
    # last step reading each tensor (the output node reads at step T)
    last_read: dict[fx.Node, int] = {}
    for n in compute:
        for a in _tensor_inputs(n):
            last_read[a] = max(last_read.get(a, -1), step_of[n])
    last_read[result] = T
    produced_at = {placeholders[0]: -1, **step_of}

    def live(t: int) -> list[fx.Node]:
        blocks = [n for n in last_read if produced_at[n] < t <= last_read[n]]
        if not include_input:
            blocks = [n for n in blocks if n.op != "placeholder"]
        return sorted(blocks, key=position.__getitem__)

    named = dict(model.named_parameters())
    seen: dict[int, str] = {}
    steps = []
    for t, n in enumerate(compute):
        params: dict[str, Tensor] = {}
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if id(mod) in seen and any(True for _ in mod.parameters()):
                raise ValueError(f"reference DDP: module {n.target!r} is called twice")
            seen[id(mod)] = n.target
            params = {f"{n.target}.{k}": v for k, v in mod.named_parameters()}
            for k in params:
                if k not in named:
                    raise ValueError(f"reference DDP: parameter {k!r} is not a model parameter")
        steps.append(Step(t, n, params, live(t), live(t + 1)))
    if steps[-1].blocks_out != [result]:
        raise ValueError("reference DDP: a tensor other than the output is live at the end")
    return gm, placeholders[0], steps, result


def run_node(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, Tensor],
             params: dict[str, Tensor] | None = None) -> Tensor:
    """Evaluate ``node`` on the values ``env`` with ``params`` (full names) for its module."""
    args = fx.node.map_arg(node.args, lambda a: env[a])
    kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if params:
            local = {k[len(node.target) + 1:]: v for k, v in params.items()}
            return functional_call(mod, local, tuple(args), dict(kwargs))
        return mod(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    raise TypeError(f"reference DDP: cannot run node {node.name!r} ({node.op})")


def phi(out: Tensor, y: Tensor, loss: str) -> Tensor:
    """Per-sample loss of one sample (out: the flattened output, y: its target)."""
    if loss == "cross_entropy":
        return -torch.log_softmax(out, dim=0)[y]
    if loss == "mse":
        return (out - y.reshape(-1)).square().mean()
    raise ValueError(f"invalid loss={loss!r}: accepted 'cross_entropy' or 'mse'")


def floored_solve(Quu: Tensor, damping: float, eig_floor: float) -> Tensor:
    """M^{-1}: M = sym(Quu) + damping I (Cholesky), else |eigenvalues| floored at
    max(damping, eig_floor max|lambda|)."""
    m = Quu.shape[0]
    M = 0.5 * (Quu + Quu.T) + damping * torch.eye(m, dtype=Quu.dtype)
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return torch.cholesky_inverse(L)
    lam, vec = torch.linalg.eigh(M)
    floor = max(damping, eig_floor * float(lam.abs().max()), torch.finfo(lam.dtype).tiny)
    lam = lam.abs().clamp_min(floor)
    return (vec / lam) @ vec.T


def psd_project(V: Tensor) -> Tensor:
    """Symmetrise, then set negative eigenvalues to 0."""
    V = 0.5 * (V + V.T)
    lam, vec = torch.linalg.eigh(V)
    if bool((lam >= 0).all()):
        return V
    return (vec * lam.clamp_min(0)) @ vec.T


def contraction_hessian(g: Callable[[Tensor, Tensor], Tensor], v: Tensor, X: Tensor, u: Tensor
                        ) -> Tensor:
    """Hessian of psi(X, u) = <v, g(X, u)> w.r.t. (X, u) stacked: ((nX + m) x (nX + m))."""
    nX = X.numel()

    def psi(Xu: Tensor) -> Tensor:
        return v @ g(Xu[:nX], Xu[nX:])

    return hessian(psi)(torch.cat([X, u]))


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        a = stack.pop()
        if a not in seen:
            seen.add(a)
            stack.extend(a.all_input_nodes)
    return seen


def nash_masks(steps: list[Step]) -> dict[int, list[bool]]:
    """Per player step t: for each block of X_t, whether its feedback sees it (False: the block
    depends on a player simultaneous with player t)."""
    anc = {s.node: _ancestors(s.node) for s in steps}
    players = [s.node for s in steps if s.params]
    masks = {}
    for s in steps:
        if not s.params:
            continue
        n = s.node
        simultaneous = {m for m in players if m is not n and m not in anc[n] and n not in anc[m]}
        keep = []
        for b in s.blocks_in:
            depends = ({b} | anc.get(b, set())) & simultaneous if b.op != "placeholder" else set()
            keep.append(not depends)
        masks[s.index] = keep
    return masks


def dense_ddp_step(model: nn.Module, x: Tensor, y: Tensor, *, loss: str = "cross_entropy", lr: float,
                   damping: float, weight_decay: float = 0.0, gauss_newton: bool = True,
                   game: str = "cooperative", feedback: bool = True, value_correction: bool = True,
                   psd_clip: bool = True, eig_floor: float = 1e-6, include_input: bool = True
                   ) -> tuple[dict[str, Tensor], float, float]:
    """One second-order DDP step (curvature "full", no trust bound) on the augmented chain of
    ``model`` for the batch (x, y). Returns (new parameters by name, predicted change, loss
    after the step). ``model`` is not modified."""
    if game not in ("cooperative", "nash"):
        raise ValueError(f"invalid game={game!r}: accepted 'cooperative' or 'nash'")
    gm, inp, steps, result = build_steps(model, include_input=include_input)
    B = x.shape[0]
    # nominal pass (the whole batch), then per-sample values of every tensor
    with torch.no_grad():
        env: dict[fx.Node, Tensor] = {inp: x}
        for s in steps:
            env[s.node] = run_node(gm, s.node, env)

    def flat_blocks(values: dict[fx.Node, Tensor], blocks: list[fx.Node], i: int) -> Tensor:
        parts = [values[b][i].reshape(-1) for b in blocks]
        return torch.cat(parts) if parts else x.new_zeros(0)

    def step_map(s: Step, shapes: dict[fx.Node, torch.Size], i: int):
        """The augmented step X_t -> X_{t+1} of sample i, flattened: g(X, u) (the network
        input, when it is not a block, is the constant x^(i))."""
        names = list(s.params)
        sizes = [s.params[k].numel() for k in names]
        in_sizes = [shapes[b].numel() for b in s.blocks_in]

        def g(X: Tensor, u: Tensor) -> Tensor:
            blocks = dict(zip(s.blocks_in, X.split(in_sizes)))
            local = {inp: x[i:i + 1], **{b: v.reshape(1, *shapes[b]) for b, v in blocks.items()}}
            params = {k: c.reshape(s.params[k].shape) for k, c in zip(names, u.split(sizes))}
            z = run_node(gm, s.node, local, params)
            local[s.node] = z
            return torch.cat([local[b].reshape(-1) for b in s.blocks_out])

        return g

    shapes = {n: v.shape[1:] for n, v in env.items()}
    masks = nash_masks(steps) if game == "nash" else {}
    # terminal value, per sample (not divided by B)
    V = [torch.func.grad(phi)(env[result][i].reshape(-1), y[i], loss) for i in range(B)]
    VV = [hessian(phi)(env[result][i].reshape(-1), y[i], loss) for i in range(B)]
    policies: dict[int, tuple[Tensor, list[Tensor], Tensor]] = {}  # t -> (k, Q_uX^(i), M^-1)
    predicted = 0.0
    for s in reversed(steps):
        u = (torch.cat([p.detach().reshape(-1) for p in s.params.values()]) if s.params
             else x.new_zeros(0))
        m, nX = u.numel(), sum(shapes[b].numel() for b in s.blocks_in)
        Q_X, Q_XX, Q_uX, Q_uu, Q_u = [], [], [], [], []
        for i in range(B):
            g = step_map(s, shapes, i)
            X = flat_blocks(env, s.blocks_in, i)
            F_X, F_u = jacrev(g, argnums=(0, 1))(X, u)
            Q_X.append(F_X.T @ V[i])
            Q_XX.append(F_X.T @ VV[i] @ F_X)
            Q_uX.append(F_u.T @ VV[i] @ F_X)
            Q_uu.append(F_u.T @ VV[i] @ F_u)
            Q_u.append(F_u.T @ V[i])
            if not gauss_newton:  # contraction terms: the Hessian of psi = <V'_X, g(X, u)>
                H = contraction_hessian(g, V[i], X, u)
                Q_XX[-1] = Q_XX[-1] + H[:nX, :nX]
                Q_uX[-1] = Q_uX[-1] + H[nX:, :nX]
                Q_uu[-1] = Q_uu[-1] + H[nX:, nX:]
        V_new, VV_new = Q_X, Q_XX
        if s.params:
            Qbar_u = weight_decay * u + torch.stack(Q_u).mean(0)
            Qbar_uu = weight_decay * torch.eye(m, dtype=u.dtype) + torch.stack(Q_uu).mean(0)
            Minv = floored_solve(Qbar_uu, damping, eig_floor)
            k = -lr * Minv @ Qbar_u
            predicted += float(k @ Qbar_u + 0.5 * k @ Qbar_uu @ k)
            policies[s.index] = (k, Q_uX, Minv)
            if value_correction:
                V_new = [Q_X[i] - lr * Q_uX[i].T @ (Minv @ Qbar_u) for i in range(B)]
                VV_new = [Q_XX[i] - (lr / B) * Q_uX[i].T @ Minv @ Q_uX[i] for i in range(B)]
        V = V_new
        VV = [psd_project(v) for v in VV_new] if psd_clip else VV_new
    # update pass: replay in the same order with du_t = k_t + K_t dX_t
    new_params = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        hat: dict[fx.Node, Tensor] = {inp: x}
        for s in steps:
            if s.params:
                k, Q_uX, Minv = policies[s.index]
                du = k.clone()
                if feedback:
                    keep = masks.get(s.index, [True] * len(s.blocks_in))
                    s_sum = torch.zeros_like(k)
                    for i in range(B):
                        parts = [(hat[b][i] - env[b][i]).reshape(-1) * float(kb)
                                 for b, kb in zip(s.blocks_in, keep)]
                        dX = torch.cat(parts) if parts else x.new_zeros(0)
                        s_sum = s_sum + Q_uX[i] @ dX
                    du = du - lr * Minv @ (s_sum / B)
                offset = 0
                for name, p in s.params.items():
                    new_params[name] = p.detach() + du[offset:offset + p.numel()].reshape(p.shape)
                    offset += p.numel()
            hat[s.node] = run_node(gm, s.node, hat, {k: new_params[k] for k in s.params})
        out = hat[result]
        loss_after = float(torch.stack([phi(out[i].reshape(-1), y[i], loss) for i in range(B)]).mean())
    return new_params, predicted, loss_after
