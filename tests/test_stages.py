"""The network as a chain of stages (docs/method.md section 1): flattening, control-free stages, the
Dropout mask replay and in-place activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ocnopt import OCNOpt, build_stages


def test_nested_sequentials_are_flattened_in_order_with_dotted_names():
    model = nn.Sequential(
        nn.Linear(4, 5),
        nn.Sequential(nn.ReLU(), nn.Sequential(nn.Dropout(0.1), nn.Linear(5, 6))),
        nn.Tanh(),
        nn.Sequential(nn.Linear(6, 3)),
    )
    stages = build_stages(model)
    assert [st.name for st in stages] == ["0", "1.0", "1.1.0", "1.1.1", "2", "3.0"]
    assert [st.index for st in stages] == list(range(6))
    assert [type(st.module) for st in stages] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear,
                                                  nn.Tanh, nn.Linear]
    assert stages[3].module is model[1][1][1]
    assert stages[5].module is model[3][0]
    # every parameter of the model is the control of exactly one stage, in model order
    controls = [p for st in stages for p in st.params]
    assert [id(p) for p in controls] == [id(p) for p in model.parameters()]
    assert stages[3].param_names == ["weight", "bias"]


def test_single_supported_layer_is_a_one_stage_chain():
    layer = nn.Linear(3, 2)
    (stage,) = build_stages(layer)
    assert stage.module is layer and stage.index == 0 and stage.has_control
    assert stage.params == [layer.weight, layer.bias]


def test_bias_free_and_frozen_parameters_are_not_controls():
    frozen = nn.Linear(4, 4)
    frozen.bias.requires_grad_(False)
    stages = build_stages(nn.Sequential(nn.Linear(4, 4, bias=False), frozen))
    assert stages[0].param_names == ["weight"] and stages[0].params == [stages[0].module.weight]
    assert stages[1].param_names == ["weight"] and stages[1].params == [frozen.weight]


@pytest.mark.parametrize("layer", [
    nn.ReLU(), nn.Tanh(), nn.GELU(), nn.Flatten(), nn.Identity(), nn.Dropout(0.5),
    nn.MaxPool1d(2), nn.AvgPool1d(2), nn.AdaptiveAvgPool1d(2),
], ids=lambda m: type(m).__name__)
def test_parameter_free_layers_are_control_free_stages(layer):
    model = nn.Sequential(nn.Conv1d(1, 2, 3), layer)
    conv, free = build_stages(model)
    assert conv.has_control and conv.kronecker and len(conv.params) == 2
    assert not free.has_control and free.params == [] and free.param_names == []
    assert not free.kronecker


def test_control_free_stage_forward_matches_the_module():
    x = torch.randn(5, 2, 8)
    for layer in (nn.ReLU(), nn.MaxPool1d(2), nn.AvgPool1d(2), nn.Flatten(), nn.Tanh()):
        stage = build_stages(nn.Sequential(nn.Conv1d(2, 2, 1), layer))[1]
        out, ctx = stage.forward(x)
        assert torch.equal(out, layer(x))
        assert torch.equal(stage.replay(x, ctx), out)


# ---- Dropout ---------------------------------------------------------------------------------
def _dropout_stage(p=0.5):
    return build_stages(nn.Sequential(nn.Linear(10, 10), nn.Dropout(p)))[1]


def test_dropout_stage_replays_its_mask():
    stage = _dropout_stage(0.5)
    x = torch.randn(16, 10)
    torch.manual_seed(0)
    out, ctx = stage.forward(x)
    assert ctx is not None
    dropped = out == 0
    assert 0 < int(dropped.sum()) < x.numel()
    assert torch.equal(out[~dropped], 2.0 * x[~dropped])  # kept entries scaled by 1/(1-p)
    for _ in range(2):  # the replay is deterministic and does not touch the global generator
        assert torch.equal(stage.replay(x, ctx), out)
    # the same mask on another input
    x2 = torch.randn(16, 10)
    assert torch.equal(stage.replay(x2, ctx), x2 * ctx)
    assert torch.equal(stage.replay(x2, ctx) == 0, dropped)
    # a fresh forward draws a fresh mask: the replay is not a re-draw
    out2, ctx2 = stage.forward(x)
    assert not torch.equal(out2, out) and not torch.equal(ctx2, ctx)


def test_dropout_stage_in_eval_mode_is_the_identity():
    stage = _dropout_stage(0.5)
    stage.module.eval()
    x = torch.randn(4, 10)
    out, ctx = stage.forward(x)
    assert ctx is None and torch.equal(out, x) and torch.equal(stage.replay(x, ctx), x)


def test_dropout_mask_is_replayed_in_the_update_pass(make_batches):
    # lr = 0: the update pass must reproduce the nominal pass, dropout mask included
    # (identity 7, docs/method.md section 10)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.5), nn.Linear(32, 3))
    opt = OCNOpt(model, curvature="sgd", lr=0.0, track_loss_after=True)
    for x, y in make_batches(3):
        before = float(opt.step(x, y))
        assert opt.last_step.loss_after == pytest.approx(before, rel=1e-6, abs=0)
        with torch.no_grad():  # a fresh forward draws another mask: another loss
            fresh = float(F.cross_entropy(model(x), y))
        assert fresh != pytest.approx(before, rel=1e-4)


# ---- in-place activations --------------------------------------------------------------------
def test_inplace_relu_stage_does_not_modify_its_input():
    stage = build_stages(nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True)))[1]
    x = torch.randn(6, 3)
    x[0, 0] = -1.0
    recorded = x.clone()
    out, ctx = stage.forward(x)
    assert torch.equal(x, recorded)
    assert torch.equal(out, recorded.clamp_min(0))
    assert torch.equal(stage.replay(x, ctx), out) and torch.equal(x, recorded)


def test_inplace_relu_keeps_the_recorded_states(make_batches):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3))
    opt = OCNOpt(model, curvature="sgd", lr=0.1)
    x, _ = make_batches(1)[0]
    traj = opt.engine.nominal(x)
    with torch.no_grad():
        pre = model[0](x)
    assert (pre < 0).any()
    assert torch.equal(traj.states[1], pre)  # the input of the in-place ReLU, not clamped
    assert torch.equal(traj.states[2], pre.clamp_min(0))


@pytest.mark.parametrize("curvature, hp", [("sgd", {}), ("kfac", {"damping": 0.1})])
def test_inplace_relu_trains_like_relu(curvature, hp, make_batches):
    runs = []
    for inplace in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 3))
        opt = OCNOpt(model, curvature=curvature, lr=0.1, track_loss_after=True, **hp)
        trace = []
        for x, y in make_batches(1) * 3:
            trace.append((float(opt.step(x, y)), opt.last_step.loss_after))
        runs.append((trace, [p.detach().clone() for p in model.parameters()]))
    (trace_a, params_a), (trace_b, params_b) = runs
    assert trace_a == trace_b
    assert all(torch.equal(p, q) for p, q in zip(params_a, params_b))
    assert trace_a[-1][1] < trace_a[0][0]  # it trains


@pytest.mark.parametrize("module", [
    nn.Linear(5, 3), nn.Linear(5, 3, bias=False),
    nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2),
    nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False),
    nn.Conv2d(2, 4, 2, dilation=2, padding=1, padding_mode="circular"),
], ids=["linear", "linear-nobias", "conv1d-groups", "conv2d-reflect-nobias", "conv2d-circular"])
def test_param_jvp_closed_forms_equal_torch_func_jvp(module):
    """f_u k of Linear and Conv (closed forms, no primal pass) = torch.func.jvp of f in u."""
    torch.manual_seed(0)
    module = module.double()
    stage = build_stages(nn.Sequential(module))[0]
    shape = {2: (5,), 3: (4, 9), 4: (2, 6, 6)}[module.weight.dim()]
    x = torch.randn(3, *shape, dtype=torch.float64)
    params = {n: p.detach() for n, p in zip(stage.param_names, stage.params)}
    tangent = {n: torch.randn_like(p) for n, p in params.items()}
    got = stage.derivatives.param_jvp(module, params, x, None, tangent)

    def fn(*ps):
        return torch.func.functional_call(module, dict(zip(params, ps)), (x,))

    ref = torch.func.jvp(fn, tuple(params.values()), tuple(tangent.values()))[1]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
