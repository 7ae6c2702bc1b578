"""Backward of the depthwise causal conv1d over whole sequences (``causal_conv1d_fn``), registered as
``ifk::causal_conv1d_bwd``.

With ``xs = [initial_states (or zeros), x]``, ``pre[t] = bias + sum_k w[k] xs[t + k]`` and ``g`` the
gradient reaching ``pre`` (``d_out``, times ``silu'(pre)`` with ``pre`` recomputed from x):

- ``d_x[p] = sum_s w[W-1-s] g[p + s]`` (+ ``d_final`` on the last W-1 positions),
- ``d_initial_states[j] = sum_s w[W-1-s] g[j - (W-1) + s]`` (+ ``d_final`` where L < W-1),
- ``d_weight[k] = sum_{b,t} g[t] xs[t + k]``, ``d_bias = sum_{b,t} g[t]``;

with ``seq_idx``, a tap joins two positions only where both have the same ``seq_idx``, and ``g`` is 0
at padding positions (``seq_idx < 0``, whose output is a constant 0, as in causal-conv1d). A program
owns a ``[BLOCK_D, BLOCK_L]`` tile of ``d_x`` and recomputes ``g`` at the W shifts it needs (loads
that hit the cache) instead of writing ``g`` out and reading it back. ``d_weight`` and ``d_bias``
are reductions over batch and length: each program walks up to ``_TILES_PER_PROGRAM`` tiles of one
sequence and writes its partial sums to one row of a fp32 workspace, which a fixed-order
``sum(0)`` finishes - no atomics, so the same inputs give bit-identical gradients.

int64 offsets: the sequence ``i_b``, the channel base ``d0``, the in-tile ``o_d``, the workspace row
and every position multiplied by a stride (``o_l64``, a tap's shift: :func:`_off`) are int64:
``o_l * stride_l`` passes 2^31 for a transposed ``[B, L, D]`` input once ``L x D`` does. Positions
compared in masks stay int32 (L < 2^31; int64 there cost registers and spilled on sm_90). Weight
offsets stay below ``D x W``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels import _alloc
from triton_kernels._checks import check_shape, dtypes_of, on_device, strides
from triton_kernels._ops import destination_op
from triton_kernels._tl_math import silu_grad
from triton_kernels.mamba.ops_torch import causal_conv1d_bwd_ref
from triton_kernels.registry import CAUSAL_CONV1D

# d_x tile: at most _TILE elements (16 x 64 for long sequences), 8 fp32 values per thread of 4 warps,
# and at most _MAX_BLOCK_D channels: a 128 x 8 tile (short sequences) took 255 registers and spilled
# on sm_90 (every per-channel vector - weights, bias, row pointers - is 8 registers per thread there);
# 32 x 8 takes 111.
_TILE = 1024
_MAX_BLOCK_L = 64
_MAX_BLOCK_D = 32
# L-tiles one program walks (one workspace row of d_weight/d_bias partials each program): 512
# positions keep the partials a few % of the traffic and still give B * L/512 * D/16 programs
# (2048 at B 2, D 4096, L 2048). A fixed number: the reduction order depends on the shape only.
_TILES_PER_PROGRAM = 8


@triton.jit
def _off(c: tl.constexpr, stride):
    """``c * stride`` as int64 (a tap's shift times a stride may pass 2^31 for a huge stride)."""
    return tl.full((), c, tl.int64) * stride


@triton.jit
def _tap(p_xt, p_it, p_st, pos, b_seq, m_d, m_t, n_init, stride_x_l, stride_init_k, stride_seq_l,
         C: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ_IDX: tl.constexpr):
    """``xs`` at input positions ``src = pos + C`` as a ``[BLOCK_D, n]`` fp32 tile: x where ``src >= 0``,
    the initial state's column ``W-1 + src`` where ``-n_init <= src < 0``, else 0; and 0 where the
    output position does not count (``m_t``) or, with ``HAS_SEQ_IDX``, where ``seq_idx[src]`` differs
    from the output position's ``b_seq``. ``p_xt``, ``p_it``, ``p_st``: the x, initial-state and
    seq_idx pointers at ``pos`` (one pointer tile per program tile; a tap adds a scalar)."""
    src = pos + C
    m_x = (src >= 0) & m_t
    if HAS_SEQ_IDX:
        m_x &= tl.load(p_st + _off(C, stride_seq_l), mask=m_x, other=-1) == b_seq
    b_x = tl.load(p_xt + _off(C, stride_x_l), mask=m_d[:, None] & m_x[None, :], other=0.0).to(tl.float32)
    if HAS_INIT:  # n_init = 0 in tiles that do not reach before the sequence start
        m_s = (src < 0) & (src >= -n_init) & m_t
        b_x += tl.load(p_it + _off(C, stride_init_k), mask=m_d[:, None] & m_s[None, :], other=0.0).to(tl.float32)
    return b_x


@triton.jit
def _grad_pre(p_xt, p_it, p_st, p_dot, p_w, b_bias, pos, m_d, seqlen, n_init,
              stride_x_l, stride_init_k, stride_seq_l, stride_do_l, stride_w_k,
              SHIFT: tl.constexpr, WIDTH: tl.constexpr, SILU: tl.constexpr, HAS_INIT: tl.constexpr,
              HAS_SEQ_IDX: tl.constexpr):
    """``g``, the gradient reaching the pre-activation at output positions ``t = pos + SHIFT``, as a
    ``[BLOCK_D, n]`` fp32 tile: ``d_out``, times ``silu'(pre)`` with ``pre`` recomputed; 0 outside
    ``[0, seqlen)`` and at padding positions (``seq_idx < 0``: a constant 0 output). Pointers at
    ``pos`` as in :func:`_tap`, ``p_dot`` into d_out."""
    t = pos + SHIFT
    m_t = (t >= 0) & (t < seqlen)
    b_seq = 0
    if HAS_SEQ_IDX:
        b_seq = tl.load(p_st + _off(SHIFT, stride_seq_l), mask=m_t, other=-1)
        m_t &= b_seq >= 0
    b_g = tl.load(p_dot + _off(SHIFT, stride_do_l), mask=m_d[:, None] & m_t[None, :], other=0.0).to(tl.float32)
    if SILU:
        b_pre = tl.zeros_like(b_g) + b_bias[:, None]
        for k in tl.static_range(WIDTH):
            b_w = tl.load(p_w + k * stride_w_k, mask=m_d).to(tl.float32)
            b_pre += b_w[:, None] * _tap(p_xt, p_it, p_st, pos, b_seq, m_d, m_t, n_init, stride_x_l, stride_init_k,
                                         stride_seq_l, SHIFT + k - (WIDTH - 1), HAS_INIT, HAS_SEQ_IDX)
        b_g *= silu_grad(b_pre)
    return b_g


@triton.jit(do_not_specialize=["seqlen", "n_chunks", "tiles_per_program"])  # vary per call
def _causal_conv1d_bwd_kernel(
    # pointers
    x_ptr,  # [B, D, L]
    weight_ptr,  # [D, W]
    bias_ptr,  # [D], HAS_BIAS
    init_ptr,  # [B, D, W-1], HAS_INIT
    seq_idx_ptr,  # [B, L] int, HAS_SEQ_IDX
    dout_ptr,  # [B, D, L]
    dfinal_ptr,  # [B, D, W-1], HAS_DFINAL
    dx_ptr,  # [B, D, L]
    dinit_ptr,  # [B, D, W-1], HAS_INIT
    dw_ptr,  # [B * n_chunks, D, W] fp32 workspace: this program's d_weight partial
    db_ptr,  # [B * n_chunks, D] fp32 workspace, HAS_BIAS: its d_bias partial
    # sizes
    seqlen,
    n_chunks,
    tiles_per_program,
    dim,
    # strides
    stride_x_b, stride_x_d, stride_x_l,
    stride_w_d, stride_w_k,
    stride_init_b, stride_init_d, stride_init_k,
    stride_seq_b, stride_seq_l,
    stride_do_b, stride_do_d, stride_do_l,
    stride_df_b, stride_df_d, stride_df_k,
    stride_dx_b, stride_dx_d, stride_dx_l,
    stride_di_b, stride_di_d, stride_di_k,
    # meta
    WIDTH: tl.constexpr,
    SILU: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_DFINAL: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next_power_of_2(W - 1)
    BLOCK_W: tl.constexpr,  # next_power_of_2(W)
):
    i_c = tl.program_id(0).to(tl.int64)  # sequence * n_chunks + chunk: the workspace row
    i_d = tl.program_id(1)
    i_b = i_c // n_chunks
    i_chunk = tl.program_id(0) % n_chunks
    d0 = (i_d * BLOCK_D).to(tl.int64)
    o_d = tl.arange(0, BLOCK_D).to(tl.int64)
    m_d = o_d < dim - d0
    p_x = x_ptr + i_b * stride_x_b + (d0 + o_d)[:, None] * stride_x_d
    p_do = dout_ptr + i_b * stride_do_b + (d0 + o_d)[:, None] * stride_do_d
    p_init = init_ptr + i_b * stride_init_b + (d0 + o_d)[:, None] * stride_init_d
    p_df = dfinal_ptr + i_b * stride_df_b + (d0 + o_d)[:, None] * stride_df_d
    p_seq = seq_idx_ptr + i_b * stride_seq_b
    p_w = weight_ptr + (d0 + o_d) * stride_w_d
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + d0 + o_d, mask=m_d).to(tl.float32)
    else:
        b_bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    o_k = tl.arange(0, BLOCK_W)
    acc_dw = tl.zeros((BLOCK_D, BLOCK_W), dtype=tl.float32)
    acc_db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(tiles_per_program):
        l0 = (i_chunk * tiles_per_program + i) * BLOCK_L
        o_l = l0 + tl.arange(0, BLOCK_L)  # positions in int32 (masks); offsets below in int64
        o_l64 = o_l.to(tl.int64)
        m_l = o_l < seqlen
        n_init = tl.where(l0 < WIDTH - 1, WIDTH - 1, 0) if HAS_INIT else 0  # initial-state columns in reach
        p_xt = p_x + o_l64[None, :] * stride_x_l
        p_it = p_init + (WIDTH - 1 + o_l64)[None, :] * stride_init_k
        p_st = p_seq + o_l64 * stride_seq_l
        p_dot = p_do + o_l64[None, :] * stride_do_l
        b_seq = tl.load(p_st, mask=m_l, other=-1) if HAS_SEQ_IDX else 0
        # s = 0: g at the tile's own positions, also the d_weight / d_bias terms
        b_g = _grad_pre(p_xt, p_it, p_st, p_dot, p_w, b_bias, o_l, m_d, seqlen, n_init, stride_x_l, stride_init_k,
                        stride_seq_l, stride_do_l, stride_w_k, 0, WIDTH, SILU, HAS_INIT, HAS_SEQ_IDX)
        acc_db += tl.sum(b_g, axis=1)
        for k in tl.static_range(WIDTH):
            b_xk = _tap(p_xt, p_it, p_st, o_l, b_seq, m_d, m_l, n_init, stride_x_l, stride_init_k, stride_seq_l,
                        k - (WIDTH - 1), HAS_INIT, HAS_SEQ_IDX)
            acc_dw += tl.where(o_k[None, :] == k, tl.sum(b_g * b_xk, axis=1)[:, None], 0.0)
        b_dx = tl.load(p_w + (WIDTH - 1) * stride_w_k, mask=m_d).to(tl.float32)[:, None] * b_g
        for s in tl.static_range(1, WIDTH):  # output p + s reads input p through tap W-1-s
            b_g = _grad_pre(p_xt, p_it, p_st, p_dot, p_w, b_bias, o_l, m_d, seqlen, n_init, stride_x_l,
                            stride_init_k, stride_seq_l, stride_do_l, stride_w_k, s, WIDTH, SILU, HAS_INIT,
                            HAS_SEQ_IDX)
            if HAS_SEQ_IDX:
                m_same = tl.load(p_st + _off(s, stride_seq_l), mask=(o_l + s) < seqlen, other=-2) == b_seq
                b_g = tl.where(m_same[None, :], b_g, 0.0)
            b_dx += tl.load(p_w + (WIDTH - 1 - s) * stride_w_k, mask=m_d).to(tl.float32)[:, None] * b_g
        if HAS_DFINAL:  # the final states are the last W-1 inputs
            o_f = o_l - (seqlen - (WIDTH - 1))
            m_f = m_d[:, None] & ((o_f >= 0) & m_l)[None, :]
            b_dx += tl.load(p_df + o_f.to(tl.int64)[None, :] * stride_df_k, mask=m_f, other=0.0).to(tl.float32)
        p_dx = dx_ptr + i_b * stride_dx_b + (d0 + o_d)[:, None] * stride_dx_d + o_l64[None, :] * stride_dx_l
        tl.store(p_dx, b_dx.to(dx_ptr.dtype.element_ty), mask=m_d[:, None] & m_l[None, :])
    p_dw = dw_ptr + (i_c * dim + d0 + o_d)[:, None] * WIDTH + o_k[None, :]
    tl.store(p_dw, acc_dw, mask=m_d[:, None] & (o_k < WIDTH)[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + i_c * dim + d0 + o_d, acc_db, mask=m_d)
    if HAS_INIT and i_chunk == 0:  # d_initial_states (the W-1 positions before the start): chunk 0
        o_s = tl.arange(0, BLOCK_S)
        m_s = o_s < WIDTH - 1
        pos = o_s - (WIDTH - 1)
        p_xt = p_x + pos.to(tl.int64)[None, :] * stride_x_l  # only read at positions >= 0
        p_it = p_init + o_s[None, :] * stride_init_k
        p_st = p_seq + pos.to(tl.int64) * stride_seq_l
        p_dot = p_do + pos.to(tl.int64)[None, :] * stride_do_l
        b_di = tl.zeros((BLOCK_D, BLOCK_S), dtype=tl.float32)
        for s in tl.static_range(1, WIDTH):
            b_g = _grad_pre(p_xt, p_it, p_st, p_dot, p_w, b_bias, pos, m_d, seqlen, WIDTH - 1, stride_x_l,
                            stride_init_k, stride_seq_l, stride_do_l, stride_w_k, s, WIDTH, SILU, HAS_INIT,
                            HAS_SEQ_IDX)
            b_di += tl.load(p_w + (WIDTH - 1 - s) * stride_w_k, mask=m_d).to(tl.float32)[:, None] * b_g
        if HAS_DFINAL:  # a sequence shorter than W-1 passes state columns on to the final states
            o_f = o_s - seqlen
            m_f = m_d[:, None] & ((o_f >= 0) & m_s)[None, :]
            b_di += tl.load(p_df + o_f[None, :] * stride_df_k, mask=m_f, other=0.0).to(tl.float32)
        p_di = dinit_ptr + i_b * stride_di_b + (d0 + o_d)[:, None] * stride_di_d + o_s[None, :] * stride_di_k
        tl.store(p_di, b_di.to(dinit_ptr.dtype.element_ty), mask=m_d[:, None] & m_s[None, :])


def _launch_triton_bwd(
    d_x: torch.Tensor,  # [B, D, L]
    d_weight: torch.Tensor,  # [D, W]
    d_bias: torch.Tensor | None,  # [D]
    d_init: torch.Tensor | None,  # [B, D, W-1]
    x: torch.Tensor,  # [B, D, L]
    weight: torch.Tensor,  # [D, W]
    bias: torch.Tensor | None,  # [D]
    init: torch.Tensor | None,  # [B, D, W-1]
    seq_idx: torch.Tensor | None,  # [B, L] int
    d_out: torch.Tensor,  # [B, D, L]
    d_final: torch.Tensor | None,  # [B, D, W-1]
    silu: bool,
) -> None:
    batch, dim, length = x.shape
    width = weight.shape[1]
    if batch == 0 or dim == 0:
        d_weight.zero_()
        if d_bias is not None:
            d_bias.zero_()
        return
    block_l = min(_MAX_BLOCK_L, triton.next_power_of_2(max(length, 1)))
    block_d = min(triton.next_power_of_2(dim), max(16, _TILE // block_l), _MAX_BLOCK_D)
    n_tiles = max(1, triton.cdiv(length, block_l))  # an empty sequence still writes its partials
    tiles_per_program = min(_TILES_PER_PROGRAM, n_tiles)
    n_chunks = triton.cdiv(n_tiles, tiles_per_program)
    # every row written by its program: fixed-order sums below, no atomics
    ws_w = _alloc.empty((batch * n_chunks, dim, width), torch.float32, x.device)
    ws_b = None if bias is None else _alloc.empty((batch * n_chunks, dim), torch.float32, x.device)
    grid = (batch * n_chunks, triton.cdiv(dim, block_d))
    with on_device(x.device):
        _causal_conv1d_bwd_kernel[grid](
            x, weight, x if bias is None else bias, x if init is None else init,
            x if seq_idx is None else seq_idx, d_out, x if d_final is None else d_final,
            d_x, d_x if d_init is None else d_init, ws_w, ws_w if ws_b is None else ws_b,
            length, n_chunks, tiles_per_program, dim,
            *x.stride(), *weight.stride(), *strides(init, 3), *strides(seq_idx, 2), *d_out.stride(),
            *strides(d_final, 3), *d_x.stride(), *strides(d_init, 3),
            WIDTH=width, SILU=silu, HAS_BIAS=bias is not None, HAS_INIT=init is not None,
            HAS_DFINAL=d_final is not None, HAS_SEQ_IDX=seq_idx is not None,
            BLOCK_D=block_d, BLOCK_L=block_l, BLOCK_S=triton.next_power_of_2(width - 1),
            BLOCK_W=triton.next_power_of_2(width), num_warps=4,
        )
    d_weight.copy_(ws_w.sum(0))  # fixed order: deterministic
    if d_bias is not None:
        d_bias.copy_(ws_b.sum(0))


@destination_op("causal_conv1d_bwd", mutates_args=("d_x", "d_weight", "d_bias", "d_initial_states"))
def causal_conv1d_bwd(
    d_x: torch.Tensor,
    d_weight: torch.Tensor,
    d_bias: torch.Tensor | None,
    d_initial_states: torch.Tensor | None,
    inputs: list[torch.Tensor | None],
    silu: bool,
) -> None:
    """Destination-passing backward of ``causal_conv1d_fn`` (forward arguments validated):
    ``inputs`` is ``[x, weight, bias, initial_states, seq_idx, d_out, d_final]``, ``d_out`` like x,
    ``d_final`` ``[B, D, W-1]`` or None; writes ``d_x`` (x's shape), ``d_weight [D, W]``, ``d_bias
    [D]`` (given iff bias is) and ``d_initial_states [B, D, W-1]`` (given iff initial_states is)."""
    x, weight, bias, initial_states, seq_idx, d_out, d_final = inputs
    # here, not in a wrapper: under torch.compile only the op's own body runs with real tensors
    check_shape("d_out", d_out, list(x.shape))
    if d_final is not None:
        check_shape("d_final", d_final, [*x.shape[:2], weight.shape[1] - 1])
    if CAUSAL_CONV1D.resolve(x.device, dtypes_of(x, weight, bias, initial_states)) == "torch":
        grads = causal_conv1d_bwd_ref(x, weight, bias, silu, initial_states, d_out, d_final, seq_idx)
        for dest, grad in zip((d_x, d_weight, d_bias, d_initial_states), grads):
            if dest is not None:
                dest.copy_(grad)
    else:
        _launch_triton_bwd(d_x, d_weight, d_bias, d_initial_states, x, weight, bias, initial_states, seq_idx,
                           d_out, d_final, silu)
