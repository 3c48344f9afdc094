"""Graphs as augmented-state chains (docs/method.md section 7): identities 9 and 10, the games,
lowrank = exact Gauss-Newton on graphs, tied parameters, torchvision models, the graph's
bookkeeping (live states, players, the blocks nash ignores)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _chains import mlp_chains
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ocnopt
from ocnopt.graph import build_graph

SETTINGS = settings(max_examples=10, deadline=None)
REL = dict(rtol=1e-10, atol=1e-12)
# a bias in front of a normalisation has a zero gradient up to rounding, and the fork rule adds
# value derivatives in another order than autograd: Adam and RMSprop divide that rounding noise
# by sqrt(v) + eps, which moves such a parameter by up to lr * noise / eps (~1e-11 here)
NORM_REL = dict(rtol=1e-10, atol=1e-10)
# a gradient at most this large (float64) is rounding noise of a structurally zero gradient
DEAD = 1e-12


# ---- models ------------------------------------------------------------------------------------
class Wrapped(nn.Module):
    """A chain given as a module with its own forward (traced by torch.fx, not a Sequential)."""

    def __init__(self, layers: nn.Sequential):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class RandomDAG(nn.Module):
    """A random residual / multi-branch network on vectors: each block is one of
    residual (h + W2 tanh(W1 h)), branch-cat (W3 cat(W1 h, tanh(W2 h))), norm (LayerNorm h or
    BatchNorm1d tanh(h)), long skip (h + P e, e an earlier block's output) or a product merge
    (h * sigmoid(W h))."""

    def __init__(self, kinds: list[str], width: int, d_in: int, classes: int):
        super().__init__()
        self.kinds = kinds
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList()
        for kind in kinds:
            if kind == "residual":
                self.blocks.append(nn.Sequential(nn.Linear(width, width), nn.Tanh(),
                                                 nn.Linear(width, width)))
            elif kind == "cat":
                self.blocks.append(nn.ModuleList([nn.Linear(width, 2), nn.Linear(width, 3),
                                                  nn.Linear(5, width)]))
            elif kind == "layernorm":
                self.blocks.append(nn.LayerNorm(width))
            elif kind == "batchnorm":
                self.blocks.append(nn.BatchNorm1d(width))
            elif kind == "skip":
                self.blocks.append(nn.Linear(width, width, bias=False))
            else:  # "gate"
                self.blocks.append(nn.Linear(width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        first = h
        for kind, block in zip(self.kinds, self.blocks):
            if kind == "residual":
                h = h + block(h)
            elif kind == "cat":
                h = block[2](torch.cat([block[0](h), torch.tanh(block[1](h))], dim=1))
            elif kind == "layernorm":
                h = block(h)
            elif kind == "batchnorm":  # a bias added right before BatchNorm has gradient 0
                h = block(torch.tanh(h))
            elif kind == "skip":
                h = F.relu(h) + block(first)
            else:
                h = h * torch.sigmoid(block(h))
        return self.head(h)


@st.composite
def dags(draw):
    kinds = draw(st.lists(st.sampled_from(["residual", "cat", "layernorm", "batchnorm", "skip",
                                           "gate"]), min_size=1, max_size=4))
    width = draw(st.integers(2, 5))
    d_in = draw(st.integers(1, 4))
    classes = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**16))

    def build():
        torch.manual_seed(seed)
        return RandomDAG(kinds, width, d_in, classes).double()

    return d_in, classes, build


class ConvResNet(nn.Module):
    """A small conv ResNet: stem, a block with identity skip, a block with a strided 1x1
    projection shortcut (simultaneous with the block's convolutions), pool, head."""

    def __init__(self, bn: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.c1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3) if bn else nn.Identity()
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(3, 4, 1, stride=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.bn1(self.c1(h)))
        h = F.relu(self.c2(h) + self.proj(h))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class ModuleResNet(nn.Module):
    """A residual conv net written with modules only (nn.ReLU, nn.AvgPool2d, nn.Flatten), the
    form BackPACK's graph converter handles (it turns ``+`` into its SumModule)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.act0 = nn.ReLU()
        self.c1 = nn.Conv2d(3, 3, 3, padding=1)
        self.act1 = nn.Tanh()
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.AvgPool2d(6)
        self.flat = nn.Flatten()
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = self.act0(self.stem(x))
        h = h + self.c2(self.act1(self.c1(h)))
        return self.head(self.flat(self.pool(h)))


class Inception(nn.Module):
    """Two parallel branches merged by cat: the branches' layers are simultaneous players."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(3, 4)
        self.a = nn.Linear(4, 3)
        self.b1 = nn.Linear(4, 3)
        self.b2 = nn.Linear(3, 2)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        return self.head(torch.cat([torch.tanh(self.a(h)), self.b2(torch.tanh(self.b1(h)))], 1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(3, 4)
        self.f1 = nn.Linear(4, 4)
        self.f2 = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        return self.head(h + self.f2(torch.tanh(self.f1(h))))


def batch(d_in, classes, B, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *(shape or (d_in,)), generator=g, dtype=torch.float64)
    return x, torch.randint(0, classes, (B,), generator=g)


# ---- identity 9: a chain traced as a graph gives bit-identical steps ----------------------------
def chains():
    """Random Linear chains with Tanh/ReLU/Sigmoid, at least two outputs (tests/_chains.py)."""
    return mlp_chains(acts=[nn.Tanh, nn.ReLU, nn.Sigmoid], min_out=2)


ORDER_BACKENDS = [(1, "autograd"), (1, "lowrank"), (1, "backpack"), (2, "autograd"),
                  (2, "lowrank"), (2, "backpack")]


@SETTINGS
@given(chains(), st.integers(1, 5), st.sampled_from(ORDER_BACKENDS),
       st.sampled_from([("adam", {}), ("kfac", {"damping": 0.5}), ("sgd", {"momentum": 0.9})]))
def test_chain_traced_as_a_graph_gives_bit_identical_steps(chain, B, order_backend, curv):
    """Identity 9: nn.Sequential and the same layers in a module with its own forward."""
    widths, build = chain
    order, backend = order_backend
    name, hp = curv
    seq = build()
    wrapped = Wrapped(build())
    assert build_graph(seq).chain and not build_graph(wrapped).chain
    opts = [ocnopt.OCNOpt(m, curvature=name, lr=0.05, order=order, backend=backend,
                          track_loss_after=True, **hp) for m in (seq, wrapped)]
    for s in range(3):
        x, y = batch(widths[0], widths[-1], B, seed=s)
        losses = [float(o.step(x, y)) for o in opts]
        assert losses[0] == losses[1]
        assert opts[0].last_step.loss_after == opts[1].last_step.loss_after
        assert opts[0].last_step.predicted_change == opts[1].last_step.predicted_change
    for p, q in zip(seq.parameters(), wrapped.parameters()):
        assert torch.equal(p, q)


# ---- identity 10: graphs at order 1 are backprop + the base optimizer ---------------------------
TORCH_TWINS = [
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
     lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adam", {"weight_decay": 0.01},
     lambda ps, lr: torch.optim.Adam(ps, lr=lr, weight_decay=0.01)),
    ("rmsprop", {"alpha": 0.9, "momentum": 0.5},
     lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, alpha=0.9, momentum=0.5)),
]


def _torch_steps(model, make_opt, lr, batches):
    """torch.optim's steps on ``batches``; returns per parameter the largest |gradient| seen."""
    opt = make_opt(list(model.parameters()), lr)
    largest = [0.0] * len(list(model.parameters()))
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        largest = [max(m, float(p.grad.abs().max())) for m, p in zip(largest, model.parameters())]
        opt.step()
    return largest


@SETTINGS
@given(dags(), st.integers(2, 5), st.sampled_from(TORCH_TWINS), st.sampled_from(["autograd", "lowrank"]))
def test_random_graph_order_one_equals_torch_optim(dag, B, twin, backend):
    """Identity 10: residual skips, branches merged by add, cat and product, BatchNorm and
    LayerNorm: three steps equal torch.optim's on the same model (float64, 1e-10)."""
    d_in, classes, build = dag
    name, hp, make = twin
    ours, ref = build(), build()
    opt = ocnopt.OCNOpt(ours, curvature=name, lr=0.01, backend=backend, **hp)
    batches = [batch(d_in, classes, B, seed=s) for s in range(3)]
    for x, y in batches:
        opt.step(x, y)
    largest = _torch_steps(ref, make, 0.01, batches)
    for (n, p), q, g in zip(ours.named_parameters(), ref.parameters(), largest):
        # a parameter whose gradient is zero up to rounding (a bias or BatchNorm shift just
        # before a normalisation) moves by rounding noise / (sqrt(v) + eps) under Adam and
        # RMSprop, in both implementations differently: only bounded by its largest move
        # (and ocnopt's gradient of the last step, in .grad, is zero up to rounding there too)
        tol = NORM_REL if g > DEAD else dict(rtol=0.0, atol=len(batches) * 0.01 * 1.01)
        torch.testing.assert_close(p, q, **tol, msg=lambda m, n=n: f"{n}: {m}")
        assert g > DEAD or float(p.grad.abs().max()) <= 100 * DEAD, n
    for a, b in zip(ours.buffers(), ref.buffers()):  # BatchNorm's running statistics
        torch.testing.assert_close(a.double(), b.double(), **REL)


def _node_outputs(model, x):
    """Every call_module / call_function output of the fx trace, in order, with its gradient
    kept (an independent record of the graph's tensors)."""
    gm = torch.fx.symbolic_trace(model)
    outs = []

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op in ("call_module", "call_function", "call_method") and isinstance(out, torch.Tensor):
                out.retain_grad()
                outs.append(out)
            return out

    x = x.clone().requires_grad_(True)
    y = Recorder(gm).run(x)
    return x, outs, y


@SETTINGS
@given(dags(), st.integers(2, 5))
def test_value_blocks_are_batch_times_autograd_gradients(dag, B):
    """Identity 10: V_X block of every tensor = B x autograd's gradient of the mean loss."""
    d_in, classes, build = dag
    model = build()
    x, y = batch(d_in, classes, B)
    opt = ocnopt.OCNOpt(copy.deepcopy(model), curvature="sgd")
    eng = opt.engine
    traj = eng.nominal(x, input_value=True)
    exps, values = eng.expand(traj, eng.terminal(traj, y), need_stats=[False] * len(eng.stages),
                              keep_values=True)
    xin, outs, out = _node_outputs(model, x)
    F.cross_entropy(out, y).backward()
    assert len(outs) == len(eng.stages)
    torch.testing.assert_close(values[0], B * xin.grad, **REL)
    for j, o in enumerate(outs, start=1):
        torch.testing.assert_close(values[j], B * o.grad, **REL, msg=lambda m, j=j: f"value {j}: {m}")


def test_conv_resnet_order_one_equals_torch_optim_every_backend():
    """BackPACK's KFLR has no BatchNorm handler and its graph converter handles module calls
    only: the backpack backend refuses those by name and runs a residual net of modules
    through BackPACK's graph converter."""
    x, y = batch(0, 3, 4, shape=(1, 6, 6))
    with pytest.raises(TypeError, match="backend 'backpack': module BatchNorm2d .*model.bn1"):
        ocnopt.OCNOpt(ConvResNet().double(), backend="backpack")
    with pytest.raises(TypeError, match="BackPACK's graph converter cannot convert model ConvResNet"):
        ocnopt.OCNOpt(ConvResNet(bn=False).double(), backend="backpack")
    for backend in ("autograd", "lowrank", "backpack"):
        model = (ConvResNet() if backend != "backpack" else ModuleResNet()).double()
        ours, ref = copy.deepcopy(model), copy.deepcopy(model)
        opt = ocnopt.OCNOpt(ours, curvature="adam", lr=0.01, backend=backend)
        for _ in range(3):
            opt.step(x, y)
        _torch_steps(ref, lambda ps, lr: torch.optim.Adam(ps, lr=lr), 0.01, [(x, y)] * 3)
        for p, q in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, **NORM_REL)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_order_one_equal_torch_sgd(arch):
    """Identity 10 on torchvision's definitions (no weights): resnet18 (BatchNorm, residual
    blocks with projection shortcuts, in-place ReLU and +=) and mobilenet_v3_small
    (squeeze-excitation products, Hardswish, adaptive pooling, dropout set to 0)."""
    import torchvision

    torch.manual_seed(0)
    kw = {"dropout": 0.0} if arch == "mobilenet_v3_small" else {}
    model = getattr(torchvision.models, arch)(num_classes=3, **kw).double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1])
    ours, ref = copy.deepcopy(model), copy.deepcopy(model)
    opt = ocnopt.OCNOpt(ours, curvature="sgd", lr=0.05, momentum=0.9)
    for _ in range(2):
        opt.step(x, y)
    _torch_steps(ref, lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9), 0.05, [(x, y)] * 2)
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=lambda m, n=n: f"{n}: {m}")
    for a, b in zip(ours.buffers(), ref.buffers()):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-9, atol=1e-11)


