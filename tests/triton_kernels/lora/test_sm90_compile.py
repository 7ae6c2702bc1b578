"""The LoRA kernels compile for sm_90 without spills in the variants their launchers use: vLLM's
shrink (into an fp32 buffer) and expand, and the fused ``add_lora_linear`` at decode and prefill
tile sizes, with and without per-slot ranks (Llama-3-8B's qkv, bf16; see ``tests/sm90.py``)."""

import pytest
import torch

from tests.sm90 import assert_no_spills, case_params, needs_ptxas, results_fixture
from triton_kernels import LoRAKernelMeta, add_lora_linear, lora_expand, lora_shrink

HIDDEN, QKV, ADAPTERS = 4096, (4096, 1024, 1024), 4


def _meta(tokens: int) -> LoRAKernelMeta:
    meta = LoRAKernelMeta.make(ADAPTERS, tokens, torch.device("cpu"))
    meta.prepare_tensors(torch.arange(tokens, dtype=torch.int32) % (ADAPTERS + 1) - 1)  # slot -1 included
    return meta


def _weights(rank: int, widths: tuple[int, ...], dtype: torch.dtype):
    a = [torch.randn(ADAPTERS, rank, HIDDEN).to(dtype) for _ in widths]
    b = [torch.randn(ADAPTERS, n, rank).to(dtype) for n in widths]
    return a, b


def _shrink_expand(tokens: int, rank: int):
    def call() -> None:
        a, b = _weights(rank, QKV, torch.bfloat16)
        meta = _meta(tokens).meta_args(tokens)
        buf = torch.zeros(len(QKV), tokens, rank)
        lora_shrink(torch.randn(tokens, HIDDEN).to(torch.bfloat16), a, buf, *meta, 0.5)
        lora_expand(buf, b, torch.randn(tokens, sum(QKV)).to(torch.bfloat16), *meta, offset_start=0,
                    add_inputs=True)
    return call


def _fused(tokens: int, rank: int, widths: tuple[int, ...], *, ranks: bool, dtype: torch.dtype = torch.bfloat16):
    def call() -> None:
        a, b = _weights(rank, widths, dtype)
        lora_ranks = torch.tensor([rank, rank // 2, 1, rank][:ADAPTERS], dtype=torch.int32) if ranks else None
        add_lora_linear(torch.randn(tokens, sum(widths)).to(dtype), torch.randn(tokens, HIDDEN).to(dtype), a, b,
                        0.5, widths, _meta(tokens), lora_ranks=lora_ranks)
    return call


CASES = {
    "shrink_expand_T16_r16": _shrink_expand(16, 16),
    "shrink_expand_T512_r64": _shrink_expand(512, 64),
    "fused_qkv_T16_r64_ranks": _fused(16, 64, QKV, ranks=True),
    "fused_qkv_T512_r16": _fused(512, 16, QKV, ranks=False),
    "fused_o_T512_r64_ranks": _fused(512, 64, (4096,), ranks=True),
    "fused_qkv_T16_r16_fp32": _fused(16, 16, QKV, ranks=False, dtype=torch.float32),
}
sm90_results = results_fixture(CASES)


@needs_ptxas
@pytest.mark.parametrize("case", case_params(CASES))
def test_lora_kernels_compile_for_sm90_without_spills(sm90_results: dict, case: str) -> None:
    assert_no_spills(sm90_results, case)
