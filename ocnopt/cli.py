"""The ``ocnopt`` command line: research comparisons from the shell.

    ocnopt bench list                          problems and optimizers
    ocnopt bench run digits-fcn                protocol train (default comparison)
    ocnopt bench sweep digits-fcn              protocol sweep (learning-rate grid, tunability)
    ocnopt bench overhead digits-fcn           protocol overhead (time and memory per step)
    ocnopt bench report results/bench          Markdown + PNG plots from saved results
    ocnopt --version                           (also ``python -m ocnopt ...``)
    ocnopt bench trace digits-deep             train with per-layer norms traced (claim 2)
    ocnopt bench robustness digits-fcn         learning rate x init scale grid (claim 1)
    ocnopt bench claims results/claims         the study page docs/claims.md

The protocols are described in docs/benchmarks.md. ``--hp key=value`` (repeatable) sets any
hyper-parameter of the optimizers that accept it, ``--hp name:key=value`` of one optimizer.
Bad arguments (and a missing optional dependency, with its ``pip install 'ocnopt[...]'``) exit
with code 2 and a one-line reason; Ctrl-C keeps the results of the runs
that finished (each run's JSON is written as soon as it ends) and exits with code 130.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

app = typer.Typer(help="ocnopt: optimal-control neural optimizers for PyTorch.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown")
bench = typer.Typer(
    help="Benchmarks (protocols in docs/benchmarks.md): problems with offline data, ocnopt's "
         "modes (`<backend>-<curvature>[-fb[-nash]]`) against torch.optim, curvlinops K-FAC and "
         "pytorch-optimizer. `--hp key=value` / `--hp name:key=value` sets hyper-parameters.",
    no_args_is_help=True, rich_markup_mode="markdown")
app.add_typer(bench, name="bench")

DEFAULT_OUT = Path("results/bench")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"ocnopt {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True,
        help="Print the version and exit.")] = False) -> None:
    """ocnopt: optimal-control neural optimizers for PyTorch."""


# ---- errors, checks -----------------------------------------------------------------------------
class UsageError(Exception):
    """A bad argument: reported on one line, exit code 2."""


def fail(message: str) -> None:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(2)


@contextmanager
def usage_errors() -> Iterator[None]:
    try:
        yield
    except (UsageError, ImportError) as err:  # ImportError: a missing optional dependency
        fail(str(err).replace("\n", " "))


def _positive(name: str, value: int | float | None) -> None:
    if value is not None and not value > 0:
        raise UsageError(f"{name} must be positive, got {value}")


def _problem(name: str) -> Any:
    from .bench.problems import PROBLEMS

    if name not in PROBLEMS:
        raise UsageError(f"unknown problem {name!r}; accepted: {', '.join(PROBLEMS)}")
    return PROBLEMS[name]


def _hp(items: list[str] | None) -> dict[str, dict[str, Any]]:
    from .bench.optimizers import parse_hp

    try:
        return parse_hp(items)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _optimizers(problem: Any, names: list[str] | None,
                hp: dict[str, dict[str, Any]] | None = None) -> list[Any]:
    from .bench.optimizers import select

    flat = [n.strip() for item in (names or []) for n in item.split(",") if n.strip()]
    try:
        return select(problem, flat or None, hp)
    except ValueError as err:
        raise UsageError(str(err).replace("\n", " ")) from err


def _target(problem: Any, target: float | None) -> None:
    """--target within the range of the problem's metric: accuracy in (0, 1], loss > 0."""
    if target is None:
        return
    if problem.metric == "accuracy" and not 0 < target <= 1:
        raise UsageError(f"--target is a test accuracy on {problem.name}, in (0, 1] (e.g. 0.95), "
                         f"got {target:g}")
    if problem.metric != "accuracy" and not target > 0:
        raise UsageError(f"--target is a test loss (mse) to go under on {problem.name}, > 0, "
                         f"got {target:g}")


def _hp_title(hp: dict[str, dict[str, Any]] | None) -> str:
    from .bench.optimizers import hp_label

    return f", --hp {hp_label(hp)}" if hp else ""


