"""Argument checks shared by the Mamba-1 ops (metadata only: no device sync, nothing written).

The checks that read values (offsets, slot ranges, duplicate slots) live in
:mod:`triton_kernels._data_checks` and run inside the custom ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from triton_kernels._checks import INDEX_DTYPES, check_tensor
from triton_kernels.constants import PAD_SLOT_ID


def check_index(
    name: str, t: object, batch: int, device: torch.device, dtypes: Sequence[torch.dtype] = INDEX_DTYPES
) -> torch.Tensor | None:
    """An optional tensor of per-row slots (int32/int64) or flags (``dtypes=(torch.bool,)``) with at least
    ``batch`` entries, returned as its first ``batch``, contiguous. Longer is allowed as vLLM passes it
    (index buffers padded for CUDA graphs): the entries past the batch are never read."""
    if t is None:
        return None
    check_tensor(name, t, ndim=1, dtypes=dtypes, device=device)
    if t.shape[0] < batch:
        raise ValueError(f"{name} has {t.shape[0]} entries, expected at least {batch} (one per sequence)")
    return t[:batch].contiguous()


def check_query_start_loc(query_start_loc: object, device: torch.device) -> int:
    """``query_start_loc [batch + 1]`` int32/int64 (values: ``_data_checks.check_offsets``); returns batch."""
    check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if query_start_loc.shape[0] == 0:
        raise ValueError("query_start_loc must hold at least one offset (batch + 1 entries), got none")
    return query_start_loc.shape[0] - 1


def check_default_slots(states_name: str, num_slots: int, batch: int, indices_name: str, *, exact: bool) -> None:
    """Without ``indices_name``, row (sequence) b uses slot b: the cache needs a slot for each
    (``exact``: one per row, as the decode ops' HF/mamba_ssm callers pass the batch's own states)."""
    if num_slots != batch if exact else num_slots < batch:
        unit = "rows" if exact else "sequences"
        raise ValueError(f"{states_name} has {num_slots} slots for {batch} {unit}; pass {indices_name}")


def check_pad_slot_id(pad_slot_id: object) -> int:
    if isinstance(pad_slot_id, bool) or not isinstance(pad_slot_id, int):
        raise TypeError(f"pad_slot_id must be an int, got {pad_slot_id!r}")
    return pad_slot_id


def pad_slot_of(indices: torch.Tensor | None, pad_slot_id: int) -> int:
    """The pad slot the kernels compare slots against: ``pad_slot_id`` when ``indices`` are given, and
    none (an id no default slot ``0..batch-1`` equals) without them. vLLM's rule: a value is padding only
    in an index tensor; without one every row is real, whatever ``pad_slot_id`` says."""
    return pad_slot_id if indices is not None else PAD_SLOT_ID
