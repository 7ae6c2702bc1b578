"""Mamba selective scan (prefill): mamba_ssm's batched form and vLLM's packed form with a state cache.

One Triton kernel serves both. Each program owns one sequence and a block of channels of one
group, keeps an fp32 ``[BLOCK_D, N]`` state in registers and walks the sequence in tiles of
``BLOCK_L`` tokens: per tile it scans the (decay, input) pairs with ``tl.associative_scan`` and
chains the carried state in, loading each B/C tile once for all its channels. The packed form
(``IS_VARLEN``) reads its sequence bounds from ``query_start_loc`` and reads/writes the state
cache through ``cache_indices``; the batched form is the same walk with one sequence per batch row.

Backends: ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``cpu`` (the C++ kernel
``csrc/mamba/selective_scan_cpu.cpp``, default on CPU) and ``torch`` (:mod:`.reference`).

int64 offsets (checked by listing every ``index * stride`` product in the kernel): the sequence
``i_s``, the batch row ``i_b``, the channels ``o_d``, the token positions (``t0``/``t1``/``o_t``: a
packed T can pass 2^31 / D), the slot and the state index ``o_n`` (``o_n * stride_n`` with
``stride_n = T`` for packed B/C) are int64, and the group is widened where it meets its stride
(``i_g * stride_g`` with ``stride_g = N T``; an int64 ``i_g`` everywhere cost 8 bytes of stack on
sm_90). Nothing else is multiplied by a stride.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels import _alloc, _data_checks
from triton_kernels._checks import (
    FLOAT_DTYPES,
    GRAD_DTYPES,
    check_distinct_rows,
    check_no_overlap,
    check_optional,
    check_shape,
    check_tensor,
    on_device,
    strides,
    unit_stride_last,
)
from triton_kernels._ops import destination_op
from triton_kernels._tl_math import silu, softplus
from triton_kernels.backend import interpreter_enabled
from triton_kernels.constants import PAD_SLOT_ID
from triton_kernels.mamba._args import (
    check_default_slots,
    check_index,
    check_pad_slot_id,
    check_query_start_loc,
    pad_slot_of,
)
from triton_kernels.mamba.reference import selective_scan_ref, selective_scan_varlen_ref
from triton_kernels.mamba.scan_backward import selective_scan_bwd
from triton_kernels.mamba.tiles import check_tile_states, tile_length, tile_states_shape
from triton_kernels.registry import SELECTIVE_SCAN

# Hand-picked launch shape (no autotune: the kernel overwrites the state cache in place, so
# benchmarking configs would corrupt it). A [BLOCK_D, BLOCK_N, BLOCK_L] fp32 scan tile of 2048
# elements per 4 warps compiles to 128 registers for N=16 on sm_90 with no spills (4096: 168-199),
# so 4 programs share an SM and D=5120 gives 1280 programs; longer tiles for small N amortise
# the carry, more channels per program for small N reuse each B/C tile more.
SCAN_TILE_ELEMENTS = 2048
MAX_BLOCK_D = 32
NUM_WARPS = 4


@triton.jit
def _combine(a_left, b_left, a_right, b_right):
    """Compose h -> a_left h + b_left, then h -> a_right h + b_right."""
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _load_bc(ptr, i_b, i_g, o_d, o_n, o_t, m_d, m_n, m_t, stride_b, stride_g, stride_n,
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
        t0 = tl.load(qsl_ptr + i_s).to(tl.int64)
        t1 = tl.load(qsl_ptr + i_s + 1).to(tl.int64)
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
        b_B = _load_bc(B_ptr, i_b, i_g, o_d, o_n, o_t, m_d, m_n, m_t, stride_B_b, stride_B_g, stride_B_n,
                       B_PER_CHANNEL)
        b_C = _load_bc(C_ptr, i_b, i_g, o_d, o_n, o_t, m_d, m_n, m_t, stride_C_b, stride_C_g, stride_C_n,
                       C_PER_CHANNEL)
        # (decay, input) per token; tokens past the end are the identity (1, 0)
        b_dA = tl.where(m_t[None, None, :], tl.exp2(b_dt[:, None, :] * b_A2[:, :, None]), 1.0)
        b_dBu = tl.where(m_t[None, None, :], (b_dt * b_u)[:, None, :] * b_B, 0.0)
        b_a, b_b = tl.associative_scan((b_dA, b_dBu), axis=2, combine_fn=_combine)
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


def _block_sizes(dstate: int, dim_per_group: int) -> tuple[int, int, int]:
    block_n, block_l = triton.next_power_of_2(dstate), tile_length(dstate)
    block_d = max(1, SCAN_TILE_ELEMENTS // (block_n * block_l))
    return min(block_d, MAX_BLOCK_D, triton.next_power_of_2(dim_per_group)), block_n, block_l


def _launch_triton(out, state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, qsl, cache_indices,
                   has_initial_state, pad_slot_id, n_seq, groups, tile_states=None) -> None:
    """Launch on the common layout: u/delta/z/out ``[Bu, D, L]``, B/C ``[Bb, G, N, L]`` or ``[D, N]``;
    ``tile_states [Bu, n_tiles + 1, D, N]`` fp32 contiguous (batched form) receives the state entering
    each tile, then the last state."""
    dim, dstate = A.shape
    dim_per_group = dim // groups
    block_d, block_n, block_l = _block_sizes(dstate, dim_per_group)
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


def _as_f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _launch_cpu(out, state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, qsl, cache_indices,
                has_initial_state, pad_slot_id) -> None:
    """The C++ kernel takes fp32, and B/C token-major ``[Bb, G, L, N]`` (copies the size of B and C;
    a per-channel ``[D, N]`` becomes a zero-stride ``[1, D, L, N]`` view); fp16/bf16 buffers
    round-trip through fp32 copies."""
    seqlen = u.shape[2]

    def token_major(M: torch.Tensor) -> torch.Tensor:
        M = M.float()
        if M.dim() == 2:
            M = M.contiguous()
            return M.as_strided((1, M.shape[0], seqlen, M.shape[1]), (0, M.shape[1], 0, 1))
        return M.transpose(-1, -2).contiguous()

    out32 = out if out.dtype == torch.float32 else out.float()
    state32 = state if state is None or state.dtype == torch.float32 else state.float()
    torch.ops.ifk.selective_scan_cpu(
        out32, state32, _as_f32(u), _as_f32(delta), A.float(), token_major(B), token_major(C), _as_f32(D),
        _as_f32(z), _as_f32(delta_bias), delta_softplus, None if qsl is None else qsl.long(),
        None if cache_indices is None else cache_indices.long(), has_initial_state, pad_slot_id,
    )
    if out32 is not out:
        out.copy_(out32)
    if state32 is not state:
        state.copy_(state32)


def _tile_states_kwargs(tile_states: torch.Tensor | None, A: torch.Tensor) -> dict:
    """The torch reference's arguments that write ``tile_states`` (chunks of one tile), if given."""
    return {} if tile_states is None else dict(chunk_size=tile_length(A.shape[1]), chunk_states=tile_states)


