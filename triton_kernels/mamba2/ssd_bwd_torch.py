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

from triton_kernels.mamba2.ssd_torch import MAX_STEP_ELEMENTS, TORCH_BLOCK, _initial, process_dt


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


def _per_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``[K, h, L, p]`` -> ``[K, g, hpg * L, p]`` (a group's heads stacked along the rows)."""
    K, h, L, p = t.shape
    return t.reshape(K, groups, (h // groups) * L, p)


def _by_state(M: torch.Tensor, s: torch.Tensor, groups: int) -> torch.Tensor:
    """``M [K, g, L, n] @ s[head]^T`` for per-head states ``s [K, h, p, n]``: ``[K, h, L, p]``."""
    K, h, p, n = s.shape
    L = M.shape[2]
    out = M @ s.reshape(K, groups, (h // groups) * p, n).transpose(-1, -2)  # [K, g, L, hpg * p]
    return out.view(K, groups, L, h // groups, p).transpose(2, 3).reshape(K, h, L, p)


def _chunk_inputs(x, dt, a, B, C, tok, valid, full: bool, dtype):
    """Chunk tensors: ``dt_k, S [K, h, L]``, ``x, u [K, h, L, p]``, per group ``B, C [K, g, L, n]``."""
    dt_k, a_k = dt[tok], a[tok]
    if not full:
        dt_k, a_k = dt_k * valid[..., None], a_k * valid[..., None]
    dt_k = dt_k.transpose(1, 2).contiguous()
    S = a_k.cumsum(1).transpose(1, 2).contiguous()
    xk = x[tok].to(dtype).transpose(1, 2).contiguous()
    Bk = B[tok].to(dtype).transpose(1, 2).contiguous()
    Ck = C[tok].to(dtype).transpose(1, 2).contiguous()
    return dt_k, S, xk, xk * dt_k[..., None], Bk, Ck


def _chunk_state(h, x, dt, a, B, tok, valid, full: bool, groups: int) -> torch.Tensor:
    """The state leaving one chunk of ``K`` sequences: ``exp(S_L) h + sum_s exp(S_L - S_s) u_s (x) B_s``."""
    _, S, _, u, Bk, _ = _chunk_inputs(x, dt, a, B, B, tok, valid, full, h.dtype)
    u = u * torch.exp(S[..., -1:] - S)[..., None]
    K, nheads, _, p = u.shape
    inject = _per_group(u.transpose(-1, -2).contiguous(), groups) @ Bk  # [K, g, hpg * p, n]
    return torch.exp(S[..., -1])[..., None, None] * h + inject.view(K, nheads, p, -1)


def _chunk_step_bwd(g, dh, h, dy_all, dout, x, dt, a, A, B, C, D, z, tok, valid, full, causal, groups):
    """The gradients of one chunk of ``K`` sequences. ``h``/``dh`` ``[K, h, p, n]``: the state
    entering the chunk and the gradient of the one leaving it. Writes the per-token rows of the
    buffers in ``g`` and accumulates ``g["dA"]``/``g["dD"]``; returns ``dh_prev``."""
    dtype = h.dtype
    dt_k, S, xk, u, Bk, Ck = _chunk_inputs(x, dt, a, B, C, tok, valid, full, dtype)
    K, nheads, L, p = xk.shape
    n, hpg = Bk.shape[-1], nheads // groups
    decay = torch.exp((S[..., :, None] - S[..., None, :]).masked_fill_(~causal, -math.inf))  # [K, h, t, s]
    exp_s, to_end = torch.exp(S), torch.exp(S[..., -1:] - S)
    dy = dy_all[tok]
    if not full:
        dy = dy * valid[..., None, None]
    dy = dy.transpose(1, 2).contiguous()  # [K, h, L, p]

    W = (decay.view(K, groups, hpg, L, L) * (Ck @ Bk.transpose(-1, -2))[:, :, None]).view(K, nheads, L, L)
    du_state = to_end[..., None] * _by_state(Bk, dh, groups)  # [K, h, L, p]
    du = W.transpose(-1, -2) @ dy + du_state
    G = decay * (dy @ u.transpose(-1, -2))  # [K, h, t, s]
    dC = (_per_group(G, groups) @ Bk).view(K, nheads, L, n) + exp_s[..., None] * (dy @ h)  # per head
    dB = (_per_group(G.transpose(-1, -2).contiguous(), groups) @ Ck).view(K, nheads, L, n) \
        + to_end[..., None] * (u @ dh)
    xdu = (xk * du).sum(-1)  # [K, h, L]
    dS = (dC.view(K, groups, hpg, L, n) * Ck[:, :, None]).sum(-1).view(K, nheads, L) - dt_k * xdu
    dS[..., -1] += torch.exp(S[..., -1]) * (dh * h).sum((-1, -2)) + (u * du_state).sum((-1, -2))
    da = dS.flip(-1).cumsum(-1).flip(-1)
    g["dA"] += (dt_k * da).sum((0, 2))

    dx = du * dt_k[..., None]
    if D is not None:
        Dh = D.to(dtype)[:, None] if D.dim() == 1 else D.to(dtype)
        dx = dx + Dh[:, None, :] * dy
        dxy = (dy * xk).sum(2)  # [K, h, p]
        g["dD"] += dxy.sum(0) if D.dim() == 2 else dxy.sum((0, 2))
    rows, sel = tok.flatten(), slice(None)
    if not full:
        rows, sel = tok[valid], valid
    if z is not None:
        y = W @ u + exp_s[..., None] * _by_state(Ck, h, groups)
        if D is not None:
            y = y + Dh[:, None, :] * xk
        zk = z[tok].to(dtype).transpose(1, 2)
        sig = torch.sigmoid(zk)
        dz = dout[tok].to(dtype).transpose(1, 2) * y * sig * (1 + zk * (1 - sig))
        g["dz"][rows] = dz.transpose(1, 2).flatten(0, 1) if full else dz.transpose(1, 2)[sel]

    def put(key, t):  # [K, h|g, L, ...] -> the token rows of g[key]
        t = t.transpose(1, 2)
        g[key][rows] = t.flatten(0, 1) if full else t[sel]

    put("ddt", (A * da + xdu)[..., None])
    put("dx", dx)
    put("dB", dB.view(K, groups, hpg, L, n).sum(2))
    put("dC", dC.view(K, groups, hpg, L, n).sum(2))
    dyC = _per_group((dy * exp_s[..., None]).transpose(-1, -2).contiguous(), groups) @ Ck  # [K, g, hpg * p, n]
    return torch.exp(S[..., -1])[..., None, None] * dh + dyC.view(K, nheads, p, n)


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
             ddt=torch.zeros(num_tokens, nheads, 1, dtype=dtype, device=device),
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
                full = all(lengths[order[k]] >= (j + 1) * block for k in range(k0, k1))
                steps.append((k0, k1, torch.minimum(tok, ends[k0:k1, None] - 1), valid, full))
        entering = []  # the states entering each step's chunks (the boundary states)
        for k0, k1, tok, valid, full in steps:
            entering.append(h[k0:k1].clone())
            h[k0:k1] = _chunk_state(h[k0:k1], x, dtp, a, B, tok, valid, full, groups)
        for (k0, k1, tok, valid, full), h_in in zip(reversed(steps), reversed(entering), strict=True):
            dh[k0:k1] = _chunk_step_bwd(g, dh[k0:k1], h_in, dy_all, dout, x, dtp, a, A_c, B, C, D, z, tok, valid,
                                        full, causal, groups)
    g["ddt"] = dt_chain(g["ddt"][..., 0], dt, dt_bias, dt_softplus, dt_limit)

    for out, key in ((dx, "dx"), (ddt, "ddt"), (dB, "dB"), (dC, "dC"), (dA, "dA"), (dD, "dD"), (dz, "dz")):
        if out is not None:
            out.copy_(g[key])
    if ddt_bias is not None:
        ddt_bias.copy_(g["ddt"].sum(0))
    if dinit is not None and nseq:
        rows = init_index[order_t]
        keep = rows >= 0
        dinit[rows[keep]] = dh[keep].to(dinit.dtype)
