"""The study page of the papers' claims (``ocnopt bench claims``, docs/claims.md), made from saved
result files only.

DDPNOpt's papers claim, beyond competitive accuracy, that the layer-wise feedback

1. reduces the sensitivity to hyper-parameters (learning rate, initialisation): protocol
   ``robustness`` (share of a learning rate x initialisation scale grid that reaches a target);
2. prevents vanishing gradients in deep nets with saturating activations: protocol ``trace``
   on ``digits-deep`` (final training loss, per-layer norms against depth and step);
3. beats the earlier optimal-control optimizers, E-MSA and vanilla DDP (``autograd-full-fb``),
   in training performance and runtime: protocol ``trace`` (final training loss, time per
   step) and ``overhead`` (time per step in one process).

Verdicts compare paired seeds (the same seed gives the same initial weights and minibatches to
every optimizer): d_i = the difference of seed i, mean m and standard error se = sd / sqrt(n);
"holds" when m is in the claim's favour and |m| > t se (t the two-sided 95 % Student quantile
with n - 1 degrees of freedom), "does not hold" when m is against it beyond t se, or when the
two are identical over all seeds, and otherwise "not distinguishable from noise at n seeds".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .problems import PROBLEMS
from .protocols import mean_std, read_results, robustness_summary, train_summary
from .report import _colors, _environment_line, _plt, _table

#: two-sided 95 % Student t quantiles by degrees of freedom (n - 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262}

#: order-2 modes and the order-1 mode with the same curvature (their "own order 1")
ORDER1_OF = {"lowrank-adam-fb": "autograd-adam", "lowrank-kfac-fb": "autograd-kfac",
             "autograd-kfac-fb": "autograd-kfac", "autograd-adam-fb": "autograd-adam",
             "lowrank-sgd-fb": "autograd-sgd", "lowrank-ekfac-fb": "autograd-ekfac",
             "lowrank-soap-fb": "autograd-soap", "lowrank-shampoo-fb": "autograd-shampoo"}
#: what order 2 is compared with besides its own order 1, each where its results exist: torch
#: SGD/Adam, curvlinops' K-FAC, pytorch-optimizer's SOAP and Shampoo, E-MSA, vanilla DDP
PEERS_COMPARED = ("torch-sgd", "torch-adam", "curvlinops-kfac", "soap", "shampoo", "emsa",
                  "autograd-full-fb")
#: the problems the study covers when run in full
STUDY_PROBLEMS = ("digits-fcn", "digits-deep", "mnist1d-mlp", "digits-resnet")
#: the optimal-control peers of claim 3
OC_PEERS = ("emsa", "autograd-full-fb")


# ---- verdicts -----------------------------------------------------------------------------------
def versus(o2: str, present: set[str] | dict[str, Any]) -> list[str]:
    """The optimizers order-2 mode ``o2`` is compared with, among ``present``: its own order 1
    first, then ``PEERS_COMPARED``."""
    return [n for n in (ORDER1_OF[o2], *PEERS_COMPARED) if n in present and n != o2]


def _short(verdict: str) -> str:
    """A verdict cut for the summary tables."""
    if verdict.startswith("not distinguishable from noise"):
        return "noise" + (" (" + verdict.rsplit(" at ", 1)[1] + ")" if " at " in verdict
                          else "")
    if "neither trains" in verdict:
        return "neither trains"
    if "neither reaches" in verdict:
        return "neither reaches"
    return verdict

def paired_verdict(favour: Sequence[float]) -> tuple[str, float | None, float | None]:
    """(verdict, mean, standard error) of per-seed differences ``favour`` that are positive
    when the claim holds (see the module docstring)."""
    d = [x for x in favour if x is not None and math.isfinite(x)]
    n = len(d)
    if n == 0:
        return "no data", None, None
    m = statistics.fmean(d)
    if n == 1:
        return "not distinguishable from noise at 1 seed", m, None
    se = statistics.stdev(d) / math.sqrt(n)
    if se == 0.0:
        return ("holds" if m > 0 else "does not hold"), m, 0.0
    t = T95.get(n - 1, 1.96 + 2.5 / (n - 1))
    if m > t * se:
        return "holds", m, se
    if m < -t * se:
        return "does not hold", m, se
    return f"not distinguishable from noise at {n} seeds", m, se


def _by_seed(records: Sequence[dict[str, Any]], value: Any) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for r in records:
        v = value(r)
        out.setdefault(r["optimizer"], {})[r["seed"]] = math.inf if v is None else v
    return out


def _paired(a: dict[int, float], b: dict[int, float], lower_better: bool) -> list[float]:
    """Per common seed, how much ``a`` beats ``b`` (positive: a better)."""
    out = []
    for s in sorted(set(a) & set(b)):
        x, y = a[s], b[s]
        if math.isinf(x) and math.isinf(y):
            out.append(0.0)
        elif math.isinf(x) or math.isinf(y):
            out.append(math.inf if math.isinf(y) else -math.inf)
        else:
            out.append(y - x if lower_better else x - y)
    # a diverged run loses to any finite one: clip the infinity to a large finite margin
    return [max(min(v, 1e9), -1e9) for v in out]


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _pm(m: float | None, s: float | None, spec: str = ".3f") -> str:
    return "n/a" if m is None else f"{m:{spec}} ± {(s or 0):{spec}}"


def _mode(family: str, order: int | None) -> str:
    return f"ocnopt order {order}" if family == "ocnopt" else f"peer ({family})"


def _final_train_loss(r: dict[str, Any]) -> float | None:
    v = r["result"]["final"].get("train_loss")
    return None if r["result"]["diverged"] or v is None else v


#: a run "does not train" when its final training loss stays above this share of the initial one
STALL = 0.98


def _stalled(recs: list[dict[str, Any]], name: str) -> bool:
    """Every run of ``name`` ends with a training loss >= STALL x min(its initial loss, the
    chance-level loss ln C of C classes, the loss of predicting uniform probabilities), or
    diverged."""
    mine = [r for r in recs if r["optimizer"] == name]
    out = []
    for r in mine:
        end, start = _final_train_loss(r), r["result"]["curve"][0].get("train_loss")
        classes = r["config"]["problem"].get("classes")
        if start is not None and classes:
            start = min(start, math.log(classes))
        out.append(end is None or start is None or end >= STALL * start)
    return bool(mine) and all(out)


def _sec_per_step(r: dict[str, Any]) -> float:
    return r["timing"]["train_seconds"] / max(r["result"]["steps"], 1)


# ---- commands -----------------------------------------------------------------------------------
def _commands(records: Sequence[dict[str, Any]], protocol: str, problem: str | None = None
              ) -> list[str]:
    """The command lines recorded in the manifests of ``protocol`` (on ``problem``)."""
    out = []
    for r in records:
        if r.get("kind") == "manifest" and r["protocol"] == protocol and \
                (problem is None or r["problem"] == problem):
            argv = r["config"].get("argv")
            status = r.get("status")
            line = " ".join(argv) if argv else \
                f"(a {protocol} run on {r['problem']}, no command line recorded)"
            out.append(line + ("" if status == "complete" else f"  # status: {status}"))
    return sorted(set(out))


def _code(lines: Sequence[str]) -> str:
    return "```\n" + "\n".join(lines) + "\n```" if lines else "_(no runs found)_"


# ---- claim 1: robustness -----------------------------------------------------------------------
def plot_robustness(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Per optimizer, the grid (learning rate x initialisation scale) coloured by the share of
    seeds whose final test metric reached the target."""
    plt = _plt()
    n = len(rows)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols + 1, 3.1 * nrows), squeeze=False,
                             constrained_layout=True)
    for ax, row in zip(axes.flat, rows):
        grid = [[k / len(row["seeds"]) for k in line] for line in row["reached"]]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(row["lrs"])), [f"{x:.2g}" for x in row["lrs"]], fontsize=6,
                      rotation=45)
        ax.set_yticks(range(len(row["scales"])), [f"{x:g}" for x in row["scales"]], fontsize=7)
        ax.set_title(f"{row['optimizer']}: {100 * row['share']:.0f}%", fontsize=8)
        ax.set_xlabel("learning rate", fontsize=7)
        ax.set_ylabel("init scale", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="share of seeds reaching the target")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _robustness_block(records: list[dict[str, Any]], sub: list[dict[str, Any]], prob: str,
                      images: Path, rel: str, claim: int) -> tuple[list[str], list]:
    """Commands, table, plot and paired verdicts of the robustness rows ``sub`` of ``prob``."""
    verdicts = []
    r0 = sub[0]
    lines = [f"### {prob}: learning rate x initialisation scale", "", "Commands:", "",
             _code(_commands(records, "robustness", prob)), "",
             f"{len(r0['lrs'])} learning rates x {len(r0['scales'])} scales "
             f"({', '.join(f'{c:g}' for c in r0['scales'])}), seeds "
             f"{', '.join(map(str, r0['seeds']))}, {r0['epochs']} epochs, batch "
             f"{r0['batch_size']}, target: final test accuracy >= {r0['target']:g}.", ""]
    table = [[r["optimizer"], _mode(r["family"], r["order"]),
              f"{100 * r['share']:.0f} ± {100 * (r['share_std'] or 0):.0f} %",
              f"{100 * r['share_all_seeds']:.0f} %", f"{r['diverged']}/{r['runs']}"]
             for r in sorted(sub, key=lambda r: -(r["share"] or 0))]
    lines += [_table(["optimizer", "mode", "share reached", "reached by every seed",
                      "diverged runs"], table, "llrrr"), ""]
    png = images / f"claims-robustness-{prob}.png"
    plot_robustness(sub, f"robustness {prob}: share of seeds reaching test acc. "
                         f">= {r0['target']:g}", png)
    lines += [f"![robustness {prob}]({rel}{png.name})", ""]
    share = {r["optimizer"]: dict(zip(r["seeds"], r["share_per_seed"])) for r in sub}
    vt = []
    for o2 in (o for o in ORDER1_OF if o in share):
        for other in versus(o2, share):
            v, m, se = paired_verdict(_paired(share[o2], share[other], lower_better=False))
            if not any(share[o2].values()) and not any(share[other].values()):
                v = "does not hold (neither reaches the target at any grid point)"
            vt.append([o2, other, _fmt(None if m is None else 100 * m, "+.0f") + " pts",
                       _fmt(None if se is None else 100 * se, ".0f") + " pts", v])
            verdicts.append({"claim": claim, "problem": prob, "mode": o2, "versus": other,
                             "what": "share of the grid", "verdict": v, "mean": m, "se": se})
    if vt:
        lines += ["Paired over seeds (share of order 2 minus share of the other):", "",
                  _table(["order 2", "versus", "mean difference", "standard error",
                          "verdict"], vt, "lllrl"), ""]
    return lines, verdicts


