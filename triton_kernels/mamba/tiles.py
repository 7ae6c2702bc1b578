"""The tiles the selective scan walks, shared by its forward and backward kernels: the Triton forward
saves the fp32 state entering each tile (``tile_states``) when gradients are needed, and the backward
recomputes the states inside a tile from it."""

from __future__ import annotations

import torch
import triton

from triton_kernels._checks import check_shape, check_tensor


def tile_length(dstate: int) -> int:
    """``BLOCK_L``, the tokens of one tile: longer tiles for small N amortise the carried state."""
    return 32 if dstate <= 16 else 16


def tile_states_shape(u: torch.Tensor, A: torch.Tensor) -> tuple[int, int, int, int]:
    """``[B, n_tiles + 1, D, N]`` for u ``[B, D, L]``, A ``[D, N]``: the state entering each of the
    ``cdiv(L, tile_length(N))`` tiles, then the last state."""
    return (u.shape[0], triton.cdiv(u.shape[2], tile_length(A.shape[1])) + 1, u.shape[1], A.shape[1])


def check_tile_states(tile_states: torch.Tensor, u: torch.Tensor, A: torch.Tensor) -> None:
    """``tile_states`` must be :func:`tile_states_shape` fp32 contiguous."""
    check_tensor("tile_states", tile_states, dtypes=(torch.float32,), device=u.device)
    check_shape("tile_states", tile_states, tile_states_shape(u, A))
    if not tile_states.is_contiguous():
        raise ValueError(f"tile_states must be contiguous, got strides {tile_states.stride()}")
