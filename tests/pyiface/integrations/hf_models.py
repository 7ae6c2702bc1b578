"""Tiny random HF models of every supported family (built offline from small configs) and the
helpers the integration tests share."""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import profile

VOCAB = 64
MAMBA = {"state_size": 8, "num_hidden_layers": 2, "time_step_rank": 4, "conv_kernel": 4}
HYBRID = {  # jamba / zamba: one attention (or shared hybrid) layer between Mamba layers
    "intermediate_size": 24, "num_attention_heads": 2, "mamba_d_state": 8, "mamba_d_conv": 4,
    "mamba_expand": 2, "mamba_dt_rank": 4, "attn_layer_period": 2, "attn_layer_offset": 1,
}  # fmt: skip


def _config(family: str):
    import transformers as hf

    if family == "mamba":
        return hf.MambaForCausalLM, hf.MambaConfig(vocab_size=VOCAB, hidden_size=16, **MAMBA)
    if family == "falcon_mamba":
        return hf.FalconMambaForCausalLM, hf.FalconMambaConfig(vocab_size=VOCAB, hidden_size=16, **MAMBA)
    if family == "jamba":
        return hf.JambaForCausalLM, hf.JambaConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_key_value_heads=1, num_experts=2,
            num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1, **HYBRID)
    if family == "zamba":  # the shared attention block needs two hybrid layers to tie
        return hf.ZambaForCausalLM, hf.ZambaConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=5, num_key_value_heads=2, attention_head_dim=8,
            n_mamba_heads=2, **HYBRID)
    raise ValueError(family)


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random-initialised ``<Family>ForCausalLM`` in eval mode (pad token 0, never in prompts)."""
    cls, config = _config(family)
    config.pad_token_id, config.eos_token_id = 0, None
    torch.manual_seed(seed)
    return cls(config).eval().to(dtype)


def prompt(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def ops_seen():
    """Yield a set filled, on exit, with the names of ``ifk::`` ops the profiler saw run."""
    seen: set[str] = set()
    with profile() as prof:
        yield seen
    seen.update(e.name for e in prof.events() if e.name.startswith("ifk::"))


def greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int = 4) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                              min_new_tokens=steps)
