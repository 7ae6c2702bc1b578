"""The multimodal embedder a plan hands to multimodal models: one fused launch per step."""

from __future__ import annotations

import torch
import torch.nn as nn

from triton_kernels import embed_multimodal_tokens


def embed_with_placeholders(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    multimodal_embeddings: torch.Tensor | list[torch.Tensor] | None,
    *,
    is_multimodal: torch.Tensor | None = None,
    placeholder_token_id: int | list[int] | None = None,
    owner: str = "embed_with_placeholders",
) -> torch.Tensor:
    """``[T, H]`` embeddings of ``input_ids [T]`` from ``weight [V, H]``, with the multimodal rows
    at the placeholders (the ``is_multimodal`` mask, else ``placeholder_token_id``).

    Without items (``None`` or empty) this is a plain lookup, as in vLLM; otherwise one fused
    launch. Raises ``ValueError`` (prefixed with ``owner``) when items come with neither locator.
    """
    if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
        return torch.nn.functional.embedding(input_ids, weight)
    if is_multimodal is not None:
        return embed_multimodal_tokens(input_ids, weight, multimodal_embeddings, is_multimodal=is_multimodal)
    if placeholder_token_id is None:
        raise ValueError(
            f"{owner}: pass is_multimodal or set placeholder_token_id to say where the multimodal embeddings go"
        )
    return embed_multimodal_tokens(
        input_ids, weight, multimodal_embeddings, placeholder_token_id=placeholder_token_id
    )


class MultiModalEmbedder(nn.Module):
    """Token embedding with multimodal rows scattered into the placeholder positions.

    Wraps the model's ``nn.Embedding`` (weights shared, not copied). ``forward(input_ids[T],
    multimodal_embeddings=None, is_multimodal=None) -> [T, H]``: text rows from the table,
    placeholder rows (``placeholder_token_id``, an int or list, or the given ``is_multimodal``
    mask) from the items, in one kernel launch that never reads the table at placeholders.
    Without items (``None`` or empty) it is the plain embedding of every id.
    """

    def __init__(self, embedding: nn.Embedding, placeholder_token_id: int | list[int]):
        super().__init__()
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        self.embedding = embedding
        self.placeholder_token_id = placeholder_token_id

    def forward(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: torch.Tensor | list[torch.Tensor] | None = None,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return embed_with_placeholders(
            input_ids, self.embedding.weight, multimodal_embeddings, is_multimodal=is_multimodal,
            placeholder_token_id=self.placeholder_token_id, owner=type(self).__name__,
        )