# ---- tied parameters -------------------------------------------------------------------------
class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.first = nn.Linear(3, 4)
        self.out = nn.Linear(4, 3)
        self.back = nn.Linear(4, 3, bias=False)
        self.back.weight = self.out.weight  # tied across two modules

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.shared(torch.tanh(self.first(x))))))
        return self.out(h) + self.back(h * h)


@pytest.mark.parametrize("curv, make", [
    ("adam", lambda ps, lr: torch.optim.Adam(ps, lr=lr)),
    ("sgd", lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9)),
])
def test_tied_parameters_order_one_sum_the_gradient_over_uses(curv, make):
    torch.manual_seed(0)
    model = Tied().double()
    ours, ref = copy.deepcopy(model), copy.deepcopy(model)
    opt = ocnopt.OCNOpt(ours, curvature=curv, lr=0.05, **({"momentum": 0.9} if curv == "sgd" else {}))
    batches = [batch(3, 3, 5, seed=s) for s in range(3)]
    for x, y in batches:
        opt.step(x, y)
    _torch_steps(ref, make, 0.05, batches)
    assert ours.out.weight is ours.back.weight
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **REL, msg=lambda m, n=n: f"{n}: {m}")
    # one optimizer state per tensor, not per use
    assert len([p for p in opt.state if p != "ocnopt"]) == len(list(ours.parameters()))


