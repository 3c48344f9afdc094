"""The claims experiments: protocol robustness (learning rate x initialisation scale), the
per-layer norm trace, the verdicts and the claims page (``ocnopt bench claims``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")
pytest.importorskip("typer")
from typer.testing import CliRunner  # noqa: E402

from ocnopt.bench import claims, problems, protocols  # noqa: E402
from ocnopt.bench import optimizers as registry  # noqa: E402
from ocnopt.cli import app  # noqa: E402

WINE = problems.get_problem("wine-fcn")
runner = CliRunner()


def test_digits_deep_network() -> None:
    p = problems.get_problem("digits-deep")
    model = p.model(0)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert len(linears) >= 12 and all(m.out_features == 32 for m in linears[:-1])
    assert sum(isinstance(m, nn.Sigmoid) for m in model) == len(linears) - 1
    assert model(torch.zeros(2, 64)).shape == (2, 10)


def test_scaled_problem_multiplies_the_initial_parameters() -> None:
    base = WINE.model(3)
    scaled = protocols.scaled_problem(WINE, 2.5).model(3)
    for p, q in zip(base.parameters(), scaled.parameters()):
        torch.testing.assert_close(q, 2.5 * p)


def test_robustness_protocol_and_summary(tmp_path: Path) -> None:
    data = problems.load(WINE, subset=40)
    specs = [registry.parse_optimizer(n) for n in ("torch-sgd", "torch-adam")]
    s = protocols.RunSettings(epochs=1, batch_size=16, seeds=[0, 1], subset=40, target=0.5)
    recs = protocols.robustness_protocol(WINE, data, specs, s, tmp_path, lr_points=2,
                                         lr_decades=2.0, scales=(0.5, 2.0))
    assert len(recs) == 2 * 2 * 2 * 2
    assert len(list(tmp_path.glob("robustness-wine-fcn-*.json"))) == 16
    manifest = json.loads((tmp_path / "robustness-wine-fcn.manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["scales"] == [0.5, 2.0]
    rows = {r["optimizer"]: r for r in protocols.robustness_summary(protocols.read_results(tmp_path))}
    for name, row in rows.items():
        mine = [r for r in recs if r["optimizer"] == name]
        for seed, share in zip(row["seeds"], row["share_per_seed"]):
            hits = [r["result"]["final"]["test_accuracy"] >= 0.5 and not r["result"]["diverged"]
                    for r in mine if r["seed"] == seed]
            assert share == sum(hits) / 4
        assert row["points"] == 4 and row["scales"] == [0.5, 2.0]
        assert sum(map(sum, row["reached"])) == sum(
            r["result"]["final"]["test_accuracy"] >= 0.5 for r in mine)
    # the same seed at the same grid point gives the same result (the init scale is applied)
    a = [r for r in recs if r["optimizer"] == "torch-sgd" and r["seed"] == 0]
    assert a[0]["result"]["curve"][0] != a[2]["result"]["curve"][0]  # scale 0.5 vs 2.0


def test_robustness_summary_counts_synthetic_records() -> None:
    def rec(lr: float, scale: float, seed: int, acc: float, diverged: bool = False) -> dict:
        return {"kind": "run", "protocol": "robustness", "problem": "p", "optimizer": "o",
                "seed": seed, "config": {"lr": lr, "init_scale": scale, "epochs": 1,
                                         "batch_size": 4, "target": 0.9,
                                         "problem": {"metric": "accuracy", "subset": None},
                                         "optimizer": {"family": "torch"}},
                "result": {"diverged": diverged, "final": {"test_accuracy": acc,
                                                           "train_loss": 1.0},
                           "curve": [{"train_loss": 2.0}]}}

    recs = [rec(0.1, 1, 0, 0.95), rec(0.2, 1, 0, 0.5), rec(0.1, 2, 0, 0.9), rec(0.2, 2, 0, 0.99),
            rec(0.1, 1, 1, 0.95), rec(0.2, 1, 1, 0.95, diverged=True), rec(0.1, 2, 1, 0.2),
            rec(0.2, 2, 1, 0.2)]
    (row,) = protocols.robustness_summary(recs)
    assert row["share_per_seed"] == [0.75, 0.25]
    assert row["share"] == 0.5 and row["share_std"] == pytest.approx(math.sqrt(0.125))
    assert row["reached"] == [[2, 0], [1, 1]]  # rows: scales, columns: learning rates
    assert row["share_all_seeds"] == 0.25


@pytest.mark.parametrize(("diffs", "verdict"), [
    ([1.0, 1.0, 1.0], "holds"),
    ([0.5, 0.6, 0.4], "holds"),  # m = 0.5, se = 0.058, t(2) = 4.30: 0.5 > 0.25
    ([0.1, -0.1, 0.05], "not distinguishable from noise at 3 seeds"),
    ([-1.0, -1.1, -0.9], "does not hold"),
    ([0.0, 0.0, 0.0], "does not hold"),
    ([0.3], "not distinguishable from noise at 1 seed"),
    ([0.2, 0.5, 0.01], "not distinguishable from noise at 3 seeds"),  # se 0.14, t se 0.61
])
def test_paired_verdict(diffs: list[float], verdict: str) -> None:
    assert claims.paired_verdict(diffs)[0] == verdict


def test_layer_gradient_norms_against_per_sample_loop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.Tanh(),
                          nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0, 1])
    gn, vx = protocols.layer_gradient_norms(model, "cross_entropy", x, y)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    lin = [m for m in model if isinstance(m, nn.Linear)]
    ref_gn = [math.sqrt(float((m.weight.grad**2).sum() + (m.bias.grad**2).sum())) for m in lin]
    assert gn == pytest.approx(ref_gn, rel=1e-12)
    # value gradient at each Linear output, per sample: d l_s / d y_{s,t}
    sq = [0.0, 0.0, 0.0]
    for s in range(5):
        h = x[s:s + 1]
        outs = []
        for m in model:
            h = m(h)
            if isinstance(m, nn.Linear):
                outs.append(h)
        g = torch.autograd.grad(nn.functional.cross_entropy(h, y[s:s + 1]), outs)
        for i, gi in enumerate(g):
            sq[i] += float((gi**2).sum()) / 5
    assert vx == pytest.approx([math.sqrt(v) for v in sq], rel=1e-10)


def test_tracer_update_norm_is_the_sgd_step() -> None:
    """Plain SGD (no momentum): the first update of every layer is lr |dJ/dtheta_t|; ocnopt's
    order-1 SGD reports |k_t| equal to the update it made."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    st = registry.TorchStepper(model, "cross_entropy", torch.optim.SGD(model.parameters(), lr=0.1))
    tr = protocols.NormTracer(st, model, "cross_entropy", every=2)
    for _ in range(3):
        tr.step(x, y)
    t = tr.trace
    assert t["steps"] == [0, 2] and t["layers"] == ["0", "2"]
    assert t["update_norm"][0] == pytest.approx([0.1 * g for g in t["grad_norm"][0]], rel=1e-5)
    assert t["k_norm"] == [None, None]
    model2 = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    spec = registry.parse_optimizer("autograd-sgd")
    tr2 = protocols.NormTracer(spec.make(model2, "cross_entropy", 0.1, 0), model2,
                               "cross_entropy", every=1)
    tr2.step(x, y)
    assert tr2.trace["k_norm"][0] == pytest.approx(tr2.trace["update_norm"][0], rel=1e-4)


