"""pytest-benchmark cases for the multi-LoRA ops: ``pytest bench/test_bench_lora.py --benchmark-json x.json``.

Small decode-sized qkv shapes so the file stays quick on a CPU (torch backend there). Timed by the
harness (per-call CUDA events on a GPU, ``perf_counter`` on CPU; rotating input sets)."""

import pytest
import torch

from bench.bench_lora import Case, _inputs, _peft_loop
from bench.harness import CLOCK, clocked, input_sets
from triton_kernels import add_lora_linear

pytestmark = pytest.mark.benchmark(timer=CLOCK)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
ROUNDS = 20  # fixed, so the file stays quick on a loaded CPU
CASES = [
    pytest.param(Case("qkv/4", 16, 8, (16,) * 8, (1024, 256, 256), hidden=1024), id="T16-8ad-r16"),
    pytest.param(
        Case("qkv/4", 64, 8, (8, 64) * 4, (1024, 256, 256), hidden=1024, per_slot_ranks=True),
        id="T64-8ad-mixed-ranks",
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_add_lora_linear(benchmark, case):
    sets = input_sets(lambda: _inputs(case, DEVICE, DTYPE), DEVICE)

    def fused(s):
        _, x, a, b, meta, ranks, y = s
        add_lora_linear(y, x, a, b, 0.5, case.widths, meta, lora_ranks=ranks)

    benchmark.pedantic(clocked(fused, sets, DEVICE), rounds=ROUNDS)


@pytest.mark.parametrize("case", CASES)
def test_peft_loop(benchmark, case):
    sets = input_sets(lambda: _inputs(case, DEVICE, DTYPE), DEVICE)

    def loop(s):
        mapping, x, a, b, _, _, y = s
        _peft_loop(y, x, a, b, mapping, 0.5)

    benchmark.pedantic(clocked(loop, sets, DEVICE), rounds=ROUNDS)
