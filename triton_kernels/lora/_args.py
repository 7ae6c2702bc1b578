"""Argument checks shared by the LoRA ops, run before anything is written.

Shape/dtype checks (:func:`check_weights`, :func:`check_meta_args`) read metadata only and run in
the public functions' custom ops, both the real implementation and the fake one (so they hold
under ``torch.compile``, where the Python wrapper's eager checks may be traced away). The one
value check, :func:`check_meta_values`, reads the metadata back to the host (one sync on a GPU,
once per prepared step: see :func:`triton_kernels._data_checks.check_once`) and is skipped while a
CUDA graph is captured; the kernels mask every token index, group bound and slot id they read,
so metadata that would have failed it never makes them read or write outside their tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from triton_kernels._checks import FLOAT_DTYPES, INDEX_DTYPES, check_no_overlap, check_tensor
from triton_kernels._data_checks import capturing, check_count, check_offsets, check_once, check_slots

# float64 runs on the torch backend only (gradcheck, oracles); the kernels take the other three.
LORA_DTYPES = (*FLOAT_DTYPES, torch.float64)
NUM_META = 6  # the tensors of LoRAKernelMeta.meta_args(); a seventh argument, num_active_loras, is an int


def split_inputs(op: str, inputs: Sequence[torch.Tensor | None], lead: tuple[str, ...], lists: tuple[str, ...]
                 ) -> tuple[list, list, list[list]]:
    """The one input list of a LoRA custom op (registry.py's schema convention), laid out as
    ``[*lead, *meta_args (6), *lists[0], ..., *lists[-1]]`` with every trailing list of one
    length ``S >= 1`` (the slices): returns ``(lead tensors, the 6 meta tensors, [each list])``.
    Only the count is checked here; the entries are checked by name afterwards."""
    extra = len(inputs) - len(lead) - NUM_META
    if extra < len(lists) or extra % len(lists):
        layout = ", ".join([*lead, "*meta_args (6)", *(f"*{name} (S)" for name in lists)])
        raise TypeError(f"ifk::{op} takes inputs [{layout}] with S >= 1, got {len(inputs)} tensors")
    num_slices, body = extra // len(lists), list(inputs[len(lead) + NUM_META :])
    parts = [body[i * num_slices : (i + 1) * num_slices] for i in range(len(lists))]
    return list(inputs[: len(lead)]), list(inputs[len(lead) : len(lead) + NUM_META]), parts


def meta_tensors(meta_args: Sequence[object]) -> list[torch.Tensor]:
    """The six metadata tensors of either vLLM form of the metadata arguments: the seven of
    ``LoRAKernelMeta.meta_args()`` (vLLM >= 0.32: six tensors, then ``num_active_loras``) or the
    six tensors alone (vLLM < 0.32). ``num_active_loras`` must be an int in ``[0, len(lora_ids)]``
    and is otherwise unused: the kernels launch over every group of ``lora_ids``, and a group
    past the active ones (slot -1, no tokens) launches no work. The tensors are checked after."""
    if len(meta_args) not in (NUM_META, NUM_META + 1):
        raise TypeError(
            f"expected the {NUM_META + 1} arguments of LoRAKernelMeta.meta_args() ({NUM_META} tensors and "
            f"num_active_loras) or the {NUM_META} tensors alone, got {len(meta_args)} arguments"
        )
    meta = list(meta_args[:NUM_META])
    if len(meta_args) == NUM_META + 1:
        count, ids = meta_args[NUM_META], meta[4]
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"num_active_loras must be an int, got {type(count).__name__} {count!r}")
        groups = ids.shape[0] if isinstance(ids, torch.Tensor) and ids.dim() == 1 else count
        if not 0 <= count <= groups:
            raise ValueError(f"num_active_loras must lie in [0, {groups}] (the groups of lora_ids), got {count}")
    return meta


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
    """The six tensors of ``LoRAKernelMeta.meta_args(num_tokens)`` (without ``num_active_loras``:
    see :func:`meta_tensors`), checked against the batch.

    A metadata table with more groups than the weights have slots (+1 for slot -1) is refused,
    so no slot id the metadata can carry indexes past the weights.
    """
    if len(meta_args) != NUM_META:
        raise TypeError(
            f"expected the {NUM_META} metadata tensors of LoRAKernelMeta.meta_args(), got {len(meta_args)} arguments"
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


def check_meta_values(meta_args: Sequence[torch.Tensor], num_tokens: int, num_slots: int) -> None:
    """The values of ``LoRAKernelMeta.meta_args(T)`` against the batch, in one host read: the
    group starts rise from 0 to ``T`` (the metadata was prepared for these ``T`` tokens), the
    counts are their steps, the group slots lie in ``[-1, num_slots)`` and the sorted token
    indices in ``[0, T)``. Syncs once per step on a GPU (not again while the tensors are
    unchanged), never while a CUDA graph is being captured."""
    _, order, counts, starts, ids, _ = meta_args

    def check() -> None:
        bounds = torch.stack(list(order.aminmax())) if order.numel() else order.new_zeros(2)
        host = torch.cat([starts.long(), counts.long(), ids.long(), bounds.long()]).cpu()
        groups = ids.shape[0]
        host_starts, host_counts = host[: groups + 1], host[groups + 1 : 2 * groups + 1]
        check_offsets("lora_token_start_loc", host_starts, num_tokens)
        steps = host_starts.diff().tolist()
        check_count("num_tokens_per_lora", host_counts.tolist(), steps, "tokens per group (starts' steps)")
        check_slots("lora_ids", host[2 * groups + 1 : 3 * groups + 1], num_slots, -1, what="the weights' slots")
        lo, hi = host[3 * groups + 1 :].tolist()
        if order.numel() and (lo < 0 or hi >= num_tokens):
            raise ValueError(
                f"token_indices_sorted_by_lora_ids holds token {lo if lo < 0 else hi}, outside the "
                f"batch [0, {num_tokens})"
            )

    check_once(check, (starts, counts, ids, order), num_tokens, num_slots)


def skip_no_lora(no_lora_flag_cpu: torch.Tensor, device_tensor: torch.Tensor) -> bool:
    """True when the batch has no LoRA token and the launch can be skipped; never while a CUDA
    graph is being captured, so a graph captured on an all -1 step still holds the launch for
    replays with LoRA tokens (the kernels skip slot -1 rows themselves)."""
    return bool(no_lora_flag_cpu.item()) and not capturing(device_tensor)


def check_output_apart(name: str, out: torch.Tensor, inputs: dict[str, torch.Tensor | Sequence[torch.Tensor] | None]
                       ) -> None:
    """Raise ``ValueError`` when the written ``out`` shares memory with one of ``inputs`` (a list, such as
    the weights of the slices, is checked entry by entry as ``name[i]``): a kernel writing one while
    reading the other races on a GPU. Run before anything is written."""
    named: dict[str, torch.Tensor | None] = {}
    for key, value in inputs.items():
        if isinstance(value, (list, tuple)):
            named.update({f"{key}[{i}]": t for i, t in enumerate(value)})
        else:
            named[key] = value
    check_no_overlap(name, out, named)
