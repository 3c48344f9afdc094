"""Measurement helpers shared by the harness (``ocnopt.bench.protocols``) and the benchmark
scripts (``benchmarks/``): the environment record of every result file, interleaved step
timing, the allocator's peak memory, peak RSS, quantiles, bootstrap intervals of ratios."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---- the environment record ---------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def source_state() -> dict[str, Any]:
    """The commit of the ocnopt checkout and its uncommitted changes to the library (ocnopt/,
    backends/), taken once, at the first call of the process: the code this process imported
    (a source tree edited later does not change a running process)."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", "ocnopt", "backends")
    dirty = None if status is None else sorted(
        line[3:] for line in status.splitlines() if line.strip() and not line.startswith("??"))
    return {"commit": commit.strip() if commit else None, "uncommitted_library_changes": dirty}


def environment() -> dict[str, Any]:
    """Library versions, the ocnopt commit, thread counts and the machine: the one environment
    record of every result file (no dates or load: those go to ``timing``, see ``loadavg``)."""
    import ocnopt

    versions: dict[str, str | None] = {"ocnopt": ocnopt.__version__,
                                       "python": platform.python_version(),
                                       "torch": torch.__version__}
    for dist in ("numpy", "scikit-learn", "mnist1d", "curvlinops-for-pytorch",
                 "backpack-for-pytorch", "matplotlib", "typer", "rich"):
        versions[dist] = _version(dist)
    return {
        "versions": versions,
        "ocnopt_git_commit": source_state()["commit"],
        "ocnopt_uncommitted": source_state()["uncommitted_library_changes"],
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "machine": {"platform": platform.platform(), "arch": platform.machine(),
                    "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                    "hostname": platform.node()},
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
    }


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``os.getloadavg``), None where unavailable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---- timing and memory ---------------------------------------------------------------------------
def interleaved_times(steps: Mapping[str, Callable[[], None]], warmup: int, rounds: int,
                      block: int, seed: int = 0, on_step: Callable[[int], None] | None = None,
                      clock: Callable[[], int] = time.perf_counter_ns) -> dict[str, list[int]]:
    """Nanoseconds of every timed call of each ``steps[name]()``: first ``warmup`` untimed calls
    of each, then ``rounds`` rounds in which each runs ``block`` consecutive timed calls, the
    order reshuffled every round (``random.Random(seed)``), so that drift of the machine
    (frequency, other load) hits all of them alike. A call's time is ``clock()`` after minus
    before: wall time by default (``time.perf_counter_ns``); ``time.thread_time_ns`` gives the
    calling thread's CPU time, which leaves out the time the thread waits while other processes
    run (on a shared machine), but also any time spent in other threads."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
            if on_step is not None:
                on_step(1)
    times: dict[str, list[int]] = {name: [] for name in steps}
    rng = random.Random(seed)
    order = list(steps)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn, out = steps[name], times[name]
            for _ in range(block):
                t0 = clock()
                fn()
                out.append(clock() - t0)
                if on_step is not None:
                    on_step(1)
    return times


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ logging writes there)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(run: Callable[[], None]) -> int | None:
    """Peak of live bytes handed out by torch's CPU allocator while ``run()`` executes, above
    what was live when it started (from ``torch.profiler`` memory events); None if the
    profiler cannot tell."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with _quiet_stderr(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                run()
            events = sorted((e.start_ns(), int(e.nbytes()))
                            for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    except Exception:  # noqa: BLE001 - any profiler failure: no number rather than a crash
        return None
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak if events else None


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> str:
    """Reset the peak-RSS mark (VmHWM) to the current RSS through ``/proc/self/clear_refs``, so
    that earlier set-up peaks drop out; returns the method ``peak_rss_kib`` will use (where the
    reset is not possible: ``ru_maxrss``, the peak over the process's whole life)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM after clear_refs=5"
    except OSError:
        return "ru_maxrss"


def peak_rss_kib(method: str) -> int | None:
    """Peak resident set size in KiB since ``reset_peak_rss`` (VmHWM), or ``ru_maxrss``."""
    if method.startswith("VmHWM"):
        return status_kib("VmHWM")
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def quantile(xs: Sequence[float], q: float) -> float:
    """The q-quantile of ``xs`` by linear interpolation between order statistics."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def bootstrap_ratio(a: Sequence[float], b: Sequence[float],
                    stat: Callable[[Sequence[float]], float] = statistics.median,
                    level: float = 0.95, resamples: int = 400, seed: int = 1
                    ) -> tuple[float, float, float]:
    """(stat(a) / stat(b), lower, upper): the ratio of a statistic (the median by default) of
    two independent samples and its percentile bootstrap interval at ``level``: a and b are
    resampled with replacement, each to its own size, ``resamples`` times
    (``random.Random(seed)``), and the interval is the (1 - level)/2 and (1 + level)/2
    quantiles of the resampled ratios stat(a*) / stat(b*)."""
    if not a or not b:
        raise ValueError(f"bootstrap_ratio needs two non-empty samples, got sizes {len(a)} and "
                         f"{len(b)}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    if resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    rng = random.Random(seed)
    ratios = [stat(rng.choices(a, k=len(a))) / stat(rng.choices(b, k=len(b)))
              for _ in range(resamples)]
    return (stat(a) / stat(b), quantile(ratios, (1 - level) / 2),
            quantile(ratios, (1 + level) / 2))