def _writable(out: Path) -> Path:
    """Create ``out`` if needed and check that a file can be written into it."""
    try:
        if out.exists() and not out.is_dir():
            raise UsageError(f"cannot write results to {out}: it exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ocnopt-write-check.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"cannot write results to {out}: {err.strerror or err}") from err
    return out


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# ---- output -------------------------------------------------------------------------------------
def _console(err: bool = False) -> Console:
    c = Console(stderr=err)
    if not c.is_terminal:
        c.width = max(c.width, 160)  # a pipe reports 80 columns: too narrow for the tables
    return c


class Feedback:
    """A rich progress bar on a terminal; one line per finished run otherwise (not with --json)."""

    def __init__(self, total: int, label: str, quiet: bool):
        self.console = _console(err=True)
        self.quiet = quiet
        self.bar = self.console.is_terminal and not quiet
        self.progress: Progress | None = None
        self.total, self.label = total, label
        self.runs = 0
        self.start = time.perf_counter()

    def __enter__(self) -> Feedback:
        if self.bar:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("steps"),
                                     TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=self.console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def step(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def done(self, rec: dict[str, Any]) -> None:
        self.runs += 1
        if self.quiet:
            return
        fin = rec["result"]["final"]
        if fin.get("test_accuracy") is not None:
            metric = (f"val acc {100 * fin['val_accuracy']:.1f}%, "
                      f"test acc {100 * fin['test_accuracy']:.1f}%")
        else:  # mse, or a flow's negative log-likelihood (nll)
            m = rec["config"]["problem"].get("metric", "mse")
            metric = (f"val {m} {_fmt(fin.get('val_loss'), '.4g')}, "
                      f"test {m} {_fmt(fin.get('test_loss'), '.4g')}")
        line = (f"{rec['protocol']} {rec['problem']} {rec['optimizer']} lr {rec['config']['lr']:.3g}"
                f" seed {rec['seed']}: train loss {_fmt(fin['train_loss'], '.4g')}, {metric}, "
                f"{rec['timing']['train_seconds']:.2f} s"
                f"{' (diverged)' if rec['result']['diverged'] else ''}")
        if self.progress is not None:
            self.progress.console.print(line, highlight=False)
        else:
            self.console.print(f"[{time.perf_counter() - self.start:6.0f} s] {line}",
                               highlight=False, soft_wrap=True)


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


TRAIN_FOOTER = (
    "train loss: final training loss on the fit split; test acc % / test mse: on the test split "
    "after the last epoch (both mean ± std over seeds); time s: the training loop only "
    "(evaluation excluded), mean over seeds; x torch-sgd: ratio of mean times in this "
    "invocation; to target: median time to first reach the target (checked after each epoch), "
    "(seeds that reached it/seeds).\nmode: peer = another library's optimizer; order 1 = "
    "ocnopt's backpropagation + curvature-model step (the torch.optim-equivalent step); order "
    "2 = ocnopt's feedback policies du = k + K dx with the value correction (docs/method.md "
    "section 6).")


def _train_table(rows: list[dict[str, Any]], title: str) -> Table:
    metric = rows[0]["metric"] if rows else "accuracy"
    t = Table(title=title, caption=TRAIN_FOOTER, caption_justify="left")
    for col in ("optimizer", "mode", "lr", "train loss", "test acc %" if metric == "accuracy"
                else f"test {metric}", "time s", "x torch-sgd", "to target", "notes"):
        t.add_column(col, justify="left" if col in ("optimizer", "mode", "notes") else "right",
                     no_wrap=col != "notes")
    for r in rows:
        mode = f"peer ({r['family']})" if r["family"] != "ocnopt" else f"order {r['order']}"
        test = (f"{100 * r['test']:.1f} ± {100 * (r['test_std'] or 0):.1f}"
                if metric == "accuracy" and r["test"] is not None
                else f"{_fmt(r['test'], '.4g')} ± {_fmt(r['test_std'], '.2g')}")
        target = ("-" if r["target_seconds"] is None
                  else f"{r['target_seconds']:.2f} s") + f" ({r['target_reached']}/{len(r['seeds'])})"
        notes = []
        if r["diverged"]:
            notes.append(f"{r['diverged']} diverged")
        if r["skipped_steps"]:
            notes.append(f"{r['skipped_steps']} skipped steps")
        t.add_row(r["optimizer"], mode, f"{r['lr']:.3g}",
                  f"{_fmt(r['train_loss'], '.4f')} ± {_fmt(r['train_loss_std'], '.4f')}", test,
                  f"{_fmt(r['seconds'], '.2f')}", _fmt(r["time_ratio"], ".2f"), target,
                  ", ".join(notes))
    return t


def _emit_json(obj: Any) -> None:
    from .bench.protocols import _finite

    typer.echo(json.dumps(_finite(obj), indent=1, sort_keys=True))


def _interrupted(records: list[dict[str, Any]], planned: int, out: Path) -> None:
    typer.echo(f"Interrupted: {len(records)} of {planned} runs finished; their results are in "
               f"{out} (the run in progress was discarded).", err=True)


# ---- commands -----------------------------------------------------------------------------------
OptOption = Annotated[list[str] | None, typer.Option(
    "--optimizers", "-o",
    help="Optimizers, comma-separated or repeated: peers torch-sgd, torch-rmsprop, torch-adam, "
         "curvlinops-kfac, soap, shampoo (pytorch-optimizer); ocnopt modes "
         "`<backend>-<curvature>[-fb[-nash]]` (e.g. autograd-adam = order 1, lowrank-kfac-fb = "
         "order 2 with feedback, lowrank-kfac-fb-nash = the same with game 'nash', "
         "autograd-full-fb = vanilla DDP); 'default' or "
         "'all' (every one that fits the problem). See `ocnopt bench list`.")]
HpOption = Annotated[list[str] | None, typer.Option(
    "--hp",
    help="Hyper-parameter, repeatable: `key=value` for every selected optimizer that has it, "
         "`name:key=value` for one (e.g. `--hp damping=0.01 --hp lowrank-kfac-fb:trust=1 "
         "--hp torch-adam:betas=0.9,0.99 --hp autograd-kfac:stat_every=5`). Values are Python "
         "literals (tuples as `a,b`), true/false/none, or text (`game=nash`). Recorded in "
         "the result JSON.")]
OutOption = Annotated[Path, typer.Option(
    "--out", help="Folder for the JSON results (one file per run, written when it finishes).")]
ThreadsOption = Annotated[int, typer.Option(
    "--threads", help="torch.set_num_threads (of each worker with --jobs), fixed and recorded "
                      "(timings depend on it).")]
JsonOption = Annotated[bool, typer.Option(
    "--json", help="Print machine-readable JSON on stdout instead of the table and progress.")]
SubsetOption = Annotated[int | None, typer.Option(
    "--subset", help="Use only the first N samples of each split (quick checks).")]
SplitSeedOption = Annotated[int, typer.Option(
    "--split-seed", help="Seed of the fit/val/test split (fixed by default).")]
JobsOption = Annotated[int, typer.Option(
    "--jobs", "-j",
    help="Train the independent runs (seeds, grid points, optimizers) in N worker processes, "
         "each with --threads torch threads: the same results, files and table order as "
         "`--jobs 1`, but the runs share the cores, so measure times with `--jobs 1`.")]
NprocOption = Annotated[int, typer.Option(
    "--nproc", help="Data-parallel processes per run (torch.distributed, gloo on CPU): each "
                    "steps on its shard of every minibatch and OCNOpt all-reduces the batch "
                    "means; equals --nproc 1 up to float rounding. ocnopt optimizers "
                    "only.")]


@bench.command("list", short_help="List the problems and the optimizers.")
def list_cmd(json_out: JsonOption = False) -> None:
    """List the problems and the optimizers (and which optimizers do not fit which problem)."""
    from .bench.optimizers import ALL_SET, DEFAULT_SET, all_names, parse_optimizer
    from .bench.problems import PROBLEMS

    specs = [parse_optimizer(n) for n in all_names()]
    if json_out:
        _emit_json({
            "problems": [{"name": p.name, "description": p.description, "network": p.network,
                          "loss": p.loss, "epochs": p.epochs, "batch_size": p.batch_size,
                          "target": p.target} for p in PROBLEMS.values()],
            "optimizers": [{**s.config(), "default_lr": s.default_lr,
                            "not_on": {p.name: s.fits(p) for p in PROBLEMS.values()
                                       if s.fits(p) is not None}} for s in specs],
            "sets": {"default": list(DEFAULT_SET), "all": list(ALL_SET)}})
        return
    con = _console()
    t = Table(title="problems (offline data)")
    for col in ("problem", "data", "network", "epochs", "batch", "target"):
        t.add_column(col, justify="right" if col in ("epochs", "batch", "target") else "left")
    for p in PROBLEMS.values():
        t.add_row(p.name, p.description, p.network, str(p.epochs), str(p.batch_size),
                  f"{p.target:g} ({'test acc' if p.metric == 'accuracy' else 'test ' + p.metric})")
    con.print(t)
    t = Table(title="optimizers: peers, then ocnopt's <backend>-<curvature>[-fb[-nash]] "
                    "(-fb = order 2 with feedback, -fb-nash = the same with game 'nash')")
    for col in ("optimizer", "default lr", "in sets", "description", "does not run on"):
        t.add_column(col)
    for s in specs:
        sets = ", ".join(n for n, members in (("default", DEFAULT_SET), ("all", ALL_SET))
                         if s.name in members)
        t.add_row(s.name, f"{s.default_lr:g}", sets, s.description,
                  ", ".join(p.name for p in PROBLEMS.values() if s.fits(p) is not None))
    con.print(t)


@bench.command("run", short_help="Protocol train: fixed epochs, several seeds, a comparison table.")
def run_cmd(
    problem: Annotated[str, typer.Argument(help="Problem name (see `ocnopt bench list`).")],
    optimizers: OptOption = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: the problem's).")] = None,
    seeds: Annotated[int, typer.Option(help="Number of seeds: 0, 1, ..., N-1 (initial weights "
                                            "and minibatch order).")] = 3,
    out: OutOption = DEFAULT_OUT,
    batch_size: Annotated[int | None, typer.Option(help="Minibatch size (default: the "
                                                        "problem's).")] = None,
    lr_from: Annotated[Path | None, typer.Option(
        "--lr-from", help="Take each optimizer's learning rate from the sweep results in this "
                          "folder (chosen on the validation split).")] = None,
    target: Annotated[float | None, typer.Option(
        help="Time-to-target: test accuracy to reach, in (0, 1] (mse problems: test loss to go "
             "under, > 0).")] = None,
    hp: HpOption = None,
    subset: SubsetOption = None,
    split_seed: SplitSeedOption = 0,
    threads: ThreadsOption = 1,
    jobs: JobsOption = 1,
    json_out: JsonOption = False,
    nproc: NprocOption = 1,
) -> None:
    """Protocol train: fixed epochs, several seeds; final training loss, test accuracy
    (mean ± std over seeds), wall-clock time and time to a target accuracy per optimizer.

    The default compares torch SGD, torch Adam, curvlinops K-FAC and ocnopt's order-1
    (autograd-sgd, autograd-adam, autograd-kfac) and order-2 (lowrank-adam-fb,
    lowrank-kfac-fb) modes; on digits-fcn it takes about 1-2 minutes on 2 cores.
    """
    from .bench.problems import load
    from .bench.protocols import RunSettings, lrs_from_sweep, train_protocol

    with usage_errors():
        prob = _problem(problem)
        for name, v in (("--epochs", epochs), ("--seeds", seeds), ("--batch-size", batch_size),
                        ("--subset", subset), ("--threads", threads), ("--nproc", nproc),
                        ("--jobs", jobs)):
            _positive(name, v)
        _target(prob, target)
        hps = _hp(hp)
        specs = _optimizers(prob, optimizers, hps)
        _check_nproc(specs, nproc, jobs)
        lrs = None
        if lr_from is not None:
            if not lr_from.is_dir():
                raise UsageError(f"--lr-from {lr_from}: not a directory")
            try:
                lrs = lrs_from_sweep(lr_from, prob.name)
            except ValueError as err:
                raise UsageError(f"--lr-from {err}") from err
            missing = [s.name for s in specs if s.name not in lrs]
            if missing:
                raise UsageError(f"--lr-from {lr_from}: no sweep results for {', '.join(missing)} "
                                 f"on {prob.name}")
        out = _writable(out)
        data = load(prob, split_seed, subset)
    _threads(threads)
    settings = RunSettings(epochs=epochs or prob.epochs, batch_size=batch_size or prob.batch_size,
                           seeds=list(range(seeds)), split_seed=split_seed, subset=subset,
                           target=target, hp=hps)

    def run(on_step: Any, on_done: Any) -> Any:
        if nproc == 1:
            return train_protocol(prob, data, specs, settings, out, lrs, on_step=on_step,
                                  on_done=on_done, jobs=jobs, worker_threads=threads)
        from .bench.parallel import Job, run_data_parallel

        names = [s.name for s in specs]
        job = Job(prob.name, names, hps, settings, lrs, threads)
        return run_data_parallel(
            nproc, job, specs, lambda sharded: train_protocol(
                prob, data, sharded, settings, out, lrs, on_step=on_step, on_done=on_done),
            device=data.X_fit.device)

    _train_like(f"train {prob.name}", prob.name, len(specs), seeds, settings, data, out, json_out,
                run)


def _check_nproc(specs: list[Any], nproc: int, jobs: int) -> None:
    """UsageError for --nproc with --jobs, or --nproc > 1 with optimizers that are not ocnopt's."""
    if nproc > 1 and jobs > 1:
        raise UsageError(f"--nproc {nproc} with --jobs {jobs}: choose one (a data-parallel "
                         "run uses the processes; independent runs use the workers)")
    if nproc > 1:
        from .bench.parallel import refuse_non_ocnopt

        try:
            refuse_non_ocnopt(specs, nproc)
        except ValueError as err:
            raise UsageError(str(err)) from err


def _progress_run(label: str, n_runs: int, settings: Any, data: Any, out: Path, json_out: bool,
                  run: Callable[..., Any]) -> tuple[list[dict[str, Any]], str, float]:
    """Run a protocol (``run(on_step, on_done)``, ``n_runs`` runs of ``settings.epochs``
    epochs) with the progress bar; Ctrl-C keeps the finished runs. Returns the records, the
    status ("complete" or "interrupted") and the seconds taken."""
    from .bench.protocols import steps_per_epoch

    total = n_runs * settings.epochs * steps_per_epoch(len(data.y_fit), settings.batch_size)
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    fb = Feedback(total, label, quiet=json_out)

    def done(rec: dict[str, Any]) -> None:
        records.append(rec)
        fb.done(rec)

    status = "complete"
    try:
        with fb:
            run(fb.step, done)
    except KeyboardInterrupt:
        _interrupted(records, n_runs, out)
        status = "interrupted"
    return records, status, time.perf_counter() - started


def _closing(status: str, records: list[dict[str, Any]], seconds: float, out: Path,
             json_out: bool) -> None:
    """The closing line of a table (not with --json), and exit code 130 after Ctrl-C."""
    if not json_out:
        _console().print(f"{status}: {len(records)} runs in {seconds:.0f} s; results in {out}",
                         highlight=False)
    if status != "complete":
        raise typer.Exit(130)


def _train_like(label: str, problem: str, n_specs: int, seeds: int, settings: Any, data: Any,
                out: Path, json_out: bool, run: Callable[..., Any]) -> None:
    """A train-like protocol through ``_progress_run``, then the train summary (exit code 130
    after Ctrl-C)."""
    records, status, seconds = _progress_run(label, n_specs * seeds, settings, data, out,
                                             json_out, run)
    _summarise_train(records, problem, out, seconds, json_out, status)
    if status == "interrupted":
        raise typer.Exit(130)


def _summarise_train(records: list[dict[str, Any]], problem: str, out: Path, seconds: float,
                     json_out: bool, status: str) -> None:
    from .bench.protocols import train_summary

    rows = train_summary(records)
    if json_out:
        _emit_json({"protocol": "train", "problem": problem, "status": status, "out": str(out),
                    "seconds": seconds, "rows": rows})
        return
    if rows:
        r0 = rows[0]
        title = (f"train {problem}: {r0['planned_steps']} steps ({r0['epochs']} epochs x "
                 f"{r0['steps_per_epoch']}), batch {r0['batch_size']}, seeds "
                 f"{', '.join(map(str, r0['seeds']))}, target {r0['target']:g}"
                 f"{_hp_title(r0['configuration']['hp'])}")
        _console().print(_train_table(rows, title))
    _console().print(f"{status}: {len(records)} runs in {seconds:.0f} s; results in {out} "
                     f"(`ocnopt bench report {out}` renders them)", highlight=False)


@bench.command("sweep", short_help="Protocol sweep: learning-rate grid chosen on validation, tunability.")
def sweep_cmd(
    problem: Annotated[str, typer.Argument(help="Problem name (see `ocnopt bench list`).")],
    optimizers: OptOption = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: the problem's).")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per grid point (the tunability is reported as "
                                            "mean ± std over them).")] = 3,
    points: Annotated[int, typer.Option(help="Learning rates per optimizer (protocol: >= 8).")] = 8,
    decades: Annotated[float, typer.Option(help="Decades the grid spans, centred on the "
                                                "optimizer's default lr (protocol: >= 4).")] = 4.0,
    out: OutOption = DEFAULT_OUT,
    batch_size: Annotated[int | None, typer.Option(help="Minibatch size (default: the "
                                                        "problem's).")] = None,
    hp: HpOption = None,
    subset: SubsetOption = None,
    split_seed: SplitSeedOption = 0,
    threads: ThreadsOption = 1,
    jobs: JobsOption = 1,
    nproc: NprocOption = 1,
    json_out: JsonOption = False,
) -> None:
    """Protocol sweep: a log-spaced learning-rate grid per optimizer, trained on the fit split
    and scored on the validation split, several seeds per grid point. Reports the best
    validation accuracy (mean over seeds), the chosen learning rate, the test accuracy there
    (read once), and the tunability: the share of the grid within 2 points of the optimizer's
    best, computed per seed, as mean ± std over the seeds. `run --lr-from DIR` reuses the
    choice. On digits-fcn the defaults (8 optimizers x 8 rates x 3 seeds = 192 runs) take
    about 4-5 minutes on one idle core, several times that on a loaded machine; `--jobs N`
    spreads the runs over N processes with the same results."""
    from .bench.problems import load
    from .bench.protocols import RunSettings, sweep_protocol, sweep_summary

    with usage_errors():
        prob = _problem(problem)
        for name, v in (("--epochs", epochs), ("--seeds", seeds), ("--batch-size", batch_size),
                        ("--subset", subset), ("--threads", threads), ("--decades", decades),
                        ("--jobs", jobs), ("--nproc", nproc)):
            _positive(name, v)
        if points < 2:
            raise UsageError(f"--points must be at least 2, got {points}")
        hps = _hp(hp)
        specs = _optimizers(prob, optimizers, hps)
        _check_nproc(specs, nproc, jobs)
        out = _writable(out)
        data = load(prob, split_seed, subset)
    _threads(threads)
    settings = RunSettings(epochs=epochs or prob.epochs, batch_size=batch_size or prob.batch_size,
                           seeds=list(range(seeds)), split_seed=split_seed, subset=subset,
                           hp=hps)

    def run(on_step: Any, on_done: Any) -> Any:
        if nproc == 1:
            return sweep_protocol(prob, data, specs, settings, out, points, decades,
                                  on_step=on_step, on_done=on_done, jobs=jobs,
                                  worker_threads=threads)
        from .bench.parallel import Job, run_data_parallel

        job = Job(prob.name, [s.name for s in specs], hps, settings, None, threads,
                  protocol="sweep", points=points, decades=decades)
        return run_data_parallel(
            nproc, job, specs, lambda sharded: sweep_protocol(
                prob, data, sharded, settings, out, points, decades, on_step=on_step,
                on_done=on_done),
            device=data.X_fit.device)

    records, status, seconds = _progress_run(
        f"sweep {prob.name}", len(specs) * seeds * points, settings, data, out, json_out, run)
    rows = sweep_summary(records)
    if json_out:
        _emit_json({"protocol": "sweep", "problem": prob.name, "status": status, "out": str(out),
                    "seconds": seconds, "rows": rows})
    else:
        t = Table(title=f"sweep {prob.name}: {points} learning rates over {decades:g} decades, "
                        f"{settings.epochs} epochs, seeds {', '.join(map(str, settings.seeds))}, "
                        f"chosen on the validation split{_hp_title(hps)}",
                  caption="best val, test: mean over seeds; tunability: share of the grid within "
                          "2 points of the best val. acc. (mse: within 2 %), per seed, mean ± std "
                          "over seeds; diverged: runs (grid points x seeds)",
                  caption_justify="left")
        for col in ("optimizer", "best val", "chosen lr", "test at chosen lr", "tunability",
                    "diverged"):
            t.add_column(col, justify="left" if col == "optimizer" else "right")
        for r in rows:
            acc = r["metric"] == "accuracy"
            t.add_row(r["optimizer"], f"{100 * r['best_val']:.1f} %" if acc else f"{r['best_val']:.4g}",
                      f"{r['best_lr']:.3g}",
                      _fmt(r["test_at_best"] * 100 if acc and r["test_at_best"] is not None
                           else r["test_at_best"], ".1f" if acc else ".4g"),
                      f"{100 * r['tunability']:.0f} ± {100 * (r['tunability_std'] or 0):.0f} %",
                      str(r["diverged"]))
        _console().print(t)
    _closing(status, records, seconds, out, json_out)


