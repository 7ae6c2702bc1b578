"""The ``torch`` backend of :func:`~triton_kernels.add_lora_linear`: the per-adapter definition of
:mod:`triton_kernels.lora.reference` batched into a fixed, small number of torch ops.

Math runs in float32 for half inputs (float64 for float64), so the rank-sized intermediate is
never rounded to the half dtype (as in the Triton kernel, which keeps it in fp32 registers).
"""

from __future__ import annotations

import torch

from triton_kernels._alloc import empty
from triton_kernels._data_checks import check_once
from triton_kernels.lora.reference import add_lora_linear_ref, compute_dtype, group_table, slot_segments

# The batched form pads every slot of the range to the longest group and the largest rank; the
# per-slot loop pays, per slot, ~50 us of Python and op overhead on a CPU core (about 2^19
# multiply-adds). Batched while the padded work costs less than the loop's overhead, else the loop.
BATCHED_SLOT_MACS = 2**19


class _NonZeroPaddingError(Exception):
    """Raised by :func:`_zero_past_ranks`' check: not cached, so the weights are read again next time."""


def _zero_past_ranks(lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], lora_ranks: torch.Tensor) -> bool:
    """True when every A row and B column past its slot's rank is exactly zero (as
    ``pyiface.LoRASlots`` keeps them): the slots can then run at one larger rank unmasked, since
    the padding adds exact zeros. Read once per version of the weights and ranks (one host read;
    cached like a passed value check), every call while it fails (e.g. NaN padding)."""

    def check() -> None:
        past = torch.arange(lora_a[0].shape[1], device=lora_ranks.device) >= lora_ranks[:, None]  # [L, R]
        counts = [t.count_nonzero() for a, b in zip(lora_a, lora_b) for t in (a[past], b.mT[past])]
        if int(torch.stack(counts).sum()):
            raise _NonZeroPaddingError

    try:
        check_once(check, (lora_ranks, *lora_a, *lora_b))
    except _NonZeroPaddingError:
        return False
    return True


def _add_one_slot(y, x, lora_a, lora_b, scale, slot, rank, dt) -> None:
    """``y += delta`` when every token uses ``slot``: the token order does not matter then."""
    rows = y if y.dtype == dt else y.to(dt)  # half y: add in dt, round once
    xs = x.to(dt)
    col = 0
    for a, b in zip(lora_a, lora_b):
        h = xs @ a[slot].narrow(0, 0, rank).to(dt).T
        rows.narrow(1, col, b.shape[1]).addmm_(h, b[slot].narrow(1, 0, rank).to(dt).T, alpha=scale)
        col += b.shape[1]
    if rows is not y:
        y.copy_(rows)


