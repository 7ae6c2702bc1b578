"""Tensors that share memory, for the tests of the ops that refuse an output (or a state written in
place) overlapping one of their inputs."""

from __future__ import annotations

import torch

from tests.utils import KERNEL_DEVICE


def sharing(shape_a, shape_b, dtype: torch.dtype = torch.float32, device=KERNEL_DEVICE):
    """``(buffer, a, b)``: random views of one buffer, ``a`` first, ``b`` starting at ``a``'s last element (a
    one-element overlap: the byte ranges intersect, nothing more). Compare ``buffer`` before and after a
    call to see that nothing was written."""
    n_a, n_b = torch.Size(shape_a).numel(), torch.Size(shape_b).numel()
    buffer = torch.randn(n_a + n_b).to(dtype=dtype, device=device)
    return buffer, buffer[:n_a].view(shape_a), buffer[n_a - 1 : n_a - 1 + n_b].view(shape_b)
