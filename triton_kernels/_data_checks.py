"""The host-side checks that read tensor *values* (offsets, slot indices, counts, ranks).

Each reads the device once (one host sync on a GPU, free on CPU) and raises ``ValueError`` with one
message per contract before anything is written. All of them are skipped while a CUDA graph is
being captured (:func:`capturing`): a capture may not sync. The kernels are written so that data
that would have failed these checks still never reads or writes outside a tensor (an out-of-range
slot is treated as the pad slot, a row past the last offset is masked); only the result is then
undefined. Launchers call these inside their custom op, after the metadata (shape/dtype) checks.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence

import torch


def capturing(t: torch.Tensor | None) -> bool:
    """True while a CUDA graph is being captured on ``t``'s device: value checks must be skipped."""
    return t is not None and t.is_cuda and torch.cuda.is_current_stream_capturing()


def _bad_offsets(starts: Sequence[int], total: int) -> bool:
    return starts[0] != 0 or starts[-1] != total or any(a > b for a, b in itertools.pairwise(starts))


def check_offsets(name: str, offsets: torch.Tensor, total: int, what: str = "token count") -> list[int] | None:
    """Raise unless the ``[batch + 1]`` ``offsets`` rise from 0 to ``total`` without decreasing.

    Returns the offsets as a host list (``None`` while capturing), so a caller that needs them
    pays no second sync.
    """
    if capturing(offsets):
        return None
    starts = offsets.tolist()
    if _bad_offsets(starts, total):
        raise ValueError(f"{name} must rise from 0 to the {what} {total} without decreasing, got {starts}")
    return starts


def check_slots(
    name: str,
    indices: torch.Tensor | None,
    num_slots: int,
    pad_slot_id: int,
    *,
    what: str = "the cache",
    unique: bool = False,
) -> None:
    """Raise unless every entry of ``indices`` is a slot in ``[0, num_slots)`` or ``pad_slot_id``;
    with ``unique``, also unless no slot other than the pad slot appears twice (two rows updating
    one state would race on a GPU and give backend-dependent results)."""
    if indices is None or indices.numel() == 0 or capturing(indices):
        return
    values = indices.tolist()
    for v in values:
        if v != pad_slot_id and not 0 <= v < num_slots:
            raise ValueError(
                f"{name} holds {v}, outside {what} [0, {num_slots}) and not the pad slot {pad_slot_id}"
            )
    if unique:
        seen: set[int] = set()
        for v in values:
            if v != pad_slot_id and v in seen:
                raise ValueError(
                    f"{name} holds slot {v} twice: each state slot may be updated by one row per call "
                    f"(pad slot {pad_slot_id} may repeat)"
                )
            seen.add(v)


def check_offsets_and_slots(
    offsets_name: str,
    offsets: torch.Tensor,
    total: int,
    slots_name: str,
    slots: torch.Tensor | None,
    num_slots: int,
    pad_slot_id: int,
    *,
    unique: bool = False,
) -> None:
    """:func:`check_offsets` and :func:`check_slots` with one device read for both."""
    if capturing(offsets):
        return
    if slots is None or slots.numel() == 0:
        check_offsets(offsets_name, offsets, total)
        return
    joined = torch.cat([offsets.long(), slots.long()]).tolist()
    starts = joined[: offsets.shape[0]]
    if _bad_offsets(starts, total):
        raise ValueError(
            f"{offsets_name} must rise from 0 to the token count {total} without decreasing, got {starts}"
        )
    check_slots(slots_name, torch.tensor(joined[offsets.shape[0]:]), num_slots, pad_slot_id, unique=unique)


def check_count(name: str, got: int, expected: int, what: str) -> None:
    """Raise unless a count read from data (``got``) equals ``expected`` (``what`` says whose)."""
    if got != expected:
        raise ValueError(f"{name} holds {got} {what}, expected {expected}")


_PASSED: dict[int, tuple[weakref.ref, set[tuple]]] = {}  # id(anchor) -> (anchor, signatures that passed)
_MAX_SIGNATURES = 16


def version_key(t: torch.Tensor) -> object:
    """What tells whether ``t`` may have been written in place since: its version counter, which
    every in-place torch op bumps, or, for an inference tensor (made under ``torch.inference_mode()``,
    which keeps no counter), a fresh ``object()`` that equals nothing: always "maybe changed"."""
    return object() if t.is_inference() else t._version


def check_once(check: Callable[[], None], tensors: Sequence[torch.Tensor], *extra: object) -> None:
    """Run the value check ``check()`` unless it already passed for these very tensors, unchanged
    since, with the same ``extra`` arguments (sizes it checks against); skipped while capturing.

    For per-step metadata that many ops read in one step (a model's every LoRA layer): one host
    sync per step and tensor set instead of one per call. "Unchanged" means the same tensor object
    (``tensors[0]``, held by weak reference, so a freed tensor whose memory is reused never
    matches), the same data pointers, shapes and strides, and the same version counters (every
    in-place torch op bumps them, inside ``torch.inference_mode()`` too; a raw kernel write does
    not: the kernels stay in bounds regardless, see the module docstring).

    Inference tensors (made under ``torch.inference_mode()``) have no version counter, and inside
    inference mode torch writes them in place without a trace, so none of them ever counts as
    unchanged: while one of ``tensors`` is an inference tensor, ``check()`` runs on every call (one
    host read per call, a sync on a GPU). The package's own per-step buffers (``LoRAKernelMeta``,
    ``pyiface.LoRASlots``) are made as normal tensors even under inference mode, so they keep
    the one-read-per-step cost.
    """
    if not tensors or capturing(tensors[0]):
        return
    if any(t.is_inference() for t in tensors):
        check()
        return
    anchor = tensors[0]
    signature = (tuple((t.data_ptr(), version_key(t), t.shape, t.stride()) for t in tensors), extra)
    entry = _PASSED.get(id(anchor))
    if entry is not None and entry[0]() is anchor and signature in entry[1]:
        return
    check()
    if entry is None or entry[0]() is not anchor or len(entry[1]) >= _MAX_SIGNATURES:
        if len(_PASSED) >= 4 * _MAX_SIGNATURES:
            _PASSED.clear()
        entry = _PASSED[id(anchor)] = (weakref.ref(anchor), set())
    entry[1].add(signature)
