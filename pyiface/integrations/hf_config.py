"""What an HF transformers config says about its model: the interface flags vLLM gives that
architecture and the kind and shapes of its inner state, read from the config's own fields (layer
types, state sizes, a vision config), never from a list of model names. Reads attributes only:
importing this module imports neither transformers nor peft.

Inner-state kinds (``InnerState.kind``): ``"mamba"`` (Mamba-1: a selective scan with a dt rank),
``"mamba2"`` (heads and groups: the chunked SSD), ``"short_conv"`` (a gated depthwise conv and no SSM,
LFM2-style), ``"gated_delta_rule"`` (Gated DeltaNet linear attention), ``"kda"`` (Kimi delta attention).
"""

from __future__ import annotations

import dataclasses
from typing import Any

INNER_STATE_KINDS = ("mamba", "mamba2", "short_conv", "gated_delta_rule", "kda")
# Layer-type strings (``config.layer_types`` / ``layers_block_type``) of layers that keep inner state
# and of layers that attend; "hybrid" is zamba's shared attention block beside its Mamba layer.
_STATE_LAYER_TYPES = {"mamba", "mamba2", "linear_attention", "conv", "short_conv", "hybrid"}
_ATTENTION_LAYER_TYPES = {"attention", "full_attention", "sliding_attention", "hybrid"}


