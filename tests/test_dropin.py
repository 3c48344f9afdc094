"""Drop-in readiness (issue 13, items 2-9): .grad and max_grad_norm, the default backend,
target dtypes and bad batches, atomic steps, memory guards, precision, fisher_type by loss,
psd_clip with the low-rank backend."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from ocnopt.backends import AutogradBackend, LowRankBackend, MemoryBudgetError
from torch import nn

import ocnopt
from ocnopt import OCNOpt

HAS_BACKPACK = importlib.util.find_spec("backpack") is not None


def mlp(seed: int = 0, d_in: int = 4, hidden: int = 6, classes: int = 3,
        dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(dtype)


def batch(B: int = 8, d_in: int = 4, classes: int = 3, seed: int = 1,
          dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, d_in, generator=g, dtype=dtype),
            torch.randint(0, classes, (B,), generator=g))


def autograd_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss=None) -> list[torch.Tensor]:
    """The batch gradient of the mean loss at the model's current parameters (a reference)."""
    ref = copy.deepcopy(model)
    out = ref(x)
    value = (loss or nn.functional.cross_entropy)(out, y)
    return list(torch.autograd.grad(value, list(ref.parameters())))


# ---- item 2: .grad holds Qbar_u, max_grad_norm ------------------------------------------------
@pytest.mark.parametrize("curvature, order, backend", [
    ("adam", 1, "autograd"), ("kfac", 1, "autograd"), ("kfac", 1, "lowrank"), ("sgd", 1, "lowrank")])
def test_grad_holds_the_batch_gradient_without_weight_decay(curvature, order, backend):
    model = mlp()
    x, y = batch()
    ref = autograd_grads(model, x, y)
    opt = OCNOpt(model, curvature=curvature, order=order, backend=backend, weight_decay=0.1)
    opt.step(x, y)
    for p, g in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["autograd", "lowrank"])
def test_grad_at_order_two_is_qbar_u(backend):
    """Without the value correction Qbar_u is the plain gradient; with it, the last layer's
    (nothing after it corrects its value) still is, and the first layer's differs."""
    x, y = batch()
    for correction in (False, True):
        model = mlp()
        ref = autograd_grads(model, x, y)
        opt = OCNOpt(model, curvature="adam", order=2, backend=backend, lr=0.5,
                     value_correction=correction)
        opt.step(x, y)
        grads = [p.grad for p in model.parameters()]
        for g, r in zip(grads[2:], ref[2:]):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
        if not correction:
            for g, r in zip(grads[:2], ref[:2]):
                torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
        else:
            assert not torch.allclose(grads[0], ref[0], rtol=1e-6, atol=1e-9)


