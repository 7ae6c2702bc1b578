"""Output allocation for every op: ``torch.empty`` that the test tier poisons.

With ``IFK_POISON_OUTPUTS=1`` (set by the test suite's conftest before the package is imported)
every output an op allocates is filled with NaN (floats) or :data:`INT_POISON` (ints) first, so a
kernel that skips part of its output fails every test, not only the tests that poison by hand.
Ops whose contract is "zeros where skipped" allocate with ``torch.zeros`` and are not poisoned.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

POISON = os.environ.get("IFK_POISON_OUTPUTS", "0") == "1"
INT_POISON = -123456789


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (floats) or :data:`INT_POISON` (ints, bool: True)."""
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(float("nan") if t.is_floating_point() else INT_POISON)


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, poisoned under ``IFK_POISON_OUTPUTS=1``."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return poison_(t) if POISON else t


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.empty`` with ``t``'s shape, device and (by default) dtype, contiguous, poisoned
    under ``IFK_POISON_OUTPUTS=1``."""
    return empty(t.shape, dtype or t.dtype, t.device)