# ---- games -------------------------------------------------------------------------------------
def test_players_and_the_blocks_nash_ignores():
    g = build_graph(Inception())
    names = [st.name for st in g.stages]
    idx = {n: names.index(n) for n in ("stem", "a", "b1", "b2", "head")}
    assert g.simultaneous(idx["a"], idx["b1"]) and g.simultaneous(idx["a"], idx["b2"])
    assert not g.simultaneous(idx["b1"], idx["b2"]) and not g.simultaneous(idx["stem"], idx["a"])
    # b1 runs after a's branch: its state carries tanh(a(h)), which depends on player a
    tanh_a = g.stages[idx["a"] + 1].output
    assert tanh_a in g.live[idx["b1"]] and g.nash_ignored[idx["b1"]] == frozenset({tanh_a})
    assert g.nash_ignored[idx["a"]] == frozenset() and g.nash_ignored[idx["head"]] == frozenset()
    chain = build_graph(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)))
    assert all(not s for s in chain.nash_ignored)
    assert chain.live == [(0,), (1,), (2,)]


@pytest.mark.parametrize("backend", ["autograd", "lowrank"])
def test_nash_equals_cooperative_without_simultaneous_players(backend):
    x, y = batch(3, 3, 4)
    runs = []
    for game in ("cooperative", "nash"):
        torch.manual_seed(1)
        model = Residual().double()
        opt = ocnopt.OCNOpt(model, curvature="adam", lr=0.05, order=2, backend=backend, game=game)
        for _ in range(3):
            opt.step(x, y)
        runs.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*runs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("backend", ["autograd", "lowrank"])
