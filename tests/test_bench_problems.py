"""ocnopt.bench: the problems' data (offline, documented shapes and class counts, fixed splits),
the networks, and the optimizer registry."""

from __future__ import annotations

import inspect
import math
import operator
import random
import socket

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from ocnopt.bench import optimizers as registry  # noqa: E402
from ocnopt.bench import problems  # noqa: E402

# problem -> (input shape of one sample, classes or None, sizes fit/val/test)
DOCUMENTED = {
    "wine-fcn": ((13,), 3, (99, 25, 54)),
    "digits-fcn": ((64,), 10, (1005, 252, 540)),
    "digits-cnn": ((1, 8, 8), 10, (1005, 252, 540)),
    "mnist1d-mlp": ((40,), 10, (3200, 800, 1000)),
    "mnist1d-cnn": ((1, 40), 10, (3200, 800, 1000)),
    "quadratic": ((100,), None, (1120, 280, 600)),
    "digits-resnet": ((1, 8, 8), 10, (1005, 252, 540)),
    "digits-inception": ((1, 8, 8), 10, (1005, 252, 540)),
    "mnist1d-resnet": ((1, 40), 10, (3200, 800, 1000)),
}
GRAPH = ("digits-resnet", "digits-inception", "mnist1d-resnet")


@pytest.fixture
def offline(monkeypatch):
    """No network: any attempt to connect fails the test; the loaders' caches are emptied so
    that they really run under it."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for fn in (problems.load_wine, problems.load_digits, problems.load_mnist1d,
               problems._mnist1d_arrays, problems.load_quadratic):
        fn.cache_clear()


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_loaders_offline_shapes_and_classes(name: str, offline) -> None:
    if name.startswith("mnist1d"):
        pytest.importorskip("mnist1d")
    shape, classes, sizes = DOCUMENTED[name]
    data = problems.load(name)
    assert data.sizes() == dict(zip(("fit", "val", "test"), sizes))
    assert data.classes == classes
    for X, y in ((data.X_fit, data.y_fit), (data.X_val, data.y_val), (data.X_test, data.y_test)):
        assert X.dtype == torch.float32 and tuple(X.shape[1:]) == shape
        assert torch.isfinite(X).all()
        if classes is None:
            assert y.dtype == torch.float32 and tuple(y.shape[1:]) == (1,)
        else:
            assert y.dtype == torch.int64 and y.dim() == 1
            assert set(y.tolist()) == set(range(classes))  # every class in every split
    if name != "quadratic" and not name.startswith("mnist1d"):  # standardised on fit
        mean = data.X_fit.mean().item()
        assert abs(mean) < 1e-4
    # the network takes the inputs and gives one output per class (one value for mse)
    out = problems.get_problem(name).model(0)(data.X_test[:5])
    assert tuple(out.shape) == (5, classes or 1)


def test_splits_fixed_by_seed_and_disjoint() -> None:
    a, b = problems.load("digits-fcn"), problems.load("digits-fcn")
    assert torch.equal(a.X_fit, b.X_fit) and torch.equal(a.y_test, b.y_test)
    c = problems.load_digits(split_seed=1)
    assert not torch.equal(a.y_fit, c.y_fit)
    rows = {tuple(r) for r in torch.cat([a.X_fit, a.X_val, a.X_test]).tolist()}
    assert len(a.y_fit) + len(a.y_val) + len(a.y_test) == 1797
    assert len(rows) > 1700  # digits has a few duplicate images, the splits are disjoint


def test_mnist1d_is_make_dataset_defaults_and_leaves_global_rng_alone() -> None:
    pytest.importorskip("mnist1d")
    problems._mnist1d_arrays.cache_clear()
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002 - the legacy global state is what make_dataset seeds
    expected = (random.random(), np.random.rand())  # noqa: NPY002
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002
    d = problems._mnist1d_arrays()
    assert (random.random(), np.random.rand()) == expected  # noqa: NPY002
    assert d["x"].shape == (4000, 40) and d["x_test"].shape == (1000, 40)


def test_quadratic_known_hessian() -> None:
    data = problems.load("quadratic")
    eig = np.array(data.meta["hessian_eigenvalues"])
    assert len(eig) == 100 and math.isclose(eig.max() / eig.min(), 100.0)
    # the empirical Hessian of the MSE, 2 X^T X / N, matches the population one in spectrum
    X = torch.cat([data.X_fit, data.X_val, data.X_test]).double()
    emp = torch.linalg.eigvalsh(2 * X.T @ X / len(X)).numpy()
    assert abs(np.log(emp.max() / eig.max())) < 0.3 and abs(np.log(emp.min() / eig.min())) < 0.5


def test_model_seeded_without_touching_global_rng() -> None:
    p = problems.get_problem("digits-fcn")
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    m0, m0b, m1 = p.model(0), p.model(0), p.model(1)
    assert torch.rand(1) == before
    w = [q.detach() for q in m0.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(w, m0b.parameters()))
    assert not torch.equal(w[0], next(m1.parameters()))


# ---- the registry --------------------------------------------------------------------------------
def test_every_name_parses_with_its_order() -> None:
    names = registry.all_names()
    assert {"torch-sgd", "torch-rmsprop", "torch-adam", "curvlinops-kfac"} <= set(names)
    for n in names:
        spec = registry.parse_optimizer(n)
        assert spec.name == n
        if spec.family == "ocnopt":
            assert spec.order == (2 if "-fb" in n else 1)
            assert spec.options.get("game") == ("nash" if n.endswith("-fb-nash") else None)
    ddp = registry.parse_optimizer("autograd-full-fb")
    assert ddp.exact and ddp.order == 2 and "vanilla DDP" in ddp.description
    assert registry.parse_optimizer("lowrank-kfac-fb").options == {"feedback": True}
    assert not registry.parse_optimizer("lowrank-kfac-fb").exact


@pytest.mark.parametrize("bad", ["adam", "autograd-newton", "gpu-adam", "autograd-adam-xx",
                                 "lowrank-full", "torch-lbfgs", "autograd-adam-fb-fb",
                                 "lowrank-kfac-nash", "lowrank-kfac-fb-coop",
                                 "lowrank-kfac-fb-nash-fb"])
def test_unknown_names_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="accepted|only backend 'autograd'"):
        registry.parse_optimizer(bad)


def test_select_sets_and_fit() -> None:
    digits = problems.get_problem("digits-fcn")
    default = [s.name for s in registry.select(digits, None)]
    assert {"torch-sgd", "torch-adam", "curvlinops-kfac", "soap", "shampoo"} <= set(default)
    orders = {registry.parse_optimizer(n).order for n in default}
    assert {1, 2} <= orders
    assert [s.name for s in registry.select(digits, ["default"])] == default
    wine_all = [s.name for s in registry.select(problems.get_problem("wine-fcn"), ["all"])]
    assert "autograd-full-fb" in wine_all  # vanilla DDP on the small problem
    assert "autograd-full-fb" not in [s.name for s in registry.select(digits, ["all"])]
    cnn1d = problems.get_problem("mnist1d-cnn")
    assert "curvlinops-kfac" not in [s.name for s in registry.select(cnn1d, ["all"])]
    with pytest.raises(ValueError, match="does not run on mnist1d-cnn.*Conv2d"):
        registry.select(cnn1d, ["curvlinops-kfac"])
    with pytest.raises(ValueError, match="too large"):
        registry.select(problems.get_problem("digits-cnn"), ["autograd-adam-fb"])


def test_lr_grid_spans_four_decades() -> None:
    grid = registry.lr_grid(1e-2)
    assert len(grid) == 9 and math.isclose(grid[-1] / grid[0], 1e4)
    assert math.isclose(grid[4], 1e-2)
    assert all(b > a for a, b in zip(grid, grid[1:]))


def test_twins_take_identical_steps() -> None:
    """order-1 ocnopt sgd / adam and their torch.optim peers, driven by the harness's steppers,
    end on the same weights (the harness adds nothing to either)."""
    p = problems.get_problem("wine-fcn")
    data = problems.load(p)
    for mine, peer in (("autograd-sgd", "torch-sgd"), ("autograd-adam", "torch-adam")):
        a, b = p.model(0), p.model(0)
        sa = registry.parse_optimizer(mine).make(a, p.loss, 0.01, 0)
        sb = registry.parse_optimizer(peer).make(b, p.loss, 0.01, 0)
        for i in range(5):
            x, y = data.X_fit[16 * i:16 * (i + 1)], data.y_fit[16 * i:16 * (i + 1)]
            assert math.isclose(sa.step(x, y), sb.step(x, y), rel_tol=1e-5)
        for q, r in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(q, r, rtol=1e-5, atol=1e-6)


def test_curvlinops_peer_is_a_kfac_step() -> None:
    """With update_every=1 the curvlinops peer's first step is -lr (K + damping)^-1 g."""
    pytest.importorskip("curvlinops")
    from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

    p = problems.get_problem("wine-fcn")
    data = problems.load(p)
    x, y = data.X_fit[:16], data.y_fit[:16]
    model, ref = p.model(0), p.model(0)
    step = registry.CurvlinopsKFACStepper(model, p.loss, lr=0.1, damping=0.1, fisher_type="mc",
                                          update_every=1, seed=0)
    step.step(x, y)
    params = list(ref.parameters())
    K = KFACLinearOperator(ref, torch.nn.CrossEntropyLoss(), params, [(x, y)], fisher_type="mc",
                           check_deterministic=False, seed=0)
    K.compute_kronecker_factors()
    g = torch.autograd.grad(torch.nn.functional.cross_entropy(ref(x), y), params)
    d = KFACInverseLinearOperator(K, damping=0.1) @ list(g)
    for q, r, di in zip(model.parameters(), params, d):
        torch.testing.assert_close(q, r.detach() - 0.1 * di)


