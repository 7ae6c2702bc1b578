"""Every Mamba-2 Triton kernel compiles for sm_90 without register spills, in the variants its launchers use
(``tests/sm90.py`` records the launches of each case and compiles them)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from tests.sm90 import assert_no_spills, case_params, needs_ptxas, results_fixture
from triton_kernels import mamba_chunk_scan_combined, rms_norm_gated, selective_state_update
from triton_kernels.mamba2.ssd_triton import ssd_core_triton

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def _ssd(dtype: torch.dtype, p: int, n: int, chunk: int, *, full: bool) -> Callable:
    """The SSD core at model head sizes: 3 sequences (one empty), state rows read and written."""
    def call() -> None:
        h, g, seq_starts = 4, 2, [0, 300, 300, 700]
        t = seq_starts[-1]
        x, dt, B, C = (torch.randn(*s).to(dtype) for s in [(t, h, p), (t, h), (t, g, n), (t, g, n)])
        states = torch.randn(4, h, p, n)
        extras = (torch.randn(h), x, torch.randn(h), True, (0.0, 0.5)) if full else (
            None, None, None, False, (0.0, math.inf))
        index = torch.tensor([0, -1, 2])
        ssd_core_triton(torch.empty_like(x), x, dt, -torch.rand(h), B, C, *extras, seq_starts,
                        torch.tensor(seq_starts), states if full else None, index, states, index, chunk)
    return call


def _ssd_train(dtype: torch.dtype, p: int, n: int, chunk: int) -> Callable:
    """Forward + backward of the public op at model head sizes, with every optional input."""
    def call() -> None:
        b, length, h, g = 1, 300, 4, 2
        with torch.enable_grad():  # the recorder runs cases under no_grad
            x, z = (torch.randn(b, length, h, p).to(dtype).requires_grad_() for _ in range(2))
            dt = torch.randn(b, length, h).to(dtype).requires_grad_()
            B, C = (torch.randn(b, length, g, n).to(dtype).requires_grad_() for _ in range(2))
            out, final = mamba_chunk_scan_combined(
                x, dt, -torch.rand(h).requires_grad_(), B, C, chunk, D=torch.randn(h).requires_grad_(), z=z,
                dt_bias=torch.randn(h).requires_grad_(), initial_states=torch.randn(b, h, p, n).requires_grad_(),
                dt_softplus=True, return_final_states=True)
            (out.float().sum() + final.sum()).backward()
    return call


def _norm(hidden: int, group: int | None, dtype: torch.dtype = BF16, *, backward: bool = False) -> Callable:
    def call() -> None:
        with torch.enable_grad():  # the recorder runs cases under no_grad
            x = torch.randn(8, hidden).to(dtype).requires_grad_(backward)
            out = rms_norm_gated(x, torch.randn(hidden), torch.randn(8, hidden).to(dtype), group_size=group)
            if backward:
                out.sum().backward()
    return call


def _decode(heads: int, p: int, n: int, groups: int, state_dtype: torch.dtype) -> Callable:
    """Mamba-2 decode with the tied (stride-0) A, dt and dt_bias of HF and vLLM."""
    def call() -> None:
        b = 4
        state = torch.randn(8, heads, p, n).to(state_dtype)
        x = torch.randn(b, heads, p).to(BF16)
        dt = torch.randn(b, heads).to(BF16)[..., None].expand(b, heads, p)
        A = -torch.rand(heads)[:, None, None].expand(heads, p, n)
        dt_bias = torch.randn(heads)[:, None].expand(heads, p)
        D = torch.randn(heads)[:, None].expand(heads, p)
        B, C = torch.randn(b, groups, n).to(BF16), torch.randn(b, groups, n).to(BF16)
        selective_state_update(state, x, dt, A, B, C, D, x, dt_bias, True,
                               torch.tensor([7, 0, 3, -1], dtype=torch.int32))
    return call


CASES: dict[str, Callable] = {
    "ssd_bf16_p64_n128_c256_full": _ssd(BF16, 64, 128, 256, full=True),
    "ssd_bf16_p64_n64_c128_plain": _ssd(BF16, 64, 64, 128, full=False),
    "ssd_bf16_p64_n256_c256_full": _ssd(BF16, 64, 256, 256, full=True),
    "ssd_fp16_p64_n128_c64_full": _ssd(F16, 64, 128, 64, full=True),
    "ssd_fp32_p64_n128_c256_full": _ssd(F32, 64, 128, 256, full=True),
    "ssd_train_bf16_p64_n128_c256": _ssd_train(BF16, 64, 128, 256),
    "ssd_train_fp16_p64_n64_c64": _ssd_train(F16, 64, 64, 64),
    "ssd_train_bf16_p64_n256_c256": _ssd_train(BF16, 64, 256, 256),
    "ssd_train_fp16_p64_n256_c64": _ssd_train(F16, 64, 256, 64),
    "ssd_train_fp32_p64_n64_c128": _ssd_train(F32, 64, 64, 128),
    "ssd_train_fp32_p64_n128_c128": _ssd_train(F32, 64, 128, 128),
    "ssd_train_fp32_p64_n256_c128": _ssd_train(F32, 64, 256, 128),
    "norm_H4096": _norm(4096, None),
    "norm_H8192_groups8": _norm(8192, 1024),
    "norm_H16384_two_pass": _norm(16384, None),
    "norm_bwd_H4096": _norm(4096, None, backward=True),
    "norm_bwd_H8192_groups8": _norm(8192, 1024, backward=True),
    "norm_bwd_H16384_two_pass": _norm(16384, None, backward=True),
    "decode_tied_H64_P64_N128_G8_fp32state": _decode(64, 64, 128, 8, F32),
    "decode_tied_H128_P64_N128_G1_bf16state": _decode(128, 64, 128, 1, BF16),
}

# Known spills, strict xfails until fixed: a fixed kernel turns its case red here so the entry goes.
SPILLS = {
    "ssd_train_fp32_p64_n256_c128": "the forward's _ssd_chunk_scan_kernel (ssd_triton.py; fp32, n 256, no z, "
                                    "BLOCK_M 32, 8 warps) has 24 stack bytes at 80 registers; the backward "
                                    "kernels are clean",
}

sm90_results = results_fixture(CASES)


@needs_ptxas
@pytest.mark.parametrize("case", case_params(CASES, SPILLS))
def test_compiles_for_sm90_without_spills(sm90_results, case):
    assert_no_spills(sm90_results, case)
