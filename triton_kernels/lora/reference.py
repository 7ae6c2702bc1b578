"""The per-adapter definition of the multi-LoRA ops: the oracle every test compares with (in
float64), and the ``torch`` backend of :func:`lora_shrink` / :func:`lora_expand` (the batched
``torch`` backend of :func:`add_lora_linear` lives in :mod:`triton_kernels.lora.fused_torch`).

Each works slot group by slot group: gather the group's tokens, two matmuls, scatter back (no
per-token loop). Weights come as lists of 3-D tensors (``[L, R, H_in]`` for A, ``[L, n_s, R]``
for B), one per slice. Math runs in float32 for half inputs, float64 for float64 ones: the
rank-sized intermediate is never rounded to a half dtype. The groups are read on the host, so on
a GPU these functions sync; they are the oracle and the CPU path, not the fast path.
"""

from __future__ import annotations

import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def group_table(
    num_tokens_per_lora: torch.Tensor,
    lora_token_start_loc: torch.Tensor,
    lora_ids: torch.Tensor,
    lora_ranks: torch.Tensor | None = None,
) -> tuple[list[int], list[int], list[int], list[int] | None]:
    """``(counts, starts, ids, ranks or None)`` as Python ints, read back in one host copy."""
    groups = lora_ids.shape[0]
    parts = (num_tokens_per_lora, lora_token_start_loc[:groups], lora_ids)
    table = torch.cat(parts if lora_ranks is None else (*parts, lora_ranks)).tolist()
    ranks = None if lora_ranks is None else table[3 * groups :]
    return table[:groups], table[groups : 2 * groups], table[2 * groups : 3 * groups], ranks


def slot_segments(
    sorted_indices: torch.Tensor,  # [T] token indices sorted by slot
    num_tokens_per_lora: torch.Tensor,  # [G]
    lora_token_start_loc: torch.Tensor,  # [G + 1]
    lora_ids: torch.Tensor,  # [G] slot of each group, -1 = no LoRA
) -> list[tuple[int, torch.Tensor]]:
    """``(slot, token indices)`` of every group that has tokens and a slot (not -1)."""
    counts, starts, ids, _ = group_table(num_tokens_per_lora, lora_token_start_loc, lora_ids)
    order = sorted_indices.long()
    return [
        (slot, order[start : start + count])
        for slot, start, count in zip(ids, starts, counts)
        if slot >= 0 and count > 0
    ]


