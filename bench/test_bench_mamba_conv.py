"""pytest-benchmark cases for the Mamba decode state update and the causal conv, small and fast on CPU.

Run with ``pytest bench/ --benchmark-json x.json``. Runs the machine's default backend (Triton on
CUDA, the torch reference on CPU) and checks the result against the reference once first.
"""

from __future__ import annotations

import torch

from triton_kernels.mamba.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from triton_kernels.mamba.conv_reference import causal_conv1d_fn_ref
from triton_kernels.mamba.state_update import selective_state_update

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_bench_selective_state_update(benchmark):
    batch, dim, dstate = 16, 1024, 16
    state = torch.randn(2 * batch, dim, dstate, device=DEVICE)
    slots = torch.arange(batch, device=DEVICE, dtype=torch.int32) * 2
    x, dt = torch.randn(batch, dim, device=DEVICE), torch.randn(batch, dim, device=DEVICE)
    A, B, C = -torch.rand(dim, dstate, device=DEVICE), *torch.randn(2, batch, dstate, device=DEVICE)
    expect = state[slots.long()] * torch.exp(torch.nn.functional.softplus(dt)[..., None] * A) + (
        torch.nn.functional.softplus(dt) * x
    )[..., None] * B[:, None]
    y = selective_state_update(state, x, dt, A, B, C, dt_softplus=True, state_batch_indices=slots)
    assert _rel(state[slots.long()], expect) < 1e-5
    assert _rel(y, (expect * C[:, None]).sum(-1)) < 1e-5
    benchmark(selective_state_update, state, x, dt, A, B, C, dt_softplus=True, state_batch_indices=slots)


def test_bench_causal_conv1d_fn(benchmark):
    x, weight, bias = (torch.randn(*s, device=DEVICE) for s in ((2, 512, 512), (512, 4), (512,)))
    out = benchmark(causal_conv1d_fn, x, weight, bias, "silu")
    assert _rel(out, causal_conv1d_fn_ref(x, weight, bias, True)[0]) < 1e-5


def test_bench_causal_conv1d_update(benchmark):
    x, weight = torch.randn(64, 2048, device=DEVICE), torch.randn(2048, 4, device=DEVICE)
    state = torch.randn(64, 2048, 3, device=DEVICE)
    history = state.clone()
    out = causal_conv1d_update(x, state, weight, None, "silu")
    whole = torch.cat([history, x[..., None]], -1)
    assert _rel(out, torch.nn.functional.silu((whole * weight).sum(-1))) < 1e-5
    benchmark(causal_conv1d_update, x, state, weight, None, "silu")
