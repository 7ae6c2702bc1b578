"""The selective scan's Triton kernel and launcher (forward), used by :mod:`.selective_scan` (the
public ops) and, for ``combine`` / ``load_bc``, by the backward kernel (:mod:`.selective_scan_bwd_triton`).

One Triton kernel serves both. Each program owns one sequence and a block of channels of one
group, keeps an fp32 ``[BLOCK_D, N]`` state in registers and walks the sequence in tiles of
``BLOCK_L`` tokens: per tile it scans the (decay, input) pairs with ``tl.associative_scan`` and
chains the carried state in, loading each B/C tile once for all its channels. The packed form
(``IS_VARLEN``) reads its sequence bounds from ``query_start_loc`` and reads/writes the state
cache through ``cache_indices``; the batched form is the same walk with one sequence per batch row.

Backends: ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``cpu`` (the C++ kernel
``csrc/mamba/selective_scan_cpu.cpp``, default on CPU) and ``torch`` (:mod:`.ops_torch`).

int64 offsets (checked by listing every ``index * stride`` product in the kernel): the sequence
``i_s``, the batch row ``i_b``, the channels ``o_d``, the token positions (``t0``/``t1``/``o_t``: a
packed T can pass 2^31 / D), the slot and the state index ``o_n`` (``o_n * stride_n`` with
``stride_n = T`` for packed B/C) are int64, and the group is widened where it meets its stride
(``i_g * stride_g`` with ``stride_g = N T``; an int64 ``i_g`` everywhere cost 8 bytes of stack on
sm_90). Nothing else is multiplied by a stride.
"""

from __future__ import annotations

import triton
import triton.language as tl

from triton_kernels._checks import on_device, strides
from triton_kernels._tl_math import silu, softplus
from triton_kernels.mamba.tiles import tile_length

# Hand-picked launch shape (no autotune: the kernel overwrites the state cache in place, so
# benchmarking configs would corrupt it). A [BLOCK_D, BLOCK_N, BLOCK_L] fp32 scan tile of 2048
# elements per 4 warps compiles to 128 registers for N=16 on sm_90 with no spills (4096: 168-199),
# so 4 programs share an SM and D=5120 gives 1280 programs; longer tiles for small N amortise
# the carry, more channels per program for small N reuse each B/C tile more.
SCAN_TILE_ELEMENTS = 2048
MAX_BLOCK_D = 32
NUM_WARPS = 4


@triton.jit
def combine(a_left, b_left, a_right, b_right):
    """Compose h -> a_left h + b_left, then h -> a_right h + b_right."""
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def load_bc(ptr, i_b, i_g, o_d, o_n, o_t, m_d, m_n, m_t, stride_b, stride_g, stride_n,
             PER_CHANNEL: tl.constexpr):
    """B or C as a [BLOCK_D|1, BLOCK_N, BLOCK_L|1] fp32 block (per-channel [D, N] or a group's tile)."""
    if PER_CHANNEL:
        p = ptr + o_d[:, None] * stride_g + o_n[None, :] * stride_n
        return tl.load(p, mask=m_d[:, None] & m_n[None, :], other=0.0).to(tl.float32)[:, :, None]
    else:
        p = ptr + i_b * stride_b + i_g.to(tl.int64) * stride_g + o_n[:, None] * stride_n + o_t[None, :]
        return tl.load(p, mask=m_n[:, None] & m_t[None, :], other=0.0).to(tl.float32)[None, :, :]


