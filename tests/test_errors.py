"""Every bad input is refused with an error (ValueError / TypeError) that names the argument,
the value received and what is accepted, at construction when it can be known then, at
``step`` otherwise."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from ocnopt.backends import BACKENDS
from torch import nn

from ocnopt import OCNOpt

SUPPORTED = r"[Ss]upported layers: .*Linear"


def msg(*fragments: str) -> str:
    """A regex matching a message that contains every fragment (literally), in any order."""
    return "(?s)" + "".join(f"(?=.*{re.escape(f)})" for f in fragments)


def msg_re(*patterns: str) -> str:
    """Like ``msg`` for regex fragments."""
    return "(?s)" + "".join(f"(?=.*{p})" for p in patterns)


# ---- hyper-parameters ------------------------------------------------------------------------
HYPER_ERRORS = [
    # (curvature, kwargs, message fragments)
    ("adam", {"lr": -0.1}, ("lr=-0.1", "accepted", ">= 0")),
    ("sgd", {"lr": float("nan")}, ("lr=nan", "accepted", ">= 0")),
    ("kfac", {"damping": -1e-3}, ("damping=-0.001", "accepted", ">= 0")),
    ("kfac", {"damping": float("inf")}, ("damping=inf", "accepted", "finite")),
    ("ekfac", {"damping": float("nan")}, ("damping=nan", "accepted", "finite")),
    ("adam", {"betas": (0.9, 1.0)}, ("betas=(0.9, 1.0)", "accepted", "[0, 1)")),
    ("adamw", {"betas": (-0.1, 0.999)}, ("betas=(-0.1, 0.999)", "accepted", "[0, 1)")),
    ("adam", {"betas": (0.9,)}, ("betas=(0.9,)", "accepted", "pair")),
    ("adam", {"betas": (0.9, 0.99, 0.999)}, ("betas=(0.9, 0.99, 0.999)", "accepted", "pair")),
    ("adam", {"eps": -1e-8}, ("eps=-1e-08", "accepted", ">= 0")),
    ("rmsprop", {"eps": -1e-8}, ("eps=-1e-08", "accepted", ">= 0")),
    ("sgd", {"momentum": -0.5}, ("momentum=-0.5", "accepted", ">= 0")),
    ("rmsprop", {"momentum": -0.5}, ("momentum=-0.5", "accepted", ">= 0")),
    ("kfac", {"momentum": -0.5}, ("momentum=-0.5", "accepted", "[0, 1)")),
    ("sgd", {"weight_decay": -1.0}, ("weight_decay=-1.0", "accepted", ">= 0")),
    ("adamw", {"weight_decay": -1.0}, ("weight_decay=-1.0", "accepted", ">= 0")),
    ("kfac", {"weight_decay": float("inf")}, ("weight_decay=inf", "accepted", "finite")),
    ("sgd", {"nesterov": True}, ("nesterov=True", "accepted", "momentum > 0")),
    ("sgd", {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
     ("nesterov=True", "accepted", "dampening = 0")),
    ("kfac", {"stat_every": 0}, ("stat_every=0", "accepted", "integer >= 1")),
    ("kfac", {"stat_every": 1.5}, ("stat_every=1.5", "accepted", "integer >= 1")),
    ("ekfac", {"stat_every": -2}, ("stat_every=-2", "accepted", "integer >= 1")),
    ("kfac", {"inv_every": 0}, ("inv_every=0", "accepted", "integer >= 1")),
    ("ekfac", {"inv_every": 2.0}, ("inv_every=2.0", "accepted", "integer >= 1")),
    ("ekfac", {"inv_every": True}, ("inv_every=True", "accepted", "integer >= 1")),
    ("kfac", {"fisher_type": "exact"}, ("fisher_type='exact'", "accepted", "empirical", "mc")),
    ("ekfac", {"fisher_type": "gn"}, ("fisher_type='gn'", "accepted", "type-2")),
    ("full", {"damping": -1.0}, ("damping=-1.0", "accepted", ">= 0")),
    ("full", {"eig_floor": -1.0}, ("eig_floor=-1.0", "accepted", ">= 0")),
    ("adam", {"order": 3}, ("order=3", "accepted", "1", "2")),
    ("adam", {"order": 2, "mu": -1.0}, ("mu=-1.0", "accepted", ">= 0")),
]


@pytest.mark.parametrize(
    "curvature, kwargs, fragments", HYPER_ERRORS,
    ids=[f"{c}-{'-'.join(k)}-{i}" for i, (c, k, _) in enumerate(HYPER_ERRORS)])
def test_invalid_hyperparameter_raises_value_error(curvature, kwargs, fragments, make_mlp):
    with pytest.raises(ValueError, match=msg("invalid", *fragments)):
        OCNOpt(make_mlp(), curvature=curvature, **kwargs)


@pytest.mark.parametrize("flag", ["feedback", "value_correction", "gauss_newton",
                                  "track_loss_after"])
def test_option_flags_must_be_booleans(flag, make_mlp):
    with pytest.raises(TypeError, match=msg(f"{flag}='yes'", "accepted", "True or False")):
        OCNOpt(make_mlp(), order=2, **{flag: "yes"})


@pytest.mark.parametrize("curvature", ["kfac", "ekfac", "full"])
def test_damping_callable_returning_negative_raises_at_step(curvature, make_mlp, make_batches):
    opt = OCNOpt(make_mlp(), curvature=curvature, damping=lambda step: -0.25)  # accepted here
    params = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    with pytest.raises(ValueError, match=msg("damping=-0.25", "callable", "step 0", "accepted",
                                             ">= 0")):
        opt.step(*make_batches(1)[0])
    assert all(torch.equal(p, q) for p, q in zip(opt.param_groups[0]["params"], params))


def test_lr_made_invalid_after_construction_raises_at_step(make_mlp, make_batches):
    opt = OCNOpt(make_mlp(), curvature="sgd", lr=0.1)
    opt.param_groups[0]["lr"] = -1.0  # what a broken scheduler would do
    with pytest.raises(ValueError, match=msg("lr=-1.0", "accepted")):
        opt.step(*make_batches(1)[0])


def test_unknown_curvature(make_mlp):
    with pytest.raises(ValueError, match=msg("curvature='lbfgs'", "accepted", "'adam'", "'kfac'")):
        OCNOpt(make_mlp(), curvature="lbfgs")


def test_unknown_backend(make_mlp):
    with pytest.raises(ValueError, match=msg("backend='jax'", "accepted", "autograd")):
        OCNOpt(make_mlp(), backend="jax")


@pytest.mark.parametrize("backend", ["autograd", "lowrank", "backpack"])
def test_every_named_backend_constructs(backend, make_mlp):
    assert backend in BACKENDS
    assert OCNOpt(make_mlp(), backend=backend).backend.name == backend


@pytest.mark.parametrize("curvature, kwargs, accepted", [
    ("sgd", {"betas": (0.9, 0.99)}, ("momentum", "nesterov", "dampening", "weight_decay")),
    ("adam", {"momentum": 0.9}, ("betas", "eps", "amsgrad")),
    ("kfac", {"eps": 1e-8}, ("damping", "stat_every", "inv_every", "fisher_type")),
    ("rmsprop", {"damping": 1e-3}, ("alpha", "eps", "centered", "momentum")),
])
def test_unknown_hyperparameter_for_curvature_is_a_type_error(curvature, kwargs, accepted,
                                                              make_mlp):
    (name,) = kwargs
    with pytest.raises(TypeError, match=msg(f"'{name}'", f"curvature {curvature!r}", "accepted",
                                            *accepted)):
        OCNOpt(make_mlp(), curvature=curvature, **kwargs)


# ---- losses ----------------------------------------------------------------------------------
def test_unknown_loss_name(make_mlp):
    with pytest.raises(ValueError, match=msg("'hinge'", "cross_entropy", "mse", "callable")):
        OCNOpt(make_mlp(), loss="hinge")


def test_loss_module_with_sum_reduction_is_refused(make_mlp):
    with pytest.raises(ValueError, match=msg("reduction='mean'")):
        OCNOpt(make_mlp(), loss=nn.CrossEntropyLoss(reduction="sum"))


def test_loss_callable_returning_wrong_shape_raises_at_step(make_mlp, make_batches):
    def mean_loss(output, target):
        return F.cross_entropy(output, target)  # a scalar, not (B,)

    opt = OCNOpt(make_mlp(), loss=mean_loss, curvature="sgd")
    x, y = make_batches(1)[0]
    with pytest.raises(ValueError, match=msg("'mean_loss'", "shape (8,)", "got ()",
                                             "reduction='none'")):
        opt.step(x, y)


def test_loss_callable_with_per_sample_shape_is_accepted(make_mlp, make_batches):
    def per_sample(output, target):
        return F.cross_entropy(output, target, reduction="none")

    model = make_mlp()
    opt = OCNOpt(model, loss=per_sample, curvature="sgd", lr=0.1)
    x, y = make_batches(1)[0]
    with torch.no_grad():
        expected = float(F.cross_entropy(model(x), y))
    assert float(opt.step(x, y)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("call", ["none", "closure"])
def test_step_without_a_batch_explains_the_contract(call):
    opt = OCNOpt(nn.Sequential(nn.Linear(4, 3)))
    with pytest.raises(TypeError, match=msg("step(inputs, targets) takes the batch, not a closure",
                                            "loss = opt.step(inputs, targets)")):
        opt.step() if call == "none" else opt.step(lambda: torch.zeros(()))


# ---- modules ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, position", [
    (nn.MultiheadAttention(6, 2), 1),
    (nn.RNN(6, 6), 1),
    (nn.Bilinear(6, 6, 6), 1),
], ids=["attention", "rnn", "bilinear"])
def test_unsupported_module_names_module_position_and_supported(bad, position):
    model = nn.Sequential(nn.Linear(4, 6), bad, nn.Linear(6, 3))
    with pytest.raises(TypeError, match=msg_re(type(bad).__name__, f"position {position}",
                                               re.escape(f"model.{position}"), SUPPORTED)):
        OCNOpt(model)


def test_unsupported_module_in_nested_sequential_names_its_path():
    model = nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.Tanh(), nn.LSTM(6, 3)))
    with pytest.raises(TypeError, match=msg_re("LSTM", "position 2", re.escape("model.1.1"),
                                               SUPPORTED)):
        OCNOpt(model)


def test_lstm_alone_is_unsupported():
    with pytest.raises(TypeError, match=msg_re("LSTM", "position 0", SUPPORTED)):
        OCNOpt(nn.Sequential(nn.LSTM(4, 3)))


def test_unsupported_module_in_a_traced_graph_names_its_node():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 6)
            self.rnn = nn.GRU(6, 6)
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            return self.out(self.rnn(self.inp(x)) + x.sum())

    with pytest.raises(TypeError, match=msg_re("GRU", re.escape("(model.rnn)"), SUPPORTED)):
        OCNOpt(Net())


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.head(x + self.inner(x))


def test_untraceable_model_names_the_module_and_the_line():
    with pytest.raises(TypeError, match=msg_re("Branchy", "cannot be traced by torch.fx",
                                               re.escape("if x.sum() > 0:"), "test_errors.py",
                                               "leaf_modules")):
        OCNOpt(Branchy())


def test_untraceable_block_works_as_a_leaf_module():
    """The error's advice: the block named in leaf_modules is one step, run as it is."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Branchy()).double()
    opt = OCNOpt(model, curvature="sgd", lr=0.1, leaf_modules=(Branchy,))
    assert [type(st.module).__name__ for st in opt.stages] == ["Linear", "Branchy"]
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    ref = __import__("copy").deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    F.cross_entropy(ref(x), y).backward()
    ref_opt.step()
    opt.step(x, y)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_model_with_two_inputs_is_refused():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x, mask):
            return self.lin(x * mask)

    with pytest.raises(TypeError, match=msg("Two.forward takes 2 tensor inputs", "x, mask",
                                            "passes one")):
        OCNOpt(Two())