def test_trace_protocol_and_claims_page(tmp_path: Path) -> None:
    data = problems.load(WINE, subset=40)
    specs = [registry.parse_optimizer(n) for n in ("torch-sgd", "lowrank-kfac-fb", "autograd-kfac",
                                                   "emsa")]
    s = protocols.RunSettings(epochs=2, batch_size=16, seeds=[0, 1], subset=40)
    recs = protocols.trace_protocol(WINE, data, specs, s, tmp_path / "trace", every=2,
                                    argv=["ocnopt", "bench", "trace", "wine-fcn"])
    steps = recs[0]["result"]["steps"]
    for r in recs:
        tr = r["result"]["trace"]
        assert r["protocol"] == "train" and len(tr["steps"]) == math.ceil(steps / 2)
        assert len(tr["update_norm"][0]) == len(tr["layers"]) == 5
    res = runner.invoke(app, ["bench", "robustness", "wine-fcn", "-o", "torch-sgd,autograd-kfac,"
                              "lowrank-kfac-fb", "--epochs", "1", "--seeds", "2", "--lr-points",
                              "2", "--scales", "1,2", "--subset", "40", "--out",
                              str(tmp_path / "rob")])
    assert res.exit_code == 0, res.output
    page_path = tmp_path / "docs" / "claims.md"
    res = runner.invoke(app, ["bench", "claims", str(tmp_path), "--out", str(page_path)])
    assert res.exit_code == 0, res.output
    page = page_path.read_text()
    for heading in ("## Claim 1", "## Claim 2", "## Claim 3", "## Summary"):
        assert heading in page
    assert "ocnopt bench trace wine-fcn" in page  # the command recorded in the manifest
    # summary tables: claim 3 has a column per optimal-control peer, claim 1 one for the own
    # order 1 (autograd-kfac for lowrank-kfac-fb) and one per peer that ran
    claim1 = page.split("### Claim 1")[1].split("### Claim 2")[0]
    claim3 = page.split("### Claim 3")[1].split("## Settings")[0]
    assert "| problem | order 2 | own order 1 | torch-sgd |" in claim1
    assert "| wine-fcn | lowrank-kfac-fb |" in claim1
    assert "| problem | order 2 | own order 1 | torch-sgd | emsa |" not in claim3
    assert "| problem | order 2 | emsa |" in claim3 and "| wine-fcn | lowrank-kfac-fb |" in claim3
    assert "lowrank-kfac-fb | autograd-kfac |" in page  # claim 1's section: vs its order 1
    assert "`autograd-full-fb` (vanilla DDP's exact value Hessians" in page  # not run, and why
    assert (tmp_path / "docs" / "claims-plots" / "claims-robustness-wine-fcn.png").stat().st_size
    assert "1 epochs instead of 40" in page