def test_tied_parameters_get_the_summed_gradient():
    torch.manual_seed(0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = batch()
    ref = autograd_grads(model, x, y)
    opt = OCNOpt(model, curvature="adam")
    opt.step(x, y)
    for p, g in zip(model.parameters(), ref):  # parameters() lists the tied weight once
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_skipped_step_leaves_grad_and_set_grad_false_leaves_it_alone():
    model = mlp()
    x, y = batch()
    opt = OCNOpt(model, curvature="kfac", set_grad=False)
    opt.step(x, y)
    assert all(p.grad is None for p in model.parameters())
    opt = OCNOpt(model, curvature="adam")
    opt.step(x, y)
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(ocnopt.NonFiniteStepWarning):
        opt.step(torch.full_like(x, float("nan")), y)
    for p, g in zip(model.parameters(), before):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_max_grad_norm_clips_the_global_norm_before_the_curvature_model(max_norm):
    """sgd without momentum at order 1: the step is -lr times the clipped gradient."""
    model = mlp()
    x, y = batch()
    ref = autograd_grads(model, x, y)
    norm = torch.sqrt(sum(g.square().sum() for g in ref))
    c = min(1.0, max_norm / (float(norm) + 1e-6))
    before = [p.detach().clone() for p in model.parameters()]
    opt = OCNOpt(model, curvature="sgd", lr=0.3, max_grad_norm=max_norm)
    opt.step(x, y)
    assert opt.last_step.grad_norm == pytest.approx(float(norm), rel=1e-10)
    for p, p0, g in zip(model.parameters(), before, ref):
        torch.testing.assert_close(p.grad, c * g, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.detach(), p0 - 0.3 * c * g, rtol=1e-10, atol=1e-12)
    clipped = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
    assert float(clipped) <= max_norm * (1 + 1e-9)


def test_max_grad_norm_at_order_two_clips_each_player():
    model = mlp()
    x, y = batch()
    opt = OCNOpt(model, curvature="adam", order=2, max_grad_norm=1e-3)
    opt.step(x, y)
    for layer in (model[0], model[2]):
        norm = torch.sqrt(sum(p.grad.square().sum() for p in layer.parameters()))
        assert float(norm) == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(ValueError, match=r"invalid max_grad_norm=-1.*accepted a finite number > 0"):
        OCNOpt(mlp(), max_grad_norm=-1)


# ---- item 3: the default backend ------------------------------------------------------------
@pytest.mark.parametrize("kwargs, expected", [
    ({}, AutogradBackend), ({"order": 2}, LowRankBackend),
    ({"order": 2, "curvature": "kfac"}, LowRankBackend),
    ({"order": 2, "gauss_newton": False}, AutogradBackend), ({"order": 2, "mu": 0.1}, AutogradBackend),
    ({"order": 2, "curvature": "full"}, AutogradBackend), ({"curvature": "full"}, AutogradBackend)])
def test_default_backend_is_resolved_by_order_and_options(kwargs, expected):
    opt = OCNOpt(mlp(), **kwargs)
    assert type(opt.backend) is expected
    assert opt.backend_name == expected.name


def test_order_two_default_runs_the_issue_mlp():
    """784-256-10 at batch 64: the old default (autograd) refused it (about 51 GiB)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    opt = OCNOpt(model, order=2, curvature="kfac")
    loss = opt.step(x, y)
    assert torch.isfinite(loss) and opt.step_count == 1


def test_backend_without_second_order_names_the_alternatives():
    class FirstOrderOnly(AutogradBackend):
        second_order_capable = False

    with pytest.raises(ValueError, match=r"has none \(use backend 'lowrank' or 'autograd'\)"):
        OCNOpt(mlp(), order=2, backend=FirstOrderOnly())


# ---- item 4: targets, empty batches, inference mode, meta device ------------------------------
CONFIGS = [(1, "autograd", "adam"), (1, "lowrank", "kfac"), (2, "autograd", "kfac"),
           (2, "lowrank", "kfac"), (2, "lowrank", "adam")]
if HAS_BACKPACK:
    CONFIGS += [(1, "backpack", "kfac"), (2, "backpack", "kfac")]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
@pytest.mark.parametrize("order, backend, curvature", CONFIGS)
def test_integer_targets_of_any_dtype(order, backend, curvature, dtype):
    x, y = batch()
    runs = []
    for targets in (y, y.to(dtype)):
        model = mlp()
        opt = OCNOpt(model, order=order, backend=backend, curvature=curvature, lr=0.1)
        for _ in range(2):
            opt.step(x, targets)
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(p, q)


def test_empty_batch_is_a_value_error_not_a_skip():
    opt = OCNOpt(mlp())
    x, y = batch()
    with pytest.raises(ValueError, match=r"empty batch: inputs of shape \(0, 4\)"):
        opt.step(x[:0], y[:0])
    assert opt.skipped_steps == 0 and not opt._warned_nonfinite


def test_inference_mode_is_refused_and_inference_tensors_work():
    model = mlp()
    opt = OCNOpt(model)
    x, y = batch()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inference_mode\(\).*outside"):
        opt.step(x, y)
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
    assert torch.isfinite(opt.step(xi, yi))


def test_meta_device_is_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"model.0.weight is on the meta device.*to_empty"):
        OCNOpt(model)
    opt = OCNOpt(mlp())
    with pytest.raises(ValueError, match=r"meta device"):
        opt.step(torch.empty(8, 4, device="meta", dtype=torch.float64), torch.zeros(8).long())


# ---- item 5: atomic steps -------------------------------------------------------------------
def bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


def snapshot(model: nn.Module, opt: OCNOpt) -> dict:
    return {"params": [p.detach().clone() for p in model.parameters()],
            "buffers": [b.clone() for b in model.buffers()],
            "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            "state": copy.deepcopy(opt.state_dict()), "generator": opt.generator.get_state(),
            "steps": (opt.step_count, opt.skipped_steps)}


def assert_same(a: dict, b: dict) -> None:
    for key in ("params", "buffers"):
        for s, t in zip(a[key], b[key]):
            assert torch.equal(s, t), key
    for s, t in zip(a["grads"], b["grads"]):
        assert (s is None and t is None) or torch.equal(s, t)
    assert torch.equal(a["generator"], b["generator"])
    assert a["steps"] == b["steps"]
    sa, sb = a["state"]["state"], b["state"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        if k == "ocnopt":
            continue
        assert sa[k].keys() == sb[k].keys()
        for name, v in sa[k].items():
            w = sb[k][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (k, name)


class Injected(RuntimeError):
    pass


def fail_after(fn, calls: int = 1):
    """fn, raising ``Injected`` at its ``calls``-th call (after running it)."""
    count = [0]

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        count[0] += 1
        if count[0] >= calls:
            raise Injected("injected failure")
        return out
    return wrapped


def inject(phase: str, opt: OCNOpt, mp: pytest.MonkeyPatch) -> None:
    # order 1 runs the connected passes (the MC statistics too) where the backend has them
    connected = opt.order == 1 and opt.backend.connected_first_order
    if phase == "nominal":  # after the forward pass updated the BatchNorm statistics
        name = "forward_connected" if connected else "forward"
        mp.setattr(opt.backend, name, fail_after(getattr(opt.backend, name)))
    elif phase == "expansion":
        name = "expand_stage" if opt.order == 2 else \
            "backward_connected" if connected else "backward"
        mp.setattr(opt.backend, name, fail_after(getattr(opt.backend, name)))
    elif phase == "policy":  # the second player's curvature update
        mp.setattr(opt.model_, "update", fail_after(opt.model_.update, calls=2))
    elif phase == "update":  # after the first player moved
        if opt.order == 2:
            last = opt.stages[-1]
            mp.setattr(last, "replay", fail_after(last.replay))
        else:
            original = opt.engine.apply_directions

            def half(params, directions, alpha):
                original(params[:1], directions[:1], alpha)
                raise Injected("injected failure")
            mp.setattr(opt.engine, "apply_directions", half)
    elif phase == "commit":  # after the curvature states were replaced
        mp.setattr(ocnopt.optimizer, "_set_grad", fail_after(ocnopt.optimizer._set_grad, calls=2))


@pytest.mark.parametrize("phase", ["nominal", "expansion", "policy", "update", "commit"])
@pytest.mark.parametrize("order, backend, curvature, kw", [
    (1, "autograd", "kfac", {"fisher_type": "mc"}),  # the generator draws labels
    (2, "autograd", "adam", {}), (2, "lowrank", "kfac", {"fisher_type": "mc"})])
def test_a_failing_step_leaves_everything_as_before(phase, order, backend, curvature, kw,
                                                     monkeypatch):
    x, y = batch(B=8)
    runs = []
    for fail in (False, True):
        model = bn_model()
        opt = OCNOpt(model, order=order, backend=backend, curvature=curvature, lr=0.1, **kw)
        opt.step(x, y)
        if fail:
            before = snapshot(model, opt)
            with monkeypatch.context() as mp:
                inject(phase, opt, mp)
                with pytest.raises((Injected, ValueError), match="injected failure"):
                    opt.step(x + 0.5, y)  # (the nominal pass names the inputs: ValueError)
            assert_same(before, snapshot(model, opt))
        opt.step(x - 0.5, y)  # the next step is the one of a run that never failed
        runs.append(snapshot(model, opt))
    assert_same(*runs)


# ---- item 6: memory guards ------------------------------------------------------------------
def test_wide_layer_is_refused_before_allocating_its_factors():
    """The VGG classifier's Linear(25088, 10): A alone would be 2.5 GB."""
    model = nn.Sequential(nn.Linear(25088, 10))
    with pytest.raises(MemoryBudgetError,
                       match=r"layer model.0 .*bytes.*A \(25088, 25088\) and G \(10, 10\).*"
                             r"over memory_budget=2048.0 MiB; set kfac_max_dim < 25088"):
        OCNOpt(model, curvature="kfac")
    with pytest.raises(MemoryBudgetError, match=r"model.0"):
        OCNOpt(model, curvature="ekfac", order=2)


def test_memory_budget_on_a_moderate_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 8), nn.Tanh(), nn.Linear(8, 3))
    need = 2 * (512 * 512 + 64) * 4 + 2 * 512 * 512 * 8
    with pytest.raises(MemoryBudgetError, match=rf"\({need} bytes\) .*A \(512, 512\)"):
        OCNOpt(model, curvature="kfac", memory_budget=need - 1)
    OCNOpt(model, curvature="kfac", memory_budget=need)
    OCNOpt(model, curvature="kfac", memory_budget=need - 1, kfac_max_dim=256)  # on the fallback
    OCNOpt(model, curvature="adam", memory_budget=need - 1)  # no factors


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
@pytest.mark.parametrize("order, backend", [(1, "autograd"), (2, "lowrank")])
def test_kfac_max_dim_puts_wide_layers_on_the_diagonal_fallback(curvature, order, backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 12)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 12, (8,))
    opt = OCNOpt(model, curvature=curvature, order=order, backend=backend, kfac_max_dim=4)
    for _ in range(2):
        opt.step(x, y)
    assert opt.last_step.diagonal_fallback == ["2"]
    assert "A" in opt.state[model[0].weight] and "A" not in opt.state[model[2].weight]
    assert "diag" in opt.state[model[2].weight] and "diag" in opt.state[model[2].bias]
    opt.param_groups[0]["kfac_max_dim"] = None
    with pytest.raises(ValueError, match=r"invalid kfac_max_dim=0"):
        OCNOpt(model, curvature=curvature, kfac_max_dim=0)


