"""Shared pieces of the LoRA tests: batch mappings, random weights, a float64 per-adapter loop."""

from __future__ import annotations

import torch

from tests.utils import KERNEL_DEVICE
from triton_kernels.lora import LoRAKernelMeta


def token_mapping(kind: str, num_tokens: int, num_slots: int) -> torch.Tensor:
    """``[T]`` int32 slot per token: ``interleaved`` (random, -1 mixed in), ``skewed`` (slot 0 gets
    one token, the last slot the rest), ``no_lora`` (all -1), ``one_slot`` (all slot 1)."""
    if kind == "interleaved":
        mapping = torch.randint(-1 if num_tokens >= 3 else 0, num_slots, (num_tokens,), dtype=torch.int32)
        if num_tokens >= 3:  # make sure -1 and two different slots sit side by side
            mapping[:3] = torch.tensor([num_slots - 1, -1, 0])
        return mapping
    if kind == "skewed":
        mapping = torch.full((num_tokens,), num_slots - 1, dtype=torch.int32)
        mapping[num_tokens // 2 :][:1] = 0
        return mapping
    if kind == "no_lora":
        return torch.full((num_tokens,), -1, dtype=torch.int32)
    if kind == "one_slot":
        return torch.ones(num_tokens, dtype=torch.int32)
    raise ValueError(kind)


def prepared_meta(mapping: torch.Tensor, num_slots: int, device=KERNEL_DEVICE) -> LoRAKernelMeta:
    meta = LoRAKernelMeta.make(num_slots, max(mapping.shape[0], 1) + 3, device)
    meta.prepare_tensors(mapping.to(device))
    return meta


def lora_weights(num_slots, rank, hidden, widths, dtype, device=KERNEL_DEVICE, four_d=False):
    """Random signed A (``S x [L, R, H_in]``) and B (``S x [L, n_s, R]``), scaled so outputs are O(1)."""
    shape_a, shape_b = (num_slots, rank, hidden), [(num_slots, n, rank) for n in widths]
    a = [(torch.randn(shape_a) / hidden**0.5).to(dtype).to(device) for _ in widths]
    b = [(torch.randn(s) / max(rank, 1) ** 0.5).to(dtype).to(device) for s in shape_b]
    if four_d:
        a, b = [w.unsqueeze(1) for w in a], [w.unsqueeze(1) for w in b]
    return a, b


def loop_shrink(x, a, mapping, scaling) -> torch.Tensor:
    """``[S, T, R]`` float64 by a loop over adapters; zero rows for -1 tokens."""
    x, mapping = x.cpu().double(), mapping.cpu()
    a = [w.cpu().double().reshape(w.shape[0], *w.shape[-2:]) for w in a]
    out = torch.zeros(len(a), x.shape[0], a[0].shape[1], dtype=torch.float64)
    for slot in mapping.unique().tolist():
        if slot >= 0:
            rows = (mapping == slot).nonzero().flatten()
            for s, w in enumerate(a):
                out[s, rows] = scaling * x[rows] @ w[slot].T
    return out


def loop_delta(x, a, b, mapping, scale, ranks=None) -> torch.Tensor:
    """``[T, sum n_s]`` float64 delta by a loop over adapters (differentiable in x, a, b)."""
    a = [w.reshape(w.shape[0], *w.shape[-2:]) for w in a]
    b = [w.reshape(w.shape[0], *w.shape[-2:]) for w in b]
    cols = []
    for wa, wb in zip(a, b):
        col = torch.zeros(x.shape[0], wb.shape[1], dtype=torch.float64, device=x.device)
        for slot in mapping.unique().tolist():
            if slot < 0:
                continue
            r = int(ranks[slot]) if ranks is not None else wa.shape[1]
            keep = (mapping == slot).to(x.device).unsqueeze(1).double()
            h = x.double() @ wa[slot, :r].double().T
            col = col + keep * (scale * h @ wb[slot, :, :r].double().T)
        cols.append(col)
    return torch.cat(cols, 1)
