"""Mamba-2 SSD (state-space duality) core in Triton: the chunked scan over packed sequences.

:func:`ssd_core_triton` implements the shared SSD core contract (see ``ssd_core_torch``): per
sequence, ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = C_t h_t + D x_t``, ``y *= silu(z)``.

Tokens are cut into chunks that start at each sequence's first token (a host-built chunk table,
one small host->device copy), so no chunk spans two sequences. Three launches:

1. ``_ssd_chunk_state_kernel`` per (chunk, head, p/n tile): dt (bias, softplus, clamp), the
   chunk-local cumsum of ``dt A`` (written to a ``[2, h, T]`` fp32 scratch with dt), and the
   chunk's own state ``sum_t exp(dA_end - dA_t) dt_t x_t^T B_t`` by ``tl.dot`` over K-blocks with
   an online rescale (one pass, every exponent <= 0). The first chunk of a sequence also copies the
   sequence's initial state (or zeros) into the scratch: every read of ``init_states`` happens in
   this launch, before launch 2 writes any final row, so the two may share storage freely.
2. ``_ssd_state_passing_kernel`` per (sequence, head, p/n tile): walks the sequence's chunks in
   order, turning the chunk states in place into the states entering (and leaving) each chunk,
   and writes the final state.
3. ``_ssd_chunk_scan_kernel`` per (chunk, head, row block, p tile):
   ``y = exp(dA_t) C_t prev^T + sum_{s<=t} (C_t . B_s) exp(dA_t - dA_s) dt_s x_s + D x_t``, then
   ``* silu(z_t)``, with ``tl.dot`` (C.B^T computed in the program, no ``[chunks, g, L, L]`` buffer).

State scratch: a sequence with ``k`` chunks owns ``k + 1`` consecutive slots ``[h, p, n]`` fp32;
chunk ``c`` of sequence ``s`` enters with slot ``c + s`` and writes its own state to ``c + s + 1``.
An empty sequence gets one chunk of length 0, so its final state is its initial state.

Offsets: token positions, slots and state rows become int64 scalars in each tile's base pointer
(``position * stride`` passes 2^31 beyond ~16M tokens x 128 heads); offsets inside a tile are int32.
Configs are hand-picked (launch 2 updates state in place: no autotune, STYLE.md rule 7).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from triton_kernels import _alloc
from triton_kernels._checks import on_device
from triton_kernels._tl_math import silu, softplus


@triton.jit(do_not_specialize=["num_tokens"])
def _ssd_chunk_state_kernel(
    # pointers
    x_ptr,  # [T, h, p]
    dt_ptr,  # [T, h]
    a_ptr,  # [h]
    b_ptr,  # [T, g, n]
    dt_bias_ptr,  # [h], HAS_DT_BIAS
    init_ptr,  # [S_in, h, p, n], HAS_INIT
    init_index_ptr,  # [nseq] int64, -1 = zeros
    chunk_seq_ptr,  # [nchunks] int64
    chunk_start_ptr,  # [nchunks] int64, first token
    chunk_len_ptr,  # [nchunks] int64
    seq_chunk_ptr,  # [nseq + 1] int64, first chunk of each sequence
    states_ptr,  # [nchunks + nseq, h, p, n] fp32 scratch (written)
    dtc_ptr,  # [2, h, T] fp32 scratch (written): processed dt, chunk-local cumsum of dt * A
    # sizes
    num_tokens,
    headdim,
    dstate,
    heads_per_group,
    dt_lo,
    dt_hi,
    # strides
    stride_x_t, stride_x_h, stride_x_p,
    stride_dt_t, stride_dt_h,
    stride_b_t, stride_b_g, stride_b_n,
    stride_init_s, stride_init_h, stride_init_p, stride_init_n,
    stride_st_s, stride_st_h, stride_st_p, stride_st_n,
    # meta
    HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    DT_CLAMP: tl.constexpr,
    HAS_INIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_h = tl.program_id(1).to(tl.int64)
    i_pn = tl.program_id(2)
    n_nb = tl.cdiv(dstate, BLOCK_N)
    i_p, i_n = i_pn // n_nb, i_pn % n_nb
    seq = tl.load(chunk_seq_ptr + i_c)
    start = tl.load(chunk_start_ptr + i_c)
    length = tl.load(chunk_len_ptr + i_c).to(tl.int32)
    a = tl.load(a_ptr + i_h).to(tl.float32)
    if HAS_DT_BIAS:
        bias = tl.load(dt_bias_ptr + i_h).to(tl.float32)

    o_k = tl.arange(0, BLOCK_K)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_p, m_n = o_p < headdim, o_n < dstate
    x_base = x_ptr + start * stride_x_t + i_h * stride_x_h
    b_base = b_ptr + start * stride_b_t + (i_h // heads_per_group) * stride_b_g
    dt_base = dt_ptr + start * stride_dt_t + i_h * stride_dt_h
    dtc_base = dtc_ptr + i_h * num_tokens + start
    write_dtc = i_pn == 0

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)  # the chunk's state so far, decayed to the block end
    cum = 0.0  # dA summed over the previous K-blocks
    # tile pointers are rebuilt per K-block from aranges (carrying [64, 128] pointer tiles costs 128 registers)
    for k0 in range(0, length, BLOCK_K):
        o_t = k0 + o_k
        m_k = o_t < length
        b_dt = tl.load(dt_base + o_t * stride_dt_t, mask=m_k, other=0.0).to(tl.float32)
        if HAS_DT_BIAS:
            b_dt += bias
        if DT_SOFTPLUS:
            b_dt = softplus(b_dt)
        if DT_CLAMP:
            b_dt = tl.minimum(tl.maximum(b_dt, dt_lo), dt_hi)
        b_dt = tl.where(m_k, b_dt, 0.0)
        b_da = b_dt * a
        b_cum = tl.cumsum(b_da, axis=0)
        blk = tl.sum(b_da, axis=0)
        if write_dtc:
            tl.store(dtc_base + o_t, b_dt, mask=m_k)
            tl.store(dtc_base + num_tokens * tl.num_programs(1).to(tl.int64) + o_t, cum + b_cum, mask=m_k)
        p_x = x_base + o_p[:, None] * stride_x_p + o_t[None, :] * stride_x_t  # [BLOCK_P, BLOCK_K]
        b_x = tl.load(p_x, mask=m_p[:, None] & m_k[None, :], other=0.0)
        p_b = b_base + o_t[:, None] * stride_b_t + o_n[None, :] * stride_b_n  # [BLOCK_K, BLOCK_N]
        b_b = tl.load(p_b, mask=m_k[:, None] & m_n[None, :], other=0.0).to(tl.float32)
        b_b = (b_b * (tl.exp(blk - b_cum) * b_dt)[:, None]).to(b_x.dtype)
        acc = acc * tl.exp(blk) + tl.dot(b_x, b_b, input_precision=DOT_PRECISION)
        cum += blk

    slot = i_c + seq  # the slot this chunk enters with; its own state goes to slot + 1
    o_st = i_h * stride_st_h + o_p[:, None] * stride_st_p + o_n[None, :] * stride_st_n
    m_pn = m_p[:, None] & m_n[None, :]
    tl.store(states_ptr + (slot + 1) * stride_st_s + o_st, acc, mask=m_pn)
    if i_c == tl.load(seq_chunk_ptr + seq):  # first chunk: the initial state enters the scratch
        b_init = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        if HAS_INIT:
            row = tl.load(init_index_ptr + seq)
            if row >= 0:
                p_init = (init_ptr + row * stride_init_s + i_h * stride_init_h + o_p[:, None] * stride_init_p
                          + o_n[None, :] * stride_init_n)
                b_init = tl.load(p_init, mask=m_pn, other=0.0).to(tl.float32)
        tl.store(states_ptr + slot * stride_st_s + o_st, b_init, mask=m_pn)


@triton.jit(do_not_specialize=["num_tokens"])
def _ssd_state_passing_kernel(
    # pointers
    states_ptr,  # [nchunks + nseq, h, p, n] fp32 scratch (updated in place)
    dtc_ptr,  # [2, h, T] fp32 scratch (read: the cumsum of dt * A)
    chunk_start_ptr,  # [nchunks] int64
    chunk_len_ptr,  # [nchunks] int64
    seq_chunk_ptr,  # [nseq + 1] int64
    final_ptr,  # [S_out, h, p, n], HAS_FINAL
    final_index_ptr,  # [nseq] int64, -1 = not written
    # sizes
    num_tokens,
    headdim,
    dstate,
    # strides
    stride_st_s, stride_st_h, stride_st_p, stride_st_n,
    stride_fin_s, stride_fin_h, stride_fin_p, stride_fin_n,
    # meta
    HAS_FINAL: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_pn = tl.program_id(2)
    n_nb = tl.cdiv(dstate, BLOCK_N)
    o_p = (i_pn // n_nb) * BLOCK_P + tl.arange(0, BLOCK_P)
    o_n = (i_pn % n_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_pn = (o_p < headdim)[:, None] & (o_n < dstate)[None, :]
    c_first = tl.load(seq_chunk_ptr + seq)
    c_end = tl.load(seq_chunk_ptr + seq + 1)
    p_st = states_ptr + (c_first + seq) * stride_st_s + i_h * stride_st_h
    p_st += o_p[:, None] * stride_st_p + o_n[None, :] * stride_st_n
    p_cum = dtc_ptr + (tl.num_programs(1) + i_h) * num_tokens

    state = tl.load(p_st, mask=m_pn, other=0.0)  # the initial state
    for c in range(c_first, c_end):
        start = tl.load(chunk_start_ptr + c)
        length = tl.load(chunk_len_ptr + c)
        da_total = tl.load(p_cum + start + length - 1, mask=length > 0, other=0.0)
        p_st += stride_st_s
        state = state * tl.exp(da_total) + tl.load(p_st, mask=m_pn, other=0.0)
        tl.store(p_st, state, mask=m_pn)  # the state leaving chunk c (entering c + 1; the backward reads it)
    if HAS_FINAL:
        row = tl.load(final_index_ptr + seq)
        if row >= 0:
            p_fin = final_ptr + row * stride_fin_s + i_h * stride_fin_h
            p_fin += o_p[:, None] * stride_fin_p + o_n[None, :] * stride_fin_n
            tl.store(p_fin, state.to(final_ptr.dtype.element_ty), mask=m_pn)


@triton.jit(do_not_specialize=["num_tokens"])
def _ssd_chunk_scan_kernel(
    # pointers
    out_ptr,  # [T, h, p] (written)
    x_ptr,  # [T, h, p]
    b_ptr,  # [T, g, n]
    c_ptr,  # [T, g, n]
    d_ptr,  # [h] or [h, p], HAS_D
    z_ptr,  # [T, h, p], HAS_Z
    chunk_seq_ptr,  # [nchunks] int64
    chunk_start_ptr,  # [nchunks] int64
    chunk_len_ptr,  # [nchunks] int64
    states_ptr,  # [nchunks + nseq, h, p, n] fp32: the state entering each chunk
    dtc_ptr,  # [2, h, T] fp32: processed dt, chunk-local cumsum of dt * A
    # sizes
    num_tokens,
    headdim,
    dstate,
    heads_per_group,
    # strides
    stride_out_t, stride_out_h, stride_out_p,
    stride_x_t, stride_x_h, stride_x_p,
    stride_b_t, stride_b_g, stride_b_n,
    stride_c_t, stride_c_g, stride_c_n,
    stride_d_h, stride_d_p,
    stride_z_t, stride_z_h, stride_z_p,
    stride_st_s, stride_st_h, stride_st_p, stride_st_n,
    # meta
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,  # >= n: one block
):
    i_c = tl.program_id(0)
    i_h = tl.program_id(1).to(tl.int64)
    i_mp = tl.program_id(2)
    n_pb = tl.cdiv(headdim, BLOCK_P)
    i_m, i_p = i_mp // n_pb, i_mp % n_pb
    start = tl.load(chunk_start_ptr + i_c)
    length = tl.load(chunk_len_ptr + i_c).to(tl.int32)
    m0 = i_m * BLOCK_M
    if m0 < length:
        seq = tl.load(chunk_seq_ptr + i_c)
        i_g = i_h // heads_per_group
        dt_base = dtc_ptr + i_h * num_tokens + start
        cum_base = dt_base + tl.num_programs(1).to(tl.int64) * num_tokens
        x_base = x_ptr + start * stride_x_t + i_h * stride_x_h
        b_base = b_ptr + start * stride_b_t + i_g * stride_b_g
        o_m = m0 + tl.arange(0, BLOCK_M)
        o_k = tl.arange(0, BLOCK_K)
        o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
        o_n = tl.arange(0, BLOCK_N)
        m_m, m_p, m_n = o_m < length, o_p < headdim, o_n < dstate

        b_cum_m = tl.load(cum_base + o_m, mask=m_m, other=0.0)
        p_c = c_ptr + start * stride_c_t + i_g * stride_c_g + o_m[:, None] * stride_c_t + o_n[None, :] * stride_c_n
        b_c = tl.load(p_c, mask=m_m[:, None] & m_n[None, :], other=0.0)
        dot_ty = x_ptr.dtype.element_ty
        b_c = b_c.to(dot_ty)
        # the state entering the chunk, [BLOCK_N, BLOCK_P] (transposed)
        p_prev = (states_ptr + (i_c + seq) * stride_st_s + i_h * stride_st_h + o_n[:, None] * stride_st_n
                  + o_p[None, :] * stride_st_p)
        b_prev = tl.load(p_prev, mask=m_n[:, None] & m_p[None, :], other=0.0).to(dot_ty)
        acc = tl.dot(b_c, b_prev, input_precision=DOT_PRECISION) * tl.exp(b_cum_m)[:, None]

        # the causal part: K-blocks up to the last row of this block
        for k0 in range(0, tl.minimum(m0 + BLOCK_M, length), BLOCK_K):
            o_s = k0 + o_k
            m_s = o_s < length
            p_bt = b_base + o_s[None, :] * stride_b_t + o_n[:, None] * stride_b_n  # [BLOCK_N, BLOCK_K]
            b_bt = tl.load(p_bt, mask=m_n[:, None] & m_s[None, :], other=0.0).to(dot_ty)
            b_cb = tl.dot(b_c, b_bt, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_K]
            b_cum_s = tl.load(cum_base + o_s, mask=m_s, other=0.0)
            b_dt_s = tl.load(dt_base + o_s, mask=m_s, other=0.0)
            causal = (o_m[:, None] >= o_s[None, :]) & m_s[None, :]
            decay = tl.exp(tl.where(causal, b_cum_m[:, None] - b_cum_s[None, :], float("-inf")))
            b_cb = (b_cb * decay * b_dt_s[None, :]).to(dot_ty)
            p_xs = x_base + o_s[:, None] * stride_x_t + o_p[None, :] * stride_x_p
            b_xs = tl.load(p_xs, mask=m_s[:, None] & m_p[None, :], other=0.0).to(dot_ty)
            acc += tl.dot(b_cb, b_xs, input_precision=DOT_PRECISION)

        m_mp = m_m[:, None] & m_p[None, :]
        if HAS_D:
            b_d = tl.load(d_ptr + i_h * stride_d_h + o_p * stride_d_p, mask=m_p, other=0.0).to(tl.float32)
            b_x = tl.load(x_base + o_m[:, None] * stride_x_t + o_p[None, :] * stride_x_p, mask=m_mp, other=0.0)
            acc += b_x.to(tl.float32) * b_d[None, :]
        if HAS_Z:
            p_z = z_ptr + start * stride_z_t + i_h * stride_z_h + o_m[:, None] * stride_z_t + o_p[None, :] * stride_z_p
            acc *= silu(tl.load(p_z, mask=m_mp, other=0.0).to(tl.float32))
        p_out = (out_ptr + start * stride_out_t + i_h * stride_out_h + o_m[:, None] * stride_out_t
                 + o_p[None, :] * stride_out_p)
        tl.store(p_out, acc.to(out_ptr.dtype.element_ty), mask=m_mp)


def _chunk_table(seq_starts: list[int], chunk_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per chunk (sequence, first token, length) and per sequence its first chunk (``[nseq + 1]``),
    as int64 views of ONE device tensor (one host->device copy). An empty sequence gets one chunk
    of length 0."""
    seqs, starts, lens, seq_chunk = [], [], [], [0]
    for i, (s0, s1) in enumerate(itertools.pairwise(seq_starts)):
        offsets = range(s0, s1, chunk_size) or [s0]
        seqs += [i] * len(offsets)
        starts += offsets
        lens += [min(chunk_size, s1 - o) for o in offsets]
        seq_chunk.append(len(seqs))
    n = len(seqs)
    table = torch.tensor(seqs + starts + lens + seq_chunk, dtype=torch.int64).to(device, non_blocking=True)
    return table[:n], table[n:2 * n], table[2 * n:3 * n], table[3 * n:]


