"""Drop-in replacements for the functions HF transformers' Mamba-1 and Mamba-2 mixers call.

Each factory takes HF's own function (the fallback) and returns a function with HF's signature
that runs this package's op instead (every one differentiable, so training runs on our ops too).
HF's function still runs for what the ops do not cover: conv widths outside 2..4, activations
other than SiLU, falcon_mamba's B/C/dt RMS norms inside ``mamba_inner_fn``, and packed sequences
where we cannot keep them apart: Mamba-1 (its scan has no packed form) and a Mamba-2 conv given
``cu_seqlens`` without ``seq_idx`` (HF's torch path then raises its "can't keep packed sequences
apart" error). Where HF's fused training function is the torch one it returns None and the mixer
takes its unfused path, on our ops. Mamba-2 packed sequences with
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
    mamba_inner_fn,
    mamba_split_conv1d_scan_combined,
    selective_scan_fn,
    selective_state_update,
)

_SILU = (None, "silu", "swish")


def _conv_supported(weight: torch.Tensor, activation: object, kwargs: dict, segmented: bool = False) -> bool:
    """SiLU or none, width 2..4, and no packed sequences unless ``segmented`` and given by ``seq_idx``."""
    packed = kwargs.get("seq_idx") is not None or kwargs.get("cu_seqlens") is not None
    kept_apart = segmented and kwargs.get("seq_idx") is not None
    return activation in _SILU and 2 <= weight.shape[-1] <= 4 and (not packed or kept_apart)


def selective_scan(original: Callable) -> Callable:
    """HF's ``mamba_selective_scan(u [B, D, L], dt [B, D, L], A [D, N], B [B, N, L], C [B, N, L],
    D, z, delta_bias, delta_softplus, return_last_state, ...)`` -> :func:`selective_scan_fn`
    (differentiable: training runs on our scan's backward too)."""

    def mamba_selective_scan(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, return_last_state=False, **kwargs):
        return selective_scan_fn(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus=delta_softplus,
                                 return_last_state=return_last_state)

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


def inner(original: Callable) -> Callable:
    """HF's training-only ``mamba_inner_fn(xz [B, 2D, L], conv1d_weight [D, 1, W], conv1d_bias,
    x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias, A [D, N], B, C, D, delta_bias,
    delta_softplus, b_rms_weight, c_rms_weight, dt_rms_weight, b_c_dt_rms_eps)`` -> :func:`mamba_inner_fn`
    (mamba_ssm's, as HF calls it when mamba_ssm is installed: like it, the fused path does not re-mask
    padding after the conv). With the B/C/dt RMS norm weights (falcon_mamba) HF's function runs."""

    def hf_mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                          out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, delta_softplus=True,
                          b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None, b_c_dt_rms_eps=1e-6, **kwargs):
        args = (xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias, A,
                B, C, D)
        norms = (b_rms_weight, c_rms_weight, dt_rms_weight)
        if any(w is not None for w in norms) or not _conv_supported(conv1d_weight, None, kwargs):
            return original(*args, delta_bias=delta_bias, delta_softplus=delta_softplus, b_rms_weight=b_rms_weight,
                            c_rms_weight=c_rms_weight, dt_rms_weight=dt_rms_weight,
                            b_c_dt_rms_eps=b_c_dt_rms_eps, **kwargs)
        return mamba_inner_fn(*args, delta_bias=delta_bias, delta_softplus=delta_softplus)

    return hf_mamba_inner_fn


def split_conv1d_scan(original: Callable) -> Callable:
    """HF's training-only ``mamba2_split_conv1d_scan_combined(zxbcdt [B, L, ...], conv1d_weight [D, W],
    conv1d_bias, dt_bias [H], A [H], D, chunk_size, initial_states, dt_limit, return_final_states,
    activation, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups,
    norm_before_gate, seq_idx=)`` -> :func:`mamba_split_conv1d_scan_combined` (mamba_ssm's, as HF calls
    it when mamba_ssm is installed). ``rmsnorm_eps=None`` (falcon_h1 without the norm) is unused."""

    def hf_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                      initial_states=None, dt_limit=(0.0, math.inf), return_final_states=False,
                                      activation="silu", rmsnorm_weight=None, rmsnorm_eps=1e-6, outproj_weight=None,
                                      outproj_bias=None, headdim=None, ngroups=1, norm_before_gate=True, **kwargs):
        args = (zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states)
        options = {"dt_limit": tuple(dt_limit), "return_final_states": return_final_states,
                   "activation": activation, "rmsnorm_weight": rmsnorm_weight, "outproj_weight": outproj_weight,
                   "outproj_bias": outproj_bias, "headdim": headdim, "ngroups": ngroups,
                   "norm_before_gate": norm_before_gate}
        if not _conv_supported(conv1d_weight, activation, kwargs, segmented=True):
            return original(*args, rmsnorm_eps=rmsnorm_eps, **options, **kwargs)
        return mamba_split_conv1d_scan_combined(*args, seq_idx=kwargs.get("seq_idx"),
                                                rmsnorm_eps=1e-6 if rmsnorm_eps is None else rmsnorm_eps, **options)

    return hf_split_conv1d_scan_combined


# The module globals a Mamba-1 mixer calls -> the factory of each replacement.
MAMBA1_FUNCTIONS: dict[str, Callable[[Callable], Callable]] = {
    "mamba_selective_scan": selective_scan,
    "mamba_selective_state_update": selective_state_update_step,
    "causal_conv1d_fn": conv1d,
    "causal_conv1d_update": conv1d_update,
}

# Mamba's mixer also calls ``mamba_inner_fn`` when training. (jamba defines it but never calls it;
# falcon_mamba calls it with B/C/dt RMS norms ours lacks, so ``inner`` would always hand it back.)
MAMBA1_FUSED_FUNCTIONS: dict[str, Callable[[Callable], Callable]] = {**MAMBA1_FUNCTIONS, "mamba_inner_fn": inner}

# The module globals a Mamba-2 mixer calls: the fused one when training, the unfused ones otherwise.
MAMBA2_FUNCTIONS: dict[str, Callable[[Callable], Callable]] = {
    "mamba2_chunk_scan": chunk_scan,
    "mamba2_selective_state_update": selective_state_update_step,
    "causal_conv1d_fn": functools.partial(conv1d, segmented=True),
    "causal_conv1d_update": conv1d_update,
    "mamba2_split_conv1d_scan_combined": split_conv1d_scan,
}