# ---- item 7: precision ----------------------------------------------------------------------
@pytest.mark.parametrize("curvature", ["adam", "adamw", "rmsprop"])
def test_float16_with_an_eps_model_is_refused_with_the_fix(curvature):
    with pytest.raises(ValueError, match=r"model.0.weight is float16.*eps.*underflows.*autocast"):
        OCNOpt(mlp(dtype=torch.float16), curvature=curvature)
    OCNOpt(mlp(dtype=torch.float16), curvature="sgd")


@pytest.mark.parametrize("curvature", ["adam", "kfac"])
def test_autocast_bfloat16_forward_at_order_one(curvature):
    x, y = batch(B=32, d_in=8, dtype=torch.float32)
    runs = []
    for autocast in (False, True):
        model = mlp(d_in=8, hidden=16, dtype=torch.float32)
        opt = OCNOpt(model, curvature=curvature, lr=1e-2)
        losses = []
        for _ in range(3):
            if autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    losses.append(float(opt.step(x, y)))
            else:
                losses.append(float(opt.step(x, y)))
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
                   for p in model.parameters())
        runs.append((model, losses))
    (m32, l32), (m16, l16) = runs
    assert all(torch.isfinite(torch.tensor(l16)))
    assert l16 == pytest.approx(l32, rel=2e-2)
    for p, q in zip(m32.parameters(), m16.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=2e-2)


