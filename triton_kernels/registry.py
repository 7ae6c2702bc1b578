"""The one registry of public op families: each declared once as an :class:`~triton_kernels.backend.Op`
constant (never a free string), with its reference and the native kernels behind its backends.

Launchers call ``OP.resolve(device, dtypes)``; ``pyiface.dispatch.plan`` reports the same; tests and
benchmarks iterate :data:`OPS`. A family added later declares its ops here.

Custom-op schema convention (every family): ``ifk::<name>(<outputs, mutated>, <inputs: one
list[Tensor | None]>, <scalars>) -> ()``. One list of inputs instead of one argument each: the
custom-op dispatcher re-reads the schema in Python once per argument on every call.
"""

from __future__ import annotations

from triton_kernels.backend import Op

MULTIMODAL_SCATTER = Op(
    "multimodal_scatter",
    reference="triton_kernels.multimodal.reference:embed_multimodal_tokens_ref",
    native={"cuda": "multimodal_cuda"},
)
LORA_SHRINK = Op("lora_shrink", reference="triton_kernels.lora.reference:lora_shrink_ref")
LORA_EXPAND = Op("lora_expand", reference="triton_kernels.lora.reference:lora_expand_ref")
ADD_LORA_LINEAR = Op("add_lora_linear", reference="triton_kernels.lora.fused_torch:add_lora_linear_batched")
SELECTIVE_SCAN = Op(
    "selective_scan",
    reference="triton_kernels.mamba.ops_torch:selective_scan_ref",
    native={"cpu": "mamba_cpu"},
)
SELECTIVE_STATE_UPDATE = Op(
    "selective_state_update", reference="triton_kernels.mamba.ops_torch:selective_state_update_ref"
)
CAUSAL_CONV1D = Op("causal_conv1d", reference="triton_kernels.mamba.ops_torch:causal_conv1d_fn_ref")
CAUSAL_CONV1D_VARLEN = Op(
    "causal_conv1d_varlen", reference="triton_kernels.mamba.ops_torch:causal_conv1d_varlen_ref"
)
CAUSAL_CONV1D_UPDATE = Op(
    "causal_conv1d_update", reference="triton_kernels.mamba.ops_torch:causal_conv1d_update_ref"
)
RMS_NORM_GATED = Op("rms_norm_gated", reference="triton_kernels.mamba2.rms_norm_gated:rms_norm_gated_ref")
MAMBA_CHUNK_SCAN = Op("mamba_chunk_scan", reference="triton_kernels.mamba2.ssd_torch:ssd_core_torch")

OPS: dict[str, Op] = {op.name: op for op in (
    MULTIMODAL_SCATTER,
    LORA_SHRINK,
    LORA_EXPAND,
    ADD_LORA_LINEAR,
    SELECTIVE_SCAN,
    SELECTIVE_STATE_UPDATE,
    CAUSAL_CONV1D,
    CAUSAL_CONV1D_VARLEN,
    CAUSAL_CONV1D_UPDATE,
    RMS_NORM_GATED,
    MAMBA_CHUNK_SCAN,
)}
