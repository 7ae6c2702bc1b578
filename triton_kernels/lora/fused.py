"""Fused multi-LoRA linear: shrink and expand of all slices in one launch, each slot at its rank.

``y[t, slice s] += scale * (x[t] @ A_s[l]^T) @ B_s[l]^T`` for the slot ``l`` of token ``t``.
A program owns one row tile of one slot group (tokens gathered where they lie) and a range of
output columns. It computes the shrink of every slice at once - the slices' A rows stacked into
one ``[S * R, H_in]`` operand, ``x`` read once per tile - keeps the ``[BLOCK_M, S * R]``
intermediate in registers, then walks its columns, each column taking the B rows of its own
slice (slices of any widths, tiles may straddle two slices). With ``lora_ranks`` a slot of rank
``r`` runs the code for the smallest rank class (16, 64, capacity) holding ``r`` and masks the
rest: it reads only its ``r`` rows of each A and ``r`` columns of each B.

Decode batches have few row tiles, so the columns are split over a few programs per tile until
the GPU is filled, along slice boundaries, so that each recomputes the shrink of one slice only (the
other A rows are masked, hence not read). No split over ``H_in``, so the sums are deterministic.
"""

# 64-bit offsets. Products of an index and a stride that can pass 2^31, and how each is widened:
#   token x row stride (tok * stride_*_t): [T, H] inputs and [T, N] outputs pass 2^31 elements at
#     e.g. T = 16k tokens x a 128k-vocab lm_head output; tok is loaded, then cast, to int64.
#   slot x slot stride (slot * stride_*_l): stacked weights pass 2^31 elements, e.g. lm_head B
#     [512 slots, 128k, 64]; slot is cast to int64 when it is loaded.
#   slice x slice stride (i_s * stride_*_s, [S, T, R] buffers): the program id is cast to int64.
#   column index x column stride (o_k, o_n, col, j_r): at most one tensor's extent, past 2^31 only
#     for a strided (e.g. transposed) tensor of >= 2^31 elements; widened too (1-D vectors: cheap).
#   group start + row (the sorted-index position): start is loaded as int64.
# Checked by reading every `* stride` of the kernels here and in shrink_expand.py (each left operand traces to an int64
# value) and by the gpu-tier test with a [17, 2^27] buffer (row offsets past 2^31; not run on a
# CPU-only machine). Sizes (counts, ranks, widths, hidden) stay int32: each is one dimension.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels import _alloc
from triton_kernels._checks import INDEX_DTYPES, check_shape, check_tensor, on_device
from triton_kernels._data_checks import check_once
from triton_kernels._ops import destination_op
from triton_kernels.lora._args import (
    NUM_META,
    check_float,
    check_meta_args,
    check_meta_values,
    check_output_apart,
    check_weights,
    skip_no_lora,
    split_inputs,
)
from triton_kernels.lora.fused_torch import add_lora_linear_batched
from triton_kernels.lora.meta import LoRAKernelMeta
from triton_kernels.lora.reference import lora_delta_backward_ref, slot_segments
from triton_kernels.lora.shrink_expand import (
    DECODE_BLOCK_M,
    SLICES_PER_LAUNCH,
    _gathered_dot,
    _group_rows,
    _pick,
    block_m,
    dot_precision,
    padded3,
    uniform_strides,
)
from triton_kernels.registry import ADD_LORA_LINEAR

FUSED_BLOCK_N = 64  # output columns per step: the B tile is [S_PAD * R, 64], fp32 in registers
FUSED_SR_ELEMS = 8192  # B_K x (S_PAD * R_BLOCK) A-tile budget (16 KiB fp16) sets the hidden chunk
FUSED_MAX_N_SPLITS = 8  # at most 8 programs share a row tile's columns (each redoes the shrink)
FUSED_PROGRAMS_PER_SM = 2  # split columns until about this many programs per SM have work
MID_RANK_CLASS = 64  # rank classes: 16, 64, capacity (next power of two of R)
FUSED_MAX_PREFILL_SR = 256  # wider stacked ranks (and fp32) keep 16-row tiles: 64 rows would spill
FUSED_WIDE_TILE = 4096  # fp32 shrink-accumulator elements from which 8 warps (no spills: ptxas, sm_90)


