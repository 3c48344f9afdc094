"""What ocnopt's step guard and diagnostics cost inside a K-FAC step, against curvlinops.

An order-1 step of ocnopt makes passes over the parameters that curvlinops' K-FAC step (and a
torch.optim step) does not: the copy of the parameters before they move (atomic steps), the
finiteness check of the moved parameters (docs/method.md section 8) and, on networks above
``FOREACH_MAX_NUMEL`` parameters, the per-player |k| of ``last_step`` (made at the step). This
script alternates ``twin_overhead.py``'s curvlinops pair (``autograd-kfac`` doing curvlinops'
work, and curvlinops' K-FAC) step by step on ``--net``, times each call of those passes inside
ocnopt's steps (the thread's CPU time), and prints the medians over the steps without
statistics (every ``update_every``-th step refreshes the factors), ocnopt / curvlinops, and
the floor (curvlinops' step + the passes) / curvlinops' step. docs/performance.md, "K-FAC
order 1 against curvlinops' K-FAC doing the same work".

    python benchmarks/guard_cost.py --net mlp784-w512 --steps 200
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from twin_overhead import NETS, pairs

import ocnopt.engine as engine
from ocnopt.bench.measure import loadavg
from ocnopt.bench.problems import get_problem, load, random_mlp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", default="mlp784-w512", choices=NETS)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = random_mlp(512, 256, args.seed) if args.net == "mlp784-w512" else get_problem(args.net)
    data = load(p)
    B = p.batch_size
    pool = [(data.X_fit[i * B:(i + 1) * B], data.y_fit[i * B:(i + 1) * B]) for i in range(4)]
    (_, spec, _, ref), = pairs("curvlinops", p)
    every = ref.hyper["update_every"]
    ours = spec.make(p.model(args.seed), p.loss, spec.default_lr, args.seed)
    peer = ref.make(p.model(args.seed), p.loss, ref.default_lr, args.seed)
    passes: dict[str, list[int]] = defaultdict(list)

    def timed(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def inner(*a: Any, **k: Any) -> Any:
            t0 = time.thread_time_ns()
            out = fn(*a, **k)
            passes[label].append(time.thread_time_ns() - t0)
            return out
        return inner

    opt: Any = ours.opt  # type: ignore[attr-defined]
    opt._backup_params = timed(opt._backup_params, "parameter backup")
    engine.all_finite = timed(engine.all_finite, "finiteness check")  # type: ignore[assignment]
    make_diagnostics = engine._diagnostics_fn
    engine._diagnostics_fn = lambda *a: timed(make_diagnostics(*a), "|k| per player")  # type: ignore[assignment]
    steps: dict[str, list[int]] = defaultdict(list)
    for i in range(args.steps):
        for name, s in (("ocnopt", ours), ("curvlinops", peer)):
            t0 = time.thread_time_ns()
            s.step(*pool[i % len(pool)])
            steps[name].append(time.thread_time_ns() - t0)

    def plain(v: list[int]) -> float:  # ms, steps without statistics
        return statistics.median([x for j, x in enumerate(v) if j % every]) / 1e6

    o, c = plain(steps["ocnopt"]), plain(steps["curvlinops"])
    print(f"{args.net}, {args.steps} steps each, CPU time, load {loadavg()}; medians of the "
          f"steps without statistics")
    print(f"  ocnopt {o:.3f} ms, curvlinops {c:.3f} ms: ratio {o / c:.4f}")
    extra = 0.0
    for label, v in passes.items():
        if len(v) < len(steps["ocnopt"]):  # (lazy: not made at every step)
            continue
        ms = plain(v)
        extra += ms
        print(f"  {label}: {ms:.3f} ms")
    print(f"  floor (curvlinops + these passes) / curvlinops: {(c + extra) / c:.4f}")


if __name__ == "__main__":
    main()
