"""The Mamba-1 selective scan backward on CPU: the launcher of ``ifk::selective_scan_bwd_cpu``
(``csrc/mamba/selective_scan_cpu.cpp``, beside the forward kernel).

The kernel recomputes the forward states chunk by chunk (scratch ``N (L / 64 + 128)`` floats per
thread), OpenMP over (batch, block of channels); its sums go through partials added in a fixed
order, so the same inputs give bit-identical gradients whatever the thread count. The grouped
B/C gradients take a ``[Bt, D / 16, L, N]`` fp32 partial buffer (``N / 16`` times the size of u).
"""

from __future__ import annotations

import torch

from triton_kernels import _alloc, _csrc
from triton_kernels._checks import unit_stride_last
from triton_kernels.registry import SELECTIVE_SCAN


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """fp32 with unit stride along the last dim (a copy only where needed), or None."""
    return None if t is None else unit_stride_last(t.float())


def _token_major(M: torch.Tensor) -> torch.Tensor:
    """B or C as the kernel reads it: ``[D, N]`` as is, ``[Bt, G, N, L]`` as ``[Bt, G, L, N]``."""
    return _f32(M) if M.dim() == 2 else M.float().transpose(-1, -2).contiguous()


def _grad_like(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(buffer the kernel writes, the gradient shaped like M)`` for B or C."""
    if M.dim() == 2:
        g = _alloc.empty(M.shape, torch.float32, M.device)
        return g, g
    bsz, groups, dstate, seqlen = M.shape
    g = _alloc.empty((bsz, groups, seqlen, dstate), torch.float32, M.device)
    return g, g.transpose(-1, -2)


def scan_bwd_cpu(
    dout: torch.Tensor,
    dlast: torch.Tensor | None,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of the batched selective scan (metadata validated by the caller).

    Args:
        dout: ``[Bt, D, L]`` any float dtype, any strides. dlast: ``[Bt, D, N]`` or None, the
            gradient of the returned last state.
        u, delta, z: ``[Bt, D, L]``. A: ``[D, N]``. B, C: ``[D, N]`` (per channel) or
            ``[Bt, G, N, L]`` (grouped). D, delta_bias: ``[D]`` or None.

    Returns fp32 ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)`` shaped like the inputs (None
    where the input is None): per-channel dB/dC, dA, dD and ddelta_bias summed over batch and
    length, grouped dB/dC over the channels of each group (a transposed view of a token-major
    buffer).

    Example:
        >>> u = torch.randn(1, 4, 9); A = -torch.rand(4, 2); Bc = torch.randn(1, 1, 2, 9)
        >>> scan_bwd_cpu(torch.randn(1, 4, 9), None, u, u.abs(), A, Bc, Bc, None, None, None, False)[3].shape
        torch.Size([1, 1, 2, 9])
    """
    _csrc.load(SELECTIVE_SCAN.native["cpu"])
    device = u.device
    du, ddelta = (_alloc.empty(u.shape, torch.float32, device) for _ in range(2))
    dA = _alloc.empty(A.shape, torch.float32, device)
    (dB_buf, dB), (dC_buf, dC) = _grad_like(B), _grad_like(C)
    dD, ddelta_bias = (None if t is None else _alloc.empty(t.shape, torch.float32, device) for t in (D, delta_bias))
    dz = None if z is None else _alloc.empty(z.shape, torch.float32, device)
    torch.ops.ifk.selective_scan_bwd_cpu(
        du, ddelta, dA, dB_buf, dC_buf, dD, dz, ddelta_bias,
        _f32(dout), None if dlast is None else dlast.float(), _f32(u), _f32(delta), A.float(), _token_major(B),
        _token_major(C), _f32(D), _f32(z), _f32(delta_bias), bool(delta_softplus),
    )
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias
