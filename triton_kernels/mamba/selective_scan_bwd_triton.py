"""The Mamba-1 selective scan backward as a Triton kernel: ``scan_bwd_triton`` (the contract is in
:mod:`.selective_scan_bwd`).

Each program owns one batch row and a block of channels of one group (the forward's grid) and walks
the sequence tile by tile from the end, with the forward's tiles (``tile_length(N)`` tokens). Per
tile it reloads the fp32 state entering the tile (saved by the forward kernel, ``tile_states``),
recomputes the tile's states with the forward ``tl.associative_scan``, and runs a reverse
``tl.associative_scan`` over the (decay, input) pairs of the adjoint
``lambda_t = dy_t C_t + a_{t+1} lambda_{t+1}`` (``a_{t+1}`` from a shifted load of delta, so no
register shift is needed), carrying ``lambda`` at the tile's first token into the previous tile.

Reductions are deterministic, without atomics: a program sums dA, dD, ddelta_bias and per-channel
dB/dC over its tokens and writes one ``[Bt, D, ...]`` partial per batch row; grouped dB/dC are summed
over the program's channels on chip and written to a ``[blocks_per_group, Bt, G, N, L]`` workspace
(each slot written by one program); the partials are then summed over their first dim in a fixed
order. The workspace is ``blocks_per_group`` times the size of B (the price of no atomics).

int64 offsets: the batch row ``i_b``, the channels ``o_d``, the token positions ``o_t`` and the state
index ``o_n`` are int64, the group and the channel block are widened where they meet a stride.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels import _alloc
from triton_kernels._checks import on_device, strides, unit_stride_last
from triton_kernels._tl_math import softplus
from triton_kernels.mamba.selective_scan_triton import combine, load_bc, scan_fwd_triton
from triton_kernels.mamba.tiles import tile_length, tile_states_shape

# Elements of one [BLOCK_D, BLOCK_N, BLOCK_L] fp32 tile. The backward keeps about three times the
# forward's live tiles (states, adjoint, their products), so it takes half the forward's tile per warp:
# 2048 elements on 8 warps (8 per thread, as 1024 on 4).
BWD_TILE_ELEMENTS = 1024
BWD_NUM_WARPS = 8
# Programs per batch row and group when B or C is grouped: each sums the dB/dC of several channel
# blocks on chip into its own [N, L] workspace slot, so the workspace is about BWD_PROGRAMS [N, L]
# planes whatever D and the batch (4 per SM of an H100/H200: enough to fill the GPU).
BWD_PROGRAMS = 512
MAX_BLOCK_D = 32


@triton.jit
def _selective_scan_bwd_kernel(
    # pointers
    dout_ptr,  # [Bt, D, L]
    dlast_ptr,  # [Bt, D, N] fp32 contiguous, HAS_DLAST
    u_ptr,  # [Bt, D, L]
    delta_ptr,  # [Bt, D, L]
    A_ptr,  # [D, N]
    B_ptr,  # [Bt, G, N, L], or [D, N] when B_PER_CHANNEL
    C_ptr,  # like B
    D_ptr,  # [D]
    z_ptr,  # [Bt, D, L]
    bias_ptr,  # [D]
    tile_ptr,  # [Bt, n_tiles + 1, D, N] fp32 contiguous: the state entering each tile
    du_ptr,  # [Bt, D, L] fp32 contiguous (as ddelta, dz)
    ddelta_ptr,
    dz_ptr,
    dA_ptr,  # [Bt, D, N] fp32 partials
    dDb_ptr,  # [2, Bt, D] fp32 partials: dD, ddelta_bias
    dB_ptr,  # [progs_per_group, Bt, G, N, L] fp32 partials, or [Bt, D, N] when B_PER_CHANNEL
    dC_ptr,  # like dB for C
    # sizes
    batch,
    seqlen,
    dim,
    dstate,
    groups,
    dim_per_group,
    progs_per_group,
    blocks_per_prog,
    # strides
    stride_do_b, stride_do_d,
    stride_u_b, stride_u_d,
    stride_dt_b, stride_dt_d,
    stride_z_b, stride_z_d,
    stride_A_d, stride_A_n,
    stride_B_b, stride_B_g, stride_B_n,
    stride_C_b, stride_C_g, stride_C_n,
    # meta
    HAS_DLAST: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DELTA_SOFTPLUS: tl.constexpr,
    B_PER_CHANNEL: tl.constexpr,
    C_PER_CHANNEL: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    i_g = tl.program_id(1) // progs_per_group
    i_prog = tl.program_id(1) % progs_per_group
    o_n = tl.arange(0, BLOCK_N).to(tl.int64)
    m_n = o_n < dstate
    is_first = (tl.arange(0, BLOCK_L) == 0)[None, None, :]
    n_tiles = tl.cdiv(seqlen, BLOCK_L)
    p_tile = tile_ptr + i_b * (n_tiles + 1) * dim * dstate  # + tile k's [D, N] offset
    # grouped dB/dC partials of this program: slot [i_prog, i_b, i_g] of the workspace, summed over
    # the program's channel blocks (first block stores, the others add: no other program writes it)
    o_ws = ((i_prog.to(tl.int64) * batch + i_b) * groups + i_g) * dstate * seqlen + o_n[:, None] * seqlen

    for j in range(0, blocks_per_prog):
        o_dg = (i_prog * blocks_per_prog + j) * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_dg < dim_per_group
        o_d = (i_g * dim_per_group + o_dg).to(tl.int64)
        m_dn = m_d[:, None] & m_n[None, :]
        o_dn = o_d[:, None] * dstate + o_n[None, :]  # [D, N] partials (contiguous)
        t_acc = tl.where(j > 0, seqlen, 0)  # tokens whose partial an earlier channel block wrote

        b_A = tl.load(A_ptr + o_d[:, None] * stride_A_d + o_n[None, :] * stride_A_n, mask=m_dn, other=0.0)
        b_A = b_A.to(tl.float32)
        b_A2 = b_A * 1.4426950408889634  # exp(x A) = exp2(x A log2(e))
        if HAS_BIAS:
            b_bias = tl.load(bias_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
        if HAS_D:
            b_Dskip = tl.load(D_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
        if HAS_DLAST:  # lambda at the token after the tile (the last state's gradient for the last tile)
            b_carry = tl.load(dlast_ptr + i_b * dim * dstate + o_dn, mask=m_dn, other=0.0).to(tl.float32)
        else:
            b_carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        b_dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        b_dD = tl.zeros([BLOCK_D], dtype=tl.float32)
        b_dbias = tl.zeros([BLOCK_D], dtype=tl.float32)
        b_dB_pc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        b_dC_pc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)

        for i in range(0, n_tiles):
            k = n_tiles - 1 - i
            o_t = k.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
            m_t = o_t < seqlen
            m_dt = m_d[:, None] & m_t[None, :]
            b_u = tl.load(u_ptr + i_b * stride_u_b + o_d[:, None] * stride_u_d + o_t[None, :], mask=m_dt,
                          other=0.0).to(tl.float32)
            p_dt = delta_ptr + i_b * stride_dt_b + o_d[:, None] * stride_dt_d + o_t[None, :]
            b_pre = tl.load(p_dt, mask=m_dt, other=0.0).to(tl.float32)
            # the next token's step, for its decay a_{t+1} (1 past the end: the carry enters undecayed)
            m_next = m_d[:, None] & (o_t + 1 < seqlen)[None, :]
            b_pre_next = tl.load(p_dt + 1, mask=m_next, other=0.0).to(tl.float32)
            if HAS_BIAS:
                b_pre += b_bias[:, None]
                b_pre_next += b_bias[:, None]
            if DELTA_SOFTPLUS:
                b_dt = softplus(b_pre)
                b_dt_next = softplus(b_pre_next)
            else:
                b_dt = b_pre
                b_dt_next = b_pre_next
            b_dt = tl.where(m_t[None, :], b_dt, 0.0)
            b_B = load_bc(B_ptr, i_b, i_g, o_d, o_n, o_t, m_d, m_n, m_t, stride_B_b, stride_B_g, stride_B_n,
                           B_PER_CHANNEL)
            b_C = load_bc(C_ptr, i_b, i_g, o_d, o_n, o_t, m_d, m_n, m_t, stride_C_b, stride_C_g, stride_C_n,
                           C_PER_CHANNEL)
            # the tile's states, from the saved state entering it
            b_h0 = tl.load(p_tile + k.to(tl.int64) * dim * dstate + o_dn, mask=m_dn, other=0.0)
            b_dAt = tl.exp2(b_dt[:, None, :] * b_A2[:, :, None])  # 1 past the end (dt = 0 there)
            b_dBu = (b_dt * b_u)[:, None, :] * b_B
            b_a, b_b = tl.associative_scan((b_dAt, b_dBu), axis=2, combine_fn=combine)
            b_hs = b_a * b_h0[:, :, None] + b_b  # h_t
            b_dy = tl.load(dout_ptr + i_b * stride_do_b + o_d[:, None] * stride_do_d + o_t[None, :], mask=m_dt,
                           other=0.0).to(tl.float32)
            o_g = (i_b * dim + o_d[:, None]) * seqlen + o_t[None, :]  # the [Bt, D, L] gradients
            if HAS_Z:
                b_z = tl.load(z_ptr + i_b * stride_z_b + o_d[:, None] * stride_z_d + o_t[None, :], mask=m_dt,
                              other=0.0).to(tl.float32)
                b_y = tl.sum(b_hs * b_C, axis=1)
                if HAS_D:
                    b_y += b_Dskip[:, None] * b_u
                b_sig = 1.0 / (1.0 + tl.exp(-b_z))
                tl.store(dz_ptr + o_g, b_dy * b_y * b_sig * (1.0 + b_z * (1.0 - b_sig)), mask=m_dt)
                b_dy = b_dy * b_z * b_sig
            # the adjoint lambda_t = dy_t C_t + a_{t+1} lambda_{t+1}: reverse scan, then the carry
            b_an = tl.where(m_next[:, None, :], tl.exp2(b_dt_next[:, None, :] * b_A2[:, :, None]), 1.0)
            b_p, b_v = tl.associative_scan((b_an, b_dy[:, None, :] * b_C), axis=2, combine_fn=combine,
                                           reverse=True)
            b_lam = tl.where(m_t[None, None, :], b_v + b_p * b_carry[:, :, None], 0.0)
            b_carry = tl.sum(tl.where(is_first, b_lam, 0.0), axis=2)
            b_lam_ah = b_lam * (b_hs - b_dBu)  # lambda_t a_t h_{t-1}
            b_dA += tl.sum(b_lam_ah * b_dt[:, None, :], axis=2)
            b_lam_b = tl.sum(b_lam * b_B, axis=1)  # [BLOCK_D, BLOCK_L]
            b_ddt = b_u * b_lam_b + tl.sum(b_lam_ah * b_A[:, :, None], axis=1)
            b_du = b_dt * b_lam_b
            if HAS_D:
                b_du += b_Dskip[:, None] * b_dy
                b_dD += tl.sum(b_dy * b_u, axis=1)
            if DELTA_SOFTPLUS:
                b_ddt = tl.where(b_pre <= 20.0, b_ddt / (1.0 + tl.exp(-b_pre)), b_ddt)
            b_ddt = tl.where(m_t[None, :], b_ddt, 0.0)
            if HAS_BIAS:
                b_dbias += tl.sum(b_ddt, axis=1)
            tl.store(du_ptr + o_g, b_du, mask=m_dt)
            tl.store(ddelta_ptr + o_g, b_ddt, mask=m_dt)
            b_dBf = b_lam * (b_dt * b_u)[:, None, :]  # [BLOCK_D, BLOCK_N, BLOCK_L]
            b_dCf = b_dy[:, None, :] * b_hs
            m_nt = m_n[:, None] & m_t[None, :]
            m_acc = m_n[:, None] & (o_t < t_acc)[None, :]
            if B_PER_CHANNEL:
                b_dB_pc += tl.sum(b_dBf, axis=2)
            else:
                p_dB = dB_ptr + o_ws + o_t[None, :]
                tl.store(p_dB, tl.sum(b_dBf, axis=0) + tl.load(p_dB, mask=m_acc, other=0.0), mask=m_nt)
            if C_PER_CHANNEL:
                b_dC_pc += tl.sum(b_dCf, axis=2)
            else:
                p_dC = dC_ptr + o_ws + o_t[None, :]
                tl.store(p_dC, tl.sum(b_dCf, axis=0) + tl.load(p_dC, mask=m_acc, other=0.0), mask=m_nt)

        o_bdn = i_b * dim * dstate + o_dn
        tl.store(dA_ptr + o_bdn, b_dA, mask=m_dn)
        if B_PER_CHANNEL:
            tl.store(dB_ptr + o_bdn, b_dB_pc, mask=m_dn)
        if C_PER_CHANNEL:
            tl.store(dC_ptr + o_bdn, b_dC_pc, mask=m_dn)
        tl.store(dDb_ptr + i_b * dim + o_d, b_dD, mask=m_d)
        tl.store(dDb_ptr + (batch + i_b) * dim + o_d, b_dbias, mask=m_d)
        tl.debug_barrier()  # the next channel block adds to the dB/dC partials every thread stored


def _bwd_launch_shape(dstate: int, dim_per_group: int, batch: int, groups: int,
                      per_channel: bool) -> tuple[int, int, int, int, int]:
    """``(BLOCK_D, BLOCK_N, BLOCK_L, progs_per_group, blocks_per_prog)``: a fixed function of the
    shapes (not of the device), so the reduction order, hence every bit of dB/dC, is too."""
    block_n, block_l = triton.next_power_of_2(dstate), tile_length(dstate)
    block_d = min(max(1, BWD_TILE_ELEMENTS // (block_n * block_l)), MAX_BLOCK_D,
                  triton.next_power_of_2(dim_per_group))
    blocks_per_group = triton.cdiv(dim_per_group, block_d)
    progs = blocks_per_group if per_channel else min(blocks_per_group, triton.cdiv(BWD_PROGRAMS, batch * groups))
    blocks_per_prog = triton.cdiv(blocks_per_group, progs)
    return block_d, block_n, block_l, triton.cdiv(blocks_per_group, blocks_per_prog), blocks_per_prog


def _saved_tile_states(u, delta, A, B, C, D, z, delta_bias, delta_softplus, groups) -> torch.Tensor:
    """The state entering each tile, by a forward launch (when the forward ran on another backend)."""
    tile_states = _alloc.empty(tile_states_shape(u, A), torch.float32, u.device)
    scan_fwd_triton(torch.empty_like(u), None, u, delta, A, B, C, D, z, delta_bias, delta_softplus, None, None,
                   None, 0, u.shape[0], groups, tile_states)
    return tile_states


def scan_bwd_triton(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool,
                    tile_states: torch.Tensor | None = None) -> tuple:
    """The Triton backend of the backward (contract in :mod:`.selective_scan_bwd`). ``tile_states``
    ``[Bt, n_tiles + 1, D, N]`` fp32 contiguous from the Triton forward, or None (then one forward
    launch recomputes them). Tensors along L without a unit stride are copied."""
    bsz, dim, seqlen = u.shape
    dstate = A.shape[1]
    dout, u, delta, z, B, C = (None if t is None else unit_stride_last(t) for t in (dout, u, delta, z, B, C))
    groups = max(M.shape[1] if M.dim() == 4 else 1 for M in (B, C))
    dim_per_group = dim // groups
    block_d, block_n, block_l, progs_per_group, blocks_per_prog = _bwd_launch_shape(
        dstate, dim_per_group, bsz, groups, B.dim() == 2 and C.dim() == 2)
    f32 = dict(dtype=torch.float32, device=u.device)
    du, ddelta = _alloc.empty(u.shape, **f32), _alloc.empty(u.shape, **f32)
    dz = None if z is None else _alloc.empty(u.shape, **f32)
    dA = _alloc.empty((bsz, dim, dstate), **f32)
    dDb = _alloc.empty((2, bsz, dim), **f32)

    def bc_partials(M: torch.Tensor) -> torch.Tensor:
        shape = (bsz, dim, dstate) if M.dim() == 2 else (progs_per_group, bsz, groups, dstate, seqlen)
        return _alloc.empty(shape, **f32)

    dB, dC = bc_partials(B), bc_partials(C)
    if bsz and dim and seqlen:
        if tile_states is None:
            tile_states = _saved_tile_states(u, delta, A, B, C, D, z, delta_bias, delta_softplus, groups)
        bc_dims = lambda M: (0, 1) if M.dim() == 2 else (0, 1, 2)  # noqa: E731
        b_strides = ([0] if B.dim() == 2 else []) + strides(B, bc_dims(B))
        c_strides = ([0] if C.dim() == 2 else []) + strides(C, bc_dims(C))
        with on_device(u.device):
            _selective_scan_bwd_kernel[(bsz, groups * progs_per_group)](
                dout, u if dlast is None else dlast.float().contiguous(), u, delta, A, B, C,
                u if D is None else D, u if z is None else z, u if delta_bias is None else delta_bias,
                tile_states, du, ddelta, du if dz is None else dz, dA, dDb, dB, dC,
                bsz, seqlen, dim, dstate, groups, dim_per_group, progs_per_group, blocks_per_prog,
                *strides(dout, (0, 1)), *strides(u, (0, 1)), *strides(delta, (0, 1)), *strides(z, (0, 1)),
                *strides(A, (0, 1)), *b_strides, *c_strides,
                HAS_DLAST=dlast is not None,
                HAS_D=D is not None,
                HAS_Z=z is not None,
                HAS_BIAS=delta_bias is not None,
                DELTA_SOFTPLUS=delta_softplus,
                B_PER_CHANNEL=B.dim() == 2,
                C_PER_CHANNEL=C.dim() == 2,
                BLOCK_D=block_d,
                BLOCK_N=block_n,
                BLOCK_L=block_l,
                num_warps=BWD_NUM_WARPS,
            )
    else:  # nothing to walk: zero gradients, empty partials
        for t in (du, ddelta, dz, dA, dDb, dB, dC):
            if t is not None:
                t.zero_()
    # fixed-order sums of the partials (deterministic)
    return (du, ddelta, dA.sum(0), dB.sum(0), dC.sum(0), None if D is None else dDb[0].sum(0), dz,
            None if delta_bias is None else dDb[1].sum(0))
