"""Triton kernels for vLLM-style model interfaces: multimodal scatter, multi-LoRA, Mamba.

Every op has a Triton kernel, a plain-torch reference and, where it wins, a csrc kernel; see
:mod:`triton_kernels.backend` for how one is chosen.
"""

from triton_kernels.backend import BackendUnavailableError, use_backend
from triton_kernels.constants import PAD_SLOT_ID
from triton_kernels.lora import LoRAKernelMeta, add_lora_linear, lora_expand, lora_linear, lora_shrink
from triton_kernels.mamba import (
    MambaVarlenMeta,
    causal_conv1d_fn,
    causal_conv1d_update,
    causal_conv1d_varlen,
    mamba_inner_fn,
    selective_scan_fn,
    selective_scan_varlen,
    selective_state_update,
)
from triton_kernels.mamba2 import (
    mamba_chunk_scan_combined,
    mamba_chunk_scan_varlen,
    mamba_split_conv1d_scan_combined,
    rms_norm_gated,
)
from triton_kernels.multimodal import (
    embed_multimodal_tokens,
    merge_multimodal_embeddings,
    merge_multimodal_embeddings_by_mask,
)

__all__ = [
    "PAD_SLOT_ID",
    "BackendUnavailableError",
    "LoRAKernelMeta",
    "MambaVarlenMeta",
    "add_lora_linear",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "causal_conv1d_varlen",
    "embed_multimodal_tokens",
    "lora_expand",
    "lora_linear",
    "lora_shrink",
    "mamba_chunk_scan_combined",
    "mamba_chunk_scan_varlen",
    "mamba_inner_fn",
    "mamba_split_conv1d_scan_combined",
    "merge_multimodal_embeddings",
    "merge_multimodal_embeddings_by_mask",
    "rms_norm_gated",
    "selective_scan_fn",
    "selective_scan_varlen",
    "selective_state_update",
    "use_backend",
]
