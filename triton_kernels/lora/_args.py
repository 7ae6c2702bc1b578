"""Argument checks shared by the LoRA ops (metadata only: no device sync, nothing written)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from triton_kernels._checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor
from triton_kernels.backend import Op

# float64 runs on the torch backend only (gradcheck, oracles); the kernels take the other three.
LORA_DTYPES = (*FLOAT_DTYPES, torch.float64)


def check_weights(
    name: str, weights: object, dtype: torch.dtype | None, device: torch.device
) -> list[torch.Tensor]:
    """A non-empty list/tuple of ``[L, a, b]`` (or ``[L, 1, a, b]``) tensors with one slot count
    ``L``, one last dim and one float dtype (``dtype`` when given); returned as 3-D views."""
    if not isinstance(weights, (list, tuple)) or not weights:
        raise TypeError(f"{name} must be a non-empty list/tuple of tensors, got {type(weights).__name__}")
    out = []
    for i, w in enumerate(weights):
        check_tensor(f"{name}[{i}]", w, ndim=(3, 4), dtypes=LORA_DTYPES, device=device)
        dtype = dtype or w.dtype
        if w.dim() == 4:
            if w.shape[1] != 1:
                raise ValueError(f"{name}[{i}] is 4-D, so dim 1 must be 1, got shape {list(w.shape)}")
            w = w.squeeze(1)
        if w.dtype != dtype:
            raise TypeError(f"{name}[{i}] has dtype {w.dtype}, expected {dtype} like the inputs")
        if out and w.shape[0] != out[0].shape[0]:
            raise ValueError(f"{name}[{i}] has {w.shape[0]} slots, expected {out[0].shape[0]} like {name}[0]")
        if out and w.shape[2] != out[0].shape[2]:
            raise ValueError(
                f"{name}[{i}] has last dim {w.shape[2]}, expected {out[0].shape[2]} like {name}[0]"
            )
        out.append(w)
    return out


def check_meta_args(
    meta_args: Sequence[object], num_tokens: int, num_slots: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """The six tensors of ``LoRAKernelMeta.meta_args(num_tokens)``, checked against the batch.

    A metadata table with more groups than the weights have slots (+1 for slot -1) is refused,
    so no slot id the metadata can carry indexes past the weights.
    """
    if len(meta_args) != 6:
        raise TypeError(
            f"expected the 6 tensors of LoRAKernelMeta.meta_args(), got {len(meta_args)} arguments"
        )
    mapping, order, counts, starts, ids, flag = meta_args
    for name, t in (("token_lora_mapping", mapping), ("token_indices_sorted_by_lora_ids", order)):
        check_tensor(name, t, ndim=1, dtypes=INDEX_DTYPES, device=device)
        if t.shape[0] != num_tokens:
            raise ValueError(f"{name} has {t.shape[0]} entries, expected {num_tokens} (one per token)")
    for name, t in (("num_tokens_per_lora", counts), ("lora_token_start_loc", starts), ("lora_ids", ids)):
        check_tensor(name, t, ndim=1, dtypes=INDEX_DTYPES, device=device)
    groups = ids.shape[0]
    if counts.shape[0] != groups or starts.shape[0] != groups + 1:
        raise ValueError(
            f"num_tokens_per_lora/lora_token_start_loc must have {groups}/{groups + 1} entries "
            f"(lora_ids has {groups}), got {counts.shape[0]}/{starts.shape[0]}"
        )
    if groups - 1 > num_slots:
        raise ValueError(
            f"the metadata was made for max_loras={groups - 1} slots, but the weights have only "
            f"{num_slots}; make LoRAKernelMeta with max_loras <= {num_slots}"
        )
    check_tensor("no_lora_flag_cpu", flag, dtypes=(torch.bool,), device=torch.device("cpu"))
    if flag.numel() != 1:
        raise ValueError(f"no_lora_flag_cpu must hold one element, got {flag.numel()}")
    return mapping, order, counts, starts, ids, flag


def check_float(name: str, t: object, ndim: int, device: torch.device | None = None) -> torch.Tensor:
    return check_tensor(name, t, ndim=ndim, dtypes=LORA_DTYPES, device=device)


def lora_backend(op: Op, *tensors: torch.Tensor) -> str:
    """The backend that runs ``op`` on these tensors (float64 runs on torch)."""
    return op.resolve(tensors[0].device, (t.dtype for t in tensors))


def skip_no_lora(no_lora_flag_cpu: torch.Tensor, device: torch.device) -> bool:
    """True when the batch has no LoRA token and the launch can be skipped; never while a CUDA
    graph is being captured, so a graph captured on an all -1 step still holds the launch for
    replays with LoRA tokens (the kernels skip slot -1 rows themselves)."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return bool(no_lora_flag_cpu.item()) and not capturing
