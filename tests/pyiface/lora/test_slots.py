"""Adapter weight slots: layout, mixed ranks, folded scaling, reset, and all-or-nothing errors."""

import pytest
import torch

from pyiface.lora import LoRAEmbeddingSlots, LoRASlots
from tests.utils import assert_equal

SLICES = (12, 5, 5)  # a GQA-like packed qkv: slices of different widths
H_IN = 7


def _adapter(rank: int, widths=SLICES):
    return [torch.randn(rank, H_IN) for _ in widths], [torch.randn(n, rank) for n in widths]


def _snapshot(slots: LoRASlots) -> list[torch.Tensor]:
    return [t.clone() for t in (*slots.lora_a_stacked, *slots.lora_b_stacked, slots.lora_ranks)]


def test_layout_and_folded_scaling():
    slots = LoRASlots(3, 8, H_IN, SLICES)
    a, b = _adapter(5)
    slots.set_lora(1, a, b, scaling=[2.0, 0.5, 3.0])
    for s, (sa, sb) in enumerate(zip(slots.lora_a_stacked, slots.lora_b_stacked)):
        assert sa.shape == (3, 8, H_IN)
        assert sb.shape == (3, SLICES[s], 8)
        assert_equal(sa[1, :5], a[s])
        assert_equal(sb[1, :, :5], b[s] * [2.0, 0.5, 3.0][s])
        assert not sa[1, 5:].any(), "rows beyond the rank must be zero"
        assert not sb[1, :, 5:].any(), "columns beyond the rank must be zero"
        assert not sa[[0, 2]].any(), "other slots untouched"
        assert not sb[[0, 2]].any(), "other slots untouched"
    assert slots.lora_ranks.tolist() == [0, 5, 0]
    assert slots.lora_ranks.dtype == torch.int32


def test_mixed_ranks_replace_and_reset():
    slots = LoRASlots(4, 16, H_IN, SLICES)
    for slot, rank in enumerate((1, 16, 7)):
        slots.set_lora(slot, *_adapter(rank))
    assert slots.lora_ranks.tolist() == [1, 16, 7, 0]
    # a lower-rank adapter replacing a higher one leaves no stale rows behind
    a, b = _adapter(3)
    slots.set_lora(1, a, b)
    assert slots.lora_ranks.tolist() == [1, 3, 7, 0]
    assert not slots.lora_a_stacked[0][1, 3:].any()
    assert not slots.lora_b_stacked[2][1, :, 3:].any()
    slots.reset_lora(2)
    assert slots.lora_ranks.tolist() == [1, 3, 0, 0]
    assert all(not t[2].any() for t in (*slots.lora_a_stacked, *slots.lora_b_stacked))
    assert slots.lora_a_stacked[0][0, 0].abs().sum() > 0


def test_per_slice_ranks_and_missing_slice():
    """A packed adapter may give its slices different ranks, or leave one out (k_proj)."""
    slots = LoRASlots(2, 8, H_IN, SLICES)
    a = [torch.randn(2, H_IN), None, torch.randn(6, H_IN)]
    b = [torch.randn(12, 2), None, torch.randn(5, 6)]
    slots.set_lora(0, a, b, scaling=0.25)
    assert slots.lora_ranks.tolist() == [6, 0]
    assert not slots.lora_a_stacked[1][0].any()
    assert not slots.lora_b_stacked[1][0].any()
    assert_equal(slots.lora_b_stacked[2][0, :, :6], b[2] * 0.25)