@bench.command("overhead", short_help="Protocol overhead: time and memory per step, ratios to torch SGD.")
def overhead_cmd(
    problem: Annotated[str, typer.Argument(help="Problem name (see `ocnopt bench list`).")],
    optimizers: OptOption = None,
    batch_size: Annotated[int | None, typer.Option(help="Minibatch size (default: the "
                                                        "problem's).")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed steps per optimizer first.")] = 10,
    rounds: Annotated[int, typer.Option(help="Interleaved timing rounds.")] = 20,
    block: Annotated[int, typer.Option(help="Consecutive steps per optimizer per round.")] = 5,
    memory_steps: Annotated[int, typer.Option(help="Steps profiled for the peak memory.")] = 11,
    seed: Annotated[int, typer.Option(help="Seed of the model, the batches and the order.")] = 0,
    hp: HpOption = None,
    out: OutOption = DEFAULT_OUT,
    threads: ThreadsOption = 1,
    json_out: JsonOption = False,
) -> None:
    """Protocol overhead: median time per step (after warm-up) and peak memory of every
    optimizer, as ratios to torch SGD on the same model and batches in the same process,
    absolute values beside."""
    from .bench.problems import load
    from .bench.protocols import overhead_protocol

    with usage_errors():
        prob = _problem(problem)
        for name, v in (("--batch-size", batch_size), ("--rounds", rounds), ("--block", block),
                        ("--memory-steps", memory_steps), ("--threads", threads)):
            _positive(name, v)
        if warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {warmup}")
        hps = _hp(hp)
        specs = _optimizers(prob, optimizers, hps)
        out = _writable(out)
        data = load(prob)
    _threads(threads)
    n = len(specs) + (0 if any(s.name == "torch-sgd" for s in specs) else 1)
    total = n * (warmup + rounds * block + memory_steps)
    fb = Feedback(total, f"overhead {prob.name}", quiet=json_out)
    try:
        with fb:
            rec = overhead_protocol(prob, data, specs, out, batch_size or prob.batch_size, seed,
                                    warmup, rounds, block, memory_steps, on_step=fb.step, hp=hps)
    except KeyboardInterrupt:
        typer.echo("Interrupted: the overhead protocol measures all optimizers in one process; "
                   "nothing was written.", err=True)
        raise typer.Exit(130) from None
    rows = rec["result"]["rows"]
    if json_out:
        _emit_json({"protocol": "overhead", "problem": prob.name, "out": str(out), "rows": rows})
        return
    t = Table(title=f"overhead {prob.name}: batch {rec['config']['batch_size']}, "
                    f"{rec['config']['rounds']} x {rec['config']['block']} timed steps each, "
                    f"{threads} thread(s){_hp_title(hps)}",
              caption="ratios to torch-sgd measured in this process; memory: peak live bytes "
                      "of torch's CPU allocator above the model and data")
    for col in ("optimizer", "median ms", "x sgd", "mean ms", "x sgd", "peak MiB", "x sgd"):
        t.add_column(col, justify="left" if col == "optimizer" else "right")
    for name, r in rows.items():
        mib = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
        t.add_row(name, f"{r['median_ms']:.2f}", f"{r['median_ratio']:.2f}", f"{r['mean_ms']:.2f}",
                  f"{r['mean_ratio']:.2f}", _fmt(mib, ".2f"), _fmt(r["memory_ratio"], ".2f"))
    _console().print(t)
    _console().print(f"results in {out}/overhead-{prob.name}.json", highlight=False)


@bench.command("report", short_help="Protocol report: Markdown tables and PNG plots from saved results.")
def report_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder with saved results (searched "
                                                "recursively).")],
    out: Annotated[Path | None, typer.Option(
        "--out", help="Markdown file to write (default FOLDER/report.md); plots go to a "
                      "folder 'plots' beside it.")] = None,
    into: Annotated[Path | None, typer.Option(
        "--into", help="Instead, put the report between the markers '<!-- ocnopt bench report: "
                       "begin -->' and '<!-- ocnopt bench report: end -->' of this Markdown file "
                       "(the rest of the file is kept); plots go to a folder named after it.")
    ] = None,
    json_out: JsonOption = False,
) -> None:
    """Protocol report: a Markdown page with tables (train, time-to-target, sweep with
    tunability, overhead) and PNG plots (loss vs step and vs wall-clock with seed bands,
    accuracy vs learning rate, overhead bars), made from the saved JSON results only."""
    from .bench.deps import require
    from .bench.report import render, splice

    with usage_errors():
        require("matplotlib", "ocnopt bench report (the plots)")
        if not folder.is_dir():
            raise UsageError(f"{folder}: not a directory")
        if out is not None and into is not None:
            raise UsageError("give --out or --into, not both")
        target = into if into is not None else (out or folder / "report.md")
        images = target.parent / (f"{target.stem}-plots" if into is not None else "plots")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            images.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot write the report to {target}: {err.strerror or err}") from err
        if not os.access(target.parent, os.W_OK) or (target.exists() and
                                                     not os.access(target, os.W_OK)):
            raise UsageError(f"cannot write the report to {target}: permission denied")
        rel = os.path.relpath(images, target.parent) + "/"
        command = "ocnopt bench report " + " ".join(sys.argv[3:]) if sys.argv[1:3] == [
            "bench", "report"] else None
        try:
            section, summary = render(folder, images, rel, command)
        except FileNotFoundError as err:
            raise UsageError(str(err)) from err
    if into is not None:
        splice(into, section)
    else:
        target.write_text("# ocnopt benchmark report\n\n" + section)
    if json_out:
        _emit_json({"report": str(target), "images": str(images), **summary})
        return
    _console().print(f"report written to {target} (plots in {images}); {summary['files']} result "
                     "files", highlight=False)


