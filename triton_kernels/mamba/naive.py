"""The float64 oracle of the Mamba-1 ops (the tests and benchmarks import this one): plain
sequential definitions, written for clarity, not speed, and distinct from the package's torch
backend (the chunked scan and the ``F.conv1d`` references in ``triton_kernels.mamba.ops_torch``),
which is checked against them like every other backend. Every function takes tensors of any
float dtype and computes in float64.
"""

from __future__ import annotations

import torch

F64 = torch.float64


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(F64)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(x))``, ``x`` itself above 20 (mamba_ssm's threshold)."""
    return torch.where(x <= 20, torch.log1p(torch.exp(x.clamp(max=20))), x)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


def _bc_at(M: torch.Tensor, t: int, dim: int) -> torch.Tensor:
    """B or C at token t as ``[B|1, D|1, N]``, from ``[D, N]``, ``[B, N, L]`` or ``[B, G, N, L]``
    (channel d reads group ``d // (D / G)``)."""
    if M.dim() == 2:
        return M[None]
    if M.dim() == 3:
        return M[:, None, :, t]
    return M[..., t].repeat_interleave(dim // M.shape[1], dim=1)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """mamba_ssm's scan, token by token (all channels at once): ``h_t = exp(dt_t A) h_{t-1} +
    dt_t u_t B_t``, ``y_t = (C_t . h_t + D u_t) * silu(z_t)``. u, delta, z ``[B, D, L]``; returns
    float64 ``(out [B, D, L], last_state [B, D, N])``."""
    u, delta, A, B, C, D, z, delta_bias = map(_f64, (u, delta, A, B, C, D, z, delta_bias))
    bsz, dim, seqlen = u.shape
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    dt = softplus(dt) if delta_softplus else dt
    h = torch.zeros(bsz, dim, A.shape[1], dtype=F64, device=u.device) if initial_state is None \
        else initial_state.to(F64)
    out = torch.zeros(bsz, dim, seqlen, dtype=F64, device=u.device)
    for t in range(seqlen):
        step = dt[..., t, None]  # [B, D, 1]
        h = torch.exp(step * A) * h + step * u[..., t, None] * _bc_at(B, t, dim)
        y = (h * _bc_at(C, t, dim)).sum(-1) + (0 if D is None else D * u[..., t])
        out[..., t] = y if z is None else y * silu(z[..., t])
    return out, h


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           slots=None, pad_slot_id=-1) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step per row in the heads form: state ``[slots, H, P, N]``, x/dt/z ``[B, H, P]``,
    A ``[H, P, N]``, B/C ``[B, G, N]``, D/dt_bias ``[H, P]``. Returns float64 ``(new_state, out)``;
    pad rows get a zero output and leave the state untouched. Row b uses slot b without ``slots``."""
    new = state.to(F64).clone()
    x, dt, A, B, C, D, z, dt_bias = map(_f64, (x, dt, A, B, C, D, z, dt_bias))
    batch, heads = x.shape[:2]
    out = torch.zeros(x.shape, dtype=F64, device=x.device)
    for b in range(batch):
        slot = b if slots is None else int(slots[b])
        if slot == pad_slot_id:
            continue
        for h in range(heads):
            g = h // (heads // B.shape[1])
            step = dt[b, h] + (0 if dt_bias is None else dt_bias[h])  # [P]
            step = softplus(step) if dt_softplus else step
            new[slot, h] = torch.exp(step[:, None] * A[h]) * new[slot, h] + (step * x[b, h])[:, None] * B[b, g]
            y = new[slot, h] @ C[b, g] + (0 if D is None else D[h] * x[b, h])
            out[b, h] = y if z is None else y * silu(z[b, h])
    return new, out


def causal_conv1d(x, weight, bias=None, silu_act=False, initial_states=None,
                  seq_idx=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv, tap by tap: ``out[b, d, t] = act(bias[d] + sum_k weight[d, k] *
    xs[b, d, t + k])`` with ``xs = [initial_states (or zeros), x]``; with ``seq_idx [B, L]`` a tap
    at position ``p = t + k - (W-1) >= 0`` counts only where ``seq_idx[b, p] == seq_idx[b, t]``.
    Returns float64 ``(out [B, D, L], final_states [B, D, W-1])`` (the last W-1 columns of xs)."""
    width, length = weight.shape[1], x.shape[-1]
    init = torch.zeros(*x.shape[:2], width - 1, dtype=F64, device=x.device) if initial_states is None \
        else initial_states.to(F64)
    xs = torch.cat([init, x.to(F64)], dim=-1)
    out = torch.zeros(x.shape, dtype=F64, device=x.device)
    for t in range(length):
        acc = torch.zeros(x.shape[:2], dtype=F64, device=x.device) if bias is None else bias.to(F64).expand(x.shape[:2])
        for k in range(width):
            tap = weight[:, k].to(F64) * xs[..., t + k]
            p = t + k - (width - 1)
            if seq_idx is not None and p >= 0:
                tap = tap * (seq_idx[:, p] == seq_idx[:, t]).to(F64)[:, None]
            acc = acc + tap
        out[..., t] = silu(acc) if silu_act else acc
    return out, xs[..., xs.shape[-1] - (width - 1):]


def causal_conv1d_update(x, conv_state, weight, bias=None, silu_act=False, slots=None,
                         pad_slot_id=-1) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's decode update per row: x ``[B, D, L]``, conv_state ``[slots, D, S]`` (S >= W-1, the last
    S inputs). Returns float64 ``(out, new_conv_state)``; pad rows: zero output, state untouched."""
    width, state_len = weight.shape[1], conv_state.shape[-1]
    new = conv_state.to(F64).clone()
    out = torch.zeros(x.shape, dtype=F64, device=x.device)
    for b in range(x.shape[0]):
        slot = b if slots is None else int(slots[b])
        if slot == pad_slot_id:
            continue
        xs = torch.cat([new[slot], x[b].to(F64)], dim=-1)  # [D, S + L]
        y, _ = causal_conv1d(x[b][None], weight, bias, silu_act, xs[None, :, state_len - (width - 1):state_len])
        out[b] = y[0]
        new[slot] = xs[:, xs.shape[-1] - state_len:]
    return out, new


def causal_conv1d_varlen(x, weight, bias, conv_states, query_start_loc, slots=None, has_initial_state=None,
                         silu_act=True, pad_slot_id=-1) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sequences ``x [D, T]``: sequence i starts from its slot's last W-1 state columns where
    ``has_initial_state[i]`` (else zeros) and leaves the last S inputs of ``[state, x_i]`` (zeros
    for the state without an initial state) in its slot. Returns float64 ``(out [D, T], states)``;
    pad sequences: zero output, slot untouched."""
    width, state_len = weight.shape[1], conv_states.shape[-1]
    new = conv_states.to(F64).clone()
    out = torch.zeros(x.shape, dtype=F64, device=x.device)
    bounds = [int(v) for v in query_start_loc]
    for i in range(len(bounds) - 1):
        slot = i if slots is None else int(slots[i])
        if slot == pad_slot_id:
            continue
        s, e = bounds[i], bounds[i + 1]
        init = has_initial_state is not None and bool(has_initial_state[i])
        prev = new[slot] if init else torch.zeros_like(new[slot])
        xs = torch.cat([prev, x[:, s:e].to(F64)], dim=-1)
        y, _ = causal_conv1d(x[None, :, s:e], weight, bias, silu_act, prev[None, :, state_len - (width - 1):])
        out[:, s:e] = y[0]
        new[slot] = xs[:, xs.shape[-1] - state_len:]
    return out, new

