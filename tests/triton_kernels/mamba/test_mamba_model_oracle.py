"""Oracle: a tiny random HF ``MambaForCausalLM`` whose mixers run on our ops gives HF's own logits,
for a whole prompt and token by token with a state cache (slots gathered from a MambaCache, a
padded decode row included)."""

from __future__ import annotations

import types

import pytest
import torch

from pyiface.mamba_cache import MambaCache
from tests.utils import KERNEL_DEVICE, assert_close
from triton_kernels import PAD_SLOT_ID, use_backend
from triton_kernels.mamba.causal_conv1d import causal_conv1d_fn, causal_conv1d_update, causal_conv1d_varlen
from triton_kernels.mamba.state_update import selective_state_update

transformers = pytest.importorskip("transformers")
from transformers.models.mamba.modeling_mamba import MambaMixer  # noqa: E402

pytestmark = pytest.mark.oracle

PROMPT, STEPS = 6, 3
# The prefill scan is the sibling op under test elsewhere; under the CPU interpreter its Triton kernel
# takes ~30 s per call at these sizes, so here it runs on its torch backend (our ops stay on Triton).
SCAN_BACKEND = None if torch.cuda.is_available() else "torch"


def mixer_on_our_ops(run: types.SimpleNamespace):
    """A ``MambaMixer.forward`` replacement; ``run`` says the mode: ``cache`` None (whole sequences,
    no state), prefill (``decode`` False: varlen conv + scan, states written to ``slots``) or decode."""
    from triton_kernels.mamba import selective_scan_fn  # the prefill scan (the sibling op)

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        batch, length, _ = hidden_states.shape
        x, gate = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # [B, D, L] each
        weight, bias = self.conv1d.weight.squeeze(1), self.conv1d.bias
        A = -torch.exp(self.A_log.float())
        if run.cache is None:
            x = causal_conv1d_fn(x, weight, bias, "silu")
        else:
            conv_state, ssm_state = run.cache.layer(self.layer_idx)
            if run.decode:
                x = causal_conv1d_update(x[..., 0], conv_state, weight, bias, "silu",
                                         conv_state_indices=run.slots)[..., None]
            else:
                packed = x.transpose(0, 1).reshape(x.shape[1], batch * length)  # [D, T], sequence-major
                qsl = torch.arange(0, batch * length + 1, length, device=x.device, dtype=torch.int32)
                fresh = torch.zeros(batch, dtype=torch.bool, device=x.device)
                out = causal_conv1d_varlen(packed, weight, bias, conv_state, qsl, run.slots, fresh, "silu")
                x = out.reshape(-1, batch, length).transpose(0, 1)
        sizes = [self.time_step_rank, self.ssm_state_size, self.ssm_state_size]
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)), sizes, dim=-1)
        dt = self.dt_proj.weight @ dt.transpose(1, 2)  # [B, D, L]
        if run.cache is not None and run.decode:
            y = selective_state_update(
                ssm_state,
                x[..., 0],
                dt[..., 0],
                A,
                B[:, 0],
                C[:, 0],
                self.D,
                z=gate[..., 0],
                dt_bias=self.dt_proj.bias,
                dt_softplus=True,
                state_batch_indices=run.slots,
            )[..., None]
        else:
            with use_backend(SCAN_BACKEND):
                y, last = selective_scan_fn(
                    x,
                    dt,
                    A,
                    B.transpose(1, 2),
                    C.transpose(1, 2),
                    self.D.float(),
                    z=gate,
                    delta_bias=self.dt_proj.bias.float(),
                    delta_softplus=True,
                    return_last_state=True,
                )
            if run.cache is not None:
                ssm_state[run.slots.long()] = last.to(ssm_state.dtype)
        return self.out_proj(y.transpose(1, 2).to(hidden_states.dtype))

    return forward


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
