"""Mamba-2 ops: the gated RMSNorm that ends every Mamba-2 block."""

from triton_kernels.mamba2.rms_norm_gated import rms_norm_gated

__all__ = ["rms_norm_gated"]
