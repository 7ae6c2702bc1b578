"""Drop-in replacements for the functions HF transformers' Mamba-1 and Mamba-2 mixers call.

Each factory takes HF's own function (the fallback) and returns a function with HF's signature
that runs this package's op instead. HF's function still runs for what the ops do not cover: a
backward pass through the Mamba-1 selective scan (forward-only for now), conv widths outside 2..4,
activations other than SiLU, and packed sequences where we cannot keep them apart: Mamba-1 (its
scan has no packed form) and a Mamba-2 conv given ``cu_seqlens`` without ``seq_idx`` (HF's torch
path then raises its "can't keep packed sequences apart" error). Mamba-2 packed sequences with
``seq_idx`` (and ``cu_seqlens`` for the chunk scan) run on our ops, as on mamba_ssm /
causal-conv1d; HF's torch path has no packed form.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from triton_kernels import (
    causal_conv1d_fn,
    causal_conv1d_update,
    mamba_chunk_scan_combined,
    selective_scan_fn,
    selective_state_update,
)

_SILU = (None, "silu", "swish")


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _conv_supported(weight: torch.Tensor, activation: object, kwargs: dict, segmented: bool = False) -> bool:
    """SiLU or none, width 2..4, and no packed sequences unless ``segmented`` and given by ``seq_idx``."""
    packed = kwargs.get("seq_idx") is not None or kwargs.get("cu_seqlens") is not None
    kept_apart = segmented and kwargs.get("seq_idx") is not None
    return activation in _SILU and 2 <= weight.shape[-1] <= 4 and (not packed or kept_apart)


def selective_scan(original: Callable) -> Callable:
    """HF's ``mamba_selective_scan(u [B, D, L], dt [B, D, L], A [D, N], B [B, N, L], C [B, N, L],
    D, z, delta_bias, delta_softplus, return_last_state, ...)`` -> :func:`selective_scan_fn`."""

    def mamba_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, return_last_state=False, **kwargs):
        args = (hidden_states, dt, A, B, C, D, z, delta_bias)
        if _needs_grad(*args):
            return original(*args, delta_softplus=delta_softplus, return_last_state=return_last_state, **kwargs)
        return selective_scan_fn(*args, delta_softplus=delta_softplus, return_last_state=return_last_state)

    return mamba_selective_scan


def selective_state_update_step(original: Callable) -> Callable:
    """HF's ``mamba_selective_state_update(state [B, D, N], x [B, D], dt [B, D], A [D, N], B [B, N],
    C [B, N], D, dt_bias, dt_softplus, z)`` -> :func:`selective_state_update` (state in place).
    Also Mamba-2's ``mamba2_selective_state_update``, the heads form: state [B, H, P, N], x, dt, z
    [B, H, P], A [H, P, N] (a stride-0 expand of [H]: the tied-A fast path), B, C [B, G, N]."""

    def mamba_selective_state_update(state, hidden_states, dt, A, B, C, D=None, dt_bias=None,
                                     dt_softplus=False, z=None, **kwargs):
        return selective_state_update(state, hidden_states, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                      dt_softplus=dt_softplus)

    return mamba_selective_state_update


def conv1d(original: Callable, *, segmented: bool = False) -> Callable:
    """HF's ``causal_conv1d_fn(x [B, D, L], weight [D, W], bias, activation, seq_idx [B, L] int32)``
    -> :func:`causal_conv1d_fn`. ``segmented`` (Mamba-2): ``seq_idx`` runs on our op (the conv restarts
    at each new id), as the chunk scan after it does too."""

    def hf_causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
        if not _conv_supported(weight, activation, kwargs, segmented):
            return original(hidden_states, weight, bias, activation, **kwargs)
        return causal_conv1d_fn(hidden_states, weight, bias, activation, seq_idx=kwargs.get("seq_idx"))

    return hf_causal_conv1d_fn


def conv1d_update(original: Callable) -> Callable:
    """HF's ``causal_conv1d_update(x [B, D, L], conv_state [B, D, S], weight [D, W], bias, activation)``
    -> :func:`causal_conv1d_update` (conv_state in place)."""

    def hf_causal_conv1d_update(hidden_states, conv_state, weight, bias=None, activation=None, **kwargs):
        if not _conv_supported(weight, activation, kwargs) or conv_state.shape[-1] < weight.shape[-1] - 1:
            return original(hidden_states, conv_state, weight, bias, activation, **kwargs)
        return causal_conv1d_update(hidden_states, conv_state, weight, bias, activation)

    return hf_causal_conv1d_update


def chunk_scan(original: Callable) -> Callable:
    """HF's ``mamba2_chunk_scan(x [B, L, H, P], dt [B, L, H], A [H], B [B, L, G, N], C [B, L, G, N],
    chunk_size, D [H], dt_bias [H], initial_states [B, H, P, N], dt_softplus, dt_limit,
    return_final_states, z=, seq_idx=, cu_seqlens=)`` -> :func:`mamba_chunk_scan_combined`
    (differentiable; ``z`` and the packed-sequence arguments honoured as mamba_ssm does, where HF's
    torch path ignores ``z`` and refuses packed sequences)."""

    def mamba2_chunk_scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                          dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False, *, z=None,
                          seq_idx=None, cu_seqlens=None, **kwargs):
        return mamba_chunk_scan_combined(
            hidden_states, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
            seq_idx=seq_idx, cu_seqlens=cu_seqlens, dt_softplus=dt_softplus, dt_limit=tuple(dt_limit),
            return_final_states=return_final_states)

    return mamba2_chunk_scan


# The module globals a Mamba-1 mixer calls -> the factory of each replacement.
MAMBA1_FUNCTIONS: dict[str, Callable[[Callable], Callable]] = {
    "mamba_selective_scan": selective_scan,
    "mamba_selective_state_update": selective_state_update_step,
    "causal_conv1d_fn": conv1d,
    "causal_conv1d_update": conv1d_update,
}

# The module globals a Mamba-2 mixer calls (its unfused path). Its training-only fused call,
# ``mamba2_split_conv1d_scan_combined``, stays HF's: on HF's torch path it returns None and the
# mixer takes the unfused path, which then trains through our differentiable chunk scan and conv.
MAMBA2_FUNCTIONS: dict[str, Callable[[Callable], Callable]] = {
    "mamba2_chunk_scan": chunk_scan,
    "mamba2_selective_state_update": selective_state_update_step,
    "causal_conv1d_fn": functools.partial(conv1d, segmented=True),
    "causal_conv1d_update": conv1d_update,
}