@triton.jit
def _selective_scan_kernel(
    # pointers
    u_ptr,  # [Bu, D, L]; the packed form is [1, D, T]
    delta_ptr,  # like u
    A_ptr,  # [D, N]
    B_ptr,  # [Bb, G, N, L], or [D, N] when B_PER_CHANNEL
    C_ptr,  # like B
    D_ptr,  # [D]
    z_ptr,  # like u
    bias_ptr,  # [D]
    out_ptr,  # like u
    state_ptr,  # [slots, D, N]
    tile_ptr,  # [Bu, n_tiles + 1, D, N] fp32 contiguous, HAS_TILE_STATES: the state entering each tile
    qsl_ptr,  # [n_seq + 1], IS_VARLEN
    cache_ptr,  # [n_seq], HAS_CACHE_IDX
    has_init_ptr,  # [n_seq] bool, HAS_INIT
    # sizes
    seqlen,
    num_slots,
    dstate,
    dim_per_group,
    blocks_per_group,
    pad_slot_id,
    # strides
    stride_u_b, stride_u_d,
    stride_dt_b, stride_dt_d,
    stride_z_b, stride_z_d,
    stride_o_b, stride_o_d,
    stride_A_d, stride_A_n,
    stride_B_b, stride_B_g, stride_B_n,
    stride_C_b, stride_C_g, stride_C_n,
    stride_s_slot, stride_s_d, stride_s_n,
    stride_ts_b, stride_ts_tile,
    # meta
    IS_VARLEN: tl.constexpr,
    HAS_CACHE_IDX: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_STATE: tl.constexpr,
    HAS_TILE_STATES: tl.constexpr,
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
    i_s = tl.program_id(0).to(tl.int64)
    i_g = tl.program_id(1) // blocks_per_group
    o_dg = (tl.program_id(1) % blocks_per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_dg < dim_per_group
    o_d = (i_g * dim_per_group + o_dg).to(tl.int64)
    o_n = tl.arange(0, BLOCK_N).to(tl.int64)
    m_n = o_n < dstate
    m_dn = m_d[:, None] & m_n[None, :]
    if IS_VARLEN:
        i_b = i_s * 0
        # offsets clamped into [0, seqlen = T], non-decreasing: values the checks did not see (skipped
        # under capture, or changed after MambaVarlenMeta.prepare) never move an access outside the tensors
        t0 = tl.minimum(tl.maximum(tl.load(qsl_ptr + i_s).to(tl.int64), 0), seqlen)
        t1 = tl.minimum(tl.maximum(tl.load(qsl_ptr + i_s + 1).to(tl.int64), t0), seqlen)
    else:
        i_b = i_s
        t0 = i_s * 0
        t1 = t0 + seqlen
    if HAS_CACHE_IDX:
        slot = tl.load(cache_ptr + i_s).to(tl.int64)
        # a slot outside the cache (only when the value checks were skipped under graph capture)
        # is treated as the pad slot: nothing outside the cache is read or written
        valid = (slot != pad_slot_id) & (slot >= 0) & (slot < num_slots)
    else:
        slot = i_s
        valid = i_s >= 0
    # a pad sequence reads and writes nothing: no tokens, no state rows (limits, not scalar masks,
    # because the interpreter mishandles bool-tensor & bool-scalar masks)
    t1 = tl.where(valid, t1, t0)
    m_dn_state = (o_dg < tl.where(valid, dim_per_group, 0))[:, None] & m_n[None, :]
    p_state = state_ptr + slot * stride_s_slot + o_d[:, None] * stride_s_d + o_n[None, :] * stride_s_n

    b_A2 = tl.load(A_ptr + o_d[:, None] * stride_A_d + o_n[None, :] * stride_A_n, mask=m_dn, other=0.0)
    b_A2 = b_A2.to(tl.float32) * 1.4426950408889634  # exp(x A) = exp2(x A log2(e))
    b_h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_INIT:
        lim = tl.where(valid & (tl.load(has_init_ptr + i_s) != 0), dim_per_group, 0)
        m_init = (o_dg < lim)[:, None] & m_n[None, :]
        b_h = tl.load(p_state, mask=m_init, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_bias = tl.load(bias_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_D:
        b_Dskip = tl.load(D_ptr + o_d, mask=m_d, other=0.0).to(tl.float32)
    is_last = (tl.arange(0, BLOCK_L) == BLOCK_L - 1)[None, None, :]
    if HAS_TILE_STATES:  # the batched form only (training): saved for the backward pass
        # a scalar int64 base and int32 offsets inside one tile's [D, N] (fewer live registers)
        p_tile = tile_ptr + i_b * stride_ts_b + (i_g * dim_per_group).to(tl.int64) * dstate
        o_tile = o_dg[:, None] * dstate + tl.arange(0, BLOCK_N)[None, :]
        tl.store(p_tile + o_tile, b_h, mask=m_dn)

    for t in range(t0, t1, BLOCK_L):
        o_t = t + tl.arange(0, BLOCK_L)
        m_t = o_t < t1
        m_dt = m_d[:, None] & m_t[None, :]
        p_u = u_ptr + i_b * stride_u_b + o_d[:, None] * stride_u_d + o_t[None, :]
        b_u = tl.load(p_u, mask=m_dt, other=0.0).to(tl.float32)
        b_dt = tl.load(delta_ptr + i_b * stride_dt_b + o_d[:, None] * stride_dt_d + o_t[None, :], mask=m_dt,
                       other=0.0).to(tl.float32)
        if HAS_BIAS:
            b_dt += b_bias[:, None]
        if DELTA_SOFTPLUS:
            b_dt = softplus(b_dt)
        b_B = load_bc(B_ptr, i_b, i_g, o_d, o_n, o_t, m_d, m_n, m_t, stride_B_b, stride_B_g, stride_B_n,
                       B_PER_CHANNEL)
        b_C = load_bc(C_ptr, i_b, i_g, o_d, o_n, o_t, m_d, m_n, m_t, stride_C_b, stride_C_g, stride_C_n,
                       C_PER_CHANNEL)
        # (decay, input) per token; tokens past the end are the identity (1, 0)
        b_dA = tl.where(m_t[None, None, :], tl.exp2(b_dt[:, None, :] * b_A2[:, :, None]), 1.0)
        b_dBu = tl.where(m_t[None, None, :], (b_dt * b_u)[:, None, :] * b_B, 0.0)
        b_a, b_b = tl.associative_scan((b_dA, b_dBu), axis=2, combine_fn=combine)
        b_hs = b_a * b_h[:, :, None] + b_b  # [BLOCK_D, BLOCK_N, BLOCK_L]
        b_h = tl.sum(tl.where(is_last, b_hs, 0.0), axis=2)
        b_y = tl.sum(b_hs * b_C, axis=1)
        if HAS_D:
            b_y += b_Dskip[:, None] * b_u
        if HAS_Z:
            b_z = tl.load(z_ptr + i_b * stride_z_b + o_d[:, None] * stride_z_d + o_t[None, :], mask=m_dt,
                          other=0.0).to(tl.float32)
            b_y *= silu(b_z)
        p_out = out_ptr + i_b * stride_o_b + o_d[:, None] * stride_o_d + o_t[None, :]
        tl.store(p_out, b_y.to(out_ptr.dtype.element_ty), mask=m_dt)
        if HAS_TILE_STATES:  # the state leaving the tile enters the next one (slot n_tiles: the last state)
            tl.store(p_tile + ((t - t0) // BLOCK_L + 1) * stride_ts_tile + o_tile, b_h, mask=m_dn)

    if HAS_STATE:
        tl.store(p_state, b_h.to(state_ptr.dtype.element_ty), mask=m_dn_state)


def block_sizes(dstate: int, dim_per_group: int) -> tuple[int, int, int]:
    block_n, block_l = triton.next_power_of_2(dstate), tile_length(dstate)
    block_d = max(1, SCAN_TILE_ELEMENTS // (block_n * block_l))
    return min(block_d, MAX_BLOCK_D, triton.next_power_of_2(dim_per_group)), block_n, block_l


def scan_fwd_triton(out, state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, qsl, cache_indices,
                   has_initial_state, pad_slot_id, n_seq, groups, tile_states=None) -> None:
    """Launch on the common layout: u/delta/z/out ``[Bu, D, L]``, B/C ``[Bb, G, N, L]`` or ``[D, N]``;
    ``tile_states [Bu, n_tiles + 1, D, N]`` fp32 contiguous (batched form) receives the state entering
    each tile, then the last state."""
    dim, dstate = A.shape
    dim_per_group = dim // groups
    block_d, block_n, block_l = block_sizes(dstate, dim_per_group)
    blocks_per_group = triton.cdiv(dim_per_group, block_d)
    b_per_channel, c_per_channel = B.dim() == 2, C.dim() == 2
    bc_dims = lambda M: (0, 1) if M.dim() == 2 else (0, 1, 2)  # noqa: E731
    b_strides = ([0] if b_per_channel else []) + strides(B, bc_dims(B))
    c_strides = ([0] if c_per_channel else []) + strides(C, bc_dims(C))
    grid = (n_seq, groups * blocks_per_group)
    with on_device(u.device):
        _selective_scan_kernel[grid](
            u, delta, A, B, C,
            u if D is None else D,
            u if z is None else z,
            u if delta_bias is None else delta_bias,
            out,
            out if state is None else state,
            out if tile_states is None else tile_states,
            qsl if qsl is not None else u,
            cache_indices if cache_indices is not None else u,
            has_initial_state if has_initial_state is not None else u,
            u.shape[2], 0 if state is None else state.shape[0], dstate, dim_per_group, blocks_per_group, pad_slot_id,
            *strides(u, (0, 1)), *strides(delta, (0, 1)), *strides(z, (0, 1)), *strides(out, (0, 1)),
            *strides(A, (0, 1)), *b_strides, *c_strides, *strides(state, (0, 1, 2)),
            *strides(tile_states, (0, 1)),
            IS_VARLEN=qsl is not None,
            HAS_CACHE_IDX=cache_indices is not None,
            HAS_INIT=has_initial_state is not None,
            HAS_STATE=state is not None,
            HAS_TILE_STATES=tile_states is not None,
            HAS_D=D is not None,
            HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None,
            DELTA_SOFTPLUS=delta_softplus,
            B_PER_CHANNEL=b_per_channel,
            C_PER_CHANNEL=c_per_channel,
            BLOCK_D=block_d,
            BLOCK_N=block_n,
            BLOCK_L=block_l,
            num_warps=NUM_WARPS,
        )
