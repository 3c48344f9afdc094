"""Data-parallel runs (docs/method.md section 13): one spawn of P processes
(gloo, file:// rendezvous) runs every configuration of ``CASES`` on its shard of each global
batch and saves, per rank, the parameters, the optimizer state and the losses; ``run_case``
with ``shards=None`` is the single-process reference on the whole batch."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

D = torch.float64
GLOBAL_BATCH = 10
#: uneven shards of the global batch of 10 per world size
SHARDS = {1: [10], 2: [3, 7], 3: [2, 5, 3]}


def mlp(seed: int = 0, hidden: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(D)


def batchnorm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(D)


def square(seed: int = 0) -> nn.Module:
    """4 x 4 weights: full-rank gradients, so Shampoo's factors have distinct eigenvalues
    (SOAP's bases are otherwise not determined by the numbers to rounding)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).to(D)


def wide(seed: int = 0) -> nn.Module:
    """A 20 x 20 middle layer: with B = 10, K-FAC's direction comes from the rows."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(),
                         nn.Linear(20, 3)).to(D)


def residual(seed: int = 0) -> nn.Module:
    from _graphs import Residual

    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), Residual()).to(D)


def ode(seed: int = 0) -> nn.Module:
    from ocnopt.ode import ODEBlock

    class Field(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 4)

        def forward(self, t: Tensor, x: Tensor) -> Tensor:
            return self.l2(torch.tanh(self.l1(x)))

    torch.manual_seed(seed)
    return nn.Sequential(ODEBlock(Field(), method="rk4", options={"step_size": 0.25},
                                  grid_step=0.25), nn.Linear(4, 3)).to(D)


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "square": square, "wide": wide,
                                              "residual": residual, "ode": ode,
                                              "batchnorm": batchnorm}

#: name -> (model, OCNOpt keyword arguments)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "o1-sgd": ("mlp", dict(curvature="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2)),
    "o1-rmsprop": ("mlp", dict(curvature="rmsprop", lr=1e-2)),
    "o1-adam": ("mlp", dict(curvature="adam", lr=1e-2, max_grad_norm=0.5)),
    "o1-adamw": ("mlp", dict(curvature="adamw", lr=1e-2)),
    "o1-adam-ddp": ("mlp", dict(curvature="adam", lr=1e-2)),  # the model wrapped in DDP
    "o1-kfac": ("mlp", dict(curvature="kfac", lr=0.1, inv_every=2, weight_decay=1e-3)),
    "o1-kfac-everywhere": ("mlp", dict(curvature="kfac", lr=0.1, inv_every=2,
                                       weight_decay=1e-3, split_inversions=False)),
    "o1-kfac-rows": ("wide", dict(curvature="kfac", lr=0.1, set_grad=False)),
    "o1-kfac-type2": ("mlp", dict(curvature="kfac", lr=0.1, fisher_type="type-2")),
    "o1-ekfac": ("mlp", dict(curvature="ekfac", lr=0.1, inv_every=2)),
    "o1-ekfac-everywhere": ("mlp", dict(curvature="ekfac", lr=0.1, inv_every=2,
                                        split_inversions=False)),
    "o1-full": ("mlp", dict(curvature="full", lr=0.5, damping=0.1)),
    # SOAP's power iteration runs a QR in float32: every precondition_frequency steps the
    # bases move by float32 rounding, so it is kept out of the 3 steps here
    "o1-soap": ("square", dict(curvature="soap", lr=1e-2, precondition_frequency=10)),
    "o1-shampoo": ("mlp", dict(curvature="shampoo", lr=1e-2)),
    "o1-kfac-backpack": ("mlp", dict(curvature="kfac", lr=0.1, backend="backpack")),
    "o1-residual-adam": ("residual", dict(curvature="adam", lr=1e-2)),
    "o1-residual-kfac": ("residual", dict(curvature="kfac", lr=0.1)),
    "o1-ode-adam": ("ode", dict(curvature="adam", lr=1e-2)),
    # K-FAC / EKFAC of the layers inside the field on the block's time grid
    "o1-ode-kfac": ("ode", dict(curvature="kfac", lr=0.1)),
    "o1-ode-ekfac": ("ode", dict(curvature="ekfac", lr=0.1)),
    "o2-lowrank-kfac": ("mlp", dict(curvature="kfac", lr=0.1, order=2, backend="lowrank",
                                    track_loss_after=True)),
    "o2-lowrank-kfac-exact": ("mlp", dict(curvature="kfac", lr=0.1, order=2, backend="lowrank",
                                          backend_options={"terminal": "exact"},
                                          fisher_type="type-2")),
    "o2-lowrank-kfac-rows": ("wide", dict(curvature="kfac", lr=0.1, order=2, backend="lowrank",
                                          set_grad=False)),
    "o2-lowrank-ekfac": ("mlp", dict(curvature="ekfac", lr=0.1, order=2, backend="lowrank")),
    "o2-lowrank-adam": ("mlp", dict(curvature="adam", lr=1e-2, order=2, backend="lowrank")),
    "o2-autograd-full": ("mlp", dict(curvature="full", lr=0.5, order=2, backend="autograd",
                                     damping=0.1)),
    "o2-autograd-kfac": ("mlp", dict(curvature="kfac", lr=0.1, order=2, backend="autograd")),
    "o2-backpack-kfac": ("mlp", dict(curvature="kfac", lr=0.1, order=2, backend="backpack")),
    "o2-residual-lowrank-kfac": ("residual", dict(curvature="kfac", lr=0.1, order=2,
                                                  backend="lowrank")),
    "o2-ode-lowrank-adam": ("ode", dict(curvature="adam", lr=1e-2, order=2, backend="lowrank")),
    "o2-ode-lowrank-ekfac": ("ode", dict(curvature="ekfac", lr=0.1, order=2, backend="lowrank")),
    # BatchNorm normalises each shard by its own statistics: not one process's result, but the
    # same parameters, state and (rank 0's) running statistics on every process
    "shardwise-batchnorm-kfac": ("batchnorm", dict(curvature="kfac", lr=0.1)),
    # a non-finite input in the last sample of the global batch at step 1 (on the last rank)
    "nonfinite-o1-kfac": ("mlp", dict(curvature="kfac", lr=0.1)),
    "nonfinite-o2-lowrank-kfac": ("mlp", dict(curvature="kfac", lr=0.1, order=2,
                                              backend="lowrank")),
}
STEPS = 3


def batches(steps: int, nonfinite: bool = False) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = [(torch.randn(GLOBAL_BATCH, 4, generator=g, dtype=D),
            torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)) for _ in range(steps)]
    if nonfinite:
        out[1][0][-1, 0] = float("nan")
    return out


def shard(x: Tensor, sizes: list[int], rank: int) -> Tensor:
    lo = sum(sizes[:rank])
    return x[lo:lo + sizes[rank]]


def flat_state(opt: Any) -> list[Tensor]:
    """Every tensor of the optimizer state, in parameter order and key order."""
    out = []
    for p in opt.param_groups[0]["params"]:
        st = opt.state.get(p, {})
        for k in sorted(st):
            if isinstance(st[k], Tensor):
                out.append(st[k].detach().clone())
    return out


def run_case(name: str, sizes: list[int] | None, rank: int = 0, steps: int = STEPS,
             start: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train case ``name`` for ``steps`` steps: on one process (``sizes`` None, the whole
    batch) or on shard ``rank`` of ``sizes``; ``start``: a checkpoint to resume from (and the
    steps already done, to take the next batches)."""
    import warnings

    from ocnopt import OCNOpt

    model_name, kw = CASES[name]
    model = MODELS[model_name]()
    kw = dict(kw)
    if sizes is None:
        kw["process_group"] = False
    wrapped = model
    if sizes is not None and name.endswith("-ddp"):
        wrapped = nn.parallel.DistributedDataParallel(model)
    opt = OCNOpt(wrapped, **kw)
    done = 0
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["opt"])
        done = start["done"]
    data = batches(done + steps, nonfinite=name.startswith("nonfinite"))[done:]
    losses, snapshots = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, y in data:
            if sizes is not None:
                x, y = shard(x, sizes, rank), shard(y, sizes, rank)
            before = [p.detach().clone() for p in model.parameters()]
            losses.append(float(opt.step(x, y)))
            after = opt.last_step
            snapshots.append({"skipped": after.skipped,
                              "unchanged": all(torch.equal(a, p) for a, p in
                                               zip(before, model.parameters())),
                              "loss_after": after.loss_after,
                              "predicted": after.predicted_change})
    return {"params": [p.detach().clone() for p in model.parameters()],
            "buffers": [b.detach().clone() for b in model.buffers()],
            "state": flat_state(opt), "losses": losses, "steps": snapshots,
            "skipped": opt.skipped_steps, "step_count": opt.step_count,
            "bytes": dict(opt.comm.bytes_by_tag), "calls": dict(opt.comm.calls_by_tag),
            "param_bytes":
                sum(p.numel() * p.element_size() for p in model.parameters()),
            "checkpoint": {"model": model.state_dict(), "opt": opt.state_dict()}}


def worker(rank: int, world: int, init: str, names: list[str], out_dir: str,
           resume: str | None) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results = {}
        for name in names:
            results[name] = run_case(name, SHARDS[world], rank)
            if rank == 0 and name == "o1-kfac":  # the checkpoint of rank 0 (after STEPS steps)
                torch.save({**results[name]["checkpoint"], "done": STEPS},
                           os.path.join(out_dir, f"checkpoint-{world}.pt"))
        if resume is not None:  # resume a checkpoint saved with another number of processes
            start = torch.load(resume, weights_only=False)
            results["resume"] = run_case("o1-kfac", SHARDS[world], rank, start=start)
        for r in results.values():
            r.pop("checkpoint")
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(world: int, names: list[str], out_dir: str, resume: str | None = None
          ) -> list[dict[str, Any]]:
    """Run ``names`` on ``world`` processes; the results of every rank."""
    import torch.multiprocessing as mp

    os.makedirs(out_dir, exist_ok=True)
    init = "file://" + os.path.join(out_dir, "rendezvous")
    mp.spawn(worker, args=(world, init, names, out_dir, resume), nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world)]
