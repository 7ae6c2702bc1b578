"""plan(): flags in, kernels, state and execution path out."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn

from pyiface import interfaces as itf
from pyiface.dispatch import Execution, plan
from pyiface.multimodal import MultiModalEmbedder
from triton_kernels import _csrc, use_backend


class PlainModel(nn.Module):
    pass


class VisionLoRAModel(nn.Module, itf.SupportsMultiModal, itf.SupportsLoRA, itf.SupportsPP):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    embedding_modules = {}
    embedding_padding_modules = []

    def get_multimodal_embeddings(self, **kwargs):
        return []

    def make_empty_intermediate_tensors(self, batch_size, dtype, device):
        return None

    def forward(self, input_ids, positions, intermediate_tensors=None):
        return input_ids


class MambaLM(nn.Module, itf.HasInnerState, itf.IsAttentionFree):
    pass


class Jamba(nn.Module, itf.HasInnerState, itf.IsHybrid, itf.SupportsV0Only):
    @classmethod
    def get_mamba_state_shape_from_config(cls, config):
        return (config.d_inner, config.d_conv - 1), (config.d_inner, config.d_state)


class Whisperish(nn.Module, itf.SupportsTranscription, itf.SupportsCrossEncoding):
    supported_languages = {"en": "English", "de": "German"}


CONFIG = types.SimpleNamespace(d_inner=48, d_conv=4, d_state=16)


def test_plain_model_gets_plain_path():
    p = plan(PlainModel, "cpu")
    assert not any(p.flags.values())
    table = nn.Embedding(10, 4)
    assert p.make_embedder(table) is table
    assert p.needs_kv_cache
    assert p.mamba is None
    assert p.pipeline is None
    assert p.lora_wrapper is None
    assert p.tasks == ("generate",)
    assert p.execution == Execution(validated=False)
    assert p.backends == {}


@pytest.mark.parametrize("target", [VisionLoRAModel, VisionLoRAModel()], ids=["class", "instance"])
def test_multimodal_lora_pp(target):
    with use_backend("torch"):
        p = plan(target, "cpu", pp_rank=1, pp_size=2, num_layers=5)
    assert p.flags["supports_multimodal"]
    assert p.flags["supports_lora"]
    assert p.flags["supports_pp"]
    embedder = p.make_embedder(nn.Embedding(10, 4), placeholder_token_id=9)
    assert isinstance(embedder, MultiModalEmbedder)
    assert not embedder.validated
    assert p.packed_modules_mapping["qkv_proj"] == ["q_proj", "k_proj", "v_proj"]
    assert p.pipeline.layer_range == (3, 5)
    assert (p.pipeline.make_empty_intermediate_tensors is None) == isinstance(target, type)
    assert p.backends == {"multimodal_scatter": "torch", "add_lora_linear": "torch",
                          "lora_shrink": "torch", "lora_expand": "torch"}
    table = str(p)
    assert "qkv_proj=q_proj+k_proj+v_proj" in table
    assert "rank 1 of 2, layers [3, 5)" in table


HF_MAMBA_CONFIG = types.SimpleNamespace(num_hidden_layers=3, intermediate_size=40, state_size=8, conv_kernel=4)


def test_attention_free_mamba_has_no_kv_cache():
    p = plan(MambaLM(), "cpu")
    assert not p.needs_kv_cache
    assert p.mamba is not None
    assert p.mamba.ssm_state_shape is None  # no config: shapes come at load
    assert set(p.backends) == {"selective_scan", "selective_state_update", "causal_conv1d_varlen",
                               "causal_conv1d_update"}
    assert "no (attention-free)" in str(p)


def test_hybrid_gets_state_shapes_and_eager_path():
    p = plan(Jamba, "cpu", config=CONFIG)
    assert p.needs_kv_cache
    assert p.mamba.conv_state_shape == (48, 3)
    assert p.mamba.ssm_state_shape == (48, 16)
    assert p.execution.validated
    assert "eager, validated" in str(p)


class Bamba(nn.Module, itf.HasInnerState, itf.IsHybrid):
    """A Mamba-2 hybrid: its SSM state has heads ([H, P, N])."""

    @classmethod
    def get_mamba_state_shape_from_config(cls, config):
        return (config.d_inner + 2 * config.d_state, config.d_conv - 1), (4, config.d_inner // 4, config.d_state)


def test_mamba2_hybrid_gets_the_mamba2_ops():
    p = plan(Bamba, "cpu", config=CONFIG)
    assert p.mamba.ssm_state_shape == (4, 12, 16)
    assert set(p.backends) == {"mamba_chunk_scan", "selective_state_update", "causal_conv1d_varlen",
                               "causal_conv1d_update", "rms_norm_gated"}
    assert plan(Bamba, "cpu").backends.keys() == plan(Jamba, "cpu").backends.keys()  # shapes unknown: Mamba-1


def test_hybrid_cache_allocated_with_sizes():
    p = plan(Jamba(), "cpu", config=CONFIG, max_num_seqs=6, num_mamba_layers=3)
    conv_state, ssm_state = p.mamba.cache.layer(2)
    assert conv_state.shape == (6, 48, 3)
    assert ssm_state.shape == (6, 48, 16)
    assert ssm_state.dtype == torch.float32
    assert "cache allocated" in str(p)


def test_pure_mamba_shapes_and_cache_from_the_config():
    """A pure Mamba class gets the shapes MambaCache.from_config allocates for the same config."""
    p = plan(MambaLM, "cpu", config=HF_MAMBA_CONFIG, max_num_seqs=5)
    assert p.mamba.conv_state_shape == (40, 3)
    assert p.mamba.ssm_state_shape == (40, 8)
    cache = p.mamba.cache
    assert cache.conv_state.shape == (3, 5, 40, 3)
    assert cache.ssm_state.shape == (3, 5, 40, 8)
    assert "conv (40, 3), ssm (40, 8), cache allocated" in str(p)
    model = MambaLM()
    model.config = HF_MAMBA_CONFIG
    assert plan(model, "cpu").mamba.ssm_state_shape == (40, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"config": types.SimpleNamespace(num_hidden_layers=2)}, "no 'intermediate_size'", id="config"),
        pytest.param({"config": HF_MAMBA_CONFIG, "num_mamba_layers": 2}, "num_hidden_layers", id="layers"),
    ],
)
def test_pure_mamba_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan(MambaLM, "cpu", **kwargs)


def test_v0_only_embedder_checks_the_data():
    """SupportsV0Only: the embedder ignores the caller's host count and checks the data (so a wrong
    count raises); the fast path trusts it (no host sync)."""

    class VisionV0(VisionLoRAModel, itf.SupportsV0Only):
        pass

    table = nn.Embedding(10, 4)
    ids = torch.tensor([1, 9, 9, 2])
    items = [torch.randn(2, 4)]
    fast = plan(VisionLoRAModel, "cpu").make_embedder(table, 9)
    validated = plan(VisionV0, "cpu").make_embedder(table, 9)
    assert validated.validated
    with torch.no_grad(), use_backend("torch"):
        fast(ids, items, num_placeholders=2)
        with pytest.raises(ValueError, match="Attempted to assign 2 = 2 multimodal tokens to 3 placeholders"):
            fast(ids, items, num_placeholders=3)
        with pytest.raises(ValueError, match="to 2 placeholders"):
            validated(torch.tensor([1, 9, 9, 2]), [torch.randn(3, 4)], num_placeholders=3)
        validated(ids, items, num_placeholders=3)  # the data is right; the host count is not read


def test_make_embedder_needs_the_placeholder():
    with pytest.raises(ValueError, match="placeholder_token_id"):
        plan(VisionLoRAModel, "cpu").make_embedder(nn.Embedding(10, 4))


def test_plan_reports_torch_when_the_cpu_build_fails(monkeypatch):
    """What plan() shows is what runs: a selective scan whose cpu extension cannot be built runs,
    and is reported, on torch."""

    def broken(name):
        raise _csrc.ExtensionBuildError(f"could not build csrc extension {name!r} (test)")

    monkeypatch.delenv("IFK_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_csrc, "load", broken)
    with pytest.warns(RuntimeWarning, match="falling back to the torch backend"):
        p = plan(MambaLM, "cpu")
    assert p.backends["selective_scan"] == "torch"
    assert "| op selective_scan" in str(p)


def test_tasks_from_flags():
    assert plan(Whisperish, "cpu").tasks == ("generate", "score", "transcription")


def test_cpu_backends_follow_the_interpreter_and_overrides():
    with use_backend("torch"):
        assert set(plan(MambaLM, "cpu").backends.values()) == {"torch"}
    with use_backend("cuda"):
        backends = plan(MambaLM, "cpu").backends
    assert all(v.startswith("unavailable:") for v in backends.values())


def test_hand_set_flag_counts():
    class HandSet(nn.Module):
        is_attention_free = True
        has_inner_state = True

    assert not plan(HandSet, "cpu").needs_kv_cache


@pytest.mark.parametrize(
    ("bases", "message"),
    [
        pytest.param((itf.HasInnerState, itf.IsAttentionFree, itf.IsHybrid), "both IsAttentionFree and IsHybrid",
                     id="attention-free-and-hybrid"),
        pytest.param((itf.IsHybrid,), "not HasInnerState", id="hybrid-without-state"),
        pytest.param((itf.IsAttentionFree,), "not HasInnerState", id="attention-free-without-state"),
    ],
)
def test_contradictory_flags_raise(bases, message):
    model = type("Contradictory", (nn.Module, *bases), {})
    with pytest.raises(ValueError, match=message):
        plan(model, "cpu")


def test_pp_size_without_support_raises():
    with pytest.raises(ValueError, match="does not support pipeline parallelism"):
        plan(PlainModel, "cpu", pp_size=2)


def test_default_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert plan(PlainModel).device.type == expected


def test_lora_wrapper_built_with_sizes():
    p = plan(VisionLoRAModel(), "cpu", max_loras=3, max_num_tokens=32)
    assert p.lora_wrapper is not None
    assert "batch wrapper" in str(p)
