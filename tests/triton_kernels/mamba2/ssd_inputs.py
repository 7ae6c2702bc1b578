"""Random packed inputs of the Mamba-2 chunked scan (the core behind mamba_chunk_scan_combined /
mamba_chunk_scan_varlen), shared by tests/triton_kernels/mamba2/test_ssd.py and test_ssd_backward.py."""

from __future__ import annotations

import torch

from tests.utils import KERNEL_DEVICE, rnd

F32 = torch.float32
DEV = KERNEL_DEVICE


def make(tokens, h, p, g, n, *, dtype=F32, D="h", z=True, bias=True, softplus=True, device=DEV):
    """Random packed inputs ``[T, ...]`` of the core (signed, never zeros). Without softplus dt is
    positive (a step size)."""
    dt = rnd(tokens, h, scale=0.5, device=device)
    return dict(
        x=rnd(tokens, h, p, dtype=dtype, device=device),
        dt=(dt if softplus else dt.abs() + 0.01).to(dtype),
        A=-(torch.rand(h, device=device) + 0.05),
        B=rnd(tokens, g, n, dtype=dtype, device=device),
        C=rnd(tokens, g, n, dtype=dtype, device=device),
        D={"h": rnd(h, device=device), "hp": rnd(h, p, device=device), None: None}[D],
        z=rnd(tokens, h, p, dtype=dtype, device=device) if z else None,
        dt_bias=rnd(h, scale=0.5, device=device) if bias else None,
        dt_softplus=softplus,
    )


def batched(args, b):
    """The packed inputs as mamba_chunk_scan_combined's ``[b, l, ...]`` keyword arguments."""
    def view(t):
        return None if t is None else t.reshape(b, t.shape[0] // b, *t.shape[1:])

    return {k: (view(v) if k in ("x", "dt", "B", "C", "z") else v) for k, v in args.items()}
