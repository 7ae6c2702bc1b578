"""pytest-benchmark cases for the causal conv, small and fast on CPU.

Run with ``pytest bench/ --benchmark-json x.json``. Runs the machine's default backend (Triton on
CUDA, the torch reference on CPU), checks the result against the reference once first, then times
it with the harness (per-call CUDA events on a GPU, ``perf_counter`` on CPU; rotating input sets).
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import CLOCK, clocked, input_sets
from triton_kernels.mamba.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from triton_kernels.mamba.ops_torch import causal_conv1d_fn_ref

pytestmark = pytest.mark.benchmark(timer=CLOCK)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 20


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_bench_causal_conv1d_fn(benchmark):
    sets = input_sets(lambda: [torch.randn(*s, device=DEVICE) for s in ((2, 512, 512), (512, 4), (512,))], DEVICE)
    x, weight, bias = sets[0]
    assert _rel(causal_conv1d_fn(x, weight, bias, "silu"), causal_conv1d_fn_ref(x, weight, bias, True)[0]) < 1e-5
    benchmark.pedantic(clocked(lambda s: causal_conv1d_fn(*s, "silu"), sets, DEVICE), rounds=ROUNDS)


def test_bench_causal_conv1d_update(benchmark):
    sets = input_sets(lambda: [torch.randn(*s, device=DEVICE) for s in ((64, 2048), (64, 2048, 3), (2048, 4))],
                      DEVICE)
    x, state, weight = sets[0]
    history = state.clone()
    out = causal_conv1d_update(x, state, weight, None, "silu")
    whole = torch.cat([history, x[..., None]], -1)
    assert _rel(out, torch.nn.functional.silu((whole * weight).sum(-1))) < 1e-5
    benchmark.pedantic(clocked(lambda s: causal_conv1d_update(s[0], s[1], s[2], None, "silu"), sets, DEVICE),
                       rounds=ROUNDS)
