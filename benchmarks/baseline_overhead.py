"""Step time of this library against an earlier commit of itself, in one process, interleaved.

The earlier commit's ``ocnopt/`` and ``backends/`` are exported with ``git archive`` into a
scratch folder as the package ``ocnopt_baseline`` (imports renamed; ``--after`` exports a second
commit the same way instead of using this working tree), so both versions run side by side in
this process on the same models, batches and thread count. Every configuration (problem x
optimizer x version) gets its own copy of the same initial model; the timing is
``ocnopt.bench.measure.interleaved_times`` (the ``overhead`` protocol's: warm-up, then rounds of
``block`` timed steps in an order reshuffled every round). Prints per configuration the median
step time of both versions and the ratio after / before, with a 95 % bootstrap interval of the
ratio of medians (``ocnopt.bench.measure.bootstrap_ratio``). Problems: digits-fcn (the
registry's, B = 32) and the MLP 784-512-512-10 on random data
(``ocnopt.bench.problems.random_mlp``, B = 256).

    python benchmarks/baseline_overhead.py --baseline c7932e0 --json baseline.json
    python benchmarks/baseline_overhead.py --baseline 377091c --after 8e427e3 --problems digits-fcn
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ocnopt
from ocnopt.bench.measure import bootstrap_ratio, environment, interleaved_times
from ocnopt.bench.problems import get_problem, load, random_mlp

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = {  # name: OCNOpt keyword arguments
    "adam order 1": dict(curvature="adam", lr=1e-3),
    "kfac order 1": dict(curvature="kfac", lr=3e-2),
    "lowrank-adam-fb": dict(curvature="adam", lr=1e-3, order=2, backend="lowrank"),
    "lowrank-kfac-fb": dict(curvature="kfac", lr=3e-2, order=2, backend="lowrank"),
}


def export_baseline(commit: str, folder: Path, package: str = "ocnopt_baseline") -> Any:
    """``ocnopt`` of ``commit`` as the importable package ``package``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "ocnopt", "backends"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    pkg = folder / package
    (folder / "ocnopt").rename(pkg)
    (folder / "backends").rename(pkg / "backends")
    for path in pkg.rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"\bocnopt\.", f"{package}.", text)
        text = re.sub(r"\bfrom ocnopt import\b", f"from {package} import", text)
        text = re.sub(r"\bimport ocnopt\b", f"import {package}", text)
        path.write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module(package)


def problems(seed: int) -> dict[str, tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]]:
    """digits-fcn at its batch (32; 8 batches of the fit split) and the MLP 784-512-512-10 on
    random data at batch 256 (its 4 batches)."""
    out = {}
    for problem, batch in ((get_problem("digits-fcn"), 32), (random_mlp(512, 256, seed), 256)):
        data = load(problem)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(data.y_fit), generator=g)[: batch * 8].split(batch)
        out[f"{problem.name} (B {batch})"] = (problem.model(seed),
                                              [(data.X_fit[i], data.y_fit[i]) for i in idx])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="commit to compare against")
    ap.add_argument("--after", default=None,
                    help="commit to measure instead of this working tree (exported the same way)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--problems", default="all", help="comma-separated subset of the problems")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        after = ocnopt if args.after is None else \
            export_baseline(args.after, Path(tmp), package="ocnopt_after")
        libs: dict[str, Any] = {"before": export_baseline(args.baseline, Path(tmp)), "after": after}
        runners: dict[tuple[str, str, str], dict[str, Any]] = {}
        for pname, (model, batches) in problems(0).items():
            if args.problems != "all" and not any(p in pname for p in args.problems.split(",")):
                continue
            for cname, kw in CONFIGS.items():
                for version, lib in libs.items():
                    runners[(pname, cname, version)] = {
                        "opt": lib.OCNOpt(copy.deepcopy(model), **kw), "batches": batches, "k": 0}

        def stepper(r: dict[str, Any]) -> Any:
            def one() -> None:
                x, y = r["batches"][r["k"] % len(r["batches"])]
                r["k"] += 1
                r["opt"].step(x, y)
            return one

        times = interleaved_times({"|".join(key): stepper(r) for key, r in runners.items()},
                                  args.warmup, args.rounds, args.block, seed=0)
        for key, r in runners.items():
            r["ns"] = times["|".join(key)]
    rows = []
    for (pname, cname, version), r in runners.items():
        if version != "after":
            continue
        before, after = runners[(pname, cname, "before")]["ns"], r["ns"]
        ratio, lo, hi = bootstrap_ratio(after, before)
        rows.append({"problem": pname, "optimizer": cname,
                     "before_ms": statistics.median(before) / 1e6,
                     "after_ms": statistics.median(after) / 1e6, "ratio": ratio,
                     "ci95": [lo, hi]})
    print(f"baseline {args.baseline} vs {args.after or 'working tree'}, {args.threads} "
          f"thread(s), {args.rounds} rounds x {args.block} steps, median step time")
    print(f"{'problem':28} {'optimizer':18} {'before ms':>10} {'after ms':>10} {'after/before':>13} "
          f"{'95% CI':>15}")
    for row in rows:
        lo, hi = row["ci95"]
        print(f"{row['problem']:28} {row['optimizer']:18} {row['before_ms']:10.3f} "
              f"{row['after_ms']:10.3f} {row['ratio']:13.3f}   [{lo:.3f}, {hi:.3f}]")
    if args.json is not None:
        args.json.write_text(json.dumps({"baseline": args.baseline, "after": args.after, "rows": rows,
                                         "settings": vars(args) | {"json": str(args.json)},
                                         "environment": environment()}, indent=2))


if __name__ == "__main__":
    main()
