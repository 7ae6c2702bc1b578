"""Mamba-2 ops: the SSD chunked scan (prefill), batched (mamba_ssm) or packed with a state cache, and the
gated RMSNorm that ends every Mamba-2 block. The decode step is ``triton_kernels.selective_state_update``
in its heads form."""

from triton_kernels.mamba2.rms_norm_gated import rms_norm_gated
from triton_kernels.mamba2.split_conv1d_scan import mamba_split_conv1d_scan_combined
from triton_kernels.mamba2.ssd import mamba_chunk_scan_combined, mamba_chunk_scan_varlen

__all__ = ["mamba_chunk_scan_combined", "mamba_chunk_scan_varlen", "mamba_split_conv1d_scan_combined", "rms_norm_gated"]
