"""pytest-benchmark cases for the selective scan, small and fast on CPU.

Run with ``pytest bench/ --benchmark-json x.json``. Runs the default backend of the machine (the
C++ kernel on CPU, Triton on CUDA), checks the result against the reference once first, so a
wrong fast kernel cannot pass, then times it with the harness (per-call CUDA events on a GPU,
``perf_counter`` on CPU; rotating input sets).
"""

from __future__ import annotations

import pytest
import torch

from bench.bench_mamba import _scan_inputs
from bench.harness import CLOCK, clocked, input_sets
from triton_kernels import selective_scan_fn, selective_scan_varlen
from triton_kernels.mamba.ops_torch import selective_scan_ref, selective_scan_varlen_ref

pytestmark = pytest.mark.benchmark(timer=CLOCK)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 20


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize(("dim", "seqlen"), [(256, 256), (512, 1024)], ids=["D256-L256", "D512-L1024"])
def test_bench_selective_scan_fn(benchmark, dim, seqlen):
    sets = input_sets(lambda: _scan_inputs(1, dim, 16, seqlen, torch.float32, DEVICE), DEVICE)
    out = selective_scan_fn(**sets[0], delta_softplus=True)
    assert _rel(out, selective_scan_ref(**sets[0], delta_softplus=True)[0]) < 1e-5
    benchmark.pedantic(clocked(lambda a: selective_scan_fn(**a, delta_softplus=True), sets, DEVICE), rounds=ROUNDS)


def _varlen_inputs() -> dict:
    a = _scan_inputs(1, 256, 16, 512, torch.float32, DEVICE)
    packed = {k: (v[0] if v.dim() == 3 else v) for k, v in a.items()}
    packed["B"], packed["C"] = packed["B"][None], packed["C"][None]
    return dict(**packed, ssm_states=torch.randn(3, 256, 16, device=DEVICE), delta_softplus=True,
                query_start_loc=torch.tensor([0, 300, 301, 512], dtype=torch.int32, device=DEVICE),
                has_initial_state=torch.tensor([True, False, True], device=DEVICE))


def test_bench_selective_scan_varlen(benchmark):
    sets = input_sets(_varlen_inputs, DEVICE)
    kw = sets[0]
    ref_states = kw["ssm_states"].clone()
    ref = selective_scan_varlen_ref(
        torch.empty(256, 512, device=DEVICE), ref_states,
        *(kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
        True, kw["query_start_loc"], None, kw["has_initial_state"], -1)
    out = selective_scan_varlen(**kw)
    assert _rel(out, ref) < 1e-5
    assert _rel(kw["ssm_states"], ref_states) < 1e-5
    benchmark.pedantic(clocked(lambda s: selective_scan_varlen(**s), sets, DEVICE), rounds=ROUNDS)
