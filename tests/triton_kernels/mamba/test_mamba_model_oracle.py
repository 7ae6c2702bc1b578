"""Oracle: a tiny random HF ``MambaForCausalLM`` whose mixers run on our ops gives HF's own logits,
for a whole prompt and token by token with a state cache (slots gathered from a MambaCache, a
padded decode row included)."""

from __future__ import annotations

import types

import pytest
import torch

from pyiface.mamba_cache import MambaCache
from tests.triton_kernels.mamba.hf_mixer import mixer_on_our_ops
from tests.utils import KERNEL_DEVICE, assert_close
from triton_kernels import PAD_SLOT_ID

transformers = pytest.importorskip("transformers")
from transformers.models.mamba.modeling_mamba import MambaMixer  # noqa: E402

pytestmark = pytest.mark.oracle

PROMPT, STEPS = 6, 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.MambaConfig(
        vocab_size=100, hidden_size=64, state_size=16, num_hidden_layers=2, conv_kernel=4, expand=2
    )
    return transformers.MambaForCausalLM(config).eval().to(KERNEL_DEVICE)


def hf_logits(model, ids):
    """HF's own path: the prompt in one call, then one cached call per token."""
    out = model(ids[:, :PROMPT], use_cache=True)
    cache, logits = out.cache if hasattr(out, "cache") else out.past_key_values, [out.logits]
    for t in range(PROMPT, PROMPT + STEPS):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, 1)


@torch.no_grad()
def test_tiny_mamba_logits_prompt_and_decode(model, monkeypatch):
    ids = torch.randint(0, 100, (2, PROMPT + STEPS), device=KERNEL_DEVICE)
    ref_full = model(ids).logits
    ref_steps = hf_logits(model, ids)

    run = types.SimpleNamespace(cache=None, decode=False, slots=None)
    monkeypatch.setattr(MambaMixer, "forward", mixer_on_our_ops(run))
    assert_close(model(ids).logits, ref_full, 1e-4, name="prompt logits (causal_conv1d_fn + scan)")

    run.cache = MambaCache.from_config(model.config, num_slots=5, device=KERNEL_DEVICE)
    for request in ("filler", "a", "gap", "b"):
        run.cache.allocate(request)
    run.cache.free("gap")
    run.cache.free("filler")
    run.slots = run.cache.batch_indices(["b", "a"])  # slots 3 and 1: gathered, not in batch order
    untouched = run.cache.ssm_state[:, [0, 2, 4]].clone(), run.cache.conv_state[:, [0, 2, 4]].clone()
    logits = [model(ids[:, :PROMPT]).logits]
    run.decode = True
    run.slots = run.cache.batch_indices(["b", "a"], pad_to=3)  # a padded row, as a CUDA graph batch
    for t in range(PROMPT, PROMPT + STEPS):
        step = torch.cat([ids[:, t : t + 1], ids[:1, t : t + 1]])  # the pad row's token is arbitrary
        logits.append(model(step).logits[:2])
    assert run.slots.tolist() == [3, 1, PAD_SLOT_ID]
    assert_close(torch.cat(logits, 1), ref_steps, 1e-4, name="prefill + decode logits")
    assert torch.equal(run.cache.ssm_state[:, [0, 2, 4]], untouched[0])
    assert torch.equal(run.cache.conv_state[:, [0, 2, 4]], untouched[1])
