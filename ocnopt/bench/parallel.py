"""``ocnopt bench run|sweep ... --nproc P``: the data-parallel run of a protocol (docs/distributed.md).

The invoking process is rank 0 (it shows the progress and writes the results); ranks 1..P-1
are spawned processes that rebuild the same problem, data and optimizers from the invocation's
arguments (``Job``) before joining the process group (gloo on CPU, NCCL when the problem runs on
CUDA). Every rank runs the same protocol; an optimizer's stepper is wrapped in
``ShardedStepper``, which hands the optimizer this rank's contiguous shard of each minibatch
(``Tensor.tensor_split``: shards of sizes differing by at most one). ``ocnopt.OCNOpt`` finds the
process group itself (``process_group=None``) and all-reduces the batch means, so the run
equals the single-process run up to float rounding. Only ocnopt optimizers run data-parallel.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .optimizers import OptimizerSpec

#: how long a process waits for the others in one collective before the run fails
TIMEOUT = timedelta(minutes=10)


class ShardedStepper:
    """A stepper that steps on shard ``rank`` of ``world`` of each minibatch."""

    def __init__(self, stepper: Any, rank: int, world: int):
        self.stepper, self.rank, self.world = stepper, rank, world

    @property
    def skipped(self) -> int:
        return int(self.stepper.skipped)

    def step(self, inputs: Tensor, targets: Tensor) -> float:
        if len(inputs) < self.world:
            raise ValueError(f"a minibatch of {len(inputs)} samples cannot be split over "
                             f"--nproc {self.world} processes: use a batch size (and a data set "
                             "size modulo the batch size) of at least --nproc")
        return float(self.stepper.step(inputs.tensor_split(self.world)[self.rank],
                                       targets.tensor_split(self.world)[self.rank]))


def shard_specs(specs: Sequence[OptimizerSpec], rank: int, world: int) -> list[OptimizerSpec]:
    """The specs with their steppers wrapped in ``ShardedStepper`` (recorded: ``nproc``)."""

    def wrap(spec: OptimizerSpec) -> OptimizerSpec:
        factory = spec.factory

        def make(model: Any, loss: str, lr: float, seed: int) -> Any:
            return ShardedStepper(factory(model, loss, lr, seed), rank, world)

        return dataclasses.replace(spec, factory=make, nproc=world)

    return [wrap(s) for s in specs]


def refuse_non_ocnopt(specs: Sequence[OptimizerSpec], world: int) -> None:
    """ValueError naming the optimizers that cannot run data-parallel (not ocnopt's)."""
    others = [s.name for s in specs if s.family != "ocnopt"]
    if world > 1 and others:
        raise ValueError(f"--nproc {world} runs ocnopt optimizers only (OCNOpt all-reduces its "
                         f"own batch means); not: {', '.join(others)}; pick ocnopt modes with "
                         "--optimizers or use --nproc 1")


@dataclass
class Job:
    """What a spawned rank needs to rebuild the invocation: problem, data, optimizers, the
    protocol's settings and learning rates, and the thread count."""

    problem: str
    optimizers: list[str] | None
    hp: dict[str, dict[str, Any]]
    settings: Any
    lrs: dict[str, tuple[float, str]] | None
    threads: int
    protocol: str = "train"  # or "sweep" (with its grid: ``points``, ``decades``)
    points: int = 0
    decades: float = 0.0


def _rebuild(job: Job) -> tuple[Any, Any, list[OptimizerSpec]]:
    from .optimizers import select
    from .problems import PROBLEMS, load

    problem = PROBLEMS[job.problem]
    data = load(problem, job.settings.split_seed, job.settings.subset)
    return problem, data, select(problem, job.optimizers, job.hp)


def backend_for(device: torch.device) -> str:
    """The process-group backend for data on ``device``: NCCL on CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def _worker(rank: int, world: int, init: str, backend: str, job: Job) -> None:
    """Rank ``rank`` >= 1: the same protocol on its shards; its results are thrown away."""
    import torch.distributed as dist

    from .protocols import sweep_protocol, train_protocol

    torch.set_num_threads(job.threads)
    problem, data, specs = _rebuild(job)  # before the group: no collective yet
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        with tempfile.TemporaryDirectory() as out:
            sharded = shard_specs(specs, rank, world)
            if job.protocol == "sweep":
                sweep_protocol(problem, data, sharded, job.settings, Path(out), job.points,
                               job.decades)
            else:
                train_protocol(problem, data, sharded, job.settings, Path(out), job.lrs)
    finally:
        dist.destroy_process_group()


def run_data_parallel(world: int, job: Job, specs: Sequence[OptimizerSpec],
                      run: Callable[[list[OptimizerSpec]], Any],
                      device: torch.device | None = None) -> Any:
    """Spawn ranks 1..world-1, join the group as rank 0 and ``run(sharded specs)`` here;
    returns what ``run`` returns. The spawned processes are ended if rank 0 fails."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "rendezvous")
        backend = backend_for(device or torch.device("cpu"))
        procs = [ctx.Process(target=_worker, args=(r, world, init, backend, job), daemon=True)
                 for r in range(1, world)]
        for p in procs:
            p.start()
        ok = False
        try:
            dist.init_process_group(backend, init_method=init, rank=0, world_size=world,
                                    timeout=TIMEOUT)
            try:
                out = run(shard_specs(specs, 0, world))
            finally:
                dist.destroy_process_group()
            ok = True
        finally:
            for p in procs:
                p.join(timeout=None if ok else 5)
                if p.is_alive():
                    p.terminate()
                    p.join()
        failed = [p.exitcode for p in procs if p.exitcode]
        if failed:
            raise RuntimeError(f"--nproc {world}: a spawned process exited with code "
                               f"{failed[0]}")
    return out


__all__ = ["ShardedStepper", "shard_specs", "refuse_non_ocnopt", "Job", "run_data_parallel"]
