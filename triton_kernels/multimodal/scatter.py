"""Multimodal placeholder scatter: write image/audio embedding rows into placeholder positions.

One kernel serves all three public ops. Each program copies one row block: a placeholder row
takes the next row of the multimodal items (found by its rank among the placeholders), a text
row is either left alone (merge) or gathered from the embedding table (fused embed). Items are
read where they lie, through a small device table of base pointers, row starts and row strides,
so a list of items is never concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from triton_kernels._checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, on_device, unit_stride_last
from triton_kernels.multimodal.reference import embed_multimodal_tokens_ref, merge_multimodal_embeddings_ref
from triton_kernels.registry import MULTIMODAL_SCATTER

MultiModalItems = torch.Tensor | Sequence[torch.Tensor]


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
        if row < total_rows:  # always true once counts were checked; guards unchecked capture
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
        tl.store(p_out, tl.load(weight_ptr + token * stride_w_v + o_h, mask=m_h), mask=m_h)


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


def _check_counts_and_ids(input_ids, weight, total_rows, mask, count_expr) -> None:
    """The data-dependent checks: one host sync, skipped while a CUDA graph is being captured."""
    if mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if weight is None or mask.numel() == 0:
        num_placeholders, lo, hi = int(mask.sum()), 0, 0
    else:
        lo_hi = input_ids.masked_fill(mask, 0).aminmax()
        num_placeholders, lo, hi = torch.stack([mask.sum(), lo_hi.min, lo_hi.max]).tolist()
    if total_rows != num_placeholders:
        raise ValueError(
            f"Attempted to assign {count_expr} = {total_rows} multimodal tokens to "
            f"{num_placeholders} placeholders"
        )
    if weight is not None and (lo < 0 or hi >= weight.shape[0]):
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"input_ids holds token id {bad} at a text position, outside the vocabulary "
            f"[0, {weight.shape[0]}) of embedding_weight"
        )


@torch.library.custom_op("ifk::multimodal_scatter", mutates_args=("out",))
def _multimodal_scatter(
    out: torch.Tensor,
    input_ids: torch.Tensor | None,
    weight: torch.Tensor | None,
    items: list[torch.Tensor],
    is_multimodal: torch.Tensor,
    count_expr: str,
) -> None:
    """Destination-passing core of the three public ops (inputs already validated)."""
    total_rows = sum(item.shape[0] for item in items)
    _check_counts_and_ids(input_ids, weight, total_rows, is_multimodal, count_expr)
    if len(items) > 1 and out.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError(
            f"multimodal_embeddings: {len(items)} separate items cannot be captured in a CUDA "
            "graph (their pointer table is host data); pass one 3-D or 2-D tensor instead"
        )
    backend = MULTIMODAL_SCATTER.resolve(out.device)
    if backend == "torch":
        if weight is None:
            merge_multimodal_embeddings_ref(out, items, is_multimodal)
        else:
            embed_multimodal_tokens_ref(input_ids, weight, items, is_multimodal, out)
        return
    rank = torch.cumsum(is_multimodal, 0, dtype=torch.int32)
    launch = _launch_cuda if backend == "cuda" else _launch_triton
    launch(out, input_ids, weight, items, is_multimodal, rank, total_rows)


@_multimodal_scatter.register_fake
def _(out, input_ids, weight, items, is_multimodal, count_expr) -> None:
    return None


def _count_expression(embeddings: MultiModalItems) -> str:
    """vLLM's wording for how many rows the items hold: ``25 + 25`` or ``7 x 256``."""
    if isinstance(embeddings, torch.Tensor):
        return " x ".join(str(d) for d in embeddings.shape[:-1])
    return " + ".join(_count_expression(inner) for inner in embeddings)


