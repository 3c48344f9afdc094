"""Profiler regions of an optimizer step (``torch.profiler.record_function``).

A step of ``OCNOpt`` is labelled in phases, so that ``torch.profiler.profile`` (and its
``key_averages()`` table) attributes the time and memory of a step to them:

* ``ocnopt.step``: the whole ``OCNOpt.step`` (checks, engine step, commit of the states);
* ``ocnopt.nominal``: the nominal forward pass (the states x_t, docs/method.md section 2);
* ``ocnopt.terminal``: the terminal cost and its derivatives at the output;
* ``ocnopt.backward``: the backward value recursion (order 1: backpropagation; order 2: the
  second-order pass with the policies, docs/method.md sections 3-4);
* ``ocnopt.curvature``: one player's curvature-model update and direction M^{-1} Qbar_u
  (nested in ``ocnopt.backward`` at order 2);
* ``ocnopt.update``: the update (order 1: u <- u + k; order 2: the update pass
  du = k + K dx replaying the graph).

A region costs a record only while a profiler records (``torch.autograd.profiler.
_is_profiler_enabled``, a module flag torch sets when a profiler starts); otherwise it is one
flag read, so an unprofiled step pays nothing measurable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ParamSpec, TypeVar

import torch.autograd.profiler as _profiler

P = ParamSpec("P")
R = TypeVar("R")

_OFF: AbstractContextManager[Any] = nullcontext()


def region(name: str) -> AbstractContextManager[Any]:
    """``torch.profiler.record_function(name)`` while a torch profiler records, else a shared
    no-op context."""
    if _profiler._is_profiler_enabled:
        return _profiler.record_function(name)
    return _OFF


def profiled(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: every call of the function runs in the profiler region ``name``."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            if _profiler._is_profiler_enabled:
                with _profiler.record_function(name):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)

        return inner

    return wrap


REGIONS = ("ocnopt.step", "ocnopt.nominal", "ocnopt.terminal", "ocnopt.backward",
           "ocnopt.curvature", "ocnopt.update")

__all__ = ["REGIONS", "profiled", "region"]
