"""vLLM-compatible multi-LoRA ``lora_shrink`` and ``lora_expand`` (punica SGMV semantics).

Both kernels share one grid: ``(row tiles x column tiles, slices, slot groups)``. A program takes
the tokens of one slot group (a segment of ``token_indices_sorted_by_lora_ids``) in tiles of
``BLOCK_M`` rows, gathers their rows where they lie, and exits at once for slot ``-1`` and for row
tiles past its group's count. Up to three slices share a launch (their weights are picked per
program among three pointers); more slices take one launch per three.
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
# Checked by reading every `* stride` of the kernels below (each left operand traces to an int64
# value) and by the gpu-tier test with a [17, 2^27] buffer (row offsets past 2^31; not run on a
# CPU-only machine). Sizes (counts, ranks, widths, hidden) stay int32: each is one dimension.

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels._checks import check_tensor, on_device
from triton_kernels._ops import destination_op
from triton_kernels.lora._args import (
    check_float,
    check_meta_args,
    check_meta_values,
    check_output_apart,
    check_weights,
    meta_tensors,
    skip_no_lora,
    split_inputs,
)
from triton_kernels.lora.reference import lora_expand_ref, lora_shrink_ref, slot_segments
from triton_kernels.registry import LORA_EXPAND, LORA_SHRINK

SLICES_PER_LAUNCH = 3  # q/k/v; the slice's weights are picked among this many pointers

# Row tile by batch size: decode groups hold a few tokens, so a 16-row tile (the smallest tl.dot
# accepts) wastes least; prefill tiles of 64 rows reuse every weight tile 4x more.
DECODE_BLOCK_M, PREFILL_BLOCK_M, PREFILL_FROM_TOKENS = 16, 64, 512
SHRINK_BLOCK_K = 128  # hidden chunk: 128 x 2 bytes = one 256-byte line per row
EXPAND_BLOCK_N = 128  # output columns per program: coalesced y rows, fewer programs per slice


@triton.jit
def _pick(i, v0, v1, v2):
    """``v_i`` for ``i`` in 0..2 (scalars or blocks; pointers too)."""
    return tl.where(i == 0, v0, tl.where(i == 1, v1, v2))


@triton.jit
def _group_rows(order_ptr, counts_ptr, starts_ptr, i_g, i_m, num_tokens, BLOCK_M: tl.constexpr):
    """Token indices ``[BLOCK_M]`` (int64) of row tile ``i_m`` of group ``i_g``, and their mask.

    Masked to the ``num_tokens`` entries of the sorted indices and to tokens in ``[0, num_tokens)``,
    so metadata that the value check would refuse (skipped under CUDA-graph capture) reads and
    writes nothing outside the tensors."""
    count = tl.load(counts_ptr + i_g)
    start = tl.load(starts_ptr + i_g).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_sorted = start + o_m
    m_m = (o_m < count) & (o_sorted >= 0) & (o_sorted < num_tokens)
    tok = tl.load(order_ptr + o_sorted, mask=m_m, other=0).to(tl.int64)
    return tok, m_m & (tok >= 0) & (tok < num_tokens)


@triton.jit
def _gathered_dot(
    p_rows,  # pointer: row 0 of the left operand (rows gathered by ``tok``)
    stride_row,
    stride_k,
    tok,  # [BLOCK_M] int64 row indices
    m_m,  # [BLOCK_M]
    p_w,  # [BLOCK_N] pointers: element 0 of each right-operand row
    m_w,  # [BLOCK_N]; masked rows are not read
    stride_w_k,
    size_k,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_N]`` fp32: ``lhs[tok, :size_k] @ W[:, :size_k]^T``; the operands in W's
    dtype, or (``UPCAST``) both in fp32, so an fp32 lhs is never rounded to a half dtype."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, size_k, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < size_k
        o_k = o_k.to(tl.int64)
        b_l = tl.load(
            p_rows + tok[:, None] * stride_row + o_k[None, :] * stride_k,
            mask=m_m[:, None] & m_k[None, :],
            other=0.0,
        )
        b_w = tl.load(p_w[None, :] + o_k[:, None] * stride_w_k, mask=m_k[:, None] & m_w[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(b_l.to(tl.float32), b_w.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(b_l.to(b_w.dtype), b_w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _lora_shrink_kernel(
    # pointers
    x_ptr,  # [T, H_in]
    a0_ptr,  # [L, R, H_in], slice 0 (a1, a2: slices 1, 2)
    a1_ptr,
    a2_ptr,
    out_ptr,  # [S, T, R] fp32
    order_ptr,  # [T] token indices sorted by slot
    counts_ptr,  # [G]
    starts_ptr,  # [G + 1]
    ids_ptr,  # [G]
    # sizes
    num_tokens,
    num_slots,
    rank,
    hidden,
    scaling,
    # strides
    stride_x_t,
    stride_x_h,
    stride_a0_l,
    stride_a1_l,
    stride_a2_l,
    stride_a_r,
    stride_a_h,
    stride_o_s,
    stride_o_t,
    stride_o_r,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_mn = tl.program_id(0)
    i_s = tl.program_id(1).to(tl.int64)
    i_g = tl.program_id(2)
    n_tiles = tl.cdiv(rank, BLOCK_N)
    i_m = i_mn // n_tiles
    i_n = i_mn % n_tiles
    slot = tl.load(ids_ptr + i_g).to(tl.int64)
    if (slot >= 0) & (slot < num_slots) & (i_m * BLOCK_M < tl.load(counts_ptr + i_g)):
        tok, m_m = _group_rows(order_ptr, counts_ptr, starts_ptr, i_g, i_m, num_tokens, BLOCK_M)
        o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_n = o_n < rank
        p_a = _pick(
            i_s, a0_ptr + slot * stride_a0_l, a1_ptr + slot * stride_a1_l, a2_ptr + slot * stride_a2_l
        )
        acc = _gathered_dot(
            x_ptr, stride_x_t, stride_x_h, tok, m_m, p_a + o_n * stride_a_r, m_n, stride_a_h, hidden,
            BLOCK_M, BLOCK_N, BLOCK_K, False, DOT_PRECISION,
        )  # fmt: skip
        p_o = out_ptr + i_s * stride_o_s + tok[:, None] * stride_o_t + o_n[None, :] * stride_o_r
        tl.store(p_o, acc * scaling, mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _lora_expand_kernel(
    # pointers
    in_ptr,  # [S, T, R]
    b0_ptr,  # [L, n_0, R], slice 0 (b1, b2: slices 1, 2)
    b1_ptr,
    b2_ptr,
    out_ptr,  # [T, *]
    order_ptr,  # [T]
    counts_ptr,  # [G]
    starts_ptr,  # [G + 1]
    ids_ptr,  # [G]
    # sizes
    num_tokens,
    num_slots,
    rank,
    n0,
    n1,
    n2,
    offset_start,
    # strides
    stride_i_s,
    stride_i_t,
    stride_i_r,
    stride_b0_l,
    stride_b1_l,
    stride_b2_l,
    stride_b_n,
    stride_b_r,
    stride_o_t,
    stride_o_n,
    # meta
    ADD_INPUTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    N_TILES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_mn = tl.program_id(0)
    i_s = tl.program_id(1).to(tl.int64)
    i_g = tl.program_id(2)
    i_m = i_mn // N_TILES
    i_n = i_mn % N_TILES
    width = _pick(i_s, n0, n1, n2)
    slot = tl.load(ids_ptr + i_g).to(tl.int64)
    live = (slot >= 0) & (slot < num_slots)
    if live & (i_m * BLOCK_M < tl.load(counts_ptr + i_g)) & (i_n * BLOCK_N < width):
        tok, m_m = _group_rows(order_ptr, counts_ptr, starts_ptr, i_g, i_m, num_tokens, BLOCK_M)
        o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_n = o_n < width
        p_b = _pick(
            i_s, b0_ptr + slot * stride_b0_l, b1_ptr + slot * stride_b1_l, b2_ptr + slot * stride_b2_l
        )
        acc = _gathered_dot(
            in_ptr + i_s * stride_i_s, stride_i_t, stride_i_r, tok, m_m, p_b + o_n * stride_b_n, m_n,
            stride_b_r, rank, BLOCK_M, BLOCK_N, BLOCK_K, True, DOT_PRECISION,
        )  # fmt: skip
        col = offset_start + _pick(i_s, 0, n0, n0 + n1) + o_n
        p_o = out_ptr + tok[:, None] * stride_o_t + col[None, :] * stride_o_n
        m_o = m_m[:, None] & m_n[None, :]
        if ADD_INPUTS:
            acc += tl.load(p_o, mask=m_o, other=0.0).to(tl.float32)
        tl.store(p_o, acc.to(out_ptr.dtype.element_ty), mask=m_o)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands keep full precision (the default would round them to tf32 on a GPU)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_m(num_tokens: int) -> int:
    return PREFILL_BLOCK_M if num_tokens >= PREFILL_FROM_TOKENS else DECODE_BLOCK_M


def uniform_strides(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The slices share one row and column stride in the kernels; copy them when they do not."""
    if all(w.stride()[1:] == weights[0].stride()[1:] for w in weights):
        return weights
    return [w.contiguous() for w in weights]


