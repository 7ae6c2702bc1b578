"""Random inputs of the Mamba-1 selective scan and their float64 expectations, shared by the scan's
tests (tests/triton_kernels/mamba/test_selective_scan*.py, tests/csrc/test_selective_scan*_cpu.py)."""

from __future__ import annotations

import torch

from tests.utils import KERNEL_DEVICE, rnd
from triton_kernels import PAD_SLOT_ID
from triton_kernels.mamba import naive as oracle

F32 = torch.float32


def make_batched(bsz, dim, dstate, seqlen, *, bc="token", dtype=F32, z=True, D=True, bias=True,
                 softplus=True, device=KERNEL_DEVICE):
    """Random signed inputs of ``selective_scan_fn``; ``bc`` is token | group2 | channel. Without
    softplus, delta is made positive (a step size; negative steps with A < 0 grow without bound)."""
    shape = {"token": (bsz, dstate, seqlen), "group2": (bsz, 2, dstate, seqlen), "channel": (dim, dstate)}[bc]
    return dict(
        u=rnd(bsz, dim, seqlen, dtype=dtype, device=device),
        delta=rnd(bsz, dim, seqlen, dtype=dtype, scale=0.5, device=device).abs_() if not softplus
        else rnd(bsz, dim, seqlen, dtype=dtype, scale=0.5, device=device),
        A=-torch.rand(dim, dstate, device=device) - 0.1,
        B=rnd(*shape, dtype=dtype, device=device),
        C=rnd(*(shape if bc != "channel" else (bsz, dstate, seqlen)), dtype=dtype, device=device),
        D=rnd(dim, device=device) if D else None,
        z=rnd(bsz, dim, seqlen, dtype=dtype, device=device) if z else None,
        delta_bias=rnd(dim, scale=0.5, device=device) if bias else None,
        delta_softplus=softplus,
    )


def ref64(args, initial_state=None):
    """The float64 oracle: ``(out, last_state)``."""
    return oracle.selective_scan(**args, initial_state=initial_state)


def make_varlen(lengths, dim, dstate, groups, num_slots, *, dtype=F32, state_dtype=F32, device=KERNEL_DEVICE):
    total = sum(lengths)
    qsl = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return dict(
        u=rnd(dim, total, dtype=dtype, device=device),
        ssm_states=rnd(num_slots, dim, dstate, dtype=state_dtype, device=device),
        delta=rnd(dim, total, dtype=dtype, scale=0.5, device=device),
        A=-torch.rand(dim, dstate, device=device) - 0.1,
        B=rnd(groups, dstate, total, dtype=dtype, device=device),
        C=rnd(groups, dstate, total, dtype=dtype, device=device),
        D=rnd(dim, device=device), z=rnd(dim, total, dtype=dtype, device=device),
        delta_bias=rnd(dim, scale=0.5, device=device), delta_softplus=True, query_start_loc=qsl,
    )


def varlen_expected(args, slots, has_init):
    """Each sequence alone through the fp64 reference: ``(out [D, T], states)`` (pad columns NaN)."""
    out = torch.full(args["u"].shape, float("nan"), dtype=torch.float64, device=args["u"].device)
    states = args["ssm_states"].clone()
    starts = args["query_start_loc"].tolist()
    for b, slot in enumerate(slots):
        if slot == PAD_SLOT_ID:
            continue
        s, e = starts[b], starts[b + 1]
        one = {k: args[k][..., s:e][None] for k in ("u", "delta", "B", "C", "z")}
        one.update({k: args[k] for k in ("A", "D", "delta_bias", "delta_softplus")})
        y, last = ref64(one, states[slot][None] if has_init[b] else None)
        out[:, s:e] = y[0]
        states[slot] = last[0].to(states.dtype)
    return out, states
