"""The torch backend of the Mamba-2 SSD core: the chunked (state-space dual) form in matmuls.

Per chunk of ``L`` tokens of one sequence and per head (fp32 arithmetic; ``a_t = dt_t A`` and
``S_t = a_1 + ... + a_t`` inside the chunk):

    y_t   = sum_{s<=t} exp(S_t - S_s) (C_t . B_s) dt_s x_s     (intra-chunk, a masked [L, L] matmul)
          + exp(S_t) C_t . h_prev                             (the carried state)
    h_new = exp(S_L) h_prev + sum_s exp(S_L - S_s) dt_s x_s (x) B_s

``C_t . B_s`` is computed once per group (not per head). The chunks of every live sequence are
walked in step: step ``j`` takes the ``j``-th chunk of each sequence that has one (sequences
sorted by chunk count, so the active ones are a prefix of the carried state), at most
:data:`MAX_STEP_ELEMENTS` ``[L, L]`` decay entries at a time. Peak memory is the ``[nseq, h, p, n]``
states plus one step's chunk tensors: never an ``[l, l]`` or per-token state tensor.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional

# The torch backend blocks the sequence at min(chunk_size, TORCH_BLOCK) tokens: the result does
# not depend on the blocking (beyond rounding), and on CPU the [L, L] intra-chunk matmuls cost
# L/p of the whole op, so a shorter block is faster (measured: bench/bench_mamba2.py).
TORCH_BLOCK = 64
# Cap on the [K, h, L, L] decay/score tensors of one step (fp32 elements, 64 MiB): bounds peak
# memory when many short sequences are active at once.
MAX_STEP_ELEMENTS = 1 << 24


def process_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
               dt_limit: tuple[float, float], dtype: torch.dtype) -> torch.Tensor:
    """mamba_ssm's order: ``dt (+ dt_bias)``, softplus (identity above 20), clamp to ``dt_limit``
    (skipped for the default ``(0, inf)``). ``dt`` ``[T, h]`` -> ``[T, h]`` in ``dtype``."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = torch.where(dt <= 20.0, functional.softplus(dt), dt)
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    return dt


def _initial(init_states, init_index, nseq, shape, order, dtype, device) -> torch.Tensor:
    """The ``[nseq, h, p, n]`` start states in ``order`` (zeros where the index is -1)."""
    if init_states is None or nseq == 0:
        return torch.zeros((nseq, *shape), dtype=dtype, device=device)
    rows = init_index[order]
    found = (rows >= 0)[:, None, None, None]
    return torch.where(found, init_states[rows.clamp(min=0)].to(dtype), 0.0)


def _chunk_step(out, h, x, dt, a, B, C, D, z, tok, valid, full: bool, causal, groups: int) -> torch.Tensor:
    """One chunk of ``K`` sequences: writes their outputs, returns the ``[K, h, p, n]`` new states.

    ``tok`` ``[K, L]`` token ids (clamped into range), ``valid`` ``[K, L]`` (all true when ``full``);
    ``h`` ``[K, h, p, n]``; ``causal`` the ``[L, L]`` lower-triangular mask.
    """
    K, L = tok.shape
    nheads, p = x.shape[1], x.shape[2]
    n, hpg = B.shape[2], nheads // groups
    dtype = h.dtype
    dt_k = dt[tok] * valid[..., None]  # [K, L, h]; padding steps are the identity
    S = (a[tok] * valid[..., None]).cumsum(1).transpose(1, 2)  # [K, h, L]
    decay = torch.exp((S[..., :, None] - S[..., None, :]).masked_fill(~causal, -math.inf))  # [K, h, L, L]
    xk = x[tok].to(dtype)  # [K, L, h, p]
    Bk = B[tok].to(dtype).transpose(1, 2)  # [K, g, L, n]
    Ck = C[tok].to(dtype).transpose(1, 2)
    xdt = (xk * dt_k[..., None]).transpose(1, 2)  # [K, h, L, p]

    scores = (Ck @ Bk.transpose(-1, -2))[:, :, None]  # [K, g, 1, L, L]
    y = (decay.view(K, groups, hpg, L, L) * scores).view(K, nheads, L, L) @ xdt  # [K, h, L, p]
    h_g = h.view(K, groups, hpg * p, n)
    y_off = (Ck @ h_g.transpose(-1, -2)).view(K, groups, L, hpg, p).permute(0, 1, 3, 2, 4)
    y = y + y_off.reshape(K, nheads, L, p) * torch.exp(S)[..., None]

    to_end = torch.exp(S[..., -1:] - S)  # [K, h, L]
    inject = ((xdt * to_end[..., None]).transpose(-1, -2).reshape(K, groups, hpg * p, L) @ Bk)
    h_new = torch.exp(S[..., -1])[..., None, None] * h + inject.view(K, nheads, p, n)

    y = y.transpose(1, 2)  # [K, L, h, p]
    if D is not None:
        y = y + (D.to(dtype)[:, None] if D.dim() == 1 else D.to(dtype)) * xk
    if z is not None:
        y = y * functional.silu(z[tok].to(dtype))
    if full:
        out.index_copy_(0, tok.flatten(), y.flatten(0, 1).to(out.dtype))
    else:
        out[tok[valid]] = y[valid].to(out.dtype)
    return h_new


