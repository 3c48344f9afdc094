"""P processes x 1 thread against 1 process x P threads and 1 process x 1 thread
(docs/distributed.md): runs ``benchmarks/distributed_example.py`` under
``torch.distributed.run`` and alone, alternating the three over ``--rounds`` rounds (so drift
of a shared machine hits them alike), per mode, and prints per mode the median step times,
their ratios and the bytes per step the optimizer counted.

    python benchmarks/distributed_scaling.py --nproc 2 --rounds 3 --json scaling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = {  # name: arguments of distributed_example.py
    "kfac order 1": ["--curvature", "kfac", "--order", "1"],
    "lowrank-kfac-fb (order 2)": ["--curvature", "kfac", "--order", "2", "--backend", "lowrank"],
}


def run(nproc: int, threads: int, extra: list[str], port: int) -> dict:
    script = [str(HERE / "distributed_example.py"), "--threads", str(threads), *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port), *script]
    else:
        cmd = [sys.executable, *script]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results = []
    port = 29600
    for name in args.modes.split(","):
        extra = MODES[name] + ["--steps", str(args.steps), "--batch", str(args.batch)]
        runs: dict[str, list[dict]] = {"dist": [], "threads": [], "one": []}
        for _ in range(args.rounds):
            port += 1
            runs["dist"].append(run(args.nproc, 1, extra, port))
            runs["threads"].append(run(1, args.nproc, extra, port))
            runs["one"].append(run(1, 1, extra, port))
        d = statistics.median(r["median_step_s"] for r in runs["dist"])
        t = statistics.median(r["median_step_s"] for r in runs["threads"])
        o = statistics.median(r["median_step_s"] for r in runs["one"])
        row = {"mode": name, "nproc": args.nproc, "global_batch": args.batch,
               "step_s_processes": d, "step_s_threads": t, "step_s_one": o,
               "ratio_processes_over_threads": d / t, "ratio_processes_over_one": d / o,
               "parameters": runs["dist"][0]["parameters"],
               "parameter_bytes": runs["dist"][0]["parameter_bytes"],
               "bytes_per_step": runs["dist"][0]["bytes_per_step"],
               "bytes_per_step_total": runs["dist"][0]["bytes_per_step_total"],
               "all_step_s_processes": [r["median_step_s"] for r in runs["dist"]],
               "all_step_s_threads": [r["median_step_s"] for r in runs["threads"]],
               "all_step_s_one": [r["median_step_s"] for r in runs["one"]]}
        results.append(row)
        print(f"{name}: {args.nproc} processes x 1 thread {d * 1e3:.0f} ms/step, 1 process x "
              f"{args.nproc} threads {t * 1e3:.0f} ms/step (ratio {d / t:.2f}), 1 process x 1 "
              f"thread {o * 1e3:.0f} ms/step (ratio {d / o:.2f}); "
              f"{row['bytes_per_step_total'] / 1e6:.2f} MB/step communicated "
              f"({row['bytes_per_step_total'] / row['parameter_bytes']:.2f} x the parameters' "
              f"{row['parameter_bytes'] / 1e6:.2f} MB): {row['bytes_per_step']}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
