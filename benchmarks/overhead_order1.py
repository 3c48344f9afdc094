"""Order-1 overhead of ocnopt against its torch.optim twins (issue 2).

Measures, in ONE process, the step time of every ocnopt order-1 mode and of its torch.optim
twin on an MLP 784-512-512-10 (ReLU), batch 256, random data (no download), with a fixed
thread count, and reports absolute milliseconds beside the ratios (docs/benchmarks.md, protocol
``overhead``).

Timing. All optimizers live in the same process, each with its own copy of the same initial
model, and see the same sequence of batches. After a warm-up, the optimizers are interleaved
in rounds: in each round every optimizer runs one block of ``--block`` consecutive steps
(the order of the optimizers is reshuffled every round, seeded), so that drift (frequency,
other load) hits all of them equally. Every step is timed with ``time.perf_counter_ns``.
The reported time per step is the median over rounds of the block mean; the block (default
10 = ``inv_every``) contains exactly one K-FAC/EKFAC inverse (eigen-decomposition) step, so
the periodic cost is amortised honestly instead of being hidden by a per-step median. The
per-step median is also saved. Ratios are median(ocnopt) / median(twin), with a 95%
bootstrap interval over rounds (rounds resampled as pairs); the verdict is given both on the
point ratio (PASS: ratio <= target) and on the interval (PASS / FAIL only when the whole
interval is on one side of the target, "unclear" otherwise). The same ratio computed with
the process CPU time (``time.process_time``) is shown beside it: on a machine shared with
other jobs, wall time mostly measures the scheduler, CPU time much less so (with several
threads, CPU time also counts OpenMP workers spinning while they wait).

Memory. Measured after the timing, one fresh subprocess per optimizer (so that allocator
state left by the others cannot leak in), each running ``--memory-steps`` steps:

* ``tensor peak``: the peak of live bytes handed out by torch's CPU allocator, from the
  allocation/free events of ``torch.profiler`` (``profile_memory=True``) recorded from
  before the model is built to the end of the run: model parameters, data batches, gradients,
  optimizer state and every temporary of the steps. It excludes memory that does not go
  through torch's allocator (oneDNN/MKL scratch, Python objects, the interpreter). The part
  above model + data (``opt+step``) is what the optimizer and its steps add.
* ``dRSS``: in a second subprocess without the profiler, the growth of the process's peak
  resident set size over the run (VmHWM, reset through ``/proc/self/clear_refs`` right before
  the model is built; falls back to ``ru_maxrss`` minus the RSS at that point). A throwaway
  run of the same optimizer comes first, so that paging in kernel code and starting thread
  pools are not counted, and glibc's mmap threshold is fixed (``MALLOC_MMAP_THRESHOLD_``) so
  that freed large blocks go back to the OS. What the OS sees, allocator effects included,
  hence coarser.

``--breakdown`` replaces the timing table by a per-phase profile of every step (forward,
loss, backward, curvature update, parameter update, rest), measured in the same interleaved
rounds; with ``--threads 1`` its clock is the thread's CPU time.

Usage::

    python benchmarks/overhead_order1.py --threads 2 --repeats 30 --json results.json
    python benchmarks/overhead_order1.py --threads 1 --breakdown --modes sgd,adam
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
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

WIDTHS = (784, 512, 512, 10)
BATCH = 256
N_BATCHES = 4
KFAC_PERIODS: dict[str, Any] = {"stat_every": 1, "inv_every": 10}
KFAC_DAMPING = 0.1  # 1e-3 (the default) diverges on this random-label problem at lr 1e-2
_MARK = "overhead_order1::optimizer"


# ---- the optimizers ---------------------------------------------------------------------------
@dataclass(frozen=True)
class OptSpec:
    name: str
    kind: str  # "ocnopt" or "torch"
    make: Callable[[nn.Module], Any]
    description: str


def _specs() -> dict[str, OptSpec]:
    specs = [
        OptSpec("torch-sgd", "torch",
                lambda m: torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9),
                "torch.optim.SGD(lr=1e-2, momentum=0.9)"),
        OptSpec("torch-rmsprop", "torch",
                lambda m: torch.optim.RMSprop(m.parameters(), lr=1e-3),
                "torch.optim.RMSprop(lr=1e-3)"),
        OptSpec("torch-adam", "torch",
                lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
                "torch.optim.Adam(lr=1e-3)"),
        OptSpec("torch-adamw", "torch",
                lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
                "torch.optim.AdamW(lr=1e-3) (weight_decay=1e-2)"),
        OptSpec("ocnopt-sgd", "ocnopt",
                lambda m: ocnopt.OCNOpt(m, lr=1e-2, curvature="sgd", momentum=0.9),
                "OCNOpt(curvature='sgd', lr=1e-2, momentum=0.9)"),
        OptSpec("ocnopt-rmsprop", "ocnopt",
                lambda m: ocnopt.OCNOpt(m, lr=1e-3, curvature="rmsprop"),
                "OCNOpt(curvature='rmsprop', lr=1e-3)"),
        OptSpec("ocnopt-adam", "ocnopt",
                lambda m: ocnopt.OCNOpt(m, lr=1e-3, curvature="adam"),
                "OCNOpt(curvature='adam', lr=1e-3)"),
        OptSpec("ocnopt-adamw", "ocnopt",
                lambda m: ocnopt.OCNOpt(m, lr=1e-3, curvature="adamw"),
                "OCNOpt(curvature='adamw', lr=1e-3) (weight_decay=1e-2)"),
        OptSpec("ocnopt-kfac", "ocnopt",
                lambda m: ocnopt.OCNOpt(m, lr=1e-2, curvature="kfac", damping=KFAC_DAMPING,
                                        **KFAC_PERIODS),
                "OCNOpt(curvature='kfac', lr=1e-2, damping=0.1, stat_every=1, inv_every=10) "
                "(empirical Fisher, no momentum)"),
        OptSpec("ocnopt-ekfac", "ocnopt",
                lambda m: ocnopt.OCNOpt(m, lr=1e-2, curvature="ekfac", damping=KFAC_DAMPING,
                                        **KFAC_PERIODS),
                "OCNOpt(curvature='ekfac', lr=1e-2, damping=0.1, stat_every=1, inv_every=10) "
                "(empirical Fisher, no momentum)"),
    ]
    return {s.name: s for s in specs}


# (ocnopt mode, torch twin, target ratio or None, same algorithm?)
PAIRS = [
    ("ocnopt-sgd", "torch-sgd", 1.15, True),
    ("ocnopt-rmsprop", "torch-rmsprop", 1.15, True),
    ("ocnopt-adam", "torch-adam", 1.15, True),
    ("ocnopt-adamw", "torch-adamw", None, True),
    ("ocnopt-kfac", "torch-sgd", 1.6, False),
    ("ocnopt-ekfac", "torch-sgd", None, False),
]


def select(modes: str | None) -> tuple[dict[str, OptSpec], list[tuple[str, str, float | None, bool]]]:
    """The optimizers and pairs for ``--modes`` (comma-separated ocnopt modes; all if None)."""
    specs = _specs()
    if not modes:
        return specs, list(PAIRS)
    wanted = [m.strip() for m in modes.split(",") if m.strip()]
    known = [ocn.split("-", 1)[1] for ocn, *_ in PAIRS]
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; accepted {known}")
    pairs = [p for p in PAIRS if p[0].split("-", 1)[1] in wanted]
    names = {n for ocn, twin, *_ in pairs for n in (ocn, twin)}
    return {n: s for n, s in specs.items() if n in names}, pairs


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(WIDTHS) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_data(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 1)
    return [(torch.randn(BATCH, WIDTHS[0], generator=g),
             torch.randint(0, WIDTHS[-1], (BATCH,), generator=g)) for _ in range(N_BATCHES)]


class Runner:
    """One optimizer with its own model copy; ``step()`` runs one training step on the next
    batch of the shared pool (every runner sees the same batch sequence)."""

    def __init__(self, spec: OptSpec, model: nn.Module, data: list):
        self.spec, self.model, self.data = spec, model, data
        self.opt = spec.make(model)
        self.k = 0
        self.times_ns: list[int] = []
        self.block_ms: list[float] = []  # per round: mean ms per step of the block
        self.block_cpu_ms: list[float] = []  # per round: process CPU ms per step of the block
        if spec.kind == "torch":
            self.step = self._torch_step
        else:
            self.step = self._ocnopt_step

    def _torch_step(self) -> torch.Tensor:
        x, y = self.data[self.k % len(self.data)]
        self.k += 1
        opt, model = self.opt, self.model
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    def _ocnopt_step(self) -> torch.Tensor:
        x, y = self.data[self.k % len(self.data)]
        self.k += 1
        return self.opt.step(x, y)

    def run_block(self, n: int) -> float:
        t_total = 0
        c0 = time.process_time_ns()
        for _ in range(n):
            t0 = time.perf_counter_ns()
            self.step()
            dt = time.perf_counter_ns() - t0
            self.times_ns.append(dt)
            t_total += dt
        self.block_cpu_ms.append((time.process_time_ns() - c0) / n / 1e6)
        ms = t_total / n / 1e6
        self.block_ms.append(ms)
        return ms


# ---- statistics -------------------------------------------------------------------------------
def bootstrap_ratio(a: list[float], b: list[float], seed: int, n: int = 2000
                    ) -> tuple[float, float]:
    """95% interval of median(a) / median(b), resampling the rounds (pairs (a_i, b_i) kept
    together, so drift shared by a round stays shared)."""
    rng = random.Random(seed)
    idx = range(len(a))
    stats = []
    for _ in range(n):
        pick = [rng.choice(idx) for _ in idx]
        stats.append(statistics.median(a[i] for i in pick)
                     / statistics.median(b[i] for i in pick))
    return quantile(stats, 0.025), quantile(stats, 0.975)


def verdict(lo: float, hi: float, target: float | None) -> str:
    if target is None:
        return "-"
    if hi <= target:
        return "PASS"
    if lo > target:
        return "FAIL"
    return "unclear"


def summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "p25": quantile(xs, 0.25),
            "p75": quantile(xs, 0.75), "min": min(xs), "max": max(xs), "n": len(xs)}


# ---- environment ------------------------------------------------------------------------------
def loadavg() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def git_state() -> dict[str, Any]:
    """Commit of the checkout that ocnopt is imported from, and whether ocnopt/ or backends/
    differ from it (the numbers describe the code as it was at run time)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(ocnopt.__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "ocnopt",
                                "backends"], capture_output=True, text=True, timeout=10).stdout
        files = [ln[3:] for ln in dirty.splitlines() if ln.strip()]
        return {"ocnopt_path": ocnopt.__file__, "git_commit": commit,
                "ocnopt_sources_modified": bool(files) if commit else None,
                "ocnopt_modified_files": files}
    except (OSError, subprocess.SubprocessError):
        return {"ocnopt_path": ocnopt.__file__, "git_commit": None}


