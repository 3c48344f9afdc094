"""The generic battery every curvature model passes (torch's optimizer test battery, for OCNOpt).

Every case runs a tiny Linear-Tanh-Linear chain through the same checks: state_dict round trip
(bit for bit), LR schedulers, the non-finite guard, determinism, the returned losses and dtypes;
a few order-2 cases run the bookkeeping checks too (the scheduler check needs du = -lr d, so it
stays at order 1). Cases iterate over ``ocnopt.CURVATURES`` so a new curvature model is covered
as soon as it is registered; ``HYPER`` turns on the optional state of each (momentum buffers,
amsgrad, centered averages) so that the state being checked is not empty.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ocnopt
from ocnopt import NonFiniteStepWarning, OCNOpt

HYPER: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    "rmsprop": {"lr": 1e-2, "momentum": 0.5, "centered": True},
    "adam": {"lr": 1e-2, "amsgrad": True},
    "adamw": {"lr": 1e-2, "weight_decay": 0.1},
    "kfac": {"lr": 0.1, "damping": 0.1, "momentum": 0.5, "inv_every": 2},
    "ekfac": {"lr": 0.1, "damping": 0.1, "inv_every": 2},
    "full": {"lr": 0.5, "damping": 0.1},
    "shampoo": {"lr": 1e-2, "momentum": 0.5, "weight_decay": 1e-2, "preconditioning_compute_steps": 2,
                "matrix_eps": 1e-3},  # float32 agrees with float64 to 1e-5 (1e-6: to 1e-4)
    # SOAP's decay multiplies the moved parameters, (u - lr d)(1 - lr wd): du is not -lr times
    # a direction independent of lr, which the scheduler check needs; decay is checked against
    # the twin in test_equivalence_soap.py
    "soap": {"lr": 1e-2, "precondition_frequency": 2, "precondition_1d": True, "weight_decay": 0.0},
}


#: models whose first step does not move the parameters (SOAP's initialises the eigenbases; the
#: Shampoo case's inverse roots are zero until its first compute step, step 2)
FIRST_STEP_STILL = {"soap", "shampoo"}
#: SOAP's eigenbases of rank-deficient factors are, inside the null space, whatever basis the
#: rounding picks, and Adam's step is not invariant to it: float32 and float64 runs take
#: different (equally valid) steps, so only their dtypes are compared
BASIS_BY_ROUNDING = {"soap"}


def _case(name: str, *more: Any, **extra: Any):
    hp = {**HYPER.get(name, {}), **extra}
    label = name + "".join(f"-{k}={v}" for k, v in extra.items())
    return pytest.param(name, hp, *more, id="-".join([label, *map(str, more)]))


CASES = [_case(name) for name in sorted(ocnopt.CURVATURES)]
# Kronecker models whose checkpoint lands between statistics and inverse refreshes, and the
# sampled Fisher, whose labels come from the optimizer's generator.
KRONECKER_CASES = [
    _case("kfac", stat_every=2, inv_every=3),
    _case("ekfac", stat_every=2, inv_every=3),
    _case("kfac", fisher_type="mc"),
    _case("ekfac", fisher_type="mc", stat_every=2, inv_every=3),
    _case("kfac", fisher_type="type-2", stat_every=2, inv_every=3),
]
# Order 2 (DDP feedback policies, exact backend): the same bookkeeping must hold.
ORDER2_CASES = [
    _case("adam", order=2),
    _case("kfac", order=2, stat_every=2, inv_every=3),
    # the scalable backends pass the same battery (issue: every backend, same checks)
    _case("adam", order=2, backend="lowrank"),
    _case("kfac", order=2, backend="lowrank", stat_every=2, inv_every=3),
    _case("ekfac", order=2, backend="lowrank", backend_options={"terminal": "mc"}),
    _case("kfac", order=2, backend="backpack", stat_every=2, inv_every=3),
    _case("ekfac", backend="backpack", backend_options={"extension": "kfac"}),
]


def _extra(param) -> dict[str, Any]:
    """The options a case adds to ``HYPER`` (to re-derive it with more parameters)."""
    name, hp = param.values[:2]
    return {k: v for k, v in hp.items() if HYPER.get(name, {}).get(k, object()) != v}



def _opt(model: nn.Module, curvature: str, hp: dict[str, Any], **kw: Any) -> OCNOpt:
    return OCNOpt(model, curvature=curvature, **{**hp, **kw})


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_params_equal(model: nn.Module, expected: list[torch.Tensor]) -> None:
    got = list(model.parameters())
    assert len(got) == len(expected)
    for i, (p, q) in enumerate(zip(got, expected)):
        assert p.dtype == q.dtype and torch.equal(p.detach(), q), f"parameter {i} differs"


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Deep, exact comparison of nested dicts / lists / tensors (state dicts)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"tensors differ at {path}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"keys differ at {path}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _snapshot(opt: OCNOpt) -> dict[str, Any]:
    """Everything the optimizer carries, detached from the live objects; the skip counter is
    left out (it is supposed to change on a skipped step)."""
    sd = copy.deepcopy(opt.state_dict())
    sd["state"]["ocnopt"].pop("skipped_steps")
    return sd


# ---- state_dict round trip -----------------------------------------------------------------
N_BEFORE, N_AFTER = 5, 4


def _transport(obj: dict[str, Any], how: str) -> dict[str, Any]:
    if how == "torch.save":
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)
    if how == "deepcopy":
        return copy.deepcopy(obj)
    return obj  # "in-memory": the dict returned by state_dict(), kept as is


def _round_trip(curvature: str, hp: dict[str, Any], how: str, make_mlp, make_batches) -> None:
    batches = make_batches(N_BEFORE + N_AFTER)
    model = make_mlp(seed=0)
    opt = _opt(model, curvature, hp)
    for x, y in batches[:N_BEFORE]:
        opt.step(x, y)
    saved = _transport({"opt": opt.state_dict(), "model": model.state_dict()}, how)
    if how == "in-memory":  # the model's tensors are updated in place: snapshot them
        saved["model"] = {k: v.clone() for k, v in saved["model"].items()}
    for x, y in batches[N_BEFORE:]:
        opt.step(x, y)
    assert opt.step_count == N_BEFORE + N_AFTER

    model2 = make_mlp(seed=123)  # different init: everything must come from the checkpoint
    opt2 = _opt(model2, curvature, hp)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.step_count == N_BEFORE
    for x, y in batches[N_BEFORE:]:
        opt2.step(x, y)
    _assert_params_equal(model2, _params(model))
    assert opt2.step_count == N_BEFORE + N_AFTER
    assert_same(_snapshot(opt2), _snapshot(opt))


ROUND_TRIPS = [
    *[_case(p.values[0], "torch.save", **_extra(p)) for p in CASES + KRONECKER_CASES
      + ORDER2_CASES],
    *[_case(p.values[0], "deepcopy", **_extra(p)) for p in CASES],
]


@pytest.mark.parametrize("curvature, hp, how", ROUND_TRIPS)
def test_state_dict_round_trip_is_bit_exact(curvature, hp, how, make_mlp, make_batches):
    _round_trip(curvature, hp, how, make_mlp, make_batches)


@pytest.mark.parametrize("curvature, hp", [KRONECKER_CASES[0]])
def test_state_dict_in_memory_is_a_snapshot(curvature, hp, make_mlp, make_batches):
    _round_trip(curvature, hp, "in-memory", make_mlp, make_batches)


@pytest.mark.parametrize("curvature, hp", CASES)
def test_state_dict_step_counter_is_not_aliased(curvature, hp, make_mlp, make_batches):
    model = make_mlp()
    opt = _opt(model, curvature, hp)
    batches = make_batches(3)
    opt.step(*batches[0])
    sd = opt.state_dict()
    opt.step(*batches[1])
    opt.step(*batches[2])
    assert sd["state"]["ocnopt"]["step"] == 1


def test_load_state_dict_refuses_another_curvature(make_mlp, make_batches):
    opt = OCNOpt(make_mlp(), curvature="adam")
    opt.step(*make_batches(1)[0])
    other = OCNOpt(make_mlp(), curvature="sgd")
    with pytest.raises(ValueError, match=r"curvature='adam'.*curvature='sgd'"):
        other.load_state_dict(opt.state_dict())


# ---- LR schedulers -------------------------------------------------------------------------
LR0 = 0.02
SCHEDULES = {
    "StepLR": (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
               lambda k: LR0 * 0.5 ** (k // 2)),
    "LambdaLR": (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k)),
                 lambda k: LR0 * (1.0 / (1 + k))),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("curvature, hp", CASES)
def test_lr_scheduler_sets_lr_and_scales_the_step(curvature, hp, schedule, make_mlp,
                                                  make_batches):
    make_sched, lr_at = SCHEDULES[schedule]
    batches = make_batches(4, dtype=torch.float64)
    model = make_mlp(dtype=torch.float64)
    opt = _opt(model, curvature, hp, lr=LR0)
    sched = make_sched(opt)
    manual_model = make_mlp(dtype=torch.float64)  # same run, lr set by hand
    manual = _opt(manual_model, curvature, hp, lr=LR0)
    for k, (x, y) in enumerate(batches):
        lr = opt.param_groups[0]["lr"]
        assert lr == pytest.approx(lr_at(k), rel=1e-12, abs=0)
        # the direction d of du = -lr d at this state, from a twin at lr = 1
        twin_model = make_mlp(seed=7, dtype=torch.float64)
        twin_model.load_state_dict(model.state_dict())
        twin = _opt(twin_model, curvature, hp)
        twin.load_state_dict(copy.deepcopy(opt.state_dict()))
        twin.param_groups[0]["lr"] = 1.0
        before = _params(model)
        twin.step(x, y)
        opt.step(x, y)
        sched.step()
        for p0, p, q in zip(before, model.parameters(), twin_model.parameters()):
            torch.testing.assert_close(p.detach() - p0, lr * (q.detach() - p0),
                                       rtol=1e-6, atol=1e-12)
        manual.param_groups[0]["lr"] = lr_at(k)
        manual.step(x, y)
        _assert_params_equal(manual_model, _params(model))
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(len(batches)), rel=1e-12)
    constant_model = make_mlp(dtype=torch.float64)
    constant = _opt(constant_model, curvature, hp, lr=LR0)
    for x, y in batches:
        constant.step(x, y)
    assert not all(torch.equal(p, q) for p, q in zip(constant_model.parameters(),
                                                       model.parameters()))


# ---- non-finite guard ----------------------------------------------------------------------
def _bad_batch(kind: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone()
    if kind == "nan-input":  # loss is NaN
        x[0, 0] = float("nan")
        return x, y
    if kind == "inf-input":  # loss finite (tanh saturates), the update is not
        x[0, 0] = float("inf")
        return x, y
    # "inf-loss": probability targets with an infinite entry make the loss +inf
    probs = F.one_hot(y, 3).to(x.dtype)
    probs[0, 0] = float("inf")
    return x, probs


NONFINITE = ["nan-input", "inf-input", "inf-loss"]
MC_NONFINITE = [pytest.param(kind, id=f"mc-{kind}") for kind in NONFINITE]


def _nonfinite(curvature, hp, kind, make_mlp, make_batches):
    batches = make_batches(6)
    good_before, bad, good_after = batches[:3], batches[3], batches[4:]
    bad_x, bad_y = _bad_batch(kind, *bad)

    model = make_mlp()
    opt = _opt(model, curvature, hp)
    for x, y in good_before:
        opt.step(x, y)
    params_before, state_before = _params(model), _snapshot(opt)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [opt.step(bad_x, bad_y), opt.step(bad_x, bad_y)]
        assert opt.last_step is not None and opt.last_step.skipped
    ours = [w for w in caught if issubclass(w.category, NonFiniteStepWarning)]
    assert len(ours) == 1
    assert opt.skipped_steps == 2
    assert opt.step_count == len(good_before)
    if kind == "nan-input":
        assert all(math.isnan(float(v)) for v in losses)
    if kind == "inf-loss":
        assert all(float(v) == math.inf for v in losses)
    _assert_params_equal(model, params_before)
    assert_same(_snapshot(opt), state_before)

    ref_model = make_mlp()
    ref = _opt(ref_model, curvature, hp)
    for x, y in good_before + good_after:
        ref.step(x, y)
    for x, y in good_after:
        opt.step(x, y)
        assert not opt.last_step.skipped
    _assert_params_equal(model, _params(ref_model))
    assert_same(_snapshot(opt), _snapshot(ref))
    assert opt.skipped_steps == 2 and ref.skipped_steps == 0


@pytest.mark.parametrize("curvature, hp, kind", [
    *[_case(p.values[0], kind, **_extra(p)) for p in CASES for kind in NONFINITE],
    *[_case(p.values[0], "nan-input", **_extra(p)) for p in KRONECKER_CASES[:2] + ORDER2_CASES],
])
def test_nonfinite_step_is_skipped_without_trace(curvature, hp, kind, make_mlp, make_batches):
    _nonfinite(curvature, hp, kind, make_mlp, make_batches)


@pytest.mark.parametrize("kind", MC_NONFINITE)
def test_nonfinite_step_is_skipped_without_trace_mc(kind, make_mlp, make_batches):
    _nonfinite("kfac", {**HYPER["kfac"], "fisher_type": "mc"}, kind, make_mlp, make_batches)


# ---- determinism ---------------------------------------------------------------------------
def _train(curvature, hp, make_mlp, make_batches, *, seed=0, dropout=False):
    torch.manual_seed(0)
    model = make_mlp()
    if dropout:
        model.insert(2, nn.Dropout(0.25))
    opt = _opt(model, curvature, hp, seed=seed)
    torch.manual_seed(42)  # dropout masks come from the global generator
    for x, y in make_batches(4):
        opt.step(x, y)
    return model, opt


@pytest.mark.parametrize("curvature, hp", CASES + KRONECKER_CASES[2:4] + ORDER2_CASES)
def test_two_runs_from_one_seed_are_identical(curvature, hp, make_mlp, make_batches):
    m1, o1 = _train(curvature, hp, make_mlp, make_batches, dropout=True)
    m2, o2 = _train(curvature, hp, make_mlp, make_batches, dropout=True)
    _assert_params_equal(m2, _params(m1))
    assert_same(_snapshot(o2), _snapshot(o1))
    assert not all(torch.equal(p, q) for p, q in zip(m1.parameters(), make_mlp().parameters()))


def test_mc_fisher_depends_on_the_optimizer_seed(make_mlp, make_batches):
    hp = {"lr": 0.1, "fisher_type": "mc"}
    m1, _ = _train("kfac", hp, make_mlp, make_batches, seed=0)
    m2, _ = _train("kfac", hp, make_mlp, make_batches, seed=0)
    m3, _ = _train("kfac", hp, make_mlp, make_batches, seed=1)
    _assert_params_equal(m2, _params(m1))
    assert not all(torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters()))


# ---- returned losses -----------------------------------------------------------------------
def _mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str) -> float:
    with torch.no_grad():
        out = model(x)
        return float(F.cross_entropy(out, y) if loss == "cross_entropy" else F.mse_loss(out, y))


@pytest.mark.parametrize("curvature, hp, loss", [
    *[_case(p.values[0], loss, **_extra(p)) for p in CASES for loss in ("cross_entropy", "mse")],
    *[_case(p.values[0], "cross_entropy", **_extra(p)) for p in ORDER2_CASES],
])
def test_step_returns_loss_before_and_tracks_loss_after(curvature, hp, loss, make_mlp,
                                                        make_batches):
    model = make_mlp()
    opt = _opt(model, curvature, hp, loss=loss, track_loss_after=True)
    untracked_model = make_mlp()
    untracked = _opt(untracked_model, curvature, hp, loss=loss)
    g = torch.Generator().manual_seed(3)
    for k, (x, y) in enumerate(make_batches(3)):
        if loss == "mse":
            y = torch.randn(x.shape[0], 3, generator=g)
        expected_before = _mean_loss(model, x, y, loss)
        before = opt.step(x, y)
        assert isinstance(before, torch.Tensor) and before.dim() == 0
        assert float(before) == pytest.approx(expected_before, rel=1e-6, abs=1e-7)
        assert float(opt.last_step.loss) == pytest.approx(expected_before, rel=1e-6, abs=1e-7)
        assert opt.last_step.loss_after == pytest.approx(_mean_loss(model, x, y, loss),
                                                         rel=1e-6, abs=1e-7)
        if not (k == 0 and curvature in FIRST_STEP_STILL):
            assert opt.last_step.loss_after != pytest.approx(expected_before, rel=1e-9, abs=0)
        assert float(untracked.step(x, y)) == float(before)
        if hp.get("order", 1) == 1:  # order 2 gets it for free from its update pass
            assert untracked.last_step.loss_after is None
    _assert_params_equal(untracked_model, _params(model))  # tracking does not change the step


# ---- dtypes --------------------------------------------------------------------------------
def _state_tensors(opt: OCNOpt, model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}/{k}": v for i, p in enumerate(model.parameters())
            for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("curvature, hp", CASES + KRONECKER_CASES[2:3] + ORDER2_CASES[:1])
def test_float32_and_float64_models(curvature, hp, make_mlp, make_batches):
    final = {}
    for dtype in (torch.float32, torch.float64):
        model = make_mlp(dtype=dtype)
        opt = _opt(model, curvature, hp)
        start = _params(model)
        for x, y in make_batches(3, dtype=dtype):
            loss = opt.step(x, y)
            assert torch.isfinite(loss) and not opt.last_step.skipped
        assert all(p.dtype == dtype for p in model.parameters())
        assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), start))
        tensors = _state_tensors(opt, model)
        floating = {k: v for k, v in tensors.items()
                    if v.is_floating_point() and not k.endswith("/step")}
        assert floating, "the case must carry floating-point state"
        for key, v in floating.items():
            assert v.dtype == dtype, f"state {key} is {v.dtype} in a {dtype} model"
        final[dtype] = _params(model)
    if curvature in BASIS_BY_ROUNDING:
        return
    for p32, p64 in zip(final[torch.float32], final[torch.float64]):
        torch.testing.assert_close(p32.double(), p64, rtol=1e-5, atol=1e-5)
