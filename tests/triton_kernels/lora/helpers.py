"""Shared pieces of the LoRA tests: batch mappings, random weights, and the oracle: the package's
per-adapter reference (``triton_kernels.lora.reference``) in float64, grouped by the mapping."""

from __future__ import annotations

import torch

from tests.utils import KERNEL_DEVICE
from triton_kernels.lora import LoRAKernelMeta
from triton_kernels.lora.reference import add_lora_linear_ref, lora_expand_ref, lora_shrink_ref, mapping_segments


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


def _as_3d(weights) -> list[torch.Tensor]:
    return [w.reshape(w.shape[0], *w.shape[-2:]).double() for w in weights]


def oracle_shrink(x, a, mapping, scaling) -> torch.Tensor:
    """``[S, T, R]`` float64 by the package's reference, grouped straight from the mapping."""
    out = torch.zeros(len(a), x.shape[0], a[0].shape[-2], dtype=torch.float64, device=x.device)
    lora_shrink_ref(x.double(), _as_3d(a), out, mapping_segments(mapping.to(x.device)), scaling)
    return out


def oracle_expand(inputs, b, mapping, out, offset_start, add_inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected output (float64, on the CPU) and the mask of the elements the op writes."""
    expected = out.cpu().double()
    segments = mapping_segments(mapping.cpu())
    lora_expand_ref(inputs.cpu().double(), [w.cpu() for w in _as_3d(b)], expected, segments, offset_start, add_inputs)
    written = torch.zeros(out.shape, dtype=torch.bool)
    written[(mapping.cpu() >= 0).nonzero().flatten(), offset_start : offset_start + sum(w.shape[-2] for w in b)] = True
    return expected, written


def oracle_delta(x, a, b, mapping, scale, ranks=None) -> torch.Tensor:
    """``[T, sum n_s]`` float64 delta by the package's reference (differentiable in x, a, b)."""
    y = torch.zeros(x.shape[0], sum(w.shape[-2] for w in b), dtype=torch.float64, device=x.device)
    add_lora_linear_ref(y, x.double(), _as_3d(a), _as_3d(b), scale, mapping_segments(mapping.to(x.device)), ranks)
    return y
