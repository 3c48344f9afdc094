"""Operator launches per step: the top-level aten operations of one optimizer step.

On the small networks a step costs about a fixed time per operator launch, so the count of
launches is what the order-2 work of docs/performance.md ("The floors") is measured by. For
each runner of ``twin_overhead.py``'s comparison (``--compare``; subject and reference, and
with ``--baseline COMMIT`` the subject at that commit), on each network: ``--warmup`` steps on
the batches of ``twin_overhead.py``, then one step under ``torch.profiler``; printed: the number
of aten operations without an aten parent (what Python or the autograd engine launched; the
operations a multi-tensor or composite operation runs inside count once) and, with ``--top N``,
the N most frequent of them.

    python benchmarks/launch_count.py --compare order2 --nets digits-fcn,mnist1d-mlp,mlp784-w512 \\
        --baseline 7ce5182
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from baseline_overhead import export_baseline
from torch.profiler import ProfilerActivity, profile
from twin_overhead import NETS, Baseline, pairs

from ocnopt.bench.problems import get_problem, load, random_mlp


def launches(step: Any) -> collections.Counter[str]:
    """The top-level aten operations of one call of ``step`` (name -> count)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return collections.Counter(
        e.name for e in prof.events() if e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", default="order2", help="torch, order2, curvlinops (comma-sep.)")
    ap.add_argument("--nets", default="digits-fcn,mnist1d-mlp,mlp784-w512",
                    help=f"subset of {', '.join(NETS)}")
    ap.add_argument("--baseline", default=None, help="also count ocnopt at this commit")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=0, help="also print the N most frequent")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = export_baseline(args.baseline, Path(tmp)) if args.baseline else None
        for net in args.nets.split(","):
            p = random_mlp(512, 256, args.seed) if net == "mlp784-w512" else get_problem(net)
            data = load(p)
            g = torch.Generator().manual_seed(args.seed)
            idx = [i for i in torch.randperm(len(data.y_fit), generator=g).split(p.batch_size)
                   if len(i) == p.batch_size][:8]
            pool = [(data.X_fit[i], data.y_fit[i]) for i in idx]
            runners: dict[str, Any] = {}
            for sname, subject, rname, ref in (pr for c in args.compare.split(",")
                                               for pr in pairs(c, p)):
                for name, spec in ((sname, subject), (rname, ref)):
                    runners.setdefault(name, spec.make(p.model(args.seed), p.loss,
                                                       spec.default_lr, args.seed))
                if base is not None:
                    runners.setdefault(f"{sname} at {args.baseline}",
                                       Baseline(base, subject, p, args.seed))
            for name, runner in runners.items():
                for k in range(args.warmup):
                    runner.step(*pool[k % len(pool)])
                x, y = pool[args.warmup % len(pool)]
                counts = launches(lambda r=runner, x=x, y=y: r.step(x, y))
                print(f"{net:13} {name:32} {sum(counts.values()):5d}", flush=True)
                for op, n in counts.most_common(args.top):
                    print(f"{'':13} {'':32} {n:5d} {op}")


if __name__ == "__main__":
    main()
