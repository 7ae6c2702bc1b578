"""Mamba-2 SSD backward core in Triton: the forward's structure reversed, deterministic.

:func:`ssd_core_bwd_triton` implements the backward core contract (``ssd_core_bwd_torch``, whose
module docstring derives the per-chunk gradients). Only the inputs are saved by the forward: the
states entering / leaving each chunk and the processed dt / chunk-local cumsum of ``dt A`` are
recomputed by the forward's launches 1 and 2 (``ssd_states_triton``; launch 3 again without the
gate when ``z`` is given, for ``dz``). Then five launches:

A. ``_ssd_bwd_dstate_kernel`` per (chunk, head, p/n tile): the chunk's own state gradient
   ``sum_t exp(S_t) dy_t (x) C_t`` into a scratch laid out as the forward's states.
B. ``_ssd_bwd_state_passing_kernel`` per (sequence, head, p/n tile): walks the chunks backwards,
   ``dh_prev = exp(S_L) dh + local``, leaving in slot ``c + s + 1`` the gradient of the state
   leaving chunk ``c``; writes the initial-state gradient, and per chunk ``<dh, h_exit>`` for its
   tile into a workspace.
C. ``_ssd_bwd_dx_kernel`` per (chunk, row block, group, head split): ``du`` (then ``dx``, and
   ``x . du`` for ddt) and the group's ``dB`` summed over the split's heads in head order.
D. ``_ssd_bwd_dc_kernel`` per (chunk, row block, group, head split): ``dC`` likewise, and
   ``C . dC`` per head (``= dy . y_ssm``, the gradient of ``S`` on the output side).
E. ``_ssd_bwd_ddt_kernel`` per (chunk, head): ``dS``, its reverse cumsum within the chunk, ddt
   through softplus / clamp, and the chunk's dA partial.

No float atomics: every cross-program reduction (dB / dC over head splits, dA over chunks,
``<dh, h_exit>`` over tiles, ddt_bias / dD over tokens) goes through a workspace summed by torch
in a fixed order, so the same inputs give bit-identical gradients. Tiles: int32 offsets inside a
tile, int64 token / slot / head bases (as the forward).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from triton_kernels import _alloc
from triton_kernels._checks import on_device
from triton_kernels._tl_math import softplus
from triton_kernels.mamba2.ssd_triton import _pow2, clamps, ssd_scan_triton, ssd_states_triton


@triton.jit(do_not_specialize=["num_tokens"])
def _ssd_bwd_dstate_kernel(
    # pointers
    dy_ptr,  # [T, h, p] fp32
    c_ptr,  # [T, g, n]
    chunk_seq_ptr,  # [nchunks] int64
    chunk_start_ptr,  # [nchunks] int64
    chunk_len_ptr,  # [nchunks] int64
    dtc_ptr,  # [2, h, T] fp32: processed dt, chunk-local cumsum of dt * A
    dstates_ptr,  # [nchunks + nseq, h, p, n] fp32 (written: slot c + seq)
    # sizes
    num_tokens,
    headdim,
    dstate,
    heads_per_group,
    # strides
    stride_dy_t, stride_dy_h, stride_dy_p,
    stride_c_t, stride_c_g, stride_c_n,
    stride_st_s, stride_st_h, stride_st_p, stride_st_n,
    # meta
    DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_h = tl.program_id(1).to(tl.int64)
    i_pn = tl.program_id(2)
    n_nb = tl.cdiv(dstate, BLOCK_N)
    seq = tl.load(chunk_seq_ptr + i_c)
    start = tl.load(chunk_start_ptr + i_c)
    length = tl.load(chunk_len_ptr + i_c).to(tl.int32)
    dot_ty = c_ptr.dtype.element_ty
    o_k = tl.arange(0, BLOCK_K)
    o_p = (i_pn // n_nb) * BLOCK_P + tl.arange(0, BLOCK_P)
    o_n = (i_pn % n_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_p, m_n = o_p < headdim, o_n < dstate
    dy_base = dy_ptr + start * stride_dy_t + i_h * stride_dy_h
    c_base = c_ptr + start * stride_c_t + (i_h // heads_per_group) * stride_c_g
    cum_base = dtc_ptr + (tl.num_programs(1) + i_h) * num_tokens + start

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, length, BLOCK_K):
        o_t = k0 + o_k
        m_k = o_t < length
        b_cum = tl.load(cum_base + o_t, mask=m_k, other=0.0)
        p_dy = dy_base + o_p[:, None] * stride_dy_p + o_t[None, :] * stride_dy_t  # [BLOCK_P, BLOCK_K]
        b_dy = tl.load(p_dy, mask=m_p[:, None] & m_k[None, :], other=0.0) * tl.exp(b_cum)[None, :]
        p_c = c_base + o_t[:, None] * stride_c_t + o_n[None, :] * stride_c_n  # [BLOCK_K, BLOCK_N]
        b_c = tl.load(p_c, mask=m_k[:, None] & m_n[None, :], other=0.0)
        acc += tl.dot(b_dy.to(dot_ty), b_c, input_precision=DOT_PRECISION)
    p_st = (dstates_ptr + (i_c + seq) * stride_st_s + i_h * stride_st_h + o_p[:, None] * stride_st_p
            + o_n[None, :] * stride_st_n)
    tl.store(p_st, acc, mask=m_p[:, None] & m_n[None, :])


@triton.jit(do_not_specialize=["num_tokens", "nchunks"])
def _ssd_bwd_state_passing_kernel(
    # pointers
    dstates_ptr,  # [nchunks + nseq, h, p, n] fp32 (updated in place)
    states_ptr,  # [nchunks + nseq, h, p, n] fp32: the forward's states (slot c + seq + 1 leaves chunk c)
    dtc_ptr,  # [2, h, T] fp32
    chunk_start_ptr,  # [nchunks] int64
    chunk_len_ptr,  # [nchunks] int64
    seq_chunk_ptr,  # [nseq + 1] int64
    dfinal_ptr,  # [S_out, h, p, n], HAS_DFINAL
    final_index_ptr,  # [nseq] int64, -1 = no gradient
    dinit_ptr,  # [S_in, h, p, n], HAS_DINIT (rows written)
    init_index_ptr,  # [nseq] int64, -1 = not written
    exit_ptr,  # [n_tiles, nchunks, h] fp32 (written): <dh, h_exit> of the tile
    # sizes
    num_tokens,
    nchunks,
    headdim,
    dstate,
    # strides (states and dstates share theirs)
    stride_st_s, stride_st_h, stride_st_p, stride_st_n,
    stride_df_s, stride_df_h, stride_df_p, stride_df_n,
    stride_di_s, stride_di_h, stride_di_p, stride_di_n,
    # meta
    HAS_DFINAL: tl.constexpr,
    HAS_DINIT: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_pn = tl.program_id(2)
    nheads = tl.num_programs(1)
    n_nb = tl.cdiv(dstate, BLOCK_N)
    o_p = (i_pn // n_nb) * BLOCK_P + tl.arange(0, BLOCK_P)
    o_n = (i_pn % n_nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_pn = (o_p < headdim)[:, None] & (o_n < dstate)[None, :]
    o_st = i_h * stride_st_h + o_p[:, None] * stride_st_p + o_n[None, :] * stride_st_n
    c_first = tl.load(seq_chunk_ptr + seq)
    c_end = tl.load(seq_chunk_ptr + seq + 1)
    p_cum = dtc_ptr + (nheads + i_h) * num_tokens

    dh = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if HAS_DFINAL:
        row = tl.load(final_index_ptr + seq)
        if row >= 0:
            p_df = (dfinal_ptr + row * stride_df_s + i_h * stride_df_h + o_p[:, None] * stride_df_p
                    + o_n[None, :] * stride_df_n)
            dh = tl.load(p_df, mask=m_pn, other=0.0).to(tl.float32)
    for i in range(0, c_end - c_first):
        c = c_end - 1 - i
        slot = c + seq + 1  # the state leaving chunk c
        tl.store(dstates_ptr + slot * stride_st_s + o_st, dh, mask=m_pn)
        h_exit = tl.load(states_ptr + slot * stride_st_s + o_st, mask=m_pn, other=0.0)
        tl.store(exit_ptr + (i_pn * nchunks + c) * nheads + i_h, tl.sum(tl.sum(dh * h_exit, axis=1), axis=0))
        start = tl.load(chunk_start_ptr + c)
        length = tl.load(chunk_len_ptr + c)
        da_total = tl.load(p_cum + start + length - 1, mask=length > 0, other=0.0)
        dh = dh * tl.exp(da_total) + tl.load(dstates_ptr + (slot - 1) * stride_st_s + o_st, mask=m_pn, other=0.0)
    if HAS_DINIT:
        row = tl.load(init_index_ptr + seq)
        if row >= 0:
            p_di = (dinit_ptr + row * stride_di_s + i_h * stride_di_h + o_p[:, None] * stride_di_p
                    + o_n[None, :] * stride_di_n)
            tl.store(p_di, dh.to(dinit_ptr.dtype.element_ty), mask=m_pn)


@triton.jit(do_not_specialize=["num_tokens"])
def _ssd_bwd_dx_kernel(
    # pointers
    dx_ptr,  # [T, h, p] (written)
    xdu_ptr,  # [h, T] fp32 (written): x . du
    db_ptr,  # [n_split, T, g, n] fp32 (written): dB summed over the split's heads
    x_ptr,  # [T, h, p]
    b_ptr,  # [T, g, n]
    c_ptr,  # [T, g, n]
    dy_ptr,  # [T, h, p] fp32
    d_ptr,  # [h] or [h, p], HAS_D
    chunk_seq_ptr, chunk_start_ptr, chunk_len_ptr,  # [nchunks] int64
    dtc_ptr,  # [2, h, T] fp32
    dstates_ptr,  # [nchunks + nseq, h, p, n] fp32: the gradient of the state leaving each chunk
    # sizes
    num_tokens,
    headdim,
    dstate,
    heads_per_group,
    heads_per_split,
    # strides
    stride_dx_t, stride_dx_h, stride_dx_p,
    stride_x_t, stride_x_h, stride_x_p,
    stride_b_t, stride_b_g, stride_b_n,
    stride_c_t, stride_c_g, stride_c_n,
    stride_dy_t, stride_dy_h, stride_dy_p,
    stride_d_h, stride_d_p,
    stride_st_s, stride_st_h, stride_st_p, stride_st_n,
    # meta
    HAS_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,  # >= p
    BLOCK_N: tl.constexpr,  # >= n
):
    i_c = tl.program_id(0)
    i_m = tl.program_id(1)
    i_gs = tl.program_id(2)
    n_split = heads_per_group // heads_per_split
    i_g, i_s = (i_gs // n_split).to(tl.int64), i_gs % n_split
    start = tl.load(chunk_start_ptr + i_c)
    length = tl.load(chunk_len_ptr + i_c).to(tl.int32)
    m0 = i_m * BLOCK_M
    if m0 < length:
        seq = tl.load(chunk_seq_ptr + i_c)
        nheads = heads_per_group * (tl.num_programs(2) // n_split)
        dot_ty = x_ptr.dtype.element_ty
        o_m = m0 + tl.arange(0, BLOCK_M)
        o_k = tl.arange(0, BLOCK_K)
        o_p, o_n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
        m_m, m_p, m_n = o_m < length, o_p < headdim, o_n < dstate
        m_mp, m_mn = m_m[:, None] & m_p[None, :], m_m[:, None] & m_n[None, :]
        b_base = b_ptr + start * stride_b_t + i_g * stride_b_g
        c_base = c_ptr + start * stride_c_t + i_g * stride_c_g
        b_b = tl.load(b_base + o_m[:, None] * stride_b_t + o_n[None, :] * stride_b_n, mask=m_mn, other=0.0)
        acc_db_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for hh in range(0, heads_per_split):
            i_h = i_g * heads_per_group + i_s * heads_per_split + hh
            dt_base = dtc_ptr + i_h * num_tokens + start
            cum_base = dt_base + nheads * num_tokens
            b_cum_m = tl.load(cum_base + o_m, mask=m_m, other=0.0)
            b_dt_m = tl.load(dt_base + o_m, mask=m_m, other=0.0)
            to_end = tl.exp(tl.load(cum_base + length - 1) - b_cum_m)
            x_base = x_ptr + start * stride_x_t + i_h * stride_x_h
            dy_base = dy_ptr + start * stride_dy_t + i_h * stride_dy_h
            p_x = x_base + o_m[:, None] * stride_x_t + o_p[None, :] * stride_x_p
            b_u = (tl.load(p_x, mask=m_mp, other=0.0).to(tl.float32) * b_dt_m[:, None]).to(dot_ty)
            p_dh = (dstates_ptr + (i_c + seq + 1) * stride_st_s + i_h * stride_st_h + o_n[:, None] * stride_st_n
                    + o_p[None, :] * stride_st_p)
            b_dh = tl.load(p_dh, mask=m_n[:, None] & m_p[None, :], other=0.0).to(dot_ty)  # [BLOCK_N, BLOCK_P]
            acc_du = tl.dot(b_b, b_dh, input_precision=DOT_PRECISION) * to_end[:, None]
            acc_db_g += tl.dot(b_u, tl.trans(b_dh), input_precision=DOT_PRECISION) * to_end[:, None]
            for k0 in range(m0, length, BLOCK_K):  # t >= s
                o_t = k0 + o_k
                m_t = o_t < length
                b_ct = tl.load(c_base + o_t[:, None] * stride_c_t + o_n[None, :] * stride_c_n,
                               mask=m_t[:, None] & m_n[None, :], other=0.0)
                b_dyt = tl.load(dy_base + o_t[:, None] * stride_dy_t + o_p[None, :] * stride_dy_p,
                                mask=m_t[:, None] & m_p[None, :], other=0.0).to(dot_ty)
                b_cum_t = tl.load(cum_base + o_t, mask=m_t, other=0.0)
                causal = (o_t[None, :] >= o_m[:, None]) & m_t[None, :]
                decay = tl.exp(tl.where(causal, b_cum_t[None, :] - b_cum_m[:, None], float("-inf")))
                b_bc = tl.dot(b_b, tl.trans(b_ct), input_precision=DOT_PRECISION) * decay  # [BLOCK_M, BLOCK_K]
                acc_du += tl.dot(b_bc.to(dot_ty), b_dyt, input_precision=DOT_PRECISION)
                b_udy = tl.dot(b_u, tl.trans(b_dyt), input_precision=DOT_PRECISION) * decay
                acc_db_g = tl.dot(b_udy.to(dot_ty), b_ct, acc_db_g, input_precision=DOT_PRECISION)
            b_x = tl.load(p_x, mask=m_mp, other=0.0).to(tl.float32)  # reloaded: shorter live range
            tl.store(xdu_ptr + i_h * num_tokens + start + o_m, tl.sum(b_x * acc_du, axis=1), mask=m_m)
            b_dx = acc_du * b_dt_m[:, None]
            if HAS_D:
                b_d = tl.load(d_ptr + i_h * stride_d_h + o_p * stride_d_p, mask=m_p, other=0.0).to(tl.float32)
                b_dys = tl.load(dy_base + o_m[:, None] * stride_dy_t + o_p[None, :] * stride_dy_p, mask=m_mp,
                                other=0.0)
                b_dx += b_dys * b_d[None, :]
            p_dx = (dx_ptr + start * stride_dx_t + i_h * stride_dx_h + o_m[:, None] * stride_dx_t
                    + o_p[None, :] * stride_dx_p)
            tl.store(p_dx, b_dx.to(dx_ptr.dtype.element_ty), mask=m_mp)
        groups = tl.num_programs(2) // n_split
        p_db = db_ptr + ((i_s * num_tokens + start + o_m[:, None]) * groups + i_g) * dstate + o_n[None, :]
        tl.store(p_db, acc_db_g, mask=m_mn)


@triton.jit(do_not_specialize=["num_tokens"])
def _ssd_bwd_dc_kernel(
    # pointers
    dc_ptr,  # [n_split, T, g, n] fp32 (written): dC summed over the split's heads
    dsy_ptr,  # [h, T] fp32 (written): C . dC per head (= dy . y_ssm)
    x_ptr,  # [T, h, p]
    b_ptr,  # [T, g, n]
    c_ptr,  # [T, g, n]
    dy_ptr,  # [T, h, p] fp32
    chunk_seq_ptr, chunk_start_ptr, chunk_len_ptr,  # [nchunks] int64
    dtc_ptr,  # [2, h, T] fp32
    states_ptr,  # [nchunks + nseq, h, p, n] fp32: the state entering chunk c is slot c + seq
    # sizes
    num_tokens,
    headdim,
    dstate,
    heads_per_group,
    heads_per_split,
    # strides
    stride_x_t, stride_x_h, stride_x_p,
    stride_b_t, stride_b_g, stride_b_n,
    stride_c_t, stride_c_g, stride_c_n,
    stride_dy_t, stride_dy_h, stride_dy_p,
    stride_st_s, stride_st_h, stride_st_p, stride_st_n,
    # meta
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,  # >= p
    BLOCK_N: tl.constexpr,  # >= n
):
    i_c = tl.program_id(0)
    i_m = tl.program_id(1)
    i_gs = tl.program_id(2)
    n_split = heads_per_group // heads_per_split
    i_g, i_s = (i_gs // n_split).to(tl.int64), i_gs % n_split
    start = tl.load(chunk_start_ptr + i_c)
    length = tl.load(chunk_len_ptr + i_c).to(tl.int32)
    m0 = i_m * BLOCK_M
    if m0 < length:
        seq = tl.load(chunk_seq_ptr + i_c)
        nheads = heads_per_group * (tl.num_programs(2) // n_split)
        dot_ty = x_ptr.dtype.element_ty
        o_m = m0 + tl.arange(0, BLOCK_M)
        o_k = tl.arange(0, BLOCK_K)
        o_p, o_n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
        m_m, m_p, m_n = o_m < length, o_p < headdim, o_n < dstate
        m_mp, m_mn = m_m[:, None] & m_p[None, :], m_m[:, None] & m_n[None, :]
        b_base = b_ptr + start * stride_b_t + i_g * stride_b_g
        p_c = c_ptr + (start + o_m[:, None]) * stride_c_t + i_g * stride_c_g + o_n[None, :] * stride_c_n
        acc_dc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for hh in range(0, heads_per_split):
            i_h = i_g * heads_per_group + i_s * heads_per_split + hh
            dt_base = dtc_ptr + i_h * num_tokens + start
            cum_base = dt_base + nheads * num_tokens
            b_cum_m = tl.load(cum_base + o_m, mask=m_m, other=0.0)
            x_base = x_ptr + start * stride_x_t + i_h * stride_x_h
            b_dy = tl.load(dy_ptr + (start + o_m[:, None]) * stride_dy_t + i_h * stride_dy_h
                           + o_p[None, :] * stride_dy_p, mask=m_mp, other=0.0).to(dot_ty)
            h_base = states_ptr + (i_c + seq) * stride_st_s + i_h * stride_st_h
            acc_dc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for p0 in range(0, headdim, BLOCK_K):  # the entering state in p slices, never all [p, n] in registers
                o_pk = p0 + o_k
                m_pk = o_pk < headdim
                b_dyk = tl.load(dy_ptr + (start + o_m[:, None]) * stride_dy_t + i_h * stride_dy_h
                                + o_pk[None, :] * stride_dy_p, mask=m_m[:, None] & m_pk[None, :], other=0.0)
                b_hk = tl.load(h_base + o_pk[:, None] * stride_st_p + o_n[None, :] * stride_st_n,
                               mask=m_pk[:, None] & m_n[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
                acc_dc += tl.dot(b_dyk.to(dot_ty), b_hk.to(dot_ty), input_precision=DOT_PRECISION)
            acc_dc *= tl.exp(b_cum_m)[:, None]
            for k0 in range(0, tl.minimum(m0 + BLOCK_M, length), BLOCK_K):  # s <= t
                o_s = k0 + o_k
                m_s = o_s < length
                b_bs = tl.load(b_base + o_s[:, None] * stride_b_t + o_n[None, :] * stride_b_n,
                               mask=m_s[:, None] & m_n[None, :], other=0.0)
                b_xs = tl.load(x_base + o_s[:, None] * stride_x_t + o_p[None, :] * stride_x_p,
                               mask=m_s[:, None] & m_p[None, :], other=0.0)
                b_dts = tl.load(dt_base + o_s, mask=m_s, other=0.0)
                b_us = (b_xs.to(tl.float32) * b_dts[:, None]).to(dot_ty)
                b_cum_s = tl.load(cum_base + o_s, mask=m_s, other=0.0)
                causal = (o_m[:, None] >= o_s[None, :]) & m_s[None, :]
                decay = tl.exp(tl.where(causal, b_cum_m[:, None] - b_cum_s[None, :], float("-inf")))
                b_dyu = tl.dot(b_dy, tl.trans(b_us), input_precision=DOT_PRECISION) * decay  # [BLOCK_M, BLOCK_K]
                acc_dc += tl.dot(b_dyu.to(dot_ty), b_bs, input_precision=DOT_PRECISION)
            b_c = tl.load(p_c, mask=m_mn, other=0.0).to(tl.float32)  # reloaded per head: shorter live range
            tl.store(dsy_ptr + i_h * num_tokens + start + o_m, tl.sum(b_c * acc_dc, axis=1), mask=m_m)
            acc_dc_g += acc_dc
        groups = tl.num_programs(2) // n_split
        p_dc = dc_ptr + ((i_s * num_tokens + start + o_m[:, None]) * groups + i_g) * dstate + o_n[None, :]
        tl.store(p_dc, acc_dc_g, mask=m_mn)


@triton.jit(do_not_specialize=["num_tokens", "nchunks", "n_tiles"])
def _ssd_bwd_ddt_kernel(
    # pointers
    ddt_ptr,  # [T, h] fp32 (written): the gradient of the raw dt
    da_ptr,  # [nchunks, h] fp32 (written): the chunk's dA partial
    dt_ptr,  # [T, h] raw dt
    a_ptr,  # [h]
    dt_bias_ptr,  # [h], HAS_DT_BIAS
    dtc_ptr,  # [2, h, T] fp32
    xdu_ptr,  # [h, T] fp32
    dsy_ptr,  # [h, T] fp32
    exit_ptr,  # [n_tiles, nchunks, h] fp32
    chunk_start_ptr, chunk_len_ptr,  # [nchunks] int64
    # sizes
    num_tokens,
    nchunks,
    n_tiles,
    dt_lo,
    dt_hi,
    # strides
    stride_dt_t, stride_dt_h,
    # meta
    HAS_DT_BIAS: tl.constexpr,
    DT_SOFTPLUS: tl.constexpr,
    DT_CLAMP: tl.constexpr,
    BLOCK_L: tl.constexpr,  # >= chunk_size
):
    i_c = tl.program_id(0)
    i_h = tl.program_id(1).to(tl.int64)
    nheads = tl.num_programs(1)
    start = tl.load(chunk_start_ptr + i_c)
    length = tl.load(chunk_len_ptr + i_c).to(tl.int32)
    o_l = tl.arange(0, BLOCK_L)
    m_l = o_l < length
    o_tok = i_h * num_tokens + start + o_l
    b_dtp = tl.load(dtc_ptr + o_tok, mask=m_l, other=0.0)
    b_xdu = tl.load(xdu_ptr + o_tok, mask=m_l, other=0.0)
    b_ds = tl.load(dsy_ptr + o_tok, mask=m_l, other=0.0) - b_dtp * b_xdu
    b_exit = 0.0
    for i in range(0, n_tiles):  # fixed order
        b_exit += tl.load(exit_ptr + (i * nchunks + i_c) * nheads + i_h)
    b_ds += tl.where(o_l == length - 1, b_exit, 0.0)
    b_da = tl.cumsum(b_ds, axis=0, reverse=True)
    tl.store(da_ptr + i_c * nheads + i_h, tl.sum(b_dtp * b_da, axis=0))
    b_ddt = tl.load(a_ptr + i_h).to(tl.float32) * b_da + b_xdu
    v = tl.load(dt_ptr + (start + o_l) * stride_dt_t + i_h * stride_dt_h, mask=m_l, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        v += tl.load(dt_bias_ptr + i_h).to(tl.float32)
    if DT_SOFTPLUS:
        b_ddt *= tl.where(v <= 20.0, tl.sigmoid(v), 1.0)
        v = softplus(v)
    if DT_CLAMP:
        b_ddt = tl.where((v >= dt_lo) & (v <= dt_hi), b_ddt, 0.0)
    tl.store(ddt_ptr + (start + o_l) * nheads + i_h, b_ddt, mask=m_l)


class _BwdConfig(NamedTuple):
    block_m: int  # launches C and D: rows per program (their tiles hold all of p and n)
    block_k: int
    warps: int


# Launches C and D compile for sm_90 with no stack at p 64, n 64 / 128 / 256 in every dtype
# (tests/triton_kernels/mamba2/test_sm90_compile.py); not yet timed on a GPU. 16-bit inputs with n <= 128
# take [64, 32] blocks, 8 warps. Wider states ([64, 256] fp32 accumulators beside the wgmma operands) and
# fp32 (FMA dots, whose operands are replicated across threads) spill there: [16, 16] blocks.
_BWD_CONFIG_16BIT = _BwdConfig(block_m=64, block_k=32, warps=8)
_BWD_CONFIG_SMALL = _BwdConfig(block_m=16, block_k=16, warps=8)
# Launches C and D split a group's heads over programs until about this many programs run.
_TARGET_PROGRAMS = 512


def _heads_per_split(heads_per_group: int, programs: int) -> int:
    """The fewest heads per program (a divisor of heads_per_group) that still fills the target."""
    want = max(1, -(-_TARGET_PROGRAMS // max(programs, 1)))
    splits = max(d for d in range(1, heads_per_group + 1) if heads_per_group % d == 0 and d <= want)
    return heads_per_group // splits


def ssd_core_bwd_triton(
    dx: torch.Tensor,  # [T, h, p] (written)
    ddt: torch.Tensor,  # [T, h] (written)
    dA: torch.Tensor,  # [h] (written)
    dB: torch.Tensor,  # [T, g, n] (written)
    dC: torch.Tensor,  # [T, g, n] (written)
    dD: torch.Tensor | None,  # like D (written)
    dz: torch.Tensor | None,  # [T, h, p] (written)
    ddt_bias: torch.Tensor | None,  # [h] (written)
    dinit: torch.Tensor | None,  # [S_in, h, p, n] (rows init_index[s] >= 0 written)
    dout: torch.Tensor,  # [T, h, p]
    dfinal: torch.Tensor | None,  # [S_out, h, p, n] (rows final_index[s] >= 0 read)
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    seq_starts: list[int],
    seq_starts_t: torch.Tensor,  # unused: the chunk table carries the offsets
    init_states: torch.Tensor | None,
    init_index: torch.Tensor,  # [nseq] int64
    final_index: torch.Tensor,  # [nseq] int64
    chunk_size: int,
) -> None:
    """The SSD backward core on Triton (contract: ``ssd_core_bwd_torch``; inputs validated by the caller)."""
    num_tokens, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1], B.shape[2]
    nseq = len(seq_starts) - 1
    device = x.device
    f32 = torch.float32
    if nseq == 0 or nheads == 0 or headdim == 0:
        for t in (dx, ddt, dA, dB, dC, dD, dz, ddt_bias):
            if t is not None:
                t.zero_()
        return
    table, states, dtc = ssd_states_triton(x, dt, A, B, dt_bias, dt_softplus, dt_limit, seq_starts, init_states,
                                           init_index, None, final_index, chunk_size)
    nchunks = table.chunk_seq.shape[0]
    dy = dout.to(f32)
    if z is not None:
        y = _alloc.empty(x.shape, f32, device)
        ssd_scan_triton(y, x, B, C, D, None, table, states, dtc, chunk_size)
        zf = z.to(f32)
        sig = torch.sigmoid(zf)
        dz.copy_(dy * y * sig * (1 + zf * (1 - sig)))
        dy = dy * zf * sig
    if D is not None:
        dxy = (dy * x.to(f32)).sum(0)  # [h, p]
        dD.copy_(dxy if D.dim() == 2 else dxy.sum(-1))

    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    fp32 = x.dtype == torch.float32
    block_p, block_n = _pow2(headdim, 16, 64), _pow2(dstate, 16, 64 if fp32 else 128)
    n_pn = triton.cdiv(headdim, block_p) * triton.cdiv(dstate, block_n)
    pass_p, pass_n = _pow2(headdim, 16, 32), _pow2(dstate, 16, 128)
    n_pass = triton.cdiv(headdim, pass_p) * triton.cdiv(dstate, pass_n)
    cfg = _BWD_CONFIG_16BIT if not fp32 and dstate <= 128 else _BWD_CONFIG_SMALL
    block_m = _pow2(chunk_size, 16, cfg.block_m)
    n_mb = triton.cdiv(chunk_size, block_m)
    heads_per_group = nheads // ngroups
    per_split = _heads_per_split(heads_per_group, nchunks * n_mb * ngroups)
    n_split = heads_per_group // per_split
    full_p, full_n = max(16, triton.next_power_of_2(headdim)), max(16, triton.next_power_of_2(dstate))

    dstates = _alloc.empty(states.shape, f32, device)
    exit_ws = _alloc.empty((n_pass, nchunks, nheads), f32, device)
    xdu = _alloc.empty((nheads, num_tokens), f32, device)
    dsy = _alloc.empty((nheads, num_tokens), f32, device)
    db_ws = _alloc.empty((n_split, num_tokens, ngroups, dstate), f32, device)
    dc_ws = _alloc.empty((n_split, num_tokens, ngroups, dstate), f32, device)
    ddt_f = _alloc.empty((num_tokens, nheads), f32, device)
    da_ws = _alloc.empty((nchunks, nheads), f32, device)
    df_strides = dfinal.stride() if dfinal is not None else (0, 0, 0, 0)
    di_strides = dinit.stride() if dinit is not None else (0, 0, 0, 0)
    d_strides = (0, 0) if D is None else (D.stride(0), D.stride(1) if D.dim() == 2 else 0)
    chunks = (table.chunk_seq, table.chunk_start, table.chunk_len)
    lo, hi = dt_limit
    with on_device(device):
        _ssd_bwd_dstate_kernel[(nchunks, nheads, n_pn)](
            dy, C, *chunks, dtc, dstates, num_tokens, headdim, dstate, heads_per_group,
            *dy.stride(), *C.stride(), *dstates.stride(),
            DOT_PRECISION=precision, BLOCK_K=_pow2(chunk_size, 16, 16 if fp32 else 64), BLOCK_P=block_p,
            BLOCK_N=block_n, num_warps=8,
        )
        _ssd_bwd_state_passing_kernel[(nseq, nheads, n_pass)](
            dstates, states, dtc, table.chunk_start, table.chunk_len, table.seq_chunk,
            x if dfinal is None else dfinal, final_index, x if dinit is None else dinit, init_index, exit_ws,
            num_tokens, nchunks, headdim, dstate, *dstates.stride(), *df_strides, *di_strides,
            HAS_DFINAL=dfinal is not None, HAS_DINIT=dinit is not None, BLOCK_P=pass_p, BLOCK_N=pass_n,
            num_warps=4,
        )
        grid = (nchunks, n_mb, ngroups * n_split)
        _ssd_bwd_dx_kernel[grid](
            dx, xdu, db_ws, x, B, C, dy, x if D is None else D, *chunks, dtc, dstates,
            num_tokens, headdim, dstate, heads_per_group, per_split,
            *dx.stride(), *x.stride(), *B.stride(), *C.stride(), *dy.stride(), *d_strides, *dstates.stride(),
            HAS_D=D is not None, DOT_PRECISION=precision, BLOCK_M=block_m,
            BLOCK_K=_pow2(chunk_size, 16, cfg.block_k), BLOCK_P=full_p, BLOCK_N=full_n, num_warps=cfg.warps,
        )
        _ssd_bwd_dc_kernel[grid](
            dc_ws, dsy, x, B, C, dy, *chunks, dtc, states,
            num_tokens, headdim, dstate, heads_per_group, per_split,
            *x.stride(), *B.stride(), *C.stride(), *dy.stride(), *states.stride(),
            DOT_PRECISION=precision, BLOCK_M=block_m, BLOCK_K=_pow2(chunk_size, 16, cfg.block_k),
            BLOCK_P=full_p, BLOCK_N=full_n, num_warps=cfg.warps,
        )
        _ssd_bwd_ddt_kernel[(nchunks, nheads)](
            ddt_f, da_ws, dt, A, x if dt_bias is None else dt_bias, dtc, xdu, dsy, exit_ws,
            table.chunk_start, table.chunk_len, num_tokens, nchunks, n_pass, float(lo), float(hi), *dt.stride(),
            HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=bool(dt_softplus), DT_CLAMP=clamps(dt_limit),
            BLOCK_L=max(16, triton.next_power_of_2(chunk_size)), num_warps=4,
        )
    ddt.copy_(ddt_f)
    dA.copy_(da_ws.sum(0))
    dB.copy_(db_ws.sum(0))
    dC.copy_(dc_ws.sum(0))
    if ddt_bias is not None:
        ddt_bias.copy_(ddt_f.sum(0))
