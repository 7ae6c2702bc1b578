"""pytest-benchmark case for the Mamba-2 decode step (``selective_state_update`` with heads), small
and fast on CPU.

Run with ``pytest bench/ --benchmark-json x.json``. Runs the machine's default backend (Triton on
CUDA, the torch reference on CPU), checks the result against a direct formula once first, then
times it with the harness (per-call CUDA events on a GPU, ``perf_counter`` on CPU; rotating input sets).
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import CLOCK, clocked, input_sets
from triton_kernels import selective_state_update

pytestmark = pytest.mark.benchmark(timer=CLOCK)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 20
BATCH, HEADS, HEAD_DIM, DSTATE, GROUPS = 8, 16, 64, 128, 2


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _inputs() -> dict:
    b, h, p, n = BATCH, HEADS, HEAD_DIM, DSTATE

    def per_head(*inner: int) -> torch.Tensor:  # [H] expanded with stride 0, as Mamba-2 passes them
        return torch.randn(h, device=DEVICE).view(h, *(1 for _ in inner)).expand(h, *inner)

    return dict(state=torch.randn(2 * b, h, p, n, device=DEVICE), x=torch.randn(b, h, p, device=DEVICE),
                dt=torch.randn(b, h, device=DEVICE)[..., None].expand(b, h, p), A=-per_head(p, n).abs(),
                B=torch.randn(b, GROUPS, n, device=DEVICE), C=torch.randn(b, GROUPS, n, device=DEVICE),
                D=per_head(p), z=torch.randn(b, h, p, device=DEVICE), dt_bias=per_head(p), dt_softplus=True,
                state_batch_indices=torch.arange(b, device=DEVICE, dtype=torch.int32) * 2)


def test_bench_mamba2_decode_step(benchmark):
    sets = input_sets(_inputs, DEVICE)
    s = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in sets[0].items()}
    slots, dt = s["state_batch_indices"].long(), torch.nn.functional.softplus(s["dt"] + s["dt_bias"])
    Bh, Ch = (s[k].repeat_interleave(HEADS // GROUPS, dim=1)[:, :, None] for k in ("B", "C"))  # [B, H, 1, N]
    expect = s["state"][slots] * torch.exp(dt[..., None] * s["A"]) + (dt * s["x"])[..., None] * Bh
    y = selective_state_update(**sets[0])
    assert _rel(sets[0]["state"][slots], expect) < 1e-5
    y_expect = ((expect * Ch).sum(-1) + s["D"] * s["x"]) * torch.nn.functional.silu(s["z"])
    assert _rel(y, y_expect) < 1e-5
    benchmark.pedantic(clocked(lambda k: selective_state_update(**k), sets, DEVICE), rounds=ROUNDS)
