"""apply_lora and LoRAModules: packed modules and their slices, targets, checkpoint keys, and
all-or-nothing adapter loading (the peft round trip is in test_oracle_peft.py)."""

from typing import ClassVar

import pytest
import torch
from torch import nn

from pyiface.lora import LoRABatchWrapper, LoRAEmbedding, LoRALinear, apply_lora
from tests.utils import assert_equal

MAX_LORAS = 4


class TinyDecoder(nn.Module):
    """A stand-in for a SupportsLoRA model: packed qkv (GQA widths) and gate_up projections."""

    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, hidden=8):
        super().__init__()
        self.embed_tokens = nn.Embedding(11, hidden)
        self.qkv_proj = nn.Linear(hidden, hidden + 4 + 4, bias=False)
        self.qkv_proj.output_sizes = [hidden, 4, 4]  # as vLLM's QKVParallelLinear exposes them
        self.gate_up_proj = nn.Linear(hidden, 2 * 6, bias=False)
        self.down_proj = nn.Linear(6, hidden)


def test_apply_lora_names_slices_and_keeps_checkpoint_keys():
    model = TinyDecoder()
    keys = set(model.state_dict())
    wrapper = LoRABatchWrapper(MAX_LORAS, 8, "cpu")
    table = apply_lora(model, wrapper, max_rank=4)
    assert set(model.state_dict()) == keys
    assert isinstance(model.qkv_proj, LoRALinear)
    assert isinstance(model.embed_tokens, nn.Embedding), "embeddings only when targeted"
    assert model.qkv_proj.slots.output_slices == (8, 4, 4)
    assert model.gate_up_proj.slots.output_slices == (6, 6)
    assert set(table) == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    assert table["v_proj"] == (model.qkv_proj, 2)
    assert len(table.layers) == 3

    a, b = torch.randn(2, 8), torch.randn(4, 2)
    table.set_lora(
        3, {"v_proj": (a, b), "down_proj": (torch.randn(3, 6), torch.randn(8, 3))}, {"v_proj": 2.0}
    )
    assert model.qkv_proj.slots.lora_ranks.tolist() == [0, 0, 0, 2]
    assert_equal(model.qkv_proj.slots.lora_b_stacked[2][3, :, :2], b * 2.0)
    assert not model.qkv_proj.slots.lora_a_stacked[0][3].any()
    assert model.down_proj.slots.lora_ranks.tolist() == [0, 0, 0, 3]
    assert not model.gate_up_proj.slots.lora_ranks.any()
    table.reset_lora(3)
    assert not any(layer.slots.lora_ranks.any() for layer in table.layers)


def test_apply_lora_targets_and_explicit_slices():
    model = TinyDecoder()
    del model.qkv_proj.output_sizes
    wrapper = LoRABatchWrapper(MAX_LORAS, 8, "cpu")
    table = apply_lora(
        model,
        wrapper,
        max_rank=4,
        target_modules=["k_proj", "embed_tokens"],
        output_slices={"qkv_proj": (8, 4, 4)},
    )
    assert isinstance(model.embed_tokens, LoRAEmbedding)
    assert isinstance(model.gate_up_proj, nn.Linear)
    assert set(table) == {"q_proj", "k_proj", "v_proj", "embed_tokens"}
    assert model.qkv_proj.slots.output_slices == (8, 4, 4)


def test_apply_lora_errors():
    wrapper = LoRABatchWrapper(MAX_LORAS, 8, "cpu")
    model = TinyDecoder()
    with pytest.raises(ValueError, match=r"\['o_proj'\] match no"):
        apply_lora(model, wrapper, max_rank=4, target_modules=["q_proj", "o_proj"])
    assert isinstance(model.qkv_proj, nn.Linear), "the model is left alone on error"
    model = TinyDecoder(hidden=6)  # qkv out 14 = 6 + 4 + 4
    del model.qkv_proj.output_sizes
    with pytest.raises(ValueError, match="does not split evenly"):
        apply_lora(model, wrapper, max_rank=4)
    with pytest.raises(ValueError, match="must sum to out_features"):
        LoRALinear(nn.Linear(4, 6), wrapper, max_rank=2, output_slices=(3, 2))


def test_set_lora_is_all_or_nothing():
    model = TinyDecoder()
    table = apply_lora(model, LoRABatchWrapper(MAX_LORAS, 8, "cpu"), max_rank=4)
    table.set_lora(0, {"q_proj": (torch.randn(2, 8), torch.randn(8, 2))})
    before = [
        t.clone() for layer in table.layers for t in (*layer.slots.lora_a_stacked, layer.slots.lora_ranks)
    ]
    good = (torch.randn(2, 8), torch.randn(8, 2))
    for weights, error, match in (
        (
            {"q_proj": good, "down_proj": (torch.randn(2, 5), torch.randn(8, 2))},
            ValueError,
            r"down_proj: lora_a.shape\[1\] must be 6",
        ),
        ({"q_proj": good, "o_proj": good}, ValueError, "without LoRA layers"),
        (
            {"q_proj": good, "up_proj": (torch.randn(9, 8), torch.randn(6, 9))},
            ValueError,
            r"gate_proj / up_proj: lora_a\[1\] has rank 9",
        ),
        ({"q_proj": good[0]}, TypeError, "pair"),
    ):
        with pytest.raises(error, match=match):
            table.set_lora(0, weights)
    after = [t for layer in table.layers for t in (*layer.slots.lora_a_stacked, layer.slots.lora_ranks)]
    for old, new in zip(before, after):
        assert_equal(new, old)
