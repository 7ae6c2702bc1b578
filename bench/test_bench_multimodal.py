"""pytest-benchmark entry: ``pytest bench/ --benchmark-json out.json``."""

import pytest
import torch

from bench.bench_multimodal import PLACEHOLDER, make_inputs, vllm_masked_scatter
from triton_kernels import embed_multimodal_tokens

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (16384, 4096, 8, torch.bfloat16) if DEVICE.type == "cuda" else (1024, 512, 4, torch.float32)


@pytest.fixture(scope="module")
def inputs():
    num_tokens, hidden, num_items, dtype = SHAPE
    return make_inputs(num_tokens, hidden, num_items, 0.5, dtype, DEVICE)


def _sync(fn):
    def run():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    return run


def test_fused_embed(benchmark, inputs):
    ids, weight, items = inputs
    benchmark(_sync(lambda: embed_multimodal_tokens(ids, weight, items, placeholder_token_id=PLACEHOLDER)))


def test_vllm_masked_scatter(benchmark, inputs):
    ids, weight, items = inputs
    benchmark(_sync(lambda: vllm_masked_scatter(ids, weight, items)))
