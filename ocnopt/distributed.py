"""Data-parallel communication of ``OCNOpt`` (docs/method.md section 13, docs/distributed.md).

P processes hold the same parameters and each a shard of the global batch, B = sum_p B_p.
Per-sample quantities (Q_x, V_x, the V_xx factors, dx) stay on their process; every batch
mean is made global here:

    mean:  m = sum_p (B_p / B) m_p          (m_p the mean over the shard of process p)
    sum:   s = sum_p s_p                    (s_p already divided by the global B)

by one SUM all-reduce per call, the call's tensors flattened into one buffer per dtype (as
DistributedDataParallel's buckets). What is reduced, and where (the hooks): the local batch
size and the loss (``Collective.begin``: the global B, and a non-finite loss on any process
skips the step on all), Qbar_u (engine, after the backward pass), the curvature statistics
(K-FAC's A and G, EKFAC's eigenbasis scales, the full model's E[Q_uu]: ``curvature/``), the
predicted change, the feedback sums (1/B) sum_i Q_uX^(i) dX^(i) of the update pass, and the
loss after the step. Factor inversions may be split across processes (stage t on rank
t % P) and broadcast (``owner``, ``broadcast``).

``Collective`` is the single-process object: every method returns its input unchanged, so
the single-process path pays nothing. ``ProcessGroupCollective`` does the communication over a
``torch.distributed`` process group (any backend: gloo on CPU, NCCL on GPU) and counts the
payload bytes it all-reduces and broadcasts, by what they carry (``bytes_by_tag``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor


class Collective:
    """One process: the identity (no process group). ``active`` is False; ``begin`` returns the
    local batch size and loss; ``mean``, ``sum`` and ``broadcast`` return their input."""

    active = False
    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.bytes_by_tag: dict[str, int] = defaultdict(int)
        self.calls_by_tag: dict[str, int] = defaultdict(int)
        #: B of the current step (set by ``begin``; None before the first step)
        self.global_batch: int | None = None
        self.local_batch: int | None = None

    # -- the step's batch ---------------------------------------------------------------------
    def begin(self, local_batch: int, loss: Tensor) -> tuple[int, Tensor]:
        """(B, the mean loss over the global batch) from this process's (B_p, mean loss)."""
        return local_batch, loss

    def total(self, local_batch: int) -> int:
        """The global batch size of the current step (the local one before ``begin``)."""
        return local_batch if self.global_batch is None or not self.active else self.global_batch

    # -- reductions -----------------------------------------------------------------------------
    def mean(self, tensors: Sequence[Tensor], tag: str = "other") -> Sequence[Tensor]:
        """Local batch means -> global batch means: sum_p (B_p / B) m_p."""
        return tensors

    def sum(self, tensors: Sequence[Tensor], tag: str = "other") -> Sequence[Tensor]:
        """sum_p s_p (terms already divided by the global B)."""
        return tensors

    def mean_symmetric(self, matrices: Sequence[Tensor], tag: str = "other") -> Sequence[Tensor]:
        """``mean`` of symmetric (d, d) matrices, communicating their upper triangles only
        (d (d + 1) / 2 entries each); the results are exactly symmetric."""
        return matrices

    def broadcast(self, tensors: Sequence[Tensor], src: int, tag: str = "other") -> Sequence[Tensor]:
        """The tensors of rank ``src`` on every rank (same shapes and dtypes everywhere)."""
        return tensors

    def broadcast_async(self, tensors: Sequence[Tensor], src: int, tag: str = "other"
                        ) -> Callable[[], list[Tensor]]:
        """Start ``broadcast``; the returned function waits for it and returns its result.
        Calls are matched in the order they are started on every process."""
        return lambda: list(tensors)

    def owner(self, index: int) -> int:
        """The rank that computes the factor inversions of stage ``index``: index % P."""
        return index % self.world_size

    # -- the byte counter ----------------------------------------------------------------------
    @property
    def bytes_total(self) -> int:
        """Payload bytes all-reduced and broadcast since the last ``reset_counts``."""
        return sum(self.bytes_by_tag.values())

    def reset_counts(self) -> None:
        self.bytes_by_tag.clear()
        self.calls_by_tag.clear()


def _buckets(tensors: Sequence[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    """Positions of the tensors by (dtype, device): one flat buffer per bucket."""
    out: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.dtype, t.device), []).append(i)
    return out