def test_nash_differs_from_cooperative_by_the_ignored_blocks(backend):
    """On an inception block, nash drops from b1's feedback the carried tanh(a(h)) block:
    the two games differ at b1 and at the players after it, not before it."""
    x, y = batch(3, 3, 4)
    params, diags = [], []
    for game in ("cooperative", "nash"):
        torch.manual_seed(2)
        model = Inception().double()
        opt = ocnopt.OCNOpt(model, curvature="sgd", lr=0.5, order=2, backend=backend, game=game,
                            trust=None)
        opt.step(x, y)
        params.append(dict(model.named_parameters()))
        diags.append({d.name: d.feedback_norm for d in opt.last_step.stages})
    coop, nash = params
    for name in ("stem.weight", "a.weight", "a.bias"):  # before b1: the same
        assert torch.equal(coop[name], nash[name])
    assert not torch.equal(coop["b1.weight"], nash["b1.weight"])
    assert diags[0]["b1"] != diags[1]["b1"]
    assert diags[0]["stem"] == diags[1]["stem"] == 0.0  # dx_0 = 0


@pytest.mark.parametrize("model_fn", [Residual, Inception, ConvResNet], ids=["residual",
                                                                            "inception", "resnet"])
def test_lowrank_exact_factor_equals_exact_gauss_newton_on_graphs(model_fn):
    """Identity 11 (second part): lowrank with the exact terminal factor = the exact GN
    backend on graphs, as on chains (small lr: no clipping, see tests/test_lowrank.py)."""
    shape = (1, 6, 6) if model_fn is ConvResNet else None
    torch.manual_seed(3)
    model = model_fn().double()
    if model_fn is ConvResNet:
        model.bn1.eval()  # per-sample terms treat batch statistics as constants: same in both
    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(curvature="sgd", lr=1e-3, order=2, trust=None)
    exact = ocnopt.OCNOpt(m1, backend="autograd", psd_clip=False, **kw)
    low = ocnopt.OCNOpt(m2, backend="lowrank", backend_options={"terminal": "exact"}, **kw)
    for s in range(2):
        x, y = batch(3, 3, 3, seed=s, shape=shape)
        exact.step(x, y)
        low.step(x, y)
        assert low.last_step.loss_after == pytest.approx(exact.last_step.loss_after, rel=1e-10)
        assert low.last_step.predicted_change == pytest.approx(
            exact.last_step.predicted_change, rel=1e-8, abs=1e-14)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, **REL)


