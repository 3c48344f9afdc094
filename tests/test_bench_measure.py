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