def padded3(items: list, fill) -> list:
    return items + [fill] * (SLICES_PER_LAUNCH - len(items))


def _launch_shrink(x, lora_a, out, order, counts, starts, ids, scaling) -> None:
    num_tokens, hidden = x.shape
    rank = lora_a[0].shape[1]
    out.zero_()
    if num_tokens == 0 or rank == 0:
        return
    bm, bn = block_m(num_tokens), min(max(triton.next_power_of_2(rank), 16), 64)
    for s0 in range(0, len(lora_a), SLICES_PER_LAUNCH):
        group = uniform_strides(lora_a[s0 : s0 + SLICES_PER_LAUNCH])
        ptrs = padded3(group, group[0])
        grid = (triton.cdiv(num_tokens, bm) * triton.cdiv(rank, bn), len(group), ids.shape[0])
        _lora_shrink_kernel[grid](
            x, *ptrs, out[s0:], order, counts, starts, ids,
            num_tokens, lora_a[0].shape[0], rank, hidden, scaling,
            x.stride(0), x.stride(1), *(w.stride(0) for w in ptrs), group[0].stride(1), group[0].stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=SHRINK_BLOCK_K, DOT_PRECISION=dot_precision(x.dtype),
        )  # fmt: skip


def _launch_expand(inputs, lora_b, out, order, counts, starts, ids, offset_start, add_inputs) -> None:
    num_tokens, rank = inputs.shape[1], inputs.shape[2]
    if num_tokens == 0:
        return
    bm, bk = block_m(num_tokens), min(max(triton.next_power_of_2(rank), 16), 64)
    col = offset_start
    for s0 in range(0, len(lora_b), SLICES_PER_LAUNCH):
        group = uniform_strides(lora_b[s0 : s0 + SLICES_PER_LAUNCH])
        ptrs = padded3(group, group[0])
        widths = padded3([w.shape[1] for w in group], 0)
        n_tiles = triton.cdiv(max(widths), EXPAND_BLOCK_N)
        grid = (triton.cdiv(num_tokens, bm) * n_tiles, len(group), ids.shape[0])
        _lora_expand_kernel[grid](
            inputs[s0:], *ptrs, out, order, counts, starts, ids,
            num_tokens, lora_b[0].shape[0], rank, *widths, col,
            inputs.stride(0), inputs.stride(1), inputs.stride(2),
            *(w.stride(0) for w in ptrs), group[0].stride(1), group[0].stride(2),
            out.stride(0), out.stride(1),
            ADD_INPUTS=add_inputs, BLOCK_M=bm, BLOCK_N=EXPAND_BLOCK_N, BLOCK_K=bk, N_TILES=n_tiles,
            DOT_PRECISION=dot_precision(lora_b[0].dtype),
        )  # fmt: skip
        col += sum(widths)