# ---- graph networks ------------------------------------------------------------------------------
def _batch(name: str, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    if name.startswith("mnist1d"):
        pytest.importorskip("mnist1d")
    data = problems.load(name)
    return data.X_fit[:n], data.y_fit[:n]


# documented structure: parameters, and the layer types the docstrings name
GRAPH_STRUCTURE = {
    "digits-resnet": (38266, {"Conv2d": 8, "BatchNorm2d": 8, "Linear": 1}),
    "digits-inception": (6490, {"Conv2d": 13, "BatchNorm2d": 1, "MaxPool2d": 2, "Linear": 1}),
    "mnist1d-resnet": (19370, {"Conv1d": 7, "BatchNorm1d": 7, "Linear": 1}),
}


@pytest.mark.parametrize("name", GRAPH)
def test_graph_network_structure(name: str) -> None:
    model = problems.get_problem(name).model(0)
    assert not isinstance(model, torch.nn.Sequential)
    n_params, layers = GRAPH_STRUCTURE[name]
    assert sum(p.numel() for p in model.parameters()) == n_params
    counts: dict[str, int] = {}
    for m in model.modules():
        counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    assert {k: counts.get(k, 0) for k in layers} == layers
    if name == "digits-resnet":  # the projection block halves 8x8 to 4x4 and doubles the channels
        x, _ = _batch(name, 4)
        h = model.block1(torch.relu(model.bn(model.stem(x))))
        assert tuple(model.block2(h).shape) == (4, 32, 4, 4)
        assert isinstance(model.block2.shortcut[0], torch.nn.Conv2d)
        assert model.block2.shortcut[0].stride == (2, 2) and model.block2.shortcut[0].kernel_size == (1, 1)
    if name == "digits-inception":  # four branches of 8 channels, spatial size kept
        x, _ = _batch(name, 4)
        assert tuple(model.inc1(torch.relu(model.bn(model.stem(x)))).shape) == (4, 32, 8, 8)


@pytest.mark.parametrize("name", GRAPH)
def test_graph_network_traces_with_fx(name: str) -> None:
    """torch.fx.symbolic_trace gives the module's function (float64, train and eval mode), and
    the graph holds the residual adds / the concatenation."""
    x, _ = _batch(name)
    model = problems.get_problem(name).model(0).double()
    traced = torch.fx.symbolic_trace(model)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    if "resnet" in name:
        assert operator.add in targets
    else:
        assert torch.cat in targets
    for train in (False, True):
        model.train(train)
        traced.train(train)
        with torch.no_grad():
            ref = model(x.double())
            out = traced(x.double())
        assert ref.dtype == torch.float64 and tuple(ref.shape) == (len(x), 10)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", GRAPH)
def test_graph_network_deterministic_per_seed(name: str) -> None:
    p = problems.get_problem(name)
    a, b, c = p.model(0).state_dict(), p.model(0).state_dict(), p.model(1).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


# torch-adam, 20 steps over 4 minibatches of 16: (lr, bound on loss after / loss before)
ADAM_BOUND = {"digits-resnet": (3e-3, 0.5), "digits-inception": (1e-2, 0.95),
              "mnist1d-resnet": (3e-3, 0.75)}


@pytest.mark.parametrize("name", GRAPH)
def test_torch_adam_trains_graph_network(name: str) -> None:
    p = problems.get_problem(name)
    x, y = _batch(name, 64)
    model = p.model(0)
    lr, bound = ADAM_BOUND[name]
    stepper = registry.parse_optimizer("torch-adam", p).make(model, p.loss, lr, 0)

    def loss_all() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(model(x), y))

    before = loss_all()
    losses = [stepper.step(x[16 * (i % 4):16 * (i % 4 + 1)], y[16 * (i % 4):16 * (i % 4 + 1)])
              for i in range(20)]
    after = loss_all()
    assert all(math.isfinite(v) for v in losses)
    assert after < bound * before, (before, after)
    assert sum(losses[-4:]) < sum(losses[:4])


