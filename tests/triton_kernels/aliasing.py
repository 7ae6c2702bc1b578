"""Tensors that share memory, for the tests of the ops that refuse an output (or a state written in
place) overlapping one of their inputs."""

from __future__ import annotations

import torch

from tests.utils import KERNEL_DEVICE


def sharing(shape_a, shape_b, dtype: torch.dtype = torch.float32, dtype_b: torch.dtype | None = None,
            device=KERNEL_DEVICE):
    """``(buffer, a, b)``: random views of one byte buffer, ``a`` first (``dtype``), ``b`` (``dtype_b``,
    default ``dtype``) starting at the element holding ``a``'s last byte: the byte ranges intersect, barely.
    Compare ``buffer`` (uint8) before and after a call to see that nothing was written."""
    dtype_b = dtype_b or dtype
    size_b = torch.empty((), dtype=dtype_b).element_size()
    bytes_a = torch.Size(shape_a).numel() * torch.empty((), dtype=dtype).element_size()
    start = (bytes_a - 1) // size_b * size_b
    bytes_b = torch.Size(shape_b).numel() * size_b
    buffer = torch.zeros(max(bytes_a, start + bytes_b), dtype=torch.uint8, device=device)
    a = buffer[:bytes_a].view(dtype).view(shape_a)
    b = buffer[start : start + bytes_b].view(dtype_b).view(shape_b)
    b.copy_(torch.randn(shape_b).to(dtype_b))
    a.copy_(torch.randn(shape_a).to(dtype))
    return buffer, a, b