def environment(threads: int) -> dict[str, Any]:
    return {
        **git_state(),
        "torch_version": torch.__version__,
        "ocnopt_version": ocnopt.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "mkldnn_enabled": torch.backends.mkldnn.is_available(),
        "env_OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "env_MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
    }


# ---- memory worker (subprocess) ---------------------------------------------------------------
def memory_worker(name: str, mode: str, steps: int, seed: int) -> dict[str, Any]:
    spec = _specs()[name]
    out: dict[str, Any] = {"name": name, "mode": mode, "steps": steps}
    if mode == "tensor":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                     record_shapes=False, with_stack=False) as prof:
            data = make_data(seed)
            model = make_model(seed)
            with torch.profiler.record_function(_MARK):
                r = Runner(spec, model, data)
                for _ in range(steps):
                    r.step()
        peak, base, n_events = allocator_peak(prof, _MARK)
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        data_bytes = sum(x.numel() * x.element_size() + y.numel() * y.element_size()
                         for x, y in data)
        if base is None:  # no marker event: take model + data as counted from the tensors
            out["setup_from"] = "tensor sizes (profiler marker missing)"
            base = params + data_bytes
        out.update(peak_bytes=peak, setup_bytes=base, above_setup_bytes=peak - base,
                   n_events=n_events, param_bytes=params, data_bytes=data_bytes)
    else:
        data = make_data(seed)
        # page in the kernels' code, start the thread pools, first-use caches: a throwaway
        # run of the same optimizer on its own model, freed before the measurement
        throwaway = Runner(spec, make_model(seed + 1), data)
        for _ in range(2):
            throwaway.step()
        del throwaway
        gc.collect()
        method = reset_peak_rss()
        rss0 = status_kib("VmRSS")
        model = make_model(seed)
        r = Runner(spec, model, data)
        for _ in range(steps):
            r.step()
        hwm = peak_rss_kib(method)
        out.update(method=method, rss_start_kib=rss0, peak_rss_kib=hwm,
                   delta_peak_rss_bytes=(hwm - rss0) * 1024 if hwm and rss0 else None)
    if spec.kind == "ocnopt":
        out["skipped_steps"] = r.opt.skipped_steps
    return out


