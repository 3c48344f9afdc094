"""Benchmark harness of ``ocnopt``: the problems, the optimizers and the protocols of the
benchmark protocol (train, sweep, overhead, time-to-target, report), driven by the ``ocnopt
bench`` command line (``ocnopt/cli.py``).

Needs the ``bench`` extra (scikit-learn, mnist1d, matplotlib, curvlinops, pytorch-optimizer):
``pip install 'ocnopt[bench]'``; a missing one is named with that hint (``deps.require``). The
harness builds plain objects and calls the library like any user.
"""

from .optimizers import (
    DEFAULT_SET,
    OptimizerSpec,
    accepted_hyper,
    all_names,
    hp_label,
    lr_grid,
    parse_hp,
    parse_optimizer,
    resolve_hp,
    select,
)
from .problems import PROBLEMS, Dataset, Problem, get_problem, load
from .protocols import (
    RunSettings,
    configuration,
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
    "DEFAULT_SET", "OptimizerSpec", "accepted_hyper", "all_names", "hp_label", "lr_grid",
    "parse_hp", "parse_optimizer", "resolve_hp", "select", "configuration",
    "PROBLEMS", "Dataset", "Problem", "get_problem", "load", "RunSettings", "overhead_protocol",
    "read_results", "sweep_protocol", "sweep_summary", "time_to_target", "train_one",
    "train_protocol", "train_summary",
]
