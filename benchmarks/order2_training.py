"""Order 2 (DDP with feedback, exact backend) against order 1 with the same curvature model (issue 3).

The claim under test: with the SAME curvature model M of Q_uu, ``order=2`` (V_xx propagated by
the exact autograd backend, feedback policies du = k + K dx applied in the update pass) reaches
a lower training loss after the same number of epochs than ``order=1`` (backpropagation + the
base optimizer picked by M), averaged over seeds.

Problems (docs/benchmarks.md, offline data):

* ``wine-fcn``: scikit-learn ``load_wine`` (13 features, 3 classes), stratified 70/30 split,
  5 Linear layers of hidden width 16 with Tanh;
* ``digits-fcn``: ``load_digits`` (64 features, 10 classes), stratified 70/30 split, 5 Linear
  layers of hidden width 32 with Tanh.

The split seed is fixed (0); features are standardised with statistics of the data trained on.

Curvature models compared (each at order 1 and order 2, exact ``autograd`` backend):

* ``full``: M = E_i[Q_uu^(i)] + damping I. Order 1 is a block-diagonal Gauss-Newton step per
  layer; order 2 is "vanilla DDP" (Gauss-Newton contraction terms dropped, ``gauss_newton=True``,
  the library default);
* ``adam``: M = diag(sqrt(vhat)) + eps. Order 1 is exactly ``torch.optim.Adam``; order 2 adds
  the feedback K dx = -lr M^{-1} E_i[Q_ux^(i) dx^(i)] and the value correction.

Protocol (``train`` of docs/benchmarks.md):

1. Tuning, never on the test split. The training split is cut again (stratified 80/20, seed 0)
   into a tuning-train part and a validation part. For every (problem, curvature, order) each
   point of a small grid (``GRIDS``) is trained for the same number of epochs as the final runs,
   with one tuning seed (``TUNE_SEED``, distinct from the evaluation seeds), and the point with
   the lowest validation cross-entropy at the end wins (a non-finite loss counts as +inf).
   Orders are tuned separately: each gets its own best point.
2. Evaluation: with the chosen hyper-parameters, every seed (initial weights and minibatch
   order; order 1 and order 2 of a seed share both) trains on the whole training split for
   ``epochs`` epochs of minibatches of 32 (the last one smaller), order 1 and order 2 runs
   interleaved. Reported: the final training loss (cross-entropy over the whole training split,
   after the last step), the test accuracy (once per run), the wall time of the training loop
   (steps only, no evaluation), the number of skipped (non-finite) steps. Mean and standard
   deviation (ddof=1) over seeds.
3. Control: where the two orders chose different points, order 2 is also run at the point order
   1 chose ("order 2 @ order-1 hp"), so that the order switch alone is compared too.

Cost (protocol ``overhead``, digits-fcn, B = 32): in ONE process, order 1 (adam), order 1
(full) and order 2 (full, feedback) on their own copies of the same initial model see the same
minibatches; after a warm-up they are interleaved step by step (order reshuffled every round,
seeded) and every step is timed with ``time.perf_counter``; the median per-step time and ratios
are reported. Memory, one fresh subprocess per configuration (so allocator state cannot leak
between them):

* ``peak RSS``: the child's peak resident set size over the steps: the kernel's peak mark
  (VmHWM) is reset through ``/proc/self/clear_refs`` right before the first step (after imports,
  data, model and optimizer set-up) and read after the last (fallback: ``ru_maxrss``, which
  covers the whole life of the process, set-up peaks included; it is recorded too). It
  includes the interpreter and torch's libraries. ``dRSS``: that peak minus the resident set
  size right before the first step, i.e. what the steps add at their peak as the OS sees it
  (allocator caching included). The children run with ``MALLOC_MMAP_THRESHOLD_=131072`` so
  that glibc returns big freed blocks to the OS and the resident size follows live memory;
* ``tensor peak``: in a second child, the peak of live bytes handed out by torch's CPU
  allocator during the steps, from ``torch.profiler`` memory events (``profile_memory=True``),
  minus what was live before the first step. It excludes memory outside torch's allocator.

Predicted cost: the module docstring of ``backends/autograd.py`` gives the exact backend's
memory per stage, e * (B (n_out n_in + n_out m + n_in^2 + m n_in + n_out^2) + m^2 [if Qbar_uu]);
it is evaluated for every stage of digits-fcn at B = 32 and float32 (e = 4) and checked against
the library's budget check (``memory_budget`` one byte under the largest stage must raise
``MemoryBudgetError``, exactly at it must not).

Run::

    python benchmarks/order2_training.py --json order2.json --markdown order2.md

Run time. Nearly all of it is the ``full`` cell of digits-fcn (about 0.6 s of CPU per exact
step at one thread, dominated by the 2080 x 2080 float64 Cholesky factorisation of the first
layer's M), which is why that cell trains for 2 epochs and digits-fcn/adam for 5 (``EPOCHS``).
The recorded run (docs/benchmarks.md) took 2137 s of wall time with ``--threads 1`` on a
2-core machine shared with other jobs (load average 9-12; the process got about 40 % of one
core): about 830 s of CPU time, so about 14 minutes on one idle core; two idle cores were not
available to check the 10-minute target.

Flags: ``--epochs N`` (all problems; default per problem and curvature, ``EPOCHS``),
``--seeds K`` (default 3), ``--threads T`` (default 2, recorded), ``--problems``,
``--curvatures``, ``--rounds`` (timing rounds), ``--skip-cost``, ``--json``, ``--markdown``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits, load_wine
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

import ocnopt
from ocnopt.bench.measure import peak_rss_kib, reset_peak_rss, status_kib
from ocnopt.bench.problems import fcn

BATCH = 32
SPLIT_SEED = 0
TUNE_SEED = 100  # tuning seed: not one of the evaluation seeds 0, 1, 2, ...
CE = nn.CrossEntropyLoss()


@dataclass(frozen=True)
class Problem:
    name: str
    loader: Any
    hidden: int


PROBLEMS = {
    "wine-fcn": Problem("wine-fcn", load_wine, 16),
    "digits-fcn": Problem("digits-fcn", load_digits, 32),
}

# default epochs per (problem, curvature): the exact "full" step on digits-fcn costs about
# 0.6 s of CPU at one thread (an m x m float64 Cholesky factorisation per layer, m = 2080 for
# the first), and an order-2 adam step about 80 ms, so those cells get fewer epochs.
EPOCHS = {
    ("wine-fcn", "adam"): 10, ("wine-fcn", "full"): 10,
    ("digits-fcn", "adam"): 5, ("digits-fcn", "full"): 2,
}

# small grids, log-spaced; the same grid for both orders of a curvature model
GRIDS: dict[tuple[str, str], list[dict[str, float]]] = {
    ("wine-fcn", "adam"): [{"lr": v} for v in (1e-3, 3e-3, 1e-2, 3e-2)],
    ("digits-fcn", "adam"): [{"lr": v} for v in (1e-3, 3e-3, 1e-2, 3e-2)],
    ("wine-fcn", "full"): [{"lr": lr, "damping": d} for lr in (0.1, 0.3, 1.0) for d in (0.1, 1.0)],
    ("digits-fcn", "full"): [{"lr": lr, "damping": d} for lr in (0.3, 1.0) for d in (0.1, 1.0)],
}

LABEL = {("full", 1): "order 1 (block Gauss-Newton)", ("full", 2): "order 2 (vanilla DDP)",
         ("adam", 1): "order 1 (= torch Adam)", ("adam", 2): "order 2 (Adam M, feedback)"}


# ---- data and model ---------------------------------------------------------------------------
def split(problem: Problem) -> dict[str, np.ndarray]:
    X, y = problem.loader(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, random_state=SPLIT_SEED,
                                              stratify=y)
    X_a, X_v, y_a, y_v = train_test_split(X_tr, y_tr, test_size=0.2, random_state=SPLIT_SEED,
                                          stratify=y_tr)
    return {"X_tr": X_tr, "y_tr": y_tr, "X_te": X_te, "y_te": y_te,
            "X_a": X_a, "y_a": y_a, "X_v": X_v, "y_v": y_v}


def tensors(X_fit: np.ndarray, y_fit: np.ndarray, X_eval: np.ndarray, y_eval: np.ndarray
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Standardise with the statistics of the data trained on."""
    sc = StandardScaler().fit(X_fit)

    def f(a: np.ndarray) -> Tensor:
        return torch.tensor(sc.transform(a), dtype=torch.float32)

    return f(X_fit), torch.tensor(y_fit), f(X_eval), torch.tensor(y_eval)


