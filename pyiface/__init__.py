"""The model-facing side: vLLM's optional interfaces, their predicates, and the dispatch that
turns a model's flags into kernels, state and an execution path."""

from pyiface.dispatch import KernelPlan, plan
from pyiface.interfaces import (
    HasInnerState,
    InterfaceWarning,
    IsAttentionFree,
    IsHybrid,
    MultiModalEmbeddings,
    QuantizationConfig,
    SupportsCrossEncoding,
    SupportsLoRA,
    SupportsMultiModal,
    SupportsPP,
    SupportsQuant,
    SupportsTranscription,
    SupportsV0Only,
    has_inner_state,
    is_attention_free,
    is_hybrid,
    supports_cross_encoding,
    supports_lora,
    supports_multimodal,
    supports_pp,
    supports_quant,
    supports_transcription,
    supports_v0_only,
)
from pyiface.intermediate_tensors import IntermediateTensors, PPMissingLayer, make_empty_intermediate_tensors_factory
from pyiface.mamba_cache import MambaCache
from pyiface.multimodal import MultiModalEmbedder
from pyiface.pipeline import make_layers, pp_layer_range

__all__ = [
    "HasInnerState",
    "InterfaceWarning",
    "IntermediateTensors",
    "IsAttentionFree",
    "IsHybrid",
    "KernelPlan",
    "MambaCache",
    "MultiModalEmbedder",
    "MultiModalEmbeddings",
    "PPMissingLayer",
    "QuantizationConfig",
    "SupportsCrossEncoding",
    "SupportsLoRA",
    "SupportsMultiModal",
    "SupportsPP",
    "SupportsQuant",
    "SupportsTranscription",
    "SupportsV0Only",
    "has_inner_state",
    "is_attention_free",
    "is_hybrid",
    "make_empty_intermediate_tensors_factory",
    "make_layers",
    "plan",
    "pp_layer_range",
    "supports_cross_encoding",
    "supports_lora",
    "supports_multimodal",
    "supports_pp",
    "supports_quant",
    "supports_transcription",
    "supports_v0_only",
]