def test_parameter_used_outside_its_module_is_refused():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x) * self.lin.weight.sum()

    with pytest.raises(TypeError, match=msg("parameter 'lin.weight' directly",
                                            "control of a step", "leaf_modules")):
        OCNOpt(Scaled())


def test_maxpool_with_return_indices():
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.MaxPool1d(2, return_indices=True), nn.Flatten(),
                          nn.Linear(2, 3))
    with pytest.raises(TypeError, match=msg("MaxPool1d", "position 1", "return_indices=True",
                                            "return_indices=False")):
        OCNOpt(model)


def test_flatten_start_dim_zero():
    model = nn.Sequential(nn.Flatten(start_dim=0), nn.Linear(4, 3))
    with pytest.raises(TypeError, match=msg("Flatten", "position 0", "start_dim=0",
                                            "start_dim=1")):
        OCNOpt(model)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match=msg("torch.nn.Module", "list")):
        OCNOpt([nn.Linear(4, 3)])


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.ReLU(), nn.Tanh()),
    nn.Sequential(nn.Linear(4, 3).requires_grad_(False)),
], ids=["parameter-free", "frozen"])
def test_model_without_trainable_parameters(model):
    with pytest.raises(ValueError, match=msg("no trainable parameters")):
        OCNOpt(model)


