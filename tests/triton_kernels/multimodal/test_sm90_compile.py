"""The scatter kernel compiles for sm_90 without spills in the variants its launcher uses: text
gathered or not, one item or several (Qwen2-VL sizes: hidden 3584, bf16; see ``tests/sm90.py``)."""

import pytest
import torch

from tests.sm90 import assert_no_spills, case_params, needs_ptxas, results_fixture
from triton_kernels import embed_multimodal_tokens, merge_multimodal_embeddings

HIDDEN, VOCAB, PLACEHOLDER = 3584, 1000, 999


def _ids(items: int, rows: int) -> torch.Tensor:
    ids = torch.randint(0, PLACEHOLDER, (3 * items * rows,))
    for i in range(items):
        ids[3 * i * rows : 3 * i * rows + rows] = PLACEHOLDER
    return ids


def _embed(items: int, dtype: torch.dtype = torch.bfloat16):
    def call() -> None:
        rows = 7
        weight = torch.randn(VOCAB, HIDDEN).to(dtype)
        embed_multimodal_tokens(_ids(items, rows), weight, [torch.randn(rows, HIDDEN).to(dtype)] * items,
                                placeholder_token_id=PLACEHOLDER)
    return call


def _merge(items: int):
    def call() -> None:
        rows = 7
        ids = _ids(items, rows)
        merge_multimodal_embeddings(ids, torch.randn(ids.shape[0], HIDDEN).to(torch.bfloat16),
                                    [torch.randn(rows, HIDDEN).to(torch.bfloat16)] * items, PLACEHOLDER)
    return call


CASES = {
    "embed_1item_bf16": _embed(1),
    "embed_3items_bf16": _embed(3),
    "embed_3items_fp32": _embed(3, torch.float32),
    "merge_1item_bf16": _merge(1),
    "merge_3items_bf16": _merge(3),
}
sm90_results = results_fixture(CASES)


@needs_ptxas
@pytest.mark.parametrize("case", case_params(CASES))
def test_scatter_kernel_compiles_for_sm90_without_spills(sm90_results: dict, case: str) -> None:
    assert_no_spills(sm90_results, case)
