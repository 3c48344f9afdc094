"""Step time, peak memory and scaling of the scalable order-2 backends (issue 4).

Configurations (all K-FAC ones: ``curvature="kfac"``, ``stat_every=1``, ``inv_every=10``,
``damping=0.1``, lr 1e-2 on the MLP and 3e-3 on digits-cnn (see ``KFAC_LR``), empirical
Fisher, no momentum):

* ``torch-sgd``  torch.optim.SGD(lr=1e-2, momentum=0.9)              (reference)
* ``torch-adam`` torch.optim.Adam(lr=1e-3)                           (reference)
* ``autograd-kfac-o1``  OCNOpt(backend="autograd", order=1)          K-FAC, backpropagation
* ``lowrank-kfac-fb``   OCNOpt(backend="lowrank", order=2, feedback=True,
  backend_options={"terminal": "empirical"})                        r = 1 value factor
* ``backpack-kfac-fb``  OCNOpt(backend="backpack", order=2, feedback=True,
  backend_options={"extension": "kfac"})                            BackPACK KFAC factors

Problems: ``mlp`` = MLP 784-w-w-10 (ReLU; w = 512 unless scaled), random N(0, 1) inputs and
random labels (4 fixed batches, cycled); ``cnn`` = the digits-cnn problem of docs/benchmarks.md:
scikit-learn ``load_digits`` as 1x8x8 images standardised with the train-split mean and
standard deviation, the 70/30 stratified split (seed 0), and 4 fixed minibatches of 256 images
drawn from the 1257-image train split; 4 Conv2d 3x3 (32 channels, padding 1) with ReLU, then
Flatten, Linear(2048, 64), ReLU, Linear(64, 10) (the hidden width 64 is this script's choice).

Measurement sets, each timed in ONE fresh subprocess (so that ratios are measured in one
process and the sets do not share allocator state):

* ``mlp`` / ``cnn``: the five configurations at batch 256 (targets of issue 4);
* ``batch``: MLP 784-512-512-10 at batch 64, 128, 256, 512, every configuration;
* ``width``: MLP 784-w-w-10 at batch 256 for w = 128, 256, 512, 1024, every configuration,
  plus the K-FAC model's own inverse cost: one call of ``ocnopt.curvature.kfac.damped_inverse``
  for every Kronecker factor of the net (the work of one inverse step).

Timing: every configuration has its own copy of the same initial model and cycles through the
same batches. After a warm-up of 10 steps, rounds interleave the configurations in an order
reshuffled every round (seeded); in each round every configuration runs one block of 10
consecutive steps (= inv_every, so every block holds exactly one K-FAC inverse step and the
periodic cost is amortised honestly). Reported: the median over rounds of the block's mean
wall time per step (``time.perf_counter_ns``) and of its mean process CPU time per step
(``time.process_time_ns``); ratios are ratios of those medians, with the 25-75 % range of the
per-round paired ratios. The machine is shared, so the subprocesses run with
``OMP_WAIT_POLICY=PASSIVE`` by default (``--omp-wait-policy``): with the default active
waiting, MKL's two OpenMP threads spin while the other one is descheduled, which made a 512 x 512
eigendecomposition 5-50x slower on a loaded machine and the timings meaningless.

Memory (sets ``mlp`` and ``cnn``): after the timing, one fresh subprocess per configuration
and mode, each running 12 steps (two inverse steps) after building the model and the data:

* ``tensor``: peak live bytes of torch's CPU allocator from ``torch.profiler``
  (``profile_memory=True``) allocation events recorded from before the model is built;
  ``setup`` = bytes live when the optimizer is created (model + data); ``above setup`` = peak
  minus setup = what the optimizer state and the steps add (the number the 1.5x target uses);
* ``rss``: growth of the peak resident set size (VmHWM reset through ``/proc/self/clear_refs``
  after a throwaway warm-up, falling back to ``ru_maxrss``) from right before the model is
  built to the end of the steps: the OS view, allocator caching included.

Profiling (on by default, ``--no-profile`` skips it): one fresh subprocess per configuration
(Adam and the ocnopt ones) and problem runs 10 steps under ``torch.profiler``, with
``record_function`` regions wrapped around the library's phases (by patching the functions in
that subprocess only; the library files are untouched): inclusive ms per step per phase
(profiler durations) and the top operators by self CPU time.

Also printed: an analytic multiply-add count per step (forward + backward, K-FAC statistics,
preconditioning G^-1 X A^-1, factor inverses, order-2 extras) giving the arithmetic lower bound
of each ratio.

Validity and provenance: a comparison where a configuration skipped non-finite steps (a skipped
step does no update pass, so it is cheap) is reported INVALID instead of PASS/FAIL. Every
measuring process records the git commit of the checkout, its uncommitted library files and a
hash of the library sources it imported; the report warns when the processes of one run
imported different sources. ``--from-json`` recomputes ratios, slopes and verdicts from the
raw block timings of a saved result.

Usage::

    python benchmarks/scalable_backends.py --json results.json          # everything
    python benchmarks/scalable_backends.py --quick --sets mlp,batch      # fewer rounds
    python benchmarks/scalable_backends.py --from-json results.json      # re-print tables
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import hashlib
import inspect
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ocnopt
from ocnopt.bench.measure import (
    allocator_peak,
    cpu_model,
    peak_rss_kib,
    quantile,
    reset_peak_rss,
    status_kib,
)

SEED = 0
N_BATCHES = 4
BATCH = 256
WIDTH = 512
BATCHES = (64, 128, 256, 512)
WIDTHS = (128, 256, 512, 1024)
CNN_HIDDEN = 64
BLOCK = 10  # steps per block = inv_every: one inverse step per block
INV_BLOCK = 3  # calls per block of the inverse-cost runners
WARMUP = 10
MEMORY_STEPS = 12
KFAC: dict[str, Any] = {"curvature": "kfac", "damping": 0.1, "stat_every": 1, "inv_every": 10}
# learning rate of the ocnopt configurations per problem: on digits-cnn, lowrank order 2 at
# lr 1e-2 diverged after ~28 steps before the trust bound of the order-2 corrections (both with
# the feedback alone and with the value correction alone), and skipped non-finite steps would
# make its timing meaningless (they skip the update pass); runs keep 3e-3 for comparability
KFAC_LR = {"mlp": 1e-2, "cnn": 3e-3}
CONFIGS = ("torch-sgd", "torch-adam", "autograd-kfac-o1", "lowrank-kfac-fb", "backpack-kfac-fb")
OCN_CONFIGS = CONFIGS[2:]
# the K-FAC model's own inverse cost: damped inverses of every factor of the net, and of the
# factors whose size is the width only (G1, A2, G2, A3 of 784-w-w-10: pure w^3)
INVERSES = ("kfac-inverse", "kfac-inverse-w")
DESCRIPTION = {
    "torch-sgd": "torch.optim.SGD(lr=1e-2, momentum=0.9)",
    "torch-adam": "torch.optim.Adam(lr=1e-3)",
    "autograd-kfac-o1": "OCNOpt(backend='autograd', order=1, curvature='kfac')",
    "lowrank-kfac-fb": "OCNOpt(backend='lowrank', order=2, feedback=True, "
                       "backend_options={'terminal': 'empirical'}, curvature='kfac')",
    "backpack-kfac-fb": "OCNOpt(backend='backpack', order=2, feedback=True, "
                        "backend_options={'extension': 'kfac'}, curvature='kfac')",
}
ROUNDS = {"mlp": 15, "cnn": 6, "batch": 5, "width": 6}
ROUNDS_QUICK = {"mlp": 4, "cnn": 2, "batch": 2, "width": 2}
SETS = ("mlp", "cnn", "batch", "width")
# (set, numerator, denominator, target, what)
TARGETS = [
    ("lowrank-kfac-fb", "torch-adam", 2.0, "time"),
    ("lowrank-kfac-fb", "autograd-kfac-o1", 1.35, "time"),
    ("lowrank-kfac-fb", "autograd-kfac-o1", 1.5, "memory"),
    ("backpack-kfac-fb", "torch-adam", 2.5, "time"),
]
BATCH_SLOPE_TARGET = 1.10  # linear in batch: log-log slope <= 1 (+10 % for noise)
WIDTH_SLOPE_TARGET = 3.0  # the d^3 of the K-FAC inverse (Cholesky or eigen-decomposition, G^-1 X A^-1)
_MARK = "scalable_backends::optimizer"


# ---- problems ---------------------------------------------------------------------------------
def make_mlp(width: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def make_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c = 1
    for _ in range(4):
        layers += [nn.Conv2d(c, 32, 3, padding=1), nn.ReLU()]
        c = 32
    layers += [nn.Flatten(), nn.Linear(32 * 8 * 8, CNN_HIDDEN), nn.ReLU(), nn.Linear(CNN_HIDDEN, 10)]
    return nn.Sequential(*layers)


def mlp_data(batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(batch, 784, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(N_BATCHES)]


@functools.lru_cache(maxsize=1)
def digits_train() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_tr, _, y_tr, _ = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    X_tr = torch.tensor(X_tr, dtype=torch.float32)
    X_tr = (X_tr - X_tr.mean()) / X_tr.std()
    return X_tr.reshape(-1, 1, 8, 8), torch.tensor(y_tr, dtype=torch.int64)


def cnn_data(batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    X, y = digits_train()
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(N_BATCHES):
        idx = torch.randperm(X.shape[0], generator=g)[:batch]
        out.append((X[idx].contiguous(), y[idx].contiguous()))
    return out


def problem(name: str, batch: int, width: int, seed: int
            ) -> tuple[Callable[[], nn.Module], list[tuple[torch.Tensor, torch.Tensor]]]:
    if name == "mlp":
        return (lambda: make_mlp(width, seed)), mlp_data(batch, seed)
    if name == "cnn":
        return (lambda: make_cnn(seed)), cnn_data(batch, seed)
    raise ValueError(name)


def kronecker_layers(name: str, width: int) -> list[tuple[int, int, int]]:
    """(d_in, d_out, P) of every Kronecker layer (P = weight-sharing positions)."""
    if name == "mlp":
        return [(784, width, 1), (width, width, 1), (width, 10, 1)]
    return [(9, 32, 64), (288, 32, 64), (288, 32, 64), (288, 32, 64), (2048, CNN_HIDDEN, 1),
            (CNN_HIDDEN, 10, 1)]


# ---- optimizers -------------------------------------------------------------------------------
def make_optimizer(config: str, model: nn.Module, prob: str) -> Any:
    kw = {**KFAC, "lr": KFAC_LR[prob]}
    if config == "torch-sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    if config == "torch-adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    if config == "autograd-kfac-o1":
        return ocnopt.OCNOpt(model, backend="autograd", order=1, **kw)
    if config == "lowrank-kfac-fb":
        return ocnopt.OCNOpt(model, backend="lowrank", order=2, feedback=True,
                             backend_options={"terminal": "empirical"}, **kw)
    if config == "backpack-kfac-fb":
        return ocnopt.OCNOpt(model, backend="backpack", order=2, feedback=True,
                             backend_options={"extension": "kfac"}, **kw)
    raise ValueError(config)


class Runner:
    """One configuration with its own model; ``step()`` runs one step on the next batch."""

    def __init__(self, config: str, model: nn.Module, data: list, prob: str):
        self.config, self.model, self.data = config, model, data
        self.opt = make_optimizer(config, model, prob)
        self.k = 0
        self.block_ms: list[float] = []
        self.block_cpu_ms: list[float] = []
        self.torch = config.startswith("torch")

    def step(self) -> torch.Tensor:
        x, y = self.data[self.k % len(self.data)]
        self.k += 1
        if not self.torch:
            return self.opt.step(x, y)
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def run_block(self, n: int) -> None:
        c0, t0 = time.process_time_ns(), time.perf_counter_ns()
        for _ in range(n):
            self.step()
        self.block_ms.append((time.perf_counter_ns() - t0) / n / 1e6)
        self.block_cpu_ms.append((time.process_time_ns() - c0) / n / 1e6)

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"block_ms": self.block_ms, "block_cpu_ms": self.block_cpu_ms,
                               "final_loss": float(self.step())}
        if not self.torch:
            out["skipped_steps"] = self.opt.skipped_steps
        return out


class InverseRunner:
    """The K-FAC model's own inverse cost: ``damped_inverse`` of every factor of the net
    (random SPD matrices of the factors' sizes); one "step" = one inverse step."""

    def __init__(self, sizes: list[int], seed: int):
        from ocnopt.curvature.kfac import damped_inverse

        self.fn = damped_inverse
        g = torch.Generator().manual_seed(seed)
        self.mats = []
        for d in sizes:
            X = torch.randn(d, 2 * d, generator=g)
            self.mats.append(X @ X.T / (2 * d))
        self.block_ms: list[float] = []
        self.block_cpu_ms: list[float] = []

    def step(self) -> None:
        for M in self.mats:
            self.fn(M, KFAC["damping"])

    run_block = Runner.run_block

    def result(self) -> dict[str, Any]:
        return {"block_ms": self.block_ms, "block_cpu_ms": self.block_cpu_ms}


def set_plan(name: str, seed: int) -> list[tuple[str, str, int, int, str]]:
    """(key, problem, batch, width, config) of every runner of a measurement set."""
    if name in ("mlp", "cnn"):
        return [(c, name, BATCH, WIDTH, c) for c in CONFIGS]
    if name == "batch":
        return [(f"{c}@B={b}", "mlp", b, WIDTH, c) for b in BATCHES for c in CONFIGS]
    if name == "width":
        return ([(f"{c}@w={w}", "mlp", BATCH, w, c) for w in WIDTHS for c in CONFIGS]
                + [(f"{c}@w={w}", "mlp", BATCH, w, c) for w in WIDTHS for c in INVERSES])
    raise ValueError(name)


def set_worker(name: str, rounds: int, seed: int) -> dict[str, Any]:
    runners: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for key, prob, batch, width, config in set_plan(name, seed):
        if config in INVERSES:
            sizes = [d for li, lo, _ in kronecker_layers(prob, width) for d in (li, lo)]
            if config == "kfac-inverse-w":  # the factors whose size is the width
                sizes = [d for d in sizes if d == width]
            runners[key] = InverseRunner(sizes, seed)
        else:
            build, data = problem(prob, batch, width, seed)
            runners[key] = Runner(config, build(), data, prob)
        meta[key] = {"problem": prob, "batch": batch, "width": width, "config": config}
    t0 = time.perf_counter()
    for key, r in runners.items():
        for _ in range(WARMUP if meta[key]["config"] not in INVERSES else 1):
            r.step()
    warmup_s = time.perf_counter() - t0
    load_before = loadavg()
    rng = random.Random(seed)
    order = list(runners)
    t0 = time.perf_counter()
    for i in range(rounds):
        rng.shuffle(order)
        for key in order:
            runners[key].run_block(BLOCK if meta[key]["config"] not in INVERSES else INV_BLOCK)
        print(f"# set {name}: round {i + 1}/{rounds} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    out = {key: {**meta[key], **r.result()} for key, r in runners.items()}
    return {"set": name, "rounds": rounds, "warmup_s": warmup_s, "source": source_state(),
            "timing_s": time.perf_counter() - t0, "loadavg_before": load_before,
            "loadavg_after": loadavg(), "runners": out}


# ---- memory worker ----------------------------------------------------------------------------
def memory_worker(prob: str, config: str, mode: str, steps: int, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {"problem": prob, "config": config, "mode": mode, "steps": steps}
    if mode == "tensor":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            build, data = problem(prob, BATCH, WIDTH, seed)
            model = build()
            with torch.profiler.record_function(_MARK):
                r = Runner(config, model, data, prob)
                for _ in range(steps):
                    r.step()
        peak, base, n_events = allocator_peak(prof, _MARK)
        if base is None:
            raise RuntimeError("profiler marker event missing")
        out.update(peak_bytes=peak, setup_bytes=base, above_setup_bytes=peak - base,
                   n_events=n_events)
    else:
        build, data = problem(prob, BATCH, WIDTH, seed)
        throwaway = Runner(config, build(), data, prob)  # page in kernels, start thread pools
        for _ in range(2):
            throwaway.step()
        del throwaway
        gc.collect()
        method = reset_peak_rss()
        rss0 = status_kib("VmRSS")
        r = Runner(config, build(), data, prob)
        for _ in range(steps):
            r.step()
        hwm = peak_rss_kib(method)
        out.update(method=method, rss_start_kib=rss0, peak_rss_kib=hwm,
                   above_setup_bytes=(hwm - rss0) * 1024 if hwm and rss0 else None)
    if not r.torch:
        out["skipped_steps"] = r.opt.skipped_steps
    out["source"] = source_state()
    return out


# ---- profile worker ---------------------------------------------------------------------------
def _wrap(owner: Any, attr: str, label: str, wrap_result: Callable[[Any], Any] | None = None
          ) -> None:
    static = isinstance(inspect.getattr_static(owner, attr), staticmethod)
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(label):
            res = fn(*args, **kwargs)
        return wrap_result(res) if wrap_result is not None else res

    setattr(owner, attr, staticmethod(wrapped) if static else wrapped)


def instrument() -> None:
    """record_function regions around the library's phases (this process only)."""
    from ocnopt.backends import autograd, backpack, lowrank

    from ocnopt import engine
    from ocnopt.curvature import kfac
    from ocnopt.curvature.base import Solver

    E = engine.BellmanEngine
    for attr in ("nominal", "terminal", "expand", "second_order", "update_pass",
                 "apply_open_loop"):
        _wrap(E, attr, f"engine.{attr}")
    graph = getattr(autograd, "GraphBackend", autograd.AutogradBackend)  # owner of first_order
    _wrap(graph, "first_order", "backend.first_order (VJP: Q_x, Q_u)")
    for mod in (autograd, lowrank):
        _wrap(mod, "kronecker_statistics", "backend.kronecker_statistics (rows)")
    L = lowrank.LowRankBackend
    _wrap(L, "_vjp_columns", "lowrank._vjp_columns (a = f_x^T Z)")
    _wrap(L, "_fu_k", "lowrank._fu_k (JVP f_u k)")
    _wrap(L, "quadratic", "lowrank.quadratic (k^T Q_uu k)")
    _wrap(L, "value_update", "lowrank.value_update")
    _wrap(L, "gram", "lowrank.gram (W^T M^-1 W)")
    _wrap(lowrank, "psd_sqrt_factor", "lowrank.psd_sqrt_factor")

    def wrap_K(K: Any) -> Any:
        if K is None:
            return None

        def K_(dx: Any) -> Any:
            with torch.profiler.record_function("lowrank.feedback K(dx)"):
                return K(dx)

        return K_

    _wrap(L, "feedback", "lowrank.feedback (closure)", wrap_K)
    _wrap(backpack.BackpackBackend, "factors", "backpack.factors (BackPACK pass)")
    _wrap(kfac.KFAC, "_refresh", "kfac._refresh (EMA + inverse)")
    _wrap(kfac, "kronecker_factors", "kfac.kronecker_factors (A, G)")
    _wrap(kfac, "damped_inverse", "kfac.damped_inverse (float64)")
    _wrap(kfac.KFAC, "precondition", "kfac.precondition (G^-1 X A^-1)")
    _wrap(kfac.KFAC, "per_sample_gram", "kfac.per_sample_gram")
    _wrap(kfac.KFAC, "solve_rows", "kfac.solve_rows")
    _wrap(Solver, "__call__", "Solver.__call__ (M^-1 v)")


def profile_worker(prob: str, config: str, steps: int, seed: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    build, data = problem(prob, BATCH, WIDTH, seed)
    r = Runner(config, build(), data, prob)
    for _ in range(WARMUP):
        r.step()
    if config != "torch-adam":
        instrument()
    step: Callable[[], Any] = r.step
    if config == "torch-adam":
        def adam_step() -> None:  # regions for the torch baseline
            x, y = r.data[r.k % len(r.data)]
            r.k += 1
            r.opt.zero_grad()
            with torch.profiler.record_function("adam.forward"):
                loss = F.cross_entropy(r.model(x), y)
            with torch.profiler.record_function("adam.backward"):
                loss.backward()
            with torch.profiler.record_function("adam.optimizer_step"):
                r.opt.step()
        step = adam_step
    t0, c0 = time.perf_counter(), time.process_time()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - t0) / steps * 1e3
    cpu = (time.process_time() - c0) / steps * 1e3
    regions, ops = [], []
    for e in prof.key_averages():
        if "." in e.key and not e.key.startswith("aten::") and e.key[0].islower():
            regions.append({"name": e.key, "calls_per_step": e.count / steps,
                            "cpu_ms_per_step": e.cpu_time_total / 1e3 / steps})
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key.startswith("aten::"):
            ops.append({"name": e.key, "shapes": str(e.input_shapes)[:80],
                        "calls_per_step": e.count / steps,
                        "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps})
    regions.sort(key=lambda d: -d["cpu_ms_per_step"])
    ops.sort(key=lambda d: -d["self_cpu_ms_per_step"])
    total_self = sum(o["self_cpu_ms_per_step"] for o in ops)
    return {"problem": prob, "config": config, "steps": steps, "wall_ms_per_step": wall,
            "cpu_ms_per_step": cpu, "aten_self_ms_per_step": total_self, "regions": regions,
            "source": source_state(),
            "top_ops": ops[:18]}


# ---- arithmetic model -------------------------------------------------------------------------
def mac_counts(prob: str, batch: int, width: int) -> dict[str, float]:
    """Multiply-adds per step (float32 unless said) of the main terms, K-FAC layers only, for
    the library's choices (r = 1, empirical terminal: no extra VJPs for a = f_x^T Z)."""
    layers = kronecker_layers(prob, width)
    B = batch
    fwd = sum(B * P * di * do for di, do, P in layers)
    first = layers[0]
    bwd = 2 * fwd - B * first[2] * first[0] * first[1]  # no input gradient at the first layer
    stats = sum(B * P * (di * di + do * do) for di, do, P in layers)
    precond = sum(do * do * di + do * di * di for di, do, _ in layers)
    rows = sum(B * P * (di * di + do * do + di * do) for di, do, P in layers)

    def by_rows(di: int, do: int, P: int) -> bool:  # KFAC._direction_from_rows' rule
        return B * P * (di * di + do * do + di * do) < di * do * (di + do)

    chosen = sum(B * P * (di * di + do * do + di * do) if by_rows(di, do, P)
                 else do * do * di + do * di * di for di, do, P in layers)
    # the dense weight gradient is not formed where the direction comes from the rows
    unformed = sum(B * P * di * do for di, do, P in layers if by_rows(di, do, P))
    inverse = sum(di ** 3 + do ** 3 for di, do, _ in layers) / KFAC["inv_every"]  # n^3, float64
    gram = feedback = 0
    for di, do, P in layers[1:]:  # stages with a recorded input gradient (t > 0)
        g_rows = (0 if by_rows(di, do, P) else B * P * (di * di + do * do)) \
            + B * P * P * (di + do)  # a A^-1 and g G^-1 shared with the direction's rows
        g_grads = B * P * di * do + B * do * di * (di + do)
        if g_grads < B * P * di * di + B * P * P * (di + do):  # KFAC.per_sample_gram's rule
            gram += g_grads
            feedback += B * di * do + do * di * (di + do)  # G^-1 (sum s W) A^-1
        else:
            gram += g_rows
            feedback += B * P * di * do  # (Z G^-1 s)^T (a A^-1)
    o2_min = fwd + fwd + feedback  # update forward pass, JVP f_u k, feedback product
    return {"forward": fwd, "forward_backward": fwd + bwd, "kfac_statistics": stats,
            "kfac_precondition": precond, "kfac_precondition_rows": rows,
            "kfac_precondition_chosen": chosen, "kfac_gradient_not_formed": unformed,
            "kfac_inverse_n3_per_step": inverse, "order2_extra_minimal": o2_min,
            "order2_extra_implemented": o2_min + gram}


# ---- environment ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def source_state() -> dict[str, Any]:
    """The library this process imported: git commit and uncommitted library files of the
    checkout, and a hash of the imported package sources (ocnopt and ocnopt.backends), taken
    once per process (a source tree edited later does not change a running process)."""
    import ocnopt.backends

    root = os.path.dirname(os.path.dirname(os.path.abspath(ocnopt.__file__)))

    def git(*a: str) -> str | None:
        try:
            p = subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout if p.returncode == 0 else None

    h = hashlib.sha1()
    for pkg in (ocnopt, ocnopt.backends):
        assert pkg.__file__ is not None
        base = os.path.dirname(os.path.abspath(pkg.__file__))
        for dirpath, _, files in sorted(os.walk(base)):
            for f in sorted(files):
                if f.endswith(".py"):
                    with open(os.path.join(dirpath, f), "rb") as fh:
                        h.update(f.encode() + fh.read())
    commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--", "ocnopt",
                                                   "backends")
    dirty = None if status is None else sorted(ln[3:] for ln in status.splitlines()
                                               if ln.strip() and not ln.startswith("??"))
    return {"ocnopt_file": ocnopt.__file__, "commit": commit.strip() if commit else None,
            "uncommitted_library_files": dirty, "library_sha1": h.hexdigest()}


def loadavg() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def environment(threads: int) -> dict[str, Any]:
    try:
        import backpack
        bp = getattr(backpack, "__version__", None)
        if bp is None:
            from importlib.metadata import version
            bp = version("backpack-for-pytorch")
    except Exception:  # noqa: BLE001 - only recorded
        bp = None
    return {"torch_version": torch.__version__, "ocnopt_version": ocnopt.__version__,
            "backpack_version": bp, "python": platform.python_version(),
            "platform": platform.platform(), "machine": platform.machine(),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads,
            "torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads(),
            "blas": "mkl" if torch.backends.mkl.is_available() else "other"}


# ---- statistics -------------------------------------------------------------------------------
def slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return (sum((a - mx) * (b - my) for a, b in zip(lx, ly))
            / sum((a - mx) ** 2 for a in lx))


def affine(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares y = a + b x: intercept a, slope b, coefficient of determination."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    ss = sum((y - my) ** 2 for y in ys)
    res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return {"intercept": a, "slope": b, "r2": 1 - res / ss if ss else 1.0}


def local_slopes(xs: list[float], ys: list[float]) -> list[float]:
    return [math.log(ys[i + 1] / ys[i]) / math.log(xs[i + 1] / xs[i]) for i in range(len(xs) - 1)]


# ---- subprocess plumbing ----------------------------------------------------------------------
def child(args: list[str], threads: int, wait_policy: str, extra_env: dict[str, str] | None = None,
          ) -> dict[str, Any]:
    env = dict(os.environ)
    if wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = wait_policy
    env.update(extra_env or {})
    cmd = [sys.executable, os.path.abspath(__file__), *args, "--threads", str(threads)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not line:
        return {"error": f"subprocess {' '.join(args)} failed (rc={p.returncode})"}
    return json.loads(line[-1])


# ---- analysis ---------------------------------------------------------------------------------
def med(r: dict[str, Any], cpu: bool = False) -> float:
    return statistics.median(r["block_cpu_ms" if cpu else "block_ms"])


def paired(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    xs = [x / y for x, y in zip(a["block_ms"], b["block_ms"])]
    return quantile(xs, 0.25), quantile(xs, 0.75)


def analyse(payload: dict[str, Any]) -> None:
    """Ratios, targets, slopes: added to ``payload["analysis"]``."""
    res = payload["sets"]
    analysis: dict[str, Any] = {"targets": [], "batch": {}, "width": {}}
    for s in ("mlp", "cnn"):
        if s not in res or "error" in res[s]:
            continue
        runners = res[s]["runners"]
        mem = payload.get("memory", {}).get(s, {})
        for num, den, target, what in TARGETS:
            entry: dict[str, Any] = {"set": s, "numerator": num, "denominator": den,
                                     "target": target, "what": what}
            if what == "time":
                a, b = runners[num], runners[den]
                entry.update(num_ms=med(a), den_ms=med(b), ratio=med(a) / med(b),
                             cpu_ratio=med(a, True) / med(b, True), iqr=paired(a, b))
            else:
                try:
                    a, b = mem[num]["tensor"], mem[den]["tensor"]
                    ra, rb = mem[num]["rss"], mem[den]["rss"]
                except KeyError:
                    continue
                if "error" in a or "error" in b:
                    continue
                entry.update(num_bytes=a["above_setup_bytes"], den_bytes=b["above_setup_bytes"],
                             ratio=a["above_setup_bytes"] / b["above_setup_bytes"],
                             total_ratio=a["peak_bytes"] / b["peak_bytes"],
                             rss_ratio=(ra.get("above_setup_bytes") or math.nan)
                             / (rb.get("above_setup_bytes") or math.nan))
            entry["pass"] = entry["ratio"] <= target
            if what == "time":
                skipped = {c: runners[c].get("skipped_steps", 0) for c in (num, den)}
            else:  # the memory subprocesses' own steps
                skipped = {c: max(mem[c][m].get("skipped_steps", 0) for m in ("tensor", "rss"))
                           for c in (num, den)}
            if any(skipped.values()):  # a skipped step skips the update pass: not comparable
                entry["pass"] = None
                entry["invalid"] = f"skipped non-finite steps {skipped}"
            analysis["targets"].append(entry)
    for s, xs, key in (("batch", BATCHES, "B"), ("width", WIDTHS, "w")):
        if s not in res or "error" in res[s]:
            continue
        runners = res[s]["runners"]
        names = list(CONFIGS) + (list(INVERSES) if s == "width" else [])
        for c in names:
            ys = [med(runners[f"{c}@{key}={x}"]) for x in xs]
            cs = [med(runners[f"{c}@{key}={x}"], True) for x in xs]
            e = {"x": list(xs), "ms": ys, "cpu_ms": cs, "slope": slope(list(xs), ys),
                 "cpu_slope": slope(list(xs), cs), "local_slopes": local_slopes(list(xs), ys),
                 "affine_ms": affine(list(xs), ys)}
            analysis[s][c] = e
        for c in names:
            e = analysis[s][c]
            if c in OCN_CONFIGS:
                if s == "batch":
                    tgt = BATCH_SLOPE_TARGET
                else:  # the measured growth of the width-sized factors' inverse, at most d^3
                    inv = analysis[s].get("kfac-inverse-w")
                    tgt = WIDTH_SLOPE_TARGET if inv is None else min(WIDTH_SLOPE_TARGET,
                                                                     inv["slope"])
                e["target"] = tgt
                e["pass"] = e["slope"] <= tgt
                sk = [runners[f"{c}@{key}={x}"].get("skipped_steps", 0) for x in xs]
                e["skipped_steps"] = sk
                if any(sk):
                    e["pass"] = None
                    e["invalid"] = f"skipped non-finite steps {sk}"
    payload["analysis"] = analysis


def report(payload: dict[str, Any]) -> None:
    env = payload["environment"]
    cfg = payload["config"]
    print(f"# ocnopt scalable backends (issue 4): torch {env['torch_version']}, "
          f"backpack {env['backpack_version']}, threads={env['torch_num_threads']}, "
          f"OMP_WAIT_POLICY={cfg['omp_wait_policy']}, cpu_count={env['cpu_count']}, "
          f"cpu='{env['cpu_model']}', {env['platform']}")
    print(f"# command: {payload['command']}")
    sources: dict[str, list[set[str]]] = {}
    for group in ("sets", "memory", "profile"):
        for s, v in payload.get(group, {}).items():
            items = [v] if group == "sets" else [x for c in v.values()
                                                 for x in (c.values() if group == "memory" else [c])]
            for x in items:
                src = x.get("source") if isinstance(x, dict) else None
                if src:  # grouped by the imported sources; commits listed (others commit)
                    entry = sources.setdefault(src["library_sha1"], [set(), set(), set()])
                    entry[0].add(str(src["commit"])[:10])
                    entry[1].update(src["uncommitted_library_files"] or ())
                    entry[2].add(f"{group}:{s}")
    for sha, (commits, dirty, where) in sources.items():
        print(f"# library sources sha1 {sha[:10]} (checkout at commit {', '.join(sorted(commits))}; "
              f"uncommitted library files: {', '.join(sorted(dirty)) or 'none'}) imported by "
              f"{', '.join(sorted(where))}")
    if len(sources) > 1:
        print("# WARNING: the measuring processes imported different library sources")
    print(f"# time per step = median over rounds of the mean wall time of a {BLOCK}-step block "
          "(one K-FAC inverse step per block); cpu = the same with process CPU time; IQR = "
          "25-75 % of the per-round paired wall ratios")
    res = payload["sets"]
    for s in ("mlp", "cnn"):
        if s not in res:
            continue
        if "error" in res[s]:
            print(f"\n## set {s}: DID NOT COMPLETE: {res[s]['error']}")
            continue
        r = res[s]
        title = ("MLP 784-512-512-10 (ReLU), batch 256, random data" if s == "mlp" else
                 "digits-cnn (4 conv 3x3 x32 + Linear 2048-64-10), batch 256 from the train split")
        print(f"\n## {title}: {r['rounds']} rounds x {BLOCK} steps, load average before/after "
              f"{r['loadavg_before']} / {r['loadavg_after']}")
        mem = payload.get("memory", {}).get(s, {})
        base = r["runners"]["torch-adam"]
        print(f"{'config':<18} {'ms/step':>8} {'cpu ms':>8} {'x Adam':>7} {'x SGD':>6} "
              f"{'x kfac-o1':>9} {'tensor peak MiB':>15} {'above setup':>11} {'dRSS MiB':>8} "
              f"{'final loss':>10} {'skipped':>7}")
        for c in CONFIGS:
            rc = r["runners"][c]
            m = mem.get(c, {})
            t, rs = m.get("tensor", {}), m.get("rss", {})

            def mib(v: Any) -> str:
                return "n/a" if v is None else f"{v / 2**20:.1f}"

            print(f"{c:<18} {med(rc):8.1f} {med(rc, True):8.1f} {med(rc) / med(base):6.2f}x "
                  f"{med(rc) / med(r['runners']['torch-sgd']):5.2f}x "
                  f"{med(rc) / med(r['runners']['autograd-kfac-o1']):8.2f}x "
                  f"{mib(t.get('peak_bytes')):>15} {mib(t.get('above_setup_bytes')):>11} "
                  f"{mib(rs.get('above_setup_bytes')):>8} {rc['final_loss']:10.4f} "
                  f"{rc.get('skipped_steps', '-'):>7}")
        macs = payload["macs"][s]
        fb = macs["forward_backward"]
        chosen = macs.get("kfac_precondition_chosen", min(macs["kfac_precondition"],
                                                          macs["kfac_precondition_rows"]))
        kfac_lb = fb - macs.get("kfac_gradient_not_formed", 0) + macs["kfac_statistics"] + chosen
        print(f"arithmetic (M multiply-adds per step): forward+backward {fb / 1e6:.0f}; K-FAC "
              f"statistics {macs['kfac_statistics'] / 1e6:.0f}; preconditioning G^-1 X A^-1 "
              f"{macs['kfac_precondition'] / 1e6:.0f} (all from rows: "
              f"{macs['kfac_precondition_rows'] / 1e6:.0f}; per layer the cheaper: "
              f"{chosen / 1e6:.0f}; dense weight gradients then not formed: "
              f"{macs.get('kfac_gradient_not_formed', 0) / 1e6:.0f}); factor inverses sum n^3 / inv_every = "
              f"{macs['kfac_inverse_n3_per_step'] / 1e6:.0f} (float64, times a small constant); "
              f"order-2 extras {macs['order2_extra_minimal'] / 1e6:.0f} (update pass, JVP, "
              f"feedback) + the Gram matrices = {macs['order2_extra_implemented'] / 1e6:.0f}")
        print(f"  => any K-FAC step with stat_every=1 >= {kfac_lb / fb:.2f}x forward+backward "
              f"(~Adam) before its factor inverses; order 2 adds "
              f"{macs['order2_extra_minimal'] / kfac_lb:.2f}-"
              f"{macs['order2_extra_implemented'] / kfac_lb:.2f}x of that")
    tg = payload.get("analysis", {}).get("targets", [])
    if tg:
        print("\n## targets")
        print(f"{'set':<4} {'ratio':<38} {'value':>7} {'cpu':>6} {'IQR':>11} {'target':>6} "
              f"{'result':>6}  absolute")
        for e in tg:
            name = f"{e['numerator']} / {e['denominator']}" + (" mem" if e["what"] == "memory"
                                                               else "")
            if e["what"] == "time":
                extra = f"{e['cpu_ratio']:5.2f}x {e['iqr'][0]:5.2f}-{e['iqr'][1]:<5.2f}"
                absolute = f"{e['num_ms']:.1f} / {e['den_ms']:.1f} ms"
            else:
                extra = f"{'':>6} {'':>11}"
                absolute = (f"{e['num_bytes'] / 2**20:.1f} / {e['den_bytes'] / 2**20:.1f} MiB "
                            f"above setup (total peak ratio {e['total_ratio']:.2f}x, dRSS ratio "
                            f"{e['rss_ratio']:.2f}x)")
            verdict = "INVALID" if e.get("invalid") else ("PASS" if e["pass"] else "FAIL")
            print(f"{e['set']:<4} {name:<38} {e['ratio']:6.2f}x {extra} {e['target']:5.2f}x "
                  f"{verdict:>6}  {absolute}" + (f" ({e['invalid']})" if e.get("invalid") else ""))
    for s, label, key in (("batch", "batch size", "B"), ("width", "hidden width", "w")):
        an = payload.get("analysis", {}).get(s)
        if not an:
            if s in res and "error" in res[s]:
                print(f"\n## set {s}: DID NOT COMPLETE: {res[s]['error']}")
            continue
        r = res[s]
        xs = BATCHES if s == "batch" else WIDTHS
        what = ("MLP 784-512-512-10, batch " + "/".join(map(str, xs)) if s == "batch"
                else "MLP 784-w-w-10, batch 256, w = " + "/".join(map(str, xs)))
        tgt = (f"slope <= {BATCH_SLOPE_TARGET} (linear)" if s == "batch"
               else "slope <= that of the K-FAC inverse of the width-sized factors "
                    f"(kfac-inverse-w, measured here), at most {WIDTH_SLOPE_TARGET} (d^3)")
        print(f"\n## scaling in {label}: {what}; {r['rounds']} rounds; ms per step (wall); "
              f"log-log slope fitted over all points (cpu: the same on CPU time); target "
              f"(ocnopt configs) {tgt}")
        head = "".join(f"{f'{key}={x}':>10}" for x in xs)
        print(f"{'config':<18}{head} {'slope':>6} {'cpu':>5} {'local slopes':>18} {'result':>6}")
        for c, e in an.items():
            vals = "".join(f"{v:10.1f}" for v in e["ms"])
            loc = " ".join(f"{v:.2f}" for v in e["local_slopes"])
            result = ("-" if "pass" not in e else "INVALID" if e.get("invalid")
                      else ("PASS" if e["pass"] else "FAIL"))
            unit = " (ms per inverse step)" if c in INVERSES else ""
            if s == "batch":
                af = e["affine_ms"]
                unit = (f"  affine fit {af['intercept']:.1f} ms + {af['slope'] * 1e3:.1f} ms per "
                        f"1000 samples (R^2 {af['r2']:.3f})")
            print(f"{c:<18}{vals} {e['slope']:6.2f} {e['cpu_slope']:5.2f} {loc:>18} "
                  f"{result:>6}{unit}")
        if s == "width" and "kfac-inverse" in an:
            print("kfac-inverse = damped_inverse of every factor of the net (784-wide input factor "
                  "constant in w); kfac-inverse-w = of the four w x w factors only (G1, A2, G2, A3)")
        if s == "batch":
            ratio = (an["lowrank-kfac-fb"]["affine_ms"]["slope"]
                     / an["autograd-kfac-o1"]["affine_ms"]["slope"])
            print(f"per-sample (marginal) cost of lowrank order 2 / kfac order 1: {ratio:.2f}x")
        ratios = []
        for c in ("lowrank-kfac-fb", "backpack-kfac-fb"):
            rs = [a / b for a, b in zip(an[c]["ms"], an["autograd-kfac-o1"]["ms"])]
            ratios.append(f"{c} / autograd-kfac-o1: " + " ".join(f"{v:.2f}" for v in rs))
        print("ratio to order 1 per point: " + "; ".join(ratios))
    for s in ("mlp", "cnn"):
        prof = payload.get("profile", {}).get(s)
        if not prof:
            continue
        print(f"\n## profile ({s}, batch 256, {BLOCK} steps under torch.profiler, per step)")
        for c, p in prof.items():
            if "error" in p:
                print(f"{c}: {p['error']}")
                continue
            print(f"{c}: {p['wall_ms_per_step']:.1f} ms wall, {p['cpu_ms_per_step']:.1f} ms CPU "
                  f"per step under the profiler; phases (inclusive ms per step, profiler durations):")
            for g in p["regions"][:16]:
                name = g["name"].replace("(eigh)", "(float64)")  # label of older result files
                print(f"    {name:<46} {g['cpu_ms_per_step']:8.2f} ms  "
                      f"({g['calls_per_step']:.1f} calls)")
            print("  top operators (self CPU ms per step, input shapes):")
            for o in p["top_ops"][:10]:
                print(f"    {o['name']:<24} {o['self_cpu_ms_per_step']:8.2f} ms  "
                      f"{o['calls_per_step']:5.1f} calls  {o['shapes']}")


# ---- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--sets", default=",".join(SETS),
                    help=f"comma-separated measurement sets among {','.join(SETS)} (default all)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds (smoke test)")
    ap.add_argument("--rounds", type=int, help="rounds for every set (overrides the defaults "
                    f"{ROUNDS}, quick {ROUNDS_QUICK})")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiling subprocesses")
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY of the measuring subprocesses (default PASSIVE; "
                         "'unset' keeps the environment's)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--json", metavar="PATH", help="save the results as JSON")
    ap.add_argument("--from-json", metavar="PATH", help="print the tables of a saved result")
    ap.add_argument("--_set", dest="set_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_rounds", dest="worker_rounds", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_memory", dest="memory_worker", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--_profile", dest="profile_worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*Memory block of unknown size.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.set_worker:
        print(json.dumps(set_worker(args.set_worker, args.worker_rounds, args.seed)))
        return 0
    if args.memory_worker:
        prob, config, mode = args.memory_worker
        print(json.dumps(memory_worker(prob, config, mode, MEMORY_STEPS, args.seed)))
        return 0
    if args.profile_worker:
        prob, config = args.profile_worker
        print(json.dumps(profile_worker(prob, config, BLOCK, args.seed)))
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        analyse(saved)  # ratios, slopes and verdicts are recomputed from the raw timings
        report(saved)
        return 0

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    bad = [s for s in sets if s not in SETS]
    if bad:
        ap.error(f"unknown set(s) {bad}: accepted {SETS}")
    rounds = {s: args.rounds or (ROUNDS_QUICK if args.quick else ROUNDS)[s] for s in sets}
    started = datetime.datetime.now(datetime.timezone.utc)
    payload: dict[str, Any] = {
        "benchmark": "scalable_backends", "issue": 4,
        "command": " ".join(["python", *sys.argv]), "python_executable": sys.executable,
        "started_utc": started.isoformat(), "completed": False,
        "config": {"seed": args.seed, "threads": args.threads, "sets": sets, "rounds": rounds,
                   "block": BLOCK, "warmup": WARMUP, "memory_steps": MEMORY_STEPS,
                   "n_batches": N_BATCHES, "batch": BATCH, "width": WIDTH, "batches": BATCHES,
                   "widths": WIDTHS, "cnn_hidden": CNN_HIDDEN, "kfac": KFAC, "kfac_lr": KFAC_LR,
                   "omp_wait_policy": args.omp_wait_policy, "configs": DESCRIPTION,
                   "dtype": "float32", "device": "cpu", "quick": args.quick},
        "environment": environment(args.threads), "source": source_state(),
        "sets": {}, "memory": {}, "profile": {},
        "macs": {"mlp": mac_counts("mlp", BATCH, WIDTH), "cnn": mac_counts("cnn", BATCH, WIDTH)},
    }
    wp = args.omp_wait_policy
    for s in sets:
        print(f"# set {s}: {rounds[s]} rounds in one subprocess ...", flush=True)
        t0 = time.perf_counter()
        payload["sets"][s] = child(["--_set", s, "--_rounds", str(rounds[s]), "--seed",
                                    str(args.seed)], args.threads, wp)
        print(f"# set {s} done in {time.perf_counter() - t0:.0f} s", flush=True)
        if s in ("mlp", "cnn") and not args.no_memory:
            print(f"# memory ({s}): one subprocess per configuration and mode ...", flush=True)
            mem: dict[str, Any] = {}
            for c in CONFIGS:
                mem[c] = {}
                for mode in ("tensor", "rss"):
                    extra = {"MALLOC_MMAP_THRESHOLD_": "131072"} if mode == "rss" else None
                    mem[c][mode] = child(["--_memory", s, c, mode, "--seed", str(args.seed)],
                                         args.threads, wp, extra)
            payload["memory"][s] = mem
        if s in ("mlp", "cnn") and not args.no_profile:
            print(f"# profile ({s}) ...", flush=True)
            payload["profile"][s] = {c: child(["--_profile", s, c, "--seed", str(args.seed)],
                                              args.threads, wp)
                                     for c in ("torch-adam", *OCN_CONFIGS)}
    payload["completed"] = all("error" not in payload["sets"][s] for s in sets)
    payload["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    analyse(payload)
    report(payload)
    if not payload["completed"]:
        print("# WARNING: some measurement sets did not complete (see above)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"# saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
