"""Measurement helpers shared by the harness and the benchmark scripts."""

from __future__ import annotations

import platform
import resource
from collections.abc import Sequence
from typing import Any


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


def allocator_peak(prof: Any, mark: str) -> tuple[int, int | None, int]:
    """Replay the CPU allocation events of a ``torch.profiler`` run (``profile_memory=True``):
    (peak live bytes, live bytes when the ``record_function(mark)`` region began (None if the
    marker is missing), number of memory events)."""
    events, start = [], None
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"):
            events.append((e.start_ns(), int(e.nbytes())))
        elif e.name() == mark:
            start = e.start_ns()
    events.sort()
    live, peak, base = 0, 0, None
    for t, nb in events:
        if base is None and start is not None and t >= start:
            base = live
        live += nb
        peak = max(peak, live)
    return peak, base, len(events)


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
