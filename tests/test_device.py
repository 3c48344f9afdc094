"""Device-agnostic code: every backend, curvature model and order on a CUDA device gives the
CPU's steps (float64), keeps its state on the device, and checkpoints across devices.

Skipped where no CUDA device is present (CI); run on a GPU machine with
``pytest tests/test_device.py``."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import ocnopt

# OCNOPT_TEST_DEVICE=cpu runs the same checks against the CPU (a dry run of the test logic)
DEVICE = os.environ.get("OCNOPT_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device")

CONFIGS = [
    # (backend, order, curvature, extra options)
    ("autograd", 1, "sgd", {"momentum": 0.9}),
    ("autograd", 1, "rmsprop", {}),
    ("autograd", 1, "adam", {}),
    ("autograd", 1, "kfac", {"fisher_type": "mc"}),
    ("autograd", 1, "ekfac", {"fisher_type": "type-2"}),
    ("autograd", 2, "full", {}),
    ("autograd", 2, "adam", {}),
    ("autograd", 2, "kfac", {"fisher_type": "type-2"}),
    ("lowrank", 2, "adam", {}),
    ("lowrank", 2, "kfac", {}),
    ("lowrank", 2, "ekfac", {"fisher_type": "mc"}),
    ("lowrank", 2, "rmsprop", {"backend_options": {"terminal": "exact"}}),
    ("backpack", 2, "kfac", {"backend_options": {"extension": "kfac"}}),
    ("backpack", 1, "ekfac", {"backend_options": {"extension": "kflr"}}),
]


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 4)).double()


def cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 4)).double()


def batches(conv: bool, n: int = 4, B: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    # cnn: more samples than the 28 input rows of the second convolution (one output position),
    # so that A has full rank: EKFAC's eigenvalue correction is not invariant to the basis
    # chosen inside a degenerate eigenspace, which CPU and GPU eigensolvers choose differently
    B = B or (40 if conv else 8)
    shape = (B, 1, 6, 6) if conv else (B, 6)
    return [(torch.randn(shape, generator=g, dtype=torch.float64),
             torch.randint(0, 4, (B,), generator=g)) for _ in range(n)]


def run(config, conv: bool, device: str):
    backend, order, curvature, extra = config
    model = (cnn if conv else mlp)(0).to(device)
    opt = ocnopt.OCNOpt(model, backend=backend, order=order, curvature=curvature,
                        lr=0.05 if curvature != "full" else 0.5, track_loss_after=True, **extra)
    losses = []
    for x, y in batches(conv):
        losses.append(float(opt.step(x.to(device), y.to(device))))
    return model, opt, losses


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "cnn"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-o{c[1]}-{c[2]}")
def test_cuda_steps_equal_cpu_steps_in_float64(config, conv):
    """Same model, batches and seed: the parameters after 4 steps agree to 1e-9 (cuBLAS and
    CPU BLAS sum in different orders), the state lives on the device, and mc sampling draws the
    same labels (the optimizer's sampling generator lives on the CPU for every device)."""
    if conv and config[2] == "full" and config[1] == 2:
        pytest.skip("exact full curvature: MLP only (memory budget)")
    cpu_model, cpu_opt, cpu_losses = run(config, conv, "cpu")
    gpu_model, gpu_opt, gpu_losses = run(config, conv, DEVICE)
    assert gpu_opt.skipped_steps == cpu_opt.skipped_steps == 0
    # BackPACK's KFAC extension samples with the device's global RNG (seeded from the
    # optimizer's generator): other draws on another device, so only the first loss agrees
    same_draws = config[3].get("backend_options", {}).get("extension") != "kfac"
    n = len(cpu_losses) if same_draws else 1
    assert gpu_losses[:n] == pytest.approx(cpu_losses[:n], rel=1e-9)
    for a, b in zip(cpu_model.parameters(), gpu_model.parameters()):
        assert b.device.type == DEVICE
        if same_draws:
            torch.testing.assert_close(b.cpu(), a, rtol=1e-8, atol=1e-10)
    for p in gpu_model.parameters():
        for key, v in gpu_opt.state[p].items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                assert v.device.type == DEVICE, key
    assert gpu_opt.generator.device.type == "cpu"


@pytest.mark.parametrize("config", [CONFIGS[3], CONFIGS[9], CONFIGS[12]],
                         ids=["autograd-kfac-mc", "lowrank-kfac", "backpack-kfac"])
def test_cuda_checkpoint_round_trip_and_cpu_map_location(config, tmp_path):
    """A checkpoint saved on CUDA continues bit for bit on CUDA, and loads on the CPU."""
    data = batches(False, n=6)
    model, opt, _ = run(config, False, DEVICE)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    backend, order, curvature, extra = config
    twin = mlp(1).to(DEVICE)
    twin_opt = ocnopt.OCNOpt(twin, backend=backend, order=order, curvature=curvature, lr=0.05,
                             track_loss_after=True, **extra)
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    twin.load_state_dict(ck["model"])
    twin_opt.load_state_dict(ck["opt"])
    for x, y in data[4:]:
        a = opt.step(x.to(DEVICE), y.to(DEVICE))
        b = twin_opt.step(x.to(DEVICE), y.to(DEVICE))
        assert float(a) == float(b)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)

    cpu_ck = torch.load(tmp_path / "ck.pt", map_location="cpu", weights_only=False)
    cpu = mlp(1)
    cpu.load_state_dict(cpu_ck["model"])
    cpu_opt = ocnopt.OCNOpt(cpu, backend=backend, order=order, curvature=curvature, lr=0.05,
                            **extra)
    cpu_opt.load_state_dict(cpu_ck["opt"])
    x, y = data[5]
    assert torch.isfinite(cpu_opt.step(x, y))
    assert cpu_opt.skipped_steps == 0


def test_cuda_dropout_mask_is_replayed_in_the_update_pass():
    """Order 2 with Dropout on CUDA: at lr 0 the update pass reproduces the nominal loss, so the
    mask drawn in the nominal pass is the one replayed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4)).to(DEVICE)
    model.train()
    opt = ocnopt.OCNOpt(model, backend="lowrank", order=2, curvature="adam", lr=0.0)
    x, y = batches(False)[0]
    loss = opt.step(x.float().to(DEVICE), y.to(DEVICE))
    assert opt.last_step.loss_after == pytest.approx(float(loss), rel=1e-6)


def test_cuda_float32_training_reduces_the_loss():
    """float32 on CUDA (the common case): 30 steps of lowrank kfac order 2 reduce the loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4)).to(DEVICE)
    opt = ocnopt.OCNOpt(model, backend="lowrank", order=2, curvature="kfac", lr=0.05)
    x = batches(False, n=1, B=64)[0][0].float()
    y = (x @ torch.linspace(-1, 1, 24).reshape(6, 4)).argmax(1)  # a learnable teacher
    x, y = x.to(DEVICE), y.to(DEVICE)
    first = float(opt.step(x, y))
    for _ in range(30):
        last = float(opt.step(x, y))
    assert last < 0.5 * first
