"""Peak-RSS helpers of ocnopt.bench.measure (used by the benchmark scripts)."""

from __future__ import annotations

import sys

import pytest
import torch

from ocnopt.bench.measure import peak_rss_kib, reset_peak_rss, status_kib


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self is Linux's")
def test_peak_rss_after_reset_sees_a_new_allocation_and_not_an_older_peak():
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del big
    method = reset_peak_rss()
    rss0 = status_kib("VmRSS")
    assert rss0 is not None and method.startswith("VmHWM")
    peak_before = peak_rss_kib(method)
    assert peak_before is not None and peak_before - rss0 < 32 * 1024  # the 64 MiB dropped out
    new = torch.ones(48 * 2**20 // 4)  # 48 MiB, touched
    peak = peak_rss_kib(method)
    assert peak is not None and peak - rss0 >= 40 * 1024
    assert peak_rss_kib("ru_maxrss") >= peak - 1024  # whole-life peak (updated lazily)
    del new


def test_status_kib_of_an_unknown_field_is_none():
    assert status_kib("NoSuchField") is None


def test_interleaved_times_counts_and_order() -> None:
    """Every step gets warmup untimed then rounds x block timed calls, run in blocks, in an
    order reshuffled every round from the seed (the same seed, the same sequence)."""
    from ocnopt.bench.measure import interleaved_times

    def sequence(seed: int) -> tuple[list[str], dict[str, list[int]]]:
        calls: list[str] = []
        steps = {n: (lambda n=n: calls.append(n)) for n in "abc"}
        return calls, interleaved_times(steps, warmup=2, rounds=6, block=3, seed=seed)

    calls, times = sequence(0)
    assert {n: len(t) for n, t in times.items()} == {"a": 18, "b": 18, "c": 18}
    assert all(t >= 0 for ts in times.values() for t in ts)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, in the given order
    timed = calls[6:]
    blocks = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert all(len(set(b)) == 1 for b in blocks)  # block consecutive calls
    rounds = [tuple(b[0] for b in blocks[i:i + 3]) for i in range(0, len(blocks), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds) and len(set(rounds)) > 1
    assert sequence(0)[0] == calls and sequence(1)[0] != calls
