"""csrc/multimodal/embed_multimodal.cu: the CUDA fused embed against the torch reference, on
every copy width (16/8/4/2-byte units chosen by alignment)."""

import pytest
import torch

from tests.utils import assert_equal, poisoned
from triton_kernels import embed_multimodal_tokens, use_backend


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("hidden", "dtype", "offset"),
    [
        pytest.param(4096, torch.bfloat16, 0, id="16B-units"),
        pytest.param(4100, torch.bfloat16, 0, id="8B-units"),
        pytest.param(3, torch.float32, 0, id="4B-units"),
        pytest.param(1023, torch.float16, 0, id="2B-units"),
        pytest.param(64, torch.float16, 1, id="misaligned-item-start"),
    ],
)
def test_cuda_matches_reference(hidden, dtype, offset):
    ids = torch.randint(0, 100, (333,), device="cuda")
    ids[torch.randperm(333, device="cuda")[:120]] = 100
    weight = torch.randn(100, hidden, dtype=dtype, device="cuda")
    storage = torch.randn(130 * hidden + offset, dtype=dtype, device="cuda")
    unaligned = storage[offset : offset + 70 * hidden].view(70, hidden)
    items = [unaligned, torch.randn(50, hidden, dtype=dtype, device="cuda")]
    out = poisoned((333, hidden), dtype, device="cuda")
    with use_backend("cuda"):
        embed_multimodal_tokens(ids, weight, items, placeholder_token_id=100, out=out)
    ref = weight[ids.masked_fill(ids == 100, 0)]
    ref[ids == 100] = torch.cat(items)
    assert_equal(out, ref)
