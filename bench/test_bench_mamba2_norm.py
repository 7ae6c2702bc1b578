"""pytest-benchmark case for the Mamba-2 gated RMSNorm, small and fast on CPU.

Run with ``pytest bench/ --benchmark-json x.json``. Runs the machine's default backend (Triton on
CUDA, the torch reference on CPU), checks the result against a direct formula once first, then
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


def _call(s: dict) -> torch.Tensor:
    return rms_norm_gated(s["x"], s["weight"], s["z"], EPS, group_size=GROUP, norm_before_gate=False)


def test_bench_rms_norm_gated(benchmark):
    sets = input_sets(_inputs, DEVICE)
    s = sets[0]
    h = (s["x"].double() * torch.nn.functional.silu(s["z"].double())).view(ROWS, -1, GROUP)  # HF's order: gate first
    expect = (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + EPS)).view(ROWS, HIDDEN) * s["weight"].double()
    assert _rel(_call(s), expect) < 1e-5
    benchmark.pedantic(clocked(_call, sets, DEVICE), rounds=ROUNDS)
