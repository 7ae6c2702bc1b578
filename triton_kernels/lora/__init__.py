"""Multi-LoRA batched matmul: vLLM-compatible shrink/expand, the fused path, and training."""

from triton_kernels.lora.fused import add_lora_linear, lora_linear
from triton_kernels.lora.meta import LoRAKernelMeta
from triton_kernels.lora.shrink_expand import lora_expand, lora_shrink

__all__ = ["LoRAKernelMeta", "add_lora_linear", "lora_expand", "lora_linear", "lora_shrink"]
