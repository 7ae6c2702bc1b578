"""pytest-benchmark cases for the selective scan, small and fast on CPU.

Run with ``pytest bench/ --benchmark-json x.json``.

Runs the default backend of the machine (the C++ kernel on CPU, Triton on CUDA) and checks each
result against the reference once, so a wrong fast kernel cannot pass.
"""

from __future__ import annotations

import pytest
import torch

from bench.bench_mamba import _scan_inputs
from triton_kernels import selective_scan_fn, selective_scan_varlen
from triton_kernels.mamba.reference import selective_scan_ref, selective_scan_varlen_ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize(("dim", "seqlen"), [(256, 256), (512, 1024)], ids=["D256-L256", "D512-L1024"])
def test_bench_selective_scan_fn(benchmark, dim, seqlen):
    a = _scan_inputs(1, dim, 16, seqlen, torch.float32, DEVICE)
    out = benchmark(selective_scan_fn, **a, delta_softplus=True)
    assert _rel(out, selective_scan_ref(**a, delta_softplus=True)[0]) < 1e-5


def test_bench_selective_scan_varlen(benchmark):
    a = _scan_inputs(1, 256, 16, 512, torch.float32, DEVICE)
    packed = {k: (v[0] if v.dim() == 3 else v) for k, v in a.items()}
    packed["B"], packed["C"] = packed["B"][None], packed["C"][None]
    qsl = torch.tensor([0, 300, 301, 512], dtype=torch.int32, device=DEVICE)
    states = torch.randn(3, 256, 16, device=DEVICE)
    has_init = torch.tensor([True, False, True], device=DEVICE)
    ref_states = states.clone()
    ref = selective_scan_varlen_ref(
        torch.empty(256, 512, device=DEVICE), ref_states,
        *(packed[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
        True, qsl, None, has_init, -1)
    out = selective_scan_varlen(**packed, ssm_states=states, delta_softplus=True, query_start_loc=qsl,
                                has_initial_state=has_init)
    assert _rel(out, ref) < 1e-5
    assert _rel(states, ref_states) < 1e-5
    benchmark(selective_scan_varlen, **packed, ssm_states=states, delta_softplus=True, query_start_loc=qsl,
              has_initial_state=has_init)