def mapping_segments(token_lora_mapping: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``(slot, token indices)`` of every slot used in ``token_lora_mapping [T]`` (straight from the
    mapping, not from the kernels' metadata: what the tests' oracle groups by)."""
    mapping = token_lora_mapping.long()
    return [(slot, (mapping == slot).nonzero().flatten()) for slot in mapping.unique().tolist() if slot >= 0]


def lora_shrink_ref(
    inputs: torch.Tensor,  # [T, H_in]
    lora_a: list[torch.Tensor],  # S x [L, R, H_in]
    out: torch.Tensor,  # [S, T, R], zeroed, then written for LoRA tokens
    segments: list[tuple[int, torch.Tensor]],
    scaling: float,
) -> None:
    """``out[s, t] = scaling * inputs[t] @ A_s[slot(t)]^T``; rows of slot -1 tokens are zero."""
    out.zero_()
    dt = compute_dtype(inputs)
    for slot, tok in segments:
        xs = inputs.index_select(0, tok).to(dt)
        for s, a in enumerate(lora_a):
            out[s].index_copy_(0, tok, (scaling * (xs @ a[slot].to(dt).T)).to(out.dtype))


def lora_expand_ref(
    inputs: torch.Tensor,  # [S, T, R]
    lora_b: list[torch.Tensor],  # S x [L, n_s, R]
    out: torch.Tensor,  # [T, >= offset_start + sum n_s], columns of LoRA tokens written
    segments: list[tuple[int, torch.Tensor]],
    offset_start: int,
    add_inputs: bool,
) -> None:
    """``out[t, off_s : off_s + n_s] (+)= inputs[s, t] @ B_s[slot(t)]^T``, ``off_s`` = offset_start
    plus the widths of the slices before ``s``; rows of slot -1 tokens are left alone."""
    dt = compute_dtype(out)
    for slot, tok in segments:
        col = offset_start
        for s, b in enumerate(lora_b):
            view = out[:, col : col + b.shape[1]]
            val = inputs[s].index_select(0, tok).to(dt) @ b[slot].to(dt).T
            if add_inputs:
                val = val + view.index_select(0, tok).to(dt)
            view.index_copy_(0, tok, val.to(out.dtype))
            col += b.shape[1]


def add_lora_linear_ref(
    y: torch.Tensor,  # [T, sum n_s], updated in place for LoRA tokens
    x: torch.Tensor,  # [T, H_in]
    lora_a: list[torch.Tensor],  # S x [L, R, H_in]
    lora_b: list[torch.Tensor],  # S x [L, n_s, R]
    scale: float,
    segments: list[tuple[int, torch.Tensor]],
    lora_ranks: torch.Tensor | None = None,  # [L] rank used by each slot
) -> None:
    """``y[t] += scale * (x[t] @ A_s[l, :r]^T) @ B_s[l, :, :r]^T`` for each slice ``s``, for token
    ``t`` of slot ``l`` with rank ``r``; one rounding to y's dtype; rows of slot -1 untouched."""
    dt = compute_dtype(x)
    ranks = lora_ranks.tolist() if lora_ranks is not None else None
    for slot, tok in segments:
        xs = x.index_select(0, tok).to(dt)
        rank = ranks[slot] if ranks is not None else lora_a[0].shape[1]
        same = y.dtype == dt  # then add in place; else add in dt and round once
        rows = y.new_zeros((tok.shape[0], y.shape[1]), dtype=dt) if same else y.index_select(0, tok).to(dt)
        col = 0
        for a, b in zip(lora_a, lora_b):
            shrunk = xs @ a[slot, :rank].to(dt).T
            rows[:, col : col + b.shape[1]].addmm_(shrunk, b[slot, :, :rank].to(dt).T, alpha=scale)
            col += b.shape[1]
        if same:
            y.index_add_(0, tok, rows)
        else:
            y.index_copy_(0, tok, rows.to(y.dtype))


def lora_delta_backward_ref(
    grad: torch.Tensor,  # [T, sum n_s], gradient of the loss w.r.t. the delta
    x: torch.Tensor,  # [T, H_in]
    lora_a: list[torch.Tensor],  # S x [L, R, H_in]
    lora_b: list[torch.Tensor],  # S x [L, n_s, R]
    scale: float,
    segments: list[tuple[int, torch.Tensor]],
    lora_ranks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of the delta that :func:`add_lora_linear_ref` adds: ``dx [T, H_in]`` (x's dtype),
    ``dA [S, L, R, H_in]`` (A's dtype), ``dB [L, sum n_s, R]`` (B's dtype); zero past each rank."""
    dt = compute_dtype(x)
    num_slots, rank_cap, hidden = lora_a[0].shape
    ranks = lora_ranks.tolist() if lora_ranks is not None else None
    dx = torch.zeros(x.shape, dtype=dt, device=x.device)
    da = torch.zeros((len(lora_a), num_slots, rank_cap, hidden), dtype=dt, device=x.device)
    db = torch.zeros((num_slots, grad.shape[1], rank_cap), dtype=dt, device=x.device)
    for slot, tok in segments:
        rank = ranks[slot] if ranks is not None else rank_cap
        xs = x.index_select(0, tok).to(dt)
        g_all = grad.index_select(0, tok).to(dt)
        col = 0
        for s, (a, b) in enumerate(zip(lora_a, lora_b)):
            aw, bw = a[slot, :rank].to(dt), b[slot, :, :rank].to(dt)
            g = g_all[:, col : col + b.shape[1]]
            gh = scale * (g @ bw)  # [m, r]: gradient of the shrink output
            dx.index_add_(0, tok, gh @ aw)
            da[s, slot, :rank] = gh.T @ xs
            db[slot, col : col + b.shape[1], :rank] = scale * (g.T @ (xs @ aw.T))
            col += b.shape[1]
    return dx.to(x.dtype), da.to(lora_a[0].dtype), db.to(lora_b[0].dtype)
