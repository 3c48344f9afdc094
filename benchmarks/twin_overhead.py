"""Step time of ocnopt against peers doing the same work, in one process, interleaved.

Pairs subject / reference from the registry (``ocnopt.bench.optimizers``: the CLI's names,
learning rates, hyper-parameters), by ``--compare``:
``torch``: ``autograd-<c>`` against the ``torch-<c>`` peer, c in sgd, rmsprop, adam, and
``autograd-adamw`` against ``torch.optim.AdamW``, both at AdamW's default weight decay (at
ocnopt's default 0, adamw is adam); ``order2``: ``lowrank-<c>-fb`` against ``autograd-<c>``,
c in adam, kfac; ``curvlinops``: ``curvlinops-kfac`` against ``autograd-kfac`` doing its work
(its lr, damping and Fisher, statistics of the current batch only and inverses every
``update_every`` steps, inverted in the factors' dtype as curvlinops does, no ``.grad``).
Networks (``--nets``): the problems' (``ocnopt.bench.problems``: network, batch size, fit data)
and ``mlp784-w512`` (``random_mlp``: 784-512-512-10, B 256). Each runner has its own copy of
the same initial model; a network's runners are timed together by
``measure.interleaved_times`` on the ``--clock`` (``wall``: perf_counter_ns; ``cpu``: the
thread's CPU time, for a shared machine). Printed per pair: median ms, the ratio of medians
with its 95 % bootstrap interval (``measure.bootstrap_ratio``), the ratio of means;
``--baseline COMMIT`` adds each ocnopt subject at that commit (``baseline_overhead``'s export).

    python benchmarks/twin_overhead.py --compare torch --clock cpu --json twin.json
    python benchmarks/twin_overhead.py --compare order2,curvlinops --clock cpu \\
        --nets digits-fcn,mnist1d-mlp,mlp784-w512 --baseline 377091c
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from baseline_overhead import export_baseline

from ocnopt.bench.measure import bootstrap_ratio, environment, interleaved_times, loadavg
from ocnopt.bench.optimizers import OptimizerSpec, TorchStepper, parse_optimizer
from ocnopt.bench.problems import Problem, get_problem, load, random_mlp

NETS = ("digits-fcn", "mnist1d-mlp", "digits-cnn", "digits-resnet", "mlp784-w512")
CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}
Pair = tuple[str, OptimizerSpec, str, OptimizerSpec]


def pairs(compare: str, p: Problem) -> list[Pair]:
    """(label, spec) of the subject and of the reference of one comparison on the problem p."""
    if compare == "order2":
        return [(f"lowrank-{c}-fb", parse_optimizer(f"lowrank-{c}-fb", p), f"autograd-{c}",
                 parse_optimizer(f"autograd-{c}", p)) for c in ("adam", "kfac")]
    if compare == "curvlinops":
        peer = parse_optimizer("curvlinops-kfac", p)
        every = peer.hyper["update_every"]
        hp = {"lr": peer.default_lr, "damping": peer.hyper["damping"], "stat_every": every,
              "inv_every": every, "stat_decay": 0.0, "fisher_type": peer.hyper["fisher_type"],
              "set_grad": False, "inv_dtype": "factor"}
        return [("autograd-kfac as peer", parse_optimizer("autograd-kfac", p, hp),
                 "curvlinops-kfac", peer)]
    out: list[Pair] = []
    wd = inspect.signature(torch.optim.AdamW).parameters["weight_decay"].default
    for c in ("sgd", "rmsprop", "adam"):
        mine, twin = parse_optimizer(f"autograd-{c}", p), parse_optimizer(f"torch-{c}", p)
        if (mine.default_lr, mine.hyper) != (twin.default_lr, twin.hyper):
            raise ValueError(f"autograd-{c} and torch-{c} differ in their hyper-parameters")
        out.append((f"autograd-{c}", mine, f"torch-{c}", twin))
    mine = parse_optimizer("autograd-adamw", p, {"weight_decay": wd})

    def adamw(m: torch.nn.Module, loss: str, lr: float, seed: int) -> TorchStepper:
        return TorchStepper(m, loss, torch.optim.AdamW(m.parameters(), lr=lr, **mine.hyper))

    return out + [(f"autograd-adamw wd {wd:g}", mine, f"torch-adamw wd {wd:g}",
                   OptimizerSpec("torch-adamw", "torch", mine.default_lr, mine.hyper,
                                 "torch.optim.AdamW", adamw))]


class Baseline:
    """``OCNOpt`` of the exported commit with the spec's arguments, less the hyper-parameters
    its curvature model does not have yet (at their defaults here, e.g. ``inv_dtype``)."""

    def __init__(self, lib: Any, spec: OptimizerSpec, p: Problem, seed: int):
        kwargs = dict(spec.kwargs)
        model = lib.curvature.CURVATURES.get(kwargs.get("curvature"))
        if model is not None:
            for key in ("inv_dtype",):
                if key in kwargs and key not in model.defaults:
                    del kwargs[key]
        self.opt = lib.OCNOpt(p.model(seed), loss=p.loss, lr=spec.default_lr, seed=seed,
                              **kwargs)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(self.opt.step(x, y))


def run_net(net: str, args: argparse.Namespace, base: Any) -> list[dict[str, Any]]:
    p = random_mlp(512, 256, args.seed) if net == "mlp784-w512" else get_problem(net)
    data = load(p)
    g = torch.Generator().manual_seed(args.seed)
    idx = [i for i in torch.randperm(len(data.y_fit), generator=g).split(p.batch_size)
           if len(i) == p.batch_size][: args.batches]
    pool = [(data.X_fit[i], data.y_fit[i]) for i in idx]
    todo = [pr for c in args.compare.split(",") for pr in pairs(c, p)]
    runners: dict[str, Any] = {}
    for sname, subject, rname, ref in todo:
        for name, spec in ((sname, subject), (rname, ref)):
            if name not in runners:
                runners[name] = spec.make(p.model(args.seed), p.loss, spec.default_lr, args.seed)
        if base is not None and "base:" + sname not in runners:
            runners["base:" + sname] = Baseline(base, subject, p, args.seed)
    ks = dict.fromkeys(runners, 0)

    def stepper(name: str) -> Any:
        def one() -> None:
            x, y = pool[ks[name] % len(pool)]
            ks[name] += 1
            runners[name].step(x, y)
        return one

    times = interleaved_times({n: stepper(n) for n in runners}, args.warmup, args.rounds,
                              args.block, seed=args.seed, clock=CLOCKS[args.clock])
    rows = []
    for sname, subject, rname, ref in todo:
        a, b = times[sname], times[rname]
        ratio, lo, hi = bootstrap_ratio(a, b)
        row = {"net": net, "subject": sname, "reference": rname,
               "subject_config": subject.config(), "reference_config": ref.config(),
               "subject_ms": statistics.median(a) / 1e6, "reference_ms": statistics.median(b) / 1e6,
               "ratio": ratio, "ci95": [lo, hi],
               "ratio_of_means": statistics.fmean(a) / statistics.fmean(b)}
        if base is not None:
            old = times["base:" + sname]
            new_base, blo, bhi = bootstrap_ratio(a, old)
            row.update(baseline_ms=statistics.median(old) / 1e6, new_over_baseline=new_base,
                       new_over_baseline_ci95=[blo, bhi],
                       baseline_ratio=statistics.median(old) / statistics.median(b))
        rows.append(row)
        print(f"{net:13} {sname:22} {rname:18} {row['subject_ms']:8.3f} "
              f"{row['reference_ms']:8.3f} {ratio:6.3f} [{lo:.3f}, {hi:.3f}] "
              f"{row['ratio_of_means']:6.3f}" + (
                  f" {row['baseline_ms']:9.3f} {row['baseline_ratio']:6.3f} {new_base:6.3f} "
                  f"[{blo:.3f}, {bhi:.3f}]" if base is not None else ""), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", default="torch", help="torch, order2, curvlinops (comma-sep.)")
    ap.add_argument("--nets", default=",".join(NETS), help=f"subset of {', '.join(NETS)}")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    ap.add_argument("--baseline", default=None, help="also time ocnopt at this commit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--batches", type=int, default=8, help="minibatches cycled through")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if bad := set(args.nets.split(",")) - set(NETS):
        ap.error(f"--nets: unknown network(s) {sorted(bad)}; accepted {', '.join(NETS)}")
    if bad := set(args.compare.split(",")) - {"torch", "order2", "curvlinops"}:
        ap.error(f"--compare: unknown comparison(s) {sorted(bad)}; accepted torch, order2, "
                 "curvlinops")
    torch.set_num_threads(args.threads)
    load_start, started = loadavg(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"{args.clock} clock, {args.threads} thread(s), {args.rounds} rounds x {args.block} "
          f"steps; ms are medians; ratio = subject / reference [95 % CI], mean = ratio of means"
          + ("; baseline ms, baseline / reference, subject / baseline [95 % CI]"
             if args.baseline else ""))
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = export_baseline(args.baseline, Path(tmp)) if args.baseline else None
        for net in args.nets.split(","):
            rows += run_net(net, args, base)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "rows": rows, "settings": vars(args) | {"json": str(args.json)},
            "timing": {"started": started, "loadavg_start": load_start, "loadavg_end": loadavg()},
            "environment": environment()}, indent=2))


if __name__ == "__main__":
    main()
