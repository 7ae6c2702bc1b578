"""Per-step metadata of a packed (varlen) batch, built once per step for every state layer.

A hybrid with N Mamba layers calls its varlen ops N times per step with the same offsets and slots;
each call used to read them back (one host sync each, for the value checks and, in the SSD, for its
chunk table). :class:`MambaVarlenMeta` reads them once (:meth:`MambaVarlenMeta.prepare`, as vLLM's
``prepare_mamba2_metadata`` and this package's ``LoRAKernelMeta`` do), checks them once, and the
varlen ops given ``metadata=`` read nothing back in eager mode. Under ``torch.compile`` the ops read
the tensors themselves (host values would become graph constants); a CUDA graph cannot capture the
read either way: prepare before capturing.
"""

from __future__ import annotations

import dataclasses

import torch

from triton_kernels._checks import INDEX_DTYPES, check_tensor
from triton_kernels._data_checks import capturing, check_offsets, check_slots
from triton_kernels.constants import PAD_SLOT_ID
from triton_kernels.mamba._args import check_index, check_pad_slot_id, check_query_start_loc, pad_slot_of


@dataclasses.dataclass(frozen=True)
class MambaVarlenMeta:
    """One step's packed batch: the device tensors the kernels read and their host copies.

    Attributes:
        query_start_loc: ``[batch + 1]`` int32/int64 token offsets (device).
        cache_indices: ``[batch]`` slots (device, None: sequence b uses slot b).
        has_initial_state: ``[batch]`` bool (device, None: every sequence starts from zeros).
        starts, slots, initial: the host copies (``slots`` holds b for sequence b without indices;
            ``initial`` all False without flags).
        num_slots: the slot count the slots were checked against.
        pad_slot_id: the pad id the kernels compare slots with (none without ``cache_indices``).
    """

    query_start_loc: torch.Tensor
    cache_indices: torch.Tensor | None
    has_initial_state: torch.Tensor | None
    starts: tuple[int, ...]
    slots: tuple[int, ...]
    initial: tuple[bool, ...]
    num_slots: int
    pad_slot_id: int

    @property
    def batch(self) -> int:
        return len(self.starts) - 1

    @property
    def num_tokens(self) -> int:
        return self.starts[-1]

    @staticmethod
    def prepare(query_start_loc: torch.Tensor, cache_indices: torch.Tensor | None = None,
                has_initial_state: torch.Tensor | None = None, *, num_slots: int,
                pad_slot_id: int = PAD_SLOT_ID, num_tokens: int | None = None) -> MambaVarlenMeta:
        """Read and check the step's offsets, slots and flags with one host read.

        ``query_start_loc`` must rise from 0 without decreasing (to ``num_tokens`` when given);
        ``cache_indices`` (may be longer than the batch, as vLLM pads it) must hold distinct slots in
        ``[0, num_slots)`` or ``pad_slot_id``.
        Raises ``ValueError`` naming the bad argument, and ``RuntimeError`` during CUDA-graph capture.

        Example:
            >>> meta = MambaVarlenMeta.prepare(torch.tensor([0, 3, 10]), torch.tensor([2, 0]), num_slots=4)
            >>> meta.batch, meta.num_tokens, meta.slots
            (2, 10, (2, 0))
        """
        check_tensor("query_start_loc", query_start_loc, dtypes=INDEX_DTYPES)
        device = query_start_loc.device
        batch = check_query_start_loc(query_start_loc, device)
        cache_indices = check_index("cache_indices", cache_indices, batch, device)
        has_initial_state = check_index("has_initial_state", has_initial_state, batch, device, (torch.bool,))
        pad = pad_slot_of(cache_indices, check_pad_slot_id(pad_slot_id))
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 0:
            raise ValueError(f"num_slots must be an int >= 0, got {num_slots!r}")
        if capturing(query_start_loc):
            raise RuntimeError("MambaVarlenMeta.prepare reads the offsets on the host: prepare it before "
                               "capturing a CUDA graph")
        parts = [query_start_loc.long()] + [t.long() for t in (cache_indices, has_initial_state) if t is not None]
        values = torch.cat(parts).tolist()  # the one host read
        starts = values[: batch + 1]
        check_offsets("query_start_loc", torch.tensor(starts), starts[-1] if num_tokens is None else num_tokens)
        rest = values[batch + 1:]
        slots = rest[:batch] if cache_indices is not None else list(range(batch))
        if cache_indices is None and batch > num_slots:
            raise ValueError(f"cache_indices=None maps sequence b to slot b, but there are {batch} sequences "
                             f"and {num_slots} slots")
        check_slots("cache_indices", torch.tensor(slots, dtype=torch.long), num_slots, pad, unique=True)
        initial = [bool(v) for v in rest[-batch:]] if has_initial_state is not None and batch else [False] * batch
        return MambaVarlenMeta(query_start_loc, cache_indices, has_initial_state, tuple(starts), tuple(slots),
                               tuple(initial), num_slots, pad)

    def host(self) -> list[int] | None:
        """The host copies as one flat list for a custom op (``starts + slots + initial``), or None while
        tracing under torch.compile (the op then reads the tensors itself)."""
        if torch.compiler.is_compiling():
            return None
        return [*self.starts, *self.slots, *map(int, self.initial)]



def varlen_arguments(metadata: object, given: tuple, num_tokens: int, states_name: str, states: object) -> tuple:
    """``(query_start_loc, cache_indices, has_initial_state, pad_slot_id)`` of a varlen op called with
    ``metadata=``: refuses the tensors it stands for given too (``given``), and metadata prepared for
    another token count or cache size."""
    if not isinstance(metadata, MambaVarlenMeta):
        raise TypeError(f"metadata must be a MambaVarlenMeta, got {type(metadata).__name__}")
    if any(t is not None for t in given):
        raise ValueError("pass either metadata or query_start_loc / cache_indices / has_initial_state, not both")
    check_tensor(states_name, states)
    if num_tokens != metadata.num_tokens or states.shape[0] != metadata.num_slots:
        raise ValueError(f"metadata was prepared for {metadata.num_tokens} tokens and {metadata.num_slots} slots, "
                         f"got {num_tokens} tokens and {states_name} with {states.shape[0]} slots")
    return metadata.query_start_loc, metadata.cache_indices, metadata.has_initial_state, metadata.pad_slot_id


def unpack_host(host: list[int], batch: int) -> tuple[list[int], list[int], list[int]]:
    """Inverse of :meth:`MambaVarlenMeta.host`: ``(starts, slots, initial)``."""
    return host[: batch + 1], host[batch + 1: 2 * batch + 1], host[2 * batch + 1:]