def test_per_player_diagnostics_name_every_player():
    torch.manual_seed(0)
    opt = ocnopt.OCNOpt(Inception().double(), curvature="adam", lr=0.05, order=2, backend="lowrank")
    opt.step(*batch(3, 3, 4))
    diags = opt.last_step.stages
    assert [d.name for d in diags] == ["stem", "a", "b1", "b2", "head"]
    assert all(d.k_norm > 0 for d in diags) and diags[0].feedback_norm == 0.0
    assert all(0 < d.feedback_scale <= 1 for d in diags)
    assert all(d.feedback_norm <= 0.5 * d.k_norm * (1 + 1e-9) for d in diags)  # trust 0.5


class Stochastic(nn.Module):
    """Functional dropout and a stochastic-depth-like mask drawn from a constant shape."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.dropout(torch.tanh(self.a(x)), p=0.5, training=True)
        keep = x.new_empty((x.size(0), 1)).bernoulli_(0.5)  # a stochastic-depth mask
        return self.head(h + keep * self.b(h))


def test_exact_backend_refuses_random_steps_at_order_two():
    torch.manual_seed(0)
    opt = ocnopt.OCNOpt(Stochastic().double(), curvature="sgd", order=2, backend="autograd")
    with pytest.raises(ValueError, match="backend 'autograd' at order 2: .*dropout.* draws random"):
        opt.step(*batch(4, 3, 6))


@pytest.mark.parametrize("backend", ["autograd", "lowrank"])
def test_random_function_steps_replay_their_draws(backend):
    """The update pass replays each random function step from the generator state of the
    nominal pass: at lr = 0 it reproduces the nominal states exactly, and the global stream
    advances once per step (as one torch forward would); order 1 equals torch.optim with the
    same draws."""
    torch.manual_seed(0)
    model = Stochastic().double()
    opt = ocnopt.OCNOpt(model, curvature="sgd", lr=0.0, order=2, backend="lowrank")
    g = build_graph(model)
    assert sum(st.derivatives.random for st in g.stages if st.is_function) == 2
    x, y = batch(4, 3, 6)
    eng = opt.engine
    traj = eng.nominal(x)
    term = eng.terminal(traj, y, hessian=True)
    policy = lambda st, q, s: ([torch.zeros_like(g) for g in q], None)  # noqa: E731
    res = eng.second_order(traj, term, policy, lr=0.0, feedback=False, value_correction=False,
                           need_stats=[False] * len(eng.stages), targets=y)
    before = torch.get_rng_state()
    states, loss_after, _ = eng.update_pass(traj, res.policies, y)
    assert torch.equal(torch.get_rng_state(), before)
    garbage = {st.output for st in eng.stages if "new_empty" in repr(st)}  # uninitialised
    for j, (a, b) in enumerate(zip(states, traj.states)):
        assert j in garbage or torch.equal(a, b)
    assert loss_after == float(term.loss)
    # order 1 against torch.optim with the same draws: one forward per step
    torch.manual_seed(1)
    ours, ref = Stochastic().double(), Stochastic().double()
    ref.load_state_dict(ours.state_dict())
    o = ocnopt.OCNOpt(ours, curvature="sgd", lr=0.1, backend=backend, track_loss_after=True)
    r = torch.optim.SGD(ref.parameters(), lr=0.1)
    for s in range(2):
        torch.manual_seed(10 + s)
        o.step(x, y)
        torch.manual_seed(10 + s)
        r.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        r.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **REL)


def test_torchvision_stochastic_depth_is_a_random_step():
    """efficientnet_b0's stochastic depth (an fx-wrapped torchvision function) is recognised:
    one random function step per residual block that applies it."""
    import torchvision

    model = torchvision.models.efficientnet_b0(num_classes=3)
    residual = sum(1 for m in model.modules()
                   if type(m).__name__ == "MBConv" and m.use_res_connect)
    g = build_graph(model)
    random_steps = [st for st in g.stages if st.is_function and st.derivatives.random]
    assert len(random_steps) == residual > 0
    assert all("stochastic_depth" in repr(st) for st in random_steps)


@pytest.mark.parametrize("name", ["soap", "shampoo"])
def test_soap_and_shampoo_on_a_graph_equal_their_twins(name):
    """The curvature axis on graphs: order 1 with curvature soap / shampoo on a residual graph
    equals pytorch-optimizer's SOAP / Shampoo (full-rank factors: 16 samples, widths <= 4, so
    SOAP's eigenbases do not depend on rounding)."""
    import pytorch_optimizer

    torch.manual_seed(5)
    ours, ref = Residual().double(), Residual().double()
    ref.load_state_dict(ours.state_dict())
    kw = {"precondition_frequency": 2} if name == "soap" else {}
    opt = ocnopt.OCNOpt(ours, curvature=name, lr=3e-3, **kw)
    twin = getattr(pytorch_optimizer, name.upper() if name == "soap" else "Shampoo")(
        ref.parameters(), lr=3e-3, **kw)
    for s in range(4):
        x, y = batch(3, 3, 16, seed=s)
        opt.step(x, y)
        twin.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        twin.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