def test_curvlinops_peer_on_batchnorm_network() -> None:
    """digits-resnet, update_every=1: Linear/Conv2d weights take -lr (K + damping)^-1 g of
    curvlinops' K-FAC over those weights, BatchNorm weights -lr g; the BatchNorm running
    statistics are those of the one training forward pass (restored after K is built)."""
    pytest.importorskip("curvlinops")
    from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

    p = problems.get_problem("digits-resnet")
    x, y = _batch("digits-resnet", 32)
    model, ref = p.model(0), p.model(0)
    step = registry.CurvlinopsKFACStepper(model, p.loss, lr=0.1, damping=0.1, fisher_type="mc",
                                          update_every=1, seed=0)
    kfac, other = registry.split_kfac_params(ref)
    assert len(kfac) == 8 + 2 and len(other) == 2 * 8  # conv weights, Linear weight and bias
    step.step(x, y)
    K = KFACLinearOperator(ref, torch.nn.CrossEntropyLoss(), kfac, [(x, y)], fisher_type="mc",
                           check_deterministic=False, seed=0)
    K.compute_kronecker_factors()
    ref.load_state_dict(p.model(0).state_dict())  # the running statistics before K was built
    g = torch.autograd.grad(torch.nn.functional.cross_entropy(ref(x), y), kfac + other)
    d = list(KFACInverseLinearOperator(K, damping=0.1) @ list(g[:len(kfac)])) + list(g[len(kfac):])
    expected = {id(q): q.detach() - 0.1 * di for q, di in zip(kfac + other, d)}
    for (name, q), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(q, expected[id(r)], msg=name)
    for (name, b), r in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, r, msg=name)  # one BatchNorm update, not two