#: problems whose robustness grid belongs to claim 2 (vanishing gradients), not claim 1
DEEP = ("digits-deep",)


def _claim1(records: list[dict[str, Any]], images: Path, rel: str) -> tuple[list[str], list]:
    rows = [r for r in robustness_summary(records) if r["problem"] not in DEEP]
    lines = ["## Claim 1: the layer-wise feedback reduces the sensitivity to hyper-parameters", "",
             "Protocol `robustness`: every optimizer on a grid of learning rates (log-spaced, "
             "centred on its default) x initialisation scales (every initial parameter times "
             "the scale), several seeds per point; a point *reaches* when the final test "
             "accuracy is at least the target. Share: the share of the grid reached, per seed, "
             "mean ± std over seeds. Order 2 is compared with its own order 1 and with the "
             "peers that ran (torch SGD/Adam, curvlinops K-FAC, SOAP, Shampoo); E-MSA and "
             "vanilla DDP are too slow for a grid of runs here.", ""]
    verdicts: list[dict[str, Any]] = []
    for prob in sorted({r["problem"] for r in rows}):
        block, v = _robustness_block(records, [r for r in rows if r["problem"] == prob], prob,
                                     images, rel, 1)
        lines += block
        verdicts += v
    if not rows:
        lines += ["_No robustness results in this folder._", ""]
    return lines, verdicts


