"""Argument checks shared by every launcher: they read metadata only (no device sync) and raise
``TypeError``/``ValueError`` naming the argument and the bad value before anything is written."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank(s), dtype(s) and device; return it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_names(dtypes)}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like the other inputs")
    return t


def check_optional(name: str, t: object, **kwargs) -> torch.Tensor | None:
    """:func:`check_tensor` for an argument that may be ``None``."""
    return None if t is None else check_tensor(name, t, **kwargs)


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None]) -> None:
    """Check ``t.shape`` against ``expected`` (``None`` matches any size)."""
    shape = tuple(t.shape)
    if shape == tuple(expected):  # the common case, without a per-dim loop (decode calls are short)
        return
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(shape)}")


def check_dim(name: str, t: torch.Tensor, dim: int, size: int, what: str) -> None:
    """Check ``t.shape[dim] == size``, where ``what`` says where ``size`` comes from."""
    if t.shape[dim] != size:
        raise ValueError(f"{name}.shape[{dim}] must equal {what} ({size}), got {t.shape[dim]}")


def strides(t: torch.Tensor | None, dims: int | tuple[int, ...]) -> list[int]:
    """The strides a kernel takes for an optional tensor: ``dims`` an int ``n`` means all ``n`` dims
    (``t`` has rank ``n``), a tuple the listed dims; zeros when ``t`` is ``None`` (the kernel never
    reads it)."""
    dims = tuple(range(dims)) if isinstance(dims, int) else dims
    return [0] * len(dims) if t is None else [t.stride(d) for d in dims]


def unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has unit stride, else a copy that does."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current for a launch (Triton launches on the current CUDA device;
    ``with torch.device(...)`` would only change where new tensors go)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
