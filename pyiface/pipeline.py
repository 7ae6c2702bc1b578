"""Pipeline-parallel stages: which layers a rank owns, and a layer list with placeholders."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from pyiface.intermediate_tensors import PPMissingLayer


def pp_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """``[start, end)`` of the layers that rank ``pp_rank`` of ``pp_size`` runs.

    Layers are split evenly; the remainder goes one each to the ranks just before the last (the
    last rank also runs the LM head), as vLLM splits them.
    """
    if pp_size < 1 or not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank must be in [0, pp_size) with pp_size >= 1, got {pp_rank=} {pp_size=}")
    if num_layers < pp_size:
        raise ValueError(f"num_layers ({num_layers}) must be at least pp_size ({pp_size})")
    sizes = [num_layers // pp_size] * pp_size
    for i in range(2, num_layers % pp_size + 2):
        sizes[-i] += 1
    start = sum(sizes[:pp_rank])
    return start, start + sizes[pp_rank]


def make_layers(
    num_layers: int, layer_fn: Callable[[int], nn.Module], pp_rank: int = 0, pp_size: int = 1
) -> tuple[int, int, nn.ModuleList]:
    """``(start, end, layers)``: ``layer_fn(i)`` for this rank's layers, ``PPMissingLayer`` elsewhere,
    so layer indices (and checkpoint names) stay global on every rank."""
    start, end = pp_layer_range(num_layers, pp_rank, pp_size)
    layers = nn.ModuleList(layer_fn(i) if start <= i < end else PPMissingLayer() for i in range(num_layers))
    return start, end, layers