def test_dtype_cast_and_fp16_storage():
    slots = LoRASlots(2, 4, H_IN, (3,), dtype=torch.float16)
    a, b = torch.randn(4, H_IN, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    slots.set_lora(1, a, b, scaling=1.5)
    assert slots.lora_a_stacked[0].dtype == torch.float16
    assert_equal(slots.lora_b_stacked[0][1], (b.float() * 1.5).half())


def test_embedding_slots_transpose_a():
    slots = LoRAEmbeddingSlots(2, 4, 11, 6)  # V=11, H=6
    a, b = torch.randn(3, 11), torch.randn(6, 3)  # peft lora_embedding_A / _B
    slots.set_lora(1, a, b, scaling=2.0)
    assert slots.lora_a_stacked[0].shape == (2, 11, 4)
    assert_equal(slots.lora_a_stacked[0][1, :, :3], a.T)
    assert not slots.lora_a_stacked[0][1, :, 3:].any()
    assert_equal(slots.lora_b_stacked[0][1, :, :3], b * 2.0)


def test_buffers_follow_module_and_stay_out_of_state_dict():
    slots = LoRASlots(2, 4, H_IN, (3,))
    assert list(slots.state_dict()) == []
    slots.set_lora(0, torch.randn(2, H_IN), torch.randn(3, 2))
    moved = slots.to(torch.float64)
    assert moved.lora_a_stacked[0].dtype == torch.float64
    assert moved.lora_ranks.tolist() == [2, 0]
    trainable = LoRASlots(2, 4, H_IN, (3, 3), trainable=True)
    assert len(list(trainable.parameters())) == 4


BAD_INPUTS = [
    pytest.param(lambda a, b: (2, a, b, 1.0), ValueError, "slot must be", id="slot-too-big"),
    pytest.param(lambda a, b: (-1, a, b, 1.0), ValueError, "slot must be", id="slot-negative"),
    pytest.param(lambda a, b: (True, a, b, 1.0), ValueError, "slot must be", id="slot-bool"),
    pytest.param(lambda a, b: (0, a[:2], b, 1.0), ValueError, "one entry per output slice", id="few-slices"),
    pytest.param(lambda a, b: (0, a[0], b, 1.0), TypeError, "list of 3", id="packed-needs-list"),
    pytest.param(
        lambda a, b: (0, [*a[:2], torch.randn(3, H_IN + 1)], b, 1.0),
        ValueError,
        r"lora_a\[2\].shape\[1\]",
        id="a-in-features",
    ),
    pytest.param(
        lambda a, b: (0, a, [*b[:2], torch.randn(5, 4)], 1.0),
        ValueError,
        r"lora_b\[2\].shape\[1\] must be 3",
        id="b-rank-mismatch",
    ),
    pytest.param(
        lambda a, b: (0, a, [torch.randn(11, 3), *b[1:]], 1.0),
        ValueError,
        r"lora_b\[0\].shape\[0\] must be 12",
        id="b-width",
    ),
    pytest.param(
        lambda a, b: (0, [torch.randn(9, H_IN), *a[1:]], b, 1.0),
        ValueError,
        "rank 9, expected 1 <= rank",
        id="rank-above-max",
    ),
    pytest.param(
        lambda a, b: (0, [a[0].int(), *a[1:]], b, 1.0),
        TypeError,
        r"lora_a\[0\] must have dtype",
        id="int-dtype",
    ),
    pytest.param(lambda a, b: (0, [a[0][None], *a[1:]], b, 1.0), ValueError, "must be 2-D", id="a-3d"),
    pytest.param(lambda a, b: (0, [None, *a[1:]], b, 1.0), ValueError, "both be given", id="half-none"),
    pytest.param(lambda a, b: (0, a, b, float("nan")), TypeError, "finite real", id="nan-scaling"),
    pytest.param(lambda a, b: (0, a, b, [1.0, 2.0, "x"]), TypeError, "finite real", id="str-scaling"),
    pytest.param(
        lambda a, b: (0, a, b, [1.0, 2.0]), ValueError, "one entry per output slice", id="few-scales"
    ),
]


@pytest.mark.parametrize(("make_args", "error", "match"), BAD_INPUTS)
def test_bad_input_leaves_slots_unchanged(make_args, error, match):
    slots = LoRASlots(2, 8, H_IN, SLICES)
    slots.set_lora(0, *_adapter(3))
    before = _snapshot(slots)
    a, b = _adapter(3)
    with pytest.raises(error, match=match):
        slots.set_lora(*make_args(a, b))
    for old, new in zip(before, _snapshot(slots)):
        assert_equal(new, old)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="max_loras"):
        LoRASlots(0, 8, H_IN, (3,))
    with pytest.raises(ValueError, match="output_slices"):
        LoRASlots(2, 8, H_IN, ())
    with pytest.raises(TypeError, match="dtype"):
        LoRASlots(2, 8, H_IN, (3,), dtype=torch.int32)
    with pytest.raises(ValueError, match="slot must be"):
        LoRASlots(2, 8, H_IN, (3,)).reset_lora(2)


@pytest.mark.parametrize("make", [lambda: LoRASlots(3, 4, 6, (5, 2)), lambda: LoRAEmbeddingSlots(3, 4, 6, 5)])
def test_slots_made_under_inference_mode_load_adapters_anywhere(make):
    """Slots built inside ``torch.inference_mode()`` (peft's stacking under HF generate) hold normal
    tensors: adapters load outside inference mode too, and the ops can tell when they changed."""
    with torch.inference_mode():
        slots = make()
    assert not any(t.is_inference() for t in (*slots.lora_a_stacked, *slots.lora_b_stacked, slots.lora_ranks))
    widths = slots.output_slices
    lora_a = torch.randn(2, 6) if len(widths) == 1 else [torch.randn(2, 6)] * len(widths)
    lora_b = torch.randn(widths[0], 2) if len(widths) == 1 else [torch.randn(n, 2) for n in widths]
    slots.set_lora(1, lora_a, lora_b)
    assert slots.lora_ranks.tolist() == [0, 2, 0]
