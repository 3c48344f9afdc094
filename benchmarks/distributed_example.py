"""Data-parallel OCNOpt with torchrun (docs/distributed.md), for any model.

    torchrun --nproc_per_node 2 benchmarks/distributed_example.py --curvature kfac
    torchrun --nproc_per_node 2 benchmarks/distributed_example.py --order 2 --backend lowrank
    python benchmarks/distributed_example.py --threads 2          # one process, for comparison
    torchrun --nproc_per_node 4 benchmarks/distributed_example.py --model mypkg.nets:build

(``python -m torch.distributed.run`` where the ``torchrun`` script is not on the PATH.) Each
process builds the same model (the optimizer broadcasts rank 0's parameters anyway), draws the
same global batch and steps on its own shard of it: sharding the data is the user's job, the
optimizer all-reduces what the step needs (docs/method.md section 13). The backend is NCCL when
CUDA is available (one GPU per process, ``LOCAL_RANK``), gloo otherwise.

``--model``: ``mlp`` (784-512-512-10, ReLU, batches of random MNIST-shaped data), a problem of
``ocnopt bench list`` (its data), or ``module:function`` returning an ``nn.Module`` whose input
is (B, 784) and output 10 logits. Rank 0 prints one JSON line: the median step time, the
bytes the optimizer all-reduced and broadcast per step by what they carry (counted by its
``comm``, the setup broadcast excluded), and the parameter count.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from ocnopt import OCNOpt


def build(name: str, device: torch.device) -> tuple[nn.Module, torch.Tensor | None, torch.Tensor | None]:
    """(model, inputs, targets): the inputs None for random MNIST-shaped batches."""
    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                             nn.Linear(512, 10)).to(device), None, None
    if ":" in name:
        module, fn = name.split(":")
        return getattr(importlib.import_module(module), fn)().to(device), None, None
    from ocnopt.bench.problems import get_problem, load

    problem = get_problem(name)
    data = load(problem)
    return problem.model(0).to(device), data.X_fit.to(device), data.y_fit.to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--curvature", default="kfac")
    ap.add_argument("--order", type=int, default=1)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch", type=int, default=256, help="global batch size")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--inv-every", type=int, default=None, help="kfac/ekfac inv_every")
    ap.add_argument("--invert-everywhere", action="store_true",
                    help="every process inverts every K-FAC factor (no broadcast)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if world > 1:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0

    model, X, y = build(args.model, device)
    extra = {} if args.inv_every is None else {"inv_every": args.inv_every}
    opt = OCNOpt(model, curvature=args.curvature, order=args.order, backend=args.backend,
                 lr=args.lr, split_inversions=not args.invert_everywhere, **extra)
    gen = torch.Generator(device="cpu").manual_seed(1)
    times: list[float] = []
    opt.comm.reset_counts()  # the setup broadcast is not a step's
    for step in range(args.warmup + args.steps):
        if X is None:  # the same global batch on every process, then this rank's shard
            xb = torch.randn(args.batch, 784, generator=gen).to(device)
            yb = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
        else:
            assert y is not None  # a data set has both
            idx = torch.randint(0, len(X), (args.batch,), generator=gen).to(X.device)
            xb, yb = X[idx], y[idx]
        xs, ys = xb.tensor_split(world)[rank], yb.tensor_split(world)[rank]
        if step == args.warmup:
            opt.comm.reset_counts()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = opt.step(xs, ys)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        per_step = {k: v / args.steps for k, v in sorted(opt.comm.bytes_by_tag.items())}
        print(json.dumps({
            "processes": world, "threads": args.threads, "model": args.model,
            "curvature": args.curvature, "order": args.order, "backend": opt.backend_name,
            "global_batch": args.batch, "split_inversions": not args.invert_everywhere,
            "inv_every": args.inv_every, "median_step_s": statistics.median(times),
            "loss": float(loss), "parameters": params,
            "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "bytes_per_step": per_step, "bytes_per_step_total": sum(per_step.values())}))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
