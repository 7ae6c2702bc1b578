"""Load the ``csrc/`` extensions: prebuilt at install (``IFK_BUILD_EXT=1``) or built on first use.

This module imports nothing but the standard library and torch, so ``setup.py`` can read
:data:`EXTENSIONS` and :func:`compile_flags` from it without importing the package.

Each extension registers its ops in the ``ifk`` torch.library namespace, so callers reach them
as ``torch.ops.ifk.<name>`` once :func:`load` has returned. Builds are cached under
``IFK_CACHE_DIR`` (default ``~/.cache/ifk``) and serialised by torch's own file lock, so two
processes never compile the same extension at once.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
# csrc/ beside the package in a source tree; shipped inside it by setup.py in an installed wheel.
CSRC = _HERE / "csrc" if (_HERE / "csrc").is_dir() else _HERE.parent / "csrc"

# name -> (sources relative to csrc/, needs nvcc)
EXTENSIONS: dict[str, tuple[tuple[str, ...], bool]] = {
    "multimodal_cuda": (("multimodal/embed_multimodal.cu",), True),
    "mamba_cpu": (("mamba/selective_scan_cpu.cpp",), False),
}



class ExtensionBuildError(RuntimeError):
    """A csrc extension could not be imported or compiled."""


_lock = threading.Lock()
_failed: dict[str, ExtensionBuildError] = {}  # a failed build is not retried in this process


def _build_dir(name: str) -> Path:
    root = Path(os.environ.get("IFK_CACHE_DIR", Path.home() / ".cache" / "ifk"))
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def compile_flags(cuda: bool) -> dict[str, list[str]]:
    """Compiler flags shared by the JIT build and ``setup.py``'s opt-in build."""
    cxx = ["-O3"] + ([] if cuda else ["-fopenmp", "-march=native"])
    flags = {"cxx": cxx}
    if cuda:
        flags["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    return flags


@functools.cache
def load(name: str) -> None:
    """Make ``torch.ops.ifk`` hold the ops of extension ``name``; raise ExtensionBuildError if not."""
    sources, cuda = EXTENSIONS[name]
    if name in _failed:
        raise _failed[name]
    with _lock:
        prebuilt = sorted(_HERE.glob(f"_ext_{name}*.so"))  # IFK_BUILD_EXT=1 at install
        if prebuilt:
            torch.ops.load_library(str(prebuilt[0]))
            return
        from torch.utils import cpp_extension

        flags = compile_flags(cuda)
        try:
            cpp_extension.load(
                name=f"ifk_{name}",
                sources=[str(CSRC / s) for s in sources],
                extra_cflags=flags["cxx"],
                extra_cuda_cflags=flags.get("nvcc"),
                extra_ldflags=[] if cuda else ["-fopenmp"],
                build_directory=str(_build_dir(name)),
                with_cuda=cuda,
                is_python_module=False,
                verbose=os.environ.get("IFK_VERBOSE_BUILD", "0") == "1",
            )
        except Exception as exc:  # compiler missing, CUDA toolkit missing, build error
            _failed[name] = ExtensionBuildError(
                f"could not build csrc extension {name!r} ({exc}). Install a C++ compiler"
                f"{' and the CUDA toolkit (nvcc)' if cuda else ''}, or pick another backend with"
                " IFK_BACKEND / triton_kernels.use_backend."
            )
            raise _failed[name] from exc


def try_load(name: str, forced: bool) -> bool:
    """Load ``name``; on failure raise when the backend was forced, else warn and return False."""
    try:
        load(name)
        return True
    except ExtensionBuildError as exc:
        if forced:
            raise
        warnings.warn(f"{exc}; falling back to the torch backend", RuntimeWarning, stacklevel=3)
        return False
