"""Plain-torch references of the multi-LoRA ops (the ``torch`` backend and the tests' oracle).

Each works slot group by slot group: gather the group's tokens, two matmuls, scatter back (no
per-token loop). Weights come as lists of 3-D tensors (``[L, R, H_in]`` for A, ``[L, n_s, R]``
for B), one per slice. Math runs in float32 (float64 for float64 inputs). The groups are read on
the host, so on a GPU these references sync; they are the oracle and the CPU path, not the fast path.
"""

from __future__ import annotations

import torch


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _group_table(
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
    counts, starts, ids, _ = _group_table(num_tokens_per_lora, lora_token_start_loc, lora_ids)
    order = sorted_indices.long()
    return [
        (slot, order[start : start + count])
        for slot, start, count in zip(ids, starts, counts)
        if slot >= 0 and count > 0
    ]


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


BATCHED_MAX_PADDING = 2  # padded rows (slots x longest group) at most 2x the LoRA tokens, else loop


def _add_one_slot(y, x, lora_a, lora_b, scale, slot, rank, dt) -> None:
    """``y += delta`` when every token uses ``slot``: the token order does not matter then."""
    rows = y if y.dtype == dt else y.to(dt)  # half y: add in dt, round once
    xs = x.to(dt)
    col = 0
    for a, b in zip(lora_a, lora_b):
        h = xs @ a[slot].narrow(0, 0, rank).to(dt).T
        rows.narrow(1, col, b.shape[1]).addmm_(h, b[slot].narrow(1, 0, rank).to(dt).T, alpha=scale)
        col += b.shape[1]
    if rows is not y:
        y.copy_(rows)


def add_lora_linear_batched(
    y: torch.Tensor,  # [T, sum n_s], updated in place for LoRA tokens
    x: torch.Tensor,  # [T, H_in]
    lora_a: list[torch.Tensor],  # S x [L, R, H_in]
    lora_b: list[torch.Tensor],  # S x [L, n_s, R]
    scale: float,
    sorted_indices: torch.Tensor,  # [T]
    num_tokens_per_lora: torch.Tensor,  # [G]
    lora_token_start_loc: torch.Tensor,  # [G + 1]
    lora_ids: torch.Tensor,  # [G]
    lora_ranks: torch.Tensor | None = None,  # [L], values in [0, R]
) -> None:
    """:func:`add_lora_linear_ref` (the torch backend) in a fixed, small number of torch ops.

    The groups of the slot range ``[lo, hi)`` in use are padded to the longest group: one gather
    of ``x`` to ``[n, M, H_in]`` (a view of the sorted indices when the groups are all of one
    length), per slice two batched matmuls over views of the weights' slot range, one scatter of
    the valid rows into ``y``; when one slot owns every token, plain matmuls into ``y``. Falls
    back to the per-group loop when a slot has two groups, when padding would more than double
    the rows, or when the slots of the range differ in rank (a rank here slices the weights, so
    rows and columns past it are never read). Reads the group table and the ranks on the host in
    one copy (one sync on a GPU; the loop takes several).
    """
    table = _group_table(num_tokens_per_lora, lora_token_start_loc, lora_ids, lora_ranks)
    counts, starts, ids, ranks = table
    live = {slot: (start, count) for slot, start, count in zip(ids, starts, counts) if slot >= 0 and count > 0}
    if not live:
        return
    lo, hi = min(live), max(live) + 1
    longest = max(count for _, count in live.values())
    total = sum(count for _, count in live.values())
    duplicated = sum(1 for slot, count in zip(ids, counts) if slot >= 0 and count > 0) != len(live)
    if duplicated or (hi - lo) * longest > BATCHED_MAX_PADDING * total + 64:
        segments = slot_segments(sorted_indices, num_tokens_per_lora, lora_token_start_loc, lora_ids)
        add_lora_linear_ref(y, x, lora_a, lora_b, scale, segments, lora_ranks)
        return
    rank = lora_a[0].shape[1]
    if ranks is not None:
        in_use = set(ranks[lo:hi])  # every slot of the range at one rank: weight views
        if len(in_use) != 1:
            segments = slot_segments(sorted_indices, num_tokens_per_lora, lora_token_start_loc, lora_ids)
            add_lora_linear_ref(y, x, lora_a, lora_b, scale, segments, lora_ranks)
            return
        rank = in_use.pop()
        if rank == 0:
            return
    n, dev, dt = hi - lo, x.device, compute_dtype(x)
    if n == 1 and total == x.shape[0]:  # one slot owns every token: no gather, no scatter
        _add_one_slot(y, x, lora_a, lora_b, scale, lo, rank, dt)
        return
    span = [live.get(slot, (0, 0)) for slot in range(lo, hi)]
    order = sorted_indices.long()
    dense = all(count == longest for _, count in span) and all(
        span[i + 1][0] == span[i][0] + longest for i in range(n - 1)
    )
    valid = None
    if dense:  # the groups lie back to back, all of one length: a view of the sorted indices
        tok = order[span[0][0] : span[0][0] + total].view(n, longest)
    else:
        table = torch.tensor(span, dtype=torch.int64).to(dev, non_blocking=True)  # [n, 2]: start, count
        m = torch.arange(longest, device=dev)
        valid = m < table[:, 1:]  # [n, M]
        tok = order[torch.where(valid, table[:, :1] + m, 0)]  # [n, M], padded with the first sorted token
    xg = x.index_select(0, tok.flatten()).view(n, longest, x.shape[1]).to(dt)
    rows = torch.empty((n, longest, y.shape[1]), dtype=dt, device=dev)
    whole = n == lora_a[0].shape[0] and rank == lora_a[0].shape[1]  # narrow() views cost Python time
    cast = lora_a[0].dtype != dt
    col = 0
    for a, b in zip(lora_a, lora_b):
        if not whole:
            a, b = a.narrow(0, lo, n).narrow(1, 0, rank), b.narrow(0, lo, n).narrow(2, 0, rank)
        if cast:
            a, b = a.to(dt), b.to(dt)
        h = torch.bmm(xg, a.mT)  # [n, M, r]
        rows.narrow(2, col, b.shape[1]).baddbmm_(h, b.mT, beta=0, alpha=scale)
        col += b.shape[1]
    rows, tok = rows.view(n * longest, -1), tok.flatten()
    if valid is not None:
        sel = torch.nonzero_static(valid.flatten(), size=total).squeeze(1)  # no sync: the count is known
        rows, tok = rows.index_select(0, sel), tok.index_select(0, sel)
    if y.dtype == dt:
        y.index_add_(0, tok, rows)
    else:  # add in dt and round once
        y.index_copy_(0, tok, (y.index_select(0, tok).to(dt) + rows).to(y.dtype))


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
