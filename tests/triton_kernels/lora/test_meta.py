"""LoRAKernelMeta: grouping, fixed sizes, the no-LoRA flag and bad mappings."""

import pytest
import torch

from tests.triton_kernels.lora.helpers import token_mapping
from tests.utils import KERNEL_DEVICE, assert_equal
from triton_kernels.lora import LoRAKernelMeta


@pytest.mark.parametrize("kind", ["interleaved", "skewed", "no_lora", "one_slot"])
@pytest.mark.parametrize("num_tokens", [0, 1, 9])
def test_groups_tokens_by_slot(kind, num_tokens):
    mapping = token_mapping(kind, num_tokens, 4)
    meta = LoRAKernelMeta.make(4, 12, KERNEL_DEVICE)
    meta.prepare_tensors(mapping.to(KERNEL_DEVICE))
    _, order, counts, starts, ids, flag, num_active_loras = meta.meta_args(num_tokens)
    assert num_active_loras == 5  # vLLM's seventh argument: every slot and slot -1 have a group
    assert_equal(ids.cpu(), torch.arange(-1, 4, dtype=torch.int32), "active_lora_ids")
    want_counts = torch.bincount(mapping.long() + 1, minlength=5).int()
    assert_equal(counts.cpu(), want_counts, "num_tokens_per_lora")
    assert_equal(
        starts.cpu(), torch.cat([torch.zeros(1), want_counts.cumsum(0)]).int(), "lora_token_start_loc"
    )
    order = order.cpu().long()
    assert sorted(order.tolist()) == list(range(num_tokens))
    assert mapping[order].tolist() == sorted(mapping.tolist())  # grouped by slot
    for slot in range(-1, 4):  # stable: token order kept inside a group
        group = order[starts[slot + 1] : starts[slot + 2]].tolist()
        assert group == sorted(group)
    assert bool(flag) == bool((mapping == -1).all())
    assert flag.device.type == "cpu"
    assert meta.num_tokens == num_tokens


def test_buffers_are_reused_across_steps():
    meta = LoRAKernelMeta.make(3, 8, KERNEL_DEVICE)
    buffers = [t.data_ptr() for t in meta.meta_args(8)[:5]]
    meta.prepare_tensors(torch.tensor([2, 0, 2, -1], dtype=torch.int32))  # a CPU mapping is fine
    meta.prepare_tensors(torch.tensor([1, 1], dtype=torch.int64))
    assert [t.data_ptr() for t in meta.meta_args(8)[:5]] == buffers
    assert meta.num_tokens_per_lora.tolist() == [0, 0, 2, 0]
    assert meta.lora_token_start_loc.tolist() == [0, 0, 0, 2, 2]


@pytest.mark.parametrize(
    ("mapping", "match"),
    [
        pytest.param([0, 3, 1], "slot id 3", id="slot-too-big"),
        pytest.param([0, -2], "slot id -2", id="slot-below-minus1"),
        pytest.param(list(range(3)) * 3, "more than max_num_tokens", id="too-many-tokens"),
    ],
)
def test_bad_mapping_raises_and_keeps_buffers(mapping, match):
    meta = LoRAKernelMeta.make(3, 8, KERNEL_DEVICE)
    meta.prepare_tensors(torch.tensor([1, -1, 0], dtype=torch.int32))
    before = [t.clone() for t in meta.meta_args(8)[:6]]
    with pytest.raises(ValueError, match=match):
        meta.prepare_tensors(torch.tensor(mapping, dtype=torch.int32))
    for old, new in zip(before, meta.meta_args(8)):
        assert_equal(new, old)
    assert meta.num_tokens == 3


def test_bad_mapping_type():
    meta = LoRAKernelMeta.make(3, 8, KERNEL_DEVICE)
    with pytest.raises(TypeError, match="token_lora_mapping"):
        meta.prepare_tensors(torch.zeros(3))
    with pytest.raises(ValueError, match="max_loras"):
        LoRAKernelMeta.make(0, 8, KERNEL_DEVICE)


def test_meta_args_take_vllms_specialize_flag():
    """vLLM 0.32+ calls ``meta_args(T, specialize_active_lora)``: the same seven arguments either way."""
    meta = LoRAKernelMeta.make(3, 8, KERNEL_DEVICE)
    meta.prepare_tensors(torch.tensor([2, -1, 2], dtype=torch.int32))
    plain, special = meta.meta_args(3), meta.meta_args(3, True)
    assert len(plain) == 7
    assert plain[6] == special[6] == 4
    assert [(t.data_ptr(), t.shape) for t in plain[:6]] == [(t.data_ptr(), t.shape) for t in special[:6]]


def test_buffers_made_under_inference_mode_are_normal_tensors():
    """vLLM and HF generate run under inference mode: the buffers stay writable outside it and
    keep version counters (so the ops read them once per step)."""
    with torch.inference_mode():
        meta = LoRAKernelMeta.make(3, 8, KERNEL_DEVICE)
        meta.prepare_tensors(torch.tensor([2, -1, 2], dtype=torch.int32))
        assert not any(t.is_inference() for t in meta.meta_args(3)[:6])
    meta.prepare_tensors(torch.tensor([0, 1], dtype=torch.int32))  # outside inference mode
    assert meta.num_tokens_per_lora.tolist() == [0, 1, 1, 0]
