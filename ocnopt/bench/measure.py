"""Measurement helpers shared by the harness and the benchmark scripts."""

from __future__ import annotations

import platform
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