def test_empty_sequential():
    with pytest.raises(ValueError, match=msg("no layers")):
        OCNOpt(nn.Sequential())


@pytest.mark.parametrize("order, curvature", [(2, "adam"), (1, "full")])
def test_parameter_shared_between_stages_is_refused_at_order_2(order, curvature):
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    with pytest.raises(ValueError, match=msg("parameter model.0.weight is used by 2 steps",
                                             "step 0 (model.0)", "step 2 (model.2)",
                                             "order 1 only", "Untie")):
        OCNOpt(nn.Sequential(first, nn.Tanh(), second), order=order, curvature=curvature)


def test_module_reused_in_the_chain_is_refused_at_order_2():
    shared = nn.Linear(4, 4)
    with pytest.raises(ValueError, match=msg("used by 2 steps", "order 1 only")):
        OCNOpt(nn.Sequential(shared, nn.Tanh(), shared), order=2, backend="lowrank")


# ---- batches ---------------------------------------------------------------------------------
def _step(model, x, y, loss="cross_entropy"):
    opt = OCNOpt(model, loss=loss, curvature="sgd", lr=0.1)
    params = [p.detach().clone() for p in model.parameters()]
    try:
        opt.step(x, y)
    finally:  # a refused batch must not move the parameters
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_cross_entropy_target_of_wrong_shape(make_mlp, make_batches):
    x, y = make_batches(1)[0]
    with pytest.raises(ValueError, match=msg("shape (8,)", "(8, 3)", "got (8, 1)")):
        _step(make_mlp(), x, y.unsqueeze(1))


