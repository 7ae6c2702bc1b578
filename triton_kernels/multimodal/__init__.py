"""Multimodal placeholder scatter ops."""

from triton_kernels.multimodal._args import placeholder_mask
from triton_kernels.multimodal.scatter import (
    embed_multimodal_tokens,
    merge_multimodal_embeddings,
    merge_multimodal_embeddings_by_mask,
)

__all__ = [
    "embed_multimodal_tokens",
    "merge_multimodal_embeddings",
    "merge_multimodal_embeddings_by_mask",
    "placeholder_mask",
]
