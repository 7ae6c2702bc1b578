"""The torch backend of the Mamba-2 SSD backward core: the chunked form's gradients in matmuls.

Per chunk of ``L`` tokens of one sequence and per head (``u_s = dt_s x_s``, ``S`` the chunk-local
cumsum of ``a = dt A``, ``M_ts = exp(S_t - S_s)`` for ``s <= t``; ``dy`` the gradient of the
pre-gate ``y``, ``dh`` the gradient of the state leaving the chunk, ``h`` the state entering it)::

    du_s    = sum_{t>=s} M_ts (C_t . B_s) dy_t + exp(S_L - S_s) dh B_s
    dC_t    = sum_{s<=t} M_ts (dy_t . u_s) B_s + exp(S_t) dy_t h          (summed over a group's heads)
    dB_s    = sum_{t>=s} M_ts (dy_t . u_s) C_t + exp(S_L - S_s) u_s dh    (summed over a group's heads)
    dS_t    = dy_t . y_ssm_t - u_t . du_t  (+ <dh, h_exit> at the chunk's last position)
    dh_prev = exp(S_L) dh + sum_t exp(S_t) dy_t (x) C_t

``dy_t . y_ssm_t = C_t . dC_t`` per head (every term of ``y_t`` carries ``exp(S_t)``), and
``d a_t = sum_{t'>=t} dS_t'`` within the chunk. The states entering each chunk are recomputed
(a forward pass over the states only, no outputs), chunk-boundary states kept: memory is the
``[chunks, h, p, n]`` boundary states plus one step's chunk tensors (the forward's layout: the
``j``-th chunk of every live sequence per step, sequences sorted by chunk count).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional

from triton_kernels.mamba2.ssd_reference import MAX_STEP_ELEMENTS, TORCH_BLOCK, _initial, process_dt


def dt_chain(ddt: torch.Tensor, dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
             dt_limit: tuple[float, float]) -> torch.Tensor:
    """The gradient w.r.t. the raw ``dt`` ``[T, h]`` from the one w.r.t. the processed ``dt``:
    through the clamp (zero where clamped, as ``torch.clamp``) and the softplus (one above 20)."""
    v = dt.to(ddt.dtype)
    if dt_bias is not None:
        v = v + dt_bias.to(ddt.dtype)
    if dt_softplus:
        ddt = ddt * torch.where(v <= 20.0, torch.sigmoid(v), 1.0)
        v = torch.where(v <= 20.0, functional.softplus(v), v)
    if tuple(dt_limit) != (0.0, math.inf):
        ddt = ddt * ((v >= dt_limit[0]) & (v <= dt_limit[1]))
    return ddt


def _heads(t: torch.Tensor, hpg: int) -> torch.Tensor:
    """``[K, g, L, n]`` -> ``[K, h, L, n]`` (head i reads group i // hpg)."""
    return t.repeat_interleave(hpg, dim=1)


def _groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``[K, h, L, n]`` -> ``[K, g, L, n]``: summed over each group's heads (in head order)."""
    K, h, L, n = t.shape
    return t.view(K, groups, h // groups, L, n).sum(2)


def _chunk_inputs(x, dt, a, B, C, tok, valid, hpg, dtype):
    """Per-head chunk tensors: ``dt_k [K, h, L]``, ``S [K, h, L]``, ``x, u [K, h, L, p]``,
    ``B, C [K, h, L, n]``."""
    dt_k = (dt[tok] * valid[..., None]).transpose(1, 2)
    S = (a[tok] * valid[..., None]).cumsum(1).transpose(1, 2)
    xk = x[tok].to(dtype).transpose(1, 2)
    Bk = _heads(B[tok].to(dtype).transpose(1, 2), hpg)
    Ck = _heads(C[tok].to(dtype).transpose(1, 2), hpg)
    return dt_k, S, xk, xk * dt_k[..., None], Bk, Ck


def _chunk_state(h, x, dt, a, B, tok, valid, hpg) -> torch.Tensor:
    """The state leaving one chunk of ``K`` sequences: ``exp(S_L) h + sum_s exp(S_L - S_s) u_s (x) B_s``."""
    dt_k = (dt[tok] * valid[..., None]).transpose(1, 2)
    S = (a[tok] * valid[..., None]).cumsum(1).transpose(1, 2)
    u = x[tok].to(h.dtype).transpose(1, 2) * (dt_k * torch.exp(S[..., -1:] - S))[..., None]
    return torch.exp(S[..., -1])[..., None, None] * h + u.transpose(-1, -2) @ _heads(
        B[tok].to(h.dtype).transpose(1, 2), hpg)


def _chunk_step_bwd(g, dh, h, dy_all, dout, x, dt, a, A, B, C, D, z, tok, valid, causal, groups):
    """The gradients of one chunk of ``K`` sequences. ``h``/``dh`` ``[K, h, p, n]``: the state
    entering the chunk and the gradient of the one leaving it. Writes the per-token rows of the
    fp32 buffers in ``g`` and accumulates ``g["dA"]``/``g["dD"]``; returns ``dh_prev``."""
    nheads = x.shape[1]
    hpg, dtype = nheads // groups, h.dtype
    dt_k, S, xk, u, Bk, Ck = _chunk_inputs(x, dt, a, B, C, tok, valid, hpg, dtype)
    rows = tok[valid]
    decay = torch.exp((S[..., :, None] - S[..., None, :]).masked_fill(~causal, -math.inf))  # [K, h, t, s]
    exp_s, to_end = torch.exp(S), torch.exp(S[..., -1:] - S)

    dy = dy_all[tok].transpose(1, 2) * valid[:, None, :, None]  # [K, h, L, p]
    W = decay * (Ck @ Bk.transpose(-1, -2))  # [K, h, t, s]
    du_state = to_end[..., None] * (Bk @ dh.transpose(-1, -2))  # [K, h, L, p]
    du = W.transpose(-1, -2) @ dy + du_state
    G = decay * (dy @ u.transpose(-1, -2))  # [K, h, t, s]
    dC = G @ Bk + exp_s[..., None] * (dy @ h)  # per head [K, h, L, n]
    dB = G.transpose(-1, -2) @ Ck + to_end[..., None] * (u @ dh)
    xdu = (xk * du).sum(-1)  # [K, h, L]
    dS = (Ck * dC).sum(-1) - dt_k * xdu
    dS[..., -1] += torch.exp(S[..., -1]) * (dh * h).sum((-1, -2)) + (u * du_state).sum((-1, -2))
    da = dS.flip(-1).cumsum(-1).flip(-1)
    g["dA"] += (dt_k * da).sum((0, 2))
    g["ddt"][rows] = (A * da + xdu).transpose(1, 2)[valid]

    dx = du * dt_k[..., None]
    if D is not None:
        Dh = D.to(dtype)[:, None] if D.dim() == 1 else D.to(dtype)
        dx = dx + Dh[:, None, :] * dy
        dxy = (dy * xk).sum(2)  # [K, h, p]
        g["dD"] += dxy.sum(0) if D.dim() == 2 else dxy.sum((0, 2))
    if z is not None:
        y = W @ u + exp_s[..., None] * (Ck @ h.transpose(-1, -2))
        if D is not None:
            y = y + Dh[:, None, :] * xk
        zk = z[tok].to(dtype).transpose(1, 2)
        sig = torch.sigmoid(zk)
        dz = dout[tok].to(dtype).transpose(1, 2) * y * sig * (1 + zk * (1 - sig))
        g["dz"][rows] = dz.transpose(1, 2)[valid]
    g["dx"][rows] = dx.transpose(1, 2)[valid]
    g["dB"][rows] = _groups(dB, groups).transpose(1, 2)[valid]
    g["dC"][rows] = _groups(dC, groups).transpose(1, 2)[valid]
    return torch.exp(S[..., -1])[..., None, None] * dh + (dy * exp_s[..., None]).transpose(-1, -2) @ Ck


def ssd_core_bwd_torch(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit, dout, dfinal, x, dt, A, B, C, D, z, dt_bias,
                       dt_softplus, dt_limit, seq_starts, seq_starts_t, init_states, init_index, final_index,
                       chunk_size) -> None:
    """The packed SSD backward core, in torch (contract: ``triton_kernels/mamba2/ssd.py``).

    Written: dx ``[T, h, p]``, ddt ``[T, h]``, dB, dC ``[T, g, n]`` (rows of every sequence), dA
    ``[h]``, dD (like D) / None, dz ``[T, h, p]`` / None, ddt_bias ``[h]`` / None, and dinit
    ``[S_in, h, p, n]`` rows ``init_index[s] >= 0`` (distinct) / None. Read: dout ``[T, h, p]``,
    dfinal ``[S_out, h, p, n]`` rows ``final_index[s] >= 0`` (None or -1: no gradient), and the
    forward's inputs. Arithmetic in fp32 (fp64 for fp64 inputs).
    """
    del seq_starts_t
    nseq = len(seq_starts) - 1
    num_tokens, nheads, p = x.shape
    groups, n = B.shape[1], B.shape[2]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    device = x.device
    block = min(chunk_size, TORCH_BLOCK)
    lengths = [seq_starts[i + 1] - seq_starts[i] for i in range(nseq)]
    nchunks = [-(-length // block) for length in lengths]
    order = sorted(range(nseq), key=lambda i: -nchunks[i])
    order_t = torch.tensor(order, dtype=torch.long, device=device)
    h = _initial(init_states, init_index, nseq, (nheads, p, n), order_t, dtype, device)
    dh = _initial(dfinal, final_index, nseq, (nheads, p, n), order_t, dtype, device)
    g = dict(dx=torch.zeros(num_tokens, nheads, p, dtype=dtype, device=device),
             ddt=torch.zeros(num_tokens, nheads, dtype=dtype, device=device),
             dB=torch.zeros(num_tokens, groups, n, dtype=dtype, device=device),
             dC=torch.zeros(num_tokens, groups, n, dtype=dtype, device=device),
             dA=torch.zeros(nheads, dtype=dtype, device=device),
             dD=None if D is None else torch.zeros(D.shape, dtype=dtype, device=device),
             dz=None if z is None else torch.zeros(num_tokens, nheads, p, dtype=dtype, device=device))

    if nseq and max(nchunks) > 0:
        dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit, dtype)
        a, A_c = dtp * A.to(dtype), A.to(dtype)[:, None]
        dy_all = dout.to(dtype) if z is None else dout.to(dtype) * functional.silu(z.to(dtype))
        starts = torch.tensor([seq_starts[i] for i in order], device=device)
        ends = torch.tensor([seq_starts[i + 1] for i in order], device=device)
        offs = torch.arange(block, device=device)
        causal = torch.ones(block, block, dtype=torch.bool, device=device).tril()
        per_step = max(1, MAX_STEP_ELEMENTS // (nheads * block * block))
        steps = []  # (k0, k1, tok, valid) in forward order
        for j in range(max(nchunks)):
            active = sum(c > j for c in nchunks)
            for k0 in range(0, active, per_step):
                k1 = min(active, k0 + per_step)
                tok = starts[k0:k1, None] + j * block + offs
                valid = tok < ends[k0:k1, None]
                steps.append((k0, k1, torch.minimum(tok, ends[k0:k1, None] - 1), valid))
        entering = []  # the states entering each step's chunks (the boundary states)
        for k0, k1, tok, valid in steps:
            entering.append(h[k0:k1].clone())
            h[k0:k1] = _chunk_state(h[k0:k1], x, dtp, a, B, tok, valid, nheads // groups)
        for (k0, k1, tok, valid), h_in in zip(reversed(steps), reversed(entering), strict=True):
            dh[k0:k1] = _chunk_step_bwd(g, dh[k0:k1], h_in, dy_all, dout, x, dtp, a, A_c, B, C, D, z, tok, valid,
                                        causal, groups)
        g["ddt"] = dt_chain(g["ddt"], dt, dt_bias, dt_softplus, dt_limit)

    for out, key in ((dx, "dx"), (ddt, "ddt"), (dB, "dB"), (dC, "dC"), (dA, "dA"), (dD, "dD"), (dz, "dz")):
        if out is not None:
            out.copy_(g[key])
    if ddt_bias is not None:
        ddt_bias.copy_(g["ddt"].sum(0))
    if dinit is not None and nseq:
        rows = init_index[order_t]
        keep = rows >= 0
        dinit[rows[keep]] = dh[keep].to(dinit.dtype)
