"""Depthwise causal conv1d (causal-conv1d / vLLM semantics): whole sequences, packed sequences with a
state cache, and the decode update.

One kernel serves all three ops. A program computes a ``[BLOCK_D, BLOCK_L]`` output tile of one
sequence as ``W`` shifted loads of the input; positions before the sequence start read the
sequence's initial state (its last columns), or zeros. The program holding the first L-block of
a sequence also writes the sequence's final state (the last ``S`` inputs of ``[state, x]``): it
is the only program that reads the old state, so it may overwrite it in place after a barrier.
With ``cache_seqlens`` (the decode update only) the state is causal-conv1d's circular buffer: the
same reads and writes, with position ``p`` at column ``(head + p) mod S`` instead of ``S + p``.

int64 offsets (checked by listing every ``index * stride`` product in the kernel): the sequence
``seq``, its start token, the slot and the channel base ``d0`` are int64 scalars, and the in-tile
indices ``o_d``, ``o_l`` (and ``pos``, ``col_pos``) and ``o_s`` are int64 too: ``o_l * stride_l``
passes 2^31 for a transposed ``[B, L, D]`` input once ``L x D`` does (stride_l = D), and
``o_d * stride_d`` for a packed ``[D, T]`` input once ``BLOCK_D x T`` does (stride_d = T).
Weight and bias offsets stay below ``D x W``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels import _alloc, _data_checks
from triton_kernels._checks import (
    FLOAT_DTYPES,
    GRAD_DTYPES,
    INDEX_DTYPES,
    check_distinct_rows,
    check_no_overlap,
    check_optional,
    check_shape,
    check_tensor,
    dtypes_of,
    on_device,
    strides,
)
from triton_kernels._ops import destination_op
from triton_kernels._tl_math import silu
from triton_kernels.constants import PAD_SLOT_ID
from triton_kernels.mamba._args import (
    check_default_slots,
    check_index,
    check_pad_slot_id,
    check_query_start_loc,
    pad_slot_of,
)
from triton_kernels.mamba.causal_conv1d_bwd import causal_conv1d_bwd
from triton_kernels.mamba.metadata import MambaVarlenMeta, varlen_arguments
from triton_kernels.mamba.ops_torch import (
    causal_conv1d_fn_ref,
    causal_conv1d_update_ref,
    causal_conv1d_varlen_ref,
)
from triton_kernels.registry import CAUSAL_CONV1D, CAUSAL_CONV1D_UPDATE, CAUSAL_CONV1D_VARLEN

# Output tile: BLOCK_D * BLOCK_L = _TILE elements (16 x 64 for long sequences, 1024 x 1 for decode):
# 8 fp32 accumulators per thread of 4 warps. Each of the W shifted loads costs ~14 registers per
# element (sm_90 build): 2048-element tiles took 220+ registers, 4096 spilled.
_TILE = 1024
_MAX_BLOCK_L = 64
# Widths 2..8 for the conv ops: causal-conv1d's update kernel takes up to 8 (fp16/bf16) and vLLM's conv
# is unbounded; the kernels unroll the W taps, and 8 <= _MAX_BLOCK_L keeps the state read in a
# sequence's first block. The fused mixers (mamba/inner.py, mamba2/split_conv1d_scan.py) keep 2..4.
_MIN_WIDTH, _MAX_WIDTH, _FUSED_MAX_WIDTH = 2, 8, 4


@triton.jit
def _state_col(p, head, state_len, CIRCULAR: tl.constexpr):
    """The state column holding sequence position ``p`` (``-S <= p``; ``p < 0`` the old state):
    ``head + p`` (``head = S``), or with ``CIRCULAR`` ``(head + p) mod S`` (``head >= S``)."""
    if CIRCULAR:
        return (head + p) % state_len
    return head + p


@triton.jit(do_not_specialize=["batch", "seqlen", "n_l_blocks"])  # vary per call
def _causal_conv1d_kernel(
    # pointers
    x_ptr,  # [B, D, L] uniform, [D, T] varlen
    weight_ptr,  # [D, W]
    bias_ptr,  # [D]
    init_ptr,  # [slots, D, S], read where a sequence has an initial state
    final_ptr,  # [slots, D, S], written when WRITE_STATE (may be init_ptr)
    slot_ptr,  # [batch] int, when HAS_SLOTS (else sequence b uses slot b)
    has_init_ptr,  # [batch] bool, when INIT_MODE == 2
    seq_idx_ptr,  # [B, L] int, HAS_SEQ_IDX (uniform only): taps from another sequence read zeros,
    #               positions with seq_idx < 0 are padding (zero output)
    cache_seqlens_ptr,  # [batch] int, CIRCULAR: tokens already written to each row's circular state
    seq_start_ptr,  # [batch + 1] int, IS_VARLEN
    block_seq_ptr,  # [n_blocks] int64, IS_VARLEN: the sequence of each L-block (batch: none)
    block_off_ptr,  # [n_blocks] int64, IS_VARLEN: the index of the L-block within its sequence
    out_ptr,  # like x
    # sizes
    batch,
    seqlen,
    n_l_blocks,
    dim,
    num_slots,
    state_len,
    pad_slot_id,
    # strides
    stride_x_b, stride_x_d, stride_x_l,
    stride_w_d, stride_w_k,
    stride_init_s, stride_init_d, stride_init_k,
    stride_final_s, stride_final_d, stride_final_k,
    stride_out_b, stride_out_d, stride_out_l,
    stride_seq_b, stride_seq_l,
    # meta
    WIDTH: tl.constexpr,
    SILU: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    INIT_MODE: tl.constexpr,  # 0: zeros, 1: every sequence has a state, 2: per-sequence flags
    WRITE_STATE: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    CIRCULAR: tl.constexpr,  # the state is a circular buffer (causal-conv1d's cache_seqlens)
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    i_blk = tl.program_id(0)
    i_d = tl.program_id(1)
    if IS_VARLEN:
        seq = tl.load(block_seq_ptr + i_blk)
        i_l = tl.load(block_off_ptr + i_blk)
        active = seq < batch
        seq = tl.minimum(seq, batch - 1)
        # offsets clamped into [0, seqlen = T] and non-decreasing: values the checks did not see (skipped
        # under capture, or changed after MambaVarlenMeta.prepare) never move a read or write outside x / out
        start = tl.minimum(tl.maximum(tl.load(seq_start_ptr + seq).to(tl.int64), 0), seqlen)
        length = (tl.minimum(tl.maximum(tl.load(seq_start_ptr + seq + 1).to(tl.int64), start), seqlen) - start).to(
            tl.int32)
        x_base = x_ptr + start * stride_x_l
        out_base = out_ptr + start * stride_out_l
    else:
        seq = (i_blk // n_l_blocks).to(tl.int64)
        i_l = i_blk % n_l_blocks
        active = seq < batch
        length = seqlen
        x_base = x_ptr + seq * stride_x_b
        out_base = out_ptr + seq * stride_out_b
    slot = tl.load(slot_ptr + seq).to(tl.int64) if HAS_SLOTS else seq
    d0 = (i_d * BLOCK_D).to(tl.int64)
    x_base += d0 * stride_x_d
    out_base += d0 * stride_out_d
    o_d = tl.arange(0, BLOCK_D).to(tl.int64)
    m_d = o_d < dim - d0
    o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    m_out = m_d[:, None] & (o_l < length)[None, :]
    p_out = out_base + o_d[:, None] * stride_out_d + o_l[None, :] * stride_out_l
    # the initial state covers positions [-n_init, 0): all S columns, or none
    if INIT_MODE == 2:
        n_init = tl.load(has_init_ptr + seq).to(tl.int32) * state_len
    else:
        n_init = state_len if INIT_MODE == 1 else 0
    p_init = init_ptr + slot * stride_init_s + d0 * stride_init_d + o_d[:, None] * stride_init_d
    # the state column of sequence position p < 0: ``S + p`` (the newest input last), or in a circular
    # buffer ``(head + p) mod S`` with head = cache_seqlens mod S (floor mod: a negative count wraps too)
    head = state_len
    if CIRCULAR:
        head = (tl.load(cache_seqlens_ptr + seq).to(tl.int64) % state_len + state_len) % state_len + state_len
    if active:
        if (slot == pad_slot_id) | (slot < 0) | (slot >= num_slots):  # out-of-range only under capture
            tl.store(p_out, tl.zeros((BLOCK_D, BLOCK_L), dtype=out_ptr.dtype.element_ty), mask=m_out)
        else:
            acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
            p_w = weight_ptr + d0 * stride_w_d + o_d * stride_w_d
            if HAS_BIAS:
                acc += tl.load(bias_ptr + d0 + o_d, mask=m_d).to(tl.float32)[:, None]
            if HAS_SEQ_IDX:
                p_seq = seq_idx_ptr + seq * stride_seq_b
                b_seq = tl.load(p_seq + o_l * stride_seq_l, mask=o_l < length, other=-1)
            for k in tl.static_range(WIDTH):
                pos = o_l + (k - (WIDTH - 1))
                b_w = tl.load(p_w + k * stride_w_k, mask=m_d).to(tl.float32)
                m_pos = (pos >= 0) & (pos < length)
                if HAS_SEQ_IDX:  # a tap reaching into the previous sequence of the row reads zero
                    m_pos &= tl.load(p_seq + pos * stride_seq_l, mask=m_pos, other=-1) == b_seq
                m_x = m_d[:, None] & m_pos[None, :]
                b_x = tl.load(x_base + o_d[:, None] * stride_x_d + pos[None, :] * stride_x_l, mask=m_x,
                              other=0.0).to(tl.float32)
                acc += b_w[:, None] * b_x
            if INIT_MODE != 0 and i_l == 0:  # only the first block reaches before the sequence start
                for k in tl.static_range(WIDTH - 1):
                    pos = o_l + (k - (WIDTH - 1))
                    b_w = tl.load(p_w + k * stride_w_k, mask=m_d).to(tl.float32)
                    m_s = m_d[:, None] & ((pos < 0) & (pos >= -n_init))[None, :]
                    b_s = tl.load(p_init + _state_col(pos, head, state_len, CIRCULAR)[None, :] * stride_init_k,
                                  mask=m_s, other=0.0).to(tl.float32)
                    acc += b_w[:, None] * b_s
            if SILU:
                acc = silu(acc)
            if HAS_SEQ_IDX:  # causal-conv1d: a padding position (seq_idx < 0) outputs 0
                acc = tl.where((b_seq >= 0)[None, :], acc, 0.0)
            tl.store(p_out, acc.to(out_ptr.dtype.element_ty), mask=m_out)
            if WRITE_STATE and i_l == 0:
                o_s = tl.arange(0, BLOCK_S).to(tl.int64)
                col_pos = length - state_len + o_s  # the new state's columns as sequence col_positions
                m_col = m_d[:, None] & (o_s < state_len)[None, :]
                b_new = tl.load(x_base + o_d[:, None] * stride_x_d + col_pos[None, :] * stride_x_l,
                                mask=m_col & (col_pos >= 0)[None, :], other=0.0).to(tl.float32)
                if INIT_MODE != 0:
                    m_old = m_col & ((col_pos < 0) & (col_pos >= -n_init))[None, :]
                    b_new += tl.load(p_init + _state_col(col_pos, head, state_len, CIRCULAR)[None, :] * stride_init_k,
                                     mask=m_old, other=0.0).to(tl.float32)
                tl.debug_barrier()  # every old-state read of this tile precedes the overwrite
                # the newest input goes last, or (circular) each input to its own column: a permutation
                o_col = _state_col(col_pos, head, state_len, CIRCULAR) if CIRCULAR else o_s
                p_final = final_ptr + slot * stride_final_s + d0 * stride_final_d
                p_final += o_d[:, None] * stride_final_d + o_col[None, :] * stride_final_k
                tl.store(p_final, b_new.to(final_ptr.dtype.element_ty),
                         mask=m_col)


def _varlen_blocks(query_start_loc: torch.Tensor, num_tokens: int, block_l: int) -> tuple[torch.Tensor, ...]:
    """Per L-block: its sequence and its index inside it, on the device (no host sync). Every
    sequence gets at least one block (it writes the state); the grid is the static upper bound
    ``cdiv(T, BLOCK_L) + batch``, surplus blocks get sequence ``batch`` and exit."""
    lengths = query_start_loc[1:] - query_start_loc[:-1]
    per_seq = ((lengths + block_l - 1) // block_l).clamp_min(1).to(torch.int64)
    ends = torch.cumsum(per_seq, 0)
    n_blocks = triton.cdiv(num_tokens, block_l) + lengths.shape[0]
    blocks = torch.arange(n_blocks, device=query_start_loc.device)
    block_seq = torch.searchsorted(ends, blocks, right=True)
    starts = ends - per_seq
    block_off = blocks - starts[block_seq.clamp(max=lengths.shape[0] - 1)]
    return block_seq, block_off


def _launch_triton(
    x: torch.Tensor,  # [B, D, L] or [D, T] (varlen)
    weight: torch.Tensor,  # [D, W]
    bias: torch.Tensor | None,
    out: torch.Tensor,  # like x
    silu: bool,
    *,
    init: torch.Tensor | None = None,  # [slots, D, S]
    final: torch.Tensor | None = None,  # [slots, D, S]
    slots: torch.Tensor | None = None,  # [batch]
    has_init: torch.Tensor | None = None,  # [batch] bool
    seq_idx: torch.Tensor | None = None,  # [B, L] int, uniform only
    cache_seqlens: torch.Tensor | None = None,  # [batch] int, uniform only: the state is a circular buffer
    query_start_loc: torch.Tensor | None = None,  # [batch + 1], varlen
    pad_slot_id: int = PAD_SLOT_ID,
) -> None:
    varlen = query_start_loc is not None
    dim, width = weight.shape
    # BLOCK_L >= W - 1 whenever a sequence spans several blocks, so only block 0 reads the state
    # (uniform: one block up to _MAX_BLOCK_L >= _MAX_WIDTH positions)
    if varlen:
        batch, num_tokens = query_start_loc.shape[0] - 1, x.shape[1]
        length = num_tokens  # the kernel's seqlen: the bound its offsets are clamped to
        x_strides, out_strides = (0, *x.stride()), (0, *out.stride())
        avg = num_tokens // max(batch, 1)
        block_l = min(_MAX_BLOCK_L, max(4, triton.next_power_of_2(width - 1), triton.next_power_of_2(avg)))
    else:
        batch, length = x.shape[0], x.shape[2]
        x_strides, out_strides = x.stride(), out.stride()
        block_l = min(_MAX_BLOCK_L, triton.next_power_of_2(max(length, 1)))
    if batch == 0 or dim == 0:
        return
    state = init if init is not None else final
    state_len = width - 1 if state is None else state.shape[-1]
    block_s = triton.next_power_of_2(state_len)
    # the state tile [BLOCK_D, BLOCK_S] stays within 4 tiles' worth of registers too
    block_d = min(triton.next_power_of_2(dim), max(16, _TILE // block_l), 4 * _TILE // block_s)
    if varlen:
        block_seq, block_off = _varlen_blocks(query_start_loc, num_tokens, block_l)
        n_l_blocks, n_blocks = 1, block_seq.shape[0]
    else:
        block_seq = block_off = x
        n_l_blocks = max(1, triton.cdiv(length, block_l))  # an empty sequence still writes its state
        n_blocks = batch * n_l_blocks
    init_mode = 0 if init is None else (2 if has_init is not None else 1)
    grid = (n_blocks, triton.cdiv(dim, block_d))
    with on_device(x.device):
        _causal_conv1d_kernel[grid](
            x, weight, x if bias is None else bias,
            x if init is None else init, x if final is None else final,
            x if slots is None else slots,
            x if has_init is None else has_init.view(torch.uint8),
            x if seq_idx is None else seq_idx, x if cache_seqlens is None else cache_seqlens,
            x if query_start_loc is None else query_start_loc, block_seq, block_off, out,
            batch, length, n_l_blocks, dim, state.shape[0] if state is not None else batch, state_len,
            pad_slot_id,
            *x_strides, *weight.stride(), *strides(init, 3), *strides(final, 3), *out_strides, *strides(seq_idx, 2),
            WIDTH=width, SILU=silu, HAS_BIAS=bias is not None, IS_VARLEN=varlen, HAS_SLOTS=slots is not None,
            INIT_MODE=init_mode, WRITE_STATE=final is not None, HAS_SEQ_IDX=seq_idx is not None,
            CIRCULAR=cache_seqlens is not None, BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_S=block_s, num_warps=4,
        )


@destination_op("causal_conv1d_fwd", mutates_args=("out", "final_states"))
def _causal_conv1d_fwd(
    out: torch.Tensor,
    final_states: torch.Tensor | None,
    inputs: list[torch.Tensor | None],
    silu: bool,
) -> None:
    """Destination-passing core of :func:`causal_conv1d_fn` (metadata validated): ``inputs`` is
    ``[x, weight, bias, initial_states, seq_idx]``."""
    x, weight, bias, initial_states, seq_idx = inputs
    if CAUSAL_CONV1D.resolve(x.device, dtypes_of(x, weight, bias, initial_states)) == "torch":
        _, fin = causal_conv1d_fn_ref(x, weight, bias, silu, initial_states, out=out, seq_idx=seq_idx)
        if final_states is not None:
            final_states.copy_(fin)
    else:
        _launch_triton(x, weight, bias, out, silu, init=initial_states, final=final_states, seq_idx=seq_idx)


@destination_op("causal_conv1d_varlen", mutates_args=("out", "conv_states"))
def _causal_conv1d_varlen(
    out: torch.Tensor,
    conv_states: torch.Tensor,
    inputs: list[torch.Tensor | None],
    silu: bool,
    pad_slot_id: int,
    values_checked: bool = False,
) -> None:
    """Destination-passing core of :func:`causal_conv1d_varlen` (metadata validated; ``values_checked``:
    the offsets and slots too, once per step by :class:`MambaVarlenMeta`): ``inputs`` is
    ``[x, weight, bias, query_start_loc, cache_indices, has_initial_state]``."""
    x, weight, bias, query_start_loc, slots, has_initial_state = inputs
    batch = query_start_loc.shape[0] - 1
    pad_slot_id = pad_slot_of(slots, pad_slot_id)  # without cache_indices every sequence is real
    if slots is None:  # here too, not only in the wrapper: a traced call skips the wrapper's eager checks
        check_default_slots("conv_states", conv_states.shape[0], batch, "cache_indices", exact=False)
    if not values_checked:
        _data_checks.check_offsets_and_slots("query_start_loc", query_start_loc, x.shape[1], "cache_indices", slots,
                                             conv_states.shape[0], pad_slot_id, unique=True)
    if CAUSAL_CONV1D_VARLEN.resolve(x.device) == "torch":
        slots = torch.arange(batch, device=x.device) if slots is None else slots
        if has_initial_state is None:
            has_initial_state = torch.zeros(batch, dtype=torch.bool, device=x.device)
        causal_conv1d_varlen_ref(x, weight, bias, conv_states, query_start_loc, slots, has_initial_state,
                                 silu, pad_slot_id, out)
    else:
        init = conv_states if has_initial_state is not None else None
        _launch_triton(x, weight, bias, out, silu, init=init, final=conv_states, slots=slots,
                       has_init=has_initial_state, query_start_loc=query_start_loc, pad_slot_id=pad_slot_id)


@destination_op("causal_conv1d_update", mutates_args=("out", "conv_state"))
def _causal_conv1d_update(
    out: torch.Tensor,
    conv_state: torch.Tensor,
    inputs: list[torch.Tensor | None],
    silu: bool,
    pad_slot_id: int,
) -> None:
    """Destination-passing core of :func:`causal_conv1d_update` (metadata validated): ``inputs`` is
    ``[x, weight, bias, conv_state_indices, cache_seqlens]``, ``x``/``out`` as ``[B, D, L]``."""
    x, weight, bias, slots, cache_seqlens = inputs
    pad_slot_id = pad_slot_of(slots, pad_slot_id)  # without conv_state_indices every row is real
    _data_checks.check_slots("conv_state_indices", slots, conv_state.shape[0], pad_slot_id, unique=True)
    if CAUSAL_CONV1D_UPDATE.resolve(x.device) == "torch":
        slots = torch.arange(x.shape[0], device=x.device) if slots is None else slots
        causal_conv1d_update_ref(x, conv_state, weight, bias, silu, slots, pad_slot_id, out, cache_seqlens)
    else:
        _launch_triton(x, weight, bias, out, silu, init=conv_state, final=conv_state, slots=slots,
                       cache_seqlens=cache_seqlens, pad_slot_id=pad_slot_id)


class _CausalConv1dFn(torch.autograd.Function):
    """Forward and backward (``ifk::causal_conv1d_bwd``: the Triton kernel, or the torch reference's
    closed form) on the chosen backend; both custom ops, so torch.compile traces the backward too."""

    @staticmethod
    def forward(ctx, x, weight, bias, initial_states, seq_idx, silu, return_final_states):
        final = _new_final_states(x, weight) if return_final_states else None
        out = _conv_forward(x, weight, bias, initial_states, seq_idx, final, silu)
        ctx.save_for_backward(x, weight, bias, initial_states, seq_idx)
        ctx.silu = silu
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        x, weight, bias, initial_states, seq_idx = ctx.saved_tensors
        grads = [None if t is None else _alloc.empty_like(t) for t in (x, weight, bias, initial_states)]
        causal_conv1d_bwd(*grads, [x, weight, bias, initial_states, seq_idx, d_out, d_final], ctx.silu)
        return (*grads, None, None, None)


def _new_final_states(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _alloc.empty((*x.shape[:2], weight.shape[1] - 1), x.dtype, x.device)


def _conv_forward(x, weight, bias, initial_states, seq_idx, final, silu: bool) -> torch.Tensor:
    """A new ``out`` like x; the final states written into ``final`` when given."""
    out = _alloc.empty_like(x)
    _causal_conv1d_fwd(out, final, [x, weight, bias, initial_states, seq_idx], silu)
    return out


def _silu_flag(activation: object) -> bool:
    """causal-conv1d's ``activation``: ``None``/``False``, or ``"silu"``/``"swish"``/``True``."""
    if activation is None or activation is False:
        return False
    if activation is True or activation in ("silu", "swish"):
        return True
    raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def _check_weight(weight: object, bias: object, device: torch.device, max_width: int = _FUSED_MAX_WIDTH,
                  dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> int:
    """Validate ``weight [D, W]`` (W in 2..max_width) and ``bias [D]`` (``dtypes``); return D."""
    check_tensor("weight", weight, ndim=2, dtypes=dtypes, device=device)
    if not _MIN_WIDTH <= weight.shape[1] <= max_width:
        raise ValueError(f"weight width W must be in {_MIN_WIDTH}..{max_width}, got {weight.shape[1]} "
                         f"(shape {list(weight.shape)})")
    if check_optional("bias", bias, ndim=1, dtypes=dtypes, device=device) is not None:
        check_shape("bias", bias, [weight.shape[0]])
    return weight.shape[0]


def _check_state_cache(name: str, states: object, dim: int, width: int, device: torch.device,
                       inputs: dict[str, torch.Tensor | None]) -> None:
    """A ``[slots, D, >= W-1]`` cache written in place: each slot its own memory, none shared with ``inputs``."""
    check_tensor(name, states, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    if states.shape[1] != dim or states.shape[2] < width - 1:
        raise ValueError(f"{name} must have shape [slots, {dim}, >= {width - 1}] (D, W - 1), "
                         f"got {list(states.shape)}")
    check_distinct_rows(name, states)
    check_no_overlap(name, states, inputs)


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    final_states_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv1d over whole sequences (causal-conv1d's ``causal_conv1d_fn``).

    Args:
        x: ``[B, D, L]`` fp32/fp16/bf16, any strides (float64 runs on the torch backend: gradient checks).
        weight: ``[D, W]``, W in 2..8; bias: optional ``[D]`` (any of those dtypes).
        activation: ``None`` or ``"silu"``/``"swish"``.
        seq_idx: optional ``[B, L]`` int32/int64, several sequences packed in one row: a tap at a
            position whose ``seq_idx`` differs from the output position's reads zero, so the conv
            never mixes tokens across a change of ``seq_idx`` (not with initial or final states,
            as in causal-conv1d). As in causal-conv1d, a position with ``seq_idx < 0`` is padding:
            its output is 0 (no bias), it feeds no other position, and it gets no gradient.
        initial_states: optional ``[B, D, W-1]``, the inputs before position 0 (default zeros).
        return_final_states: also return the last ``W-1`` inputs, ``[B, D, W-1]`` in x's dtype.
        final_states_out: optional ``[B, D, W-1]`` destination of the final states in x's dtype
            (any strides), written and returned; needs ``return_final_states``; must not overlap x,
            weight, bias or initial_states in memory (ValueError).

    Returns ``out [B, D, L]`` in x's dtype, ``out[b, d, t] = act(bias[d] + sum_k weight[d, k] *
    x[b, d, t - W + 1 + k])``, or ``(out, final_states)``. Differentiable in x, weight, bias and
    initial_states (``ifk::causal_conv1d_bwd``, deterministic), seq_idx and final states included.

    Example:
        >>> out, fin = causal_conv1d_fn(torch.randn(2, 8, 5), torch.randn(8, 4), activation="silu",
        ...                             return_final_states=True)
        >>> out.shape, fin.shape
        (torch.Size([2, 8, 5]), torch.Size([2, 8, 3]))
    """
    check_tensor("x", x, ndim=3, dtypes=GRAD_DTYPES)
    dim = _check_weight(weight, bias, x.device, _MAX_WIDTH, GRAD_DTYPES)
    if x.shape[1] != dim:
        raise ValueError(f"x has {x.shape[1]} channels but weight has {dim} (x shape {list(x.shape)})")
    state_shape = [x.shape[0], dim, weight.shape[1] - 1]
    if check_optional("initial_states", initial_states, ndim=3, dtypes=GRAD_DTYPES, device=x.device) is not None:
        check_shape("initial_states", initial_states, state_shape)
    if check_optional("seq_idx", seq_idx, ndim=2, dtypes=INDEX_DTYPES, device=x.device) is not None:
        check_shape("seq_idx", seq_idx, [x.shape[0], x.shape[2]])
        if initial_states is not None or return_final_states:
            raise ValueError("seq_idx cannot be combined with initial_states or return_final_states "
                             "(as in causal-conv1d: the states belong to one sequence per row)")
    if final_states_out is not None:
        check_tensor("final_states_out", final_states_out, ndim=3, dtypes=(x.dtype,), device=x.device)
        check_shape("final_states_out", final_states_out, state_shape)
        if not return_final_states:
            raise ValueError("final_states_out is given but return_final_states is False")
        check_no_overlap("final_states_out", final_states_out,
                         {"x": x, "weight": weight, "bias": bias, "initial_states": initial_states})
    silu = _silu_flag(activation)
    if not torch.is_grad_enabled() or not any(
            t is not None and t.requires_grad for t in (x, weight, bias, initial_states)):
        final = final_states_out  # inference: the kernel writes the destination itself
        if final is None and return_final_states:
            final = _new_final_states(x, weight)
        out = _conv_forward(x, weight, bias, initial_states, seq_idx, final, silu)
    else:
        out, final = _CausalConv1dFn.apply(x, weight, bias, initial_states, seq_idx, silu, bool(return_final_states))
        if final_states_out is not None:  # a differentiable copy (autograd cannot mark a view dirty)
            final = final_states_out.copy_(final)
    return (out, final) if return_final_states else out


def causal_conv1d_varlen(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_states: torch.Tensor,
    query_start_loc: torch.Tensor,
    cache_indices: torch.Tensor | None = None,
    has_initial_state: torch.Tensor | None = None,
    activation: str | None = "silu",
    pad_slot_id: int = PAD_SLOT_ID,
    *,
    metadata: MambaVarlenMeta | None = None,
) -> torch.Tensor:
    """Causal conv1d over packed sequences with a state cache (vLLM's varlen ``causal_conv1d_fn``).

    Args:
        x: ``[D, T]``, the tokens of all sequences side by side.
        weight: ``[D, W]``, W in 2..8; bias: optional ``[D]``.
        conv_states: ``[slots, D, S]`` with ``S >= W-1``, updated in place: a sequence starts from
            its slot's state where ``has_initial_state`` (else from zeros) and leaves the last S
            inputs of ``[state, x_seq]`` there. Each slot its own memory (not an ``expand``), none
            shared with x, weight or bias (ValueError otherwise).
        query_start_loc: ``[batch + 1]`` int32/int64, sequence i is ``x[:, qsl[i]:qsl[i+1]]``.
        cache_indices: ``[batch]`` slot of each sequence (default: sequence i uses slot i); with
            it, a sequence at ``pad_slot_id`` reads and writes no state and gets zero outputs
            (without it every sequence is real, whatever ``pad_slot_id``). A slot other than the
            pad slot may appear once (ValueError otherwise; under CUDA-graph capture the check is
            skipped and two sequences writing one slot race).
        has_initial_state: ``[batch]`` bool (default: all False).
        ``cache_indices`` and ``has_initial_state`` may be longer than ``batch`` (vLLM pads them for
        CUDA graphs): the entries past ``batch`` are never read.
        metadata: the step's :class:`~triton_kernels.MambaVarlenMeta` in place of query_start_loc (pass
            None), cache_indices, has_initial_state and pad_slot_id: checked once per step, so no host
            read here in eager mode.

    Returns a new ``[D, T]`` tensor in x's dtype (vLLM writes into x; a new tensor keeps x
    reusable and the op functional). Checks ``query_start_loc`` and ``cache_indices`` with one host
    sync (skipped under CUDA-graph capture, where an out-of-range slot counts as the pad slot).

    Example:
        >>> states = torch.zeros(4, 8, 3)
        >>> out = causal_conv1d_varlen(torch.randn(8, 7), torch.randn(8, 4), None, states,
        ...                            torch.tensor([0, 2, 7]), cache_indices=torch.tensor([3, 0]))
        >>> out.shape, bool(states[1:3].eq(0).all())
        (torch.Size([8, 7]), True)
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    dim = _check_weight(weight, bias, x.device, _MAX_WIDTH)
    if x.shape[0] != dim:
        raise ValueError(f"x has {x.shape[0]} channels but weight has {dim} (x shape {list(x.shape)})")
    if metadata is not None:
        query_start_loc, cache_indices, has_initial_state, pad_slot_id = varlen_arguments(
            metadata, (query_start_loc, cache_indices, has_initial_state), x.shape[1], "conv_states", conv_states)
    _check_state_cache("conv_states", conv_states, dim, weight.shape[1], x.device,
                       {"x": x, "weight": weight, "bias": bias})
    batch = check_query_start_loc(query_start_loc, x.device)
    slots = check_index("cache_indices", cache_indices, batch, x.device)
    if slots is None:
        check_default_slots("conv_states", conv_states.shape[0], batch, "cache_indices", exact=False)
    has_initial_state = check_index("has_initial_state", has_initial_state, batch, x.device, (torch.bool,))
    out = _alloc.empty_like(x)
    _causal_conv1d_varlen(
        out, conv_states, [x, weight, bias, query_start_loc.contiguous(), slots, has_initial_state],
        _silu_flag(activation), check_pad_slot_id(pad_slot_id),
        metadata is not None and not torch.compiler.is_compiling(),
    )
    return out


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    cache_seqlens: torch.Tensor | None = None,
    conv_state_indices: torch.Tensor | None = None,
    *,
    pad_slot_id: int = PAD_SLOT_ID,
) -> torch.Tensor:
    """Decode step of the causal conv1d (causal-conv1d's ``causal_conv1d_update``: its argument order;
    vLLM's ``conv_state_indices`` / ``pad_slot_id`` as keywords).

    Args:
        x: ``[B, D]`` or ``[B, D, L]`` new tokens.
        conv_state: ``[slots, D, S]`` with ``S >= W-1``, the last S inputs of each slot, updated in
            place to the last S inputs of ``[state, x]``; the conv reads its last W-1 columns. Each
            slot its own memory, none shared with x, weight or bias (ValueError otherwise).
        weight: ``[D, W]``, W in 2..8; bias: optional ``[D]``.
        cache_seqlens: optional ``[B]`` int32/int64: the state is a circular buffer and row b has
            written ``cache_seqlens[b]`` tokens so far; the conv reads the W-1 columns before
            ``cache_seqlens[b] mod S`` (cyclically) and ``x[b, :, t]`` is written to column
            ``(cache_seqlens[b] + t) mod S`` (when L > S the last S tokens remain). Floor mod: a
            negative count wraps like a positive one. The caller advances ``cache_seqlens``.
        conv_state_indices: ``[B]`` slot of each row (default: row b uses slot b, and then
            ``slots == B``); with it, a row at ``pad_slot_id`` reads and writes no state, its output
            is zero (without it every row is real, whatever ``pad_slot_id``). A slot other than the
            pad slot may appear once (ValueError otherwise; under CUDA-graph capture the check is
            skipped and repeated rows race: the result is undefined). ``conv_state_indices`` and
            ``cache_seqlens`` may be longer than ``B`` (vLLM pads them for CUDA graphs): the entries
            past ``B`` are never read.
        pad_slot_id: keyword only, the slot value of a padded row (vLLM's ``PAD_SLOT_ID``).

    Returns a new tensor like ``x`` (its dtype). Validating ``conv_state_indices`` syncs with the
    device once (range and repeats; skipped under CUDA-graph capture, where out-of-range rows are
    treated as pad rows).

    Example:
        >>> state = torch.zeros(2, 8, 3)
        >>> causal_conv1d_update(torch.randn(2, 8), state, torch.randn(8, 4), activation="silu").shape
        torch.Size([2, 8])
    """
    check_tensor("x", x, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    dim = _check_weight(weight, bias, x.device, _MAX_WIDTH)
    if x.shape[1] != dim:
        raise ValueError(f"x has {x.shape[1]} channels but weight has {dim} (x shape {list(x.shape)})")
    _check_state_cache("conv_state", conv_state, dim, weight.shape[1], x.device,
                       {"x": x, "weight": weight, "bias": bias})
    slots = check_index("conv_state_indices", conv_state_indices, x.shape[0], x.device)
    if slots is None:
        check_default_slots("conv_state", conv_state.shape[0], x.shape[0], "conv_state_indices", exact=True)
    cache_seqlens = check_index("cache_seqlens", cache_seqlens, x.shape[0], x.device)
    out = _alloc.empty_like(x)
    x3, out3 = (x, out) if x.dim() == 3 else (x.unsqueeze(-1), out.unsqueeze(-1))
    _causal_conv1d_update(out3, conv_state, [x3, weight, bias, slots, cache_seqlens], _silu_flag(activation),
                          check_pad_slot_id(pad_slot_id))
    return out
