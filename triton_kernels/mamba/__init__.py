"""Mamba ops: selective scan (prefill, batched or packed with a state cache)."""

from triton_kernels.mamba.selective_scan import selective_scan_fn, selective_scan_varlen

__all__ = ["selective_scan_fn", "selective_scan_varlen"]