def _flatten_items(
    embeddings: MultiModalItems, hidden: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Validate the items and return them as 2-D ``[rows, H]`` tensors in ``dtype``.

    A 3-D tensor becomes one item (a view where its strides allow); items in another dtype are
    cast; an item whose hidden dim is strided is copied. Nested lists are walked in order.
    """
    flat: list[torch.Tensor] = []

    def visit(obj: object, name: str) -> None:
        if isinstance(obj, (list, tuple)):
            for i, inner in enumerate(obj):
                visit(inner, f"{name}[{i}]")
            return
        check_tensor(name, obj, ndim=(2, 3), dtypes=FLOAT_DTYPES, device=device)
        if obj.shape[-1] != hidden:
            raise ValueError(f"{name} has hidden size {obj.shape[-1]}, expected {hidden} (inputs)")
        rows = obj.reshape(-1, hidden).to(dtype)
        if rows.shape[0]:
            flat.append(unit_stride_last(rows))

    if not isinstance(embeddings, (torch.Tensor, list, tuple)):
        raise TypeError(
            "multimodal_embeddings must be a tensor or a list/tuple of tensors, got "
            f"{type(embeddings).__name__}"
        )
    visit(embeddings, "multimodal_embeddings")
    return flat


def _check_ids(input_ids: object, device: torch.device | None = None) -> torch.Tensor:
    return check_tensor("input_ids", input_ids, ndim=1, dtypes=INDEX_DTYPES, device=device)


def _check_embeds(name: str, embeds: object, num_tokens: int, device: torch.device) -> torch.Tensor:
    check_tensor(name, embeds, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    if embeds.shape[0] != num_tokens:
        raise ValueError(f"{name} has {embeds.shape[0]} rows, expected {num_tokens} (one per token)")
    if embeds.shape[1] > 1 and embeds.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along the hidden dim, got strides {embeds.stride()}")
    return embeds


def _placeholder_mask(input_ids: torch.Tensor, placeholder_token_id: int | Sequence[int]) -> torch.Tensor:
    if isinstance(placeholder_token_id, bool) or not isinstance(placeholder_token_id, (int, list, tuple)):
        raise TypeError(f"placeholder_token_id must be an int or a list of ints, got {placeholder_token_id!r}")
    if isinstance(placeholder_token_id, int):
        return input_ids == placeholder_token_id
    if not placeholder_token_id or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in placeholder_token_id
    ):
        raise TypeError(f"placeholder_token_id must be a non-empty list of ints, got {placeholder_token_id!r}")
    ids = torch.tensor(list(placeholder_token_id), dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, ids)


def _check_mask(is_multimodal: object, num_tokens: int, device: torch.device) -> torch.Tensor:
    check_tensor("is_multimodal", is_multimodal, ndim=1, dtypes=(torch.bool,), device=device)
    if is_multimodal.shape[0] != num_tokens:
        raise ValueError(f"is_multimodal has {is_multimodal.shape[0]} entries, expected {num_tokens}")
    return is_multimodal.contiguous()


def merge_multimodal_embeddings(
    input_ids: torch.Tensor,
    inputs_embeds: torch.Tensor,
    multimodal_embeddings: MultiModalItems,
    placeholder_token_id: int | list[int],
) -> torch.Tensor:
    """Write the multimodal rows into the placeholder positions of ``inputs_embeds``, in place.

    Args:
        input_ids: ``[T]`` int32/int64 token ids.
        inputs_embeds: ``[T, H]`` fp32/fp16/bf16, written in place at placeholder rows only.
        multimodal_embeddings: a list/tuple of ``[rows_i, H]`` tensors (any lengths, taken in
            order) or one ``[n, rows, H]`` tensor; cast to ``inputs_embeds.dtype``.
        placeholder_token_id: the placeholder id, or a list of them.

    Returns ``inputs_embeds``. Raises ``ValueError("Attempted to assign 25 + 25 = 50 multimodal
    tokens to 49 placeholders")`` on a count mismatch, leaving ``inputs_embeds`` unchanged.
    Syncs with the device once, to count the placeholders (vLLM does the same).

    Example:
        >>> ids = torch.tensor([1, 9, 9, 2]); emb = torch.randn(4, 8)
        >>> merge_multimodal_embeddings(ids, emb, [torch.ones(2, 8)], 9)[1:3].sum().item()
        16.0
    """
    ids = _check_ids(input_ids)
    embeds = _check_embeds("inputs_embeds", inputs_embeds, ids.shape[0], ids.device)
    items = _flatten_items(multimodal_embeddings, embeds.shape[1], embeds.dtype, embeds.device)
    mask = _placeholder_mask(ids, placeholder_token_id)
    torch.ops.ifk.multimodal_scatter(embeds, None, None, items, mask, _count_expression(multimodal_embeddings))
    return inputs_embeds


def merge_multimodal_embeddings_by_mask(
    inputs_embeds: torch.Tensor,
    multimodal_embeddings: MultiModalItems,
    is_multimodal: torch.Tensor,
) -> torch.Tensor:
    """:func:`merge_multimodal_embeddings` with a ``[T]`` bool position mask instead of token ids."""
    check_tensor("inputs_embeds", inputs_embeds, ndim=2, dtypes=FLOAT_DTYPES)
    mask = _check_mask(is_multimodal, inputs_embeds.shape[0], inputs_embeds.device)
    embeds = _check_embeds("inputs_embeds", inputs_embeds, mask.shape[0], mask.device)
    items = _flatten_items(multimodal_embeddings, embeds.shape[1], embeds.dtype, embeds.device)
    torch.ops.ifk.multimodal_scatter(embeds, None, None, items, mask, _count_expression(multimodal_embeddings))
    return inputs_embeds


def embed_multimodal_tokens(
    input_ids: torch.Tensor,
    embedding_weight: torch.Tensor,
    multimodal_embeddings: MultiModalItems,
    *,
    is_multimodal: torch.Tensor | None = None,
    placeholder_token_id: int | list[int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused text-embedding lookup and multimodal scatter in one launch.

    Args:
        input_ids: ``[T]`` int32/int64. Ids at placeholder positions never index the table,
            so they may lie outside the vocabulary; ids at text positions must be in ``[0, V)``.
        embedding_weight: ``[V, H]`` fp32/fp16/bf16 (unit stride along H).
        multimodal_embeddings: list/tuple of ``[rows_i, H]`` or one ``[n, rows, H]`` tensor,
            read in place (never concatenated), cast to the table's dtype if they differ.
        is_multimodal / placeholder_token_id: exactly one says where the placeholders are.
        out: optional ``[T, H]`` destination in the table's dtype.

    Returns ``out`` (or a new ``[T, H]`` tensor). Checks the placeholder count and the text ids
    with one host sync, skipped while a CUDA graph is being captured (then a surplus of
    placeholders is left unwritten instead of raising).

    Example:
        >>> w = torch.randn(10, 8); ids = torch.tensor([3, 99, 99, 4])
        >>> embed_multimodal_tokens(ids, w, [torch.zeros(2, 8)], placeholder_token_id=99).shape
        torch.Size([4, 8])
    """
    ids = _check_ids(input_ids)
    weight = check_tensor("embedding_weight", embedding_weight, ndim=2, dtypes=FLOAT_DTYPES, device=ids.device)
    if weight.shape[1] > 1 and weight.stride(1) != 1:
        weight = weight.contiguous()
    if (is_multimodal is None) == (placeholder_token_id is None):
        raise ValueError("pass exactly one of is_multimodal and placeholder_token_id")
    if is_multimodal is not None:
        mask = _check_mask(is_multimodal, ids.shape[0], ids.device)
    else:
        mask = _placeholder_mask(ids, placeholder_token_id)
    if out is None:
        out = torch.empty((ids.shape[0], weight.shape[1]), dtype=weight.dtype, device=ids.device)
    else:
        _check_embeds("out", out, ids.shape[0], ids.device)
        if out.dtype != weight.dtype or out.shape[1] != weight.shape[1]:
            raise ValueError(
                f"out must be [{ids.shape[0]}, {weight.shape[1]}] {weight.dtype}, got "
                f"{list(out.shape)} {out.dtype}"
            )
    items = _flatten_items(multimodal_embeddings, weight.shape[1], weight.dtype, weight.device)
    torch.ops.ifk.multimodal_scatter(
        out, ids.contiguous(), weight, items, mask, _count_expression(multimodal_embeddings)
    )
    return out
