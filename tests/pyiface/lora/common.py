"""Shared pieces of the pyiface LoRA tests: backends, random adapters, the float64 oracle (the
package's reference)."""

from __future__ import annotations

import torch

from tests.utils import backends
from triton_kernels.lora.reference import add_lora_linear_ref, mapping_segments
from triton_kernels.registry import ADD_LORA_LINEAR, LORA_EXPAND

# Every backend of the ops the wrapper calls (add_lora_linear / lora_linear, lora_expand): the torch
# reference and the Triton kernels (under the interpreter on this machine).
BACKENDS = backends(ADD_LORA_LINEAR, LORA_EXPAND)

Adapter = tuple[list[torch.Tensor | None], list[torch.Tensor | None], list[float]]


def random_adapter(rank: int | list[int], in_features: int, widths: tuple[int, ...]) -> Adapter:
    """Signed random A/B (peft layout) per slice, a random scaling per slice; rank per slice."""
    ranks = rank if isinstance(rank, list) else [rank] * len(widths)
    a = [torch.randn(r, in_features) for r in ranks]
    b = [torch.randn(n, r) for n, r in zip(widths, ranks)]
    return a, b, [float(torch.empty(()).uniform_(0.25, 2.0)) for _ in widths]


def oracle_delta(x: torch.Tensor, mapping: list[int], adapters: dict[int, Adapter], widths) -> torch.Tensor:
    """``[T, sum widths]`` float64 on the CPU: ``scaling_s * B_s @ (A_s @ x[t])`` for the token's
    slot, by the package's reference (the one oracle), each adapter's slices stacked into
    slot-indexed weights: scaling folded into B, ranks zero-padded, missing slices and slots zero."""
    slots = max([*adapters, *mapping, 0]) + 1
    rank = max((a.shape[0] for ad in adapters.values() for a in ad[0] if a is not None), default=1)
    lora_a = [torch.zeros(slots, rank, x.shape[1], dtype=torch.float64) for _ in widths]
    lora_b = [torch.zeros(slots, n, rank, dtype=torch.float64) for n in widths]
    for slot, (a_list, b_list, scalings) in adapters.items():
        for s, (a, b, scaling) in enumerate(zip(a_list, b_list, scalings)):
            if a is not None:
                lora_a[s][slot, : a.shape[0]] = a.double()
                lora_b[s][slot, :, : b.shape[1]] = scaling * b.double()
    out = torch.zeros(x.shape[0], sum(widths), dtype=torch.float64)
    segments = mapping_segments(torch.tensor(mapping, dtype=torch.int64))
    add_lora_linear_ref(out, x.cpu().double(), lora_a, lora_b, 1.0, segments)
    return out
