"""pytest-benchmark entry: ``pytest bench/ --benchmark-json out.json``. Timed by the harness
(per-call CUDA events on a GPU, ``perf_counter`` on CPU; rotating input sets), see ``bench/harness.py``."""

import pytest
import torch

from bench.bench_multimodal import PLACEHOLDER, make_inputs, vllm_masked_scatter
from bench.harness import CLOCK, clocked, input_sets
from triton_kernels import embed_multimodal_tokens

pytestmark = pytest.mark.benchmark(timer=CLOCK)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = (16384, 4096, 8, torch.bfloat16) if DEVICE.type == "cuda" else (1024, 512, 4, torch.float32)
ROUNDS = 20


@pytest.fixture(scope="module")
def sets():
    num_tokens, hidden, num_items, dtype = SHAPE
    return input_sets(lambda: make_inputs(num_tokens, hidden, num_items, 0.5, dtype, DEVICE), DEVICE)


def test_fused_embed(benchmark, sets):
    fn = clocked(lambda s: embed_multimodal_tokens(*s, placeholder_token_id=PLACEHOLDER), sets, DEVICE)
    benchmark.pedantic(fn, rounds=ROUNDS)


def test_vllm_masked_scatter(benchmark, sets):
    benchmark.pedantic(clocked(lambda s: vllm_masked_scatter(*s), sets, DEVICE), rounds=ROUNDS)