def test_autocast_at_order_two_is_refused():
    opt = OCNOpt(mlp(dtype=torch.float32), order=2, curvature="kfac")
    x, y = batch(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16), \
            pytest.raises(RuntimeError, match=r"order 2.*autocast.*supported at order 1"):
        opt.step(x, y)


# ---- item 8: fisher_type by loss ------------------------------------------------------------
@pytest.mark.parametrize("loss, order, backend, expected", [
    ("mse", 1, None, "type-2"), (nn.MSELoss(), 1, None, "type-2"), ("mse", 2, None, "type-2"),
    ("mse", 2, "autograd", "type-2"), ("cross_entropy", 1, None, "empirical"),
    ("cross_entropy", 2, None, "empirical")]
    + ([("mse", 1, "backpack", "empirical")] if HAS_BACKPACK else []))
def test_fisher_type_default_by_loss(loss, order, backend, expected):
    opt = OCNOpt(mlp(), loss=loss, curvature="kfac", order=order, backend=backend)
    assert opt.param_groups[0]["fisher_type"] == expected
    if expected == "type-2" and isinstance(opt.backend, LowRankBackend):
        assert opt.backend.terminal == "exact"  # the propagated factor follows it


def test_fisher_type_given_is_kept_and_mse_default_equals_explicit_type2():
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randn(8, 3, dtype=torch.float64)
    assert OCNOpt(mlp(), loss="mse", curvature="kfac",
                  fisher_type="empirical").param_groups[0]["fisher_type"] == "empirical"
    runs = []
    for kw in ({}, {"fisher_type": "type-2"}):
        model = mlp()
        opt = OCNOpt(model, loss="mse", curvature="ekfac", **kw)
        for _ in range(2):
            opt.step(x, y)
        runs.append(model)
    for p, q in zip(*(m.parameters() for m in runs)):
        assert torch.equal(p, q)