class ProcessGroupCollective(Collective):
    """The communication of ``Collective`` over a ``torch.distributed`` process group.

    Every call is a collective: all processes must make the same calls in the same order with
    tensors of the same shapes (the engine guarantees it: its decisions depend on global
    quantities only)."""

    active = True

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ProcessGroupCollective needs torch.distributed initialised "
                               "(torch.distributed.init_process_group, or launch with torchrun)")
        super().__init__()
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def _count(self, tag: str, tensors: Sequence[Tensor]) -> None:
        self.bytes_by_tag[tag] += sum(t.numel() * t.element_size() for t in tensors)
        self.calls_by_tag[tag] += 1

    def begin(self, local_batch: int, loss: Tensor) -> tuple[int, Tensor]:
        """One all-reduce of (B_p, B_p * loss_p) in float64: B and the global mean loss (NaN
        on every process when the loss of any is not finite)."""
        loss_d = loss.detach()
        buf = torch.stack([torch.tensor(float(local_batch), dtype=torch.float64,
                                        device=loss_d.device),
                           loss_d.to(torch.float64) * local_batch])
        self._count("batch and loss", [buf])
        self.dist.all_reduce(buf, group=self.group)
        B = int(round(float(buf[0])))
        self.local_batch, self.global_batch = local_batch, B
        return B, (buf[1] / B).to(loss_d.dtype)

    def _reduce(self, tensors: Sequence[Tensor], scale: float | None, tag: str) -> list[Tensor]:
        out: list[Tensor] = list(tensors)
        for idx in _buckets(tensors).values():
            parts = [tensors[i].detach().reshape(-1) for i in idx]
            flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
            if scale is not None:
                flat.mul_(scale)
            self._count(tag, [flat])
            self.dist.all_reduce(flat, group=self.group)
            for i, piece in zip(idx, flat.split([p.numel() for p in parts])):
                out[i] = piece.view(tensors[i].shape)
        return out

    def mean(self, tensors: Sequence[Tensor], tag: str = "other") -> list[Tensor]:
        if self.global_batch is None or self.local_batch is None:
            raise RuntimeError("Collective.mean before begin(): the global batch is not known")
        return self._reduce(tensors, self.local_batch / self.global_batch, tag)

    def sum(self, tensors: Sequence[Tensor], tag: str = "other") -> list[Tensor]:
        return self._reduce(tensors, None, tag)

    def mean_symmetric(self, matrices: Sequence[Tensor], tag: str = "other") -> list[Tensor]:
        upper = [torch.triu_indices(M.shape[0], M.shape[0], device=M.device) for M in matrices]
        packed = self.mean([M[i, j] for M, (i, j) in zip(matrices, upper)], tag=tag)
        out = []
        for M, (i, j), v in zip(matrices, upper, packed):
            S = M.new_empty(M.shape)
            S[i, j] = v
            S[j, i] = v
            out.append(S)
        return out

    def broadcast(self, tensors: Sequence[Tensor], src: int, tag: str = "other") -> list[Tensor]:
        out: list[Tensor] = list(tensors)
        for idx in _buckets(tensors).values():
            parts = [tensors[i].detach().reshape(-1) for i in idx]
            flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
            self._count(tag, [flat])
            self.dist.broadcast(flat, src=self._global_rank(src), group=self.group)
            for i, piece in zip(idx, flat.split([p.numel() for p in parts])):
                out[i] = piece.view(tensors[i].shape)
        return out

    def broadcast_async(self, tensors: Sequence[Tensor], src: int, tag: str = "other"
                        ) -> Callable[[], list[Tensor]]:
        out: list[Tensor] = list(tensors)
        started = []
        for idx in _buckets(tensors).values():
            parts = [tensors[i].detach().reshape(-1) for i in idx]
            flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
            self._count(tag, [flat])
            work = self.dist.broadcast(flat, src=self._global_rank(src), group=self.group,
                                       async_op=True)
            started.append((idx, parts, flat, work))

        def wait() -> list[Tensor]:
            for idx, parts, flat, work in started:
                assert work is not None  # async_op=True returns the work
                work.wait()
                for i, piece in zip(idx, flat.split([p.numel() for p in parts])):
                    out[i] = piece.view(tensors[i].shape)
            return out

        return wait

    def _global_rank(self, rank: int) -> int:
        if self.group is None:
            return rank
        return self.dist.get_global_rank(self.group, rank)


def make_collective(process_group: Any) -> Collective:
    """``OCNOpt(process_group=...)``: None, the default group when torch.distributed is
    initialised with more than one process (else one process); False, one process whatever
    torch.distributed says; a ``ProcessGroup``, that group."""
    import torch.distributed as dist

    if process_group is False:
        return Collective()
    if process_group is None or process_group is True:
        if not (dist.is_available() and dist.is_initialized()):
            if process_group is True:
                raise ValueError("invalid process_group=True: torch.distributed is not "
                                 "initialised (call init_process_group or launch with torchrun)")
            return Collective()
        if dist.get_world_size() == 1:
            return Collective()
        return ProcessGroupCollective(None)
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"invalid process_group={process_group!r}: torch.distributed is not "
                         "initialised")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"invalid process_group={process_group!r}: accepted None (the default "
                        "group when torch.distributed is initialised), False (one process) or a "
                        "torch.distributed.ProcessGroup")
    return ProcessGroupCollective(process_group)


#: the single-process collective, shared by every object that has none of its own
NO_COMM = Collective()

__all__ = ["Collective", "ProcessGroupCollective", "make_collective", "NO_COMM"]
