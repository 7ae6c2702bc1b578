"""Multimodal placeholder scatter: write image/audio embedding rows into placeholder positions.

One kernel serves all three public ops. Each program copies one row block: a placeholder row
takes the next row of the multimodal items (found by its rank among the placeholders), a text
row is either left alone (merge) or gathered from the embedding table (fused embed). Items are
read where they lie, through a small device table of base pointers, row starts and row strides,
so a list of items is never concatenated.

Launches and host syncs of one call on a GPU (kernel backends), counted with torch.profiler on
CPU by tests/triton_kernels/multimodal/test_scatter.py::test_launch_count:

    placeholder mask     1 ``input_ids == id`` (a list of ids: a small host-to-device copy and
                         ``isin``); none when ``is_multimodal`` is given
    rank                 1 ``cumsum`` (its last entry is the placeholder count)
    data checks          fused: 3 (``masked_fill``, ``aminmax``, ``stack``) and 1 sync (``tolist``);
                         merge: 1 sync (the count); none when ``num_placeholders`` is given
    item pointer table   1 host-to-device copy, only for 2+ items
    the kernel           1

So the fused embed by placeholder id is 6 launches and 1 host sync (7 with a list of items); with
``is_multimodal``, ``num_placeholders`` and one (3-D or 2-D) item it is 2 launches and no sync.
Casting items to the target dtype, copying an item that aliases the target and a column-strided
target add one copy each. The torch backend (the CPU path) syncs more: ``nonzero``, and ``any``
for the fused op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels import _alloc
from triton_kernels._checks import check_no_overlap, on_device, overlaps
from triton_kernels._data_checks import capturing
from triton_kernels._ops import destination_op
from triton_kernels.multimodal._args import (
    MultiModalItems,
    check_ids,
    check_mask,
    check_num_placeholders,
    check_rows,
    count_expression,
    flatten_items,
    placeholder_mask,
)
from triton_kernels.multimodal.reference import embed_multimodal_tokens_ref, merge_multimodal_embeddings_ref
from triton_kernels.registry import MULTIMODAL_SCATTER


@triton.jit
def _embed_scatter_kernel(
    # pointers
    out_ptr,  # [T, H]
    ids_ptr,  # [T]
    weight_ptr,  # [V, H]
    mask_ptr,  # [T] bool
    rank_ptr,  # [T] int32, inclusive cumsum of mask
    item_ptr,  # [rows, H], the only item when SINGLE_ITEM
    table_ptr,  # [3, n_items + 1] int64: base pointers, row starts, row strides
    # sizes
    n_items,
    total_rows,
    hidden,
    vocab,
    # strides
    stride_out_t,
    stride_w_v,
    stride_item_r,
    # meta
    GATHER_TEXT: tl.constexpr,
    SINGLE_ITEM: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    i_t = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    o_h = i_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_h = o_h < hidden
    p_out = out_ptr + i_t * stride_out_t + o_h
    row = tl.load(rank_ptr + i_t).to(tl.int64) - 1
    if tl.load(mask_ptr + i_t):
        if row < total_rows:  # always true once counts were checked; guards unchecked data
            if SINGLE_ITEM:
                p_src = item_ptr + row * stride_item_r + o_h
            else:
                lo = 0
                hi = n_items
                while hi - lo > 1:  # last item whose first row is <= row
                    mid = (lo + hi) // 2
                    if tl.load(table_ptr + (n_items + 1) + mid) <= row:
                        lo = mid
                    else:
                        hi = mid
                base = tl.load(table_ptr + lo).to(tl.pointer_type(out_ptr.dtype.element_ty))
                local = row - tl.load(table_ptr + (n_items + 1) + lo)
                stride = tl.load(table_ptr + 2 * (n_items + 1) + lo)
                p_src = base + local * stride + o_h
            tl.store(p_out, tl.load(p_src, mask=m_h), mask=m_h)
    elif GATHER_TEXT:
        token = tl.load(ids_ptr + i_t).to(tl.int64)
        if (token >= 0) & (token < vocab):
            tl.store(p_out, tl.load(weight_ptr + token * stride_w_v + o_h, mask=m_h), mask=m_h)
        else:  # unchecked data: an out-of-vocab id gives a zero row
            tl.store(p_out, tl.zeros([BLOCK_H], dtype=out_ptr.dtype.element_ty), mask=m_h)


def _item_table(items: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``[3, n + 1]`` int64 on ``device``: base pointers, row starts (with the total), row strides."""
    starts = [0]
    for item in items:
        starts.append(starts[-1] + item.shape[0])
    table = torch.tensor(
        [[it.data_ptr() for it in items] + [0], starts, [it.stride(0) for it in items] + [0]],
        dtype=torch.int64,
    )
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _launch_triton(out, input_ids, weight, items, mask, rank, total_rows) -> None:
    hidden = out.shape[1]
    num_tokens = out.shape[0]
    if num_tokens == 0 or hidden == 0:
        return
    single = len(items) == 1
    table = mask if single else _item_table(items, out.device)  # unused when single
    block_h = min(triton.next_power_of_2(hidden), 8192 // out.element_size())
    gather = weight is not None
    grid = (num_tokens, triton.cdiv(hidden, block_h))
    with on_device(out.device):
        _embed_scatter_kernel[grid](
            out,
            input_ids if gather else mask,
            weight if gather else out,
            mask,
            rank,
            items[0] if items else out,
            table,
            len(items),
            total_rows,
            hidden,
            weight.shape[0] if gather else 0,
            out.stride(0),
            weight.stride(0) if gather else 0,
            items[0].stride(0) if single else 0,
            GATHER_TEXT=gather,
            SINGLE_ITEM=single,
            BLOCK_H=block_h,
            num_warps=8 if block_h * out.element_size() >= 8192 else 4,
        )


def _launch_cuda(out, input_ids, weight, items, mask, rank, total_rows) -> None:
    if out.numel() == 0:
        return
    single = len(items) == 1
    table = None if single else _item_table(items, out.device)
    torch.ops.ifk.embed_scatter_cuda(
        out, input_ids, weight, items[0] if single else None, table, mask, rank, total_rows
    )


def _check_assign(count_expr: str, total_rows: int, num_placeholders: int) -> None:
    if total_rows != num_placeholders:
        raise ValueError(
            f"Attempted to assign {count_expr} = {total_rows} multimodal tokens to "
            f"{num_placeholders} placeholders"
        )


def _check_data(input_ids, weight, mask, rank, total_rows, count_expr, num_placeholders) -> None:
    """The value checks. With the caller's host ``num_placeholders``: the count only, no device
    read. Otherwise one host sync for the placeholder count (``rank[-1]`` when the kernel's rank
    was computed, else a sum) and, for the fused op, the text-id range; skipped while a CUDA
    graph is being captured."""
    if num_placeholders is not None:
        _check_assign(count_expr, total_rows, num_placeholders)
        return
    if mask.numel() == 0:
        _check_assign(count_expr, total_rows, 0)
        return
    if capturing(mask):
        return
    count = rank[-1] if rank is not None else mask.sum()
    if weight is None:
        _check_assign(count_expr, total_rows, int(count))
        return
    lo_hi = input_ids.masked_fill(mask, 0).aminmax()
    count, lo, hi = torch.stack([count, lo_hi.min, lo_hi.max]).tolist()
    _check_assign(count_expr, total_rows, count)
    if count < mask.shape[0] and (lo < 0 or hi >= weight.shape[0]):  # some text position holds lo or hi
        raise ValueError(
            f"input_ids holds token id {lo if lo < 0 else hi} at a text position, outside the vocabulary "
            f"[0, {weight.shape[0]}) of embedding_weight"
        )


def _check_core(out, input_ids, weight, mask, items) -> None:
    """The metadata the kernels rely on, checked again inside the custom op (under
    ``torch.compile`` the public wrapper's checks run on fake tensors only)."""
    num_tokens, hidden = out.shape
    problems = [
        (mask.dtype != torch.bool or mask.shape != (num_tokens,), "is_multimodal must be a [T] bool tensor"),
        (input_ids is not None and input_ids.shape != (num_tokens,), "input_ids must be [T]"),
        (weight is not None and (weight.dim() != 2 or weight.shape[1] != hidden or weight.dtype != out.dtype
                                 or (hidden > 1 and weight.stride(1) != 1)),
         "embedding_weight must be [V, H] in out's dtype with unit stride along H"),
        (any(it.dim() != 2 or it.shape[1] != hidden or it.dtype != out.dtype or (hidden > 1 and it.stride(1) != 1)
             for it in items), "items must be [rows, H] in out's dtype with unit stride along H"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(f"multimodal_scatter: {message} (out is {list(out.shape)} {out.dtype})")


@destination_op("multimodal_scatter", mutates_args=("out",))
def _multimodal_scatter(
    out: torch.Tensor,
    inputs: list[torch.Tensor | None],
    count_expr: str,
    num_placeholders: int | None,
) -> None:
    """Destination-passing core of the three public ops.

    ``out`` ``[T, H]`` is written (placeholder rows; every row when ``input_ids`` is given);
    ``inputs`` is ``[input_ids [T] | None, embedding_weight [V, H] | None, is_multimodal [T],
    *items [rows_i, H]]``, items already in ``out``'s dtype.
    """
    input_ids, weight, mask, *items = inputs
    _check_core(out, input_ids, weight, mask, items)
    total_rows = sum(item.shape[0] for item in items)
    backend = MULTIMODAL_SCATTER.resolve(out.device, (out.dtype,))
    rank = None if backend == "torch" else torch.cumsum(mask, 0, dtype=torch.int32)
    _check_data(input_ids, weight, mask, rank, total_rows, count_expr, num_placeholders)
    if len(items) > 1 and capturing(out):
        raise ValueError(
            f"multimodal_embeddings: {len(items)} separate items cannot be captured in a CUDA "
            "graph (their pointer table is host data); pass one 3-D or 2-D tensor instead"
        )
    # An input that is a view of out (an item cut from inputs_embeds) would be read while out is
    # written: copy it first, as vLLM's concatenation does.
    items = [it.clone() if overlaps(it, out) else it for it in items]
    if weight is not None and overlaps(weight, out):
        weight = weight.clone()
    if backend == "torch":
        if weight is None:
            merge_multimodal_embeddings_ref(out, items, mask)
        else:
            embed_multimodal_tokens_ref(input_ids, weight, items, mask, out)
        return
    # The kernels need unit stride along H: a column-strided out goes through a buffer.
    work = out
    if out.shape[1] > 1 and out.stride(1) != 1:
        work = _alloc.empty(out.shape, out.dtype, out.device) if weight is not None else out.contiguous()
    launch = _launch_cuda if backend == "cuda" else _launch_triton
    launch(work, input_ids, weight, items, mask, rank, total_rows)
    if work is not out:
        out.copy_(work)



def _scatter(out, input_ids, weight, mask, embeddings: MultiModalItems, num_placeholders) -> None:
    items = flatten_items(embeddings, out.shape[1], out.dtype, out.device)
    _multimodal_scatter(
        out, [input_ids, weight, mask, *items], count_expression(embeddings), check_num_placeholders(num_placeholders)
    )


def merge_multimodal_embeddings(
    input_ids: torch.Tensor,
    inputs_embeds: torch.Tensor,
    multimodal_embeddings: MultiModalItems,
    placeholder_token_id: int | list[int],
    *,
    num_placeholders: int | None = None,
) -> torch.Tensor:
    """Write the multimodal rows into the placeholder positions of ``inputs_embeds``, in place.

    Args:
        input_ids: ``[T]`` int32/int64 token ids.
        inputs_embeds: ``[T, H]`` fp32/fp16/bf16, any strides, written in place at placeholder
            rows only; must not share memory with ``input_ids`` (ValueError).
        multimodal_embeddings: a list/tuple of ``[rows_i, H]`` tensors (any lengths, taken in
            order) or one ``[n, rows, H]`` tensor, in any float dtype (cast to
            ``inputs_embeds.dtype``); an item that is a view of ``inputs_embeds`` is copied first.
        placeholder_token_id: the placeholder id, or a list of them; each must fit ``input_ids``'
            dtype (``ValueError`` otherwise: torch would wrap it onto a text token).
        num_placeholders: the placeholder count when the caller holds it on the host: then the
            count is checked against it without a host sync (see :func:`embed_multimodal_tokens`).

    Returns ``inputs_embeds``. Raises ``ValueError("Attempted to assign 25 + 25 = 50 multimodal
    tokens to 49 placeholders")`` on a count mismatch, leaving ``inputs_embeds`` unchanged.
    Without ``num_placeholders``, syncs with the device once to count the placeholders (as vLLM).

    Example:
        >>> ids = torch.tensor([1, 9, 9, 2]); emb = torch.randn(4, 8)
        >>> merge_multimodal_embeddings(ids, emb, [torch.ones(2, 8)], 9)[1:3].sum().item()
        16.0
    """
    ids = check_ids(input_ids)
    embeds = check_rows("inputs_embeds", inputs_embeds, ids.shape[0], ids.device)
    check_no_overlap("inputs_embeds", embeds, {"input_ids": ids})
    mask = placeholder_mask(ids, placeholder_token_id)
    _scatter(embeds, None, None, mask, multimodal_embeddings, num_placeholders)
    return inputs_embeds


def merge_multimodal_embeddings_by_mask(
    inputs_embeds: torch.Tensor,
    multimodal_embeddings: MultiModalItems,
    is_multimodal: torch.Tensor,
    *,
    num_placeholders: int | None = None,
) -> torch.Tensor:
    """:func:`merge_multimodal_embeddings` with a ``[T]`` bool position mask instead of token ids
    (``is_multimodal`` must not share memory with ``inputs_embeds``: ValueError)."""
    embeds = check_rows("inputs_embeds", inputs_embeds)
    mask = check_mask(is_multimodal, embeds.shape[0], embeds.device)
    check_no_overlap("inputs_embeds", embeds, {"is_multimodal": mask})
    _scatter(embeds, None, None, mask, multimodal_embeddings, num_placeholders)
    return inputs_embeds


def embed_multimodal_tokens(
    input_ids: torch.Tensor,
    embedding_weight: torch.Tensor,
    multimodal_embeddings: MultiModalItems,
    *,
    is_multimodal: torch.Tensor | None = None,
    placeholder_token_id: int | list[int] | None = None,
    out: torch.Tensor | None = None,
    num_placeholders: int | None = None,
) -> torch.Tensor:
    """Fused text-embedding lookup and multimodal scatter: one kernel over every row.

    Args:
        input_ids: ``[T]`` int32/int64. Ids at placeholder positions never index the table,
            so they may lie outside the vocabulary; ids at text positions must be in ``[0, V)``.
        embedding_weight: ``[V, H]`` fp32/fp16/bf16 (copied if strided along H).
        multimodal_embeddings: list/tuple of ``[rows_i, H]`` or one ``[n, rows, H]`` tensor in any
            float dtype, read in place (never concatenated), cast to the table's dtype if they
            differ; an item that is a view of ``out`` is copied first.
        is_multimodal / placeholder_token_id: exactly one says where the placeholders are
            (``[T]`` bool, or an id / list of ids that fit ``input_ids``' dtype).
        out: optional ``[T, H]`` destination in the table's dtype, any strides; must not share memory
            with ``input_ids`` or ``is_multimodal`` (ValueError; the table and the items may: they are
            copied first).
        num_placeholders: the number of placeholders, when the caller already holds it on the
            host (vLLM's scheduler does). Then nothing is read back from the device: the count
            is checked against the items on the host, and text ids are not range-checked (an
            out-of-vocabulary text id gives a zero row instead of an error).

    Returns ``out`` (or a new ``[T, H]`` tensor).

    Launches and syncs on a GPU: by placeholder id, 6 launches (mask, ``cumsum``, 3 for the
    checks, the kernel; a list of items adds a pointer-table copy) and one host sync that checks
    the placeholder count and the text ids (skipped while a CUDA graph is being captured; then a
    surplus of placeholders is left unwritten instead of raising). With ``is_multimodal``,
    ``num_placeholders`` and one item (a 3-D or 2-D tensor): 2 launches (``cumsum``, the
    kernel) and no sync.

    Example:
        >>> w = torch.randn(10, 8); ids = torch.tensor([3, 99, 99, 4])
        >>> embed_multimodal_tokens(ids, w, [torch.zeros(2, 8)], placeholder_token_id=99).shape
        torch.Size([4, 8])
    """
    ids = check_ids(input_ids)
    weight = check_rows("embedding_weight", embedding_weight, device=ids.device)
    if weight.shape[1] > 1 and weight.stride(1) != 1:
        weight = weight.contiguous()
    if (is_multimodal is None) == (placeholder_token_id is None):
        raise ValueError("pass exactly one of is_multimodal and placeholder_token_id")
    if out is None:
        out = _alloc.empty((ids.shape[0], weight.shape[1]), weight.dtype, ids.device)
    else:
        check_rows("out", out, ids.shape[0], ids.device)
        if out.dtype != weight.dtype or out.shape[1] != weight.shape[1]:
            raise ValueError(
                f"out must be [{ids.shape[0]}, {weight.shape[1]}] {weight.dtype}, got "
                f"{list(out.shape)} {out.dtype}"
            )
    if is_multimodal is not None:
        mask = check_mask(is_multimodal, ids.shape[0], ids.device)
    else:
        mask = placeholder_mask(ids, placeholder_token_id)
    check_no_overlap("out", out, {"input_ids": ids, "is_multimodal": mask})
    _scatter(out, ids.contiguous(), weight, mask, multimodal_embeddings, num_placeholders)
    return out