def _check_shrink(inputs, lora_a_weights, output_tensor, meta_args) -> list[torch.Tensor]:
    """Shapes, dtypes and devices of :func:`lora_shrink` (metadata only); the 3-D weights."""
    x = check_float("inputs", inputs, 2)
    weights = check_weights("lora_a_weights", lora_a_weights, x.dtype, x.device)
    if weights[0].shape[2] != x.shape[1]:
        raise ValueError(f"lora_a_weights have hidden size {weights[0].shape[2]}, inputs have {x.shape[1]}")
    check_tensor("output_tensor", output_tensor, ndim=3, dtypes=(torch.float32,), device=x.device)
    expected = (len(weights), x.shape[0], weights[0].shape[1])
    if tuple(output_tensor.shape) != expected:
        raise ValueError(
            f"output_tensor must have shape [S, T, R] = {list(expected)}, got {list(output_tensor.shape)}"
        )
    check_meta_args(meta_args, x.shape[0], weights[0].shape[0], x.device)
    return weights


def _check_expand(inputs, lora_b_weights, output_tensor, meta_args, offset_start) -> list[torch.Tensor]:
    """Shapes, dtypes and devices of :func:`lora_expand` (metadata only); the 3-D weights."""
    x = check_float("inputs", inputs, 3)
    check_float("output_tensor", output_tensor, 2, x.device)
    weights = check_weights("lora_b_weights", lora_b_weights, None, x.device)
    if x.shape[0] != len(weights) or x.shape[2] != weights[0].shape[2]:
        raise ValueError(
            f"inputs must have shape [S, T, R] = [{len(weights)}, *, {weights[0].shape[2]}] to match "
            f"lora_b_weights, got {list(x.shape)}"
        )
    if isinstance(offset_start, bool) or not isinstance(offset_start, int) or offset_start < 0:
        raise ValueError(f"offset_start must be an int >= 0, got {offset_start!r}")
    width = offset_start + sum(w.shape[1] for w in weights)
    if output_tensor.shape[0] != x.shape[1] or output_tensor.shape[1] < width:
        raise ValueError(
            f"output_tensor must have {x.shape[1]} rows and >= {width} columns (offset_start + sum of "
            f"slice widths), got {list(output_tensor.shape)}"
        )
    check_meta_args(meta_args, x.shape[1], weights[0].shape[0], x.device)
    return weights