def run_memory(names: list[str], threads: int, steps: int, seed: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for name in names:
        res[name] = {}
        for mode in ("tensor", "rss"):
            cmd = [sys.executable, os.path.abspath(__file__), "--_memory-worker", name,
                   "--_memory-mode", mode, "--threads", str(threads),
                   "--memory-steps", str(steps), "--seed", str(seed)]
            env = dict(os.environ)
            if mode == "rss":  # fixed glibc mmap threshold: big blocks go back to the OS on
                env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # free, so RSS follows live memory
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            if p.returncode != 0 or not line:
                res[name][mode] = {"error": f"worker failed (rc={p.returncode}): "
                                            f"{p.stderr.strip()[-500:]}"}
            else:
                res[name][mode] = json.loads(line[-1])
    return res


# ---- per-phase breakdown (--breakdown) -------------------------------------------------------
_OCNOPT_PHASES = (("engine", "nominal", "forward (nominal pass)"),
                  ("engine", "terminal", "loss + V_x (terminal)"),
                  ("engine", "expand", "backward (expand)"),
                  ("model_", "update", "curvature update"),
                  ("engine", "apply_open_loop", "apply u += k"))


def instrument(r: Runner, clock: Callable[[], int]) -> dict[str, int]:
    """Wrap the phases of one runner's step with ``clock``; returns the accumulator."""
    acc: dict[str, int] = {}

    def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = clock()
            try:
                return fn(*a, **k)
            finally:
                acc[label] = acc.get(label, 0) + clock() - t
        return wrapper

    if r.spec.kind == "ocnopt":
        for owner_name, attr, label in _OCNOPT_PHASES:
            owner = getattr(r.opt, owner_name, None)
            if owner is not None and callable(getattr(owner, attr, None)):
                setattr(owner, attr, timed(label, getattr(owner, attr)))
    else:
        opt, model = r.opt, r.model

        def step() -> torch.Tensor:
            x, y = r.data[r.k % len(r.data)]
            r.k += 1
            timed("zero_grad", opt.zero_grad)()
            out = timed("forward", model)(x)
            loss = timed("loss", F.cross_entropy)(out, y)
            timed("backward", loss.backward)()
            timed("optimizer.step", opt.step)()
            return loss

        r.step = step  # type: ignore[method-assign]
    return acc


def breakdown(args: argparse.Namespace) -> dict[str, Any]:
    """Where each optimizer's step spends its time, phase by phase, interleaved in rounds like
    the timing. With one thread the clock is the thread's CPU time (robust to other load on the
    machine); with more, wall time (CPU time would count idle-spinning workers)."""
    one = torch.get_num_threads() == 1
    clock = time.thread_time_ns if one else time.perf_counter_ns
    data = make_data(args.seed)
    base = make_model(args.seed)
    specs, pairs = select(args.modes)
    runners = {n: Runner(s, copy.deepcopy(base), data) for n, s in specs.items()}
    accs = {n: instrument(r, clock) for n, r in runners.items()}
    totals = {n: 0 for n in runners}
    for r in runners.values():
        for _ in range(args.warmup):
            r.step()
    for a in accs.values():
        a.clear()
    rng = random.Random(args.seed)
    order = list(runners)
    for _ in range(args.repeats):
        rng.shuffle(order)
        for n in order:
            t = clock()
            for _ in range(args.block):
                runners[n].step()
            totals[n] += clock() - t
    steps = args.repeats * args.block
    out: dict[str, Any] = {"clock": "thread CPU time" if one else "wall time", "steps": steps,
                           "optimizers": {}}
    print(f"per-phase mean ms per step ({out['clock']}, {steps} steps each, "
          f"threads={torch.get_num_threads()}); 'rest' = total minus the phases listed")
    for n in runners:
        total = totals[n] / steps / 1e6
        phases = {k: v / steps / 1e6 for k, v in accs[n].items()}
        rest = total - sum(phases.values())
        out["optimizers"][n] = {"total_ms": total, "phases_ms": phases, "rest_ms": rest}
        print(f"  {n:<15} {total:7.2f} | " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
              + f", rest {rest:.2f}")
    for ocn, twin, _, _ in pairs:
        a, b = out["optimizers"][ocn]["total_ms"], out["optimizers"][twin]["total_ms"]
        print(f"  {ocn} / {twin}: {a / b:.2f}x (+{a - b:.2f} ms)")
    return out


# ---- equivalence check ------------------------------------------------------------------------
def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    with torch.no_grad():
        return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


# ---- main -------------------------------------------------------------------------------------
def fmt_mib(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--repeats", type=int, default=30,
                    help="rounds; each optimizer runs one block per round (default 30)")
    ap.add_argument("--block", type=int, default=10,
                    help="steps per optimizer per round; a multiple of inv_every=10 so every "
                         "block holds the same number of K-FAC inverse steps (default 10)")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up steps per optimizer")
    ap.add_argument("--memory-steps", type=int, default=12,
                    help="steps run by each memory subprocess (default 12: two inverse steps)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--breakdown", action="store_true",
                    help="instead of the timing table: per-phase time of every step (forward, "
                         "loss, backward, curvature update, ...), interleaved in rounds; thread "
                         "CPU time with --threads 1")
    ap.add_argument("--modes", metavar="LIST",
                    help="comma-separated ocnopt modes to run (sgd,rmsprop,adam,adamw,kfac,"
                         "ekfac) with their twins; default all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="save the results as JSON")
    ap.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_memory-mode", dest="memory_mode", default="tensor",
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*Memory block of unknown size.*")

    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.memory_mode,
                                       args.memory_steps, args.seed)))
        return 0

    if args.block % KFAC_PERIODS["inv_every"] != 0:
        ap.error(f"--block must be a multiple of inv_every={KFAC_PERIODS['inv_every']}")

    started = datetime.datetime.now(datetime.timezone.utc)
    if args.breakdown:
        env = {**environment(args.threads), "loadavg": loadavg()}
        print(f"# ocnopt order-1 step breakdown: MLP {'-'.join(map(str, WIDTHS))}, batch {BATCH}; "
              f"torch {env['torch_version']}, threads {env['torch_num_threads']}, "
              f"cpu '{env['cpu_model']}' x{env['cpu_count']}, load {env['loadavg']}, "
              f"git {env.get('git_commit')} (modified: {env.get('ocnopt_sources_modified')})")
        bd = breakdown(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"benchmark": "overhead_order1 --breakdown", "issue": 2,
                           "command": " ".join(["python", *sys.argv]),
                           "started_utc": started.isoformat(), "environment": env,
                           "config": vars(args), **bd}, f, indent=2)
            print(f"# saved {args.json}")
        return 0
    specs, pairs_sel = select(args.modes)
    data = make_data(args.seed)
    base_model = make_model(args.seed)
    runners = {n: Runner(s, copy.deepcopy(base_model), data) for n, s in specs.items()}
    env = environment(args.threads)
    print(f"# ocnopt order-1 overhead: MLP {'-'.join(map(str, WIDTHS))} (ReLU), batch {BATCH}, "
          f"random data, float32, CPU")
    print(f"# torch {env['torch_version']}, threads={env['torch_num_threads']} "
          f"(interop {env['torch_num_interop_threads']}), cpu_count={env['cpu_count']}, "
          f"cpu='{env['cpu_model']}', processor='{env['processor']}', {env['platform']}")
    print(f"# ocnopt {env['ocnopt_version']} from {env['ocnopt_path']}, git commit "
          f"{env.get('git_commit')}, uncommitted changes under ocnopt/ or backends/: "
          f"{env.get('ocnopt_modified_files') or 'none'}")
    print(f"# warm-up {args.warmup} steps each; {args.repeats} rounds x {args.block} steps per "
          f"optimizer, order reshuffled each round (seed {args.seed})", flush=True)

    # warm-up: every runner does the same number of steps on the same batch sequence. Sanity
    # check after the first step: each ocnopt mode moved the parameters as its twin did (later
    # steps drift apart for rmsprop/adam: their normalised updates turn float32 rounding of
    # near-cancelling gradient sums into differences of order lr, which training amplifies)
    t0 = time.perf_counter()
    equivalence: dict[str, dict[str, float]] = {}
    for i in range(max(1, args.warmup)):
        for r in runners.values():
            r.step()
        if i == 0:
            for ocn, twin, _, same in pairs_sel:
                if same:
                    equivalence[ocn] = {
                        "max_abs_diff": max_param_diff(runners[ocn].model, runners[twin].model),
                        "max_abs_step": max_param_diff(runners[twin].model, base_model)}
    print(f"# warm-up done in {time.perf_counter() - t0:.1f} s; after the first step, max "
          "|param difference| ocnopt vs twin (max |step| of the twin): "
          + ", ".join(f"{k.split('-', 1)[1]} {v['max_abs_diff']:.1e} ({v['max_abs_step']:.1e})"
                      for k, v in equivalence.items()), flush=True)

    # timed rounds, interleaved
    load_before = loadavg()
    rng = random.Random(args.seed)
    order = list(runners)
    t0 = time.perf_counter()
    for i in range(args.repeats):
        rng.shuffle(order)
        for n in order:
            runners[n].run_block(args.block)
        if (i + 1) % max(1, args.repeats // 4) == 0:
            print(f"# round {i + 1}/{args.repeats} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    timing_s = time.perf_counter() - t0
    load_after = loadavg()

    results: dict[str, Any] = {}
    for n, r in runners.items():
        step_ms = [t / 1e6 for t in r.times_ns]
        results[n] = {
            "description": r.spec.description,
            "block_mean_ms": summary(r.block_ms),
            "block_cpu_ms": summary(r.block_cpu_ms),
            "step_ms": summary(step_ms),
            "rounds_block_ms": r.block_ms,
            "rounds_block_cpu_ms": r.block_cpu_ms,
            "final_loss": float(r.step().detach()),
        }
        if r.spec.kind == "ocnopt":
            results[n]["skipped_steps"] = r.opt.skipped_steps

    memory = None
    if not args.no_memory:
        print("# memory: one subprocess per optimizer and mode ...", flush=True)
        memory = run_memory(list(specs), args.threads, args.memory_steps, args.seed)
        for n in specs:
            results[n]["memory"] = memory[n]

    def t_of(n: str) -> float:
        return results[n]["block_mean_ms"]["median"]

    def mem_of(n: str, key: str) -> float | None:
        m = results[n].get("memory", {})
        v = m.get("tensor" if key != "delta_peak_rss_bytes" else "rss", {}).get(key)
        return None if v is None else float(v)

    pairs = []
    for ocn, twin, target, same in pairs_sel:
        paired = [a / b for a, b in zip(runners[ocn].block_ms, runners[twin].block_ms)]
        ratio = t_of(ocn) / t_of(twin)
        lo, hi = bootstrap_ratio(runners[ocn].block_ms, runners[twin].block_ms, args.seed)
        clo, chi = bootstrap_ratio(runners[ocn].block_cpu_ms, runners[twin].block_cpu_ms,
                                   args.seed)
        cpu_ratio = (results[ocn]["block_cpu_ms"]["median"]
                     / results[twin]["block_cpu_ms"]["median"])
        entry: dict[str, Any] = {
            "ocnopt": ocn, "twin": twin, "ocnopt_ms": t_of(ocn), "twin_ms": t_of(twin),
            "ratio": ratio, "paired_ratio": summary(paired),
            "step_median_ratio": results[ocn]["step_ms"]["median"]
            / results[twin]["step_ms"]["median"],
            "ratio_ci95": [lo, hi], "verdict_ci95": verdict(lo, hi, target),
            "cpu_ratio": cpu_ratio, "cpu_ratio_ci95": [clo, chi],
            "cpu_pass": None if target is None else cpu_ratio <= target,
            "cpu_verdict_ci95": verdict(clo, chi, target),
            "target": target, "pass": None if target is None else ratio <= target,
            "same_algorithm": same, "first_step_param_diff": equivalence.get(ocn),
        }
        if memory is not None:
            for key in ("peak_bytes", "above_setup_bytes", "delta_peak_rss_bytes"):
                a, b = mem_of(ocn, key), mem_of(twin, key)
                entry[key] = {"ocnopt": a, "twin": b,
                              "ratio": a / b if a is not None and b else None}
        pairs.append(entry)

    # tables
    print()
    print(f"time per step = median over {args.repeats} rounds of the mean wall time of a "
          f"{args.block}-step block (K-FAC/EKFAC inverse amortised). ratio = ocnopt / twin; "
          "CI = 95% bootstrap interval over rounds; cpu = the same with process CPU time. "
          "result = ratio <= target; CI verdict: PASS if the whole CI <= target, FAIL if it is "
          "all above, else unclear")
    print(f"load average (1/5/15 min) before timing {load_before}, after {load_after}, on "
          f"{env['cpu_count']} CPUs; threads={env['torch_num_threads']}")
    hdr = (f"{'ocnopt mode':<14} {'twin':<13} {'ocnopt ms':>9} {'twin ms':>8} {'ratio':>6} "
           f"{'95% CI':>11} {'cpu':>6} {'cpu 95% CI':>11} {'target':>6} {'result':>6} "
           f"{'CI verdict':>10}")
    print(hdr)
    print("-" * len(hdr))
    for e in pairs:
        lo, hi = e["ratio_ci95"]
        clo, chi = e["cpu_ratio_ci95"]
        res = "-" if e["target"] is None else ("PASS" if e["pass"] else "FAIL")
        tgt = "-" if e["target"] is None else f"{e['target']:.2f}x"
        print(f"{e['ocnopt']:<14} {e['twin']:<13} {e['ocnopt_ms']:9.2f} {e['twin_ms']:8.2f} "
              f"{e['ratio']:5.2f}x {lo:5.2f}-{hi:<5.2f} {e['cpu_ratio']:5.2f}x "
              f"{clo:5.2f}-{chi:<5.2f} {tgt:>6} {res:>6} {e['verdict_ci95']:>10}")
    if memory is not None:
        print()
        print("memory (MiB, ocnopt / twin, one subprocess each, "
              f"{args.memory_steps} steps): tensor peak = peak live bytes of torch's CPU "
              "allocator (torch.profiler memory events) = model + data + grads + optimizer state "
              "+ temporaries; opt+step = the part above model + data; dRSS = growth of the "
              "peak resident set over the run (OS view, coarser)")
        hdr = (f"{'ocnopt mode':<14} {'twin':<13} {'tensor peak':>17} {'ratio':>6} "
               f"{'opt+step':>15} {'ratio':>6} {'dRSS':>15} {'ratio':>6}")
        print(hdr)
        print("-" * len(hdr))
        for e in pairs:
            cells = []
            for key in ("peak_bytes", "above_setup_bytes", "delta_peak_rss_bytes"):
                m = e[key]
                rr = "n/a" if m["ratio"] is None else f"{m['ratio']:5.2f}x"
                cells.append(f"{fmt_mib(m['ocnopt']):>7} / {fmt_mib(m['twin']):<7} {rr:>6}")
            print(f"{e['ocnopt']:<14} {e['twin']:<13} " + " ".join(cells))
    print()
    print(f"{'optimizer':<15} {'block ms (p25-p75)':>24} {'cpu ms':>8} {'step median ms':>15} "
          f"{'final loss':>10}")
    for n, res_n in results.items():
        b, s, c = res_n["block_mean_ms"], res_n["step_ms"], res_n["block_cpu_ms"]
        print(f"{n:<15} {b['median']:8.2f} ({b['p25']:6.2f}-{b['p75']:7.2f}) {c['median']:8.2f} "
              f"{s['median']:15.2f} {res_n['final_loss']:10.4f}")
    skipped = {n: r["skipped_steps"] for n, r in results.items() if r.get("skipped_steps")}
    if skipped:
        print(f"WARNING: ocnopt skipped non-finite steps (timings not comparable): {skipped}")
    print(f"# timing phase {timing_s:.0f} s; completed")

    if args.json:
        payload = {
            "benchmark": "overhead_order1",
            "issue": 2,
            "command": " ".join(["python", *sys.argv]),
            "python_executable": sys.executable,
            "started_utc": started.isoformat(),
            "completed": True,
            "config": {
                "model": f"MLP {'-'.join(map(str, WIDTHS))} ReLU", "batch": BATCH,
                "n_batches": N_BATCHES, "dtype": "float32", "device": "cpu",
                "seed": args.seed, "warmup": args.warmup, "repeats": args.repeats,
                "block": args.block, "memory_steps": args.memory_steps, "modes": args.modes,
                "kfac_periods": KFAC_PERIODS, "kfac_damping": KFAC_DAMPING,
                "timing": "median over rounds of the block mean step time; rounds interleave "
                          "all optimizers in a shuffled order",
                "memory": "tensor: peak live bytes of torch's CPU allocator from "
                          "torch.profiler(profile_memory=True) memory events, from before the "
                          "model is built; rss: growth of peak RSS (VmHWM reset via clear_refs)"
                          "; one subprocess per optimizer and mode",
            },
            "environment": {**env, "loadavg_before_timing": load_before,
                            "loadavg_after_timing": load_after},
            "optimizers": results,
            "pairs": pairs,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"# saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