# ---- the papers' claims: trace, robustness, claims page (docs/claims.md) -------------------------
def _argv() -> list[str]:
    return ["ocnopt", *sys.argv[1:]]


@bench.command("trace", short_help="Protocol train with per-layer update and gradient norms traced.")
def trace_cmd(
    problem: Annotated[str, typer.Argument(help="Problem name (see `ocnopt bench list`).")],
    optimizers: OptOption = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: the problem's).")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds 0..N-1 per optimizer.")] = 3,
    every: Annotated[int, typer.Option(help="Trace the norms every N steps.")] = 10,
    out: OutOption = DEFAULT_OUT,
    subset: SubsetOption = None,
    threads: ThreadsOption = 1,
    json_out: JsonOption = False,
) -> None:
    """Protocol train at the default learning rates with, every N steps and per layer, the
    update norm |Delta theta_t|, the gradient norm |dJ/dtheta_t|, the value-gradient norm
    |V_x| at the layer's output (a separate autograd pass) and ocnopt's |k_t|, saved in each
    result's `result.trace` (claim 2: vanishing gradients, e.g. on digits-deep)."""
    from .bench.problems import load
    from .bench.protocols import RunSettings, trace_protocol

    with usage_errors():
        prob = _problem(problem)
        for name, v in (("--epochs", epochs), ("--seeds", seeds), ("--every", every),
                        ("--subset", subset), ("--threads", threads)):
            _positive(name, v)
        specs = _optimizers(prob, optimizers)
        out = _writable(out)
    _threads(threads)
    settings = RunSettings(epochs=epochs or prob.epochs, batch_size=prob.batch_size,
                           seeds=list(range(seeds)), subset=subset)
    data = load(prob, 0, subset)
    _train_like(f"trace {prob.name}", prob.name, len(specs), seeds, settings, data, out, json_out,
                lambda on_step, on_done: trace_protocol(prob, data, specs, settings, out, every,
                                                        _argv(), on_step=on_step,
                                                        on_done=on_done))