# The ops' input lists, as (lead tensors, per-slice lists) around the six metadata tensors.
SHRINK_INPUTS = (("inputs",), ("lora_a_weights",))
EXPAND_INPUTS = (("inputs",), ("lora_b_weights",))


def _lora_shrink_fake(output_tensor, inputs, scaling) -> None:
    (x,), meta_args, (lora_a_weights,) = split_inputs("lora_shrink", inputs, *SHRINK_INPUTS)
    _check_shrink(x, lora_a_weights, output_tensor, meta_args)


@destination_op("lora_shrink", mutates_args=("output_tensor",), fake=_lora_shrink_fake)
def _lora_shrink_op(output_tensor: torch.Tensor, inputs: list[torch.Tensor | None], scaling: float) -> None:
    """Destination-passing core of :func:`lora_shrink`: ``output_tensor`` ``[S, T, R]`` written;
    ``inputs`` = ``[inputs [T, H_in], *meta_args (the six tensors of LoRAKernelMeta.meta_args), *lora_a_weights
    (S x [L, R, H_in])]``. Checks every shape (here too, so they hold when the wrapper's checks were
    traced away), then the metadata values, then runs."""
    (x,), meta_args, (lora_a_weights,) = split_inputs("lora_shrink", inputs, *SHRINK_INPUTS)
    weights = _check_shrink(x, lora_a_weights, output_tensor, meta_args)
    check_output_apart("output_tensor", output_tensor, {"inputs": x, "lora_a_weights": weights})
    if skip_no_lora(meta_args[5], x):  # a CPU tensor: no device sync
        return
    check_meta_values(meta_args, x.shape[0], weights[0].shape[0])
    meta = meta_args[1:5]
    if LORA_SHRINK.resolve(x.device, (x.dtype,)) == "torch":
        lora_shrink_ref(x, weights, output_tensor, slot_segments(*meta), scaling)
        return
    with on_device(x.device):
        _launch_shrink(x, weights, output_tensor, *meta, scaling)


def _lora_expand_fake(output_tensor, inputs, offset_start, add_inputs) -> None:
    (x,), meta_args, (lora_b_weights,) = split_inputs("lora_expand", inputs, *EXPAND_INPUTS)
    _check_expand(x, lora_b_weights, output_tensor, meta_args, offset_start)


@destination_op("lora_expand", mutates_args=("output_tensor",), fake=_lora_expand_fake)
def _lora_expand_op(
    output_tensor: torch.Tensor, inputs: list[torch.Tensor | None], offset_start: int, add_inputs: bool
) -> None:
    """Destination-passing core of :func:`lora_expand`: ``output_tensor`` ``[T, >= offset_start +
    sum n_s]`` written at the rows of LoRA tokens; ``inputs`` = ``[inputs [S, T, R], *meta_args,
    *lora_b_weights (S x [L, n_s, R])]``; checks as in :func:`_lora_shrink_op`."""
    (x,), meta_args, (lora_b_weights,) = split_inputs("lora_expand", inputs, *EXPAND_INPUTS)
    weights = _check_expand(x, lora_b_weights, output_tensor, meta_args, offset_start)
    check_output_apart("output_tensor", output_tensor, {"inputs": x, "lora_b_weights": weights})
    if skip_no_lora(meta_args[5], x):
        return
    check_meta_values(meta_args, x.shape[1], weights[0].shape[0])
    meta = meta_args[1:5]
    dtypes = (output_tensor.dtype, x.dtype, weights[0].dtype)
    if LORA_EXPAND.resolve(x.device, dtypes) == "torch":
        lora_expand_ref(x, weights, output_tensor, slot_segments(*meta), offset_start, add_inputs)
        return
    with on_device(x.device):
        _launch_expand(x, weights, output_tensor, *meta, offset_start, add_inputs)


