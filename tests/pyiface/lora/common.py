"""Shared pieces of the pyiface LoRA tests: backends, random adapters, a float64 per-token oracle."""

from __future__ import annotations

import pytest
import torch

# The torch reference, and the Triton kernels (under the interpreter on this machine).
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]

Adapter = tuple[list[torch.Tensor | None], list[torch.Tensor | None], list[float]]


def random_adapter(rank: int | list[int], in_features: int, widths: tuple[int, ...]) -> Adapter:
    """Signed random A/B (peft layout) per slice, a random scaling per slice; rank per slice."""
    ranks = rank if isinstance(rank, list) else [rank] * len(widths)
    a = [torch.randn(r, in_features) for r in ranks]
    b = [torch.randn(n, r) for n, r in zip(widths, ranks)]
    return a, b, [float(torch.empty(()).uniform_(0.25, 2.0)) for _ in widths]


def loop_delta(x: torch.Tensor, mapping: list[int], adapters: dict[int, Adapter], widths) -> torch.Tensor:
    """float64, one token at a time: ``scaling_s * B_s @ (A_s @ x[t])`` for the token's slot."""
    out = torch.zeros(x.shape[0], sum(widths), dtype=torch.float64)
    for t, slot in enumerate(mapping):
        if slot < 0 or slot not in adapters:
            continue
        col = 0
        for a, b, sc, n in zip(*adapters[slot], widths):
            if a is not None:
                out[t, col : col + n] = sc * (b.double() @ (a.double() @ x[t].double()))
            col += n
    return out
