"""Protocol ``report``: a Markdown page with tables and PNG plots, made from saved results only.

``render(folder, images)`` reads every result file under ``folder`` and returns the Markdown
section; the plots (loss vs step and vs wall-clock with seed bands, validation accuracy vs
learning rate, overhead bars) are written into ``images``. ``splice`` puts a section between
the markers ``BEGIN`` / ``END`` of a Markdown file, leaving the rest of the file as it is.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .deps import require
from .optimizers import hp_label
from .protocols import config_key, mean_std, read_results, sweep_summary, train_summary

BEGIN = "<!-- ocnopt bench report: begin -->"
END = "<!-- ocnopt bench report: end -->"

FAMILY_STYLE = {"torch": "-", "curvlinops": "-", "ocnopt1": "--", "ocnopt2": "-."}
FAMILY_STYLE.update({"pytorch-optimizer": "-", "emsa": ":"})  # the peers SOAP/Shampoo, E-MSA


# ---- formatting ---------------------------------------------------------------------------------
def _f(x: float | None, fmt: str = ".4f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _pm(m: float | None, s: float | None, metric: str = "accuracy") -> str:
    if m is None:
        return "n/a"
    if metric == "accuracy":
        return f"{100 * m:.1f} ± {100 * (s or 0):.1f}"
    return f"{m:.4g} ± {s or 0:.2g}"


def _lr(x: float) -> str:
    return f"{x:.3g}"


def _mode(row: dict[str, Any]) -> str:
    if row["family"] != "ocnopt":
        return f"peer ({row['family']})"
    return f"ocnopt, order {row['order']}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _style(family: str, order: int | None) -> str:
    return FAMILY_STYLE["ocnopt2" if order == 2 else "ocnopt1"] if family == "ocnopt" \
        else FAMILY_STYLE[family]


def _metric_name(metric: str) -> str:
    return {"accuracy": "test acc. (%)", "nll": "test NLL"}.get(metric, "test MSE")


# ---- plots ----------------------------------------------------------------------------------------
def _plt() -> Any:
    os.environ.setdefault("MPLBACKEND", "Agg")
    matplotlib = require("matplotlib", "ocnopt bench report (the plots)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list[Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
    return [cmap(i % cmap.N) for i in range(n)]


def plot_curves(groups: dict[str, list[dict[str, Any]]], title: str, path: Path) -> None:
    """Training loss (fit split, after every epoch) vs step and vs training wall-clock; the
    line is the geometric mean over seeds, the band one standard deviation of the log-loss
    either side (time axis: mean time over seeds). The y axis stops at 10x the largest initial
    loss: a run that blows up leaves the plot at the top."""
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    top, bottom = 0.0, math.inf
    for (name, recs), color in zip(groups.items(), _colors(len(groups))):
        n = min(len(r["result"]["curve"]) for r in recs)
        loss = np.array([[p["train_loss"] if p["train_loss"] is not None else np.inf
                          for p in r["result"]["curve"][:n]] for r in recs], dtype=float)
        log = np.log(np.clip(loss, 1e-30, 1e30))
        steps = np.array([p["step"] for p in recs[0]["result"]["curve"][:n]], dtype=float)
        secs = np.array([r["timing"]["curve_train_seconds"][:n] for r in recs], dtype=float)
        m, s = log.mean(0), log.std(0)
        top = max(top, float(np.exp(m[0])))
        bottom = min(bottom, float(np.exp(m.min())))
        opt = recs[0]["config"]["optimizer"]
        ls = _style(opt["family"], opt.get("order"))
        for ax, x in ((axes[0], steps), (axes[1], secs.mean(0))):
            ax.plot(x, np.exp(m), ls, color=color, label=name, lw=1.6)
            ax.fill_between(x, np.exp(m - s), np.exp(m + s), color=color, alpha=0.15, lw=0)
    for ax, xl in ((axes[0], "step"), (axes[1], "training wall-clock (s)")):
        ax.set_yscale("log")
        if top > 0 and math.isfinite(bottom):
            ax.set_ylim(bottom / 2, top * 10)
        ax.set_xlabel(xl)
        ax.set_ylabel("training loss (fit split)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_sweep(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Validation metric vs learning rate, one line per optimizer."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    metric = rows[0]["metric"]
    for row, color in zip(rows, _colors(len(rows))):
        y = [100 * v if metric == "accuracy" else v for v in row["val"]]
        ax.plot(row["grid"], y, _style(row["family"], row["order"]), marker="o", ms=3,
                color=color, label=row["optimizer"])
    ax.set_xscale("log")
    if metric != "accuracy":
        ax.set_yscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation accuracy (%)" if metric == "accuracy"
                  else f"validation {metric.upper()}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_overhead(rows: dict[str, dict[str, Any]], title: str, path: Path) -> None:
    """Median time per step and peak memory, each as a ratio to torch-sgd."""
    import numpy as np

    plt = _plt()
    names = list(rows)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) + 2), 4.2))
    t = [rows[n]["median_ratio"] for n in names]
    mem = [rows[n]["memory_ratio"] or 0.0 for n in names]
    ax.bar(x - 0.2, t, 0.4, label="median time per step / torch-sgd")
    ax.bar(x + 0.2, mem, 0.4, label="peak memory / torch-sgd")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("ratio to torch-sgd (log)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- sections -------------------------------------------------------------------------------------
def _environment_line(records: list[dict[str, Any]]) -> str:
    envs: dict[tuple, int] = {}
    for r in records:
        e = r.get("environment", {})
        v = e.get("versions", {})
        dirty = e.get("ocnopt_uncommitted")
        key = (v.get("ocnopt"), e.get("ocnopt_git_commit"),
               None if dirty is None else tuple(dirty), v.get("torch"),
               v.get("curvlinops-for-pytorch"), e.get("threads"),
               e.get("machine", {}).get("cpu"), e.get("machine", {}).get("cpu_count"))
        envs[key] = envs.get(key, 0) + 1
    lines = []
    for (ocn, commit, dirty, tv, cl, threads, cpu, cores), n in envs.items():
        state = "" if dirty is None else (
            ", with uncommitted library changes in " + ", ".join(f"`{f}`" for f in dirty)
            if dirty else ", clean")
        lines.append(f"- {n} file(s): ocnopt {ocn} (commit {(commit or 'n/a')[:10]}{state}), "
                     f"torch {tv}, curvlinops {cl}, {threads} torch thread(s), {cores} cores, "
                     f"CPU `{cpu}`")
    return "\n".join(lines)


def _load_line(records: list[dict[str, Any]]) -> str:
    """The machine's 1-minute load average when the runs ended (``timing.loadavg``) and the
    ``--jobs`` they ran under: how busy the machine was while the times were taken."""
    loads = sorted(float(r["timing"]["loadavg"][0]) for r in records
                   if r.get("kind") == "run" and (r.get("timing") or {}).get("loadavg"))
    jobs = sorted({int((r.get("timing") or {}).get("jobs") or 1) for r in records
                   if r.get("kind") == "run" and r.get("protocol") in ("train", "sweep")})
    parts = []
    if loads:
        parts.append(f"1-minute load average when the runs ended: {loads[0]:.1f} to "
                     f"{loads[-1]:.1f} (median {loads[len(loads) // 2]:.1f}) on "
                     f"{_cores(records)} cores")
    if any(j > 1 for j in jobs):
        parts.append("some train/sweep invocations ran with `--jobs` "
                     f"{', '.join(str(j) for j in jobs if j > 1)} (their times share the cores)")
    return ("- " + "; ".join(parts) + ".") if parts else ""


def _cores(records: list[dict[str, Any]]) -> str:
    cores = {((r.get("environment") or {}).get("machine") or {}).get("cpu_count") for r in records}
    return "/".join(str(c) for c in sorted(c for c in cores if c)) or "?"


def _completion(records: list[dict[str, Any]], folder: Path) -> list[str]:
    notes = []
    for m in records:
        if m.get("kind") != "manifest":
            continue
        missing = [f for f in m["planned"] if not (Path(m["_path"]).parent / f).exists()]
        if m["status"] != "complete" or missing:
            notes.append(f"- **{m['protocol']} {m['problem']} did not run to completion** "
                         f"(status: {m['status']}): {len(m['planned']) - len(missing)} of "
                         f"{len(m['planned'])} planned runs have results; the tables show only "
                         "those, nothing is extrapolated.")
    return notes


#: how a configuration field reads in a label, when tables of one problem differ in it
_CONFIG_WORDS = {"epochs": "{} epochs", "batch_size": "batch {}", "subset": "subset {}",
                 "split_seed": "split seed {}", "seeds": "seeds {}", "target": "target {}",
                 "points": "{} points", "decades": "{} decades", "threads": "{} thread(s)"}


def _config_words(conf: dict[str, Any], fields: Sequence[str]) -> list[str]:
    words = []
    for f in fields:
        v = conf.get(f)
        if f == "hp":
            words.append(f"--hp {hp_label(v)}" if v else "no --hp")
        elif f == "seeds" and isinstance(v, list):
            words.append("seeds " + ", ".join(map(str, v)))
        elif f in _CONFIG_WORDS:
            words.append(_CONFIG_WORDS[f].format("n/a" if v is None else v))
    return words


def _groups(rows: list[dict[str, Any]], lr_labels: bool) -> list[tuple[str, str, str]]:
    """(problem, config_key, label) for every configuration (``protocols.configuration``; one
    folder each) of every problem, in order of appearance. One table each: runs of different
    configurations never share a table. The label tells the tables of one problem apart: by
    the configuration fields that differ between them, else (train) by where the learning
    rates came from, else by the folder's name."""
    keys = list(dict.fromkeys((r["problem"], r.get("config_key", "")) for r in rows))
    out = []
    for prob, key in keys:
        label = prob
        same = [k for p, k in keys if p == prob]
        if len(same) > 1:
            mine = next(r for r in rows if r.get("config_key", "") == key)
            confs = [next(r for r in rows if r.get("config_key", "") == k)["configuration"]
                     for k in same]
            differ = [f for f in mine["configuration"]
                      if len({repr(c.get(f)) for c in confs}) > 1]
            words = _config_words(mine["configuration"], differ)
            if not words and lr_labels:
                prows = [r for r in rows if r["config_key"] == key]
                if all(r["lr_source"].startswith("sweep") for r in prows):
                    words = ["learning rates chosen on the validation split by the sweep"]
                elif all(r["lr_source"] == "default" for r in prows):
                    words = ["default learning rates"]
            if not words:
                words = [Path(mine["folder"]).name or "."]
            label += f" ({', '.join(words)})"
        out.append((prob, key, label))
    return out


