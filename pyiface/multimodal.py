"""The multimodal embedder a plan hands to multimodal models: text lookup and multimodal scatter
in one kernel (see :func:`triton_kernels.embed_multimodal_tokens` for its launches and syncs)."""

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
    num_placeholders: int | None = None,
    owner: str = "embed_with_placeholders",
) -> torch.Tensor:
    """``[T, H]`` embeddings of ``input_ids [T]`` from ``weight [V, H]``, with the multimodal rows
    at the placeholders (the ``is_multimodal`` mask, else ``placeholder_token_id``).

    Without items (``None`` or empty) this is a plain lookup, as in vLLM; otherwise the fused op
    (``num_placeholders``, a count the caller holds on the host, skips its host sync). Raises
    ``ValueError`` (prefixed with ``owner``) when items come with neither locator.
    """
    if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
        return torch.nn.functional.embedding(input_ids, weight)
    if is_multimodal is None and placeholder_token_id is None:
        raise ValueError(
            f"{owner}: pass is_multimodal or set placeholder_token_id to say where the multimodal embeddings go"
        )
    return embed_multimodal_tokens(
        input_ids, weight, multimodal_embeddings, is_multimodal=is_multimodal,
        placeholder_token_id=placeholder_token_id if is_multimodal is None else None,
        num_placeholders=num_placeholders,
    )


class MultiModalEmbedder(nn.Module):
    """Token embedding with multimodal rows scattered into the placeholder positions.

    Wraps the model's ``nn.Embedding`` (weights shared, not copied; ``max_norm`` is refused: the
    fused kernel reads the table as it is and would not renormalise rows). ``forward(input_ids[T],
    multimodal_embeddings=None, is_multimodal=None, num_placeholders=None) -> [T, H]``: text rows
    from the table, placeholder rows (``placeholder_token_id``, an int or list, or the given
    ``is_multimodal`` mask) from the items, in one kernel that never reads the table at
    placeholders. Without items (``None`` or empty) it is the plain embedding of every id.

    ``validated`` (what ``plan()`` sets for ``SupportsV0Only`` models, the eager validated path):
    the placeholder count and the text ids are always checked against the data (one host sync),
    and a ``num_placeholders`` the caller passes is not trusted. Otherwise (the graph-safe fast
    path) a ``num_placeholders`` from the caller replaces that sync.
    """

    def __init__(self, embedding: nn.Embedding, placeholder_token_id: int | list[int], *, validated: bool = False):
        super().__init__()
        if not isinstance(embedding, nn.Embedding) or embedding.max_norm is not None:
            raise TypeError(f"embedding must be an nn.Embedding without max_norm, got {embedding!r}")
        self.embedding = embedding
        self.placeholder_token_id = placeholder_token_id
        self.validated = validated

    def forward(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: torch.Tensor | list[torch.Tensor] | None = None,
        is_multimodal: torch.Tensor | None = None,
        num_placeholders: int | None = None,
    ) -> torch.Tensor:
        return embed_with_placeholders(
            input_ids, self.embedding.weight, multimodal_embeddings, is_multimodal=is_multimodal,
            placeholder_token_id=self.placeholder_token_id,
            num_placeholders=None if self.validated else num_placeholders, owner=type(self).__name__,
        )
