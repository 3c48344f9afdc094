"""The Neural ODE part of a report (docs/ode.md): function evaluations, integration times and
the test metric against function evaluations, from ``train`` results whose model has ODE blocks
(``protocols.OdeCounter``: ``result["solver"]`` and ``nfe``/``t1`` in the curve points)."""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

from .protocols import config_key, mean_std, reached


def _ode_runs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "run" and r.get("protocol") == "train"
            and "solver" in r.get("result", {})]


def _test_key(metric: str) -> str:
    return "test_accuracy" if metric == "accuracy" else "test_loss"


def nfe_to_target(rec: dict[str, Any]) -> int | None:
    """Training function evaluations (forward and backward solves) until the test metric
    first reaches the run's target (checked after each epoch), None if never."""
    c = rec["config"]
    metric, target = c["problem"]["metric"], c["target"]
    for p in rec["result"]["curve"]:
        if reached(metric, p.get(_test_key(metric)), target):
            return int(p["nfe"])
    return None


def ode_summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (configuration, optimizer, lr) over seeds: function evaluations per step and in all
    (forward, backward), to the target (median over the seeds that reached it), the final t1
    and the final test metric."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in _ode_runs(records):
        groups.setdefault((r["problem"], config_key(r), r["optimizer"], r["config"]["lr"]),
                          []).append(r)
    rows = []
    for (prob, key, name, lr), recs in groups.items():
        metric = recs[0]["config"]["problem"]["metric"]
        sol = [r["result"]["solver"] for r in recs]
        hits = [n for n in map(nfe_to_target, recs) if n is not None]
        test = mean_std([r["result"]["final"].get(_test_key(metric)) for r in recs])
        rows.append({
            "problem": prob, "config_key": key, "optimizer": name, "lr": lr, "metric": metric,
            "seeds": len(recs), "target": recs[0]["config"]["target"],
            "order": recs[0]["config"]["optimizer"].get("order"),
            "family": recs[0]["config"]["optimizer"]["family"],
            "nfe_per_step": statistics.fmean(s["nfe_per_step"] for s in sol),
            "nfe_forward": statistics.fmean(s["nfe_forward"] for s in sol),
            "nfe_backward": statistics.fmean(s["nfe_backward"] for s in sol),
            "nfe_to_target": statistics.median(hits) if hits else None, "reached": len(hits),
            "t1": mean_std([statistics.fmean(s["t1"]) for s in sol]),
            "test": test, "records": recs})
    return rows


def plot_metric_vs_nfe(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Test metric after each epoch against the training function evaluations so far (mean
    over seeds), one line per optimizer; and t1 against the same axis."""
    import numpy as np

    from .report import _colors, _plt, _style

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for row, color in zip(rows, _colors(len(rows))):
        recs = row["records"]
        n = min(len(r["result"]["curve"]) for r in recs)
        key = _test_key(row["metric"])
        nfe = np.array([[p["nfe"] for p in r["result"]["curve"][:n]] for r in recs], float)
        val = np.array([[np.nan if p.get(key) is None else p[key]
                         for p in r["result"]["curve"][:n]] for r in recs], float)
        t1 = np.array([[np.mean(p["t1"]) for p in r["result"]["curve"][:n]] for r in recs],
                      float)
        scale = 100.0 if row["metric"] == "accuracy" else 1.0
        ls = _style(row["family"], row["order"])
        label = f"{row['optimizer']} (lr {row['lr']:.3g})"
        axes[0].plot(nfe.mean(0), scale * np.nanmean(val, 0), ls, color=color, label=label)
        axes[1].plot(nfe.mean(0), t1.mean(0), ls, color=color, label=label)
    ylab = {"accuracy": "test accuracy (%)", "nll": "test NLL (nats)"}
    axes[0].set_ylabel(ylab.get(rows[0]["metric"], "test MSE"))
    axes[1].set_ylabel("integration time t1")
    for ax in axes:
        ax.set_xlabel("training function evaluations (forward + backward solves)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def ode_section(records: list[dict[str, Any]], images: Path, rel: str) -> str:
    """The Markdown tables (and plots) of ``ode_summary``, one per train configuration."""
    rows = ode_summary(records)
    if not rows:
        return ""
    from .report import _f, _pm, _table

    out = ["### Neural ODE blocks: function evaluations and integration time\n",
           "Function evaluations of the ODE blocks' fields during the training steps (forward "
           "solves, and backward solves: the adjoint, the order-2 expansion and the grid "
           "statistics), evaluation passes excluded; NFE to target: training evaluations until "
           "the test metric first reached the target (checked after each epoch; median over "
           "the seeds that reached it); t1: the integration time after training (learned with "
           "`learn_t1`, else fixed).\n"]
    keys = list(dict.fromkeys((r["problem"], r["config_key"]) for r in rows))
    for k, (prob, key) in enumerate(keys):
        mine = [r for r in rows if r["config_key"] == key and r["problem"] == prob]
        metric = mine[0]["metric"]
        target = mine[0]["target"]
        tname = (f"{100 * target:.0f} % test acc." if metric == "accuracy"
                 else f"test {metric.upper()} ≤ {target:g}")
        body = []
        for r in mine:
            body.append([f"`{r['optimizer']}`", f"{r['lr']:.3g}", _f(r["nfe_per_step"], ".1f"),
                         f"{r['nfe_forward']:.0f} / {r['nfe_backward']:.0f}",
                         "not reached" if r["nfe_to_target"] is None
                         else f"{r['nfe_to_target']:.0f} ({r['reached']}/{r['seeds']})",
                         _pm(r["t1"][0], r["t1"][1], "loss"), _pm(r["test"][0], r["test"][1], metric)])
        metric_col = "test acc. (%)" if metric == "accuracy" else f"test {metric.upper()}"
        out.append(f"**{prob}** ({len(mine)} optimizers, {mine[0]['seeds']} seed(s))\n")
        out.append(_table(["optimizer", "lr", "NFE per step", "NFE forward / backward",
                           f"NFE to {tname}", "t1", metric_col], body, "lrrrrrr"))
        slug = re.sub(r"[^a-z0-9]+", "-", prob.lower()).strip("-")
        img = images / f"ode-{slug}-{k}.png"
        plot_metric_vs_nfe(mine, f"{prob}: test metric and t1 vs training function "
                                 "evaluations (mean over seeds)", img)
        out.append(f"\n![{prob}: test metric vs function evaluations]({rel}{img.name})\n")
    return "\n".join(out)