@destination_op("selective_scan", mutates_args=("out", "state", "tile_states"))
def _selective_scan(
    out: torch.Tensor,
    state: torch.Tensor | None,
    tile_states: torch.Tensor | None,
    inputs: list[torch.Tensor | None],
    delta_softplus: bool,
    pad_slot_id: int,
) -> None:
    """Destination-passing core of both public ops (metadata validated). ``inputs`` is
    ``[u, delta, A, B, C, D, z, delta_bias, query_start_loc, cache_indices, has_initial_state]``.

    Batched: u ``[B, D, L]``, state the ``[B, D, N]`` last state or None, no query_start_loc;
    ``tile_states`` (training, or None) ``[B, n_tiles + 1, D, N]`` fp32 contiguous: the state
    entering each tile of ``tile_length(N)`` tokens, then the last state, for the Triton backward
    (written by every backend, so a backward on another backend than the forward's stays right).
    Packed: u ``[D, T]``, state the ``[slots, D, N]`` cache, query_start_loc ``[batch + 1]``, no tile_states.
    """
    u, delta, A, B, C, D, z, delta_bias, query_start_loc, cache_indices, has_initial_state = inputs
    varlen = query_start_loc is not None
    if tile_states is not None:  # checked here too: a traced call skips the wrapper
        if varlen:
            raise ValueError("tile_states is for the batched form only, got query_start_loc too")
        check_tile_states(tile_states, u, A)
    if varlen:  # here too, not only in the wrapper: a traced call skips the wrapper's eager checks
        if cache_indices is None:
            check_default_slots("ssm_states", state.shape[0], query_start_loc.shape[0] - 1, "cache_indices",
                                exact=False)
        _data_checks.check_offsets_and_slots("query_start_loc", query_start_loc, u.shape[1], "cache_indices",
                                             cache_indices, state.shape[0], pad_slot_id, unique=True)
    backend = SELECTIVE_SCAN.resolve(u.device, {t.dtype for t in (u, delta, A, B, C) if t is not None})
    if backend == "torch":
        if varlen:
            selective_scan_varlen_ref(out, state, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                      query_start_loc, cache_indices, has_initial_state, pad_slot_id)
        else:
            y, last = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                         **_tile_states_kwargs(tile_states, A))
            out.copy_(y)
            if state is not None:
                state.copy_(last)
        return
    if varlen:  # the common layout: the packed form is a batch of one
        out, u, delta, z = (None if t is None else t[None] for t in (out, u, delta, z))
        B, C = B[None], C[None]
    else:
        B, C = (M[:, None] if M.dim() == 3 else M for M in (B, C))
    n_seq = query_start_loc.shape[0] - 1 if varlen else u.shape[0]
    if n_seq == 0 or u.shape[1] == 0:
        return
    args = (out, state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, query_start_loc,
            cache_indices, has_initial_state, pad_slot_id)
    if backend == "cpu":
        _launch_cpu(*args)
        if tile_states is not None:  # only under the interpreter (a CPU forward before a Triton backward)
            selective_scan_ref(u, delta, A, B, C, None, None, delta_bias, delta_softplus,
                               **_tile_states_kwargs(tile_states, A))
    else:
        groups = max(M.shape[1] if M.dim() == 4 else 1 for M in (B, C))
        _launch_triton(*args, n_seq, groups, tile_states)