def test_curvlinops_peer_refuses_conv1d() -> None:
    pytest.importorskip("curvlinops")
    p = problems.get_problem("mnist1d-resnet")
    with pytest.raises(ValueError, match=r"layer 'stem' \(Conv1d\).*accepted: Linear and Conv2d"):
        registry.CurvlinopsKFACStepper(p.model(0), p.loss, lr=0.1, damping=0.1, fisher_type="mc",
                                       update_every=1, seed=0)
    with pytest.raises(ValueError, match="does not run on mnist1d-resnet.*Conv2d"):
        registry.select(p, ["curvlinops-kfac"])


def test_ocnopt_refusal_reported_by_fits() -> None:
    """fits() asks ocnopt.OCNOpt itself: a network it refuses gives the library's reason."""
    bare = problems.Problem("bare", "no parameters", "ReLU", "cross_entropy",
                            problems.load_wine, lambda: torch.nn.Sequential(torch.nn.ReLU()),
                            epochs=1, batch_size=8, target=0.5)
    spec = registry.parse_optimizer("lowrank-kfac-fb")
    assert spec.fits(bare).startswith("ocnopt.OCNOpt refuses it: ")
    assert "no trainable parameters" in spec.fits(bare)
    assert registry.parse_optimizer("torch-adam").fits(bare) is None
    with pytest.raises(ValueError, match="does not run on bare: ocnopt.OCNOpt refuses it"):
        registry.select(bare, ["lowrank-kfac-fb"])


