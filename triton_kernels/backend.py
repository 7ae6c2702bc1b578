"""Backend choice for every public op.

Backends:
    ``triton``  the Triton kernel; default for CUDA tensors, and for CPU tensors when
                ``TRITON_INTERPRET=1`` (the interpreter, slow, used by CI).
    ``cuda``    a hand-written CUDA kernel from ``csrc/`` (built on first use), where one exists
                and a committed measurement says it wins for the shape.
    ``cpu``     a C++ kernel from ``csrc/`` for CPU tensors, where one exists.
    ``torch``   the plain-PyTorch reference; default for CPU tensors otherwise.

Override globally with ``IFK_BACKEND=triton|cuda|cpu|torch`` or locally with
``with use_backend("torch"): ...``. A forced backend that cannot run raises
:class:`BackendUnavailableError` with the reason; it never silently falls back.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

from triton_kernels import _csrc

BACKENDS = ("triton", "cuda", "cpu", "torch")

# The csrc kernels each op has, by op name, with the extension (``_csrc.EXTENSIONS``) that
# provides each: the one table that backend choice and pyiface.dispatch read. An op not listed
# has Triton and torch only.
NATIVE_KERNELS: dict[str, dict[str, str]] = {
    "multimodal_scatter": {"cuda": "multimodal_cuda"},
    "selective_scan": {"cpu": "mamba_cpu"},
}

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("ifk_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this op on these inputs."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` for the ops called inside the block (``None`` restores automatic choice)."""
    if name is not None:
        _check_name(name, "use_backend")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``IFK_BACKEND``, or ``None``."""
    name = _override.get()
    if name is not None:
        return name
    env = os.environ.get("IFK_BACKEND", "").strip()
    return _check_name(env, "IFK_BACKEND") if env else None


def interpreter_enabled() -> bool:
    """True when Triton kernels were decorated under ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _unavailable_reason(
    backend: str, op: str, device: torch.device, native: frozenset[str]
) -> str | None:
    if backend == "torch":
        return None
    if backend == "triton":
        if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
            return None
        return f"triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (got {device})"
    if backend not in native:
        return f"{op} has no {backend} kernel in csrc/"
    if backend == "cuda" and device.type != "cuda":
        return f"the cuda backend needs CUDA tensors (got {device})"
    if backend == "cpu" and device.type != "cpu":
        return f"the cpu backend needs CPU tensors (got {device})"
    return None


def select_backend(
    op: str,
    device: torch.device,
    *,
    native: frozenset[str] | None = None,
    prefer_cuda: bool = False,
) -> str:
    """The backend that runs ``op`` on ``device``.

    ``native`` names the csrc kernels the op has (default: the keys of ``NATIVE_KERNELS[op]``);
    ``prefer_cuda`` is the op's measured verdict that its CUDA kernel beats Triton for the shape.
    """
    if native is None:
        native = frozenset(NATIVE_KERNELS.get(op, {}))
    forced = forced_backend()
    if forced is not None:
        reason = _unavailable_reason(forced, op, device, native)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend {forced!r} cannot run: {reason}")
        return forced
    if device.type == "cuda":
        return "cuda" if prefer_cuda and "cuda" in native else "triton"
    if interpreter_enabled():
        return "triton"
    if "cpu" in native:
        return "cpu"
    return "torch"


def resolve_backend(op: str, device: torch.device) -> str:
    """:func:`select_backend`, then load the csrc extension a native choice needs.

    An automatic choice whose build fails falls back to ``torch`` with a warning; a forced one
    raises :class:`triton_kernels._csrc.ExtensionBuildError`.
    """
    backend = select_backend(op, device)
    extension = NATIVE_KERNELS.get(op, {}).get(backend)
    if extension is not None and not _csrc.try_load(extension, forced=forced_backend() is not None):
        return "torch"
    return backend
