"""pytest-benchmark cases for the Mamba-2 SSD prefill (``mamba_chunk_scan_combined``,
``mamba_chunk_scan_varlen``), small and fast on CPU.

Run with ``pytest bench/ --benchmark-json x.json``. Runs the machine's default backend (Triton on
CUDA, the torch core on CPU), checks the result against the float64 recurrence
(``triton_kernels/mamba2/naive.py``, within ``tests/utils.py``'s REL_TOL) once first, so a
wrong fast kernel cannot pass, then times it with the harness (per-call CUDA events on a GPU,
``perf_counter`` on CPU; rotating input sets).
"""

from __future__ import annotations

import math

import pytest
import torch

from bench.bench_mamba2 import _inputs, _varlen_inputs
from bench.harness import CLOCK, clocked, input_sets
from tests.utils import assert_close
from triton_kernels import mamba_chunk_scan_combined, mamba_chunk_scan_varlen
from triton_kernels.mamba2.naive import ssd_oracle

pytestmark = pytest.mark.benchmark(timer=CLOCK)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 20
BATCH, SEQLEN, HEADS, HEAD_DIM, GROUPS, DSTATE, CHUNK = 2, 320, 8, 32, 2, 32, 64
VARLEN_LENGTHS = (200, 1, 119)


def _oracle(a: dict, seq_starts: list[int], states: torch.Tensor | None = None, slots: list[int] | None = None):
    """(out ``[T, h, p]``, states) of the float64 recurrence on the packed tokens of ``a``: sequence i
    starts from ``states[slots[i]]`` and its final state replaces that row (without ``states``: from
    zeros, into row i of new ``[nseq, h, p, n]`` states)."""
    nseq = len(seq_starts) - 1
    out = torch.empty(a["x"].shape, dtype=torch.float64, device=DEVICE)
    if states is None:
        final, slots = torch.empty(nseq, HEADS, HEAD_DIM, DSTATE, dtype=torch.float64, device=DEVICE), list(range(nseq))
    else:
        final = states.double()  # a copy: ``states`` is read, not written
    ssd_oracle(out, a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], a["dt_bias"], True, (0.0, math.inf),
               seq_starts, None, states, slots, final, slots, CHUNK)
    return out, final


def _combined(a: dict):
    return mamba_chunk_scan_combined(a["x"], a["dt"], a["A"], a["B"], a["C"], CHUNK, D=a["D"], z=a["z"],
                                     dt_bias=a["dt_bias"], dt_softplus=True, return_final_states=True)


def test_bench_mamba_chunk_scan_combined(benchmark):
    sets = input_sets(lambda: _inputs(BATCH, SEQLEN, HEADS, HEAD_DIM, GROUPS, DSTATE, torch.float32, DEVICE), DEVICE)
    out, final = _combined(sets[0])
    packed = {k: v.flatten(0, 1) if k in ("x", "dt", "B", "C", "z") else v for k, v in sets[0].items()}
    ref, ref_final = _oracle(packed, [i * SEQLEN for i in range(BATCH + 1)])
    assert_close(out.flatten(0, 1), ref)
    assert_close(final, ref_final, name="final_states")
    benchmark.pedantic(clocked(_combined, sets, DEVICE), rounds=ROUNDS)


def test_bench_mamba_chunk_scan_varlen(benchmark):
    sets = input_sets(lambda: _varlen_inputs(VARLEN_LENGTHS, HEADS, HEAD_DIM, GROUPS, DSTATE, torch.float32, DEVICE),
                      DEVICE)
    a = sets[0]
    ref, ref_states = _oracle(a, a["query_start_loc"].tolist(), a["ssm_states"], a["cache_indices"].tolist())
    out = mamba_chunk_scan_varlen(chunk_size=CHUNK, **a)
    assert_close(out, ref)
    assert_close(a["ssm_states"], ref_states, name="ssm_states")
    benchmark.pedantic(clocked(lambda s: mamba_chunk_scan_varlen(chunk_size=CHUNK, **s), sets, DEVICE),
                       rounds=ROUNDS)
