"""The three backends on one model: a worked example for docs/backends.md.

digits-fcn (scikit-learn digits, 5 Linear layers of width 32, Tanh; the benchmark protocol's
splits) trained for a few epochs at order 2 with feedback and the SAME curvature model (kfac,
damping 0.1, lr 0.03) by each backend, from the same initial weights and minibatches:

- ``autograd``: exact per-sample value Hessians (vanilla DDP with a K-FAC Q_uu);
- ``lowrank``: V_xx = Z Z^T, rank 1 (empirical terminal factor) and full rank ("exact");
- ``backpack``: Kronecker factors from BackPACK's KFLR, rank-1 value-gradient feedback.

Order 1 (plain K-FAC, backprop) is the reference row. Prints final training loss, validation
accuracy and the median time per step. Run: python benchmarks/backends_example.py (about 5 min
on 2 cores, most of it the exact backend's 0.6 s steps).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import ocnopt
from ocnopt.bench.problems import get_problem, load

EPOCHS, BATCH, SEED, THREADS = 3, 32, 0, 2
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("order 1 (K-FAC)", dict(order=1)),
    ("autograd (exact)", dict(order=2, backend="autograd")),
    ("lowrank r=1", dict(order=2, backend="lowrank")),
    ("lowrank r=10 exact", dict(order=2, backend="lowrank", backend_options={"terminal": "exact"},
                                fisher_type="type-2")),
    ("backpack KFLR", dict(order=2, backend="backpack")),
]


def main() -> None:
    torch.set_num_threads(THREADS)
    problem = get_problem("digits-fcn")
    data = load(problem)
    g = torch.Generator().manual_seed(SEED)
    batches = [perm.split(BATCH) for perm in
               (torch.randperm(len(data.y_fit), generator=g) for _ in range(EPOCHS))]
    table = Table(title=f"digits-fcn, kfac curvature, {EPOCHS} epochs, batch {BATCH}, "
                        f"{THREADS} threads")
    for col in ("configuration", "train loss", "val acc", "ms / step"):
        table.add_column(col, justify="right" if col != "configuration" else "left")
    for label, kw in CONFIGS:
        model = problem.model(SEED)
        opt = ocnopt.OCNOpt(model, curvature="kfac", lr=0.03, damping=0.1, **kw)
        times = []
        for epoch in batches:
            for idx in epoch:
                t0 = time.perf_counter()
                opt.step(data.X_fit[idx], data.y_fit[idx])
                times.append(time.perf_counter() - t0)
        with torch.no_grad():
            out = model(data.X_fit)
            loss = float(torch.nn.functional.cross_entropy(out, data.y_fit))
            acc = float((model(data.X_val).argmax(1) == data.y_val).float().mean())
        table.add_row(label, f"{loss:.4f}", f"{100 * acc:.1f}%",
                      f"{1e3 * statistics.median(times[5:]):.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
