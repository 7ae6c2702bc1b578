"""Oracle: peft's mixed-adapter batches (3 adapters of ranks 2/8/4, different scalings and targets,
``"__base__"`` rows) on a tiny HF Llama give peft's own logits with
:func:`pyiface.integrations.peft.apply_kernels`, each row equals its adapter merged into the base
weights, and what is not plain LoRA is refused with nothing patched."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.pyiface.integrations.hf_models import ops_seen
from tests.pyiface.lora.common import BACKENDS
from tests.utils import assert_close, assert_equal
from triton_kernels import use_backend

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from pyiface.integrations.peft import apply_kernels, revert_kernels  # noqa: E402

pytestmark = pytest.mark.oracle

VOCAB = 40
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
RANDOM_B = {"init_lora_weights": False}  # peft's default B = 0 would make every adapter a no-op
ADAPTERS = {  # ranks 2 / 8 / 4, scalings and targets differ
    "small": peft.LoraConfig(r=2, lora_alpha=4, target_modules=ATTN + MLP, **RANDOM_B),
    "big": peft.LoraConfig(r=8, lora_alpha=8, target_modules=ATTN + MLP, rank_pattern={"k_proj": 3},
                           alpha_pattern={"down_proj": 32}, **RANDOM_B),
    "partial": peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], **RANDOM_B),
}
ROWS = ["big", "__base__", "small", "partial", "big", "small", "__base__"]


def base_model(dtype=torch.float32):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval().to(dtype)


def peft_model(dtype=torch.float32, adapters=ADAPTERS):
    model = None
    for name, config in adapters.items():
        torch.manual_seed(len(name))
        if model is None:
            model = peft.get_peft_model(base_model(dtype), copy.deepcopy(config), adapter_name=name)
        else:
            model.add_adapter(name, copy.deepcopy(config))
    return model.eval()


def ids(length=5):
    return torch.randint(1, VOCAB, (len(ROWS), length), generator=torch.Generator().manual_seed(3))


def logits(model, x, rows=ROWS):
    with torch.no_grad():
        return model(x, adapter_names=rows).logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_adapter_batch_matches_peft_loop(backend):
    model, x = peft_model(), ids()
    expected = logits(model, x)
    patched = apply_kernels(model)
    assert len(patched) == 2 * len(ATTN + MLP)
    with use_backend(backend), ops_seen() as seen:
        got = logits(model, x)
    assert "ifk::add_lora_linear" in seen
    assert_close(got, expected, tol=1e-5)
    assert (logits(model, x, ["__base__"] * len(ROWS)) - expected).abs().max() > 1e-2  # adapters matter
    revert_kernels(model)
    revert_kernels(model)
    with ops_seen() as seen:
        assert_equal(logits(model, x), expected)
    assert not seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_adapter_batch_under_inference_mode(backend):
    """HF ``generate`` runs under ``torch.inference_mode()`` (the slots and metadata are then built
    there; reading their version counters crashed before): same logits, and a weight changed
    afterwards, outside inference mode, is still picked up."""
    model, x = peft_model(), ids()
    expected = logits(model, x)
    apply_kernels(model)
    with use_backend(backend), ops_seen() as seen, torch.inference_mode():
        got = model(x, adapter_names=ROWS).logits
    assert "ifk::add_lora_linear" in seen
    assert_close(got, expected, tol=1e-5)
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["small"].weight.mul_(3.0)
    with use_backend(backend), torch.inference_mode():
        got = model(x, adapter_names=ROWS).logits
    revert_kernels(model)
    assert_close(got, logits(model, x), tol=1e-5)

def test_model_loaded_under_inference_mode():
    """Adapter weights that are inference tensors keep no version counter (reading it crashed):
    they are restacked every call, so a change made in place inside inference mode is seen."""
    x = ids()
    with torch.inference_mode():
        model = peft_model()
        expected = model(x, adapter_names=ROWS).logits
        apply_kernels(model)
        assert_close(model(x, adapter_names=ROWS).logits, expected, tol=1e-5)
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["small"].weight.mul_(3.0)
        got = model(x, adapter_names=ROWS).logits
        revert_kernels(model)
        assert_close(got, model(x, adapter_names=ROWS).logits, tol=1e-5)
        assert (got - expected).abs().max() > 1e-3  # the change matters

def test_rows_equal_their_adapter_merged():
    """Each row of the mixed batch equals the base model with that row's adapter merged in."""
    model, x = peft_model(), ids()
    apply_kernels(model)
    apply_kernels(model)  # twice: harmless
    got = logits(model, x)
    for name in [*ADAPTERS, "__base__"]:
        rows = [i for i, r in enumerate(ROWS) if r == name]
        if name == "__base__":
            with torch.no_grad():
                merged = base_model()(x[rows]).logits
        else:
            single = peft_model()
            single.set_adapter(name)
            merged_model = single.merge_and_unload(adapter_names=[name])
            with torch.no_grad():
                merged = merged_model(x[rows]).logits
        assert_close(got[rows], merged, tol=1e-5, name=name)


def test_fp16_error_at_most_twice_peft_fp16():
    x = ids()
    ref = logits(peft_model(), x)
    model = peft_model(torch.float16)
    peft_err = ((logits(model, x).double() - ref).norm() / ref.norm()).item()
    apply_kernels(model)
    ours = logits(model, x)
    err = ((ours.double() - ref).norm() / ref.norm()).item()
    assert err <= 2 * peft_err + 1e-4, (err, peft_err)


def test_weights_changed_or_added_after_apply_are_used():
    model, x = peft_model(), ids()
    apply_kernels(model)
    logits(model, x)  # builds the stacked slots
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["small"].weight.mul_(3.0)
    model.add_adapter("late", peft.LoraConfig(r=3, lora_alpha=6, target_modules=["o_proj"], **RANDOM_B))
    rows = [*ROWS[:-1], "late"]
    got = logits(model, x, rows)
    revert_kernels(model)
    assert_close(got, logits(model, x, rows), tol=1e-5)


def test_gradients_fall_back_to_peft_loop():
    model, x = peft_model(), ids()
    with ops_seen() as seen:
        apply_kernels(model)
        loss = model(x, adapter_names=ROWS).logits.square().mean()
    loss.backward()
    assert "ifk::add_lora_linear" not in seen
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["small"].weight.grad is not None


def test_dora_and_other_methods_refused_nothing_patched():
    dora = peft_model(adapters={"plain": ADAPTERS["small"],
                                "dora": peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)})
    with pytest.raises(ValueError, match=r"adapter 'dora' is a LoRA variant \(DoRA\)"):
        apply_kernels(dora)
    assert not any("_mixed_batch_forward" in m.__dict__ for m in dora.modules())
    ia3 = peft.get_peft_model(base_model(), peft.IA3Config(target_modules=["k_proj", "down_proj"],
                                                           feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="adapter 'default' is IA3, not LoRA"):
        apply_kernels(ia3)
    with pytest.raises(TypeError, match=r"peft_model must be a peft\.PeftModel, got LlamaForCausalLM"):
        apply_kernels(base_model())