def ssd_core_torch(out, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, seq_starts, seq_starts_t,
                   init_states, init_index, final_states, final_index, chunk_size) -> None:
    """The packed SSD core (contract: ``triton_kernels/mamba2/ssd.py``), in torch.

    out ``[T, h, p]`` written; x ``[T, h, p]``; dt ``[T, h]``; A ``[h]``; B, C ``[T, g, n]``;
    D ``[h]``/``[h, p]``/None; z ``[T, h, p]``/None; dt_bias ``[h]``/None; ``seq_starts`` host
    offsets ``[nseq + 1]`` (``seq_starts_t`` unused here); init_states/final_states
    ``[S, h, p, n]``/None with ``[nseq]`` int64 row indices (-1: zeros / not written; they may be
    the same tensor). Arithmetic in fp32 (fp64 for fp64 inputs).
    """
    del seq_starts_t
    nseq = len(seq_starts) - 1
    nheads, p = x.shape[1], x.shape[2]
    groups, n = B.shape[1], B.shape[2]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # fp64: the gradient checks
    device = x.device
    block = min(chunk_size, TORCH_BLOCK)
    lengths = [seq_starts[i + 1] - seq_starts[i] for i in range(nseq)]
    nchunks = [-(-length // block) for length in lengths]
    order = sorted(range(nseq), key=lambda i: -nchunks[i])
    order_t = torch.tensor(order, dtype=torch.long, device=device)
    h = _initial(init_states, init_index, nseq, (nheads, p, n), order_t, dtype, device)

    if nseq and max(nchunks) > 0:
        dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
        a = dtp * A.to(dtype)
        starts = torch.tensor([seq_starts[i] for i in order], device=device)
        ends = torch.tensor([seq_starts[i + 1] for i in order], device=device)
        offs = torch.arange(block, device=device)
        causal = torch.ones(block, block, dtype=torch.bool, device=device).tril()
        per_step = max(1, MAX_STEP_ELEMENTS // (nheads * block * block))
        for j in range(max(nchunks)):
            active = sum(c > j for c in nchunks)
            for k0 in range(0, active, per_step):
                k1 = min(active, k0 + per_step)
                tok = starts[k0:k1, None] + j * block + offs
                valid = tok < ends[k0:k1, None]
                tok = torch.minimum(tok, ends[k0:k1, None] - 1)
                full = all(lengths[order[k]] >= (j + 1) * block for k in range(k0, k1))
                h[k0:k1] = _chunk_step(out, h[k0:k1], x, dtp, a, B, C, D, z, tok, valid, full, causal, groups)

    if final_states is not None and nseq:
        rows = final_index[order_t]
        keep = rows >= 0
        final_states[rows[keep]] = h[keep].to(final_states.dtype)