def _train_groups(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return _groups(rows, lr_labels=True)


ORDER_NOTE = ("Mode: *peer* = another library's optimizer; *ocnopt, order 1* = backpropagation "
              "plus the curvature model's step (the torch.optim-equivalent step, docs/method.md "
              "sections 3-4); *ocnopt, order 2* = the feedback policies du = k + K dx with the "
              "value correction (docs/method.md section 6).")


def _train_section(records: list[dict[str, Any]], images: Path, rel: str) -> tuple[str, list]:
    rows = train_summary(records)
    out = []
    for k, (prob, key, label) in enumerate(_train_groups(rows)):
        prow = [r for r in rows if r["config_key"] == key]
        recs = [r for r in records if r.get("kind") == "run" and r["protocol"] == "train"
                and config_key(r) == key]
        c = recs[0]["config"]
        metric = prow[0]["metric"]
        seeds = sorted({s for r in prow for s in r["seeds"]})
        target = prow[0]["target"]
        tname = f"{100 * target:.0f} % test acc." if metric == "accuracy" else \
            f"{_metric_name(metric)} ≤ {target}"
        sizes = c["problem"]["sizes"]
        sources = sorted({r["lr_source"] for r in prow})
        out.append(f"### train: {label}\n")
        out.append(f"{c['problem']['description']}; network {c['problem']['network']}; splits "
                   f"fit/val/test = {sizes['fit']}/{sizes['val']}/{sizes['test']}"
                   f"{' (subset)' if c['problem']['subset'] else ''}; "
                   f"{prow[0]['planned_steps'] or prow[0]['steps']} steps ({prow[0]['epochs']} "
                   f"epochs x {prow[0]['steps_per_epoch'] or '?'}) of "
                   f"minibatches of {prow[0]['batch_size']}; seeds "
                   f"{', '.join(map(str, seeds))}; learning rates: {'; '.join(sources)}"
                   f"{' (val: chosen by the sweep)' if len(sources) > 1 else ''}"
                   f"{'; --hp ' + hp_label(c.get('hp')) if c.get('hp') else ''}. Time: the "
                   "training loop only (evaluation excluded); x torch-sgd = ratio of the means in "
                   "the same configuration. Time to target: median over the seeds that reached "
                   f"it. {ORDER_NOTE}\n")
        mixed = len(sources) > 1
        header = ["optimizer", "mode", "lr", "final train loss", _metric_name(metric),
                  "train time (s)", "x torch-sgd", f"time to {tname}", "notes"]
        body = []
        for r in sorted(prow, key=lambda r: (r["family"] == "ocnopt", r["order"] or 0,
                                              r["optimizer"])):
            notes = []
            if r["diverged"]:
                notes.append(f"{r['diverged']} diverged (loss not finite or above its start)")
            if r["skipped_steps"]:
                notes.append(f"{r['skipped_steps']} skipped steps")
            if len(r["seeds"]) < len(seeds):
                notes.append(f"{len(r['seeds'])}/{len(seeds)} seeds")
            ttt = "not reached" if r["target_seconds"] is None else (
                f"{r['target_seconds']:.2f} s ({r['target_steps']:.0f} steps)")
            lr = _lr(r["lr"]) + (" (val)" if mixed and r["lr_source"].startswith("sweep") else "")
            body.append([f"`{r['optimizer']}`", _mode(r), lr,
                         _pm(r["train_loss"], r["train_loss_std"], "loss"),
                         _pm(r["test"], r["test_std"], metric),
                         _pm(r["seconds"], r["seconds_std"], "loss"),
                         _f(r["time_ratio"], ".2f"),
                         f"{ttt}, {r['target_reached']}/{len(r['seeds'])}", ", ".join(notes)])
        out.append(_table(header, body, "llrrrrrll"))
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in sorted(recs, key=lambda r: (r["optimizer"], r["config"]["lr"], r["seed"])):
            groups.setdefault(f"{r['optimizer']} (lr {_lr(r['config']['lr'])})", []).append(r)
        slug = re.sub(r"[^a-z0-9]+", "-", prob.lower()).strip("-")
        img = images / (f"train-{slug}.png" if label == prob else f"train-{slug}-{k}.png")
        plot_curves(groups, f"{label}: training loss over {len(seeds)} seed(s) (geometric mean, "
                            "± 1 std of the log)", img)
        out.append(f"\n![{label}: loss vs step and vs time]({rel}{img.name})\n")
    return "\n".join(out), rows


def _sweep_section(records: list[dict[str, Any]], images: Path, rel: str) -> tuple[str, list]:
    rows = sweep_summary(records)
    out = []
    for k, (prob, key, label) in enumerate(_groups(rows, lr_labels=False)):
        prow = [r for r in rows if r["config_key"] == key]
        hp = prow[0]["configuration"].get("hp")
        planned = prow[0]["configuration"].get("seeds") or sorted(
            {s for r in prow for s in r["seeds"]})
        metric = prow[0]["metric"]
        pts = {r["points"] for r in prow}
        lo = min(min(r["grid"]) for r in prow)
        out.append(f"### sweep: {label}\n")
        spans = {round(math.log10(max(r["grid"]) / min(r["grid"])), 2) for r in prow}
        note = ""
        if min(pts) < 8 or min(spans) < 4:
            note = " **The grid is smaller than the protocol's (>= 8 values over 4 decades).**"
        out.append(
            f"{prow[0]['epochs']} epochs, batch {prow[0]['batch_size']}, seeds "
            f"{', '.join(map(str, planned))}{'; --hp ' + hp_label(hp) if hp else ''}; "
            f"per optimizer {sorted(pts)} learning rates "
            f"log-spaced over {sorted(spans)} decades around its default (lowest {lo:.2g}). The "
            "learning rate is chosen on the validation split; the test metric is read once, at "
            "the chosen rate (both: mean over seeds). Tunability: share of the grid whose "
            "validation " + ("accuracy is within 2 points of the optimizer's best" if metric ==
                             "accuracy" else f"{metric.upper()} is within 2 % of the optimizer's "
                             "best")
            + ", computed per seed, reported as mean ± std (ddof 1) over the seeds; a "
            "difference between two optimizers smaller than these spreads is noise (float "
            f"rounding alone makes runs part at high learning rates). {ORDER_NOTE}{note}\n")
        header = ["optimizer", "mode", "grid", "best val." + (" acc. (%)" if metric == "accuracy"
                                                               else f" {metric.upper()}"),
                  "chosen lr", _metric_name(metric) + " at chosen lr",
                  "tunability (mean ± std over seeds)", "diverged runs"]
        body = []
        for r in sorted(prow, key=lambda r: (r["family"] == "ocnopt", r["order"] or 0,
                                              r["optimizer"])):
            best = f"{100 * r['best_val']:.1f}" if metric == "accuracy" else f"{r['best_val']:.4g}"
            test = "n/a" if r["test_at_best"] is None else (
                f"{100 * r['test_at_best']:.1f}" if metric == "accuracy"
                else f"{r['test_at_best']:.4g}")
            body.append([f"`{r['optimizer']}`", _mode(r),
                         f"{_lr(min(r['grid']))} .. {_lr(max(r['grid']))} ({r['points']})", best,
                         _lr(r["best_lr"]), test, _tun(r) + (
                             f" ({len(r['seeds'])}/{len(planned)} seeds)"
                             if len(r["seeds"]) < len(planned) else ""),
                         str(r["diverged"])])
        out.append(_table(header, body, "llrrrrrr"))
        img = images / (f"sweep-{prob}.png" if label == prob else f"sweep-{prob}-{k}.png")
        plot_sweep(prow, f"{label}: validation metric vs learning rate", img)
        out.append(f"\n![{label}: validation metric vs learning rate]({rel}{img.name})\n")
    return "\n".join(out), rows


def _overhead_section(records: list[dict[str, Any]], images: Path, rel: str) -> tuple[str, list]:
    out, summaries = [], []
    for rec in records:
        if rec.get("kind") != "run" or rec["protocol"] != "overhead":
            continue
        c, rows = rec["config"], rec["result"]["rows"]
        rows = {n: rows[n] for n in c["optimizers"] if n in rows}  # the order of the invocation
        prob = rec["problem"]
        out.append(f"### overhead: {prob}\n")
        out.append(
            f"{c['parameters']} parameters, batch {c['batch_size']}, {c['warmup']} warm-up steps, "
            f"{'--hp ' + hp_label(c.get('hp')) + ', ' if c.get('hp') else ''}"
            f"then {c['rounds']} interleaved rounds of {c['block']} steps per optimizer (order "
            f"shuffled each round), {rec['environment']['threads']} thread(s). Time per step: "
            "median (and mean, which amortises periodic work such as K-FAC inverses) over the "
            f"timed steps. Memory: peak of live bytes from torch's CPU allocator over "
            f"{c['memory_steps']} steps of a fresh optimizer (state, gradients, temporaries; "
            "not the model nor the data). Ratios to torch-sgd in the same process.\n")
        header = ["optimizer", "median ms/step", "x torch-sgd", "mean ms/step", "x torch-sgd",
                  "peak memory (MiB)", "x torch-sgd"]
        body = []
        for name, r in rows.items():
            mib = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
            body.append([f"`{name}`", _f(r["median_ms"], ".2f"), _f(r["median_ratio"], ".2f"),
                         _f(r["mean_ms"], ".2f"), _f(r["mean_ratio"], ".2f"), _f(mib, ".2f"),
                         _f(r["memory_ratio"], ".2f")])
            summaries.append({"problem": prob, "optimizer": name, **{
                k: r[k] for k in ("median_ms", "median_ratio", "mean_ms", "mean_ratio",
                                  "peak_bytes", "memory_ratio")}})
        out.append(_table(header, body))
        img = images / f"overhead-{prob}.png"
        plot_overhead(rows, f"{prob}: cost per step relative to torch-sgd", img)
        out.append(f"\n![{prob}: overhead]({rel}{img.name})\n")
    return "\n".join(out), summaries


def _tun(r: dict[str, Any]) -> str:
    """Tunability as "33 ± 6 %" (mean ± std over seeds)."""
    if r.get("tunability") is None:
        return "n/a"
    return f"{100 * r['tunability']:.0f} ± {100 * (r.get('tunability_std') or 0):.0f} %"


def _better(a: float, b: float, accuracy: bool) -> bool:
    return a > b if accuracy else a < b


def _best(rows: list[dict[str, Any]], accuracy: bool) -> dict[str, Any] | None:
    out = None
    for r in rows:
        if out is None or _better(r["test"], out["test"], accuracy):
            out = r
    return out



def _versus(prob: str, r: dict[str, Any], r_what: str, other: dict[str, Any], other_what: str,
            fmt: Callable[[float], str]) -> str | None:
    """One line comparing two train-summary rows: final training loss (relative difference,
    and whether it is within one std over seeds), test metric, ratio of training times; the
    divergences when either diverged; None when a final training loss is missing."""
    if r["diverged"] or other["diverged"]:
        return (f"- train {prob}: `{r['optimizer']}` ({r_what}) diverged on {r['diverged']} of "
                f"{len(r['seeds'])} seeds, `{other['optimizer']}` ({other_what}) on "
                f"{other['diverged']} of {len(other['seeds'])}; test {fmt(r['test'])} vs "
                f"{fmt(other['test'])}.")
    if r["train_loss"] is None or other["train_loss"] is None:
        return None
    d_loss = r["train_loss"] - other["train_loss"]
    noise = max(r["train_loss_std"] or 0, other["train_loss_std"] or 0)
    verdict = ("within one std over seeds" if abs(d_loss) <= noise
               else "lower" if d_loss < 0 else "higher")
    return (f"- train {prob}: `{r['optimizer']}` ({r_what}) vs `{other['optimizer']}` "
            f"({other_what}): final training loss {_f(r['train_loss'], '.4g')} vs "
            f"{_f(other['train_loss'], '.4g')} ({100 * d_loss / other['train_loss']:+.0f} %, "
            f"{verdict}), test {fmt(r['test'])} vs {fmt(other['test'])}, time "
            f"{_f((r['seconds'] or 0) / (other['seconds'] or 1), '.1f')}x.")


def _findings(train: list[dict[str, Any]], sweep: list[dict[str, Any]],
              overhead: list[dict[str, Any]]) -> list[str]:
    """Plain statements computed from the tables (no judgement beyond the numbers)."""
    lines = []
    for _, key, prob in _train_groups(train):
        rows = [r for r in train if r.get("config_key", "") == key and r["test"] is not None]
        if not rows:
            continue
        acc = rows[0]["metric"] == "accuracy"
        peer = _best([r for r in rows if r["family"] != "ocnopt"], acc)
        mine = _best([r for r in rows if r["family"] == "ocnopt"], acc)
        fmt = (lambda v: f"{100 * v:.1f} %") if acc else (lambda v: f"{v:.4g}")
        if peer and mine:
            word = "above" if _better(mine["test"], peer["test"], acc) else (
                "equal to" if mine["test"] == peer["test"] else "below")
            lines.append(
                f"- train {prob}: best ocnopt mode `{mine['optimizer']}` {fmt(mine['test'])} "
                f"(± {fmt(mine['test_std'] or 0)}) is {word} the best peer `{peer['optimizer']}` "
                f"{fmt(peer['test'])} (± {fmt(peer['test_std'] or 0)}); its training loop took "
                f"{_f(mine['time_ratio'], '.1f')}x torch-sgd's time.")
        by = {r["optimizer"]: r for r in rows}
        twins = []
        for twin, torch_peer in (("autograd-sgd", "torch-sgd"), ("autograd-rmsprop", "torch-rmsprop"),
                                 ("autograd-adam", "torch-adam")):
            a, b = by.get(twin), by.get(torch_peer)
            if a and b and a["lr"] == b["lr"] and a["train_loss"] is not None \
                    and b["train_loss"] is not None:
                twins.append(f"`{twin}` vs `{torch_peer}` "
                             f"{abs(a['train_loss'] - b['train_loss']):.1e} "
                             f"({_f(a['seconds'] / b['seconds'] if b['seconds'] else None, '.1f')}x "
                             "the time)")
        if twins:
            lines.append(f"- train {prob}: order-1 twins of the torch peers, difference of the mean "
                         f"final training loss: {'; '.join(twins)}.")
        for r in rows:
            if r["order"] != 2:
                continue
            backend, curvature = r["optimizer"].split("-")[:2]
            pairs = []
            if r["optimizer"].endswith("-fb-nash"):  # the Nash game against the cooperative one
                pairs.append((by.get(r["optimizer"][:-len("-nash")]), "order 2, game nash",
                              "order 2, cooperative"))
            # the order-1 step of the same curvature (the same on every backend; SNOpt's
            # order-2 names against its order-1 one)
            other1 = by.get("snopt") if r["optimizer"].startswith("snopt") else (
                by.get(f"autograd-{curvature}") or by.get(f"{backend}-{curvature}"))
            pairs.append((other1, "order 2", "order 1, same curvature"))
            for other, r_what, other_what in pairs:
                line = None if other is None else _versus(prob, r, r_what, other, other_what, fmt)
                if line is not None:
                    lines.append(line)
    for _, key, prob in _groups(sweep, lr_labels=False):
        rows = [r for r in sweep if r.get("config_key", "") == key and r["tunability"] is not None]
        parts = []
        for label, sel in (("peers", lambda r: r["family"] != "ocnopt"),
                           ("ocnopt order 1", lambda r: r["family"] == "ocnopt" and r["order"] == 1),
                           ("ocnopt order 2", lambda r: r["family"] == "ocnopt" and r["order"] == 2)):
            xs = [r["tunability"] for r in rows if sel(r)]
            if xs:
                m, _ = mean_std(xs)
                spread = max((r["tunability_std"] or 0) for r in rows if sel(r))
                parts.append(f"{label} {100 * (m or 0):.0f} % (range {100 * min(xs):.0f}-"
                             f"{100 * max(xs):.0f} %; largest std over seeds "
                             f"{100 * spread:.0f} points)")
        if parts:
            lines.append(f"- sweep {prob}: mean tunability " + "; ".join(parts) + ".")
    for prob in dict.fromkeys(r["problem"] for r in overhead):
        rows = [r for r in overhead if r["problem"] == prob and r["optimizer"] != "torch-sgd"]
        if rows:
            lo = min(rows, key=lambda r: r["median_ratio"])
            hi = max(rows, key=lambda r: r["median_ratio"])
            lines.append(f"- overhead {prob}: median time per step from "
                         f"{lo['median_ratio']:.1f}x (`{lo['optimizer']}`) to "
                         f"{hi['median_ratio']:.1f}x (`{hi['optimizer']}`) torch-sgd's.")
    return lines


def render(folder: Path, images: Path, rel: str = "", command: str | None = None
           ) -> tuple[str, dict[str, Any]]:
    """The Markdown section for every result under ``folder`` (plots written to ``images``,
    linked as ``rel`` + file name) and the summaries as plain data."""
    folder = Path(folder)
    records = read_results(folder)
    runs = [r for r in records if r.get("kind") == "run"]
    if not runs:
        raise FileNotFoundError(f"no ocnopt bench result files under {folder}")
    images.mkdir(parents=True, exist_ok=True)
    train_md, train_rows = _train_section(records, images, rel)
    sweep_md, sweep_rows = _sweep_section(records, images, rel)
    over_md, over_rows = _overhead_section(records, images, rel)
    from .ode_report import ode_section

    ode_md = ode_section(records, images, rel)  # models with Neural ODE blocks only
    parts = [f"Generated by `{command or 'ocnopt bench report'}` from {len(runs)} result files "
             "(JSON: configuration, seeds, library versions, thread count, machine). Timings "
             "come from a shared machine and are noisy; ratios are taken within one invocation.",
             "", _environment_line(runs), _load_line(runs), ""]
    parts += _completion(records, folder)
    findings = _findings(train_rows, sweep_rows, over_rows)
    if findings:
        parts += ["", "**What the tables say** (computed from them):", "", *findings, ""]
    for md in (train_md, ode_md, sweep_md, over_md):
        if md:
            parts += ["", md]
    summary = {"train": train_rows, "sweep": sweep_rows, "overhead": over_rows,
               "findings": findings, "files": len(runs)}
    return "\n".join(parts).rstrip() + "\n", summary


def splice(path: Path, section: str) -> None:
    """Replace what lies between ``BEGIN`` and ``END`` in ``path`` by ``section`` (append the
    markers and the section when the file has none; create the file if needed). The file is
    read right before it is written, so concurrent edits elsewhere in it are kept."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        new = head + block + tail
    else:
        new = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