def test_cross_entropy_probabilities_of_wrong_shape(make_mlp, make_batches):
    x, _ = make_batches(1)[0]
    with pytest.raises(ValueError, match=msg("probabilities", "(8, 3)", "got (8, 5)")):
        _step(make_mlp(), x, torch.rand(8, 5))


@pytest.mark.parametrize("offset, lo, hi", [(3, 3, 5), (-5, -5, -3)])
def test_cross_entropy_class_out_of_range(offset, lo, hi, make_mlp, make_batches):
    x, y = make_batches(1)[0]
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 2]) + offset
    with pytest.raises(ValueError, match=msg("class indices in [0, 3)", f"[{lo}, {hi}]")):
        _step(make_mlp(), x, y)


def test_mse_target_of_wrong_shape(make_mlp, make_batches):
    x, _ = make_batches(1)[0]
    with pytest.raises(ValueError, match=msg("'mse'", "(8, 3)", "got (8, 2)")):
        _step(make_mlp(), x, torch.randn(8, 2), loss="mse")


def test_inputs_that_do_not_fit_the_first_layer(make_mlp):
    with pytest.raises(ValueError, match=msg("inputs of shape (8, 5)", "do not fit")):
        _step(make_mlp(), torch.randn(8, 5), torch.zeros(8, dtype=torch.long))