def lora_shrink(
    inputs: torch.Tensor,
    lora_a_weights: list[torch.Tensor],
    output_tensor: torch.Tensor,
    *meta_args: torch.Tensor | int | float,
    scaling: float | None = None,
) -> None:
    """``output_tensor[s, t] = scaling * inputs[t] @ A_s[slot(t)]^T`` for every slice ``s``.

    Called as vLLM calls it: ``lora_shrink(inputs, lora_a_weights, output_tensor, *meta.meta_args(T),
    scaling)``.

    Args:
        inputs: ``[T, H_in]`` fp16/bf16/fp32 (float64 on the torch backend only).
        lora_a_weights: list of ``S`` tensors ``[L, R, H_in]`` (or ``[L, 1, R, H_in]``), inputs' dtype.
        output_tensor: ``[S, T, R]`` float32, zeroed then written (rows of slot -1 tokens stay 0);
            must not share memory with inputs or the weights (ValueError, nothing written).
            float32 on every backend, so the intermediate never overflows a half dtype.
        *meta_args: ``*meta.meta_args(T)`` of a :class:`LoRAKernelMeta` prepared for these ``T``
            tokens: ``token_lora_mapping [T], token_indices_sorted_by_lora_ids [T],
            num_tokens_per_lora [G], lora_token_start_loc [G + 1], lora_ids [G], no_lora_flag_cpu
            [1]`` and ``num_active_loras`` (int, vLLM >= 0.32; may be left out, as vLLM < 0.32 does),
            then ``scaling`` unless it is given by keyword.
        scaling: multiplies the result.

    Returns without touching anything when ``no_lora_flag_cpu`` is set (as vLLM does). Otherwise
    the metadata values are checked against the batch (ValueError naming the tensor, nothing
    written): one host read per prepared step, a sync on a GPU, skipped during CUDA-graph capture.

    Example:
        >>> meta = LoRAKernelMeta.make(2, 4, "cpu"); meta.prepare_tensors(torch.tensor([1, -1, 0, 1]))
        >>> out = torch.empty(1, 4, 8); lora_shrink(torch.randn(4, 16), [torch.randn(2, 8, 16)], out,
        ...                                         *meta.meta_args(4), 1.0)
    """
    if scaling is None:
        if not meta_args:
            raise TypeError("lora_shrink needs scaling after the metadata arguments")
        *meta_args, scaling = meta_args
    meta = meta_tensors(meta_args)
    x = check_float("inputs", inputs, 2)
    weights = check_weights("lora_a_weights", lora_a_weights, x.dtype, x.device)
    _lora_shrink_op(output_tensor, [x, *meta, *weights], float(scaling))


def lora_expand(
    inputs: torch.Tensor,
    lora_b_weights: list[torch.Tensor],
    output_tensor: torch.Tensor,
    *meta_args: torch.Tensor | int,
    offset_start: int = 0,
    add_inputs: bool = False,
) -> None:
    """``output_tensor[t, off_s : off_s + n_s] (+)= inputs[s, t] @ B_s[slot(t)]^T`` per slice ``s``.

    Called as vLLM calls it: ``lora_expand(inputs, lora_b_weights, output_tensor,
    *meta.meta_args(T), offset_start=..., add_inputs=...)``.

    Args:
        inputs: ``[S, T, R]`` fp32/fp16/bf16/fp64; the product runs in fp32 on every backend (TF32
            tensor cores for half weights on a GPU), so fp32 inputs beyond the fp16 range do not
            overflow before the product (vLLM casts them to the weights' dtype first).
        lora_b_weights: list of ``S`` tensors ``[L, n_s, R]`` (or ``[L, 1, n_s, R]``), one dtype;
            the widths ``n_s`` may differ (GQA q/k/v).
        output_tensor: ``[T, >= offset_start + sum n_s]`` fp16/bf16/fp32; slice ``s`` lands at
            column ``off_s = offset_start + n_0 + ... + n_{s-1}``. Written (``add_inputs=False``)
            or accumulated (``add_inputs=True``) at the rows of LoRA tokens only, rounded once to
            its dtype (a result beyond the fp16 range becomes inf, as a cast would make it). Must
            not share memory with inputs or the weights (ValueError, nothing written).
        *meta_args: ``*meta.meta_args(T)``: the six tensors and ``num_active_loras``, or the six
            tensors alone, as in :func:`lora_shrink`.
        offset_start, add_inputs: keyword only (vLLM passes them so).

    Returns at once when ``no_lora_flag_cpu`` is set; metadata values checked as in
    :func:`lora_shrink` (one host read per prepared step).
    """
    meta = meta_tensors(meta_args)
    x = check_float("inputs", inputs, 3)
    weights = check_weights("lora_b_weights", lora_b_weights, None, x.device)
    _lora_expand_op(output_tensor, [x, *meta, *weights], offset_start, bool(add_inputs))