def _first(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


@dataclasses.dataclass(frozen=True)
class InnerState:
    """One model's inner state: its kind, how many layers keep it, how many attend, and the
    per-sequence state shapes of one such layer (conv ``[channels, W - 1]``; ssm ``[D, N]`` for Mamba-1,
    ``[H, P, N]`` for Mamba-2, ``[HV, K, V]`` for the delta rules; None for a short conv)."""

    kind: str
    state_layers: int
    attention_layers: int
    conv_state_shape: tuple[int, ...]
    ssm_state_shape: tuple[int, ...] | None


def text_config(config: Any) -> Any:
    """The decoder's config: ``text_config`` of a multimodal config, else the config itself."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else getattr(config, "text_config", None) or config


def _kind(config: Any) -> str | None:
    if _first(config, "n_groups", "mamba_n_groups", "mamba_ngroups") is not None:
        return "mamba2"
    if _first(config, "time_step_rank", "mamba_dt_rank") is not None:
        return "mamba"
    if getattr(config, "conv_L_cache", None) is not None:
        return "short_conv"
    if getattr(config, "linear_num_value_heads", None) is not None:
        return "gated_delta_rule"
    if _first(config, "linear_attn_config", "linear_num_heads") is not None:
        return "kda"
    return None


def _layer_counts(config: Any) -> tuple[int, int]:
    """(layers with inner state, layers with attention), from the config's layer layout."""
    n = getattr(config, "num_hidden_layers", None) or 0
    types = _first(config, "layer_types", "layers_block_type")
    if isinstance(types, (list, tuple)) and types:
        return (sum(t in _STATE_LAYER_TYPES for t in types), sum(t in _ATTENTION_LAYER_TYPES for t in types))
    indices = getattr(config, "attn_layer_indices", None)
    if indices is not None:
        return n - len(indices), len(indices)
    period = getattr(config, "attn_layer_period", None)
    if period:
        offset = getattr(config, "attn_layer_offset", 0)
        attention = sum(i % period == offset for i in range(n))
        return n - attention, attention
    # no layout: every layer has inner state, and attention too when the config has attention heads
    # (falcon_h1 runs both side by side in each layer)
    return n, n if getattr(config, "num_attention_heads", None) else 0


def _shapes(config: Any, kind: str) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    hidden = config.hidden_size
    width = _first(config, "conv_kernel", "mamba_d_conv", "linear_conv_kernel_dim", "conv_L_cache", default=4)
    state = _first(config, "state_size", "mamba_d_state", "ssm_state_size")
    if kind == "mamba":
        expand = getattr(config, "mamba_expand", None)
        inner = expand * hidden if expand is not None else config.intermediate_size
        return (inner, width - 1), (inner, state)
    if kind == "mamba2":
        heads = _first(config, "num_heads", "mamba_n_heads", "n_mamba_heads", "mamba_num_heads")
        # the Mamba-specific names first: in a hybrid's config ``head_dim`` is attention's
        head_dim = _first(config, "mamba_d_head", "mamba_headdim", "mamba_head_dim", "head_dim")
        groups = _first(config, "n_groups", "mamba_n_groups", "mamba_ngroups")
        inner = heads * head_dim
        return (inner + 2 * groups * state, width - 1), (heads, head_dim, state)
    if kind == "short_conv":
        return (hidden, width - 1), None
    if kind == "gated_delta_rule":
        k_heads, v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        k_dim, v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        return (2 * k_heads * k_dim + v_heads * v_dim, width - 1), (v_heads, k_dim, v_dim)
    heads = _first(config, "linear_num_heads", default=getattr(config, "num_attention_heads", 1))
    head_dim = _first(config, "linear_head_dim", default=getattr(config, "head_dim", 1))
    return (3 * heads * head_dim, width - 1), (heads, head_dim, head_dim)


def inner_state(config: Any) -> InnerState | None:
    """The model's :class:`InnerState`, None for a model without one (an attention-only LM)."""
    config = text_config(config)
    kind = _kind(config)
    if kind is None:
        return None
    state_layers, attention_layers = _layer_counts(config)
    conv_shape, ssm_shape = _shapes(config, kind)
    return InnerState(kind, state_layers, attention_layers, conv_shape, ssm_shape)


def _config_of(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", None)
    return config if config is not None else model_or_config


_FLAGS = ("supports_multimodal", "supports_lora", "supports_pp", "has_inner_state", "is_attention_free", "is_hybrid",
          "supports_cross_encoding", "supports_quant", "supports_transcription", "supports_v0_only")


def interface_flags(model_or_config: Any) -> dict[str, bool]:
    """The vLLM interface flags of an HF model or config, as ``{predicate name: bool}`` (the keys of
    :data:`pyiface.dispatch.FLAG_PREDICATES`).

    ``has_inner_state``: the config describes a Mamba, short-conv or linear-attention layer;
    ``is_attention_free``: and no layer attends; ``is_hybrid``: some do; ``supports_multimodal``: a
    vision (or audio) config beside the text config; ``supports_pp``: a decoder with
    ``num_hidden_layers`` (vLLM's decoder families all are); ``supports_lora``: a peft model (its
    ``peft_config``). The other flags (cross-encoding, quantization, transcription, V0-only) are False:
    the config does not say.

    Example:
        >>> from transformers import MambaConfig
        >>> flags = interface_flags(MambaConfig(hidden_size=16, num_hidden_layers=2))
        >>> flags["has_inner_state"], flags["is_attention_free"], flags["is_hybrid"]
        (True, True, False)
    """
    config = _config_of(model_or_config)
    state = inner_state(config)
    multimodal = any(getattr(config, name, None) is not None for name in ("vision_config", "audio_config"))
    flags = dict.fromkeys(_FLAGS, False)
    flags.update(
        supports_multimodal=multimodal,
        supports_lora=getattr(model_or_config, "peft_config", None) is not None,
        supports_pp=getattr(text_config(config), "num_hidden_layers", None) is not None,
        has_inner_state=state is not None,
        is_attention_free=state is not None and state.attention_layers == 0,
        is_hybrid=state is not None and state.attention_layers > 0,
    )
    return flags


def is_hf_model(model: Any) -> bool:
    """An HF transformers (or peft) model: a ``config`` with a ``model_type``, and no flags of ours."""
    model_type = getattr(_config_of(model), "model_type", None)
    return model_type is not None and not any(hasattr(type(model), flag) for flag in _FLAGS)