def make_model(d_in: int, hidden: int, classes: int, seed: int) -> nn.Sequential:
    """5 Linear layers with Tanh between them (the benchmark problems' ``fcn``), seeded."""
    torch.manual_seed(seed)
    return fcn(d_in, hidden, classes)


def batches(n: int, epochs: int, seed: int) -> list[list[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [list(torch.randperm(n, generator=gen).split(BATCH)) for _ in range(epochs)]


def make_opt(model: nn.Module, curvature: str, order: int, hp: dict[str, Any]) -> ocnopt.OCNOpt:
    return ocnopt.OCNOpt(model, loss="cross_entropy", curvature=curvature, backend="autograd",
                         order=order, feedback=True, **hp)


@torch.no_grad()
def evaluate(model: nn.Module, X: Tensor, y: Tensor) -> tuple[float, float]:
    out = model(X)
    return float(CE(out, y)), float((out.argmax(1) == y).float().mean())


def finite_or_inf(v: float) -> float:
    return v if math.isfinite(v) else math.inf


# ---- training ---------------------------------------------------------------------------------
class Run:
    """One training run, stepped epoch by epoch so that runs can be interleaved."""

    def __init__(self, X: Tensor, y: Tensor, hidden: int, curvature: str, order: int,
                 hp: dict[str, float], seed: int, epochs: int):
        self.X, self.y = X, y
        self.model = make_model(X.shape[1], hidden, int(y.max()) + 1, seed)
        self.opt = make_opt(self.model, curvature, order, hp)
        self.schedule = batches(len(X), epochs, seed)
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.curve: list[float] = []

    def epoch(self, e: int) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        for idx in self.schedule[e]:
            self.opt.step(self.X[idx], self.y[idx])
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu
        self.curve.append(finite_or_inf(evaluate(self.model, self.X, self.y)[0]))


def train_interleaved(runs: list[Run], epochs: int) -> None:
    for e in range(epochs):
        for r in runs:
            r.epoch(e)


def tune(problem: Problem, data: dict[str, np.ndarray], curvature: str, epochs: int,
         log: Any) -> dict[int, dict[str, Any]]:
    X_a, y_a, X_v, y_v = tensors(data["X_a"], data["y_a"], data["X_v"], data["y_v"])
    out: dict[int, dict[str, Any]] = {}
    for order in (1, 2):
        rows: list[dict[str, Any]] = []
        for hp in GRIDS[(problem.name, curvature)]:
            run = Run(X_a, y_a, problem.hidden, curvature, order, hp, TUNE_SEED, epochs)
            train_interleaved([run], epochs)
            vl, va = evaluate(run.model, X_v, y_v)
            rows.append({"hp": hp, "val_loss": finite_or_inf(vl), "val_acc": va,
                         "train_loss": run.curve[-1], "seconds": run.seconds,
                         "skipped_steps": run.opt.skipped_steps})
            log(f"  tune {problem.name} {curvature} order {order} {hp}: val loss {vl:.4f}, "
                f"val acc {va:.3f}, train loss {run.curve[-1]:.4f} ({run.seconds:.1f} s)")
        best = min(rows, key=lambda r: r["val_loss"])
        out[order] = {"grid": rows, "chosen": best["hp"]}
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def evaluate_cell(problem: Problem, data: dict[str, np.ndarray], curvature: str, epochs: int,
                  chosen: dict[int, dict[str, float]], seeds: list[int], log: Any
                  ) -> dict[str, Any]:
    X_tr, y_tr, X_te, y_te = tensors(data["X_tr"], data["y_tr"], data["X_te"], data["y_te"])
    configs = [("order 1", 1, chosen[1]), ("order 2", 2, chosen[2])]
    if chosen[2] != chosen[1]:
        configs.append(("order 2 @ order-1 hp", 2, chosen[1]))
    per: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in configs}
    for seed in seeds:
        runs = [Run(X_tr, y_tr, problem.hidden, curvature, order, hp, seed, epochs)
                for _, order, hp in configs]
        train_interleaved(runs, epochs)
        for (name, _, _), r in zip(configs, runs):
            final = finite_or_inf(evaluate(r.model, X_tr, y_tr)[0])
            acc = evaluate(r.model, X_te, y_te)[1]
            per[name].append({"seed": seed, "train_loss": final, "test_acc": acc,
                              "seconds": r.seconds, "cpu_seconds": r.cpu_seconds,
                              "skipped_steps": r.opt.skipped_steps,
                              "steps": r.opt.step_count, "curve": r.curve})
            log(f"  {problem.name} {curvature} {name} seed {seed}: train loss {final:.5f}, "
                f"test acc {acc:.4f}, {r.seconds:.1f} s")
    summary = {}
    for name, order, hp in configs:
        rs = per[name]
        tl = [float(r["train_loss"]) for r in rs]
        ta = [float(r["test_acc"]) for r in rs]
        sec = [float(r["seconds"]) for r in rs]
        summary[name] = {
            "order": order, "hp": hp,
            "train_loss_mean": mean_std(tl)[0], "train_loss_std": mean_std(tl)[1],
            "test_acc_mean": mean_std(ta)[0], "test_acc_std": mean_std(ta)[1],
            "seconds_mean": mean_std(sec)[0], "seconds_std": mean_std(sec)[1],
            "skipped_steps": sum(r["skipped_steps"] for r in rs),
        }
    o1, o2 = per["order 1"], per["order 2"]
    wins = sum(b["train_loss"] < a["train_loss"] for a, b in zip(o1, o2))
    claim = summary["order 2"]["train_loss_mean"] < summary["order 1"]["train_loss_mean"]
    verdict = {"order2_lower_mean_train_loss": claim, "seeds_where_order2_lower": wins,
               "seeds": len(seeds)}
    if "order 2 @ order-1 hp" in per:
        o2m = per["order 2 @ order-1 hp"]
        verdict["matched_hp_order2_lower_mean"] = (
            summary["order 2 @ order-1 hp"]["train_loss_mean"] < summary["order 1"]["train_loss_mean"])
        verdict["matched_hp_seeds_where_order2_lower"] = sum(
            b["train_loss"] < a["train_loss"] for a, b in zip(o1, o2m))
    return {"epochs": epochs, "steps_per_epoch": len(batches(len(X_tr), 1, 0)[0]),
            "runs": per, "summary": summary, "verdict": verdict}


# ---- cost: time, memory, formula ----------------------------------------------------------------
COST_CONFIGS = {
    "order 1 (adam)": ("adam", 1, {"lr": 3e-3}),
    "order 1 (full)": ("full", 1, {"lr": 0.3, "damping": 0.1}),
    "order 2 (full, feedback)": ("full", 2, {"lr": 0.3, "damping": 0.1}),
}


def digits_train() -> tuple[Tensor, Tensor]:
    data = split(PROBLEMS["digits-fcn"])
    X, y, _, _ = tensors(data["X_tr"], data["y_tr"], data["X_te"], data["y_te"])
    return X, y


def cost_batches(X: Tensor, y: Tensor, n: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """n full batches of 32 (never the short last one), the same for every configuration."""
    gen = torch.Generator().manual_seed(seed)
    out: list[tuple[Tensor, Tensor]] = []
    while len(out) < n:
        for idx in torch.randperm(len(X), generator=gen).split(BATCH):
            if len(idx) == BATCH and len(out) < n:
                out.append((X[idx], y[idx]))
    return out


def time_steps(rounds: int, warmup: int, seed: int, log: Any) -> dict[str, Any]:
    X, y = digits_train()
    data = cost_batches(X, y, warmup + rounds, seed)
    init = make_model(X.shape[1], 32, 10, seed)
    opts = {}
    for name, (curv, order, hp) in COST_CONFIGS.items():
        opts[name] = make_opt(copy.deepcopy(init), curv, order, hp)
    times: dict[str, list[float]] = {name: [] for name in opts}
    rng = random.Random(seed)
    names = list(opts)
    for i, (xb, yb) in enumerate(data):
        rng.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            opts[name].step(xb, yb)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
    base = statistics.median(times["order 1 (adam)"])
    base_full = statistics.median(times["order 1 (full)"])
    out: dict[str, Any] = {"rounds": rounds, "warmup": warmup, "batch": BATCH, "configs": {}}
    for name, ts in times.items():
        med = statistics.median(ts)
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [med, med, med]
        out["configs"][name] = {"median_s": med, "q25_s": q[0], "q75_s": q[2],
                                "ratio_to_order1_adam": med / base,
                                "ratio_to_order1_full": med / base_full,
                                "hp": COST_CONFIGS[name][2],
                                "skipped_steps": opts[name].skipped_steps}
        log(f"  time {name}: median {med * 1e3:.1f} ms/step (x{med / base:.1f} order 1 adam)")
    return out


def memory_worker(name: str, mode: str, steps: int, seed: int) -> dict[str, Any]:
    curv, order, hp = COST_CONFIGS[name]
    X, y = digits_train()
    data = cost_batches(X, y, steps, seed)
    opt = make_opt(make_model(X.shape[1], 32, 10, seed), curv, order, hp)
    out: dict[str, Any] = {"name": name, "mode": mode, "steps": steps}
    if mode == "rss":
        # page in the kernels' code and first-use caches with one throwaway step on its own
        # model, freed before the measurement
        throwaway = make_opt(make_model(X.shape[1], 32, 10, seed + 1), curv, order, hp)
        throwaway.step(*data[0])
        del throwaway
        gc.collect()
        method = reset_peak_rss()  # set-up peaks drop out
        rss0 = status_kib("VmRSS")
        for xb, yb in data:
            opt.step(xb, yb)
        ru = peak_rss_kib("ru_maxrss")  # KiB on Linux, whole life
        peak = peak_rss_kib(method)
        out.update(method=method, rss_before_steps_kib=rss0, peak_rss_steps_kib=peak,
                   ru_maxrss_kib=ru,
                   delta_rss_bytes=None if rss0 is None or peak is None else (peak - rss0) * 1024)
    else:
        from torch.profiler import ProfilerActivity, profile
        mark = "order2_training.steps"
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            keep = torch.empty(0)  # an allocation event before the mark
            with torch.profiler.record_function(mark):
                for xb, yb in data:
                    opt.step(xb, yb)
        del keep
        events, t_mark = [], None
        for e in prof.profiler.kineto_results.events():
            if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"):
                events.append((e.start_ns(), int(e.nbytes())))
            elif e.name() == mark:
                t_mark = e.start_ns()
        events.sort()
        live, peak, before = 0, 0, 0
        for t, nb in events:
            if t_mark is not None and t < t_mark:
                before = live + nb
            live += nb
            peak = max(peak, live)
        # bytes live before the steps that the profiler saw allocated are counted in `before`;
        # tensors allocated before profiling began (model, data) are invisible to it: the peak
        # is therefore the peak of what the steps (plus optimizer state they create) add.
        out.update(tensor_peak_bytes=peak - before, n_events=len(events))
    out["skipped_steps"] = opt.skipped_steps
    return out


def measure_memory(threads: int, steps: int, seed: int, log: Any) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for name in COST_CONFIGS:
        res[name] = {}
        for mode in ("rss", "tensor"):
            cmd = [sys.executable, os.path.abspath(__file__), "--_memory-worker", name,
                   "--_memory-mode", mode, "--threads", str(threads), "--_memory-steps",
                   str(steps)]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if p.returncode != 0 or not lines:
                res[name][mode] = {"error": f"rc={p.returncode}: {p.stderr.strip()[-400:]}"}
            else:
                res[name][mode] = json.loads(lines[-1])
        log(f"  memory {name}: {res[name]}")
    return res


def formula(seed: int) -> dict[str, Any]:
    """The exact backend's documented memory per stage for digits-fcn, B = 32, float32."""
    X, y = digits_train()
    xb, yb = cost_batches(X, y, 1, seed)[0]
    model = make_model(X.shape[1], 32, 10, seed)
    stages = ocnopt.build_stages(model)
    e = xb.element_size()
    rows, x = [], xb
    with torch.no_grad():
        for st in stages:
            out = st.module(x)
            B, n_in, n_out, m = x.shape[0], x[0].numel(), out[0].numel(), st.control_size
            base = B * (n_out * n_in + n_out * m + n_in * n_in + m * n_in + n_out * n_out)
            quu = m * m if m else 0
            rows.append({"stage": f"{st.index} {type(st.module).__name__}", "n_in": n_in,
                         "n_out": n_out, "m": m, "B": B,
                         "bytes_order2_adam": e * base, "bytes_full": e * (base + quu)})
            x = out
    largest = max(r["bytes_full"] for r in rows)
    # the library's budget check uses the same formula: one byte under the largest must refuse
    check = {}
    for budget in (largest - 1, largest):
        opt = ocnopt.OCNOpt(make_model(X.shape[1], 32, 10, seed), curvature="full", order=2,
                            lr=0.3, damping=0.1, memory_budget=budget)
        try:
            opt.step(xb, yb)
            check[str(budget)] = "accepted"
        except ocnopt.backends.MemoryBudgetError as err:
            check[str(budget)] = f"MemoryBudgetError: {str(err)[:120]}"
    return {"element_bytes": e, "stages": rows,
            "sum_bytes_order2_adam": sum(r["bytes_order2_adam"] for r in rows),
            "sum_bytes_full": sum(r["bytes_full"] for r in rows),
            "max_bytes_full": largest, "budget_check": check}


# ---- environment and report ------------------------------------------------------------------
def git_state() -> dict[str, Any]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def g(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - recorded, never fatal
            return ""

    return {"commit": g("rev-parse", "HEAD"),
            "dirty_library": bool(g("status", "--porcelain", "--", "ocnopt", "backends"))}


def environment(threads: int) -> dict[str, Any]:
    import sklearn

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "sklearn": sklearn.__version__,
            "ocnopt": ocnopt.__version__, "threads": threads, "cpu": cpu,
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), **git_state()}


def fmt(m: float, s: float, digits: int = 4, pct: bool = False) -> str:
    if pct:
        return f"{100 * m:.1f} ± {100 * s:.1f}"
    if not math.isfinite(m):
        return "inf"
    return f"{m:.{digits}g} ± {s:.2g}"


def markdown(res: dict[str, Any]) -> str:
    lines = []
    env = res["environment"]
    lines.append(f"torch {env['torch']}, {env['threads']} threads, {env['cpu_count']} CPUs "
                 f"({env['cpu']}), seeds {res['config']['seeds']}, batch {BATCH}, commit "
                 f"{env['commit'][:10]}{' (library dirty)' if env['dirty_library'] else ''}; "
                 f"load average at start {res['load_start']}, at end {res.get('load_end')}.")
    lines.append("")
    lines.append("| problem | curvature | mode | hp (lr, damping) | epochs x steps | train loss "
                 "| test acc (%) | wall (s) | skipped |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for key, cell in res["train"].items():
        prob, curv = key.split(" / ")
        for name, s in cell["summary"].items():
            label = LABEL.get((curv, s["order"]), name)
            if name.endswith("hp"):
                label = "order 2 at order 1's hp"
            hp = ", ".join(f"{v:g}" for v in s["hp"].values())
            lines.append(f"| {prob} | {curv} | {label} | {hp} | {cell['epochs']} x "
                         f"{cell['steps_per_epoch']} | "
                         f"{fmt(s['train_loss_mean'], s['train_loss_std'])} | "
                         f"{fmt(s['test_acc_mean'], s['test_acc_std'], pct=True)} | "
                         f"{s['seconds_mean']:.1f} | {s['skipped_steps']} |")
    lines.append("")
    lines.append("| problem | curvature | order 2 lower mean train loss? | seeds where order 2 "
                 "lower | same hp: order 2 lower? |")
    lines.append("|---|---|---|---|---|")
    for key, cell in res["train"].items():
        prob, curv = key.split(" / ")
        v = cell["verdict"]
        matched = ("(same point chosen)" if "matched_hp_order2_lower_mean" not in v else
                   f"{'yes' if v['matched_hp_order2_lower_mean'] else 'no'} "
                   f"({v['matched_hp_seeds_where_order2_lower']}/{v['seeds']} seeds)")
        lines.append(f"| {prob} | {curv} | {'yes' if v['order2_lower_mean_train_loss'] else 'no'} "
                     f"| {v['seeds_where_order2_lower']}/{v['seeds']} | {matched} |")
    lines.append("")
    lines.append("Tuning grids (validation cross-entropy after the same epochs, tuning seed "
                 f"{TUNE_SEED}; chosen point in bold):")
    lines.append("")
    lines.append("| problem | curvature | order | hp -> validation loss |")
    lines.append("|---|---|---|---|")
    for key, cell in res["tuning"].items():
        prob, curv = key.split(" / ")
        for order, t in cell.items():
            parts = []
            for r in t["grid"]:
                hp = ", ".join(f"{v:g}" for v in r["hp"].values())
                vl = "inf" if not math.isfinite(r["val_loss"]) else f"{r['val_loss']:.3f}"
                s = f"({hp}) -> {vl}"
                parts.append(f"**{s}**" if r["hp"] == t["chosen"] else s)
            lines.append(f"| {prob} | {curv} | {order} | {'; '.join(parts)} |")
    if "time" in res:
        t = res["time"]
        lines.append("")
        lines.append(f"Step time, digits-fcn, B = {BATCH}, one process, interleaved, median over "
                     f"{t['rounds']} steps after {t['warmup']} warm-up steps; memory from one "
                     "subprocess per configuration:")
        lines.append("")
        lines.append("| configuration | hp | median ms/step (IQR) | x order 1 (adam) | "
                     "x order 1 (full) | peak RSS (MiB) | dRSS (MiB) | tensor peak (MiB) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for name, c in t["configs"].items():
            mem = res.get("memory", {}).get(name, {})
            rss, ten = mem.get("rss", {}), mem.get("tensor", {})
            maxrss = (f"{rss['peak_rss_steps_kib'] / 1024:.0f}" if rss.get("peak_rss_steps_kib")
                      else "-")
            drss = (f"{rss['delta_rss_bytes'] / 2**20:.1f}"
                    if rss.get("delta_rss_bytes") is not None else "-")
            tp = (f"{ten['tensor_peak_bytes'] / 2**20:.1f}" if "tensor_peak_bytes" in ten
                  else "-")
            hp = ", ".join(f"{k} {v:g}" for k, v in c["hp"].items())
            lines.append(f"| {name} | {hp} | {c['median_s'] * 1e3:.1f} ({c['q25_s'] * 1e3:.1f}-"
                         f"{c['q75_s'] * 1e3:.1f}) | {c['ratio_to_order1_adam']:.1f} | "
                         f"{c['ratio_to_order1_full']:.2f} | {maxrss} | {drss} | {tp} |")
    if "formula" in res:
        f = res["formula"]
        lines.append("")
        lines.append("Documented exact-backend memory per stage, e (B (n_out n_in + n_out m + "
                     "n_in^2 + m n_in + n_out^2) + m^2 [Qbar_uu, curvature full]), digits-fcn, "
                     f"B = 32, e = {f['element_bytes']} bytes:")
        lines.append("")
        lines.append("| stage | n_in | n_out | m | without Qbar_uu (MiB) | with Qbar_uu (MiB) |")
        lines.append("|---|---|---|---|---|---|")
        for r in f["stages"]:
            lines.append(f"| {r['stage']} | {r['n_in']} | {r['n_out']} | {r['m']} | "
                         f"{r['bytes_order2_adam'] / 2**20:.2f} | {r['bytes_full'] / 2**20:.2f} |")
        lines.append(f"| all stages | | | | {f['sum_bytes_order2_adam'] / 2**20:.2f} | "
                     f"{f['sum_bytes_full'] / 2**20:.2f} |")
        lines.append("")
        lines.append("Budget check: " + "; ".join(
            f"memory_budget={k}: {v}" for k, v in f["budget_check"].items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs for every problem and curvature (default: per cell, EPOCHS)")
    p.add_argument("--seeds", type=int, default=3, help="evaluation seeds 0..K-1 (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--problems", nargs="*", default=list(PROBLEMS), choices=list(PROBLEMS))
    p.add_argument("--curvatures", nargs="+", default=["full", "adam"], choices=["full", "adam"])
    p.add_argument("--rounds", type=int, default=15, help="timed steps per configuration")
    p.add_argument("--memory-steps", type=int, default=5)
    p.add_argument("--skip-cost", action="store_true", help="no timing, memory, formula")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--markdown", default=None, help="write the Markdown tables here")
    p.add_argument("--_memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_memory-mode", default="rss", help=argparse.SUPPRESS)
    p.add_argument("--_memory-steps", type=int, default=5, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore", category=ocnopt.NonFiniteStepWarning)

    if a._memory_worker:
        print(json.dumps(memory_worker(a._memory_worker, a._memory_mode, a._memory_steps, 0)))
        return 0

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.perf_counter()
    seeds = list(range(a.seeds))
    res: dict[str, Any] = {
        "config": {"epochs": a.epochs, "epochs_by_cell": {f"{k[0]} / {k[1]}": v
                                                          for k, v in EPOCHS.items()},
                   "seeds": seeds, "tune_seed": TUNE_SEED, "batch": BATCH,
                   "split_seed": SPLIT_SEED, "validation_fraction": 0.2,
                   "grids": {f"{k[0]} / {k[1]}": v for k, v in GRIDS.items()},
                   "selection": "lowest validation cross-entropy at the end of tuning",
                   "backend": "autograd", "gauss_newton": True, "feedback": True,
                   "value_correction": True, "argv": sys.argv[1:] if argv is None else argv},
        "environment": environment(a.threads),
        "load_start": [round(v, 2) for v in os.getloadavg()],
        "tuning": {}, "train": {}, "completed": False,
    }
    if res["load_start"][0] > (os.cpu_count() or 1):
        log(f"WARNING: load average {res['load_start']} exceeds the {os.cpu_count()} CPUs: "
            "other processes share the cores, wall times are inflated and noisy")

    def save() -> None:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)

    for pname in a.problems:
        problem = PROBLEMS[pname]
        data = split(problem)
        for curv in a.curvatures:
            key = f"{pname} / {curv}"
            epochs = a.epochs if a.epochs is not None else EPOCHS[(pname, curv)]
            log(f"{key}: tuning on the validation split ({epochs} epochs)")
            tuned = tune(problem, data, curv, epochs, log)
            res["tuning"][key] = {str(k): v for k, v in tuned.items()}
            chosen = {o: tuned[o]["chosen"] for o in (1, 2)}
            log(f"{key}: chosen {chosen}; evaluating over seeds {seeds}")
            res["train"][key] = evaluate_cell(problem, data, curv, epochs, chosen, seeds, log)
            save()
    if not a.skip_cost:
        log("cost: interleaved step timing on digits-fcn, B = 32")
        res["time"] = time_steps(a.rounds, 3, 0, log)
        save()
        log("cost: memory, one subprocess per configuration")
        res["memory"] = measure_memory(a.threads, a.memory_steps, 0, log)
        res["formula"] = formula(0)
        save()
    res["load_end"] = [round(v, 2) for v in os.getloadavg()]
    res["total_seconds"] = time.perf_counter() - t_start
    res["completed"] = True
    save()
    md = markdown(res)
    print()
    print(md)
    print(f"total {res['total_seconds']:.0f} s")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
