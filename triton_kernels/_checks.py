"""Argument checks shared by every launcher: they read metadata only (no device sync) and raise
``TypeError``/``ValueError`` naming the argument and the bad value before anything is written."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The differentiable ops also take float64, which runs on their torch backend (torch.autograd.gradcheck).
GRAD_DTYPES = (*FLOAT_DTYPES, torch.float64)
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


def _byte_span(t: torch.Tensor) -> tuple[int, int] | None:
    """(first address, one past the last) of the bytes ``t`` can touch (torch strides are never
    negative); None when empty. Addresses, not storages: two storages over one buffer overlap too."""
    if t.numel() == 0:
        return None
    first = t.data_ptr()
    return first, first + (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1) * t.element_size()


def check_no_overlap(name: str, written: torch.Tensor, others: dict[str, torch.Tensor | None]) -> None:
    """Raise unless ``written`` (an output or a state written in place) shares no memory with any of
    ``others``: a kernel writing one while reading the other would race on a GPU. Byte ranges are
    compared, so two interleaved views of one buffer (``a[::2]``, ``a[1::2]``) count as overlapping.
    Skipped while tracing under ``torch.compile`` (fake tensors have no addresses)."""
    if torch.compiler.is_compiling():
        return
    for other_name, other in others.items():
        if other is not None and overlaps(written, other):
            raise ValueError(f"{name} overlaps {other_name} in memory; pass a separate tensor for {name}")


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` may share memory: intersecting address ranges (conservative for
    interleaved strides, exact for row blocks)."""
    span_a, span_b = _byte_span(a), _byte_span(b)
    return span_a is not None and span_b is not None and span_a[0] < span_b[1] and span_b[0] < span_a[1]


def check_distinct_rows(name: str, t: torch.Tensor) -> None:
    """Raise unless no two elements of ``t`` share memory (a state cache made with ``expand``, stride 0,
    would have several slots write one location)."""
    if torch.compiler.is_compiling() or t.numel() <= 1:
        return
    if torch._debug_has_internal_overlap(t) == 0 or _strides_nest(t):  # torch's 2 is "too hard to tell"
        return
    raise ValueError(f"{name} has elements that share memory (strides {t.stride()} for shape "
                     f"{list(t.shape)}): each slot needs its own memory; pass a contiguous cache")


def _strides_nest(t: torch.Tensor) -> bool:
    """Each dim's stride (smallest first) steps past everything the smaller-stride dims span: then no
    two elements share memory (a slice of a larger cache, say, that torch's quick check calls "too hard")."""
    span = 0
    for stride, size in sorted((abs(st), sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= span:
            return False
        span += (size - 1) * stride
    return True


def dtypes_of(*tensors: torch.Tensor | None) -> set[torch.dtype]:
    """The dtypes of the given tensors (``None`` skipped): what ``Op.resolve`` routes on (float64 -> torch)."""
    return {t.dtype for t in tensors if t is not None}
