"""The multimodal embedder a plan hands to multimodal models: one fused launch per step."""

from __future__ import annotations

import torch
import torch.nn as nn

from triton_kernels import embed_multimodal_tokens


class MultiModalEmbedder(nn.Module):
    """Token embedding with multimodal rows scattered into the placeholder positions.

    Wraps the model's ``nn.Embedding`` (weights shared, not copied). ``forward(input_ids[T],
    multimodal_embeddings=None, is_multimodal=None) -> [T, H]``: text rows from the table,
    placeholder rows (``placeholder_token_id``, an int or list, or the given ``is_multimodal``
    mask) from the items, in one kernel launch that never reads the table at placeholders.
    With ``multimodal_embeddings=None`` it is the plain embedding of every id.
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
        if multimodal_embeddings is None:  # text only (vLLM's profiling and text prompts)
            return self.embedding(input_ids)
        weight = self.embedding.weight
        if is_multimodal is not None:
            return embed_multimodal_tokens(input_ids, weight, multimodal_embeddings, is_multimodal=is_multimodal)
        return embed_multimodal_tokens(
            input_ids, weight, multimodal_embeddings, placeholder_token_id=self.placeholder_token_id
        )
