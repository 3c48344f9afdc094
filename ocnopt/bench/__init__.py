"""Benchmark harness of ``ocnopt``: the problems, the optimizers and the protocols of the
benchmark protocol (train, sweep, overhead, time-to-target, report), driven by the ``ocnopt
bench`` command line (``ocnopt/cli.py``).

Needs the ``bench`` extra (scikit-learn, mnist1d, matplotlib, curvlinops): ``pip install
'ocnopt[bench]'``. The harness builds plain objects and calls the library like any user.
"""

from .optimizers import DEFAULT_SET, OptimizerSpec, all_names, lr_grid, parse_optimizer, select
from .problems import PROBLEMS, Dataset, Problem, get_problem, load
from .protocols import (
    RunSettings,
    overhead_protocol,
    read_results,
    sweep_protocol,
    sweep_summary,
    time_to_target,
    train_one,
    train_protocol,
    train_summary,
)

__all__ = [
    "DEFAULT_SET", "OptimizerSpec", "all_names", "lr_grid", "parse_optimizer", "select",
    "PROBLEMS", "Dataset", "Problem", "get_problem", "load", "RunSettings", "overhead_protocol",
    "read_results", "sweep_protocol", "sweep_summary", "time_to_target", "train_one",
    "train_protocol", "train_summary",
]
