"""The ``ocnopt`` command line (typer's CliRunner): help, every error path (exit code 2 and a
one-line reason), an interrupted run that keeps its finished results, ``--json``, and a tiny
end-to-end run of every problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
        "digits-resnet", "digits-inception", "mnist1d-resnet", "digits-deep",
        "digits-odenet", "digits-odenet-fine", "motions-ode", "circles-cnf"]
    opts = {o["name"]: o for o in data["optimizers"]}
    assert {"torch-sgd", "curvlinops-kfac", "autograd-adam", "lowrank-kfac-fb",
            "autograd-full-fb", "lowrank-kfac-fb-nash", "lowrank-adam-fb-nash"} <= set(opts)
    assert opts["lowrank-kfac-fb-nash"]["options"] == {"feedback": True, "game": "nash"}
    assert {"snopt", "snopt-fb", "snopt-fb-t1", "torch-adam-noadjoint"} <= set(opts)
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
    for name in ("torch-sgd", "torch-adam", "curvlinops-kfac", "soap", "shampoo", "autograd-adam",
                 "lowrank-kfac-fb"):
        assert name in res.stdout
    assert "x torch-sgd" in res.stdout and "complete: 10 runs" in res.stdout
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
    assert res.exit_code == 0 and json.loads(res.stdout)["files"] == 10
    assert (tmp_path / "r" / "report.md").exists()


def test_sweep_then_run_with_chosen_lrs(tmp_path: Path) -> None:
    res = invoke("bench", "sweep", "wine-fcn", "-o", "torch-sgd", "--epochs", "1", "--points", "3",
                 "--seeds", "1", "--subset", "32", "--out", tmp_path, "--json")
    assert res.exit_code == 0, res.output
    best = json.loads(res.stdout)["rows"][0]["best_lr"]
    res = invoke("bench", "run", "wine-fcn", "-o", "torch-sgd", "--epochs", "1", "--seeds", "1",
                 "--subset", "32", "--lr-from", tmp_path, "--out", tmp_path / "t", "--json")
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["rows"][0]
    assert row["lr"] == best and row["lr_source"].startswith("sweep (val split)")


@pytest.mark.slow
def test_default_digits_run_under_three_minutes(tmp_path: Path) -> None:
    """The README's set-up command: the default comparison on digits-fcn (3 seeds, 10
    optimizers: torch SGD/Adam, curvlinops K-FAC, SOAP, Shampoo, ocnopt order 1 and order 2)
    within 3 minutes; every optimizer but Shampoo reaches 90 % (pytorch-optimizer's Shampoo at
    its documented defaults does not train digits: docs/benchmarks.md, docs/claims.md)."""
    import time

    start = time.perf_counter()
    res = invoke("bench", "run", "digits-fcn", "--out", tmp_path, "--json")
    seconds = time.perf_counter() - start
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert {"torch-sgd", "torch-adam", "curvlinops-kfac"} <= {r["optimizer"] for r in rows}
    assert {1, 2} <= {r["order"] for r in rows}
    assert {"soap", "shampoo"} <= {r["optimizer"] for r in rows}
    assert all(r["seeds"] == [0, 1, 2] for r in rows)
    assert all(r["test"] > 0.9 for r in rows if r["optimizer"] != "shampoo"), rows
    assert seconds < 180, f"default run took {seconds:.0f} s"


# ---- issue 13, item 10: --hp, --version, python -m ocnopt, --target, report grouping, hints ------
def test_version_and_python_m_ocnopt() -> None:
    import subprocess
    import sys

    import ocnopt

    res = invoke("--version")
    assert res.exit_code == 0 and res.stdout.strip() == f"ocnopt {ocnopt.__version__}"
    proc = subprocess.run([sys.executable, "-m", "ocnopt", "--version"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ocnopt {ocnopt.__version__}"
    proc = subprocess.run([sys.executable, "-m", "ocnopt", "bench", "run", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown problem 'nope'" in proc.stderr


def test_help_cites_docs_benchmarks_md() -> None:
    for cmd in (["bench", "--help"], ["bench", "run", "--help"]):
        res = invoke(*cmd)
        assert res.exit_code == 0
        assert "BENCHMARKS.md" not in res.output
    assert "docs/benchmarks.md" in invoke("bench", "--help").output
    assert "--hp" in invoke("bench", "sweep", "--help").output


@pytest.mark.parametrize(("text", "value"), [
    ("0.01", 0.01), ("1e-3", 1e-3), ("5", 5), ("0.9,0.99", (0.9, 0.99)),
    ("(0.9, 0.99)", (0.9, 0.99)), ("[1, 2]", (1, 2)), ("true", True), ("False", False),
    ("none", None), ("nash", "nash"), ("type-2", "type-2")])
def test_hp_values_parse(text: str, value) -> None:
    from ocnopt.bench.optimizers import parse_hp

    assert parse_hp([f"k={text}"]) == {"*": {"k": value}}
    assert parse_hp([f"a-b-fb:k={text}", "k=1"]) == {"a-b-fb": {"k": value}, "*": {"k": 1}}


def test_hp_sets_hyper_parameters_records_them_and_titles_the_table(tmp_path: Path) -> None:
    res = invoke("bench", "run", "wine-fcn", "-o", "torch-adam,torch-sgd,autograd-kfac,lowrank-kfac-fb",
                 "--epochs", "1", "--seeds", "1", "--subset", "32", "--out", tmp_path,
                 "--hp", "damping=0.05", "--hp", "torch-adam:betas=0.8,0.9",
                 "--hp", "autograd-kfac:stat_every=2", "--hp", "lowrank-kfac-fb:game=nash",
                 "--hp", "lowrank-kfac-fb:trust=1")
    assert res.exit_code == 0, res.output
    assert "--hp damping=0.05; torch-adam: betas=(0.8, 0.9); autograd-kfac: stat_every=2; " \
           "lowrank-kfac-fb: game=nash, trust=1" in " ".join(res.stdout.split())
    hp = {"*": {"damping": 0.05}, "torch-adam": {"betas": [0.8, 0.9]},
          "autograd-kfac": {"stat_every": 2}, "lowrank-kfac-fb": {"game": "nash", "trust": 1}}
    rec = {n: json.loads((tmp_path / f"train-wine-fcn-{n}-seed0.json").read_text())
           for n in ("torch-adam", "torch-sgd", "autograd-kfac", "lowrank-kfac-fb")}
    for r in rec.values():
        assert r["config"]["hp"] == hp
    assert rec["torch-adam"]["config"]["optimizer"]["overrides"] == {"betas": [0.8, 0.9]}
    assert rec["torch-sgd"]["config"]["optimizer"]["overrides"] == {}  # no damping: not its key
    assert rec["autograd-kfac"]["config"]["optimizer"]["hyper"] == {"damping": 0.05,
                                                                    "stat_every": 2}
    assert rec["lowrank-kfac-fb"]["config"]["optimizer"]["options"] == {"feedback": True,
                                                                        "game": "nash"}
    # and they are what the optimizers are built with
    from ocnopt.bench import optimizers as registry
    from ocnopt.bench.problems import get_problem

    wine = get_problem("wine-fcn")
    per = registry.resolve_hp(["torch-adam", "autograd-kfac", "lowrank-kfac-fb"],
                              registry.parse_hp(["damping=0.05", "torch-adam:betas=0.8,0.9",
                                                 "autograd-kfac:stat_every=2",
                                                 "lowrank-kfac-fb:game=nash"]))
    adam = registry.parse_optimizer("torch-adam", wine, per["torch-adam"]).make(wine.model(0),
                                                                               wine.loss, 0.1, 0)
    assert adam.opt.param_groups[0]["betas"] == (0.8, 0.9)
    kfac = registry.parse_optimizer("autograd-kfac", wine, per["autograd-kfac"]).make(
        wine.model(0), wine.loss, 0.1, 0)
    assert kfac.opt.param_groups[0]["damping"] == 0.05
    assert kfac.opt.param_groups[0]["stat_every"] == 2
    fb = registry.parse_optimizer("lowrank-kfac-fb", wine, per["lowrank-kfac-fb"]).make(
        wine.model(0), wine.loss, 0.1, 0)
    assert fb.opt.game == "nash" and fb.opt.param_groups[0]["damping"] == 0.05


def test_hp_on_sweep_and_overhead_is_recorded(tmp_path: Path) -> None:
    res = invoke("bench", "sweep", "wine-fcn", "-o", "torch-adam", "--epochs", "1", "--points",
                 "2", "--seeds", "1", "--subset", "32", "--out", tmp_path / "s",
                 "--hp", "betas=(0.5,0.6)")
    assert res.exit_code == 0, res.output
    assert "--hp betas=(0.5, 0.6)" in " ".join(res.stdout.split())
    rec = json.loads((tmp_path / "s" / "sweep-wine-fcn-torch-adam-lr00-seed0.json").read_text())
    assert rec["config"]["optimizer"]["hyper"] == {"betas": [0.5, 0.6]}
    res = invoke("bench", "run", "wine-fcn", "-o", "torch-adam", "--epochs", "1", "--seeds", "1",
                 "--subset", "32", "--lr-from", tmp_path / "s", "--out", tmp_path / "t", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rows"][0]["lr_source"].endswith("with --hp betas=(0.5, 0.6)")
    res = invoke("bench", "overhead", "wine-fcn", "-o", "torch-sgd,autograd-sgd", "--warmup", "1",
                 "--rounds", "1", "--block", "1", "--memory-steps", "1", "--out", tmp_path / "o",
                 "--hp", "momentum=0.5", "--hp", "torch-sgd:lr=0.2", "--json")
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "o" / "overhead-wine-fcn.json").read_text())
    assert rec["config"]["hp"] == {"*": {"momentum": 0.5}, "torch-sgd": {"lr": 0.2}}
    rows = rec["result"]["rows"]
    assert rows["torch-sgd"]["lr"] == 0.2
    assert rows["torch-sgd"]["optimizer"]["hyper"] == {"momentum": 0.5}
    assert rows["autograd-sgd"]["optimizer"]["hyper"] == {"momentum": 0.5}


HP_ERRORS = [
    (["run", "wine-fcn", "--hp", "damping"], "expected key=value or optimizer:key=value"),
    (["run", "wine-fcn", "--hp", ":damping=1"], "expected key=value"),
    (["run", "wine-fcn", "--hp", "1x=1"], "expected key=value"),
    (["run", "wine-fcn", "-o", "torch-sgd", "--hp", "dampin=0.1"],
     "none of the optimizers torch-sgd has a hyper-parameter 'dampin'"),
    (["run", "wine-fcn", "-o", "torch-sgd", "--hp", "torch-sgd:damping=0.1"],
     "optimizer 'torch-sgd' has no hyper-parameter 'damping'; accepted:"),
    (["run", "wine-fcn", "-o", "torch-sgd", "--hp", "torch-adam:lr=0.1"],
     "optimizer 'torch-adam' is not among the selected ones (torch-sgd)"),
    (["run", "wine-fcn", "-o", "torch-adam", "--hp", "betas=2,0.9"],
     "optimizer 'torch-adam' refuses betas=(2, 0.9)"),
    (["run", "wine-fcn", "-o", "autograd-kfac", "--hp", "game=chess"],
     "does not run on wine-fcn with game='chess'"),
    (["sweep", "wine-fcn", "-o", "autograd-adam", "--hp", "autograd-adam:stat_every=2"],
     "has no hyper-parameter 'stat_every'"),
    (["overhead", "wine-fcn", "-o", "torch-adam", "--hp", "dampin=0.1"], "'dampin'"),
    (["run", "wine-fcn", "--target", "95"], "--target is a test accuracy on wine-fcn, in (0, 1]"),
    (["run", "wine-fcn", "--target", "0"], "in (0, 1] (e.g. 0.95), got 0"),
    (["run", "quadratic", "--target", "0"], "--target is a test loss (mse) to go under on "
                                            "quadratic, > 0, got 0"),
    (["run", "quadratic", "--target", "-1"], "> 0, got -1"),
]


@pytest.mark.parametrize(("args", "message"), HP_ERRORS, ids=[" ".join(a) for a, _ in HP_ERRORS])
def test_hp_and_target_errors_exit_2_with_one_line(args: list[str], message: str,
                                                   tmp_path: Path) -> None:
    res = invoke("bench", *args, "--out", tmp_path)
    assert res.exit_code == 2, res.output
    assert message in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert not list(tmp_path.glob("*.json"))  # refused before anything ran


def test_target_in_range_is_accepted(tmp_path: Path) -> None:
    res = invoke("bench", "run", "wine-fcn", "-o", "torch-sgd", "--epochs", "1", "--seeds", "1",
                 "--subset", "32", "--target", "1", "--out", tmp_path, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rows"][0]["target"] == 1


@pytest.mark.parametrize(("module", "args", "dist", "extra"), [
    ("sklearn", ["run", "wine-fcn", "-o", "torch-sgd", "--split-seed", "4321"], "scikit-learn",
     "bench"),
    ("curvlinops", ["run", "wine-fcn", "-o", "curvlinops-kfac"], "curvlinops-for-pytorch", "bench"),
    ("pytorch_optimizer", ["run", "wine-fcn", "-o", "soap"], "pytorch-optimizer", "bench"),
    ("curvlinops", ["sweep", "wine-fcn"], "curvlinops-for-pytorch", "bench"),  # default set
])
def test_missing_optional_dependency_gets_install_hint(module: str, args: list[str], dist: str,
                                                       extra: str, tmp_path: Path,
                                                       monkeypatch) -> None:
    import sys

    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, module, None)
    res = invoke("bench", *args, "--epochs", "1", "--subset", "32", "--out", tmp_path)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"needs {dist}: pip install 'ocnopt[{extra}]'" in lines[0]


def test_report_without_matplotlib_gets_install_hint(tmp_path: Path, monkeypatch) -> None:
    import sys

    res = invoke("bench", "run", "wine-fcn", "-o", "torch-sgd", "--epochs", "1", "--seeds", "1",
                 "--subset", "32", "--out", tmp_path, "--json")
    assert res.exit_code == 0
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    res = invoke("bench", "report", tmp_path)
    assert res.exit_code == 2
    assert "needs matplotlib: pip install 'ocnopt[bench]'" in res.stderr


def test_run_table_counts_steps_and_explains_columns(tmp_path: Path) -> None:
    res = invoke("bench", "run", "wine-fcn", "-o", "torch-sgd,autograd-sgd,lowrank-sgd-fb",
                 "--epochs", "2", "--seeds", "1", "--subset", "40", "--batch-size", "16",
                 "--out", tmp_path)
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.split())
    assert "train wine-fcn: 6 steps (2 epochs x 3), batch 16, seeds 0" in text  # ceil(40/16) = 3
    for words in ("train loss: final training loss on the fit split",
                  "x torch-sgd: ratio of mean times", "to target: median time",
                  "peer = another library's optimizer", "order 1 = ocnopt's backpropagation",
                  "order 2 = ocnopt's feedback policies du = k + K dx"):
        assert words in text
    md = invoke("bench", "report", tmp_path)
    assert md.exit_code == 0
    page = (tmp_path / "report.md").read_text()
    assert "6 steps (2 epochs x 3) of minibatches of 16" in page and "*ocnopt, order 2*" in page


def test_report_never_mixes_configurations(tmp_path: Path) -> None:
    """Different epochs / seeds / --hp written into one folder: one table per configuration."""
    common = ["--subset", "32", "--out", tmp_path, "--json"]
    assert invoke("bench", "run", "wine-fcn", "-o", "torch-sgd", "--epochs", "1", "--seeds", "2",
                  *common).exit_code == 0
    # overwrites the seed-0 file of the first invocation with 2 epochs
    assert invoke("bench", "run", "wine-fcn", "-o", "torch-sgd", "--epochs", "2", "--seeds", "1",
                  *common).exit_code == 0
    assert invoke("bench", "run", "wine-fcn", "-o", "torch-adam", "--epochs", "2", "--seeds", "1",
                  "--hp", "betas=0.5,0.6", *common).exit_code == 0
    res = invoke("bench", "report", tmp_path, "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["train"]
    assert len({r["config_key"] for r in rows}) == 3
    by = {(r["optimizer"], r["epochs"]): r for r in rows}
    assert by[("torch-sgd", 1)]["seeds"] == [1] and by[("torch-sgd", 2)]["seeds"] == [0]
    assert by[("torch-adam", 2)]["configuration"]["hp"] == {"*": {"betas": [0.5, 0.6]}}
    md = (tmp_path / "report.md").read_text()
    heads = [ln for ln in md.splitlines() if ln.startswith("### train:")]
    assert len(heads) == 3, heads
    assert "### train: wine-fcn (1 epochs, seeds 0, 1, no --hp)" in heads
    assert "### train: wine-fcn (2 epochs, seeds 0, no --hp)" in heads
    assert "### train: wine-fcn (2 epochs, seeds 0, --hp betas=(0.5, 0.6))" in heads
    # every table holds one configuration: its rows are the optimizers of that invocation
    tables = md.split("### train:")[1:]
    assert sum("`torch-sgd`" in t for t in tables) == 2 and sum("`torch-adam`" in t for t in tables) == 1


# ---- issue 13, item 11: several seeds per sweep point, tunability with its spread ---------------
def test_sweep_defaults_to_three_seeds_and_reports_tunability_spread(tmp_path: Path) -> None:
    res = invoke("bench", "sweep", "wine-fcn", "-o", "torch-sgd", "--epochs", "1", "--points", "4",
                 "--decades", "6", "--subset", "32", "--out", tmp_path, "--json")
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)["rows"]
    assert row["seeds"] == [0, 1, 2]
    # independent recomputation from the files: per seed, share of the grid within 2 points
    per_seed = []
    for seed in range(3):
        vals = []
        for i in range(4):
            r = json.loads((tmp_path / f"sweep-wine-fcn-torch-sgd-lr{i:02d}-seed{seed}.json")
                           .read_text())
            acc = r["result"]["final"]["val_accuracy"]
            vals.append(0.0 if r["result"]["diverged"] or acc is None else acc)
        per_seed.append(sum(v >= max(vals) - 0.02 for v in vals) / 4)
    import statistics

    assert row["tunability_per_seed"] == {str(s): t for s, t in enumerate(per_seed)}
    assert row["tunability"] == pytest.approx(statistics.fmean(per_seed))
    assert row["tunability_std"] == pytest.approx(statistics.stdev(per_seed))
    res = invoke("bench", "sweep", "wine-fcn", "-o", "torch-sgd", "--epochs", "1", "--points", "4",
                 "--decades", "6", "--subset", "32", "--out", tmp_path / "t")
    assert res.exit_code == 0
    text = " ".join(res.stdout.split())
    assert f"{100 * row['tunability']:.0f} ± {100 * row['tunability_std']:.0f} %" in text
    assert "seeds 0, 1, 2" in text and "mean ± std over seeds" in text
    res = invoke("bench", "report", tmp_path)
    page = (tmp_path / "report.md").read_text()
    assert "tunability (mean ± std over seeds)" in page
    assert f"| {100 * row['tunability']:.0f} ± {100 * row['tunability_std']:.0f} % |" in page


def test_lr_from_refuses_a_folder_with_several_sweep_configurations(tmp_path: Path) -> None:
    # the second sweep overwrites grid points 0 and 1 of the first; point 2 stays (3-point grid)
    for points in ("3", "2"):
        res = invoke("bench", "sweep", "wine-fcn", "-o", "torch-sgd", "--epochs", "1",
                     "--points", points, "--seeds", "1", "--subset", "32", "--out", tmp_path,
                     "--json")
        assert res.exit_code == 0
    res = invoke("bench", "run", "wine-fcn", "-o", "torch-sgd", "--lr-from", tmp_path,
                 "--out", tmp_path / "t")
    assert res.exit_code == 2 and "several configurations" in res.stderr


def _losses(folder: Path) -> dict[str, Any]:
    """Per result file: the recorded losses (per step, and every evaluation point)."""
    out = {}
    for path in sorted(folder.glob("*-seed*.json")):
        rec = json.loads(path.read_text())
        out[path.name] = (rec["result"]["batch_loss"], rec["result"]["curve"], rec["config"])
    return out


def test_sweep_with_two_jobs_equals_the_serial_sweep(tmp_path: Path) -> None:
    """--jobs 2 trains the grid points in two worker processes: the same files with exactly the
    same losses, and the table rows in the same order, as the serial sweep."""
    args = ("bench", "sweep", "wine-fcn", "-o", "torch-sgd,autograd-adam", "--epochs", "1",
            "--points", "3", "--seeds", "2", "--subset", "32", "--json")
    serial = invoke(*args, "--out", tmp_path / "serial")
    assert serial.exit_code == 0, serial.output
    parallel = invoke(*args, "--jobs", "2", "--out", tmp_path / "jobs2")
    assert parallel.exit_code == 0, parallel.output
    a, b = _losses(tmp_path / "serial"), _losses(tmp_path / "jobs2")
    assert len(a) == 2 * 3 * 2 and list(a) == list(b)
    for name in a:
        assert a[name] == b[name], name
    rows = [json.loads(r.stdout)["rows"] for r in (serial, parallel)]
    assert [(r["optimizer"], r["best_lr"], r["best_val"]) for r in rows[0]] == \
        [(r["optimizer"], r["best_lr"], r["best_val"]) for r in rows[1]]
    rec = json.loads(next((tmp_path / "jobs2").glob("sweep-*-seed1.json")).read_text())
    assert rec["timing"]["jobs"] == 2 and rec["environment"]["threads"] == 1
    manifest = json.loads((tmp_path / "jobs2" / "sweep-wine-fcn.manifest.json").read_text())
    assert manifest["status"] == "complete" and sorted(manifest["finished"]) == sorted(b)


def test_jobs_must_be_positive(tmp_path: Path) -> None:
    res = invoke("bench", "run", "wine-fcn", "--jobs", "0", "--out", tmp_path)
    assert res.exit_code == 2 and "--jobs must be positive, got 0" in res.output


def test_jobs_and_nproc_together_are_refused(tmp_path: Path) -> None:
    res = invoke("bench", "run", "wine-fcn", "-o", "autograd-adam", "--jobs", "2", "--nproc", "2",
                 "--out", tmp_path)
    assert res.exit_code == 2 and "--nproc 2 with --jobs 2: choose one" in res.output
    assert not list(tmp_path.glob("*.json"))