class _Config(NamedTuple):
    state_block_k: int  # launch 1: tokens per K-block (its tile is [64 (p), state_block_n] fp32)
    state_block_n: int
    state_warps: int
    scan_block_m: int  # launch 3: rows per program (its tile is [scan_block_m, 64 (p)] fp32, n in one block)
    scan_block_k: int


# Hand-picked by the sm_90 build (registers, no spills; tests/.../test_ssd_triton.py), keyed by "x is fp32".
# 16-bit inputs: dots on wgmma; launch 1 at 8 warps takes ~100 registers (227 at 4), launch 3 at
# [64, 32] K-blocks ~130 (n 128; n 256 at 8 warps: ~140), launch 2's [32, 128] tile ~80. fp32 inputs: IEEE dots
# run on FMA units (tf32 would cost ~1e-3 relative error, tf32x3 spilled), so smaller tiles.
_CONFIGS = {
    False: _Config(state_block_k=64, state_block_n=128, state_warps=8, scan_block_m=64, scan_block_k=32),
    True: _Config(state_block_k=16, state_block_n=64, state_warps=8, scan_block_m=32, scan_block_k=32),
}


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


class ChunkTable(NamedTuple):
    """The host-built chunk table (:func:`_chunk_table`) as int64 device tensors."""

    chunk_seq: torch.Tensor  # [nchunks]
    chunk_start: torch.Tensor  # [nchunks]
    chunk_len: torch.Tensor  # [nchunks]
    seq_chunk: torch.Tensor  # [nseq + 1]