# ---- claim 2: vanishing gradients --------------------------------------------------------------
def _trace_records(records: list[dict[str, Any]], problem: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "run" and r["protocol"] == "train"
            and r["problem"] == problem and "trace" in r["result"]]


def _profile(recs: list[dict[str, Any]], key: str) -> list[float]:
    """Per layer, the geometric mean over seeds and traced steps of the norm ``key``."""
    layers = len(recs[0]["result"]["trace"]["layers"])
    out = []
    for i in range(layers):
        v = [row[i] for r in recs for row in r["result"]["trace"][key] if row is not None
             and row[i] is not None and math.isfinite(row[i]) and row[i] > 0]
        out.append(math.exp(statistics.fmean(math.log(x) for x in v)) if v else math.nan)
    return out


def plot_norms(groups: dict[str, list[dict[str, Any]]], title: str, path: Path) -> None:
    """Per optimizer (rows): log10 of the update norm |Delta theta_t| and of the value-gradient
    norm |V_x| against layer (depth, y) and training step (x), seed 0 (an update that is
    exactly 0 in float32 is left white); and, in the last row, both norms against depth
    (geometric mean over seeds and steps, zeros left out)."""
    import numpy as np

    plt = _plt()
    names = list(groups)
    fig, axes = plt.subplots(len(names) + 1, 2, figsize=(11, 1.6 * len(names) + 3.2),
                             squeeze=False)
    for ax_row, name in zip(axes, names):
        rec = sorted(groups[name], key=lambda r: r["seed"])[0]
        tr = rec["result"]["trace"]
        for ax, key, label in ((ax_row[0], "update_norm", "|Δθ|"),
                               (ax_row[1], "value_grad_norm", "|V_x|")):
            a = np.array([[x if x and x > 0 else np.nan for x in row] for row in tr[key]],
                         dtype=float).T
            im = ax.imshow(np.log10(a), aspect="auto", origin="lower", cmap="magma",
                           extent=(tr["steps"][0], tr["steps"][-1], 0.5, a.shape[0] + 0.5))
            ax.set_title(f"{name}: log10 {label}", fontsize=8)
            ax.set_ylabel("layer", fontsize=7)
            ax.tick_params(labelsize=6)
            fig.colorbar(im, ax=ax, pad=0.01)
    for ax, key, label in ((axes[-1][0], "update_norm", "|Δθ| (update)"),
                           (axes[-1][1], "value_grad_norm", "|V_x| (value gradient)")):
        for (name, recs), color in zip(groups.items(), _colors(len(groups))):
            prof = _profile(recs, key)
            ax.semilogy(range(1, len(prof) + 1), prof, marker="o", ms=3, color=color, label=name)
        ax.set_xlabel("layer (depth)", fontsize=7)
        ax.set_title(f"{label} against depth: geometric mean over steps and seeds", fontsize=8)
        ax.tick_params(labelsize=6)
    axes[-1][1].legend(fontsize=6, ncol=2)
    for row in axes[:-1]:
        row[0].set_xlabel("step", fontsize=7)
        row[1].set_xlabel("step", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _train_rows_table(recs: list[dict[str, Any]], with_profile: bool) -> str:
    rows = train_summary(recs)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        groups.setdefault(r["optimizer"], []).append(r)
    table = []
    for row in sorted(rows, key=lambda r: (r["train_loss"] is None, r["train_loss"] or 0)):
        rs = groups[row["optimizer"]]
        sps = mean_std([_sec_per_step(r) for r in rs])
        cells = [row["optimizer"], _mode(row["family"], row["order"]), _fmt(row["lr"]),
                 _pm(row["train_loss"], row["train_loss_std"]),
                 _pm(None if row["test"] is None else 100 * row["test"],
                     None if row["test_std"] is None else 100 * row["test_std"], ".1f"),
                 _pm(None if sps[0] is None else 1e3 * sps[0],
                     None if sps[1] is None else 1e3 * sps[1], ".1f"),
                 f"{row['target_reached']}/{len(row['seeds'])}", str(row["diverged"])]
        if with_profile:
            for key in ("grad_norm", "update_norm"):
                prof = _profile(rs, key)
                cells.append(_fmt(prof[0] / prof[-1] if prof[-1] else None, ".2g"))
        table.append(cells)
    head = ["optimizer", "mode", "lr", "final train loss", "test acc. %", "ms / step",
            "reached target", "diverged"]
    if with_profile:
        head += ["|dJ/dθ| first / last layer", "|Δθ| first / last layer"]
    return _table(head, table, "lllrrrrr" + ("rr" if with_profile else ""))


def _deep_trace(records: list[dict[str, Any]], recs: list[dict[str, Any]], images: Path,
                rel: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Claim 2's trace part: the table, the norms plot and the paired verdicts on the final
    training loss of the digits-deep trace runs ``recs``."""
    lines: list[str] = []
    verdicts: list[dict[str, Any]] = []
    lines += ["Commands:", "", _code(_commands(records, "trace", "digits-deep")), "",
              _environment_line(recs), "", _train_rows_table(recs, True), "",
              f"N = {recs[0]['result']['trace']['every']}. ms / step includes the trace (one "
              "extra forward and backward every N steps). "
              "first / last layer: ratio of the geometric means over steps and seeds (a ratio "
              "far below 1: the early layers get vanishing gradients or updates; n/a: the first "
              "layer's update was exactly 0 in float32 at every traced step).", ""]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        groups.setdefault(r["optimizer"], []).append(r)
    stalled = sorted(n for n in groups if _stalled(recs, n))
    trained = sorted(n for n in groups if n not in stalled)
    lines += [f"Optimizers whose every run ends within {100 * (1 - STALL):.0f} % of the "
              "chance-level training loss ln 10 (or of its initial loss, if lower): they do not "
              f"train here: {', '.join(stalled) or 'none'}; the others: "
              f"{', '.join(trained) or 'none'}.", ""]
    png = images / "claims-norms-digits-deep.png"
    plot_norms(groups, "digits-deep: per-layer norms against step and depth", png)
    lines += [f"![norms digits-deep]({rel}{png.name})", ""]
    loss = _by_seed(recs, _final_train_loss)
    vt = []
    for o2 in (o for o in ORDER1_OF if o in loss):
        for other in versus(o2, loss):
            v, m, se = paired_verdict(_paired(loss[o2], loss[other], lower_better=True))
            if _stalled(recs, o2) and _stalled(recs, other):
                v = "does not hold (neither trains: both stay at the chance-level loss)"
            vt.append([o2, other, _fmt(m, "+.3f"), _fmt(se, ".3f"), v])
            verdicts.append({"claim": 2, "problem": "digits-deep", "mode": o2, "versus": other,
                             "what": "final training loss", "verdict": v, "mean": m, "se": se})
    if vt:
        lines += ["Paired over seeds (final training loss of the other minus that of order 2):",
                  "", _table(["order 2", "versus", "mean difference", "standard error",
                              "verdict"], vt, "lllrl"), ""]
    return lines, verdicts


def _claim2(records: list[dict[str, Any]], images: Path, rel: str) -> tuple[list[str], list]:
    lines = ["## Claim 2: the feedback prevents vanishing gradients", "",
             "Protocol `trace` on `digits-deep` (12 Linear layers of width 32 with Sigmoid: the "
             "gradient of the early layers shrinks by the Sigmoid's slope, at most 1/4, per "
             "layer), default learning rates. Every N steps and per layer: |Δθ_t| (the update "
             "the optimizer made), |dJ/dθ_t| (the parameter gradient of the batch loss) and "
             "|V_x| (the value gradient: the root mean square over the batch of the gradient of "
             "a sample's loss at the layer's output, from a separate autograd pass before the "
             "step); ocnopt's |k_t| is recorded too (`result.trace.k_norm`). The claim is "
             "tested on the final training loss: order 2 against its own order 1 and against "
             "the peers that ran (torch SGD/Adam, curvlinops K-FAC, SOAP, Shampoo, E-MSA; "
             "paired seeds, lower is better).", ""]
    verdicts: list[dict[str, Any]] = []
    recs = _trace_records(records, "digits-deep")
    if recs:
        trace_lines, trace_verdicts = _deep_trace(records, recs, images, rel)
        lines += trace_lines
        verdicts += trace_verdicts
    else:
        lines += ["_No traced digits-deep results in this folder._", ""]
    for prob in DEEP:
        sub = [r for r in robustness_summary(records) if r["problem"] == prob]
        if sub:
            lines += ["At the default learning rate and initialisation nothing may train; the "
                      "robustness grid asks whether order 2 trains at more (learning rate, "
                      "initialisation scale) points than its order 1:", ""]
            rob_lines, rob_verdicts = _robustness_block(records, sub, prob, images, rel, 2)
            lines += rob_lines
            verdicts += rob_verdicts
    return lines, verdicts


# ---- claim 3: E-MSA and vanilla DDP ------------------------------------------------------------
#: why an optimal-control peer is missing from a problem's trace runs ((peer, problem or None))
OC_ABSENT = {
    ("emsa", "digits-resnet"): "E-MSA is defined for chains; this network has skips and "
                               "BatchNorm",
    ("emsa", None): "not run",
    ("autograd-full-fb", None): "vanilla DDP's exact value Hessians of every layer's output "
                                "(dense blocks over all parameters): too slow or too large to "
                                "train here; its time per step is in the overhead protocol "
                                "where measured",
}


def _sizes(recs: list[dict[str, Any]]) -> str:
    """Seeds, epochs, steps and batch of a problem's trace runs."""
    seeds = sorted({r["seed"] for r in recs})
    epochs = sorted({r["config"]["epochs"] for r in recs})
    steps = sorted({r["result"]["steps"] for r in recs})
    batch = sorted({r["config"]["batch_size"] for r in recs})
    subset = sorted({r["config"]["problem"].get("subset") or 0 for r in recs})
    return (f"Sizes: seeds {', '.join(map(str, seeds))} ({len(seeds)}), "
            f"{'/'.join(map(str, epochs))} epochs, {'/'.join(map(str, steps))} steps, batch "
            f"{'/'.join(map(str, batch))}"
            + (f", first {subset[-1]} samples of each split" if subset[-1] else "") + ".")

def _claim3(records: list[dict[str, Any]]) -> tuple[list[str], list]:
    lines = ["## Claim 3: better than E-MSA and vanilla DDP in training performance and runtime",
             "", "Protocol `trace` (a train run at the default learning rates; the trace adds "
             "the same extra pass to every optimizer) on each problem; training performance: "
             "final training loss (paired seeds, lower is better); runtime: seconds per "
             "training step (paired seeds). Vanilla DDP is ocnopt's `autograd-full-fb` (exact "
             "value Hessians, full curvature); E-MSA is the `emsa` peer (Li, Chen, Tai and E, "
             "JMLR 2018, as its Algorithm 3 and Section 5: per layer, 10 L-BFGS iterations on "
             "the augmented Hamiltonian, rho = 1; chains only). Protocol `overhead` gives the "
             "time per step in one process where vanilla DDP is too slow to train.", ""]
    verdicts = []
    problems = sorted({r["problem"] for r in records if r.get("kind") == "run"
                       and r["protocol"] == "train" and "trace" in r["result"]})
    for prob in problems:
        recs = _trace_records(records, prob)
        names = {r["optimizer"] for r in recs}
        lines += [f"### {prob}", "", "Commands:", "", _code(_commands(records, "trace", prob)),
                  "", _sizes(recs), "", _train_rows_table(recs, False), ""]
        missing = [p for p in OC_PEERS if p not in names]
        if missing:
            lines += [f"Not run on {prob}: " + "; ".join(
                f"`{p}` ({OC_ABSENT.get((p, prob)) or OC_ABSENT.get((p, None), 'not run')})"
                for p in missing) + ".", ""]
        loss = _by_seed(recs, _final_train_loss)
        sps = _by_seed(recs, _sec_per_step)
        vt = []
        for o2 in ORDER1_OF:
            for peer in OC_PEERS:
                if o2 in names and peer in names:
                    v1, m1, s1 = paired_verdict(_paired(loss[o2], loss[peer], lower_better=True))
                    if _stalled(recs, o2) and _stalled(recs, peer):
                        v1 = ("not distinguishable (neither trains: both stay at the "
                              "chance-level loss)")
                    v2, m2, s2 = paired_verdict(_paired(sps[o2], sps[peer], lower_better=True))
                    vt.append([o2, peer, f"{_fmt(m1, '+.3f')} ± {_fmt(s1, '.3f')}", v1,
                               f"{_fmt(None if m2 is None else 1e3 * m2, '+.1f')} ± "
                               f"{_fmt(None if s2 is None else 1e3 * s2, '.1f')}", v2])
                    verdicts += [{"claim": 3, "problem": prob, "mode": o2, "versus": peer,
                                  "what": "training loss", "verdict": v1, "mean": m1, "se": s1},
                                 {"claim": 3, "problem": prob, "mode": o2, "versus": peer,
                                  "what": "runtime", "verdict": v2, "mean": m2, "se": s2}]
        if vt:
            lines += ["Paired over seeds (the peer's value minus order 2's: positive = order 2 "
                      "better; mean ± standard error):", "",
                      _table(["order 2", "versus", "train loss difference", "verdict",
                              "ms / step difference", "verdict"], vt, "llrlrl"), ""]
    over = [r for r in records if r.get("kind") == "run" and r["protocol"] == "overhead"
            and set(r["result"]["rows"]) & set(OC_PEERS)]
    for rec in over:
        rows = rec["result"]["rows"]
        lines += [f"### overhead {rec['problem']}", "", "Commands:", "",
                  _code(_commands(records, "overhead", rec["problem"]) or
                        [f"ocnopt bench overhead {rec['problem']} -o "
                         f"{','.join(rec['config']['optimizers'])} --warmup "
                         f"{rec['config']['warmup']} --rounds {rec['config']['rounds']} --block "
                         f"{rec['config']['block']} --memory-steps "
                         f"{rec['config']['memory_steps']} --out "
                         f"{Path(rec['_path']).parent}"]), "",
                  _table(["optimizer", "median ms / step", "x torch-sgd", "steps timed"],
                         [[n, f"{r['median_ms']:.1f}", f"{r['median_ratio']:.1f}",
                           str(r["steps_timed"])] for n, r in rows.items()], "lrrr"), ""]
        vt = []
        for o2 in ORDER1_OF:
            for peer in OC_PEERS:
                if o2 in rows and peer in rows:
                    a, b = rows[o2], rows[peer]
                    v = ("holds" if a["p75_ms"] < b["p25_ms"] else "does not hold"
                         if a["p25_ms"] > b["p75_ms"] else "not distinguishable from noise")
                    vt.append([o2, peer, f"{b['median_ms'] / a['median_ms']:.1f}", v])
                    verdicts.append({"claim": 3, "problem": rec["problem"], "mode": o2,
                                     "versus": peer, "what": "runtime, protocol overhead",
                                     "verdict": v, "mean": b["median_ms"] - a["median_ms"],
                                     "se": None})
        if vt:
            lines += ["Runtime verdict: *holds* when the 75th percentile of order 2's step times "
                      "is below the 25th percentile of the peer's (*does not hold*: the "
                      "reverse):", "", _table(["order 2", "versus", "peer's median / order 2's",
                                               "verdict"], vt, "llrl"), ""]
    return lines, verdicts


def _reductions(records: list[dict[str, Any]]) -> list[str]:
    """Where the runs depart from the problems' protocol defaults (epochs, target, subset)."""
    seen: dict[tuple[str, str], set[str]] = {}
    for r in records:
        if r.get("kind") != "run" or r["protocol"] not in ("train", "robustness"):
            continue
        p = PROBLEMS.get(r["problem"])
        c = r["config"]
        notes = seen.setdefault((r["protocol"] if "trace" not in r["result"] else "trace",
                                 r["problem"]), set())
        if p is not None and c.get("epochs") != p.epochs:
            notes.add(f"{c['epochs']} epochs instead of {p.epochs}")
        if p is not None and c.get("target") != p.target:
            notes.add(f"target {c['target']:g} instead of {p.target:g}")
        if c["problem"].get("subset"):
            notes.add(f"first {c['problem']['subset']} samples of each split")
    lines = ["## Settings that depart from the protocol defaults", ""]
    for (proto, prob), notes in sorted(seen.items()):
        lines.append(f"- {proto} {prob}: {'; '.join(sorted(notes)) if notes else 'none'}")
    ran = {prob for _, prob in seen}
    missing = [p for p in STUDY_PROBLEMS if p not in ran]
    if missing:
        lines.append(f"- not run here (no result files): {', '.join(missing)}")
    return lines + [""]


# ---- page ---------------------------------------------------------------------------------------
def _summary_tables(vs: list[dict[str, Any]]) -> list[str]:
    """One table per measure (``what``) of the verdicts ``vs`` of one claim."""
    out: list[str] = []
    for what in dict.fromkeys(v["what"] for v in vs):
        sub = [v for v in vs if v["what"] == what]
        own = any(v["versus"] == ORDER1_OF.get(v["mode"]) for v in sub)
        cols = ["own order 1"] * own + [p for p in PEERS_COMPARED
                                        if any(v["versus"] == p for v in sub)]
        rows: dict[tuple[str, str], dict[str, str]] = {}
        for v in sub:
            col = "own order 1" if v["versus"] == ORDER1_OF.get(v["mode"]) else v["versus"]
            rows.setdefault((v["problem"], v["mode"]), {})[col] = _short(v["verdict"])
        table = [[prob, mode] + [cells.get(c, "-") for c in cols]
                 for (prob, mode), cells in rows.items()]
        out += [f"{what}:", "", _table(["problem", "order 2"] + cols, table,
                                       "ll" + "l" * len(cols)), ""]
    return out


def render_claims(folder: Path, images: Path, rel: str = "", command: str | None = None
                  ) -> tuple[str, dict[str, Any]]:
    """(Markdown page, summary) of the claims from the results under ``folder``; plots are
    written to ``images`` and linked as ``rel`` + file name."""
    records = read_results(folder)
    images.mkdir(parents=True, exist_ok=True)
    c1, v1 = _claim1(records, images, rel)
    c2, v2 = _claim2(records, images, rel)
    c3, v3 = _claim3(records)
    verdicts = v1 + v2 + v3
    head = ["# The papers' claims, tested", "",
            "Generated by `ocnopt bench claims` from the result files under "
            f"`{folder}`{f' (`{command}`)' if command else ''}; do not edit by hand: rerun the "
            "commands below and regenerate.", "",
            "Verdicts compare paired seeds (same initial weights and minibatches): *holds* when "
            "the mean difference is in the claim's favour beyond the 95 % Student interval of "
            "the seeds (t x standard error, t = 4.30 for 3 seeds, 2.78 for 5), *does not hold* when it is "
            "against it beyond that interval or the two are identical on every seed, otherwise "
            "*not distinguishable from noise at n seeds*. With 3 to 5 seeds only large effects "
            "count. The machine was shared with other jobs while these ran (2 cores): times per "
            "step are noisier than on a quiet machine.", ""]
    summary_lines = ["## Summary", "",
                     "Per claim and measure, one row per problem and order-2 mode, one column per "
                     "optimizer it is compared with (*own order 1*: the order-1 mode with the "
                     "same curvature, e.g. lowrank-adam-fb against autograd-adam); *noise (n "
                     "seeds)*: not distinguishable from noise at n seeds; *neither trains*: both "
                     "stay at the chance-level loss; *neither reaches*: neither reaches the "
                     "target at any grid point (both: the claim does not hold); -: not run. The "
                     "sections below have the "
                     "numbers.", ""]
    for claim, what in ((1, "sensitivity to hyper-parameters"),
                        (2, "vanishing gradients (digits-deep)"),
                        (3, "against E-MSA and vanilla DDP")):
        vs = [v for v in verdicts if v["claim"] == claim]
        summary_lines += [f"### Claim {claim}, {what}", ""]
        if not vs:
            summary_lines += ["No results.", ""]
        summary_lines += _summary_tables(vs)
        if vs:
            counts = {k: sum(_short(v["verdict"]).startswith(k) for v in vs)
                      for k in ("holds", "does not hold", "noise", "neither trains",
                                "neither reaches")}
            summary_lines += [f"Of {len(vs)} comparisons: " + ", ".join(
                f"{k} {n}" for k, n in counts.items() if n) + ".", ""]
    page = "\n".join(head + summary_lines + [""] + _reductions(records) + c1 + c2 + c3
                     ).rstrip() + "\n"
    runs = [r for r in records if r.get("kind") == "run"]
    return page, {"files": len(runs), "verdicts": verdicts}
