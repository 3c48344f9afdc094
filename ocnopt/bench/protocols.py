"""The benchmark protocols of docs/benchmarks.md: train, sweep, overhead and time-to-target.

Every run writes one JSON file as soon as it finishes (an interrupted invocation keeps the
finished runs), atomically (a temporary file renamed into place). A file holds:

* ``config``: the problem (data sizes, split seed, subset, network), the optimizer (family,
  fixed hyper-parameters, those the invocation set with ``--hp``), the learning rate and where
  it came from, epochs, batch size, steps per epoch, seed, the invocation's seeds and ``hp``,
  target;
* ``environment``: library versions, thread count, machine (see ``environment``);
* ``result``: what the run measured, deterministic for a given seed and thread count;
* ``timing``: every wall-clock quantity and the dates (the only part that changes between two
  runs of the same seed).

An invocation also writes a manifest ``<protocol>-<problem>.manifest.json`` listing the runs it
planned and its status (``running``, ``complete`` or ``interrupted``), so that a report can
say which benchmark did not run to completion.

Runs that differ in anything but the optimizer, its learning rate and the seed belong to
different configurations (``configuration``): the summaries and the report never put two
configurations in one table.

Splits: every protocol trains on the ``fit`` split; ``sweep`` chooses the learning rate on the
``val`` split only; the ``test`` split is evaluated and reported, never used to choose.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import signal
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .measure import environment, interleaved_times, loadavg, peak_memory, quantile
from .optimizers import OptimizerSpec, hp_label, lr_grid, parse_optimizer, torch_loss
from .problems import Dataset, Problem

SCHEMA = "ocnopt.bench/1"
EVAL_CHUNK = 1024

StepCallback = Callable[[int], None]
DoneCallback = Callable[[dict[str, Any]], None]


# ---- files --------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _finite(obj: Any) -> Any:
    """JSON has no NaN / inf: non-finite floats become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_finite(obj), f, indent=1, sort_keys=True, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_results(folder: Path) -> list[dict[str, Any]]:
    """Every result file (``schema`` ocnopt.bench/1) under ``folder``, manifests included."""
    out = []
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            obj = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(obj, dict) and obj.get("schema") == SCHEMA:
            obj["_path"] = str(path)
            out.append(obj)
    return out


class Manifest:
    """The plan of one invocation and its status, rewritten whenever it changes."""

    def __init__(self, folder: Path, protocol: str, problem: str, planned: list[str],
                 config: dict[str, Any]):
        self.path = Path(folder) / f"{protocol}-{problem}.manifest.json"
        self.obj: dict[str, Any] = {
            "schema": SCHEMA, "kind": "manifest", "protocol": protocol, "problem": problem,
            "planned": planned, "finished": [], "status": "running", "config": config,
            "environment": environment(), "timing": {"started_at": _now()}}
        self.save()

    def done(self, filename: str) -> None:
        self.obj["finished"].append(filename)
        self.save()

    def close(self, status: str) -> None:
        self.obj["status"] = status
        self.obj["timing"]["finished_at"] = _now()
        self.save()

    def save(self) -> None:
        write_json(self.path, self.obj)


# ---- one training run ---------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, X: Tensor, y: Tensor, loss: str) -> tuple[float, float | None]:
    """(mean loss, accuracy or None for regression) over (X, y), in chunks; in eval mode
    (BatchNorm uses its running statistics and leaves them alone), the mode restored after."""
    total, correct = 0.0, 0
    training = model.training
    model.eval()
    try:
        for i in range(0, len(y), EVAL_CHUNK):
            out = model(X[i:i + EVAL_CHUNK])
            t = y[i:i + EVAL_CHUNK]
            if loss == "cross_entropy":
                total += float(nn.functional.cross_entropy(out, t, reduction="sum"))
                correct += int((out.argmax(1) == t).sum())
            elif loss == "nll":  # a flow's output state: negative log-likelihood per sample
                from .ode_problems import flow_nll

                total += float(flow_nll(out).sum())
            else:
                total += float(nn.functional.mse_loss(out, t, reduction="sum")) / t[0].numel()
    finally:
        model.train(training)
    n = max(len(y), 1)
    return total / n, (correct / n if loss == "cross_entropy" else None)