def _check_bc(name: str, M: object, dim: int, dstate: int, lead: tuple[int, ...], length: int,
              device: torch.device, per_channel_ok: bool, dtypes: tuple[torch.dtype, ...]) -> int:
    """Check B or C; return its group count (0 for a per-channel ``[D, N]`` matrix)."""
    ndims = (2, len(lead) + 2, len(lead) + 3) if per_channel_ok else (len(lead) + 3,)
    check_tensor(name, M, ndim=ndims, dtypes=dtypes, device=device)
    if M.dim() == 2:
        check_shape(name, M, (dim, dstate))
        return 0
    if M.dim() == len(lead) + 2:
        check_shape(name, M, (*lead, dstate, length))
        return 1
    check_shape(name, M, (*lead, None, dstate, length))
    groups = M.shape[len(lead)]
    if groups == 0 or dim % groups:
        raise ValueError(f"{name} has {groups} groups, which must divide the {dim} channels")
    return groups


def _validated(u, delta, A, B, C, D, z, delta_bias, *, varlen: bool) -> tuple:
    """Check the arguments the two forms share; return them with unit stride along the sequence.
    The channel count comes from A (``[D, N]``), so a transposed u is reported as a bad u."""
    dtypes = FLOAT_DTYPES if varlen else GRAD_DTYPES  # float64: selective_scan_fn on the torch backend
    check_tensor("u", u, ndim=2 if varlen else 3, dtypes=dtypes)
    device, length = u.device, u.shape[-1]
    if isinstance(A, torch.Tensor) and A.is_complex():
        raise TypeError(f"A must be real (complex A is not supported), got {A.dtype}")
    check_tensor("A", A, ndim=2, dtypes=dtypes, device=device)
    dim = A.shape[0]
    check_shape("u", u, (dim, None) if varlen else (None, dim, None))
    check_tensor("delta", delta, dtypes=dtypes, device=device)
    check_shape("delta", delta, u.shape)
    dstate = A.shape[1]
    if dstate == 0:
        raise ValueError(f"A must have a state size N >= 1, got shape {list(A.shape)}")
    lead = () if varlen else (u.shape[0],)
    groups = [_check_bc(n, M, dim, dstate, lead, length, device, not varlen, dtypes) for n, M in (("B", B), ("C", C))]
    if min(groups) > 0 and groups[0] != groups[1]:
        raise ValueError(f"B and C must have the same number of groups, got {groups[0]} and {groups[1]}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if check_optional(name, t, ndim=1, dtypes=dtypes, device=device) is not None:
            check_shape(name, t, (dim,))
    if check_optional("z", z, dtypes=dtypes, device=device) is not None:
        check_shape("z", z, u.shape)
    return tuple(None if t is None else unit_stride_last(t) for t in (u, delta, A, B, C, D, z, delta_bias))


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, return_last_state: bool,
                  tile_states: torch.Tensor | None = None):
    out = _alloc.empty_like(u)
    last = (_alloc.empty((u.shape[0], *A.shape), torch.promote_types(u.dtype, torch.float32), u.device)
            if return_last_state else None)
    _selective_scan(out, last, tile_states, [u, delta, A, B, C, D, z, delta_bias, None, None, None],
                    bool(delta_softplus), PAD_SLOT_ID)
    return (out, last) if return_last_state else out