def test_nash_names_build_game_option() -> None:
    nash = registry.parse_optimizer("lowrank-kfac-fb-nash")
    assert nash.order == 2 and nash.kwargs["game"] == "nash" and nash.kwargs["feedback"] is True
    assert nash.options == {"feedback": True, "game": "nash"} and "game nash" in nash.description
    assert "game" not in registry.parse_optimizer("lowrank-kfac-fb").kwargs  # library default
    assert "game" not in registry.parse_optimizer("lowrank-kfac").kwargs
    names = registry.all_names()
    assert {"lowrank-adam-fb-nash", "lowrank-kfac-fb-nash", "autograd-full-fb-nash"} <= set(names)
    assert "lowrank-full-fb-nash" not in names


def _ocnopt_has_game() -> bool:
    import ocnopt

    return "game" in inspect.signature(ocnopt.OCNOpt).parameters


@pytest.mark.xfail(not _ocnopt_has_game(), strict=True,
                   reason="OCNOpt(game=...) arrives with the graph engine")
@pytest.mark.parametrize(("name", "game"), [("lowrank-kfac-fb-nash", "nash"),
                                            ("lowrank-adam-fb-nash", "nash"),
                                            ("lowrank-kfac-fb", "cooperative")])
def test_nash_names_construct_ocnopt_with_game(name: str, game: str) -> None:
    p = problems.get_problem("wine-fcn")
    data = problems.load(p)
    stepper = registry.parse_optimizer(name, p).make(p.model(0), p.loss, 0.01, 0)
    opt = stepper.opt
    assert getattr(opt, "game", None) == game or opt.defaults.get("game") == game
    assert math.isfinite(stepper.step(data.X_fit[:16], data.y_fit[:16]))


@pytest.mark.xfail(not _ocnopt_has_game(), strict=True,
                   reason="OCNOpt(game=...) arrives with the graph engine")
def test_nash_equals_cooperative_on_a_chain() -> None:
    """A chain has no simultaneous layers: lowrank-kfac-fb-nash takes the same steps as
    lowrank-kfac-fb (float64, 3 steps on wine-fcn)."""
    p = problems.get_problem("wine-fcn")
    data = problems.load(p)
    models = [p.model(0).double(), p.model(0).double()]
    steppers = [registry.parse_optimizer(n, p).make(m, p.loss, 0.02, 0)
                for n, m in zip(("lowrank-kfac-fb", "lowrank-kfac-fb-nash"), models)]
    for i in range(3):
        x, y = data.X_fit[16 * i:16 * (i + 1)].double(), data.y_fit[16 * i:16 * (i + 1)]
        assert math.isclose(steppers[0].step(x, y), steppers[1].step(x, y), rel_tol=1e-12)
    for q, r in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(q, r, rtol=1e-10, atol=1e-12)


def test_random_mlp_timing_problem() -> None:
    """random_mlp: MLP 784-W-W-10 on `batches` random minibatches, drawn from the seed."""
    p = problems.random_mlp(width=16, batch=8, seed=3, batches=4)
    d = problems.load(p)
    assert p.name == "mlp784-w16" and p.name not in problems.PROBLEMS
    assert d.X_fit.shape == (32, 784) and d.y_fit.shape == (32,) and len(d.y_test) == 8
    assert int(d.y_fit.min()) >= 0 and int(d.y_fit.max()) < 10
    assert torch.equal(d.X_fit, problems.load(problems.random_mlp(16, 8, 3)).X_fit)
    assert not torch.equal(d.X_fit, problems.load(problems.random_mlp(16, 8, 4)).X_fit)
    widths = [m.weight.shape for m in p.model(0) if isinstance(m, torch.nn.Linear)]
    assert widths == [(16, 784), (16, 16), (10, 16)]
