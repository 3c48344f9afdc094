"""Time and memory per step as the network and the batch grow: the ``overhead`` protocol of
``ocnopt.bench`` on a wider network than the benchmark problems, at several widths and batch
sizes, and a per-phase breakdown of ocnopt's step from the library's profiler regions.

A thin configuration of ``ocnopt.bench``: the optimizers are the registry's (``ocnopt bench
list``, their default hyper-parameters), the timing and the memory are
``ocnopt.bench.protocols.overhead_protocol`` (one process, interleaved shuffled rounds, the
allocator's peak from ``torch.profiler``), every set writes ordinary ``overhead-*.json`` result
files that ``ocnopt bench report`` renders. What this script adds is the sets:

* problem ``mlp784-w<W>`` (``ocnopt.bench.problems.random_mlp``): MLP 784-W-W-10 with ReLU,
  random N(0, 1) inputs and random labels (no download; 4 minibatches of the chosen batch
  size, cycled); the timing problem of docs/performance.md. ``digits-cnn`` is the registry's
  (docs/benchmarks.md).
* sets (``--sets``):
  - ``order1``: MLP W = 512, B = 256, ocnopt's order-1 modes beside their torch.optim twins and
    curvlinops' K-FAC;
  - ``order2``: the scalable order-2 backends (lowrank, backpack) against order 1 with the same
    K-FAC model and torch SGD/Adam, on the MLP (W = 512, B = 256) and on digits-cnn (B = 256);
  - ``batch``: the ``order2`` optimizers on the MLP W = 512 at B = 64, 128, 256, 512;
  - ``width``: the ``order2`` optimizers on the MLP at W = 128, 256, 512, 1024, B = 256.
* ``--profile``: for each optimizer of the sets, ``--profile-steps`` steps under
  ``torch.profiler``; per step the CPU time of every ``ocnopt.*`` region (``ocnopt/profiling.py``:
  nominal pass, terminal cost, backward recursion, curvature update, update) in ms, written to
  ``<out>/profile-<set>.json`` and printed.

    python benchmarks/scaling.py --sets order1,order2 --out results/scaling
    python benchmarks/scaling.py --sets width --quick --profile --out results/scaling
    ocnopt bench report results/scaling --out results/scaling/report.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ocnopt.bench.measure import environment
from ocnopt.bench.optimizers import parse_optimizer
from ocnopt.bench.problems import Dataset, Problem, get_problem, load, random_mlp
from ocnopt.bench.protocols import overhead_protocol, write_json
from ocnopt.profiling import REGIONS

ORDER1 = ["torch-sgd", "torch-rmsprop", "torch-adam", "autograd-sgd", "autograd-rmsprop",
          "autograd-adam", "autograd-kfac", "autograd-ekfac", "curvlinops-kfac"]
ORDER2 = ["torch-sgd", "torch-adam", "autograd-kfac", "lowrank-kfac-fb", "backpack-kfac-fb"]
BATCHES = (64, 128, 256, 512)
WIDTHS = (128, 256, 512, 1024)


def plan(sets: list[str]) -> list[tuple[str, str, Problem, int, list[str]]]:
    """(set, sub-folder, problem, batch size, optimizers) of every overhead invocation."""
    out: list[tuple[str, str, Problem, int, list[str]]] = []
    for s in sets:
        if s == "order1":
            out.append((s, "order1", random_mlp(), 256, ORDER1))
        elif s == "order2":
            out.append((s, "order2", random_mlp(), 256, ORDER2))
            out.append((s, "order2", get_problem("digits-cnn"), 256, ORDER2))
        elif s == "batch":
            out += [(s, f"batch/B{b}", random_mlp(512, b), b, ORDER2) for b in BATCHES]
        elif s == "width":
            out += [(s, f"width/W{w}", random_mlp(w), 256, ORDER2) for w in WIDTHS]
        else:
            raise SystemExit(f"unknown set {s!r}; accepted: order1, order2, batch, width")
    return out


def profile(problem: Problem, data: Dataset, names: list[str], batch: int, steps: int
            ) -> dict[str, dict[str, float]]:
    """Per optimizer, the CPU time per step (ms) of every ``ocnopt.*`` region over ``steps``
    steps after 3 untimed ones (peers have none: only their whole step, ``step``)."""
    x, y = data.X_fit[:batch], data.y_fit[:batch]
    out = {}
    for name in names:
        spec = parse_optimizer(name, problem)
        stepper = spec.make(problem.model(0), problem.loss, spec.default_lr, 0)
        for _ in range(3):
            stepper.step(x, y)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with torch.profiler.record_function("step"):
                    stepper.step(x, y)
        totals = {e.key: e.cpu_time_total / 1e3 / steps for e in prof.key_averages()
                  if e.key in REGIONS or e.key == "step"}
        out[name] = {k: round(totals[k], 3) for k in ("step", *REGIONS) if k in totals}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="order1,order2,batch,width")
    ap.add_argument("--out", type=Path, default=Path("results/scaling"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--block", type=int, default=10,
                    help="steps per block (10 = inv_every: one K-FAC inverse step per block)")
    ap.add_argument("--memory-steps", type=int, default=11)
    ap.add_argument("--quick", action="store_true", help="5 rounds, 3 memory steps")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-steps", type=int, default=10)
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.memory_steps = 5, 3
    torch.set_num_threads(a.threads)
    profiles: dict[str, dict[str, Any]] = {}
    for set_name, folder, problem, batch, names in plan(a.sets.split(",")):
        data = load(problem)
        specs = [parse_optimizer(n, problem) for n in names]
        specs = [s for s in specs if s.fits(problem) is None]
        rec = overhead_protocol(problem, data, specs, a.out / folder, batch_size=batch,
                                warmup=a.warmup, rounds=a.rounds, block=a.block,
                                memory_steps=a.memory_steps)
        print(f"{set_name} {problem.name} B {batch}: " + ", ".join(
            f"{n} {r['median_ms']:.2f} ms ({r['mean_ratio']:.2f}x)"
            for n, r in rec["result"]["rows"].items()), flush=True)
        if a.profile:
            prof = profile(problem, data, [s.name for s in specs], batch, a.profile_steps)
            profiles.setdefault(set_name, {})[f"{problem.name} B{batch}"] = prof
            for n, row in prof.items():
                print(f"  profile {n}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()),
                      flush=True)
    for set_name, rows in profiles.items():
        write_json(a.out / f"profile-{set_name}.json",
                   {"set": set_name, "steps": a.profile_steps, "unit": "CPU ms per step",
                    "rows": rows, "environment": environment(), "argv": sys.argv})
    print(json.dumps({"out": str(a.out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
