"""The float64 oracle of the Mamba-2 SSD core (the tests and benchmarks import this one): the
plain recurrence, one token at a time.

Same signature and contract as ``ssd_core_torch`` / ``ssd_core_triton``: writes ``out`` rows of
each sequence and its final state row; returns nothing.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional


def ssd_oracle(out, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, seq_starts, seq_starts_t,
               init_states, init_index, final_states, final_index, chunk_size) -> None:
    """:func:`ssd_oracle_fn` written into ``out`` and the ``final_index`` rows of ``final_states``, as the
    cores do (every sequence reads its init row before any final row is written: they may alias)."""
    del seq_starts_t, chunk_size
    index = None if init_states is None else [int(i) for i in init_index]
    y, finals = ssd_oracle_fn(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, seq_starts, init_states, index)
    out[seq_starts[0]:seq_starts[-1]] = y[seq_starts[0]:seq_starts[-1]].to(out.dtype)
    if final_states is not None:
        for i, h in enumerate(finals):
            if int(final_index[i]) >= 0:
                final_states[int(final_index[i])] = h.to(final_states.dtype)


def ssd_oracle_fn(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, seq_starts, init_states=None,
                  init_index=None):
    """The same recurrence as a differentiable float64 function (no in-place writes), for autograd:
    returns ``(out [T, h, p], finals [nseq, h, p, n])``; ``init_index`` a host list (-1: zeros)."""
    f64 = torch.float64
    nheads, p = x.shape[1], x.shape[2]
    groups, n = B.shape[1], B.shape[2]
    head_group = torch.arange(nheads, device=x.device) // (nheads // groups)
    dt = dt.to(f64)
    if dt_bias is not None:
        dt = dt + dt_bias.to(f64)
    if dt_softplus:
        dt = torch.where(dt <= 20.0, functional.softplus(dt), dt)
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    A = A.to(f64)
    if D is not None:
        D = D.to(f64)[:, None] if D.dim() == 1 else D.to(f64)
    outs, finals = [], []
    for i in range(len(seq_starts) - 1):
        row = -1 if init_index is None else init_index[i]
        h = init_states[row].to(f64) if row >= 0 else torch.zeros(nheads, p, n, dtype=f64, device=x.device)
        for t in range(seq_starts[i], seq_starts[i + 1]):
            xt = x[t].to(f64)
            Bt, Ct = B[t].to(f64)[head_group], C[t].to(f64)[head_group]
            h = torch.exp(dt[t] * A)[:, None, None] * h + (dt[t][:, None] * xt)[:, :, None] * Bt[:, None, :]
            y = (h * Ct[:, None, :]).sum(-1)
            if D is not None:
                y = y + D * xt
            if z is not None:
                y = y * functional.silu(z[t].to(f64))
            outs.append(y)
        finals.append(h)
    out = torch.stack(outs) if outs else x.new_zeros(x.shape, dtype=f64)
    return out, torch.stack(finals) if finals else x.new_zeros((0, nheads, p, n), dtype=f64)
