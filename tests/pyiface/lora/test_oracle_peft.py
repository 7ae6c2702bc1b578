"""Oracle: peft's mixed-adapter batch (``adapter_names`` per row, ``"__base__"`` for none) on a
small unpacked model gives the same logits as our LoRA layers on its packed twin (qkv, gate_up),
loaded with the same adapters of different ranks, scalings and targets - random non-zero B."""

import copy
from typing import ClassVar

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from pyiface.lora import LoRABatchWrapper, apply_lora, peft_lora_weights
from tests.pyiface.lora.common import BACKENDS
from tests.utils import assert_close
from triton_kernels import use_backend

pytestmark = pytest.mark.oracle

VOCAB, HIDDEN, KV, FFN = 37, 24, 8, 40


class Unpacked(nn.Module):
    """A toy decoder block the way HF writes it: separate q/k/v and gate/up projections."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=True)
        self.k_proj = nn.Linear(HIDDEN, KV, bias=True)
        self.v_proj = nn.Linear(HIDDEN, KV, bias=True)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.gate_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, HIDDEN, bias=False)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def project(self, h):
        return self.q_proj(h), self.k_proj(h), self.v_proj(h), self.gate_proj(h), self.up_proj(h)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        q, k, v, gate, up = self.project(h)
        mix = q * torch.sigmoid(k.repeat(1, 1, HIDDEN // KV)) + v.repeat(1, 1, HIDDEN // KV)
        h = h + self.o_proj(mix)
        h = h + self.down_proj(nn.functional.silu(gate) * up)
        return self.lm_head(h)


class Packed(Unpacked):
    """vLLM's layout of the same block: qkv_proj and gate_up_proj, as a SupportsLoRA model declares."""

    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    def __init__(self, source: Unpacked):
        super().__init__()
        self.load_state_dict(source.state_dict())
        self.qkv_proj = nn.Linear(HIDDEN, HIDDEN + 2 * KV)
        self.gate_up_proj = nn.Linear(HIDDEN, 2 * FFN, bias=False)
        with torch.no_grad():
            self.qkv_proj.weight.copy_(
                torch.cat([source.q_proj.weight, source.k_proj.weight, source.v_proj.weight])
            )
            self.qkv_proj.bias.copy_(torch.cat([source.q_proj.bias, source.k_proj.bias, source.v_proj.bias]))
            self.gate_up_proj.weight.copy_(torch.cat([source.gate_proj.weight, source.up_proj.weight]))
        self.qkv_proj.output_sizes = [HIDDEN, KV, KV]
        for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            delattr(self, name)

    def project(self, h):
        q, k, v = self.qkv_proj(h).split([HIDDEN, KV, KV], -1)
        gate, up = self.gate_up_proj(h).split([FFN, FFN], -1)
        return q, k, v, gate, up


ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANDOM_B = {"init_lora_weights": False}  # peft's default B = 0 would make every adapter a no-op
ADAPTERS = {  # name -> (slot, LoraConfig): ranks, scalings and targets differ; slot 1 stays empty
    "small": (0, LoraConfig(r=2, lora_alpha=4, target_modules=ALL, **RANDOM_B)),
    "big": (2, LoraConfig(r=8, lora_alpha=8, target_modules=[*ALL, "lm_head", "embed_tokens"],
                          rank_pattern={"k_proj": 3}, alpha_pattern={"down_proj": 32}, **RANDOM_B)),
    "partial": (3, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                              **RANDOM_B)),
}  # fmt: skip
ROWS = ["big", "__base__", "small", "partial", "big", "small"]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(1)
    base = Unpacked()
    pristine = copy.deepcopy(base)  # peft injects its layers into base
    peft_model = None
    for name, (_, config) in ADAPTERS.items():
        if peft_model is None:
            peft_model = get_peft_model(base, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    peft_model.eval()
    return peft_model, pristine


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_adapter_batch_matches_peft(models, backend):
    peft_model, pristine = models
    seq = 5
    ids = torch.randint(0, VOCAB, (len(ROWS), seq))
    with torch.no_grad():
        expected = peft_model(ids, adapter_names=ROWS)

    wrapper = LoRABatchWrapper(max_loras=4, max_num_tokens=64, device="cpu")
    ours = Packed(pristine)
    table = apply_lora(ours, wrapper, max_rank=8, target_modules=[*ALL, "lm_head", "embed_tokens"])
    for name, (slot, _) in ADAPTERS.items():
        table.set_lora(slot, *peft_lora_weights(peft_model, name))
    slots = [ADAPTERS[name][0] if name in ADAPTERS else -1 for name in ROWS]
    wrapper.update_metadata(torch.tensor(slots).repeat_interleave(seq))
    with use_backend(backend), torch.no_grad():
        got = ours(ids)
    assert_close(got, expected, tol=1e-5)
    with torch.no_grad():  # and the adapters matter: the base model alone is far off
        assert (pristine(ids) - expected).abs().max() > 1e-2


def test_peft_lora_weights_refuses_unknown_adapters_and_dora(models):
    peft_model, pristine = models
    weights, scaling = peft_lora_weights(peft_model, "partial")
    assert set(weights) == {"q_proj", "v_proj", "up_proj"}
    assert scaling["q_proj"] == 4.0
    with pytest.raises(ValueError, match="no LoRA layer of the model holds adapter 'nope'"):
        peft_lora_weights(peft_model, "nope")
    dora = get_peft_model(copy.deepcopy(pristine), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="variant"):
        peft_lora_weights(dora, "default")
