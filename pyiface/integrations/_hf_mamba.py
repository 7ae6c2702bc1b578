"""Drop-in replacements for the functions HF transformers' Mamba-1 mixers call.

Each factory takes HF's own function (the fallback) and returns a function with HF's signature
that runs this package's op instead. HF's function still runs for what the ops do not cover: a
backward pass through the selective scan (forward-only for now), conv widths outside 2..4,
activations other than SiLU, and packed sequences (``seq_idx`` / ``cu_seqlens``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from triton_kernels import causal_conv1d_fn, causal_conv1d_update, selective_scan_fn, selective_state_update

_SILU = (None, "silu", "swish")


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _conv_supported(weight: torch.Tensor, activation: object, kwargs: dict) -> bool:
    packed = kwargs.get("seq_idx") is not None or kwargs.get("cu_seqlens") is not None
    return activation in _SILU and 2 <= weight.shape[-1] <= 4 and not packed


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
    C [B, N], D, dt_bias, dt_softplus, z)`` -> :func:`selective_state_update` (state in place)."""

    def mamba_selective_state_update(state, hidden_states, dt, A, B, C, D=None, dt_bias=None,
                                     dt_softplus=False, z=None, **kwargs):
        return selective_state_update(state, hidden_states, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                      dt_softplus=dt_softplus)

    return mamba_selective_state_update


def conv1d(original: Callable) -> Callable:
    """HF's ``causal_conv1d_fn(x [B, D, L], weight [D, W], bias, activation)`` -> :func:`causal_conv1d_fn`."""

    def hf_causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
        if not _conv_supported(weight, activation, kwargs):
            return original(hidden_states, weight, bias, activation, **kwargs)
        return causal_conv1d_fn(hidden_states, weight, bias, activation)

    return hf_causal_conv1d_fn


def conv1d_update(original: Callable) -> Callable:
    """HF's ``causal_conv1d_update(x [B, D, L], conv_state [B, D, S], weight [D, W], bias, activation)``
    -> :func:`causal_conv1d_update` (conv_state in place)."""

    def hf_causal_conv1d_update(hidden_states, conv_state, weight, bias=None, activation=None, **kwargs):
        if not _conv_supported(weight, activation, kwargs) or conv_state.shape[-1] < weight.shape[-1] - 1:
            return original(hidden_states, conv_state, weight, bias, activation, **kwargs)
        return causal_conv1d_update(hidden_states, conv_state, weight, bias, activation)

    return hf_causal_conv1d_update


# The module globals a Mamba-1 mixer calls -> the factory of each replacement.
MAMBA1_FUNCTIONS: dict[str, Callable[[Callable], Callable]] = {
    "mamba_selective_scan": selective_scan,
    "mamba_selective_state_update": selective_state_update_step,
    "causal_conv1d_fn": conv1d,
    "causal_conv1d_update": conv1d_update,
}