# ---- item 9: psd_clip with the low-rank backends --------------------------------------------
@pytest.mark.parametrize("backend", ["lowrank"] + (["backpack"] if HAS_BACKPACK else []))
def test_psd_clip_false_is_refused_by_the_factor_backends(backend):
    with pytest.raises(ValueError, match=rf"invalid psd_clip=False for backend '{backend}'.*"
                                         r"accepted psd_clip=True \(or backend 'autograd'"):
        OCNOpt(mlp(), order=2, curvature="kfac", backend=backend, psd_clip=False)
    OCNOpt(mlp(), order=2, curvature="kfac", backend="autograd", psd_clip=False)



@pytest.mark.parametrize("order, backend", [(1, "autograd"), (2, "lowrank")])
def test_set_grad_changes_no_step_of_kfac(order, backend):
    """set_grad=True forms Qbar_u where K-FAC's direction comes from the statistics' rows
    (B = 2 against 20 x 16 and 16 x 3 layers): the steps are those of set_grad=False."""
    runs = []
    for set_grad in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        x, y = batch(B=2, d_in=20)
        opt = OCNOpt(model, curvature="kfac", order=order, backend=backend, lr=0.1,
                     set_grad=set_grad)
        for _ in range(3):
            opt.step(x, y)
        runs.append(model)
    for p, q in zip(*(m.parameters() for m in runs)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert all(p.grad is not None for p in runs[0].parameters())
    assert all(p.grad is None for p in runs[1].parameters())


def test_a_skipped_step_restores_the_batchnorm_statistics():
    """A non-finite batch would leave NaN running statistics: the skip puts them back."""
    model = bn_model()
    opt = OCNOpt(model, curvature="adam")
    x, y = batch()
    opt.step(x, y)
    before = [b.clone() for b in model.buffers()]
    with pytest.warns(ocnopt.NonFiniteStepWarning):
        opt.step(torch.full_like(x, float("nan")), y)
    assert opt.skipped_steps == 1
    for b, b0 in zip(model.buffers(), before):
        assert torch.equal(b, b0)
