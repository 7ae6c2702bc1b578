"""Multi-LoRA building blocks handed to ``SupportsLoRA`` models: adapter weight slots, the batch
wrapper (per-step token -> slot metadata), LoRA-enabled layers and the helper that installs them."""

from pyiface.lora.layers import LoRAEmbedding, LoRALinear, LoRALogits
from pyiface.lora.model import LoRAModules, apply_lora, peft_lora_weights
from pyiface.lora.slots import LoRAEmbeddingSlots, LoRASlots
from pyiface.lora.wrapper import LoRABatchWrapper

__all__ = [
    "LoRABatchWrapper",
    "LoRAEmbedding",
    "LoRAEmbeddingSlots",
    "LoRALinear",
    "LoRALogits",
    "LoRAModules",
    "LoRASlots",
    "apply_lora",
    "peft_lora_weights",
]