@bench.command("robustness",
               short_help="Protocol robustness: learning rate x initialisation scale grid, seeds.")
def robustness_cmd(
    problem: Annotated[str, typer.Argument(help="Problem name (see `ocnopt bench list`).")],
    optimizers: OptOption = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: the problem's).")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per grid point (protocol: >= 3).")] = 3,
    lr_points: Annotated[int, typer.Option(help="Learning rates (protocol: >= 6).")] = 6,
    lr_decades: Annotated[float, typer.Option(help="Decades the learning rates span, centred "
                                                   "on the optimizer's default.")] = 3.0,
    scales: Annotated[str, typer.Option(help="Initialisation scales, comma-separated "
                                             "(protocol: >= 4): every initial parameter times "
                                             "the scale.")] = "0.5,1,2,4",
    target: Annotated[float | None, typer.Option(
        help="Test accuracy to reach (mse problems: test loss to go under); default: the "
             "problem's.")] = None,
    out: OutOption = DEFAULT_OUT,
    subset: SubsetOption = None,
    threads: ThreadsOption = 1,
    json_out: JsonOption = False,
) -> None:
    """Protocol robustness (claim 1, sensitivity to hyper-parameters): every optimizer on a
    grid of learning rates x initialisation scales, several seeds per point; reports the share
    of grid points whose final test accuracy reaches the target (mean ± std over seeds)."""
    from .bench.problems import load
    from .bench.protocols import (
        RunSettings,
        robustness_protocol,
        robustness_summary,
    )

    with usage_errors():
        prob = _problem(problem)
        for name, v in (("--epochs", epochs), ("--seeds", seeds), ("--lr-decades", lr_decades),
                        ("--subset", subset), ("--threads", threads), ("--target", target)):
            _positive(name, v)
        if lr_points < 2:
            raise UsageError(f"--lr-points must be at least 2, got {lr_points}")
        try:
            scale_list = [float(c) for c in scales.split(",") if c.strip()]
        except ValueError as err:
            raise UsageError(f"--scales {scales!r}: expected comma-separated positive numbers"
                             ) from err
        if not scale_list or any(not c > 0 for c in scale_list):
            raise UsageError(f"--scales {scales!r}: expected comma-separated positive numbers")
        specs = _optimizers(prob, optimizers)
        out = _writable(out)
    _threads(threads)
    settings = RunSettings(epochs=epochs or prob.epochs, batch_size=prob.batch_size,
                           seeds=list(range(seeds)), subset=subset, target=target)
    data = load(prob, 0, subset)
    records, status, seconds = _progress_run(
        f"robustness {prob.name}", len(specs) * seeds * lr_points * len(scale_list), settings,
        data, out, json_out,
        lambda on_step, on_done: robustness_protocol(prob, data, specs, settings, out, lr_points,
                                                     lr_decades, scale_list, _argv(),
                                                     on_step=on_step, on_done=on_done))
    rows = robustness_summary(records)
    if json_out:
        _emit_json({"protocol": "robustness", "problem": prob.name, "status": status,
                    "out": str(out), "seconds": seconds, "rows": rows})
    else:
        t = Table(title=f"robustness {prob.name}: {lr_points} learning rates x "
                        f"{len(scale_list)} init scales, {seeds} seeds, {settings.epochs} epochs",
                  caption="share of grid points reaching the target: mean ± std over seeds")
        for col in ("optimizer", "target", "share reached", "reached by all seeds", "diverged"):
            t.add_column(col, justify="left" if col == "optimizer" else "right")
        for r in rows:
            t.add_row(r["optimizer"], f"{r['target']:g}",
                      f"{100 * r['share']:.0f} ± {100 * (r['share_std'] or 0):.0f} %",
                      f"{100 * r['share_all_seeds']:.0f} %", f"{r['diverged']}/{r['runs']}")
        _console().print(t)
    _closing(status, records, seconds, out, json_out)


