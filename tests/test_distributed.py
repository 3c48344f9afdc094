"""Data-parallel training (docs/method.md section 13) on P processes (gloo, CPU)
with the global batch split unevenly gives the parameters, the optimizer state and the losses
of one process on the whole batch, float64, over several steps: every curvature model at order
1, order 2 with the lowrank, autograd and backpack backends, a residual graph, an ODE block; a
non-finite loss on one process skips the step on all; a checkpoint saved by rank 0 resumes on
another number of processes; inversions split across processes equal inversions everywhere;
the bytes counted by the reducer are those of the quantities of docs/method.md section 13.

One spawn per world size runs every configuration (``_distributed.CASES``) and returns the
results of every rank."""

from __future__ import annotations

import _distributed as T
import pytest
import torch

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

#: relative tolerance per case: 1e-10, except where the model's own matrix functions amplify
#: rounding: Shampoo's inverse roots and SOAP's eigenbases move by ~1.6e-10 when the same batch
#: is only reordered on one process
TOL = {"o1-soap": 1e-9, "o1-shampoo": 1e-9}
#: the configurations the 3-process spawn repeats (the 2-process one runs all of them)
THREE = ["o1-adam", "o1-kfac", "o1-ekfac", "o1-full", "o1-residual-kfac", "o2-lowrank-kfac",
         "o2-autograd-full", "nonfinite-o1-kfac", "nonfinite-o2-lowrank-kfac"]


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def compare(name: str, got: dict, ref: dict) -> list[str]:
    """What differs between a rank's run and the reference (empty: equal)."""
    tol = TOL.get(name, 1e-10)
    bad = []
    if len(got["state"]) != len(ref["state"]):
        bad.append(f"{name}: {len(got['state'])} state tensors, reference {len(ref['state'])}")
    for kind in ("params", "state"):
        for i, (a, b) in enumerate(zip(got[kind], ref[kind])):
            if a.shape != b.shape or relerr(a, b) > tol:
                bad.append(f"{name}: {kind}[{i}] relative error "
                           f"{relerr(a, b) if a.shape == b.shape else 'shape'} > {tol}")
    for i, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        if abs(a - b) > tol * abs(b):
            bad.append(f"{name}: loss of step {i} {a} != {b}")
    for i, (a, b) in enumerate(zip(got["steps"], ref["steps"])):
        for key in ("loss_after", "predicted"):
            if (a[key] is None) != (b[key] is None) or (
                    b[key] is not None and abs(a[key] - b[key]) > 1e-9 * max(1.0, abs(b[key]))):
                bad.append(f"{name}: {key} of step {i} {a[key]} != {b[key]}")
    if (got["skipped"], got["step_count"]) != (ref["skipped"], ref["step_count"]):
        bad.append(f"{name}: skipped/steps {got['skipped']}/{got['step_count']} != "
                   f"{ref['skipped']}/{ref['step_count']}")
    return bad


def check_world(world: int, results: list[dict], names: list[str]) -> list[str]:
    bad = []
    for name in names:
        ref = None if name.startswith("shardwise") else T.run_case(name, None)
        for rank, res in enumerate(results):
            if ref is not None:
                bad += [f"rank {rank}/{world} {b}" for b in compare(name, res[name], ref)]
            # the processes hold bit-identical parameters, states and buffers
            mine, first = res[name], results[0][name]
            for a, b in zip(mine["params"] + mine["state"] + mine["buffers"],
                            first["params"] + first["state"] + first["buffers"]):
                if not torch.equal(a, b):
                    bad.append(f"{name}: rank {rank} differs from rank 0")
                    break
    return bad


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist2")
    return T.spawn(2, list(T.CASES), str(out)), out


def test_two_processes_equal_one(two):
    results, _ = two
    bad = check_world(2, results, list(T.CASES))
    assert not bad, "\n".join(bad)


def test_nonfinite_loss_on_one_rank_skips_everywhere(two):
    results, _ = two
    for name in ("nonfinite-o1-kfac", "nonfinite-o2-lowrank-kfac"):
        for res in results:  # the NaN sample is on the last rank only
            steps = res[name]["steps"]
            assert [s["skipped"] for s in steps] == [False, True, False], name
            assert steps[1]["unchanged"], f"{name}: a skipped step moved the parameters"
            assert res[name]["skipped"] == 1


def test_split_inversions_equal_inversions_everywhere(two):
    """The same inverses (up to their memory layout: LAPACK's are column-major, the broadcast
    ones contiguous, so later products may round differently)."""
    results, _ = two
    for res in results:
        for model in ("kfac", "ekfac"):
            split, every = res[f"o1-{model}"], res[f"o1-{model}-everywhere"]
            for a, b in zip(split["state"] + split["params"], every["state"] + every["params"]):
                assert relerr(a, b) < 1e-13, model
            assert split["bytes"]["inverses"] > 0 and "inverses" not in every["bytes"]


def test_bytes_counted_are_the_reduced_quantities(two):
    """Order 1 adam: per step Qbar_u (the parameters' bytes) and (B_p, B_p loss) (16 bytes);
    at construction the parameters of rank 0; K-FAC adds A and G of each layer per step."""
    results, _ = two
    steps = T.STEPS
    res = results[1]["o1-adam"]
    pb = res["param_bytes"]
    assert res["bytes"] == {"gradient": steps * pb, "batch and loss": steps * 16, "setup": pb}
    factors = (4 * 5 + 6 * 7 + 6 * 7 + 3 * 4) // 2 * 8  # upper triangles of A, G per layer
    for name in ("o1-kfac", "o1-kfac-everywhere"):
        kfac = results[0][name]
        assert kfac["bytes"]["statistics"] == steps * factors
        assert kfac["bytes"]["gradient"] == steps * pb
    # order 1 with split inversions: every layer's factors in one all-reduce per step
    # (``KFAC.prefetch``), else one per layer
    assert results[0]["o1-kfac"]["calls"]["statistics"] == steps
    assert results[0]["o1-kfac-everywhere"]["calls"]["statistics"] == 2 * steps


