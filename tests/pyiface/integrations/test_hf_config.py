"""interface_flags / inner_state read an HF config as vLLM flags that architecture, and plan(hf_model)
reports the state an HF model keeps (not a KV cache for an attention-free Mamba)."""

from __future__ import annotations

import pytest

from pyiface.dispatch import plan
from pyiface.integrations.hf_config import inner_state, interface_flags
from tests.pyiface.integrations.hf_models import _config, build

transformers = pytest.importorskip("transformers")

ATTENTION_FREE = {"mamba", "falcon_mamba", "mamba2"}
# (kind, layers keeping state, conv state, ssm state) of the tiny configs in hf_models
STATE = {
    "mamba": ("mamba", 2, (32, 3), (32, 8)),
    "jamba": ("mamba", 1, (32, 3), (32, 8)),
    "zamba": ("mamba", 5, (32, 3), (32, 8)),
    "mamba2": ("mamba2", 2, (64, 3), (4, 8, 8)),
    "bamba": ("mamba2", 1, (64, 3), (4, 8, 8)),
    "falcon_h1": ("mamba2", 2, (64, 3), (4, 8, 8)),
    "nemotron_h": ("mamba2", 1, (64, 3), (4, 8, 8)),
    "zamba2": ("mamba2", 3, (64, 3), (4, 8, 8)),
    "lfm2": ("short_conv", 2, (16, 2), None),
}


@pytest.mark.parametrize("family", list(STATE))
def test_flags_and_state_from_the_config(family):
    _, config = _config(family)
    state = inner_state(config)
    assert (state.kind, state.state_layers, state.conv_state_shape, state.ssm_state_shape) == STATE[family]
    flags = interface_flags(config)
    assert flags["has_inner_state"]
    assert flags["supports_pp"]
    assert flags["is_attention_free"] == (family in ATTENTION_FREE)
    assert flags["is_hybrid"] == (family not in ATTENTION_FREE)
    assert not flags["supports_multimodal"]
    assert not flags["supports_lora"]


def test_delta_rule_hybrids_and_attention_only_models():
    qwen3_next = inner_state(transformers.Qwen3NextConfig())
    assert (qwen3_next.kind, qwen3_next.state_layers, qwen3_next.attention_layers) == ("gated_delta_rule", 36, 12)
    assert qwen3_next.ssm_state_shape == (32, 128, 128)  # [HV, K, V]
    assert inner_state(transformers.KimiLinearConfig()).kind == "kda"
    assert interface_flags(transformers.KimiLinearConfig())["is_hybrid"]
    llama = interface_flags(transformers.LlamaConfig())
    assert not llama["has_inner_state"]
    assert not llama["is_hybrid"]
    assert llama["supports_pp"]


def test_vision_config_means_multimodal():
    config = transformers.Lfm2VlConfig()
    flags = interface_flags(config)
    assert flags["supports_multimodal"]
    assert flags["has_inner_state"]
    assert flags["is_hybrid"]
    assert inner_state(config).kind == "short_conv"


def test_peft_model_supports_lora():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("mamba"), peft.LoraConfig(r=2, target_modules=["in_proj"]))
    assert interface_flags(model)["supports_lora"]


def test_plan_of_an_hf_model_reads_its_state():
    mamba = plan(build("mamba"), "cpu")
    assert not mamba.needs_kv_cache
    assert mamba.flags["is_attention_free"]
    assert (mamba.mamba.kind, mamba.mamba.ssm_state_shape) == ("mamba", (32, 8))
    assert "selective_scan" in mamba.backends
    assert "mamba x 2 layers" in str(mamba)
    bamba = plan(build("bamba"), "cpu")
    assert bamba.needs_kv_cache
    assert bamba.flags["is_hybrid"]
    assert "mamba_chunk_scan" in bamba.backends
    assert "rms_norm_gated" in bamba.backends
    lfm2 = plan(build("lfm2"), "cpu")
    assert set(lfm2.backends) == {"causal_conv1d_varlen", "causal_conv1d_update"}
