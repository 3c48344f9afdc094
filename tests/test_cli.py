"""The ``ocnopt`` command line (typer's CliRunner): help, every error path (exit code 2 and a
one-line reason), an interrupted run that keeps its finished results, ``--json``, and a tiny
end-to-end run of every problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("typer")
from typer.testing import CliRunner  # noqa: E402

from ocnopt.bench import protocols  # noqa: E402
from ocnopt.cli import app  # noqa: E402

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("cmd", [[], ["bench"], ["bench", "run"], ["bench", "sweep"],
                                 ["bench", "overhead"], ["bench", "report"], ["bench", "list"]])
def test_help_explains_each_command(cmd: list[str]) -> None:
    res = invoke(*cmd, "--help")
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_list(tmp_path: Path) -> None:
    res = invoke("bench", "list", "--json")
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert [p["name"] for p in data["problems"]] == [
        "wine-fcn", "digits-fcn", "digits-cnn", "mnist1d-mlp", "mnist1d-cnn", "quadratic",
        "digits-resnet", "digits-inception", "mnist1d-resnet", "digits-deep"]
    opts = {o["name"]: o for o in data["optimizers"]}
    assert {"torch-sgd", "curvlinops-kfac", "autograd-adam", "lowrank-kfac-fb",
            "autograd-full-fb", "lowrank-kfac-fb-nash", "lowrank-adam-fb-nash"} <= set(opts)
    assert opts["lowrank-kfac-fb-nash"]["options"] == {"feedback": True, "game": "nash"}
    assert "mnist1d-resnet" in opts["curvlinops-kfac"]["not_on"]
    assert "digits-resnet" not in opts["curvlinops-kfac"]["not_on"]
    res = invoke("bench", "list")
    assert res.exit_code == 0 and "lowrank-kfac-fb" in res.stdout
    assert "lowrank-kfac-fb-nash" in res.stdout and "digits-inception" in res.stdout


def _file(tmp_path: Path) -> Path:
    f = tmp_path / "a-file"
    f.write_text("x")
    return f


ERRORS = [
    (["bench", "run", "nope"], "unknown problem 'nope'"),
    (["bench", "run", "wine-fcn", "-o", "torch-sgd,adamax"], "unknown optimizer 'adamax'"),
    (["bench", "run", "mnist1d-cnn", "-o", "curvlinops-kfac"], "does not run on mnist1d-cnn"),
    (["bench", "run", "digits-cnn", "-o", "autograd-full-fb"], "too large"),
    (["bench", "run", "wine-fcn", "--epochs", "0"], "--epochs must be positive, got 0"),
    (["bench", "run", "wine-fcn", "--epochs", "-3"], "--epochs must be positive, got -3"),
    (["bench", "run", "wine-fcn", "--seeds", "0"], "--seeds must be positive"),
    (["bench", "run", "wine-fcn", "--batch-size", "0"], "--batch-size must be positive"),
    (["bench", "run", "wine-fcn", "--out", "{file}"], "cannot write results to"),
    (["bench", "run", "wine-fcn", "--out", "{file}/sub"], "cannot write results to"),
    (["bench", "run", "wine-fcn", "--lr-from", "{tmp}/none"], "--lr-from"),
    (["bench", "run", "wine-fcn", "--lr-from", "{tmp}"], "no sweep results for"),
    (["bench", "sweep", "nope"], "unknown problem 'nope'"),
    (["bench", "sweep", "wine-fcn", "--points", "1"], "--points must be at least 2"),
    (["bench", "sweep", "wine-fcn", "--epochs", "0"], "--epochs must be positive"),
    (["bench", "sweep", "wine-fcn", "-o", "sgd"], "unknown optimizer 'sgd'"),
    (["bench", "sweep", "wine-fcn", "--out", "{file}"], "cannot write results to"),
    (["bench", "overhead", "nope"], "unknown problem 'nope'"),
    (["bench", "overhead", "wine-fcn", "-o", "lowrank-full"], "unknown optimizer 'lowrank-full'"),
    (["bench", "overhead", "wine-fcn", "--rounds", "0"], "--rounds must be positive"),
    (["bench", "overhead", "wine-fcn", "--out", "{file}"], "cannot write results to"),
    (["bench", "report", "{tmp}/none"], "not a directory"),
    (["bench", "report", "{tmp}"], "no ocnopt bench result files"),
    (["bench", "report", "{tmp}", "--out", "{file}/r.md"], "cannot write the report"),
]


@pytest.mark.parametrize(("args", "message"), ERRORS, ids=[" ".join(a[1:4]) for a, _ in ERRORS])
def test_errors_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    file = _file(tmp_path)
    args = [a.format(file=file, tmp=tmp_path) for a in args]
    res = invoke(*args)
    assert res.exit_code == 2, res.output
    assert message in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ")


def test_typer_type_errors_exit_2() -> None:
    res = invoke("bench", "run", "wine-fcn", "--epochs", "many")
    assert res.exit_code == 2


def test_interrupted_run_keeps_finished_results(tmp_path: Path, monkeypatch) -> None:
    real = protocols.train_one
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(protocols, "train_one", flaky)
    res = invoke("bench", "run", "wine-fcn", "-o", "torch-sgd,torch-adam", "--seeds", "2",
                 "--epochs", "1", "--subset", "32", "--out", tmp_path)
    assert res.exit_code == 130
    assert "Interrupted: 2 of 4 runs finished" in res.stderr
    files = sorted(p.name for p in tmp_path.glob("train-*seed*.json"))
    assert files == ["train-wine-fcn-torch-adam-seed0.json", "train-wine-fcn-torch-sgd-seed0.json"]
    manifest = json.loads((tmp_path / "train-wine-fcn.manifest.json").read_text())
    assert manifest["status"] == "interrupted" and len(manifest["planned"]) == 4
    assert not list(tmp_path.glob(".*"))  # no half-written file left behind


PROBLEM_RUNS = {
    "wine-fcn": "torch-sgd,curvlinops-kfac,autograd-adam,lowrank-kfac-fb,autograd-full-fb",
    "digits-fcn": "torch-adam,curvlinops-kfac,autograd-kfac,lowrank-adam-fb",
    "digits-cnn": "torch-sgd,autograd-adam,lowrank-adam-fb",
    "mnist1d-mlp": "torch-rmsprop,curvlinops-kfac,autograd-rmsprop,backpack-kfac-fb",
    "mnist1d-cnn": "torch-sgd,autograd-sgd,lowrank-sgd-fb",
    "quadratic": "torch-sgd,curvlinops-kfac,autograd-full,lowrank-adam-fb",
}


@pytest.mark.parametrize("problem", list(PROBLEM_RUNS))
def test_tiny_end_to_end_run(problem: str, tmp_path: Path) -> None:
    if problem.startswith("mnist1d"):
        pytest.importorskip("mnist1d")
    names = PROBLEM_RUNS[problem].split(",")
    res = invoke("bench", "run", problem, "-o", PROBLEM_RUNS[problem], "--epochs", "1",
                 "--seeds", "1", "--subset", "40", "--out", tmp_path, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["status"] == "complete"
    assert [r["optimizer"] for r in out["rows"]] == names
    for r in out["rows"]:
        assert r["steps"] > 0 and r["seeds"] == [0]
        assert r["train_loss"] is not None or r["diverged"]
    assert len(list(tmp_path.glob(f"train-{problem}-*-seed0.json"))) == len(names)


def test_default_run_table_and_report(tmp_path: Path) -> None:
    """The default comparison (peers, order 1, order 2), printed as a table, then reported."""
    res = invoke("bench", "run", "wine-fcn", "--epochs", "1", "--seeds", "1", "--subset", "32",
                 "--out", tmp_path / "r")
    assert res.exit_code == 0, res.output
    for name in ("torch-sgd", "torch-adam", "curvlinops-kfac", "autograd-adam", "lowrank-kfac-fb"):
        assert name in res.stdout
    assert "x torch-sgd" in res.stdout and "complete: 8 runs" in res.stdout
    doc = tmp_path / "docs" / "bench.md"
    doc.parent.mkdir()
    doc.write_text("# Benchmarks\n\nother section\n")
    res = invoke("bench", "report", tmp_path / "r", "--into", doc)
    assert res.exit_code == 0, res.output
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nother section\n")
    assert "<!-- ocnopt bench report: begin -->" in text and "### train: wine-fcn" in text
    assert (tmp_path / "docs" / "bench-plots" / "train-wine-fcn.png").exists()
    assert "](bench-plots/train-wine-fcn.png)" in text
    res = invoke("bench", "report", tmp_path / "r", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["files"] == 8
    assert (tmp_path / "r" / "report.md").exists()


def test_sweep_then_run_with_chosen_lrs(tmp_path: Path) -> None:
    res = invoke("bench", "sweep", "wine-fcn", "-o", "torch-sgd", "--epochs", "1", "--points", "3",
                 "--subset", "32", "--out", tmp_path, "--json")
    assert res.exit_code == 0, res.output
    best = json.loads(res.stdout)["rows"][0]["best_lr"]
    res = invoke("bench", "run", "wine-fcn", "-o", "torch-sgd", "--epochs", "1", "--seeds", "1",
                 "--subset", "32", "--lr-from", tmp_path, "--out", tmp_path / "t", "--json")
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["rows"][0]
    assert row["lr"] == best and row["lr_source"].startswith("sweep (val split)")


@pytest.mark.slow
def test_default_digits_run_under_three_minutes(tmp_path: Path) -> None:
    """The README's set-up command: the default comparison on digits-fcn (3 seeds, 8 optimizers:
    torch SGD/Adam, curvlinops K-FAC, ocnopt order 1 and order 2) within 3 minutes."""
    import time

    start = time.perf_counter()
    res = invoke("bench", "run", "digits-fcn", "--out", tmp_path, "--json")
    seconds = time.perf_counter() - start
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert {"torch-sgd", "torch-adam", "curvlinops-kfac"} <= {r["optimizer"] for r in rows}
    assert {1, 2} <= {r["order"] for r in rows}
    assert all(r["seeds"] == [0, 1, 2] and r["test"] > 0.9 for r in rows)
    assert seconds < 180, f"default run took {seconds:.0f} s"
