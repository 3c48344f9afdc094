"""ocnopt.bench protocols: reproducible result files, the summaries (tunability,
time-to-target), the overhead protocol and the report rendered from a saved result folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("sklearn")
from ocnopt.bench import optimizers as registry  # noqa: E402
from ocnopt.bench import problems, protocols, report  # noqa: E402

WINE = problems.get_problem("wine-fcn")


def strip_timing(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k != "timing"}


def run_train(out: Path, names: list[str], epochs: int = 2, seeds: tuple[int, ...] = (0,),
              subset: int | None = 48) -> list[dict[str, Any]]:
    data = problems.load(WINE, subset=subset)
    specs = [registry.parse_optimizer(n) for n in names]
    settings = protocols.RunSettings(epochs=epochs, batch_size=16, seeds=list(seeds),
                                     subset=subset)
    return protocols.train_protocol(WINE, data, specs, settings, out)


def test_same_seed_same_result_file(tmp_path: Path) -> None:
    names = ["torch-sgd", "curvlinops-kfac", "autograd-kfac", "lowrank-kfac-fb"]
    run_train(tmp_path / "a", names)
    run_train(tmp_path / "b", names)
    files = sorted(p.name for p in (tmp_path / "a").glob("train-*-seed*.json"))
    assert len(files) == len(names)
    for name in files:
        a = json.loads((tmp_path / "a" / name).read_text())
        b = json.loads((tmp_path / "b" / name).read_text())
        assert a["timing"]["train_seconds"] > 0
        assert strip_timing(a) == strip_timing(b), name
    rec = json.loads((tmp_path / "a" / files[0]).read_text())
    # what every result records
    assert rec["config"]["seed"] == 0 and rec["config"]["epochs"] == 2
    assert rec["config"]["problem"]["split_seed"] == 0
    assert {"torch", "ocnopt", "curvlinops-for-pytorch"} <= set(rec["environment"]["versions"])
    assert rec["environment"]["threads"] >= 1 and rec["environment"]["machine"]["cpu_count"]
    assert len(rec["result"]["curve"]) == 3 and len(rec["timing"]["curve_train_seconds"]) == 3
    manifest = json.loads((tmp_path / "a" / "train-wine-fcn.manifest.json").read_text())
    assert manifest["status"] == "complete" and sorted(manifest["finished"]) == files
    assert strip_timing(manifest) != {}  # the manifest dates live in its timing too


def test_other_seed_other_result(tmp_path: Path) -> None:
    recs = run_train(tmp_path, ["torch-sgd"], seeds=(0, 1))
    assert recs[0]["result"]["batch_loss"] != recs[1]["result"]["batch_loss"]


def test_divergence_ends_the_run() -> None:
    quad = problems.get_problem("quadratic")
    data = problems.load(quad, subset=64)
    result, _ = protocols.train_one(quad, data, registry.parse_optimizer("torch-sgd"), 1e3, 0, 50,
                                    16)
    assert result["diverged"] and result["steps"] < 200
    assert result["final"]["train_loss"] is None or not math.isfinite(result["final"]["train_loss"])


def _fake(protocol: str, opt: str, lr: float, seed: int, val: float, test: float,
          curve: list[float] | None = None, diverged: bool = False) -> dict[str, Any]:
    curve = curve or [test]
    return {
        "schema": protocols.SCHEMA, "kind": "run", "protocol": protocol, "problem": "p",
        "optimizer": opt, "seed": seed,
        "config": {"lr": lr, "epochs": 1, "batch_size": 8, "lr_source": "grid", "target": 0.9,
                   "problem": {"metric": "accuracy", "subset": None, "split_seed": 0},
                   "optimizer": {"family": "torch", "order": None}},
        "result": {"final": {"val_accuracy": val, "test_accuracy": test, "train_loss": 0.1},
                   "diverged": diverged, "skipped_steps": 0, "steps": 10,
                   "curve": [{"step": 5 * i, "epoch": i, "test_accuracy": a}
                             for i, a in enumerate(curve)]},
        "timing": {"train_seconds": 1.0,
                   "curve_train_seconds": [0.5 * i for i in range(len(curve))]},
    }


def test_sweep_summary_tunability_and_choice_on_validation() -> None:
    vals = [0.50, 0.80, 0.91, 0.90, 0.895, 0.70, 0.20, 0.10]
    tests = [0.5, 0.8, 0.85, 0.99, 0.9, 0.7, 0.2, 0.1]  # the test split must not drive the choice
    lrs = [10.0 ** (-4 + 4 * i / 7) for i in range(8)]
    recs = [_fake("sweep", "o", lr, 0, v, t) for lr, v, t in zip(lrs, vals, tests)]
    recs[-1]["result"]["diverged"] = True
    (row,) = protocols.sweep_summary(recs)
    assert row["best_lr"] == lrs[2] and row["best_val"] == 0.91
    assert row["test_at_best"] == 0.85
    assert row["tunability"] == pytest.approx(3 / 8)  # 0.91, 0.90, 0.895 within 2 points
    assert row["diverged"] == 1 and row["val"][-1] == 0.0


def test_time_to_target() -> None:
    rec = _fake("train", "o", 0.1, 0, 0.9, 0.95, curve=[0.1, 0.5, 0.92, 0.97])
    assert protocols.time_to_target(rec) == {"target": 0.9, "step": 10, "epoch": 2,
                                             "seconds": 1.0}
    assert protocols.time_to_target(rec, 0.99)["seconds"] is None
    rows = protocols.train_summary([rec, _fake("train", "o", 0.1, 1, 0.9, 0.5, curve=[0.1, 0.5])])
    assert rows[0]["target_reached"] == 1 and rows[0]["target_seconds"] == 1.0
    assert rows[0]["test"] == pytest.approx(0.725) and rows[0]["seeds"] == [0, 1]


def test_overhead_ratios(tmp_path: Path) -> None:
    data = problems.load(WINE)
    specs = [registry.parse_optimizer(n) for n in ("torch-adam", "autograd-adam")]
    rec = protocols.overhead_protocol(WINE, data, specs, tmp_path, batch_size=16, warmup=2,
                                      rounds=3, block=2, memory_steps=2)
    rows = rec["result"]["rows"]
    assert list(rec["config"]["optimizers"]) == ["torch-sgd", "torch-adam", "autograd-adam"]
    assert rows["torch-sgd"]["median_ratio"] == 1.0
    for r in rows.values():
        assert r["steps_timed"] == 6 and r["median_ms"] > 0
        assert math.isclose(r["median_ratio"], r["median_ms"] / rows["torch-sgd"]["median_ms"])
        if r["peak_bytes"] is not None:  # the profiler may be unavailable
            assert r["peak_bytes"] > 0
    assert (tmp_path / "overhead-wine-fcn.json").exists()


# ---- report -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def result_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("results")
    run_train(out, ["torch-sgd", "autograd-kfac", "lowrank-kfac-fb"], epochs=1, seeds=(0, 1),
              subset=32)
    data = problems.load(WINE, subset=32)
    specs = [registry.parse_optimizer("autograd-adam")]
    protocols.sweep_protocol(WINE, data, specs, protocols.RunSettings(1, 16, [0], subset=32), out,
                             points=8, decades=4)
    protocols.overhead_protocol(WINE, data, specs, out, batch_size=16, warmup=1, rounds=2,
                                block=1, memory_steps=1)
    return out


def test_report_renders_from_saved_results(result_dir: Path, tmp_path: Path) -> None:
    md, summary = report.render(result_dir, tmp_path / "img", "img/")
    for heading in ("### train: wine-fcn", "### sweep: wine-fcn", "### overhead: wine-fcn"):
        assert heading in md
    assert "| `lowrank-kfac-fb` | ocnopt, order 2 |" in md
    assert "tunability" in md and "time to 95 % test acc." in md
    assert "did not run to completion" not in md
    assert "| `autograd-adam` | ocnopt, order 1 |" in md
    for name in ("train-wine-fcn.png", "sweep-wine-fcn.png", "overhead-wine-fcn.png"):
        png = tmp_path / "img" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](img/{name})" in md
    assert {r["optimizer"] for r in summary["train"]} == {"torch-sgd", "autograd-kfac",
                                                          "lowrank-kfac-fb"}
    assert {r["points"] for r in summary["sweep"]} == {8}
    assert any("order 2" in f for f in summary["findings"])


def test_report_says_when_a_run_did_not_finish(result_dir: Path, tmp_path: Path) -> None:
    import shutil

    part = tmp_path / "part"
    shutil.copytree(result_dir, part)
    (part / "train-wine-fcn-torch-sgd-seed1.json").unlink()
    md, _ = report.render(part, tmp_path / "img")
    assert "train wine-fcn did not run to completion" in md and "5 of 6 planned runs" in md


def test_report_states_the_load_and_the_jobs(result_dir: Path, tmp_path: Path) -> None:
    """The header gives the range of the 1-minute load averages recorded when the runs ended
    and says when train/sweep runs shared the cores (--jobs > 1)."""
    import shutil

    part = tmp_path / "part"
    shutil.copytree(result_dir, part)
    loads = {"train-wine-fcn-torch-sgd-seed0.json": 0.5, "train-wine-fcn-torch-sgd-seed1.json": 7.25}
    for path in part.glob("*.json"):
        rec = json.loads(path.read_text())
        if rec.get("kind") == "run":
            rec["timing"]["loadavg"] = [loads.get(path.name, 3.0), 1.0, 1.0]
            path.write_text(json.dumps(rec))
    md, _ = report.render(part, tmp_path / "img")
    assert "1-minute load average when the runs ended: 0.5 to 7.2 (median 3.0)" in md
    assert "--jobs" not in md
    path = part / "train-wine-fcn-torch-sgd-seed0.json"
    rec = json.loads(path.read_text())
    rec["timing"]["jobs"] = 2
    path.write_text(json.dumps(rec))
    md, _ = report.render(part, tmp_path / "img")
    assert "ran with `--jobs` 2 (their times share the cores)" in md


def test_splice_keeps_other_sections(tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\n## Order 1 overhead\n\ntheirs\n")
    report.splice(doc, "first")
    report.splice(doc, "second\n")
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\n## Order 1 overhead\n\ntheirs\n")
    assert text.count(report.BEGIN) == 1 and "first" not in text
    assert f"{report.BEGIN}\nsecond\n{report.END}" in text
    doc.write_text(text + "\n## Later section\n\nkept\n")
    report.splice(doc, "third")
    assert doc.read_text().endswith(f"{report.BEGIN}\nthird\n{report.END}\n\n## Later section\n\nkept\n")


def test_evaluate_in_eval_mode_leaves_batchnorm_alone() -> None:
    """evaluate() uses BatchNorm's running statistics, does not update them and restores the
    training mode."""
    p = problems.get_problem("digits-resnet")
    data = problems.load(p, subset=64)
    model = p.model(0)
    buffers = [b.clone() for b in model.buffers()]
    loss, acc = protocols.evaluate(model, data.X_test, data.y_test, p.loss)
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    model.eval()
    with torch.no_grad():
        out = model(data.X_test)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(out, data.y_test)))
    assert acc == pytest.approx(float((out.argmax(1) == data.y_test).float().mean()))


def test_findings_compare_nash_with_cooperative_and_order_one() -> None:
    """The findings put `-fb-nash` beside its cooperative `-fb` and every order-2 mode beside
    the order-1 mode of its curvature (autograd's, else its own backend's)."""

    def row(opt: str, order: int | None, loss: float, std: float, seconds: float,
            family: str = "ocnopt") -> dict[str, Any]:
        return {"problem": "p", "folder": "f", "lr_source": "default", "metric": "accuracy",
                "optimizer": opt, "family": family, "order": order, "lr": 0.01,
                "train_loss": loss, "train_loss_std": std, "test": 0.9, "test_std": 0.01,
                "seconds": seconds, "time_ratio": seconds, "diverged": 0, "seeds": [0, 1]}

    rows = [row("torch-sgd", None, 0.5, 0.01, 1.0, "torch"), row("lowrank-kfac", 1, 0.4, 0.01, 2.0),
            row("lowrank-kfac-fb", 2, 0.3, 0.01, 4.0), row("lowrank-kfac-fb-nash", 2, 0.305, 0.01, 8.0)]
    lines = report._findings(rows, [], [])
    assert ("- train p: `lowrank-kfac-fb-nash` (order 2, game nash) vs `lowrank-kfac-fb` (order 2, "
            "cooperative): final training loss 0.305 vs 0.3 (+2 %, within one std over seeds), "
            "test 90.0 % vs 90.0 %, time 2.0x.") in lines
    assert ("- train p: `lowrank-kfac-fb` (order 2) vs `lowrank-kfac` (order 1, same curvature): "
            "final training loss 0.3 vs 0.4 (-25 %, lower), test 90.0 % vs 90.0 %, time 2.0x.") in lines
    assert sum("`lowrank-kfac-fb-nash` (order 2) vs `lowrank-kfac`" in li for li in lines) == 1


def test_sweep_tunability_is_mean_and_std_over_seeds_of_per_seed_tunability() -> None:
    lrs = [10.0 ** (-4 + 4 * i / 7) for i in range(8)]
    seed0 = [0.50, 0.80, 0.91, 0.90, 0.895, 0.70, 0.20, 0.10]  # 3 of 8 within 2 points of 0.91
    seed1 = [0.50, 0.90, 0.91, 0.60, 0.60, 0.60, 0.20, 0.10]  # 2 of 8
    recs = [_fake("sweep", "o", lr, s, v, 0.5) for s, vals in ((0, seed0), (1, seed1))
            for lr, v in zip(lrs, vals)]
    (row,) = protocols.sweep_summary(recs)
    assert row["tunability_per_seed"] == {"0": 3 / 8, "1": 2 / 8}
    assert row["tunability"] == pytest.approx(5 / 16)
    assert row["tunability_std"] == pytest.approx(math.sqrt(((3 / 8 - 5 / 16) ** 2
                                                             + (2 / 8 - 5 / 16) ** 2) / 1))
    # the seed-mean curve (0.5, 0.85, 0.91, 0.75, ...) has only its best within 2 points
    assert row["tunability_of_mean"] == pytest.approx(1 / 8)
    assert row["best_lr"] == lrs[2] and row["seeds"] == [0, 1]


def test_summaries_split_configurations() -> None:
    """Runs that differ in epochs, seeds or --hp are different rows (and tables), and the time
    ratio to torch-sgd is taken within a configuration only."""
    def rec(opt: str, seed: int, seconds: float, **config: Any) -> dict[str, Any]:
        r = _fake("train", opt, 0.1, seed, 0.9, 0.9)
        r["config"].update(config)
        r["timing"]["train_seconds"] = seconds
        return r

    recs = [rec("torch-sgd", 0, 1.0, seeds=[0]), rec("o", 0, 3.0, seeds=[0]),
            rec("torch-sgd", 0, 2.0, seeds=[0], hp={"*": {"momentum": 0.5}}),
            rec("o", 0, 3.0, seeds=[0], hp={"*": {"momentum": 0.5}}),
            rec("o", 1, 5.0, seeds=[0, 1]), rec("o", 0, 7.0, seeds=[0], epochs=2)]
    rows = protocols.train_summary(recs)
    assert len(rows) == 6 and len({r["config_key"] for r in rows}) == 4
    ratio = {(r["optimizer"], json.dumps(r["configuration"]["hp"]), r["epochs"],
              tuple(r["configuration"]["seeds"])): r["time_ratio"] for r in rows}
    assert ratio[("o", "{}", 1, (0,))] == 3.0
    assert ratio[("o", json.dumps({"*": {"momentum": 0.5}}), 1, (0,))] == 1.5
    assert ratio[("o", "{}", 1, (0, 1))] is None  # no torch-sgd in that configuration
    assert ratio[("o", "{}", 2, (0,))] is None


def test_a_linalg_error_of_an_optimizer_ends_its_run_as_diverged():
    """A peer whose factorisation fails on non-finite statistics (Shampoo's SVD after a
    blow-up) ends that run as diverged; the invocation goes on."""
    import dataclasses

    class Broken:
        skipped = 0

        def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
            raise torch.linalg.LinAlgError("non-finite")

    data = problems.load(WINE, subset=40)
    spec = dataclasses.replace(registry.parse_optimizer("torch-sgd", WINE),
                               factory=lambda m, loss, lr, seed: Broken())
    result, _ = protocols.train_one(WINE, data, spec, 0.1, 0, 1, 16, None)
    assert result["diverged"] is True


def test_train_in_worker_processes_equals_the_serial_train(tmp_path: Path) -> None:
    """train_protocol(jobs=2): the records come back in the serial order with the serial
    results (everything but the timing), and on_done sees them in that order."""
    data = problems.load(WINE, subset=32)
    specs = [registry.parse_optimizer(n) for n in ("torch-sgd", "lowrank-kfac-fb")]
    settings = protocols.RunSettings(epochs=1, batch_size=16, seeds=[0, 1], subset=32)
    serial = protocols.train_protocol(WINE, data, specs, settings, tmp_path / "a")
    seen: list[str] = []
    parallel = protocols.train_protocol(WINE, data, specs, settings, tmp_path / "b",
                                        on_done=lambda r: seen.append(r["optimizer"]), jobs=2)
    assert [(r["optimizer"], r["seed"]) for r in parallel] == \
        [(r["optimizer"], r["seed"]) for r in serial] == \
        [("torch-sgd", 0), ("lowrank-kfac-fb", 0), ("torch-sgd", 1), ("lowrank-kfac-fb", 1)]
    assert seen == [r["optimizer"] for r in serial]
    for a, b in zip(serial, parallel):
        assert strip_timing(a) == strip_timing(b)


def test_worker_processes_refuse_an_unregistered_problem(tmp_path: Path) -> None:
    import dataclasses

    other = dataclasses.replace(WINE, epochs=1)
    data = problems.load(WINE, subset=32)
    settings = protocols.RunSettings(epochs=1, batch_size=16, seeds=[0], subset=32)
    with pytest.raises(ValueError, match="jobs > 1 needs a problem of the registry"):
        protocols.train_protocol(other, data, [registry.parse_optimizer("torch-sgd")], settings,
                                 tmp_path, jobs=2)