@bench.command("claims", short_help="The study page of the papers' claims (docs/claims.md).")
def claims_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder with saved results (searched "
                                                "recursively): robustness, trace, overhead.")],
    out: Annotated[Path, typer.Option("--out", help="Markdown file to write; plots go to a "
                                                    "folder '<name>-plots' beside it.")
                   ] = Path("docs/claims.md"),
    json_out: JsonOption = False,
) -> None:
    """The study page of the papers' three claims (sensitivity to hyper-parameters, vanishing
    gradients, E-MSA and vanilla DDP), made from saved result files only: per claim the
    commands that produced them, tables, plots and a plain verdict."""
    from .bench.claims import render_claims

    with usage_errors():
        if not folder.is_dir():
            raise UsageError(f"{folder}: not a directory")
        images = out.parent / f"{out.stem}-plots"
        try:
            images.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot write the page to {out}: {err.strerror or err}") from err
        rel = os.path.relpath(images, out.parent) + "/"
        page, summary = render_claims(folder, images, rel, " ".join(_argv()))
    out.write_text(page)
    if json_out:
        _emit_json({"page": str(out), "images": str(images), **summary})
        return
    _console().print(f"claims page written to {out} (plots in {images})", highlight=False)


if __name__ == "__main__":  # pragma: no cover
    app()
