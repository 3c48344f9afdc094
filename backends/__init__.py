"""Backends: who computes the derivatives of the Bellman expansion (docs/backends.md).

Installed as the subpackage ``ocnopt.backends``. Each backend implements the declared
contract ``base.Backend`` (nominal pass, value recursion, and the second-order interface) for
the steps of a graph (a chain is the special case).
"""

from __future__ import annotations

from .autograd import AutogradBackend, MemoryBudgetError
from .backpack import BackpackBackend
from .base import Backend
from .lowrank import LowRankBackend

BACKENDS: dict[str, type[Backend]] = {
    "autograd": AutogradBackend, "lowrank": LowRankBackend, "backpack": BackpackBackend,
}


def make_backend(name: str | Backend, **options: object) -> Backend:
    """A backend by name (``options`` go to its constructor), or a ``Backend`` instance."""
    if isinstance(name, Backend):
        return name
    if name in BACKENDS:
        return BACKENDS[name](**options)  # type: ignore[arg-type]
    raise ValueError(f"invalid backend={name!r}: accepted {sorted(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "AutogradBackend", "MemoryBudgetError", "LowRankBackend",
           "BackpackBackend", "make_backend"]
