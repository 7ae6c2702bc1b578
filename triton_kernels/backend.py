"""Backend choice for every public op: the :class:`Op` record each op is declared with, and the
rules that pick the backend that runs it.

Backends:
    ``triton``  the Triton kernel; default for CUDA tensors, and for CPU tensors when
                ``TRITON_INTERPRET=1`` (the interpreter, slow, used by CI; set before importing the
                package, and a warning, once per op, where a ``cpu`` kernel would run instead).
    ``cuda``    a hand-written CUDA kernel from ``csrc/`` (built on first use), where one exists
                and a committed measurement says it wins (``Op.prefer_cuda``).
    ``cpu``     a C++ kernel from ``csrc/`` for CPU tensors, where one exists.
    ``torch``   the plain-PyTorch reference; default for CPU tensors otherwise, and the only
                backend for dtypes the kernels do not take (float64).

Override globally with ``IFK_BACKEND=triton|cuda|cpu|torch`` or locally with
``with use_backend("torch"): ...``. A forced backend that cannot run raises
:class:`BackendUnavailableError` with the reason; it never silently falls back. The ops
themselves are declared once, in :mod:`triton_kernels.registry`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from triton_kernels import _csrc

BACKENDS = ("triton", "cuda", "cpu", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

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
    """True when ``TRITON_INTERPRET=1`` is set now (see :data:`_KERNELS_INTERPRETED` for when it counts)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton reads TRITON_INTERPRET when a kernel is decorated, that is when triton_kernels is imported (this
# module first, the kernel modules right after): setting it later leaves GPU kernels, which fail on CPU
# tensors with Triton's "0 active drivers". Tests may patch this.
_KERNELS_INTERPRETED = interpreter_enabled()
_LATE_INTERPRETER = (
    "TRITON_INTERPRET=1 was set after triton_kernels was imported, and Triton reads it when the kernels "
    "are decorated (at import), so they were built for a GPU; set TRITON_INTERPRET=1 before importing "
    "triton_kernels (or triton), or run the torch/cpu backend (IFK_BACKEND=torch or use_backend('torch'))"
)
_warned_slow: set[str] = set()  # ops already warned about the interpreter shadowing their cpu kernel


def _late_interpreter(device: torch.device) -> bool:
    """CPU tensors, the interpreter on now but not when the kernels were decorated, and no GPU: the
    kernels cannot run. (With a GPU, tests/sm90.py records launches of GPU-built kernels this way.)"""
    return (device.type == "cpu" and not _KERNELS_INTERPRETED and interpreter_enabled()
            and not torch.cuda.is_available())


@dataclasses.dataclass(frozen=True)
class Op:
    """One public op family's declaration: the single source every launcher, ``plan()``, test and
    benchmark asks which backend runs.

    Attributes:
        name: the op's name; its custom ops are ``torch.ops.ifk.<name>`` (and ``<name>_*``).
        reference: ``"module:function"`` of the plain-torch implementation (the torch backend).
        native: csrc backends (``"cuda"``/``"cpu"``) -> the ``_csrc.EXTENSIONS`` entry behind each.
        prefer_cuda: a committed measurement says the ``cuda`` kernel beats Triton.
        kernel_dtypes: the float dtypes the non-torch backends take; any other (float64) runs
            on torch, and forcing another backend for it raises.
    """

    name: str
    reference: str
    native: Mapping[str, str] = dataclasses.field(default_factory=dict)
    prefer_cuda: bool = False
    kernel_dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends this op has, in :data:`BACKENDS` order."""
        return tuple(b for b in BACKENDS if b in ("triton", "torch") or b in self.native)

    def reference_fn(self) -> Callable:
        """The torch implementation (imported on first use)."""
        module, _, fn = self.reference.partition(":")
        return getattr(importlib.import_module(module), fn)

    def _unavailable_reason(self, backend: str, device: torch.device, dtypes: Iterable[torch.dtype]) -> str | None:
        if backend == "torch":
            return None
        odd = sorted({str(d).removeprefix("torch.") for d in dtypes if d not in self.kernel_dtypes})
        if odd:
            return f"the {backend} kernel takes {', '.join(map(str, self.kernel_dtypes))}, not {', '.join(odd)}"
        if backend == "triton":
            if _late_interpreter(device):
                return _LATE_INTERPRETER
            if device.type == "cuda" or (device.type == "cpu" and interpreter_enabled()):
                return None
            return f"triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (got {device})"
        if backend not in self.native:
            return f"{self.name} has no {backend} kernel in csrc/"
        if backend == "cuda" and device.type != "cuda":
            return f"the cuda backend needs CUDA tensors (got {device})"
        if backend == "cpu" and device.type != "cpu":
            return f"the cpu backend needs CPU tensors (got {device})"
        return None

    def select(self, device: torch.device, dtypes: Iterable[torch.dtype] = ()) -> str:
        """The backend chosen for ``device`` and the inputs' ``dtypes`` (no extension is loaded)."""
        dtypes = tuple(dtypes)
        forced = forced_backend()
        if forced is not None:
            reason = self._unavailable_reason(forced, device, dtypes)
            if reason is not None:
                raise BackendUnavailableError(f"{self.name}: backend {forced!r} cannot run: {reason}")
            return forced
        if any(d not in self.kernel_dtypes for d in dtypes):
            return "torch"
        if device.type == "cuda":
            return "cuda" if self.prefer_cuda and "cuda" in self.native else "triton"
        if interpreter_enabled():
            if _late_interpreter(device):
                raise BackendUnavailableError(f"{self.name}: {_LATE_INTERPRETER}")
            if device.type == "cpu" and "cpu" in self.native and self.name not in _warned_slow:
                _warned_slow.add(self.name)
                warnings.warn(f"{self.name}: TRITON_INTERPRET=1 runs its Triton kernel in the interpreter on CPU "
                              "tensors, seconds where its cpu kernel takes milliseconds; IFK_BACKEND=cpu or "
                              "use_backend('cpu') runs the cpu kernel", RuntimeWarning, stacklevel=3)
            return "triton"
        return "cpu" if "cpu" in self.native else "torch"

    def resolve(self, device: torch.device, dtypes: Iterable[torch.dtype] = ()) -> str:
        """:meth:`select`, then load the csrc extension a native choice needs: the backend that
        will actually run. An automatic choice whose build fails falls back to ``torch`` with a
        warning; a forced one raises :class:`triton_kernels._csrc.ExtensionBuildError`."""
        backend = self.select(device, dtypes)
        extension = self.native.get(backend)
        if extension is not None and not _csrc.try_load(extension, forced=forced_backend() is not None):
            return "torch"
        return backend