def ssd_states_triton(x, dt, A, B, dt_bias, dt_softplus, dt_limit, seq_starts, init_states, init_index,
                      final_states, final_index, chunk_size) -> tuple[ChunkTable, torch.Tensor, torch.Tensor]:
    """Launches 1 and 2: returns the chunk table, the ``[nchunks + nseq, h, p, n]`` fp32 states
    (chunk ``c`` of sequence ``s`` enters with slot ``c + s`` and leaves with ``c + s + 1``) and the
    ``[2, h, T]`` fp32 processed dt / chunk-local cumsum of ``dt A``; writes the final rows."""
    num_tokens, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1], B.shape[2]
    nseq = len(seq_starts) - 1
    device = x.device
    table = ChunkTable(*_chunk_table(seq_starts, chunk_size, device))
    nchunks = table.chunk_seq.shape[0]
    states = _alloc.empty((nchunks + nseq, nheads, headdim, dstate), torch.float32, device)
    dtc = _alloc.empty((2, nheads, num_tokens), torch.float32, device)
    lo, hi = dt_limit
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    init_strides = init_states.stride() if init_states is not None else (0, 0, 0, 0)
    fin_strides = final_states.stride() if final_states is not None else (0, 0, 0, 0)
    cfg = _CONFIGS[x.dtype == torch.float32]
    block_p, block_n = _pow2(headdim, 16, 64), _pow2(dstate, 16, cfg.state_block_n)
    n_pn = triton.cdiv(headdim, block_p) * triton.cdiv(dstate, block_n)
    pass_p, pass_n = _pow2(headdim, 16, 32), _pow2(dstate, 16, 128)
    n_pass = triton.cdiv(headdim, pass_p) * triton.cdiv(dstate, pass_n)
    with on_device(device):
        _ssd_chunk_state_kernel[(nchunks, nheads, n_pn)](
            x, dt, A, B, x if dt_bias is None else dt_bias, x if init_states is None else init_states,
            init_index, *table, states, dtc,
            num_tokens, headdim, dstate, nheads // ngroups, float(lo), float(hi),
            *x.stride(), *dt.stride(), *B.stride(), *init_strides, *states.stride(),
            HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=bool(dt_softplus), DT_CLAMP=clamps(dt_limit),
            HAS_INIT=init_states is not None, DOT_PRECISION=precision,
            BLOCK_K=_pow2(chunk_size, 16, cfg.state_block_k), BLOCK_P=block_p, BLOCK_N=block_n,
            num_warps=cfg.state_warps,
        )
        _ssd_state_passing_kernel[(nseq, nheads, n_pass)](
            states, dtc, table.chunk_start, table.chunk_len, table.seq_chunk,
            x if final_states is None else final_states,
            final_index, num_tokens, headdim, dstate, *states.stride(), *fin_strides,
            HAS_FINAL=final_states is not None, BLOCK_P=pass_p, BLOCK_N=pass_n, num_warps=4,
        )
    return table, states, dtc


