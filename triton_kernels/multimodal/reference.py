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
    """vLLM's path: ``masked_scatter_`` of the concatenated items into the placeholder rows."""
    if items:
        flat = torch.cat(items) if len(items) > 1 else items[0]
        inputs_embeds.masked_scatter_(is_multimodal.unsqueeze(-1), flat)
    return inputs_embeds


def embed_multimodal_tokens_ref(
    input_ids: torch.Tensor,  # [T] int
    embedding_weight: torch.Tensor,  # [V, H]
    items: list[torch.Tensor],  # each [rows_i, H]
    is_multimodal: torch.Tensor,  # [T] bool
    out: torch.Tensor,  # [T, H], written
) -> torch.Tensor:
    """Embedding lookup for text positions (placeholder ids never index the table), then scatter."""
    safe_ids = input_ids.masked_fill(is_multimodal, 0)
    out.copy_(embedding_weight.index_select(0, safe_ids))
    return merge_multimodal_embeddings_ref(out, items, is_multimodal)
