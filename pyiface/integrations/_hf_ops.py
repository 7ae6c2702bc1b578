"""HF transformers' inner-state kernel hooks, served by this package's ops.

transformers (>= 5.15) routes every kernel an inner-state mixer calls through a named hook
(``use_kernel_func_from_hub_with_fallback(name, package)`` on a module-level function, or
``use_kernel_forward_from_hub(name)`` on a layer class). Each function here serves one hook: it
takes ``hf`` (HF's own implementation of that hook, bound, for the cases our ops do not cover)
followed by exactly HF's parameters, and runs our op. :data:`HOOKS` maps each hook name to its
function; :mod:`pyiface.integrations._hub_layers` turns them into the layer classes the ``kernels``
package installs.

HF's code still runs for what the ops do not cover: conv widths outside 2..8 (2..4 in the fused training
functions), activations other
than SiLU/none, falcon_mamba's B/C/dt RMS norms inside ``mamba_inner_fn``, and packed sequences
that cannot be kept apart (Mamba-1: its scan has no packed form; a conv given ``cu_seqlens``
without ``seq_idx``), where HF raises its own "can't keep packed sequences apart" error. Every op
is differentiable, so training runs on ours too. The cache-handling hooks
(``causal_conv1d_forward``, ``mamba_scan_forward``, ``mamba2_scan_forward``) stay HF's: they only
move states in and out of HF's ``Cache`` and call the hooks below, which run ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from triton_kernels import (
    causal_conv1d_fn,
    causal_conv1d_update,
    mamba_chunk_scan_combined,
    mamba_inner_fn,
    mamba_split_conv1d_scan_combined,
    rms_norm_gated,
    selective_scan_fn,
    selective_state_update,
)

_SILU = (None, "silu", "swish")


def _conv_supported(weight: torch.Tensor, activation: object, kwargs: dict, segmented: bool,
                    max_width: int = 8) -> bool:
    """SiLU or none, width 2..``max_width`` (the conv ops take 8, the fused mixers 4), and no packed
    sequences unless ``segmented`` and given by ``seq_idx``."""
    packed = kwargs.get("seq_idx") is not None or kwargs.get("cu_seqlens") is not None
    kept_apart = segmented and kwargs.get("seq_idx") is not None
    return activation in _SILU and 2 <= weight.shape[-1] <= max_width and (not packed or kept_apart)


def hf_selective_scan(hf, hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, use_mambapy=False, use_associative_scan=False, **kwargs):
    """``selective_scan_fn``: u, dt ``[B, D, L]``, A ``[D, N]``, B, C ``[B, N, L]`` -> :func:`selective_scan_fn`.
    (``use_mambapy`` / ``use_associative_scan`` choose among HF's torch paths: not ours to honour.)"""
    return selective_scan_fn(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus=delta_softplus,
                             return_last_state=return_last_state)


def hf_selective_state_update(hf, state, hidden_states, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False,
                              z=None, **kwargs):
    """``selective_state_update`` (state in place): Mamba-1 state ``[B, D, N]``, x, dt ``[B, D]``, A ``[D, N]``,
    B, C ``[B, N]``; Mamba-2 heads state ``[B, H, P, N]``, x, dt, z ``[B, H, P]``, A ``[H, P, N]`` (a stride-0
    expand of ``[H]``: the tied-A fast path), B, C ``[B, G, N]``."""
    return selective_state_update(state, hidden_states, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                  dt_softplus=dt_softplus)


def hf_causal_conv1d_fn(hf, hidden_states, weight, bias=None, activation=None, **kwargs):
    """``causal_conv1d_fn``: x ``[B, D, L]``, weight ``[D, W]``, ``seq_idx [B, L]`` int32 (the conv restarts at
    each new id) -> :func:`causal_conv1d_fn`."""
    if not _conv_supported(weight, activation, kwargs, segmented=True):
        return hf(hidden_states, weight, bias, activation, **kwargs)
    return causal_conv1d_fn(hidden_states, weight, bias, activation, seq_idx=kwargs.get("seq_idx"))


def hf_causal_conv1d_update(hf, hidden_states, conv_state, weight, bias=None, activation=None):
    """``causal_conv1d_update`` (conv_state in place): x ``[B, D, L]``, conv_state ``[B, D, S]``, weight ``[D, W]``."""
    if not _conv_supported(weight, activation, {}, segmented=False) or conv_state.shape[-1] < weight.shape[-1] - 1:
        return hf(hidden_states, conv_state, weight, bias, activation)
    return causal_conv1d_update(hidden_states, conv_state, weight, bias, activation)


def hf_chunk_scan(hf, hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                  dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False, **kwargs):
    """``mamba_chunk_scan_combined``: x ``[B, L, H, P]``, dt ``[B, L, H]``, A ``[H]``, B, C ``[B, L, G, N]`` ->
    :func:`mamba_chunk_scan_combined` (``z``, ``seq_idx`` and ``cu_seqlens`` honoured as mamba_ssm does,
    where HF's torch path ignores ``z`` and refuses packed sequences)."""
    return mamba_chunk_scan_combined(
        hidden_states, dt, A, B, C, chunk_size, D=D, z=kwargs.get("z"), dt_bias=dt_bias,
        initial_states=initial_states, seq_idx=kwargs.get("seq_idx"), cu_seqlens=kwargs.get("cu_seqlens"),
        dt_softplus=dt_softplus, dt_limit=tuple(dt_limit), return_final_states=return_final_states)


def hf_mamba_inner_fn(hf, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                      out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, delta_softplus=True,
                      b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None, b_c_dt_rms_eps=1e-6, **kwargs):
    """Training-only ``mamba_inner_fn`` (xz ``[B, 2D, L]``, conv weight ``[D, 1, W]``, ...) -> :func:`mamba_inner_fn`,
    mamba_ssm's, as HF calls it when mamba_ssm is installed (like it, the fused path does not re-mask padding
    after the conv). With the B/C/dt RMS norm weights (falcon_mamba) HF's stand-in runs: it returns None and
    the mixer trains unfused, on our scan and conv."""
    args = (xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias, A,
            B, C, D)
    norms = (b_rms_weight, c_rms_weight, dt_rms_weight)
    if any(w is not None for w in norms) or not _conv_supported(conv1d_weight, None, kwargs, False, max_width=4):
        return hf(*args, delta_bias, delta_softplus, b_rms_weight, c_rms_weight, dt_rms_weight, b_c_dt_rms_eps,
                  **kwargs)
    return mamba_inner_fn(*args, delta_bias=delta_bias, delta_softplus=delta_softplus)


def hf_split_conv1d_scan(hf, zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None,
                         dt_limit=(0.0, math.inf), return_final_states=False, activation="silu", rmsnorm_weight=None,
                         rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None, ngroups=1,
                         norm_before_gate=True, **kwargs):
    """Training-only ``mamba_split_conv1d_scan_combined`` (zxbcdt ``[B, L, ...]``, conv weight ``[D, W]``, ...) ->
    :func:`mamba_split_conv1d_scan_combined`, mamba_ssm's, as HF calls it when mamba_ssm is installed.
    ``rmsnorm_eps=None`` (falcon_h1 without the norm) is unused."""
    args = (zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states)
    options = {"dt_limit": tuple(dt_limit), "return_final_states": return_final_states, "activation": activation,
               "rmsnorm_weight": rmsnorm_weight, "outproj_weight": outproj_weight, "outproj_bias": outproj_bias,
               "headdim": headdim, "ngroups": ngroups, "norm_before_gate": norm_before_gate}
    if not _conv_supported(conv1d_weight, activation, kwargs, segmented=True, max_width=4):
        return hf(*args, rmsnorm_eps=rmsnorm_eps, **options, **kwargs)
    return mamba_split_conv1d_scan_combined(*args, seq_idx=kwargs.get("seq_idx"),
                                            rmsnorm_eps=1e-6 if rmsnorm_eps is None else rmsnorm_eps, **options)


def hf_mamba2_gated_norm(norm, hidden_states, gate=None):
    """The forward of a Mamba-2 mixer's ``<Family>RMSNormGated`` (``norm``: HF's module, holding ``weight``,
    ``variance_epsilon`` and ``group_size`` or ``n_groups``; the gate comes before the norm unless the module
    says ``norm_before_gate``) -> :func:`rms_norm_gated`, forward and backward."""
    hidden = hidden_states.shape[-1]
    group_size = getattr(norm, "group_size", None) or hidden // getattr(norm, "n_groups", 1)
    return rms_norm_gated(hidden_states, norm.weight, gate, eps=norm.variance_epsilon, group_size=group_size,
                          norm_before_gate=getattr(norm, "norm_before_gate", False))


# Hook name (transformers' ``kernel_layer_name``) -> the function serving it.
HOOKS: dict[str, Callable] = {
    "causal_conv1d_fn": hf_causal_conv1d_fn,
    "causal_conv1d_update": hf_causal_conv1d_update,
    "selective_scan_fn": hf_selective_scan,
    "selective_state_update": hf_selective_state_update,
    "mamba_inner_fn": hf_mamba_inner_fn,
    "mamba_chunk_scan_combined": hf_chunk_scan,
    "mamba_split_conv1d_scan_combined": hf_split_conv1d_scan,
}

# The hook name this package gives a Mamba-2 mixer's gated RMSNorm class (transformers gives it none:
# ``kernels.replace_kernel_forward_from_hub`` names it when a model is patched).
MAMBA2_GATED_NORM = "ifk_Mamba2RMSNormGated"

# Hooks that stay HF's: they move states between HF's Cache and the hooks above, which run ours.
CACHE_HOOKS = ("causal_conv1d_forward", "mamba_scan_forward", "mamba2_scan_forward")