@triton.jit
def _fused_tile(
    x_ptr, y_ptr, a0_ptr, a1_ptr, a2_ptr, b0_ptr, b1_ptr, b2_ptr,
    tok, m_m, slot, rank, hidden, n0, n1, n_lo, n_hi, scale,
    stride_x_t, stride_x_h, stride_a0_l, stride_a1_l, stride_a2_l, stride_a_r, stride_a_h,
    stride_b0_l, stride_b1_l, stride_b2_l, stride_b_n, stride_b_r, stride_y_t, stride_y_n,
    NUM_SLICES: tl.constexpr, S_PAD: tl.constexpr, R_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One row tile at rank class ``R_BLOCK``: shrink of all slices, then ``y[:, n_lo:n_hi] +=``."""
    o_j = tl.arange(0, S_PAD * R_BLOCK)  # stacked intermediate column: (slice, rank) pairs
    j_s = o_j // R_BLOCK
    j_r = (o_j % R_BLOCK).to(tl.int64)
    s_lo = (n_lo >= n0).to(tl.int32) + (n_lo >= n0 + n1).to(tl.int32)  # slices of this program's columns
    s_hi = (n_hi - 1 >= n0).to(tl.int32) + (n_hi - 1 >= n0 + n1).to(tl.int32)
    m_j = (j_s < NUM_SLICES) & (j_s >= s_lo) & (j_s <= s_hi) & (j_r < rank)  # masked rows are never read
    p_a = _pick(j_s, a0_ptr + slot * stride_a0_l, a1_ptr + slot * stride_a1_l, a2_ptr + slot * stride_a2_l)
    p_a += j_r * stride_a_r
    acc = _gathered_dot(
        x_ptr, stride_x_t, stride_x_h, tok, m_m, p_a, m_j, stride_a_h, hidden,
        BLOCK_M, S_PAD * R_BLOCK, BLOCK_K, False, DOT_PRECISION,
    )  # fmt: skip
    b_h = acc * scale  # kept in fp32 (TF32 dot for half dtypes): never overflows fp16, as on torch
    for c0 in range(n_lo, n_hi, BLOCK_N):
        o_n = (c0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_n = o_n < n_hi
        n_s = (o_n >= n0).to(tl.int32) + (o_n >= n0 + n1).to(tl.int32)  # slice of each column
        local = o_n - _pick(n_s, 0, n0, n0 + n1)
        p_b = _pick(
            n_s, b0_ptr + slot * stride_b0_l, b1_ptr + slot * stride_b1_l, b2_ptr + slot * stride_b2_l
        )
        p_b += local * stride_b_n
        m_b = (j_s[:, None] == n_s[None, :]) & (j_r[:, None] < rank) & m_n[None, :]
        b_b = tl.load(p_b[None, :] + j_r[:, None] * stride_b_r, mask=m_b, other=0.0).to(tl.float32)
        p_y = y_ptr + tok[:, None] * stride_y_t + o_n[None, :] * stride_y_n
        m_y = m_m[:, None] & m_n[None, :]
        b_y = tl.load(p_y, mask=m_y, other=0.0).to(tl.float32)
        b_y = tl.dot(b_h, b_b, b_y, input_precision=DOT_PRECISION)
        tl.store(p_y, b_y.to(y_ptr.dtype.element_ty), mask=m_y)


@triton.jit
def _add_lora_linear_kernel(
    # pointers
    x_ptr,  # [T, H_in]
    y_ptr,  # [T, n0 + n1 + n2] (a column view of y)
    a0_ptr,  # [L, R, H_in] per slice
    a1_ptr,
    a2_ptr,
    b0_ptr,  # [L, n_s, R] per slice
    b1_ptr,
    b2_ptr,
    ranks_ptr,  # [L] rank of each slot (read when HAS_RANKS)
    order_ptr,  # [T]
    counts_ptr,  # [G]
    starts_ptr,  # [G + 1]
    ids_ptr,  # [G]
    # sizes
    num_tokens,
    num_slots,
    hidden,
    capacity,
    n0,
    n1,
    n_total,
    n_splits,  # column ranges per row tile, in up to 3 regions (a slice each, or all columns)
    split_c0,  # ranges in regions 0 and 1 (region 2 has the rest)
    split_c1,
    region_end0,  # regions: [0, end0), [end0, end1), [end1, n_total)
    region_end1,
    split_w0,  # range width in each region (a multiple of BLOCK_N)
    split_w1,
    split_w2,
    scale,
    # strides
    stride_x_t, stride_x_h, stride_a0_l, stride_a1_l, stride_a2_l, stride_a_r, stride_a_h,
    stride_b0_l, stride_b1_l, stride_b2_l, stride_b_n, stride_b_r, stride_y_t, stride_y_n,
    # meta
    NUM_SLICES: tl.constexpr,
    S_PAD: tl.constexpr,
    HAS_RANKS: tl.constexpr,
    MID_R_BLOCK: tl.constexpr,
    MAX_R_BLOCK: tl.constexpr,
    BLOCK_K_LOW: tl.constexpr,
    BLOCK_K_MID: tl.constexpr,
    BLOCK_K_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    i_ms = tl.program_id(0)
    i_g = tl.program_id(2)
    i_m = i_ms // n_splits
    i_sp = i_ms % n_splits
    region = (i_sp >= split_c0).to(tl.int32) + (i_sp >= split_c0 + split_c1).to(tl.int32)
    n_lo = _pick(region, 0, region_end0, region_end1)
    n_lo += (i_sp - _pick(region, 0, split_c0, split_c0 + split_c1)) * _pick(
        region, split_w0, split_w1, split_w2
    )
    n_hi = tl.minimum(
        n_lo + _pick(region, split_w0, split_w1, split_w2), _pick(region, region_end0, region_end1, n_total)
    )
    slot = tl.load(ids_ptr + i_g).to(tl.int64)
    live = (slot >= 0) & (slot < num_slots)  # any other id: no LoRA (the value check refuses it)
    rank = capacity
    if HAS_RANKS:  # clamped: a rank the value check would refuse reads no row past the capacity
        rank = tl.minimum(tl.maximum(tl.load(ranks_ptr + slot, mask=live, other=0).to(tl.int32), 0), capacity)
    if live & (rank > 0) & (i_m * BLOCK_M < tl.load(counts_ptr + i_g)):
        tok, m_m = _group_rows(order_ptr, counts_ptr, starts_ptr, i_g, i_m, num_tokens, BLOCK_M)
        args = (x_ptr, y_ptr, a0_ptr, a1_ptr, a2_ptr, b0_ptr, b1_ptr, b2_ptr, tok, m_m, slot, rank, hidden,
                n0, n1, n_lo, n_hi, scale, stride_x_t, stride_x_h, stride_a0_l, stride_a1_l, stride_a2_l,
                stride_a_r, stride_a_h, stride_b0_l, stride_b1_l, stride_b2_l, stride_b_n, stride_b_r,
                stride_y_t, stride_y_n)  # fmt: skip
        if HAS_RANKS:
            if rank <= 16:
                _fused_tile(*args, NUM_SLICES, S_PAD, 16, BLOCK_M, BLOCK_N, BLOCK_K_LOW, DOT_PRECISION)
            elif rank <= MID_R_BLOCK:
                _fused_tile(
                    *args, NUM_SLICES, S_PAD, MID_R_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K_MID, DOT_PRECISION
                )
            else:
                _fused_tile(
                    *args, NUM_SLICES, S_PAD, MAX_R_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K_MAX, DOT_PRECISION
                )
        else:
            _fused_tile(*args, NUM_SLICES, S_PAD, MAX_R_BLOCK, BLOCK_M, BLOCK_N, BLOCK_K_MAX, DOT_PRECISION)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return FUSED_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: small, but enough that the tests walk the column split


def _block_k(s_pad: int, r_block: int) -> int:
    return max(16, min(128, FUSED_SR_ELEMS // (s_pad * r_block)))


def _column_splits(widths: list[int], want: int) -> tuple[list[int], list[int], list[int]]:
    """Split a row tile's columns into about ``want`` ranges: per slice when there are at least as
    many ranges as slices (each program then reads one slice's A), else evenly over all columns
    (a program reads x once for all slices: prefill). Returns ranges per region (3), range widths
    per region (3), and the ends of regions 0 and 1."""
    n_total, bn = sum(widths), FUSED_BLOCK_N
    if want < len(widths) or len(widths) == 1:
        width = triton.cdiv(triton.cdiv(n_total, bn), want) * bn
        return [triton.cdiv(n_total, width), 0, 0], [width, bn, bn], [n_total, n_total]
    shares = [min(triton.cdiv(w, bn), max(1, round(want * w / n_total))) for w in widths]
    split_widths = [triton.cdiv(triton.cdiv(w, bn), c) * bn for w, c in zip(widths, shares)]
    splits = [triton.cdiv(w, sw) for w, sw in zip(widths, split_widths)]
    return padded3(splits, 0), padded3(split_widths, bn), [widths[0], widths[0] + widths[1]]


def _launch_fused(y, x, lora_a, lora_b, scale, order, counts, starts, ids, ranks) -> None:
    num_tokens, hidden = x.shape
    capacity = lora_a[0].shape[1]
    if num_tokens == 0 or capacity == 0:
        return
    max_r = max(16, triton.next_power_of_2(capacity))
    s_pad_max = triton.next_power_of_2(min(len(lora_a), SLICES_PER_LAUNCH))
    wide = s_pad_max * max_r > FUSED_MAX_PREFILL_SR or x.dtype == torch.float32  # fp32 dots: no tensor cores
    bm = DECODE_BLOCK_M if wide else block_m(num_tokens)
    mid_r = min(MID_RANK_CLASS, max_r)
    row_tiles = triton.cdiv(num_tokens, bm)
    busy_tiles = min(num_tokens, row_tiles + ids.shape[0] - 1)  # (group, row tile) pairs with work, at most
    col = 0
    for s0 in range(0, len(lora_a), SLICES_PER_LAUNCH):
        ga = uniform_strides(lora_a[s0 : s0 + SLICES_PER_LAUNCH])
        gb = uniform_strides(lora_b[s0 : s0 + SLICES_PER_LAUNCH])
        widths = [w.shape[1] for w in gb]
        n_total = sum(widths)
        s_pad = triton.next_power_of_2(len(ga))
        col_tiles = triton.cdiv(n_total, FUSED_BLOCK_N)
        want = max(1, min(col_tiles, FUSED_MAX_N_SPLITS, triton.cdiv(_target_programs(x.device), busy_tiles)))
        splits, split_widths, ends = _column_splits(widths, want)
        pa, pb = padded3(ga, ga[0]), padded3(gb, gb[0])
        y_cols = y[:, col : col + n_total]
        _add_lora_linear_kernel[(row_tiles * sum(splits), 1, ids.shape[0])](
            x, y_cols, *pa, *pb, ranks if ranks is not None else ids, order, counts, starts, ids,
            num_tokens, lora_a[0].shape[0], hidden, capacity, widths[0], widths[1] if len(widths) > 1 else 0, n_total,
            sum(splits), *splits[:2], *ends, *split_widths, scale,
            x.stride(0), x.stride(1), *(w.stride(0) for w in pa), ga[0].stride(1), ga[0].stride(2),
            *(w.stride(0) for w in pb), gb[0].stride(1), gb[0].stride(2), y_cols.stride(0), y_cols.stride(1),
            NUM_SLICES=len(ga), S_PAD=s_pad, HAS_RANKS=ranks is not None,
            MID_R_BLOCK=mid_r, MAX_R_BLOCK=max_r, BLOCK_K_LOW=_block_k(s_pad, 16),
            BLOCK_K_MID=_block_k(s_pad, mid_r), BLOCK_K_MAX=_block_k(s_pad, max_r),
            BLOCK_M=bm, BLOCK_N=FUSED_BLOCK_N, DOT_PRECISION=dot_precision(x.dtype),
            num_warps=8 if bm * s_pad * max_r >= FUSED_WIDE_TILE else 4,
        )  # fmt: skip
        col += n_total


def _check_rank_values(ranks: torch.Tensor | None, capacity: int) -> None:
    """Rank values in ``[0, capacity]``: read back once per version of the tensor (one sync on a
    GPU the first time, none while a CUDA graph is captured; the kernel clamps regardless)."""
    if ranks is None:
        return

    def check() -> None:
        lo, hi = (int(v) for v in ranks.aminmax()) if ranks.numel() else (0, 0)
        if lo < 0 or hi > capacity:
            raise ValueError(
                f"lora_ranks holds rank {lo if lo < 0 else hi}, outside [0, {capacity}] (the slot capacity R)"
            )

    check_once(check, (ranks,), capacity)


def _check_fused(x, lora_a, lora_b, meta, lora_ranks, y=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Shapes, dtypes and devices of the fused ops (metadata only; ``y`` when given); the 3-D
    weights."""
    x = check_float("x", x, 2)
    lora_a = check_weights("lora_a_stacked", lora_a, x.dtype, x.device)
    lora_b = check_weights("lora_b_stacked", lora_b, x.dtype, x.device)
    num_slots, rank, hidden = lora_a[0].shape
    if hidden != x.shape[1]:
        raise ValueError(f"lora_a_stacked have hidden size {hidden}, x has {x.shape[1]}")
    if lora_b[0].shape[0] != num_slots or lora_b[0].shape[2] != rank:  # the counts: split_inputs
        raise ValueError(
            f"lora_b_stacked must hold {len(lora_a)} tensors [{num_slots}, n_s, {rank}] to match "
            f"lora_a_stacked, got {[list(b.shape) for b in lora_b]}"
        )
    check_meta_args(meta, x.shape[0], num_slots, x.device)
    if lora_ranks is not None:
        check_tensor("lora_ranks", lora_ranks, ndim=1, dtypes=INDEX_DTYPES, device=x.device)
        if lora_ranks.shape[0] != num_slots:
            raise ValueError(
                f"lora_ranks has {lora_ranks.shape[0]} entries, expected one per slot ({num_slots})"
            )
    if y is not None:
        check_tensor("y", y, ndim=2, dtypes=(x.dtype,), device=x.device)
        width = sum(b.shape[1] for b in lora_b)
        if tuple(y.shape) != (x.shape[0], width):
            raise ValueError(f"y must have shape [{x.shape[0]}, {width}], got {list(y.shape)}")
    return lora_a, lora_b


def _add_into(y, x, lora_a, lora_b, scale, meta, ranks) -> None:
    """``y += delta`` on the chosen backend (checked shapes; values checked here)."""
    check_meta_values(meta, x.shape[0], lora_a[0].shape[0])
    _check_rank_values(ranks, lora_a[0].shape[1])
    if ADD_LORA_LINEAR.resolve(x.device, (x.dtype,)) == "torch":
        add_lora_linear_batched(y, x, lora_a, lora_b, scale, *meta[1:5], ranks)
        return
    with on_device(x.device):
        _launch_fused(y, x, lora_a, lora_b, scale, *meta[1:5], ranks)


# The fused ops' input lists, as (lead tensors, per-slice lists) around the six metadata tensors.
FUSED_INPUTS = (("x", "lora_ranks"), ("lora_a_stacked", "lora_b_stacked"))
BACKWARD_INPUTS = (("grad", "x", "lora_ranks"), ("lora_a_stacked", "lora_b_stacked"))


def _add_lora_linear_fake(y, inputs, scale) -> None:
    (x, lora_ranks), meta, (lora_a, lora_b) = split_inputs("add_lora_linear", inputs, *FUSED_INPUTS)
    _check_fused(x, lora_a, lora_b, meta, lora_ranks, y)


@destination_op("add_lora_linear", mutates_args=("y",), fake=_add_lora_linear_fake)
def _add_lora_linear_op(y: torch.Tensor, inputs: list[torch.Tensor | None], scale: float) -> None:
    """Destination-passing core of :func:`add_lora_linear` and of :func:`lora_linear`'s forward:
    ``y`` ``[T, sum n_s]`` updated at the rows of LoRA tokens; ``inputs`` = ``[x [T, H_in],
    lora_ranks [L] or None, *meta_args (the six tensors of LoRAKernelMeta.meta_args), *lora_a (S x [L, R,
    H_in]), *lora_b (S x [L, n_s, R])]``. Checks every shape (here too, so they hold when the
    wrapper's checks were traced away), then the metadata values, then runs."""
    (x, lora_ranks), meta, (lora_a, lora_b) = split_inputs("add_lora_linear", inputs, *FUSED_INPUTS)
    lora_a, lora_b = _check_fused(x, lora_a, lora_b, meta, lora_ranks, y)
    # y itself is read and written (y += delta); reading x or a weight through y's memory would race
    check_output_apart("y", y, {"x": x, "lora_a_stacked": lora_a, "lora_b_stacked": lora_b, "lora_ranks": lora_ranks})
    if skip_no_lora(meta[5], x):
        return
    _add_into(y, x, lora_a, lora_b, scale, meta, lora_ranks)


def _check_grads(dx, da, db, x, lora_a, lora_b) -> None:
    """The destinations of :func:`_lora_linear_backward_op` (3-D weights, checked)."""
    num_slots, rank, hidden = lora_a[0].shape
    width = sum(b.shape[1] for b in lora_b)
    for name, t, shape, dtype in (("dx", dx, x.shape, x.dtype),
                                  ("da", da, (len(lora_a), num_slots, rank, hidden), lora_a[0].dtype),
                                  ("db", db, (num_slots, width, rank), lora_b[0].dtype)):  # fmt: skip
        check_shape(name, check_tensor(name, t, dtypes=(dtype,), device=x.device), shape)


def _lora_linear_backward_fake(dx, da, db, inputs, scale) -> None:
    (grad, x, lora_ranks), meta, (lora_a, lora_b) = split_inputs("lora_linear_backward", inputs, *BACKWARD_INPUTS)
    lora_a, lora_b = _check_fused(x, lora_a, lora_b, meta, lora_ranks, grad)
    _check_grads(dx, da, db, x, lora_a, lora_b)


@destination_op("lora_linear_backward", mutates_args=("dx", "da", "db"), fake=_lora_linear_backward_fake)
def _lora_linear_backward_op(
    dx: torch.Tensor, da: torch.Tensor, db: torch.Tensor, inputs: list[torch.Tensor | None], scale: float
) -> None:
    """Gradients of :func:`lora_linear`'s delta, written: ``dx [T, H_in]`` (x's dtype), ``da [S, L, R,
    H_in]`` (A's dtype), ``db [L, sum n_s, R]`` (B's dtype); ``inputs`` = ``[grad [T, sum n_s], x,
    lora_ranks or None, *meta_args, *lora_a, *lora_b]`` as in :func:`_add_lora_linear_op`. By
    segment matmuls in torch (reads the slot groups on the host: one sync on a GPU)."""
    (grad, x, lora_ranks), meta, (lora_a, lora_b) = split_inputs("lora_linear_backward", inputs, *BACKWARD_INPUTS)
    lora_a, lora_b = _check_fused(x, lora_a, lora_b, meta, lora_ranks, grad)
    _check_grads(dx, da, db, x, lora_a, lora_b)
    check_meta_values(meta, x.shape[0], lora_a[0].shape[0])
    _check_rank_values(lora_ranks, lora_a[0].shape[1])
    grads = lora_delta_backward_ref(grad, x, lora_a, lora_b, scale, slot_segments(*meta[1:5]), lora_ranks)
    for out, value in zip((dx, da, db), grads):
        out.copy_(value)


class _LoRALinearFn(torch.autograd.Function):
    """Forward: ``ifk::add_lora_linear`` into a zeroed delta; backward: ``ifk::lora_linear_backward``.
    The tensors come one by one (``x, lora_ranks, *meta, *lora_a, *lora_b``), so autograd sees each
    weight; ``num_slices`` splits them."""

    @staticmethod
    def forward(ctx, scale: float, num_slices: int, x, lora_ranks, *tensors):
        delta = x.new_zeros((x.shape[0], sum(b.shape[1] for b in tensors[NUM_META + num_slices :])))
        _add_lora_linear_op(delta, [x, lora_ranks, *tensors], scale)
        ctx.save_for_backward(x, lora_ranks, *tensors)
        ctx.scale, ctx.num_slices = scale, num_slices
        return delta

    @staticmethod
    def backward(ctx, grad):
        x, lora_ranks, *tensors = ctx.saved_tensors
        lora_a, lora_b = tensors[NUM_META : NUM_META + ctx.num_slices], tensors[NUM_META + ctx.num_slices :]
        num_slots, rank, hidden = lora_a[0].shape
        dx = _alloc.empty_like(x)
        da = _alloc.empty((ctx.num_slices, num_slots, rank, hidden), lora_a[0].dtype, x.device)
        db = _alloc.empty((num_slots, grad.shape[1], rank), lora_b[0].dtype, x.device)
        _lora_linear_backward_op(dx, da, db, [grad.contiguous(), x, lora_ranks, *tensors], ctx.scale)
        widths = [b.shape[1] for b in lora_b]
        return None, None, dx, None, *(None,) * NUM_META, *da.unbind(0), *db.split(widths, dim=1)


def _op_args(x, lora_a_stacked, lora_b_stacked, meta):
    """The wrapper's part: 3-D weight views and the six metadata tensors for the custom op, and
    (eager only: no shape guard when traced) the token count the meta was prepared for."""
    x = check_float("x", x, 2)
    lora_a = check_weights("lora_a_stacked", lora_a_stacked, x.dtype, x.device)
    lora_b = check_weights("lora_b_stacked", lora_b_stacked, x.dtype, x.device)
    if len(lora_b) != len(lora_a):  # the ops' one input list holds both: S each
        raise ValueError(f"lora_b_stacked must hold {len(lora_a)} tensors like lora_a_stacked, got {len(lora_b)}")
    if not isinstance(meta, LoRAKernelMeta):
        raise TypeError(f"meta must be a LoRAKernelMeta, got {type(meta).__name__}")
    if not torch.compiler.is_compiling() and meta.num_tokens != x.shape[0]:
        raise ValueError(
            f"meta was prepared for {meta.num_tokens} tokens, but x has {x.shape[0]}; call "
            "meta.prepare_tensors(token_lora_mapping) with one slot per token"
        )
    return x, lora_a, lora_b, list(meta.meta_args(x.shape[0])[:NUM_META])


def add_lora_linear(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: tuple[torch.Tensor, ...],
    lora_b_stacked: tuple[torch.Tensor, ...],
    scale: float,
    output_slices: tuple[int, ...],
    meta: LoRAKernelMeta,
    *,
    lora_ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[t, slice s] += scale * (x[t] @ A_s[l]^T) @ B_s[l]^T`` for the slot ``l`` of each token.

    Args:
        y: ``[T, sum(output_slices)]``, x's dtype, updated in place at the rows of LoRA tokens; must
            not share memory with x, the weights or lora_ranks (ValueError).
        x: ``[T, H_in]`` fp16/bf16/fp32 (float64 on the torch backend only, e.g. for gradcheck).
        lora_a_stacked: one tensor per slice, ``[L, 1, R, H_in]`` (vLLM's layout) or ``[L, R, H_in]``.
        lora_b_stacked: one tensor per slice, ``[L, 1, n_s, R]`` or ``[L, n_s, R]``.
        scale: multiplies the delta.
        output_slices: the widths ``n_s`` (must match lora_b_stacked).
        meta: a :class:`LoRAKernelMeta` prepared for these ``T`` tokens, ``max_loras <= L``.
        lora_ranks: optional ``[L]`` int tensor: slot ``l`` uses rows ``[:r]`` of its A and columns
            ``[:r]`` of its B, ``r = lora_ranks[l]`` in ``[0, R]``, and costs rank ``r``.

    The rank-sized intermediate ``x @ A^T`` stays in fp32 on every backend (fp32 registers and a
    TF32 second product for half dtypes on Triton, fp32 torch math), so it never overflows fp16;
    ``y`` is rounded once. One launch for up to three slices (more take one per three),
    deterministic. Bad shapes raise ValueError/TypeError before anything is written, eager or
    compiled. The metadata values (groups rising from 0 to ``T``: a meta prepared for another
    batch raises ValueError naming ``lora_token_start_loc``) and the ``lora_ranks`` values are read
    back once per prepared step (one sync on a GPU), never during CUDA-graph capture; the kernel
    masks and clamps whatever it reads, so skipped checks cannot make it leave its tensors.
    Returns ``y``.

    Example:
        >>> meta = LoRAKernelMeta.make(2, 3, "cpu"); meta.prepare_tensors(torch.tensor([0, -1, 1]))
        >>> a = (torch.randn(2, 1, 8, 32),); b = (torch.randn(2, 1, 48, 8),)
        >>> add_lora_linear(torch.zeros(3, 48), torch.randn(3, 32), a, b, 0.5, (48,), meta).shape
        torch.Size([3, 48])
    """
    x, lora_a, lora_b, meta_args = _op_args(x, lora_a_stacked, lora_b_stacked, meta)
    widths = tuple(b.shape[1] for b in lora_b)
    if tuple(output_slices) != widths:
        raise ValueError(f"output_slices {tuple(output_slices)} differ from the widths of lora_b_stacked {widths}")
    _add_lora_linear_op(y, [x, lora_ranks, *meta_args, *lora_a, *lora_b], float(scale))
    return y


def lora_linear(
    x: torch.Tensor,
    lora_a_stacked: tuple[torch.Tensor, ...],
    lora_b_stacked: tuple[torch.Tensor, ...],
    scale: float,
    meta: LoRAKernelMeta,
    *,
    lora_ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The differentiable twin of :func:`add_lora_linear`: returns the delta ``[T, sum n_s]``.

    Same arguments and checks (the widths come from ``lora_b_stacked``); rows of slot -1 tokens
    are zero. Forward runs the fused kernel into a zeroed tensor; backward gives ``x``, every A and
    every B their gradients (rows past a slot's rank get zero) by per-slot segment matmuls in
    torch, which read the slot groups on the host (one sync per backward on a GPU).

    Example:
        >>> meta = LoRAKernelMeta.make(2, 3, "cpu"); meta.prepare_tensors(torch.tensor([0, -1, 1]))
        >>> a = (torch.randn(2, 8, 32, requires_grad=True),); b = (torch.randn(2, 48, 8),)
        >>> lora_linear(torch.randn(3, 32), a, b, 0.5, meta).sum().backward()
    """
    x, lora_a, lora_b, meta_args = _op_args(x, lora_a_stacked, lora_b_stacked, meta)
    return _LoRALinearFn.apply(float(scale), len(lora_a), x, lora_ranks, *meta_args, *lora_a, *lora_b)