def batches_for(n: int, batch_size: int, epochs: int, seed: int) -> list[list[Tensor]]:
    """Per epoch, the index minibatches (the last one smaller), drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [list(torch.randperm(n, generator=g).split(batch_size)) for _ in range(epochs)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def _eval_point(model: nn.Module, data: Dataset, loss: str, step: int, epoch: int
                ) -> dict[str, Any]:
    point: dict[str, Any] = {"step": step, "epoch": epoch}
    for split, X, y in (("train", data.X_fit, data.y_fit), ("val", data.X_val, data.y_val),
                        ("test", data.X_test, data.y_test)):
        lo, acc = evaluate(model, X, y, loss)
        point[f"{split}_loss"] = lo
        if acc is not None:
            point[f"{split}_accuracy"] = acc
    return point


class OdeCounter:
    """Function evaluations of a model's Neural ODE blocks during the training steps (forward
    and backward solves; evaluation passes excluded) and their integration times t1, for the
    curve points and the result (nothing for a model without an ODE block)."""

    def __init__(self, model: nn.Module):
        self.blocks = [m for m in model.modules() if type(m).__name__ == "ODEBlock"]
        self.forward = self.backward = 0

    def reset(self) -> None:
        for b in self.blocks:
            b.reset_nfe()  # type: ignore[operator]

    def count(self) -> None:
        for b in self.blocks:
            self.forward += int(b.nfe_forward)  # type: ignore[arg-type]
            self.backward += int(b.nfe_backward)  # type: ignore[arg-type]

    def mark(self, point: dict[str, Any]) -> dict[str, Any]:
        if self.blocks:
            point["nfe"] = self.forward + self.backward
            point["t1"] = [float(b.t1) for b in self.blocks]  # type: ignore[arg-type]
        return point

    def summary(self, steps: int) -> dict[str, Any]:
        if not self.blocks:
            return {}
        return {"solver": {"nfe_forward": self.forward, "nfe_backward": self.backward,
                           "nfe_per_step": (self.forward + self.backward) / max(steps, 1),
                           "t1": [float(b.t1) for b in self.blocks]}}  # type: ignore[arg-type]


def train_one(problem: Problem, data: Dataset, spec: OptimizerSpec, lr: float, seed: int,
              epochs: int, batch_size: int, on_step: StepCallback | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train ``problem.model(seed)`` with ``spec`` on the fit split; (result, timing).

    The minibatch order comes from ``seed`` too, so every optimizer of a seed starts from the
    same weights and sees the same batches. Evaluated (fit, val and test splits) before the
    first step and after every epoch, outside the timed part. A non-finite minibatch loss ends
    the run (``diverged``)."""
    model = problem.model(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. ocnopt's non-finite-step warning: counted below
        # a factorisation of non-finite statistics (SOAP's, Shampoo's after a blow-up) ends the
        # run as diverged instead of the whole invocation
        stepper = GuardedStepper(spec.make(model, problem.loss, lr, seed))
        ode = OdeCounter(model)
        curve = [ode.mark(_eval_point(model, data, problem.loss, 0, 0))]
        curve_seconds = [0.0]
        batch_loss: list[float] = []
        elapsed, diverged, step = 0.0, False, 0
        started = time.perf_counter()
        for epoch, batches in enumerate(batches_for(len(data.y_fit), batch_size, epochs, seed), 1):
            for idx in batches:
                x, y = data.X_fit[idx], data.y_fit[idx]
                ode.reset()
                t0 = time.perf_counter()
                loss = stepper.step(x, y)
                elapsed += time.perf_counter() - t0
                ode.count()
                step += 1
                batch_loss.append(loss)
                if on_step is not None:
                    on_step(1)
                if not math.isfinite(loss):
                    diverged = True
                    break
            curve.append(ode.mark(_eval_point(model, data, problem.loss, step, epoch)))
            curve_seconds.append(elapsed)
            if diverged:
                break
        total = time.perf_counter() - started
    final = {k: v for k, v in curve[-1].items() if k not in ("step", "epoch")}
    result = {"steps": step, "epochs_done": curve[-1]["epoch"], "diverged": diverged,
              "skipped_steps": int(stepper.skipped), "final": final, "curve": curve,
              "batch_loss": batch_loss, **ode.summary(step)}
    timing = {"train_seconds": elapsed, "total_seconds": total, "curve_train_seconds": curve_seconds,
              "seconds_per_step": elapsed / max(step, 1)}
    return result, timing


def warm_up(problem: Problem, data: Dataset, specs: Sequence[OptimizerSpec], batch_size: int,
            steps: int = 3) -> None:
    """A few untimed steps of every optimizer on a throwaway model, so that the first timed run
    does not pay for first-use costs (kernel dispatch caches, lazy imports, thread pools)."""
    x, y = data.X_fit[:batch_size], data.y_fit[:batch_size]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spec in specs:
            stepper = spec.make(problem.model(0), problem.loss, spec.default_lr, 0)
            for _ in range(steps):
                stepper.step(x, y)


def _problem_config(problem: Problem, data: Dataset, split_seed: int, subset: int | None
                    ) -> dict[str, Any]:
    meta = {k: v for k, v in data.meta.items() if k != "hessian_eigenvalues"}
    return {"name": problem.name, "description": problem.description, "network": problem.network,
            "loss": problem.loss, "metric": problem.metric, "classes": data.classes,
            "split_seed": split_seed, "subset": subset, "sizes": data.sizes(), "data": meta}


@dataclass
class RunSettings:
    """What a train or sweep invocation fixes for all its runs."""

    epochs: int
    batch_size: int
    seeds: Sequence[int]
    split_seed: int = 0
    subset: int | None = None
    target: float | None = None
    #: the invocation's hyper-parameters as ``optimizers.parse_hp`` returns them (recorded)
    hp: dict[str, dict[str, Any]] = field(default_factory=dict)


def _record(protocol: str, problem: Problem, data: Dataset, spec: OptimizerSpec, lr: float,
            lr_source: str, seed: int, s: RunSettings, result: dict[str, Any],
            timing: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    config = {"problem": _problem_config(problem, data, s.split_seed, s.subset),
              "optimizer": spec.config(), "lr": lr, "lr_source": lr_source, "epochs": s.epochs,
              "batch_size": s.batch_size,
              "steps_per_epoch": steps_per_epoch(len(data.y_fit), s.batch_size), "seed": seed,
              "seeds": list(s.seeds), "hp": s.hp,
              "target": problem.target if s.target is None else s.target,
              "evaluation": "fit/val/test before the first step and after every epoch",
              **(extra or {})}
    return {"schema": SCHEMA, "kind": "run", "protocol": protocol, "problem": problem.name,
            "optimizer": spec.name, "seed": seed, "config": config,
            "environment": environment(), "result": result, "timing": timing}


def _run_all(protocol: str, problem: Problem, data: Dataset, specs: Sequence[OptimizerSpec],
             s: RunSettings, out: Path, manifest: Manifest,
             runs: Sequence[tuple[str, OptimizerSpec, float, str, int, dict[str, Any] | None]],
             on_step: StepCallback | None, on_done: DoneCallback | None,
             finish: Callable[[OptimizerSpec, dict[str, Any]], None] | None = None,
             trained: Sequence[Problem] | None = None, jobs: int = 1, worker_threads: int = 1
             ) -> list[dict[str, Any]]:
    """Run (file name, optimizer, lr, lr source, seed, extra config) after a warm-up; every
    finished run is written at once and ticked off in the manifest, which is closed "complete"
    or, on an exception (Ctrl-C), "interrupted". ``finish(spec, result)`` may add to a run's
    result before it is written; ``trained[k]``, when given, is the problem run k trains (e.g.
    a rescaled initialisation; the record names ``problem``).

    ``jobs`` > 1 trains the runs in that many worker processes (``run_parallel``, each with
    ``worker_threads`` torch threads); the records, ``on_done`` and the returned list keep the
    order of ``runs``, and every result is the one the serial loop gives (a run depends only on
    its seed, its optimizer and the thread count)."""
    records = []
    status = "interrupted"

    def record(k: int, result: dict[str, Any], timing: dict[str, Any]) -> dict[str, Any]:
        name, spec, lr, source, seed, extra = runs[k]
        if finish is not None:
            finish(spec, result)
        timing.update(jobs=jobs, loadavg=loadavg())
        rec = _record(protocol, problem, data, spec, lr, source, seed, s, result, timing, extra)
        write_json(out / name, rec)
        manifest.done(name)
        return rec

    def done(rec: dict[str, Any]) -> None:
        records.append(rec)
        if on_done is not None:
            on_done(rec)

    try:
        if jobs > 1:
            if trained is not None or finish is not None:
                raise ValueError("jobs > 1 runs the protocols train and sweep only (runs of one "
                                 "registered problem, optimizers from the registry)")
            run_parallel(problem, data, specs, s, runs, jobs, worker_threads, record, done,
                         on_step)
        else:
            warm_up(problem, data, specs, s.batch_size)
            for k, (_, spec, lr, _, seed, _) in enumerate(runs):
                timing_start = _now()
                result, timing = train_one(problem if trained is None else trained[k], data,
                                           spec, lr, seed, s.epochs, s.batch_size, on_step)
                timing.update(started_at=timing_start, finished_at=_now())
                done(record(k, result, timing))
        status = "complete"
    finally:
        manifest.close(status)
    return records


# ---- worker processes (--jobs) ------------------------------------------------------------------
#: what a worker process keeps between its runs (set by ``_worker_start``)
_WORKER: dict[str, Any] = {}


def _worker_start(problem: str, data: Dataset, threads: int,
                  optimizers: list[tuple[str, dict[str, Any]]], batch_size: int) -> None:
    """Initialise a worker: Ctrl-C left to the parent, ``threads`` torch threads, the data
    (pickled from the parent, so every worker trains on the parent's exact tensors) and the
    same warm-up as the serial loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    from .problems import PROBLEMS

    prob = PROBLEMS[problem]
    specs = [parse_optimizer(name, prob, hp) for name, hp in optimizers]
    _WORKER.update(problem=prob, data=data)
    warm_up(prob, data, specs, batch_size)


def _worker_run(optimizer: str, hp: dict[str, Any], lr: float, seed: int, epochs: int,
                batch_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One ``train_one`` in a worker: the optimizer rebuilt from its name and ``--hp``."""
    prob = _WORKER["problem"]
    spec = parse_optimizer(optimizer, prob, hp)
    started = _now()
    result, timing = train_one(prob, _WORKER["data"], spec, lr, seed, epochs, batch_size)
    timing.update(started_at=started, finished_at=_now())
    return result, timing


def _rebuildable(problem: Problem, specs: Sequence[OptimizerSpec]) -> None:
    """A worker rebuilds the problem from its name and each optimizer from its name and
    ``overrides``: ``ValueError`` unless that gives the same objects."""
    from .problems import PROBLEMS

    if PROBLEMS.get(problem.name) is not problem:
        raise ValueError(f"jobs > 1 needs a problem of the registry (ocnopt.bench.problems."
                         f"PROBLEMS), got {problem.name!r}, which is not registered under its name")
    for spec in specs:
        if parse_optimizer(spec.name, problem, spec.overrides).config() != spec.config():
            raise ValueError(f"jobs > 1 needs optimizers of the registry (parse_optimizer); "
                             f"{spec.name!r} differs from the registry's")


def run_parallel(problem: Problem, data: Dataset, specs: Sequence[OptimizerSpec],
                 s: RunSettings,
                 runs: Sequence[tuple[str, OptimizerSpec, float, str, int, dict[str, Any] | None]],
                 jobs: int, threads: int,
                 record: Callable[[int, dict[str, Any], dict[str, Any]], dict[str, Any]],
                 done: DoneCallback, on_step: StepCallback | None = None) -> None:
    """Train ``runs`` in ``jobs`` worker processes (``concurrent.futures.ProcessPoolExecutor``,
    spawn context, ``threads`` torch threads each). ``record(k, result, timing)`` is called in
    this process as soon as run k finishes (it writes the file); ``done(record)`` in the order
    of ``runs``; ``on_step(steps)`` once per finished run. Ctrl-C (or any exception) cancels
    the runs not started and ends the workers; finished runs stay recorded."""
    _rebuildable(problem, specs)
    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs and threads must be >= 1, got jobs={jobs}, threads={threads}")
    ctx = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=min(jobs, max(len(runs), 1)), mp_context=ctx, initializer=_worker_start,
        initargs=(problem.name, data, threads, [(sp.name, dict(sp.overrides)) for sp in specs],
                  s.batch_size))
    ok = False
    try:
        futures = {pool.submit(_worker_run, spec.name, dict(spec.overrides), lr, seed, s.epochs,
                               s.batch_size): k
                   for k, (_, spec, lr, _, seed, _) in enumerate(runs)}
        ready: dict[int, dict[str, Any]] = {}
        nxt = 0
        for fut in concurrent.futures.as_completed(futures):
            k = futures[fut]
            result, timing = fut.result()
            ready[k] = record(k, result, timing)
            if on_step is not None:
                on_step(int(result["steps"]))
            while nxt in ready:
                done(ready.pop(nxt))
                nxt += 1
        ok = True
    finally:
        if ok:
            pool.shutdown(wait=True)
        else:
            # the executor has no public way to stop a running call (Python < 3.14)
            procs = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                proc.terminate()


def train_protocol(problem: Problem, data: Dataset, specs: Sequence[OptimizerSpec],
                   s: RunSettings, out: Path, lrs: dict[str, tuple[float, str]] | None = None,
                   on_step: StepCallback | None = None, on_done: DoneCallback | None = None,
                   jobs: int = 1, worker_threads: int = 1) -> list[dict[str, Any]]:
    """Protocol ``train``: every optimizer x seed, seed-major (the optimizers of a seed run
    back to back, so drift of the machine hits them alike). ``lrs``: name -> (lr, source);
    otherwise the optimizer's default learning rate. ``jobs`` > 1: the runs in that many
    worker processes of ``worker_threads`` torch threads each (``run_parallel``; same results,
    same order; the timings then share the machine)."""
    lrs = lrs or {}
    plan = [(seed, spec) for seed in s.seeds for spec in specs]
    names = [f"train-{problem.name}-{spec.name}-seed{seed}.json" for seed, spec in plan]
    manifest = Manifest(out, "train", problem.name, names, {
        "optimizers": [sp.name for sp in specs], "seeds": list(s.seeds), "epochs": s.epochs,
        "batch_size": s.batch_size, "split_seed": s.split_seed, "subset": s.subset, "hp": s.hp,
        "lrs": {sp.name: lrs.get(sp.name, (sp.default_lr, "default"))[0] for sp in specs},
        "jobs": jobs})
    runs = [(name, spec, *lrs.get(spec.name, (spec.default_lr, "default")), seed, None)
            for (seed, spec), name in zip(plan, names)]
    return _run_all("train", problem, data, specs, s, out, manifest, runs, on_step, on_done,
                    jobs=jobs, worker_threads=worker_threads)


def sweep_protocol(problem: Problem, data: Dataset, specs: Sequence[OptimizerSpec],
                   s: RunSettings, out: Path, points: int = 9, decades: float = 4.0,
                   on_step: StepCallback | None = None, on_done: DoneCallback | None = None,
                   jobs: int = 1, worker_threads: int = 1) -> list[dict[str, Any]]:
    """Protocol ``sweep``: for every optimizer a grid of ``points`` learning rates log-spaced
    over ``decades`` decades around its default; every grid point x seed is one run. The
    choice (``sweep_summary``) looks at the validation split only. ``jobs``,
    ``worker_threads``: as in ``train_protocol``."""
    plan = []
    for seed in s.seeds:
        for spec in specs:
            grid = lr_grid(spec.default_lr, points, decades)
            for i, lr in enumerate(grid):
                plan.append((seed, spec, i, lr, grid))
    names = [f"sweep-{problem.name}-{spec.name}-lr{i:02d}-seed{seed}.json"
             for seed, spec, i, _, _ in plan]
    manifest = Manifest(out, "sweep", problem.name, names, {
        "optimizers": [sp.name for sp in specs], "seeds": list(s.seeds), "epochs": s.epochs,
        "batch_size": s.batch_size, "points": points, "decades": decades,
        "split_seed": s.split_seed, "subset": s.subset, "hp": s.hp, "jobs": jobs})
    runs = [(name, spec, lr, f"grid point {i}", seed,
             {"grid": grid, "grid_index": i, "points": points, "decades": decades,
              "selection": "val split"})
            for (seed, spec, i, lr, grid), name in zip(plan, names)]
    return _run_all("sweep", problem, data, specs, s, out, manifest, runs, on_step, on_done,
                    jobs=jobs, worker_threads=worker_threads)


# ---- summaries ----------------------------------------------------------------------------------
def mean_std(xs: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and standard deviation (ddof=1; 0 for one value) of the finite values."""
    v = [x for x in xs if x is not None and math.isfinite(x)]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def reached(metric: str, value: float | None, target: float) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return value >= target if metric == "accuracy" else value <= target


def time_to_target(record: dict[str, Any], target: float | None = None) -> dict[str, Any]:
    """Protocol ``time-to-target``: the first evaluation point (after an epoch) where the test
    metric reaches ``target`` (accuracy >= target, mse <= target): its step and the training
    wall-clock up to it; ``None`` if never reached."""
    cfg = record["config"]
    metric = cfg["problem"]["metric"]
    target = cfg["target"] if target is None else target
    key = "test_accuracy" if metric == "accuracy" else "test_loss"
    for point, sec in zip(record["result"]["curve"], record["timing"]["curve_train_seconds"]):
        if reached(metric, point.get(key), target):
            return {"target": target, "step": point["step"], "epoch": point["epoch"],
                    "seconds": sec}
    return {"target": target, "step": None, "epoch": None, "seconds": None}


def _diverged(rec: dict[str, Any]) -> bool:
    """A non-finite minibatch loss ended the run, or the final training loss (fit split) is not
    finite or above the initial one (the run blew up without overflowing)."""
    res = rec["result"]
    start, end = res["curve"][0].get("train_loss"), res["final"].get("train_loss")
    if res["diverged"] or end is None or not math.isfinite(end):
        return True
    return start is not None and end > start


def configuration(rec: dict[str, Any]) -> dict[str, Any]:
    """What a run shares with the other runs of its table: everything but the optimizer, its
    learning rate and the seed (problem, epochs, batch size, subset, split seed, the seeds and
    ``--hp`` of its invocation, the target, the sweep grid's size and span, torch threads).
    Runs of different configurations are never summarised in one table."""
    c = rec["config"]
    return {"problem": rec["problem"], "protocol": rec["protocol"], "epochs": c.get("epochs"),
            "batch_size": c.get("batch_size"), "subset": c["problem"].get("subset"),
            "split_seed": c["problem"].get("split_seed"), "seeds": c.get("seeds"),
            "hp": c.get("hp") or {},
            "target": c.get("target") if rec["protocol"] == "train" else None,
            "points": c.get("points"), "decades": c.get("decades"),
            "threads": rec.get("environment", {}).get("threads")}


def config_key(rec: dict[str, Any]) -> str:
    """``configuration(rec)`` and the result folder, as one comparable string."""
    folder = str(Path(rec["_path"]).parent) if "_path" in rec else ""
    return json.dumps([folder, _finite(configuration(rec))], sort_keys=True)


def _group_key(rec: dict[str, Any]) -> tuple:
    c = rec["config"]
    folder = str(Path(rec["_path"]).parent) if "_path" in rec else ""  # one folder per invocation
    return (rec["problem"], rec["optimizer"], c["lr"], c["epochs"], c["batch_size"],
            c["problem"]["subset"], c["problem"]["split_seed"], folder, config_key(rec))


def train_summary(records: Sequence[dict[str, Any]], reference: str = "torch-sgd"
                  ) -> list[dict[str, Any]]:
    """Per (problem, optimizer, lr, configuration, result folder) over seeds: final training
    loss, test metric (mean, std), wall time, time ratio to ``reference`` (same folder and
    configuration), time-to-target, and how many seeds diverged (``_diverged``). ``config_key``
    tells the rows of different configurations apart (never one table)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("kind") == "run" and r["protocol"] == "train":
            groups.setdefault(_group_key(r), []).append(r)
    rows = []
    for key, recs in groups.items():
        recs = sorted(recs, key=lambda r: r["seed"])
        metric = recs[0]["config"]["problem"]["metric"]
        test_key = "test_accuracy" if metric == "accuracy" else "test_loss"
        loss_m, loss_s = mean_std([r["result"]["final"]["train_loss"] for r in recs])
        test_m, test_s = mean_std([r["result"]["final"].get(test_key) for r in recs])
        time_m, time_s = mean_std([r["timing"]["train_seconds"] for r in recs])
        ttt = [time_to_target(r) for r in recs]
        hit = [t for t in ttt if t["seconds"] is not None]
        c0 = recs[0]["config"]
        fit = c0["problem"].get("sizes", {}).get("fit")
        spe = c0.get("steps_per_epoch") or (steps_per_epoch(fit, c0["batch_size"]) if fit
                                            else None)
        rows.append({
            "problem": key[0], "optimizer": key[1], "lr": key[2], "epochs": key[3],
            "batch_size": key[4], "subset": key[5], "metric": metric,
            "steps_per_epoch": spe, "planned_steps": spe * key[3] if spe else None,
            "config_key": key[8], "configuration": configuration(recs[0]),
            "overrides": c0["optimizer"].get("overrides") or {},
            "lr_source": recs[0]["config"]["lr_source"],
            "family": recs[0]["config"]["optimizer"]["family"],
            "order": recs[0]["config"]["optimizer"].get("order"),
            "seeds": [r["seed"] for r in recs], "train_loss": loss_m, "train_loss_std": loss_s,
            "test": test_m, "test_std": test_s, "seconds": time_m, "seconds_std": time_s,
            "steps": recs[0]["result"]["steps"],
            "diverged": sum(_diverged(r) for r in recs),
            "skipped_steps": sum(int(r["result"]["skipped_steps"]) for r in recs),
            "folder": key[7], "target": ttt[0]["target"], "target_reached": len(hit),
            "target_seconds": statistics.median([t["seconds"] for t in hit]) if hit else None,
            "target_steps": statistics.median([t["step"] for t in hit]) if hit else None,
        })
    for row in rows:
        ref = [r for r in rows if r["optimizer"] == reference
               and r["config_key"] == row["config_key"]]
        row["time_ratio"] = (row["seconds"] / ref[0]["seconds"]
                             if ref and ref[0]["seconds"] and row["seconds"] is not None else None)
    return rows


def _tunability(val: list[float], metric: str, margin: float) -> tuple[float, int]:
    """(share of the grid within ``margin`` of the best of ``val``, index of the best)."""
    if metric == "accuracy":
        best = max(val)
        within = [v >= best - margin for v in val]
    else:
        best = min(val)
        within = [v <= best * (1 + margin) for v in val]
    return sum(within) / len(val), val.index(best)


def _score(r: dict[str, Any], metric: str) -> float:
    """Validation score of a sweep run; a diverged run scores 0 accuracy / +inf mse."""
    fin = r["result"]["final"]
    v = fin.get("val_accuracy" if metric == "accuracy" else "val_loss")
    if r["result"]["diverged"] or v is None:
        return 0.0 if metric == "accuracy" else math.inf
    return v


def sweep_summary(records: Sequence[dict[str, Any]], margin: float = 0.02
                  ) -> list[dict[str, Any]]:
    """Per (problem, optimizer, configuration, result folder): the validation score of every
    grid point (mean over seeds; accuracy, or mse for regression; a diverged run scores 0
    accuracy / +inf mse), the chosen learning rate (best mean validation score), the test
    metric there (mean over seeds), and the tunability with its spread over seeds.

    Tunability of one seed = share of the grid within ``margin`` of that seed's best
    validation score (accuracy: ``margin`` absolute, 2 points; mse: within a factor
    1 + ``margin``). Reported: ``tunability`` = mean over seeds of the per-seed tunability,
    ``tunability_std`` = their standard deviation (ddof 1; 0 for one seed),
    ``tunability_per_seed``, and ``tunability_of_mean`` = the tunability of the seed-mean curve.
    One seed per grid point cannot tell a difference of a few grid points from float rounding
    at high learning rates; hence several seeds by default."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("kind") == "run" and r["protocol"] == "sweep":
            c = r["config"]
            groups.setdefault((r["problem"], r["optimizer"], c["epochs"], c["batch_size"],
                               c["problem"]["subset"], config_key(r)), []).append(r)
    rows = []
    for key, recs in groups.items():
        metric = recs[0]["config"]["problem"]["metric"]
        by_lr: dict[float, list[dict[str, Any]]] = {}
        for r in recs:
            by_lr.setdefault(r["config"]["lr"], []).append(r)
        grid = sorted(by_lr)
        val, test = [], []
        for lr in grid:
            val.append(statistics.fmean(_score(r, metric) for r in by_lr[lr]))
            test.append(mean_std([r["result"]["final"].get(
                "test_accuracy" if metric == "accuracy" else "test_loss") for r in by_lr[lr]])[0])
        tun_mean, i_best = _tunability(val, metric, margin)
        per_seed: dict[int, float] = {}
        for seed in sorted({r["seed"] for r in recs}):
            mine = sorted((r for r in recs if r["seed"] == seed), key=lambda r: r["config"]["lr"])
            per_seed[seed] = _tunability([_score(r, metric) for r in mine], metric, margin)[0]
        tun, tun_std = mean_std(list(per_seed.values()))
        rows.append({
            "problem": key[0], "optimizer": key[1], "epochs": key[2], "batch_size": key[3],
            "subset": key[4], "metric": metric, "config_key": key[5],
            "configuration": configuration(recs[0]),
            "folder": str(Path(recs[0]["_path"]).parent) if "_path" in recs[0] else "",
            "overrides": recs[0]["config"]["optimizer"].get("overrides") or {},
            "family": recs[0]["config"]["optimizer"]["family"],
            "order": recs[0]["config"]["optimizer"].get("order"),
            "grid": grid, "val": val, "test": test, "best_val": val[i_best],
            "best_lr": grid[i_best], "test_at_best": test[i_best],
            "tunability": tun, "tunability_std": tun_std,
            "tunability_per_seed": {str(k): v for k, v in per_seed.items()},
            "tunability_of_mean": tun_mean,
            "tunability_spread": "mean ± std (ddof 1) over seeds of the per-seed tunability",
            "points": len(grid), "seeds": sorted({r["seed"] for r in recs}),
            "diverged": sum(_diverged(r) for r in recs),
        })
    return rows


def lrs_from_sweep(folder: Path, problem: str) -> dict[str, tuple[float, str]]:
    """name -> (learning rate chosen on the val split, source) from the sweep files in folder.
    ``ValueError`` if the folder holds sweeps of one optimizer in several configurations
    (``configuration``): which one to take would be a guess."""
    rows = [r for r in sweep_summary(read_results(folder)) if r["problem"] == problem]
    out: dict[str, tuple[float, str]] = {}
    for r in rows:
        if r["optimizer"] in out:
            raise ValueError(f"{folder} holds sweeps of {r['optimizer']} on {problem} in several "
                             "configurations (epochs, batch, seeds, --hp, grid, ...); keep one "
                             "sweep per folder")
        hp = r["configuration"].get("hp")
        out[r["optimizer"]] = (r["best_lr"], f"sweep (val split) in {folder}"
                               + (f" with --hp {hp_label(hp)}" if hp else ""))
    return out


# ---- overhead -----------------------------------------------------------------------------------
def overhead_protocol(problem: Problem, data: Dataset, specs: Sequence[OptimizerSpec], out: Path,
                      batch_size: int, seed: int = 0, warmup: int = 10, rounds: int = 20,
                      block: int = 5, memory_steps: int = 11, split_seed: int = 0,
                      subset: int | None = None, on_step: StepCallback | None = None,
                      hp: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Protocol ``overhead``, in one process. Time: every optimizer gets its own copy of the
    same initial model and cycles through the same minibatches of the fit split; after
    ``warmup`` steps each, ``rounds`` rounds run ``block`` consecutive steps per optimizer, the
    order reshuffled every round (seeded), every step timed. Reported per optimizer: median
    and mean time per step (the mean amortises periodic work such as K-FAC inverses), each
    as a ratio to torch-sgd. Memory: afterwards, per optimizer, a fresh model and optimizer run
    ``memory_steps`` steps under ``torch.profiler``; the peak of live bytes above the start
    (optimizer state, gradients, temporaries; not the model or the data) and its ratio."""
    ref = next((s for s in specs if s.name == "torch-sgd"), None) or \
        parse_optimizer("torch-sgd", problem)
    specs = [ref] + [s for s in specs if s.name != ref.name]
    g = torch.Generator().manual_seed(seed)
    idx = list(torch.randperm(len(data.y_fit), generator=g).split(batch_size))
    pool = [(data.X_fit[i], data.y_fit[i]) for i in idx if len(i) == batch_size] or \
        [(data.X_fit[idx[0]], data.y_fit[idx[0]])]
    runners: dict[str, dict[str, Any]] = {}
    started, t_start = _now(), time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spec in specs:
            model = problem.model(seed)
            runners[spec.name] = {"stepper": spec.make(model, problem.loss, spec.default_lr, seed),
                                  "k": 0, "spec": spec}

        def stepper(r: dict[str, Any]) -> Callable[[], None]:
            def one() -> None:
                x, y = pool[r["k"] % len(pool)]
                r["k"] += 1
                r["stepper"].step(x, y)
            return one

        times = interleaved_times({name: stepper(r) for name, r in runners.items()}, warmup,
                                  rounds, block, seed, on_step)
        for name, r in runners.items():
            r["ns"] = times[name]
        memory: dict[str, int | None] = {}
        for spec in specs:
            model = problem.model(seed)

            def run(spec: OptimizerSpec = spec, model: nn.Module = model) -> None:
                st = spec.make(model, problem.loss, spec.default_lr, seed)
                for k in range(memory_steps):
                    x, y = pool[k % len(pool)]
                    st.step(x, y)

            memory[spec.name] = peak_memory(run)
            if on_step is not None:
                on_step(memory_steps)
    rows: dict[str, Any] = {}
    for name, r in runners.items():
        ms = [t / 1e6 for t in r["ns"]]
        rows[name] = {"median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms),
                      "p25_ms": quantile(ms, 0.25), "p75_ms": quantile(ms, 0.75),
                      "steps_timed": len(ms), "peak_bytes": memory[name],
                      "skipped_steps": int(r["stepper"].skipped), "lr": r["spec"].default_lr,
                      "optimizer": r["spec"].config()}
    base = rows[ref.name]
    for row in rows.values():
        row["median_ratio"] = row["median_ms"] / base["median_ms"]
        row["mean_ratio"] = row["mean_ms"] / base["mean_ms"]
        row["memory_ratio"] = (row["peak_bytes"] / base["peak_bytes"]
                               if row["peak_bytes"] and base["peak_bytes"] else None)
    n_params = sum(p.numel() for p in problem.model(seed).parameters())
    rec = {
        "schema": SCHEMA, "kind": "run", "protocol": "overhead", "problem": problem.name,
        "optimizer": None, "seed": seed,
        "config": {"problem": _problem_config(problem, data, split_seed, subset),
                   "optimizers": [s.name for s in specs], "reference": ref.name,
                   "batch_size": batch_size, "warmup": warmup, "rounds": rounds, "block": block,
                   "memory_steps": memory_steps, "seed": seed, "parameters": n_params,
                   "hp": hp or {},
                   "lr": "each optimizer's default",
                   "method": "one process; interleaved shuffled rounds; time.perf_counter_ns per "
                             "step; memory from torch.profiler allocator events"},
        "environment": environment(),
        # an overhead result is made of timings: all of it is machine- and load-dependent
        "result": {"rows": rows},
        "timing": {"started_at": started, "finished_at": _now(),
                   "total_seconds": time.perf_counter() - t_start, "loadavg": loadavg()},
    }
    write_json(Path(out) / f"overhead-{problem.name}.json", rec)
    return rec


# ---- per-layer norms (protocol trace) -----------------------------------------------------------
def parametrised_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that owns trainable parameters, in definition order."""
    return [(name, m) for name, m in model.named_modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))]


def layer_gradient_norms(model: nn.Module, loss: str, inputs: Tensor, targets: Tensor
                         ) -> tuple[list[float], list[float]]:
    """A separate autograd pass on the batch (buffers such as BatchNorm statistics restored
    afterwards), per layer with parameters: |dJ/dtheta_t| (the parameter gradient of the batch
    mean loss J) and |V_x| = sqrt(mean_s |d l_s / d y_{s,t}|^2), the root mean square over the
    samples of the gradient of the sample's loss l_s at the layer's output y_t (the value
    gradient there: the first-order part of the value function at that state)."""
    layers = parametrised_layers(model)
    outputs: list[Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for _, m in layers]
    buffers = [b.clone() for b in model.buffers()]
    try:
        with torch.enable_grad():
            value = torch_loss(loss)(model(inputs), targets)
            params = [[p for p in m.parameters(recurse=False) if p.requires_grad] for _, m in layers]
            flat = [p for ps in params for p in ps]
            grads = torch.autograd.grad(value, flat + outputs, allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers):
                b.copy_(saved)
    n = len(targets)
    g_par, g_out = grads[:len(flat)], grads[len(flat):]
    grad_norm, i = [], 0
    for ps in params:
        sq = sum(float((g ** 2).sum()) for g in g_par[i:i + len(ps)] if g is not None)
        grad_norm.append(math.sqrt(sq))
        i += len(ps)
    vx = [0.0 if g is None else float((n * g).reshape(n, -1).pow(2).sum(1).mean().sqrt())
          for g in g_out]
    return grad_norm, vx


class NormTracer:
    """Wraps a stepper: every ``every`` steps (from step 0) records, per layer with parameters,
    |Delta theta_t| (the update the optimizer made, any optimizer), |dJ/dtheta_t| and |V_x|
    (``layer_gradient_norms``, computed on the step's batch before the step), and for ocnopt
    |k_t| (``opt.last_step.stages[i].k_norm``, the open-loop part of the update). The trace
    runs inside the timed step: a traced run's time includes about one extra forward and
    backward pass every ``every`` steps. A ``torch.linalg.LinAlgError`` of the optimizer (a
    factorisation of non-finite statistics, e.g. Shampoo's SVD after a blow-up) is recorded in
    ``trace["errors"]`` and the step returns NaN: the run ends as diverged instead of ending
    the invocation."""

    def __init__(self, stepper: Any, model: nn.Module, loss: str, every: int):
        self.stepper, self.model, self.loss, self.every = stepper, model, loss, every
        self.layers = parametrised_layers(model)
        self.k = 0
        self.trace: dict[str, Any] = {
            "every": every, "layers": [name for name, _ in self.layers], "steps": [],
            "update_norm": [], "grad_norm": [], "value_grad_norm": [], "k_norm": [],
            "value_gradient": "|V_x| = RMS over the batch of d l_s / d y_t at each layer's output "
                              "y_t, from a separate autograd pass before the step; grad_norm: "
                              "|dJ/dtheta_t| of the batch mean loss",
            "update": "|theta_t after - theta_t before| of the step (weights and bias)"}

    @property
    def skipped(self) -> int:
        return int(self.stepper.skipped)

    def step(self, inputs: Tensor, targets: Tensor) -> float:
        traced = self.k % self.every == 0
        if traced:
            gn, vx = layer_gradient_norms(self.model, self.loss, inputs, targets)
            before = [[p.detach().clone() for p in m.parameters(recurse=False)]
                      for _, m in self.layers]
        try:
            value = self.stepper.step(inputs, targets)
        except torch.linalg.LinAlgError as err:  # e.g. an SVD of non-finite statistics
            self.trace.setdefault("errors", []).append(f"step {self.k}: {err}")
            value = math.nan  # the run ends as diverged
        if traced:
            upd = [math.sqrt(sum(float(((p.detach() - q) ** 2).sum())
                                 for p, q in zip(m.parameters(recurse=False), old)))
                   for (_, m), old in zip(self.layers, before)]
            t = self.trace
            t["steps"].append(self.k)
            t["update_norm"].append(upd)
            t["grad_norm"].append(gn)
            t["value_grad_norm"].append(vx)
            last = getattr(getattr(self.stepper, "opt", None), "last_step", None)
            t["k_norm"].append([float(s.k_norm) for s in last.stages]
                               if last is not None and getattr(last, "stages", None) else None)
        self.k += 1
        return value


def trace_protocol(problem: Problem, data: Dataset, specs: Sequence[OptimizerSpec],
                   s: RunSettings, out: Path, every: int = 10, argv: list[str] | None = None,
                   on_step: StepCallback | None = None, on_done: DoneCallback | None = None
                   ) -> list[dict[str, Any]]:
    """Protocol ``train`` with per-layer norms traced (``NormTracer``): every optimizer x seed,
    seed-major, at the default learning rates; each result file is a train result (protocol
    ``train``, the same tables) with ``result.trace`` added and ``config.trace_every``."""
    plan = [(seed, spec) for seed in s.seeds for spec in specs]
    names = [f"train-{problem.name}-{spec.name}-seed{seed}.json" for seed, spec in plan]
    manifest = Manifest(out, "trace", problem.name, names, {
        "optimizers": [sp.name for sp in specs], "seeds": list(s.seeds), "epochs": s.epochs,
        "batch_size": s.batch_size, "split_seed": s.split_seed, "subset": s.subset,
        "trace_every": every, "argv": argv,
        "lrs": {sp.name: sp.default_lr for sp in specs}})
    tracers: dict[int, list[NormTracer]] = {}
    runs = []
    for (seed, spec), name in zip(plan, names):
        mine: list[NormTracer] = []

        def make(m: nn.Module, loss: str, lr: float, sd: int, spec: OptimizerSpec = spec,
                 mine: list[NormTracer] = mine) -> Any:
            mine.append(NormTracer(spec.make(m, loss, lr, sd), m, loss, every))
            return mine[-1]

        traced = dataclasses.replace(spec, factory=make)
        tracers[id(traced)] = mine
        runs.append((name, traced, spec.default_lr, "default", seed, {"trace_every": every}))

    def finish(spec: OptimizerSpec, result: dict[str, Any]) -> None:
        result["trace"] = tracers[id(spec)][-1].trace

    return _run_all("train", problem, data, specs, s, out, manifest, runs, on_step, on_done,
                    finish)


# ---- robustness: learning rate x initialisation scale -------------------------------------------
INIT_SCALES = (0.5, 1.0, 2.0, 4.0)


class GuardedStepper:
    """A stepper whose ``torch.linalg.LinAlgError`` (a factorisation of non-finite statistics
    after a blow-up, e.g. SOAP's or Shampoo's) ends the run as diverged (the step returns NaN)
    instead of ending a whole grid; the messages are kept in ``errors``."""

    def __init__(self, stepper: Any):
        self.stepper = stepper
        self.errors: list[str] = []

    @property
    def skipped(self) -> int:
        return int(self.stepper.skipped)

    def step(self, inputs: Tensor, targets: Tensor) -> float:
        try:
            return self.stepper.step(inputs, targets)
        except torch.linalg.LinAlgError as err:
            self.errors.append(str(err))
            return math.nan


def scaled_problem(problem: Problem, scale: float) -> Problem:
    """The problem with every initial parameter (weights and biases, as drawn by the network's
    default initialisation) multiplied by ``scale``."""

    def build() -> nn.Module:
        model = problem.build()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        return model

    return dataclasses.replace(problem, build=build)


def robustness_protocol(problem: Problem, data: Dataset, specs: Sequence[OptimizerSpec],
                        s: RunSettings, out: Path, lr_points: int = 6, lr_decades: float = 3.0,
                        scales: Sequence[float] = INIT_SCALES, argv: list[str] | None = None,
                        on_step: StepCallback | None = None, on_done: DoneCallback | None = None
                        ) -> list[dict[str, Any]]:
    """Protocol ``robustness``: for every optimizer the grid of ``lr_points`` learning rates
    (log-spaced over ``lr_decades`` decades centred on its default) x the initialisation
    scales ``scales`` (``scaled_problem``), every point x seed one training run on the fit
    split; ``robustness_summary`` counts the points whose final test metric reaches the
    target."""
    plan = []
    for seed in s.seeds:
        for spec in specs:
            grid = lr_grid(spec.default_lr, lr_points, lr_decades)
            for j, scale in enumerate(scales):
                for i, lr in enumerate(grid):
                    plan.append((seed, spec, i, lr, grid, j, scale))
    names = [f"robustness-{problem.name}-{spec.name}-lr{i:02d}-scale{j:02d}-seed{seed}.json"
             for seed, spec, i, _, _, j, _ in plan]
    manifest = Manifest(out, "robustness", problem.name, names, {
        "optimizers": [sp.name for sp in specs], "seeds": list(s.seeds), "epochs": s.epochs,
        "batch_size": s.batch_size, "lr_points": lr_points, "lr_decades": lr_decades,
        "scales": list(scales), "split_seed": s.split_seed, "subset": s.subset,
        "target": problem.target if s.target is None else s.target, "argv": argv})
    scaled = {j: scaled_problem(problem, c) for j, c in enumerate(scales)}
    runs = [(name, spec, lr, f"grid point {i}", seed,
             {"init_scale": scale, "scales": list(scales), "scale_index": j, "grid": grid,
              "grid_index": i})
            for (seed, spec, i, lr, grid, j, scale), name in zip(plan, names)]
    return _run_all("robustness", problem, data, specs, s, out, manifest, runs, on_step,
                    on_done, trained=[scaled[j] for _, _, _, _, _, j, _ in plan])


def robustness_summary(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (problem, optimizer, epochs, batch size, subset, target): the grid (learning rates x
    scales) and per point how many seeds reached the target (final test accuracy >= target,
    mse <= target; a diverged run does not); per seed the share of grid points reached, and
    their mean and standard deviation over seeds (the spread); the share of points that every
    seed reached; the mean final test metric per point."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("kind") == "run" and r["protocol"] == "robustness":
            c = r["config"]
            groups.setdefault((r["problem"], r["optimizer"], c["epochs"], c["batch_size"],
                               c["problem"]["subset"], c["target"]), []).append(r)
    rows = []
    for key, recs in groups.items():
        metric = recs[0]["config"]["problem"]["metric"]
        test_key = "test_accuracy" if metric == "accuracy" else "test_loss"
        lrs = sorted({r["config"]["lr"] for r in recs})
        scales = sorted({r["config"]["init_scale"] for r in recs})
        seeds = sorted({r["seed"] for r in recs})
        hit: dict[tuple[float, float, int], bool] = {}
        value: dict[tuple[float, float], list[float | None]] = {}
        for r in recs:
            c = r["config"]
            v = None if r["result"]["diverged"] else r["result"]["final"].get(test_key)
            hit[(c["lr"], c["init_scale"], r["seed"])] = reached(metric, v, key[5])
            value.setdefault((c["lr"], c["init_scale"]), []).append(v)
        points = [(lr, sc) for sc in scales for lr in lrs]
        per_seed = [sum(hit.get((lr, sc, sd), False) for lr, sc in points) / len(points)
                    for sd in seeds]
        share_m, share_s = mean_std(per_seed)
        rows.append({
            "problem": key[0], "optimizer": key[1], "epochs": key[2], "batch_size": key[3],
            "subset": key[4], "target": key[5], "metric": metric,
            "family": recs[0]["config"]["optimizer"]["family"],
            "order": recs[0]["config"]["optimizer"].get("order"),
            "lrs": lrs, "scales": scales, "seeds": seeds, "points": len(points),
            "reached": [[sum(hit.get((lr, sc, sd), False) for sd in seeds) for lr in lrs]
                        for sc in scales],
            "test": [[mean_std(value.get((lr, sc), []))[0] for lr in lrs] for sc in scales],
            "share_per_seed": per_seed, "share": share_m, "share_std": share_s,
            "share_all_seeds": sum(all(hit.get((lr, sc, sd), False) for sd in seeds)
                                   for lr, sc in points) / len(points),
            "runs": len(recs), "diverged": sum(_diverged(r) for r in recs),
        })
    return rows