def test_cli_refuses_bad_scales(tmp_path: Path) -> None:
    res = runner.invoke(app, ["bench", "robustness", "wine-fcn", "--scales", "1,-2", "--out",
                              str(tmp_path)])
    assert res.exit_code == 2 and "--scales '1,-2'" in res.output
    res = runner.invoke(app, ["bench", "claims", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "not a directory" in res.output


def test_guarded_stepper_turns_a_linalg_error_into_divergence() -> None:
    class Broken:
        skipped = 0

        def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
            raise torch.linalg.LinAlgError("non-finite")  # as Shampoo's SVD after a blow-up

    st = protocols.GuardedStepper(Broken())
    assert math.isnan(st.step(torch.zeros(1), torch.zeros(1))) and st.errors == ["non-finite"]


def test_stalled_means_chance_level_loss() -> None:
    def rec(name: str, start: float, end: float) -> dict:
        return {"optimizer": name, "config": {"problem": {"classes": 10}},
                "result": {"diverged": False, "final": {"train_loss": end},
                           "curve": [{"train_loss": start}]}}

    recs = [rec("a", 2.40, 2.3029), rec("a", 2.35, 2.31), rec("b", 2.40, 2.3), rec("b", 2.4, 1.0)]
    assert claims._stalled(recs, "a")  # ln 10 = 2.3026: both runs stay at chance level
    assert not claims._stalled(recs, "b")  # one run trains
    assert not claims._stalled(recs, "c")  # no runs