def test_inputs_that_do_not_fit_a_conv_layer():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=msg("inputs of shape (4, 1, 4, 4)", "do not fit")):
        _step(model, torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))


def test_inputs_and_targets_with_different_batch_sizes(make_mlp):
    with pytest.raises(ValueError, match=msg("batch", "(7, 4)", "(8,)")):
        _step(make_mlp(), torch.randn(7, 4), torch.zeros(8, dtype=torch.long))


def test_step_needs_tensors(make_mlp):
    with pytest.raises(TypeError, match=msg("tensors", "list")):
        _step(make_mlp(), [[0.0] * 4] * 8, torch.zeros(8, dtype=torch.long))


# -- fisher_type is honoured or refused, never ignored ---------------------------------------
@pytest.mark.parametrize("fisher", ["empirical", "type-2", "mc"])
def test_backpack_refuses_fisher_type_and_names_its_extension_option(fisher, make_mlp):
    with pytest.raises(ValueError, match=r"fisher_type='.*' for backend 'backpack'.*extension"):
        OCNOpt(make_mlp(), curvature="kfac", backend="backpack", order=2,
                      fisher_type=fisher)


def test_exact_backend_at_order_two_refuses_mc_fisher(make_mlp):
    with pytest.raises(ValueError, match=r"fisher_type='mc' for backend 'autograd' at order 2.*"
                                         r"accepted 'type-2' or 'empirical'"):
        OCNOpt(make_mlp(), curvature="kfac", order=2, backend="autograd", fisher_type="mc")
    OCNOpt(make_mlp(), curvature="kfac", order=2, backend="autograd",
           fisher_type="type-2")  # honoured
    OCNOpt(make_mlp(), curvature="kfac", order=1, fisher_type="mc")  # order 1: terminal


@pytest.mark.parametrize("fisher, terminal", [("type-2", "exact"), ("mc", "mc"),
                                              ("empirical", "empirical")])
def test_lowrank_terminal_follows_fisher_type_when_left_out(fisher, terminal, make_mlp):
    opt = OCNOpt(make_mlp(), curvature="ekfac", backend="lowrank", order=2,
                        fisher_type=fisher)
    assert opt.backend.terminal == terminal


@pytest.mark.parametrize("fisher, terminal, accepted", [
    ("type-2", "empirical", "'empirical' with"), ("type-2", "mc", "'empirical' or 'mc'"),
    ("mc", "exact", "'empirical' or 'type-2'")])
def test_lowrank_refuses_fisher_type_that_contradicts_its_terminal(fisher, terminal, accepted,
                                                                   make_mlp):
    with pytest.raises(ValueError, match=rf"fisher_type='{fisher}' for backend 'lowrank' at "
                                         rf"order 2 with terminal='{terminal}'.*{accepted}"):
        OCNOpt(make_mlp(), curvature="kfac", backend="lowrank", order=2,
                      fisher_type=fisher, backend_options={"terminal": terminal})


def test_fisher_type_changed_in_param_groups_is_checked_at_step(make_mlp, make_batches):
    opt = OCNOpt(make_mlp(), curvature="kfac", backend="lowrank", order=2)
    opt.param_groups[0]["fisher_type"] = "type-2"  # terminal stays 'empirical'
    x, y = make_batches(1)[0]
    with pytest.raises(ValueError, match="fisher_type='type-2' for backend 'lowrank'"):
        opt.step(x, y)


def test_lowrank_terminal_follows_fisher_type_with_other_options_given(make_mlp):
    opt = OCNOpt(make_mlp(), curvature="kfac", backend="lowrank", order=2, fisher_type="mc",
                 backend_options={"mc_samples": 3})
    assert (opt.backend.terminal, opt.backend.mc_samples) == ("mc", 3)
