"""Mamba-2 ops: the SSD chunked scan (prefill), batched (mamba_ssm) or packed with a state cache."""

from triton_kernels.mamba2.ssd import mamba_chunk_scan_combined, mamba_chunk_scan_varlen

__all__ = ["mamba_chunk_scan_combined", "mamba_chunk_scan_varlen"]
