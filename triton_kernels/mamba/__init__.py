"""Mamba ops: selective scan (prefill, batched or packed with a state cache), the decode state
update, causal conv1d (batched, packed, decode) and the fused mixer (mamba_inner_fn)."""

from triton_kernels.mamba.causal_conv1d import causal_conv1d_fn, causal_conv1d_update, causal_conv1d_varlen
from triton_kernels.mamba.inner import mamba_inner_fn
from triton_kernels.mamba.metadata import MambaVarlenMeta
from triton_kernels.mamba.selective_scan import selective_scan_fn, selective_scan_varlen
from triton_kernels.mamba.state_update import selective_state_update

__all__ = [
    "MambaVarlenMeta",
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "causal_conv1d_varlen",
    "mamba_inner_fn",
    "selective_scan_fn",
    "selective_scan_varlen",
    "selective_state_update",
]
