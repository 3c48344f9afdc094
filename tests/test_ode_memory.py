"""Identity 13, memory: the peak memory of an order-2 step with an ODE block does not grow with
the number of solver steps N (the expansion is one backward solve, not a stored trajectory).

Each step count runs in a fresh subprocess that reports its peak resident set size
(``resource.getrusage``). State: B = 32 samples of n = 256 float64 numbers (64 KiB a state);
rk4 with N = 200 steps evaluates the field 800 times, so any storage of the trajectory costs at
least 800 states = 50 MiB (backpropagation through the solver, ``odeint`` without the adjoint,
measured 267 MiB more at N = 200 than at N = 10). The bound allows 24 MiB of allocator noise.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torchdiffeq")

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from torch import nn
    import ocnopt
    from ocnopt.ode import ODEBlock
    N = int(sys.argv[1])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, B = 256, 32
    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(n, 8), nn.Linear(8, n)
        def forward(self, t, x):
            return self.b(torch.tanh(self.a(x)))
    model = nn.Sequential(ODEBlock(Field(), method="rk4", options={"step_size": 1.0 / N}),
                          nn.Linear(n, 3)).double()
    x, y = torch.randn(B, n, dtype=torch.float64), torch.randint(0, 3, (B,))
    opt = ocnopt.OCNOpt(model, loss="cross_entropy", lr=0.01, curvature="sgd",
                        backend="lowrank", order=2)
    opt.step(x, y)
    assert opt.last_step is not None and not opt.last_step.skipped
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def peak_kib(N: int) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(N)], capture_output=True, text=True,
                         check=True, timeout=300)
    return int(out.stdout.strip().splitlines()[-1])


def test_order2_peak_memory_does_not_grow_with_steps():
    small, large = peak_kib(10), peak_kib(200)
    assert large - small < 24 * 1024, (small, large)
