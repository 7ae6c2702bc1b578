"""pytest-benchmark cases for the Mamba-2 gated RMSNorm (forward; forward + backward), small and fast on CPU.

Run with ``pytest bench/ --benchmark-json x.json``. Runs the machine's default backend (Triton on
CUDA, the torch reference on CPU), checks the result (or the gradients, against autograd through
the formula) once first, then
times it with the harness (per-call CUDA events on a GPU, ``perf_counter`` on CPU; rotating input sets).
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import CLOCK, clocked, input_sets
from triton_kernels import rms_norm_gated

pytestmark = pytest.mark.benchmark(timer=CLOCK)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 20
ROWS, HIDDEN, GROUP, EPS = 512, 1024, 256, 1e-6


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _inputs() -> dict:
    return dict(x=torch.randn(ROWS, HIDDEN, device=DEVICE), z=torch.randn(ROWS, HIDDEN, device=DEVICE),
                weight=torch.randn(HIDDEN, device=DEVICE))


def _train_inputs() -> dict:
    return {**{k: t.requires_grad_() for k, t in _inputs().items()}, "dy": torch.randn(ROWS, HIDDEN, device=DEVICE)}


def _call(s: dict) -> torch.Tensor:
    return rms_norm_gated(s["x"], s["weight"], s["z"], EPS, group_size=GROUP, norm_before_gate=False)


def _train_step(s: dict) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(_call(s), (s["x"], s["weight"], s["z"]), s["dy"])


def _formula(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    h = (x.double() * torch.nn.functional.silu(z.double())).view(ROWS, -1, GROUP)  # HF's order: gate first
    return (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + EPS)).view(ROWS, HIDDEN) * weight.double()


def test_bench_rms_norm_gated(benchmark):
    sets = input_sets(_inputs, DEVICE)
    s = sets[0]
    assert _rel(_call(s), _formula(s["x"], s["weight"], s["z"])) < 1e-5
    benchmark.pedantic(clocked(_call, sets, DEVICE), rounds=ROUNDS)


def test_bench_rms_norm_gated_fwd_bwd(benchmark):
    sets = input_sets(_train_inputs, DEVICE)
    s = sets[0]
    inputs = [s[k].detach().double().requires_grad_() for k in ("x", "weight", "z")]
    expect = torch.autograd.grad(_formula(*inputs), inputs, s["dy"].double())
    for got, want in zip(_train_step(s), expect):
        assert _rel(got, want) < 1e-5
    benchmark.pedantic(clocked(_train_step, sets, DEVICE), rounds=ROUNDS)