def clamps(dt_limit: tuple[float, float]) -> bool:
    """Whether ``dt_limit`` clamps at all (the default ``(0, inf)`` does not)."""
    lo, hi = dt_limit
    return not (lo == 0.0 and math.isinf(hi) and hi > 0)


def ssd_scan_triton(out, x, B, C, D, z, table: ChunkTable, states, dtc, chunk_size) -> None:
    """Launch 3: ``out`` ``[T, h, p]`` from the states entering each chunk (``z``/``D`` optional)."""
    num_tokens, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1], B.shape[2]
    nchunks = table.chunk_seq.shape[0]
    cfg = _CONFIGS[x.dtype == torch.float32]
    block_m, block_pc = _pow2(chunk_size, 16, cfg.scan_block_m), _pow2(headdim, 16, 64)
    block_nc = max(16, triton.next_power_of_2(dstate))  # launch 3 holds all of n (sm_90 checked up to 256)
    n_mp = triton.cdiv(chunk_size, block_m) * triton.cdiv(headdim, block_pc)
    d_strides = (0, 0) if D is None else (D.stride(0), D.stride(1) if D.dim() == 2 else 0)
    with on_device(x.device):
        _ssd_chunk_scan_kernel[(nchunks, nheads, n_mp)](
            out, x, B, C, x if D is None else D, x if z is None else z,
            table.chunk_seq, table.chunk_start, table.chunk_len, states, dtc,
            num_tokens, headdim, dstate, nheads // ngroups,
            *out.stride(), *x.stride(), *B.stride(), *C.stride(), *d_strides,
            *(z.stride() if z is not None else (0, 0, 0)), *states.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_M=block_m, BLOCK_K=_pow2(chunk_size, 16, cfg.scan_block_k), BLOCK_P=block_pc, BLOCK_N=block_nc,
            num_warps=4 if block_nc <= 128 else 8,
        )


