"""Plain-torch selective scan (the ``torch`` backend and the test oracle).

One core, :func:`selective_scan_ref`, chunked along the sequence: each chunk of ``lc`` tokens is
scanned with a log-depth doubling (Hillis-Steele) over ``[B, D, lc, N]`` tensors and the state is
carried from chunk to chunk, so memory is bounded by the state plus one chunk, never
``[B, D, L, N]``. Arithmetic is fp32 (fp64 when the inputs are fp64, which is how tests make a
higher-precision reference). :func:`selective_scan_varlen_ref` loops over packed sequences and
calls the same core.
"""

from __future__ import annotations

import torch
from torch.nn.functional import silu, softplus

# Tokens per chunk: the scan holds a few [B, D, CHUNK_TOKENS, N] tensors at once. 16 was the
# fastest of 16..256 on a 2-core CPU at D=1024, N=16, L=1024 (fewer doubling passes per token).
CHUNK_TOKENS = 16


def _per_channel(M: torch.Tensor, bsz: int, dim: int, s: int, e: int) -> torch.Tensor:
    """B or C (``[D, N]``, ``[B, N, L]`` or ``[B, G, N, L]``) as ``[B|1, D|1, e - s, N]``."""
    if M.dim() == 2:
        return M[None, :, None, :]
    if M.dim() == 3:
        return M[:, None, :, s:e].transpose(-1, -2)
    return M[..., s:e].repeat_interleave(dim // M.shape[1], dim=1).transpose(-1, -2)


def selective_scan_ref(
    u: torch.Tensor,  # [B, D, L]
    delta: torch.Tensor,  # [B, D, L]
    A: torch.Tensor,  # [D, N] real
    B: torch.Tensor,  # [D, N] | [B, N, L] | [B, G, N, L]
    C: torch.Tensor,  # like B
    D: torch.Tensor | None = None,  # [D]
    z: torch.Tensor | None = None,  # [B, D, L]
    delta_bias: torch.Tensor | None = None,  # [D]
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,  # [B, D, N]
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mamba_ssm's selective scan. Returns ``(out [B, D, L] in u.dtype, last_state [B, D, N])``,
    the state in the compute dtype (fp32, or fp64 for fp64 inputs)."""
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    bsz, dim, seqlen = u.shape
    dstate = A.shape[1]
    A = A.to(cdt)
    h = u.new_zeros((bsz, dim, dstate), dtype=cdt) if initial_state is None else initial_state.to(cdt)
    out = torch.empty_like(u)
    lc = chunk_size or CHUNK_TOKENS
    for s in range(0, seqlen, lc):
        e = min(s + lc, seqlen)
        dt = delta[..., s:e].to(cdt)
        if delta_bias is not None:
            dt = dt + delta_bias.to(cdt)[:, None]
        if delta_softplus:
            dt = softplus(dt)  # threshold 20: x itself above it, like mamba_ssm
        uc = u[..., s:e].to(cdt)
        dA = torch.exp(dt[..., None] * A[:, None, :])  # [B, D, l, N]
        dBu = (dt * uc)[..., None] * _per_channel(B, bsz, dim, s, e).to(cdt)
        off = 1
        while off < e - s:  # inclusive scan of h_t = dA_t h_{t-1} + dBu_t along l
            dBu = torch.cat([dBu[:, :, :off], dBu[:, :, off:] + dA[:, :, off:] * dBu[:, :, :-off]], 2)
            dA = torch.cat([dA[:, :, :off], dA[:, :, off:] * dA[:, :, :-off]], 2)
            off *= 2
        hs = dBu + dA * h[:, :, None, :]
        y = (hs * _per_channel(C, bsz, dim, s, e).to(cdt)).sum(-1)  # [B, D, l]
        h = hs[:, :, -1]
        if D is not None:
            y = y + uc * D.to(cdt)[:, None]
        if z is not None:
            y = y * silu(z[..., s:e].to(cdt))
        out[..., s:e] = y.to(out.dtype)
    return out, h


def selective_scan_varlen_ref(
    out: torch.Tensor,  # [D, T], written (pad sequences' columns untouched)
    ssm_states: torch.Tensor,  # [slots, D, N], rows of processed sequences overwritten
    u: torch.Tensor,  # [D, T]
    delta: torch.Tensor,  # [D, T]
    A: torch.Tensor,  # [D, N]
    B: torch.Tensor,  # [G, N, T]
    C: torch.Tensor,  # [G, N, T]
    D: torch.Tensor | None,  # [D]
    z: torch.Tensor | None,  # [D, T]
    delta_bias: torch.Tensor | None,  # [D]
    delta_softplus: bool,
    query_start_loc: torch.Tensor,  # [batch + 1]
    cache_indices: torch.Tensor | None,  # [batch]; None: sequence b uses slot b
    has_initial_state: torch.Tensor | None,  # [batch] bool; None: all start from zeros
    pad_slot_id: int,
) -> torch.Tensor:
    """vLLM's packed selective scan with a state cache, one :func:`selective_scan_ref` per sequence."""
    starts = query_start_loc.tolist()
    slots = cache_indices.tolist() if cache_indices is not None else list(range(len(starts) - 1))
    init = has_initial_state.tolist() if has_initial_state is not None else [False] * len(slots)
    for b, slot in enumerate(slots):
        if slot == pad_slot_id:
            continue
        s, e = starts[b], starts[b + 1]
        y, last = selective_scan_ref(
            u[None, :, s:e], delta[None, :, s:e], A, B[None, ..., s:e], C[None, ..., s:e], D,
            None if z is None else z[None, :, s:e], delta_bias, delta_softplus,
            initial_state=ssm_states[slot][None] if init[b] else None,
        )
        out[:, s:e] = y[0]
        ssm_states[slot] = last[0]
    return out
