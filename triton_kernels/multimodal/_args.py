"""Argument checks and normalisation shared by the multimodal scatter ops (metadata only: no
host sync). Each raises ``TypeError``/``ValueError`` naming the argument before anything is
written."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from triton_kernels._checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, unit_stride_last

MultiModalItems = torch.Tensor | Sequence[torch.Tensor]

# Items may come in any float dtype the target can be cast from (float64 from a numpy pipeline).
ITEM_DTYPES = (*FLOAT_DTYPES, torch.float64)


def count_expression(embeddings: MultiModalItems) -> str:
    """vLLM's wording for how many rows the items hold: ``25 + 25`` or ``7 x 256``."""
    if isinstance(embeddings, torch.Tensor):
        return " x ".join(str(d) for d in embeddings.shape[:-1])
    return " + ".join(count_expression(inner) for inner in embeddings)


def flatten_items(
    embeddings: MultiModalItems, hidden: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Validate the items and return them as 2-D ``[rows, H]`` tensors in ``dtype``.

    A 3-D tensor becomes one item (a view where its strides allow); items in another float
    dtype (float64 included) are cast; an item whose hidden dim is strided is copied. Nested
    lists are walked in order; items with no rows are dropped.
    """
    flat: list[torch.Tensor] = []

    def visit(obj: object, name: str) -> None:
        if isinstance(obj, (list, tuple)):
            for i, inner in enumerate(obj):
                visit(inner, f"{name}[{i}]")
            return
        check_tensor(name, obj, ndim=(2, 3), dtypes=ITEM_DTYPES, device=device)
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


def check_ids(input_ids: object, device: torch.device | None = None) -> torch.Tensor:
    return check_tensor("input_ids", input_ids, ndim=1, dtypes=INDEX_DTYPES, device=device)


def check_rows(
    name: str, t: object, num_tokens: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """A 2-D float tensor (any strides: the op copies a column-strided one) with ``num_tokens``
    rows when given."""
    check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    if num_tokens is not None and t.shape[0] != num_tokens:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {num_tokens} (one per token)")
    return t


def check_mask(is_multimodal: object, num_tokens: int, device: torch.device) -> torch.Tensor:
    check_tensor("is_multimodal", is_multimodal, ndim=1, dtypes=(torch.bool,), device=device)
    if is_multimodal.shape[0] != num_tokens:
        raise ValueError(f"is_multimodal has {is_multimodal.shape[0]} entries, expected {num_tokens}")
    return is_multimodal.contiguous()


def check_num_placeholders(num_placeholders: object) -> int | None:
    if num_placeholders is not None and (
        isinstance(num_placeholders, bool) or not isinstance(num_placeholders, int) or num_placeholders < 0
    ):
        raise TypeError(f"num_placeholders must be None or an int >= 0, got {num_placeholders!r}")
    return num_placeholders


def _placeholder_ids(placeholder_token_id: object, dtype: torch.dtype) -> list[int]:
    """The placeholder ids as a list, each representable in the ids' ``dtype``.

    An id no ``dtype`` value can equal (``2**32 + 2`` for int32 ids) is refused rather than
    compared: torch would wrap it to a text token (``2``) and overwrite that row.
    """
    ids = [placeholder_token_id] if isinstance(placeholder_token_id, int) else placeholder_token_id
    if (
        isinstance(placeholder_token_id, bool)
        or not isinstance(ids, (list, tuple))
        or not ids
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
    ):
        raise TypeError(
            f"placeholder_token_id must be an int or a non-empty list of ints, got {placeholder_token_id!r}"
        )
    info = torch.iinfo(dtype)
    for t in ids:
        if not info.min <= t <= info.max:
            raise ValueError(
                f"placeholder_token_id {t} is outside the range [{info.min}, {info.max}] of input_ids' "
                f"dtype {dtype}: no token id can equal it (pass int64 ids, or fix the id)"
            )
    return list(ids)


def placeholder_mask(input_ids: torch.Tensor, placeholder_token_id: int | Sequence[int]) -> torch.Tensor:
    """``[T]`` bool: where ``input_ids`` equals the placeholder id (or one of the list).

    One comparison launch for a single id; a list becomes one small host-to-device copy and an
    ``isin``. Raises ``ValueError`` for an id outside the ids' dtype range (see above).
    """
    ids = _placeholder_ids(placeholder_token_id, input_ids.dtype)
    if len(ids) == 1:
        return input_ids == ids[0]
    return torch.isin(input_ids, torch.tensor(ids, dtype=input_ids.dtype, device=input_ids.device))