def _as_groups(M: torch.Tensor) -> torch.Tensor:
    """B or C in the backward's form: ``[B, N, L]`` as ``[B, 1, N, L]`` (others unchanged)."""
    return M[:, None] if M.dim() == 3 else M


class _SelectiveScanFn(torch.autograd.Function):
    """Saves the inputs (and, on CUDA or under the interpreter, the fp32 state entering each tile,
    ``[B, n_tiles + 1, D, N]``: the backward recomputes the states inside a tile from it);
    the backward is ``ifk::selective_scan_bwd`` (:mod:`.scan_backward`)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        tile_states = None
        if u.is_cuda or interpreter_enabled():  # where the Triton backward may run (no ContextVar here:
            # torch.compile traces this; the op writes the states on every backend)
            tile_states = _alloc.empty(tile_states_shape(u, A), torch.float32, u.device)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, tile_states)
        ctx.delta_softplus = bool(delta_softplus)
        return _scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, tile_states)

    @staticmethod
    def backward(ctx, dout, dlast=None):
        u, delta, A, B, C, D, z, delta_bias, tile_states = ctx.saved_tensors
        grads = list(selective_scan_bwd(unit_stride_last(dout), dlast, u, delta, A, _as_groups(B), _as_groups(C), D,
                                        z, delta_bias, ctx.delta_softplus, tile_states))
        grads[3], grads[4] = grads[3].view(B.shape), grads[4].view(C.shape)
        return (*grads, None, None)


def selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """mamba_ssm's selective scan: ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t``, ``y_t = C_t h_t + D u_t``.

    Args:
        u, delta: ``[B, D, L]`` fp32/fp16/bf16. ``dt = delta (+ delta_bias)``, then
            ``softplus`` (identity above 20) when ``delta_softplus``.
        A: ``[D, N]`` real (complex A raises).
        B, C: ``[D, N]`` (per channel), ``[B, N, L]`` or ``[B, G, N, L]`` (channel d uses group
            ``d // (D / G)``); grouped B and C need the same G.
        D, delta_bias: optional ``[D]``. z: optional ``[B, D, L]``, output gated by ``silu(z)``.
        return_last_state: also return the final state.

    Returns ``out [B, D, L]`` in u's dtype, or ``(out, last_state [B, D, N] fp32)``. Arithmetic is
    fp32. Differentiable in every tensor argument (the last state too) on every backend; the
    gradients are deterministic (bit-identical for the same inputs, device and backend).

    Example:
        >>> u = torch.randn(2, 64, 100); A = -torch.rand(64, 16); Bc = torch.randn(2, 16, 100)
        >>> selective_scan_fn(u, torch.rand(2, 64, 100), A, Bc, Bc, delta_softplus=True).shape
        torch.Size([2, 64, 100])
    """
    args = _validated(u, delta, A, B, C, D, z, delta_bias, varlen=False)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return _SelectiveScanFn.apply(*args, delta_softplus, return_last_state)
    return _scan_forward(*args, delta_softplus, return_last_state)


def selective_scan_varlen(
    u: torch.Tensor,
    ssm_states: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    query_start_loc: torch.Tensor | None = None,
    cache_indices: torch.Tensor | None = None,
    has_initial_state: torch.Tensor | None = None,
    pad_slot_id: int = PAD_SLOT_ID,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """vLLM's packed selective scan with a state cache (prefill of several sequences in one call).

    Args:
        u, delta: ``[D, T]`` fp32/fp16/bf16, the sequences packed along T.
        ssm_states: ``[slots, D, N]`` fp32/fp16/bf16 (may differ from u's dtype). Sequence b
            starts from row ``cache_indices[b]`` when ``has_initial_state[b]`` (else from zeros),
            and its final state overwrites that row. Other rows are left untouched.
        A: ``[D, N]`` real. B, C: ``[G, N, T]`` (G divides D).
        D, delta_bias: optional ``[D]``. z: optional ``[D, T]`` gate (never written).
        query_start_loc: ``[batch + 1]`` int32/int64 token offsets from 0 to T, non-decreasing
            (None: one sequence of T tokens).
        cache_indices: ``[batch]`` int32/int64 state rows (None: row b for sequence b, and then
            ssm_states needs at least batch rows). Sequences whose index is ``pad_slot_id`` are
            skipped: no state read or written, no output column written. A row other than the pad
            slot may appear once (ValueError otherwise; under CUDA-graph capture the check is
            skipped and two sequences writing one row race: the result is undefined).
        has_initial_state: ``[batch]`` bool (None: every sequence starts from zeros).
        out: optional ``[D, T]`` destination in u's dtype (unit stride along T).

    Returns ``out`` (a new tensor when not given: zeros where pad sequences were skipped).
    Checks query_start_loc and cache_indices against T and the slot count with one host sync,
    skipped while a CUDA graph is being captured (an out-of-range index then counts as the pad
    slot: nothing outside the cache is read or written).

    Example:
        >>> u = torch.randn(64, 10); A = -torch.rand(64, 16); Bc = torch.randn(1, 16, 10)
        >>> states = torch.zeros(4, 64, 16); qsl = torch.tensor([0, 3, 10], dtype=torch.int32)
        >>> selective_scan_varlen(u, states, torch.rand(64, 10), A, Bc, Bc, query_start_loc=qsl,
        ...                       cache_indices=torch.tensor([2, 0])).shape
        torch.Size([64, 10])
    """
    u, delta, A, B, C, D, z, delta_bias = _validated(u, delta, A, B, C, D, z, delta_bias, varlen=True)
    dim, num_tokens = u.shape
    check_tensor("ssm_states", ssm_states, ndim=3, dtypes=FLOAT_DTYPES, device=u.device)
    check_shape("ssm_states", ssm_states, (None, dim, A.shape[1]))
    if query_start_loc is None:
        query_start_loc = torch.tensor([0, num_tokens], dtype=torch.int32, device=u.device)
    batch = check_query_start_loc(query_start_loc, u.device)
    cache_indices = check_index("cache_indices", cache_indices, batch, u.device)
    if cache_indices is None:
        check_default_slots("ssm_states", ssm_states.shape[0], batch, "cache_indices", exact=False)
    has_initial_state = check_index("has_initial_state", has_initial_state, batch, u.device, (torch.bool,))
    pad_slot_id = pad_slot_of(cache_indices, check_pad_slot_id(pad_slot_id))
    inputs = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    check_distinct_rows("ssm_states", ssm_states)
    check_no_overlap("ssm_states", ssm_states, inputs)
    if out is None:  # pad sequences' columns are never written: zeros there
        alloc = _alloc.empty if cache_indices is None else torch.zeros
        out = alloc((dim, num_tokens), dtype=u.dtype, device=u.device)
    else:
        check_tensor("out", out, ndim=2, dtypes=(u.dtype,), device=u.device)
        check_shape("out", out, (dim, num_tokens))
        if num_tokens > 1 and out.stride(1) != 1:
            raise ValueError(f"out must have unit stride along T, got strides {out.stride()}")
        check_no_overlap("out", out, {**inputs, "ssm_states": ssm_states})
    _selective_scan(out, ssm_states, None, [u, delta, A, B, C, D, z, delta_bias, query_start_loc.contiguous(),
                                      cache_indices, has_initial_state], bool(delta_softplus), pad_slot_id)
    return out
