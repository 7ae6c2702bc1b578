"""Plain-torch references of the Mamba-1 ops: the ``torch`` backend of each (see the registry).

- :func:`selective_scan_ref` / :func:`selective_scan_varlen_ref`: the selective scan, chunked along
  the sequence: each chunk of ``lc`` tokens is scanned with a log-depth doubling (Hillis-Steele)
  over ``[B, D, lc, N]`` tensors and the state is carried from chunk to chunk, so memory is bounded
  by the state plus one chunk, never ``[B, D, L, N]``. Arithmetic is fp32 (fp64 for fp64 inputs).
- :func:`selective_state_update_ref`: the decode step, heads form, states gathered by slot.
- :func:`causal_conv1d_fn_ref` (+ :func:`causal_conv1d_bwd_ref`, its closed-form gradients),
  :func:`causal_conv1d_varlen_ref`, :func:`causal_conv1d_update_ref`: the depthwise causal conv.

They take the validated arguments the public ops produce (shapes checked, ``silu`` a bool, heads
form for the state update). Rows whose slot is the pad slot (or, as in the kernels, outside the
cache: possible only when the value checks were skipped) get a zero output and leave every state
row untouched. The tests' float64 oracle (``triton_kernels/mamba/naive.py``) is a separate,
sequential definition, so these are checked against it like every other backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (the universal alias)

# Tokens per chunk: the scan holds a few [B, D, CHUNK_TOKENS, N] tensors at once. 16 was the
# fastest of 16..256 on a 2-core CPU at D=1024, N=16, L=1024 (fewer doubling passes per token).
CHUNK_TOKENS = 16


def per_channel(M: torch.Tensor, bsz: int, dim: int, s: int, e: int) -> torch.Tensor:
    """B or C (``[D, N]``, ``[B, N, L]`` or ``[B, G, N, L]``) as ``[B|1, D|1, e - s, N]``."""
    if M.dim() == 2:
        return M[None, :, None, :]
    if M.dim() == 3:
        return M[:, None, :, s:e].transpose(-1, -2)
    return M[..., s:e].repeat_interleave(dim // M.shape[1], dim=1).transpose(-1, -2)


def scan_chunk(dA: torch.Tensor, dBu: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The states ``h_t = dA_t h_{t-1} + dBu_t`` of one chunk from ``h_{-1} = h``: ``dA``, ``dBu``
    ``[B, D, l, N]``, ``h`` ``[B, D, N]`` -> ``[B, D, l, N]``, by a log-depth doubling (Hillis-Steele)
    along l (new tensors: the arguments are not modified). The backward pass runs it on the flipped
    adjoint too."""
    off, length = 1, dA.shape[2]
    while off < length:
        dBu = torch.cat([dBu[:, :, :off], dBu[:, :, off:] + dA[:, :, off:] * dBu[:, :, :-off]], 2)
        dA = torch.cat([dA[:, :, :off], dA[:, :, off:] * dA[:, :, :-off]], 2)
        off *= 2
    return dBu + dA * h[:, :, None, :]


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
    chunk_states: torch.Tensor | None = None,  # [B, n_chunks + 1, D, N], written when given
) -> tuple[torch.Tensor, torch.Tensor]:
    """mamba_ssm's selective scan. Returns ``(out [B, D, L] in u.dtype, last_state [B, D, N])``,
    the state in the compute dtype (fp32, or fp64 for fp64 inputs). ``chunk_states`` receives the
    state entering each chunk of ``chunk_size`` tokens, then the last state (the Triton backward's
    tile states, when the forward ran here)."""
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    bsz, dim, seqlen = u.shape
    dstate = A.shape[1]
    A = A.to(cdt)
    h = u.new_zeros((bsz, dim, dstate), dtype=cdt) if initial_state is None else initial_state.to(cdt)
    out = torch.empty_like(u)
    lc = chunk_size or CHUNK_TOKENS
    for s in range(0, seqlen, lc):
        if chunk_states is not None:
            chunk_states[:, s // lc] = h
        e = min(s + lc, seqlen)
        dt = delta[..., s:e].to(cdt)
        if delta_bias is not None:
            dt = dt + delta_bias.to(cdt)[:, None]
        if delta_softplus:
            dt = F.softplus(dt)  # threshold 20: x itself above it, like mamba_ssm
        uc = u[..., s:e].to(cdt)
        dA = torch.exp(dt[..., None] * A[:, None, :])  # [B, D, l, N]
        dBu = (dt * uc)[..., None] * per_channel(B, bsz, dim, s, e).to(cdt)
        hs = scan_chunk(dA, dBu, h)
        y = (hs * per_channel(C, bsz, dim, s, e).to(cdt)).sum(-1)  # [B, D, l]
        h = hs[:, :, -1]
        if D is not None:
            y = y + uc * D.to(cdt)[:, None]
        if z is not None:
            y = y * F.silu(z[..., s:e].to(cdt))
        out[..., s:e] = y.to(out.dtype)
    if chunk_states is not None:
        chunk_states[:, -1] = h
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
        if slot == pad_slot_id or not 0 <= slot < ssm_states.shape[0]:
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


# ---- decode state update and causal conv1d ------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The arithmetic dtype of the conv references: fp32, fp64 for fp64 inputs (gradient checks)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _conv(xcat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """Depthwise valid conv of fp32/fp64 ``xcat [B, D, W-1+L]`` with ``weight [D, W]`` -> ``[B, D, L]``
    in xcat's dtype."""
    out = F.conv1d(xcat, weight.to(xcat.dtype).unsqueeze(1), None if bias is None else bias.to(xcat.dtype),
                   groups=weight.shape[0])
    return F.silu(out) if silu else out


def _slot_rows(slots: torch.Tensor, pad_slot_id: int, num_slots: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(valid [B] bool, idx [B] int64)``: the rows whose slot is a cache row (``None``: all of them),
    and the slots clamped into the cache for gathering. A slot outside the cache (possible only when
    the value checks were skipped under CUDA-graph capture) counts as the pad slot, as in the kernels.
    On CPU the values are read on the host (free), so a batch without pad rows does no mask work."""
    if slots.device.type == "cpu" and all(s != pad_slot_id and 0 <= s < num_slots for s in slots.tolist()):
        return None, slots.long()
    valid = (slots != pad_slot_id) & (slots >= 0) & (slots < num_slots)
    return valid, slots.long().clamp(0, max(num_slots - 1, 0))


def _store_rows(out: torch.Tensor, res: torch.Tensor, cache: torch.Tensor, idx: torch.Tensor,
                valid: torch.Tensor | None, rows: torch.Tensor) -> None:
    """``out = res`` (zero on invalid rows) and ``cache[idx[b]] = rows[b]`` for the valid rows."""
    if valid is None:
        out.copy_(res)
        cache.index_copy_(0, idx, rows.to(cache.dtype))
        return
    out.copy_(torch.where(valid.view(-1, *[1] * (res.dim() - 1)), res, 0.0))
    keep = valid.nonzero().squeeze(1)
    if keep.numel() != valid.numel():
        idx, rows = idx.index_select(0, keep), rows.index_select(0, keep)
    cache.index_copy_(0, idx, rows.to(cache.dtype))


def _same_sequence(seq_idx: torch.Tensor, shift: int) -> torch.Tensor:
    """``[B, 1, L]`` bool: position ``t - shift`` exists and has ``t``'s ``seq_idx``."""
    length = seq_idx.shape[-1]
    same = torch.zeros_like(seq_idx, dtype=torch.bool)
    same[:, shift:] = seq_idx[:, shift:] == seq_idx[:, : max(length - shift, 0)]
    return same[:, None, :]


def _conv_seq_idx(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  seq_idx: torch.Tensor) -> torch.Tensor:
    """The pre-activation conv of fp32/fp64 ``x [B, D, L]`` when taps across a change of ``seq_idx``
    read zero: W shifted multiply-adds; 0 at padding positions (``seq_idx < 0``, causal-conv1d's)."""
    width, length = weight.shape[1], x.shape[-1]
    res = torch.zeros_like(x) if bias is None else bias.to(x.dtype)[:, None].expand_as(x).clone()
    for k in range(width):
        shift = width - 1 - k
        shifted = F.pad(x, (shift, 0))[..., :length]
        res += weight.to(x.dtype)[:, k, None] * shifted * _same_sequence(seq_idx, shift)
    return res * (seq_idx >= 0)[:, None, :]


def causal_conv1d_fn_ref(
    x: torch.Tensor,  # [B, D, L]
    weight: torch.Tensor,  # [D, W]
    bias: torch.Tensor | None,  # [D]
    silu: bool,
    initial_states: torch.Tensor | None = None,  # [B, D, W-1]
    out: torch.Tensor | None = None,  # [B, D, L], written when given (not differentiable then)
    seq_idx: torch.Tensor | None = None,  # [B, L] int, without initial_states
) -> tuple[torch.Tensor, torch.Tensor]:
    """causal-conv1d's ``causal_conv1d_fn``: returns ``out [B, D, L]`` (x's dtype) and the final
    states ``[B, D, W-1]`` (fp32, fp64 for fp64 x: the last W-1 inputs, initial states included when L < W-1).
    Differentiable in every tensor argument when ``out`` is not given. With ``seq_idx``, a tap at
    a position of another sequence than the output position reads zero, and a position with
    ``seq_idx < 0`` (padding) outputs zero.

    Without initial states the conv pads inside ``F.conv1d`` (its last W-1 columns are dropped)
    instead of materialising a padded copy of x; with ``out`` the activation writes into it."""
    width, length = weight.shape[1], x.shape[-1]
    xc = x.to(_compute_dtype(x))  # the arithmetic dtype
    if seq_idx is not None and length:
        res = _conv_seq_idx(xc, weight, bias, seq_idx)
        tail = xc[..., max(length - (width - 1), 0):]
        final = F.pad(tail, (width - 1 - tail.shape[-1], 0))
    elif length == 0:  # F.conv1d refuses an empty sequence: no output, the state passes through
        res = xc
        final = (xc.new_zeros((*x.shape[:2], width - 1)) if initial_states is None
                 else initial_states.to(xc.dtype, copy=True))
    elif initial_states is None:
        res = F.conv1d(xc, weight.to(xc.dtype).unsqueeze(1), None if bias is None else bias.to(xc.dtype),
                       padding=width - 1, groups=weight.shape[0])[..., :length]
        tail = xc[..., max(length - (width - 1), 0):]
        final = F.pad(tail, (width - 1 - tail.shape[-1], 0)) if tail.shape[-1] < width - 1 else tail
    else:
        xcat = torch.cat([initial_states.to(xc.dtype), xc], dim=-1)
        res = _conv(xcat, weight, bias, False)
        final = xcat[..., xcat.shape[-1] - (width - 1):]
    if out is None:
        return (F.silu(res) if silu else res).to(x.dtype), final
    if silu and out.dtype == res.dtype:
        torch.ops.aten.silu.out(res, out=out)
    else:
        out.copy_(F.silu(res) if silu else res)
    return out, final


def causal_conv1d_bwd_ref(
    x: torch.Tensor,  # [B, D, L]
    weight: torch.Tensor,  # [D, W]
    bias: torch.Tensor | None,
    silu: bool,
    initial_states: torch.Tensor | None,  # [B, D, W-1]
    d_out: torch.Tensor,  # [B, D, L]
    d_final: torch.Tensor | None,  # [B, D, W-1]
    seq_idx: torch.Tensor | None = None,  # [B, L] int, without initial states
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`causal_conv1d_fn_ref` in closed form (fp32, fp64 for fp64 x; recomputing the conv):
    ``(d_x, d_weight, d_bias, d_initial_states)``, ``None`` for an absent bias / initial state."""
    width, length = weight.shape[1], x.shape[-1]
    cdt = _compute_dtype(x)
    if seq_idx is not None and length:
        return _conv_seq_idx_bwd(x.to(cdt), weight, bias, silu, d_out.to(cdt), d_final, seq_idx)
    if initial_states is None:
        xcat = F.pad(x.to(cdt), (width - 1, 0))
    else:
        xcat = torch.cat([initial_states.to(cdt), x.to(cdt)], dim=-1)
    g = d_out.to(cdt)
    if silu and length:
        pre = _conv(xcat, weight, bias, False)
        sig = torch.sigmoid(pre)
        g = g * sig * (1 + pre * (1 - sig))
    if length:
        d_xcat = F.conv_transpose1d(g, weight.to(cdt).unsqueeze(1), groups=weight.shape[0])  # [B, D, W-1+L]
    else:  # F.conv_transpose1d refuses an empty sequence
        d_xcat = torch.zeros_like(xcat)
    if d_final is not None:
        d_xcat[..., length:] += d_final.to(cdt)
    d_weight = torch.stack([(g * xcat[..., k : k + length]).sum((0, 2)) for k in range(width)], dim=1)
    d_bias = None if bias is None else g.sum((0, 2))
    d_init = None if initial_states is None else d_xcat[..., : width - 1]
    return d_xcat[..., width - 1 :], d_weight, d_bias, d_init


def _conv_seq_idx_bwd(x, weight, bias, silu, g, d_final, seq_idx):
    """:func:`causal_conv1d_bwd_ref` with ``seq_idx`` (no initial states): tap k's gradient flows
    back ``W-1-k`` positions where both ends lie in one sequence; none from a padding output."""
    width, length = weight.shape[1], x.shape[-1]
    g = g * (seq_idx >= 0)[:, None, :]  # a padding position's output is a constant 0
    if silu:
        pre = _conv_seq_idx(x, weight, bias, seq_idx)
        sig = torch.sigmoid(pre)
        g = g * sig * (1 + pre * (1 - sig))
    d_x = torch.zeros_like(x)
    d_weight = torch.empty_like(weight, dtype=x.dtype)
    for k in range(width):
        shift = width - 1 - k
        g_k = g * _same_sequence(seq_idx, shift)  # [B, D, L]: output t reads x[t - shift]
        d_x += weight.to(x.dtype)[:, k, None] * F.pad(g_k, (0, shift))[..., shift:]
        d_weight[:, k] = (g_k * F.pad(x, (shift, 0))[..., :length]).sum((0, 2))
    if d_final is not None:  # the last W-1 inputs (zeros before the row start)
        tail = min(width - 1, length)
        d_x[..., length - tail:] += d_final.to(x.dtype)[..., width - 1 - tail:]
    return d_x, d_weight, None if bias is None else g.sum((0, 2)), None


def causal_conv1d_update_ref(
    x: torch.Tensor,  # [B, D, L]
    conv_state: torch.Tensor,  # [slots, D, S], S >= W-1, updated in place
    weight: torch.Tensor,  # [D, W]
    bias: torch.Tensor | None,
    silu: bool,
    slots: torch.Tensor,  # [B] int, the slot of each row
    pad_slot_id: int,
    out: torch.Tensor,  # [B, D, L], written
    cache_seqlens: torch.Tensor | None = None,  # [B] int: the state is a circular buffer
) -> None:
    """vLLM's ``causal_conv1d_update``: the state is the window of the last S inputs; the conv reads
    its last W-1 columns before the new tokens; afterwards it holds ``[state, x][..., -S:]``. With
    ``cache_seqlens`` (causal-conv1d's circular buffer) the conv reads the W-1 columns before
    ``head = cache_seqlens mod S`` cyclically and ``x[..., t]`` goes to column ``(head + t) mod S``
    (the last S tokens when L > S)."""
    width, state_len, length = weight.shape[1], conv_state.shape[-1], x.shape[-1]
    if conv_state.shape[0] == 0:  # an empty cache: every row is a pad row
        out.zero_()
        return
    valid, idx = _slot_rows(slots, pad_slot_id, conv_state.shape[0])
    state = conv_state.index_select(0, idx).float()  # [B, D, S]
    if cache_seqlens is None:
        xcat = torch.cat([state, x.float()], dim=-1)  # [B, D, S+L]
        window, new_state = xcat[..., state_len - (width - 1):], xcat[..., xcat.shape[-1] - state_len:]
    else:
        head = cache_seqlens.long().remainder(state_len)[:, None]  # [B, 1]

        def columns(positions: torch.Tensor) -> torch.Tensor:  # [B, D, n] state columns of positions [n]
            return (head + positions).remainder(state_len)[:, None, :].expand(-1, state.shape[1], -1)

        window = torch.cat([state.gather(2, columns(torch.arange(1 - width, 0, device=x.device))), x.float()], -1)
        kept = torch.arange(max(length - state_len, 0), length, device=x.device)  # distinct columns
        new_state = state.scatter(2, columns(kept), x.float().index_select(2, kept))
    # a few new tokens: W multiply-adds over an unfolded [B, D, L, W] view beat a grouped F.conv1d
    res = (window.unfold(-1, width, 1) * weight.float()[:, None, :]).sum(-1)
    if bias is not None:
        res += bias.float()[:, None]
    if silu:
        res = F.silu(res)
    _store_rows(out, res, conv_state, idx, valid, new_state)


def causal_conv1d_varlen_ref(
    x: torch.Tensor,  # [D, T]
    weight: torch.Tensor,  # [D, W]
    bias: torch.Tensor | None,
    conv_states: torch.Tensor,  # [slots, D, S], updated in place
    query_start_loc: torch.Tensor,  # [batch + 1]
    slots: torch.Tensor,  # [batch]
    has_initial_state: torch.Tensor,  # [batch] bool
    silu: bool,
    pad_slot_id: int,
    out: torch.Tensor,  # [D, T], written
) -> None:
    """vLLM's varlen ``causal_conv1d_fn`` (one host sync to read the sequence bounds; one conv per
    sequence): a sequence starts from its slot's state where ``has_initial_state``, else from zeros,
    and leaves the last S inputs of ``[state, x_seq]`` in its slot."""
    state_len = conv_states.shape[-1]
    bounds = query_start_loc.tolist()
    for i, (slot, init) in enumerate(zip(slots.tolist(), has_initial_state.tolist())):
        start, end = bounds[i], bounds[i + 1]
        if slot == pad_slot_id or not 0 <= slot < conv_states.shape[0]:
            out[:, start:end] = 0
            continue
        prev = conv_states[slot].float()
        if not init:
            prev = torch.zeros_like(prev)
        xcat = torch.cat([prev, x[:, start:end].float()], dim=-1).unsqueeze(0)
        if end > start:
            res = _conv(xcat[..., state_len - (weight.shape[1] - 1):], weight, bias, silu)
            out[:, start:end] = res[0].to(out.dtype)
        conv_states[slot] = xcat[0, :, xcat.shape[-1] - state_len:].to(conv_states.dtype)


def selective_state_update_ref(
    state: torch.Tensor,  # [slots, H, P, N], updated in place
    x: torch.Tensor,  # [B, H, P]
    dt: torch.Tensor,  # [B, H, P]
    A: torch.Tensor,  # [H, P, N]
    B: torch.Tensor,  # [B, G, N]
    C: torch.Tensor,  # [B, G, N]
    D: torch.Tensor | None,  # [H, P]
    z: torch.Tensor | None,  # [B, H, P]
    dt_bias: torch.Tensor | None,  # [H, P]
    dt_softplus: bool,
    slots: torch.Tensor | None,  # [B] int, or None: row b uses slot b (then slots == B)
    pad_slot_id: int,
    out: torch.Tensor,  # [B, H, P], written
) -> None:
    """mamba_ssm's ``selective_state_update`` in the heads form, gathering states by slot:
    ``state = state * exp(dt A) + dt B x``; ``out = (state @ C + D x) * silu(z)``.
    One ``[B, H, P, N]`` temporary, updated in place (the decode step is bound by its size); an fp32
    state that is a view of the cache (no slots, or one CPU row) is updated in place instead."""
    if state.shape[0] == 0:  # an empty cache: every row is a pad row (the op checked the slots)
        out.zero_()
        return
    rep = x.shape[1] // B.shape[1]
    dt = dt.float() if dt_bias is None else dt.float() + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)  # threshold 20: larger values pass through
    Bh, Ch = B.float(), C.float()  # [B, G, N] -> [B, H, N]
    if rep != 1:
        Bh, Ch = Bh.repeat_interleave(rep, dim=1), Ch.repeat_interleave(rep, dim=1)
    valid = idx = None
    if slots is None:
        rows = state
    else:
        valid, idx = _slot_rows(slots, pad_slot_id, state.shape[0])
        # one valid row (batch-1 decode on CPU) is a view of its slot: no gather, no scatter
        rows = state[int(idx[0]) : int(idx[0]) + 1] if valid is None and idx.shape[0] == 1 else None
    dA = torch.mul(dt.unsqueeze(-1), A.float()).exp_()  # [B, H, P, N], fp32
    if rows is not None and rows.dtype == torch.float32:
        new = rows.mul_(dA)
    else:
        new = dA.mul_(state.index_select(0, idx) if rows is None else rows)
    new.addcmul_((dt * x.float()).unsqueeze(-1), Bh.unsqueeze(2))
    y = torch.matmul(new, Ch.unsqueeze(-1)).squeeze(-1)  # [B, H, P]
    if D is not None:
        y.addcmul_(x.float(), D.float())
    if z is not None:
        y.mul_(F.silu(z.float()))
    if rows is None:
        _store_rows(out, y, state, idx, valid, new)
        return
    out.copy_(y)
    if new is not rows:
        rows.copy_(new)
