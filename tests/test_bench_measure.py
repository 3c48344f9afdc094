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


def test_interleaved_times_reads_the_given_clock() -> None:
    """A call's time is clock() after minus before: a clock advancing by 7 per reading gives 7
    for every timed call (and the warm-up calls are not read), the default wall clock sees a
    sleep that the thread's CPU time (time.thread_time_ns) does not."""
    import itertools
    import time

    from ocnopt.bench.measure import interleaved_times

    ticks = itertools.count(0, 7)
    readings: list[int] = []

    def fake() -> int:
        readings.append(next(ticks))
        return readings[-1]

    times = interleaved_times({"a": lambda: None, "b": lambda: None}, warmup=3, rounds=2,
                              block=4, clock=fake)
    assert times == {"a": [7] * 8, "b": [7] * 8} and len(readings) == 2 * 16

    def nap() -> None:
        time.sleep(0.02)

    wall = interleaved_times({"s": nap}, warmup=0, rounds=1, block=2)["s"]
    cpu = interleaved_times({"s": nap}, warmup=0, rounds=1, block=2, clock=time.thread_time_ns)["s"]
    assert min(wall) >= 20_000_000 and max(cpu) < 10_000_000


def test_bootstrap_ratio_against_exact_cases_and_its_errors() -> None:
    """Constant samples: the ratio and both ends are exact; samples of a = 2 b (shuffled,
    resampled independently): the point estimate is 2 and the interval holds it; the statistic
    is a parameter (the mean of a constant pair); bad input names the argument."""
    import random
    import statistics

    from ocnopt.bench.measure import bootstrap_ratio

    assert bootstrap_ratio([6.0] * 10, [3.0] * 7) == (2.0, 2.0, 2.0)
    b = [1.0 + 0.01 * i for i in range(101)]
    a = [2 * x for x in b]
    random.Random(0).shuffle(a)
    ratio, lo, hi = bootstrap_ratio(a, b)
    assert ratio == 2.0 and lo < 2.0 < hi and hi - lo < 0.5
    assert bootstrap_ratio(a, b, seed=1) == (ratio, lo, hi)  # seeded
    assert bootstrap_ratio([1.0, 5.0], [3.0, 3.0], stat=statistics.fmean)[0] == 1.0
    assert bootstrap_ratio(a, b, level=0.5)[2] < hi  # a narrower level, a narrower interval
    with pytest.raises(ValueError, match="non-empty samples, got sizes 0 and 3"):
        bootstrap_ratio([], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\), got 95"):
        bootstrap_ratio(a, b, level=95)
    with pytest.raises(ValueError, match="resamples must be a positive integer, got 0"):
        bootstrap_ratio(a, b, resamples=0)
