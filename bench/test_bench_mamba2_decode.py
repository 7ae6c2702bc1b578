"""pytest-benchmark cases for the Mamba-2 decode side, small and fast on CPU.

Run with ``pytest bench/ --benchmark-json x.json``. Each case checks its result against the
reference once, so a wrong fast kernel cannot pass.
"""

from __future__ import annotations

import torch

from triton_kernels import rms_norm_gated, selective_state_update
from triton_kernels.mamba.conv_reference import selective_state_update_ref
from triton_kernels.mamba2.rms_norm_gated import rms_norm_gated_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_bench_rms_norm_gated(benchmark):
    x, z = torch.randn(512, 1024, device=DEVICE), torch.randn(512, 1024, device=DEVICE)
    w = torch.randn(1024, device=DEVICE)
    out = benchmark(rms_norm_gated, x, w, z, group_size=256, norm_before_gate=False)
    assert _rel(out, rms_norm_gated_ref(x, w, z, 1e-6, 256, False)) < 1e-5


def test_bench_mamba2_decode_step(benchmark):
    batch, heads, p, n = 8, 16, 64, 128
    state = torch.randn(batch, heads, p, n, device=DEVICE)
    x, z = torch.randn(batch, heads, p, device=DEVICE), torch.randn(batch, heads, p, device=DEVICE)
    dt = torch.randn(batch, heads, device=DEVICE)[..., None].expand(batch, heads, p)
    A = -torch.rand(heads, device=DEVICE)[:, None, None].expand(heads, p, n)
    D, dt_bias = (torch.randn(heads, device=DEVICE)[:, None].expand(heads, p) for _ in range(2))
    B, C = torch.randn(batch, 2, n, device=DEVICE), torch.randn(batch, 2, n, device=DEVICE)
    ref_state, ref_out = state.clone(), torch.empty_like(x)
    selective_state_update_ref(ref_state, x, dt, A, B, C, D, z, dt_bias, True, None, -1, ref_out)
    out = selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True)
    assert _rel(out, ref_out) < 1e-5
    assert _rel(state, ref_state) < 1e-5
    benchmark(selective_state_update, state, x, dt, A, B, C, D, z, dt_bias, True)