def test_three_processes_and_resume_from_two(two, tmp_path):
    """3 processes (shards 2, 5, 3) equal one; a checkpoint of rank 0 of the 2-process run
    resumes on 3 processes as one process resumes it (and as one process trains throughout)."""
    _, out2 = two
    ckpt = out2 / "checkpoint-2.pt"
    results = T.spawn(3, THREE, str(tmp_path), resume=str(ckpt))
    bad = check_world(3, results, THREE)
    start = torch.load(ckpt, weights_only=False)
    ref = T.run_case("o1-kfac", None, start=start)
    straight = T.run_case("o1-kfac", None, steps=2 * T.STEPS)
    for res in results:
        bad += compare("resume", res["resume"], ref)
        bad += [f"straight: {b}" for b in compare("o1-kfac", {**res["resume"], "skipped": 0,
                                                             "step_count": 2 * T.STEPS,
                                                             "losses": [], "steps": []},
                                                  straight)]
    assert not bad, "\n".join(bad)


def test_one_process_has_no_communication():
    from ocnopt import OCNOpt
    from ocnopt.distributed import Collective, make_collective

    opt = OCNOpt(T.mlp(), curvature="kfac")
    assert not opt.comm.active and type(opt.comm) is Collective
    x = [torch.ones(2)]
    assert opt.comm.mean(x) is x and opt.comm.sum(x) is x and opt.comm.broadcast(x, 0) is x
    assert type(make_collective(None)) is Collective  # torch.distributed not initialised here
    with pytest.raises(ValueError, match="invalid process_group='gloo'"):
        make_collective("gloo")
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        OCNOpt(T.mlp(), process_group=True)


# ---- ocnopt bench run --nproc ---------------------------------------------------------------------
def _bench(*args: str, command: str = "run"):
    pytest.importorskip("sklearn")
    pytest.importorskip("typer")
    from typer.testing import CliRunner

    from ocnopt.cli import app

    return CliRunner().invoke(app, ["bench", command, *map(str, args)])


def test_nproc_refuses_optimizers_that_are_not_ocnopt(tmp_path):
    res = _bench("wine-fcn", "-o", "torch-sgd,autograd-kfac", "--nproc", "2", "--out", tmp_path)
    assert res.exit_code == 2, res.output
    assert "--nproc 2 runs ocnopt optimizers only" in res.stderr and "torch-sgd" in res.stderr
    res = _bench("wine-fcn", "--nproc", "0", "--out", tmp_path)
    assert res.exit_code == 2 and "--nproc must be positive" in res.stderr
    res = _bench("wine-fcn", "-o", "torch-adam", "--nproc", "2", "--out", tmp_path,
                 command="sweep")
    assert res.exit_code == 2 and "--nproc 2 runs ocnopt optimizers only" in res.stderr


@pytest.mark.slow
def test_nproc_two_equals_one_process(tmp_path):
    """``--nproc 2`` (gloo, shards of each minibatch) trains as ``--nproc 1`` up to float32
    rounding: the same minibatch losses and the same final test loss, and records nproc."""
    import json

    names = ["autograd-kfac", "lowrank-kfac-fb"]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        res = _bench("wine-fcn", "-o", ",".join(names), "--epochs", "1", "--seeds", "1",
                     "--subset", "60", "--nproc", str(n), "--out", out, "--json")
        assert res.exit_code == 0, res.output
        runs[n] = {name: json.loads((out / f"train-wine-fcn-{name}-seed0.json").read_text())
                   for name in names}
    for name in names:
        one, two = runs[1][name], runs[2][name]
        assert two["config"]["optimizer"]["nproc"] == 2 and "nproc" not in one["config"]["optimizer"]
        a, b = one["result"]["batch_loss"], two["result"]["batch_loss"]
        assert len(a) == len(b) > 1
        assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-5, name
        fa, fb = one["result"]["final"]["test_loss"], two["result"]["final"]["test_loss"]
        assert abs(fa - fb) < 1e-5 * abs(fa), name


@pytest.mark.slow
def test_sweep_nproc_two_equals_one_process(tmp_path):
    """``sweep --nproc 2`` trains every grid point as ``--nproc 1`` up to float32 rounding."""
    import json

    runs = {}
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        res = _bench("wine-fcn", "-o", "autograd-adam", "--epochs", "1", "--seeds", "1",
                     "--points", "2", "--subset", "60", "--nproc", str(n), "--out", out,
                     "--json", command="sweep")
        assert res.exit_code == 0, res.output
        runs[n] = {f.name: json.loads(f.read_text()) for f in sorted(out.glob("sweep-*-seed*.json"))}
    assert len(runs[1]) == 2 and runs[1].keys() == runs[2].keys()
    for name, one in runs[1].items():
        two = runs[2][name]
        assert two["config"]["optimizer"]["nproc"] == 2
        a, b = one["result"]["batch_loss"], two["result"]["batch_loss"]
        assert len(a) == len(b) > 1
        assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-5, name