def add_lora_linear_batched(
    y: torch.Tensor,  # [T, sum n_s], updated in place for LoRA tokens
    x: torch.Tensor,  # [T, H_in]
    lora_a: list[torch.Tensor],  # S x [L, R, H_in]
    lora_b: list[torch.Tensor],  # S x [L, n_s, R]
    scale: float,
    sorted_indices: torch.Tensor,  # [T]
    num_tokens_per_lora: torch.Tensor,  # [G]
    lora_token_start_loc: torch.Tensor,  # [G + 1]
    lora_ids: torch.Tensor,  # [G]
    lora_ranks: torch.Tensor | None = None,  # [L], values in [0, R]
) -> None:
    """:func:`~triton_kernels.lora.reference.add_lora_linear_ref` in a fixed, small number of torch ops.

    The groups of the slot range ``[lo, hi)`` in use are padded to the longest group: one gather
    of ``x`` to ``[n, M, H_in]`` (a view of the sorted indices when the groups are all of one
    length), per slice two batched matmuls over views of the weights' slot range, one scatter of
    the valid rows into ``y``; when one slot owns every token, plain matmuls into ``y``. Falls
    back to the per-group loop when a slot has two groups, or when the multiply-adds spent on
    padding (rows to the longest group, ranks to the largest) cost more than the loop's per-slot
    overhead (:data:`BATCHED_SLOT_MACS` per slot): decode batches run batched, long prefill groups
    of mixed ranks in the loop, each slot at its rank. Slots of one rank use views of their rows
    and columns; slots of mixed ranks run at the largest rank in use: as they are where the
    weights are zero past each slot's rank, else with the shrink output and a copy of B zeroed
    there (so whatever A and B hold past a rank, NaN included, never reaches ``y``). Reads the
    group table and the ranks on the host in one copy (one sync on a GPU; the loop takes several).
    """
    table = group_table(num_tokens_per_lora, lora_token_start_loc, lora_ids, lora_ranks)
    counts, starts, ids, ranks = table
    live = {slot: (start, count) for slot, start, count in zip(ids, starts, counts) if slot >= 0 and count > 0}
    if not live:
        return
    lo, hi = min(live), max(live) + 1
    longest = max(count for _, count in live.values())
    total = sum(count for _, count in live.values())
    capacity = lora_a[0].shape[1]
    slot_rank = {slot: capacity if ranks is None else min(ranks[slot], capacity) for slot in live}
    rank, n, dev, dt = max(slot_rank.values()), hi - lo, x.device, compute_dtype(x)
    if rank == 0:
        return
    padded = n * longest * rank - sum(count * slot_rank[slot] for slot, (_, count) in live.items())
    duplicated = sum(1 for slot, count in zip(ids, counts) if slot >= 0 and count > 0) != len(live)
    if duplicated or padded * (x.shape[1] + y.shape[1]) > BATCHED_SLOT_MACS * len(live):
        segments = slot_segments(sorted_indices, num_tokens_per_lora, lora_token_start_loc, lora_ids)
        add_lora_linear_ref(y, x, lora_a, lora_b, scale, segments, lora_ranks)
        return
    cut = None  # [n, 1, rank] bool, True past each slot's rank: only when the ranks differ
    span_ranks = [slot_rank.get(slot, rank) for slot in range(lo, hi)]
    if min(span_ranks) < rank and not _zero_past_ranks(lora_a, lora_b, lora_ranks):
        cut = torch.tensor(span_ranks, dtype=torch.int64).to(dev, non_blocking=True)
        cut = (torch.arange(rank, device=dev) >= cut[:, None]).unsqueeze(1)
    if n == 1 and total == x.shape[0]:  # one slot owns every token: no gather, no scatter
        _add_one_slot(y, x, lora_a, lora_b, scale, lo, rank, dt)
        return
    span = [live.get(slot, (0, 0)) for slot in range(lo, hi)]
    order = sorted_indices.long()
    dense = all(count == longest for _, count in span) and all(
        span[i + 1][0] == span[i][0] + longest for i in range(n - 1)
    )
    valid = None
    if dense:  # the groups lie back to back, all of one length: a view of the sorted indices
        tok = order[span[0][0] : span[0][0] + total].view(n, longest)
    else:
        table = torch.tensor(span, dtype=torch.int64).to(dev, non_blocking=True)  # [n, 2]: start, count
        m = torch.arange(longest, device=dev)
        valid = m < table[:, 1:]  # [n, M]
        tok = order[torch.where(valid, table[:, :1] + m, 0)]  # [n, M], padded with the first sorted token
    xg = x.index_select(0, tok.flatten()).view(n, longest, x.shape[1]).to(dt)
    rows = empty((n, longest, y.shape[1]), dt, dev)
    whole = n == lora_a[0].shape[0] and rank == lora_a[0].shape[1]  # narrow() views cost Python time
    cast = lora_a[0].dtype != dt
    col = 0
    for a, b in zip(lora_a, lora_b):
        if not whole:
            a, b = a.narrow(0, lo, n).narrow(1, 0, rank), b.narrow(0, lo, n).narrow(2, 0, rank)
        if cast:
            a, b = a.to(dt), b.to(dt)
        h = torch.bmm(xg, a.mT)  # [n, M, r]
        if cut is not None:  # past a slot's rank: zeros, whatever A and B hold there (NaN too)
            h.masked_fill_(cut, 0)
            b = b.masked_fill_(cut, 0) if cast else b.masked_fill(cut, 0)
        rows.narrow(2, col, b.shape[1]).baddbmm_(h, b.mT, beta=0, alpha=scale)
        col += b.shape[1]
    rows, tok = rows.view(n * longest, -1), tok.flatten()
    if valid is not None:
        sel = torch.nonzero_static(valid.flatten(), size=total).squeeze(1)  # no sync: the count is known
        rows, tok = rows.index_select(0, sel), tok.index_select(0, sel)
    if y.dtype == dt:
        y.index_add_(0, tok, rows)
    else:  # add in dt and round once
        y.index_copy_(0, tok, (y.index_select(0, tok).to(dt) + rows).to(y.dtype))
