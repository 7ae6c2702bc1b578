"""pytest-benchmark case for the Mamba decode state update, small and fast on CPU.

Run with ``pytest bench/ --benchmark-json x.json``. Runs the machine's default backend (Triton on
CUDA, the torch reference on CPU), checks the result against a direct formula once first, then
times it with the harness (per-call CUDA events on a GPU, ``perf_counter`` on CPU; rotating input sets).
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import CLOCK, clocked, input_sets
from triton_kernels.mamba.state_update import selective_state_update

pytestmark = pytest.mark.benchmark(timer=CLOCK)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 20
BATCH, DIM, DSTATE = 16, 1024, 16


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _inputs() -> dict:
    return dict(state=torch.randn(2 * BATCH, DIM, DSTATE, device=DEVICE), x=torch.randn(BATCH, DIM, device=DEVICE),
                dt=torch.randn(BATCH, DIM, device=DEVICE), A=-torch.rand(DIM, DSTATE, device=DEVICE),
                B=torch.randn(BATCH, DSTATE, device=DEVICE), C=torch.randn(BATCH, DSTATE, device=DEVICE),
                dt_softplus=True, state_batch_indices=torch.arange(BATCH, device=DEVICE, dtype=torch.int32) * 2)


def test_bench_selective_state_update(benchmark):
    sets = input_sets(_inputs, DEVICE)
    s = sets[0]
    slots, dt = s["state_batch_indices"].long(), torch.nn.functional.softplus(s["dt"])
    expect = s["state"][slots] * torch.exp(dt[..., None] * s["A"]) + (dt * s["x"])[..., None] * s["B"][:, None]
    y = selective_state_update(**s)
    assert _rel(s["state"][slots], expect) < 1e-5
    assert _rel(y, (expect * s["C"][:, None]).sum(-1)) < 1e-5
    benchmark.pedantic(clocked(lambda k: selective_state_update(**k), sets, DEVICE), rounds=ROUNDS)
