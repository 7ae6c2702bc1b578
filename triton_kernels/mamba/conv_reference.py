"""Plain-torch references for the Mamba decode state update and the causal conv1d ops.

They are the ``torch`` backend and the oracle of the tests. They take the validated arguments
the public ops produce (shapes checked, ``activation`` a bool, heads form for the state update)
and compute in fp32, casting the results to the output dtypes. Rows whose slot is the pad slot
get a zero output and leave every state row untouched, like the kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (the universal alias)


def _conv(xcat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """Depthwise valid conv of fp32 ``xcat [B, D, W-1+L]`` with ``weight [D, W]`` -> ``[B, D, L]``."""
    out = F.conv1d(xcat, weight.float().unsqueeze(1), None if bias is None else bias.float(),
                   groups=weight.shape[0])
    return F.silu(out) if silu else out


def _scatter_rows(cache: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor) -> None:
    """``cache[idx[b]] = rows[b]`` for the rows that are ``valid`` (not the pad slot)."""
    keep = valid.nonzero().squeeze(1)
    if keep.numel() != valid.numel():
        idx, rows = idx.index_select(0, keep), rows.index_select(0, keep)
    cache.index_copy_(0, idx, rows.to(cache.dtype))


def causal_conv1d_fn_ref(
    x: torch.Tensor,  # [B, D, L]
    weight: torch.Tensor,  # [D, W]
    bias: torch.Tensor | None,  # [D]
    silu: bool,
    initial_states: torch.Tensor | None = None,  # [B, D, W-1]
    out: torch.Tensor | None = None,  # [B, D, L], written when given (not differentiable then)
) -> tuple[torch.Tensor, torch.Tensor]:
    """causal-conv1d's ``causal_conv1d_fn``: returns ``out [B, D, L]`` (x's dtype) and the final
    states ``[B, D, W-1]`` (fp32: the last W-1 inputs, initial states included when L < W-1).
    Differentiable in every tensor argument when ``out`` is not given.

    Without initial states the conv pads inside ``F.conv1d`` (its last W-1 columns are dropped)
    instead of materialising a padded copy of x; with ``out`` the activation writes into it."""
    width, length = weight.shape[1], x.shape[-1]
    if initial_states is None:
        xf = x.float()
        res = F.conv1d(xf, weight.float().unsqueeze(1), None if bias is None else bias.float(),
                       padding=width - 1, groups=weight.shape[0])[..., :length]
        tail = xf[..., max(length - (width - 1), 0):]
        final = F.pad(tail, (width - 1 - tail.shape[-1], 0)) if tail.shape[-1] < width - 1 else tail
    else:
        xcat = torch.cat([initial_states.float(), x.float()], dim=-1)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`causal_conv1d_fn_ref` in closed form (fp32, recomputing the conv):
    ``(d_x, d_weight, d_bias, d_initial_states)``, ``None`` for an absent bias / initial state."""
    width, length = weight.shape[1], x.shape[-1]
    if initial_states is None:
        xcat = F.pad(x.float(), (width - 1, 0))
    else:
        xcat = torch.cat([initial_states.float(), x.float()], dim=-1)
    g = d_out.float()
    if silu:
        pre = _conv(xcat, weight, bias, False)
        sig = torch.sigmoid(pre)
        g = g * sig * (1 + pre * (1 - sig))
    d_xcat = F.conv_transpose1d(g, weight.float().unsqueeze(1), groups=weight.shape[0])  # [B, D, W-1+L]
    if d_final is not None:
        d_xcat[..., length:] += d_final.float()
    d_weight = torch.stack([(g * xcat[..., k : k + length]).sum((0, 2)) for k in range(width)], dim=1)
    d_bias = None if bias is None else g.sum((0, 2))
    d_init = None if initial_states is None else d_xcat[..., : width - 1]
    return d_xcat[..., width - 1 :], d_weight, d_bias, d_init


def causal_conv1d_update_ref(
    x: torch.Tensor,  # [B, D, L]
    conv_state: torch.Tensor,  # [slots, D, S], S >= W-1, updated in place
    weight: torch.Tensor,  # [D, W]
    bias: torch.Tensor | None,
    silu: bool,
    slots: torch.Tensor,  # [B] int, the slot of each row
    pad_slot_id: int,
    out: torch.Tensor,  # [B, D, L], written
) -> None:
    """vLLM's ``causal_conv1d_update``: the state is the window of the last S inputs; the conv reads
    its last W-1 columns before the new tokens; afterwards it holds ``[state, x][..., -S:]``."""
    width, state_len = weight.shape[1], conv_state.shape[-1]
    valid = slots != pad_slot_id
    idx = slots.long().clamp(0, conv_state.shape[0] - 1)
    xcat = torch.cat([conv_state.index_select(0, idx).float(), x.float()], dim=-1)  # [B, D, S+L]
    res = _conv(xcat[..., state_len - (width - 1):], weight, bias, silu)
    out.copy_(torch.where(valid[:, None, None], res, 0.0))
    _scatter_rows(conv_state, idx, valid, xcat[..., xcat.shape[-1] - state_len:])


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
        if slot == pad_slot_id:
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
    One ``[B, H, P, N]`` temporary, updated in place (the decode step is bound by its size)."""
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
    if slots is None:
        valid = idx = None
        old = state
    else:
        valid = slots != pad_slot_id
        idx = slots.long().clamp(0, state.shape[0] - 1)
        old = state.index_select(0, idx)
    new = torch.mul(dt.unsqueeze(-1), A.float()).exp_().mul_(old)  # [B, H, P, N], fp32
    new.addcmul_((dt * x.float()).unsqueeze(-1), Bh.unsqueeze(2))
    y = torch.matmul(new, Ch.unsqueeze(-1)).squeeze(-1)  # [B, H, P]
    if D is not None:
        y.addcmul_(x.float(), D.float())
    if z is not None:
        y.mul_(F.silu(z.float()))
    if valid is None:
        out.copy_(y)
        state.copy_(new)
    else:
        out.copy_(torch.where(valid[:, None, None], y, 0.0))
        _scatter_rows(state, idx, valid, new)
