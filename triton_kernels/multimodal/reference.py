"""Plain-torch references for the multimodal placeholder scatter (the ``torch`` backend).

They take the validated, flattened form the public ops produce: ``items`` is a list of 2-D
``[rows_i, H]`` tensors already in the output dtype, ``is_multimodal`` a ``[T]`` bool mask whose
count equals the total item rows.
"""

from __future__ import annotations

import torch


def merge_multimodal_embeddings_ref(
    inputs_embeds: torch.Tensor,  # [T, H], written in place
    items: list[torch.Tensor],  # each [rows_i, H]
    is_multimodal: torch.Tensor,  # [T] bool
) -> torch.Tensor:
    """Copy each item's rows to its placeholder positions (``index_copy_``, no concatenation).

    Finding the positions syncs with the device once (``nonzero``): this is the CPU path; CUDA
    tensors take the Triton kernel unless the torch backend is forced.
    """
    positions = is_multimodal.nonzero().squeeze(1)
    start = 0
    for item in items:
        inputs_embeds.index_copy_(0, positions[start : start + item.shape[0]], item)
        start += item.shape[0]
    return inputs_embeds


def embed_multimodal_tokens_ref(
    input_ids: torch.Tensor,  # [T] int
    embedding_weight: torch.Tensor,  # [V, H]
    items: list[torch.Tensor],  # each [rows_i, H]
    is_multimodal: torch.Tensor,  # [T] bool
    out: torch.Tensor,  # [T, H], written
) -> torch.Tensor:
    """Embedding lookup for text positions (placeholder ids never index the table), then scatter.

    A text id outside ``[0, V)`` (possible only when the op's data checks were skipped) gives a
    zero row, as in the kernels.
    """
    bad = ~is_multimodal & ((input_ids < 0) | (input_ids >= embedding_weight.shape[0]))
    safe_ids = input_ids.masked_fill(is_multimodal | bad, 0)
    if embedding_weight.shape[0] == 0:  # an empty table: nothing to gather, no index is valid
        out.zero_()
    elif out.is_contiguous():
        torch.index_select(embedding_weight, 0, safe_ids, out=out)
    else:
        out.copy_(embedding_weight.index_select(0, safe_ids))
    if bad.any():
        out[bad] = 0
    return merge_multimodal_embeddings_ref(out, items, is_multimodal)
