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
MAMBA2 = {  # bamba / falcon_h1 / granitemoehybrid: 4 heads of 8 in 2 groups; chunk 4 < the prompts
    "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_n_groups": 2, "mamba_d_state": 8, "mamba_d_conv": 4,
    "mamba_expand": 2, "mamba_chunk_size": 4, "num_attention_heads": 2, "num_key_value_heads": 1,
    "intermediate_size": 24,
}  # fmt: skip
HYBRID2 = {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 24}


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
    if family == "lfm2":  # short-conv layers around one attention layer
        return hf.Lfm2ForCausalLM, hf.Lfm2Config(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, layer_types=["conv", "full_attention", "conv"])
    return _config_mamba2(hf, family)


def _config_mamba2(hf, family: str):
    if family == "mamba2":
        return hf.Mamba2ForCausalLM, hf.Mamba2Config(
            vocab_size=VOCAB, hidden_size=16, num_heads=4, head_dim=8, expand=2, state_size=8, n_groups=2,
            num_hidden_layers=2, conv_kernel=4, chunk_size=4)
    if family == "bamba":  # a Mamba-2 layer, then an attention layer
        return hf.BambaForCausalLM, hf.BambaConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, attn_layer_indices=[1], **MAMBA2)
    if family == "falcon_h1":  # attention and Mamba-2 side by side in each layer; the gate goes into the
        return hf.FalconH1ForCausalLM, hf.FalconH1Config(  # decode step (mamba_rms_norm=False, the default)
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, mamba_d_ssm=32, **MAMBA2)
    if family == "granitemoehybrid":
        return hf.GraniteMoeHybridForCausalLM, hf.GraniteMoeHybridConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, layer_types=["mamba", "attention"],
            num_local_experts=2, num_experts_per_tok=1, shared_intermediate_size=24, **MAMBA2)
    if family == "nemotron_h":
        return hf.NemotronHForCausalLM, hf.NemotronHConfig(
            vocab_size=VOCAB, hidden_size=16, layers_block_type=["mamba", "attention", "mlp"], head_dim=8,
            ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, conv_kernel=4, expand=2,
            chunk_size=4, **HYBRID2)
    if family == "zamba2":  # Mamba-2 layers around one shared hybrid (attention) block
        return hf.Zamba2ForCausalLM, hf.Zamba2Config(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=3, layers_block_type=["mamba", "hybrid", "mamba"],
            mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=2, n_mamba_heads=4, chunk_size=4,
            num_mem_blocks=1, **HYBRID2)
    raise ValueError(family)


def _stir_mamba2(model: torch.nn.Module, seed: int) -> None:
    """Give Mamba-2 mixers weights under which the scan matters: with HF's initialisation the SSM
    term of most of these families is ~1e-7 of the D skip, so a wrong scan would still pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mixer in model.modules():
            if hasattr(mixer, "dt_bias") and hasattr(mixer, "A_log"):
                mixer.A_log.copy_(2 * torch.rand(mixer.A_log.shape, generator=gen))  # A in [-e^2, -1]
                for p in (mixer.dt_bias, mixer.D):
                    p.copy_(torch.randn(p.shape, generator=gen))
                for p in (mixer.in_proj.weight, mixer.conv1d.weight):
                    p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A random-initialised ``<Family>ForCausalLM`` in eval mode (pad token 0, never in prompts)."""
    cls, config = _config(family)
    config.pad_token_id, config.eos_token_id = 0, None
    torch.manual_seed(seed)
    model = cls(config).eval()
    _stir_mamba2(model, seed)
    return model.to(dtype)


def reload(model: torch.nn.Module, directory) -> torch.nn.Module:
    """``model`` saved to ``directory`` and loaded back with ``from_pretrained`` (which kernelizes it)."""
    model.save_pretrained(directory)
    return type(model).from_pretrained(directory).eval()


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