def ssd_core_triton(
    out: torch.Tensor,  # [T, h, p] (written)
    x: torch.Tensor,  # [T, h, p]
    dt: torch.Tensor,  # [T, h]
    A: torch.Tensor,  # [h]
    B: torch.Tensor,  # [T, g, n]
    C: torch.Tensor,  # [T, g, n]
    D: torch.Tensor | None,  # [h] or [h, p]
    z: torch.Tensor | None,  # [T, h, p]
    dt_bias: torch.Tensor | None,  # [h]
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    seq_starts: list[int],  # nseq + 1 host offsets
    seq_starts_t: torch.Tensor,  # the same, [nseq + 1] int64 device (unused: the chunk table carries them)
    init_states: torch.Tensor | None,  # [S_in, h, p, n]
    init_index: torch.Tensor,  # [nseq] int64, -1 = zeros
    final_states: torch.Tensor | None,  # [S_out, h, p, n] (rows written)
    final_index: torch.Tensor,  # [nseq] int64, -1 = not written
    chunk_size: int,
) -> None:
    """The SSD core on Triton (inputs validated by the caller; see the module docstring).

    Writes ``out`` (every token of the sequences) and ``final_states[final_index[s]]`` for each
    sequence ``s`` with ``final_index[s] >= 0``; reads ``init_states[init_index[s]]`` where
    ``init_index[s] >= 0``. Arithmetic in fp32 with ``tl.dot`` in x's dtype (fp32: IEEE, no tf32).
    """
    nheads, headdim = x.shape[1:]
    if len(seq_starts) == 1 or nheads == 0 or headdim == 0:
        return
    table, states, dtc = ssd_states_triton(x, dt, A, B, dt_bias, dt_softplus, dt_limit, seq_starts, init_states,
                                           init_index, final_states, final_index, chunk_size)
    ssd_scan_triton(out, x, B, C, D, z, table, states, dtc, chunk_size)
