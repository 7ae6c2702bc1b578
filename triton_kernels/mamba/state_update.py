"""Mamba decode step: ``selective_state_update`` (mamba_ssm / vLLM semantics), state updated in place.

One program updates ``BLOCK_P`` channels of one head of one batch row across the whole state size
``N``: it gathers the row's state by slot, discretises (``exp(dt A)``, ``dt B x``), writes the new
state back and reduces it against ``C``. The plain ``[slots, D, N]`` form runs as one head.

int64 offsets (checked by listing every ``index * stride`` product in the kernel): the state cache
``[slots, H, P, N]`` can pass 2^31 elements (e.g. 4096 slots x 5120 x 128), so ``slot`` and the row
``i_b`` are int64, and so is the head ``i_h`` (``i_h * stride_h`` < H P N fits int32 today, but costs
nothing to widen). The remaining products stay within one ``[P, N]`` tile of one head (``o_p *
stride_p``, ``o_n * stride_n``) or one ``[G, N]`` row of B/C, far below 2^31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels import _alloc, _data_checks
from triton_kernels._checks import (
    FLOAT_DTYPES,
    check_distinct_rows,
    check_no_overlap,
    check_optional,
    check_shape,
    check_tensor,
    on_device,
    strides,
)
from triton_kernels._ops import destination_op
from triton_kernels._tl_math import silu, softplus
from triton_kernels.constants import PAD_SLOT_ID
from triton_kernels.mamba._args import check_default_slots, check_index, check_pad_slot_id, pad_slot_of
from triton_kernels.mamba.ops_torch import selective_state_update_ref
from triton_kernels.registry import SELECTIVE_STATE_UPDATE


@triton.jit
def _selective_state_update_kernel(
    # pointers
    state_ptr,  # [slots, H, P, N], read and written
    x_ptr,  # [B, H, P]
    dt_ptr,  # [B, H, P]
    dt_bias_ptr,  # [H, P]
    A_ptr,  # [H, P, N]
    B_ptr,  # [B, G, N]
    C_ptr,  # [B, G, N]
    D_ptr,  # [H, P]
    z_ptr,  # [B, H, P]
    out_ptr,  # [B, H, P], written
    slot_ptr,  # [B] int, when HAS_SLOTS
    # sizes
    num_slots,
    dim,
    dstate,
    heads_per_group,
    pad_slot_id,
    # strides
    stride_state_s, stride_state_h, stride_state_p, stride_state_n,
    stride_x_b, stride_x_h, stride_x_p,
    stride_dt_b, stride_dt_h, stride_dt_p,
    stride_dt_bias_h, stride_dt_bias_p,
    stride_A_h, stride_A_p, stride_A_n,
    stride_B_b, stride_B_g, stride_B_n,
    stride_C_b, stride_C_g, stride_C_n,
    stride_D_h, stride_D_p,
    stride_z_b, stride_z_h, stride_z_p,
    stride_out_b, stride_out_h, stride_out_p,
    # meta
    DT_SOFTPLUS: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    TIE_HDIM: tl.constexpr,  # A, dt, dt_bias constant along P (A also along N): one scalar per head
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_p = tl.program_id(0)
    i_b = tl.program_id(1).to(tl.int64)
    i_h = tl.program_id(2).to(tl.int64)
    i_g = i_h // heads_per_group
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_n = tl.arange(0, BLOCK_N)
    m_p = o_p < dim
    m_pn = m_p[:, None] & (o_n[None, :] < dstate)
    slot = tl.load(slot_ptr + i_b).to(tl.int64) if HAS_SLOTS else i_b
    p_out = out_ptr + i_b * stride_out_b + i_h * stride_out_h + o_p * stride_out_p
    if (slot == pad_slot_id) | (slot < 0) | (slot >= num_slots):  # out-of-range only under graph capture
        tl.store(p_out, tl.zeros((BLOCK_P,), dtype=out_ptr.dtype.element_ty), mask=m_p)
    else:
        p_state = (state_ptr + slot * stride_state_s + i_h * stride_state_h
                   + o_p[:, None] * stride_state_p + o_n[None, :] * stride_state_n)
        b_state = tl.load(p_state, mask=m_pn, other=0.0).to(tl.float32)
        b_x = tl.load(x_ptr + i_b * stride_x_b + i_h * stride_x_h + o_p * stride_x_p, mask=m_p).to(tl.float32)
        p_dt = dt_ptr + i_b * stride_dt_b + i_h * stride_dt_h
        p_dt_bias = dt_bias_ptr + i_h * stride_dt_bias_h
        if TIE_HDIM:  # mamba2: dt, dt_bias, A per head; one softplus and one exp per program
            b_dt = tl.load(p_dt).to(tl.float32)
            if HAS_DT_BIAS:
                b_dt += tl.load(p_dt_bias).to(tl.float32)
        else:
            b_dt = tl.load(p_dt + o_p * stride_dt_p, mask=m_p).to(tl.float32)
            if HAS_DT_BIAS:
                b_dt += tl.load(p_dt_bias + o_p * stride_dt_bias_p, mask=m_p).to(tl.float32)
        if DT_SOFTPLUS:
            b_dt = softplus(b_dt)
        if TIE_HDIM:
            b_dA = tl.exp(tl.load(A_ptr + i_h * stride_A_h).to(tl.float32) * b_dt)
        else:
            b_A = tl.load(A_ptr + i_h * stride_A_h + o_p[:, None] * stride_A_p + o_n[None, :] * stride_A_n,
                          mask=m_pn, other=0.0).to(tl.float32)
            b_dA = tl.exp(b_A * b_dt[:, None])
        b_B = tl.load(B_ptr + i_b * stride_B_b + i_g * stride_B_g + o_n * stride_B_n, mask=o_n < dstate,
                      other=0.0).to(tl.float32)
        b_C = tl.load(C_ptr + i_b * stride_C_b + i_g * stride_C_g + o_n * stride_C_n, mask=o_n < dstate,
                      other=0.0).to(tl.float32)
        b_state = b_state * b_dA + b_B[None, :] * (b_dt * b_x)[:, None]
        tl.store(p_state, b_state.to(state_ptr.dtype.element_ty), mask=m_pn)
        b_out = tl.sum(b_state * b_C[None, :], axis=1)
        if HAS_D:
            b_out += b_x * tl.load(D_ptr + i_h * stride_D_h + o_p * stride_D_p, mask=m_p).to(tl.float32)
        if HAS_Z:
            p_z = z_ptr + i_b * stride_z_b + i_h * stride_z_h + o_p * stride_z_p
            b_z = tl.load(p_z, mask=m_p).to(tl.float32)
            b_out *= silu(b_z)
        tl.store(p_out, b_out.to(out_ptr.dtype.element_ty), mask=m_p)


def _block_config(dstate: int) -> tuple[int, int]:
    """``(BLOCK_P, num_warps)`` hand-picked by state size, as mamba_ssm does: a program keeps a
    ``[BLOCK_P, N]`` fp32 state tile in registers, so wider states take fewer channels. Never
    autotuned: the kernel updates the state in place, and a tuning rerun would apply it twice."""
    if dstate <= 32:
        return 32, 4
    if dstate <= 64:
        return 16, 4
    if dstate <= 128:
        return 8, 4
    return 4, 8


def _tie_hdim(A, dt, dt_bias) -> bool:
    """True when A ``[H, P, N]``, dt ``[B, H, P]`` and dt_bias ``[H, P]`` are constant along P (A
    also along N): Mamba-2's expand of per-head values (zero strides; size-1 dims count too)."""
    def tied(t, dims):
        return t is None or all(t.shape[d] == 1 or t.stride(d) == 0 for d in dims)

    return tied(A, (1, 2)) and tied(dt, (2,)) and tied(dt_bias, (1,))


def _launch_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, slots, pad_slot_id, out) -> None:
    batch, heads, dim = x.shape
    dstate = state.shape[-1]
    block_p, num_warps = _block_config(dstate)
    block_p = min(block_p, triton.next_power_of_2(dim))
    grid = (triton.cdiv(dim, block_p), batch, heads)
    with on_device(x.device):
        _selective_state_update_kernel[grid](
            state, x, dt, x if dt_bias is None else dt_bias, A, B, C, x if D is None else D,
            x if z is None else z, out, x if slots is None else slots,
            state.shape[0], dim, dstate, heads // B.shape[1], pad_slot_id,
            *state.stride(), *x.stride(), *dt.stride(), *strides(dt_bias, 2), *A.stride(), *B.stride(),
            *C.stride(), *strides(D, 2), *strides(z, 3), *out.stride(),
            DT_SOFTPLUS=dt_softplus, HAS_DT_BIAS=dt_bias is not None, HAS_D=D is not None,
            HAS_Z=z is not None, HAS_SLOTS=slots is not None, TIE_HDIM=_tie_hdim(A, dt, dt_bias),
            BLOCK_P=block_p, BLOCK_N=triton.next_power_of_2(dstate), num_warps=num_warps,
        )


@destination_op("selective_state_update", mutates_args=("state", "out"))
def _selective_state_update(
    state: torch.Tensor,
    out: torch.Tensor,
    inputs: list[torch.Tensor | None],
    dt_softplus: bool,
    pad_slot_id: int,
) -> None:
    """Destination-passing core in the heads form (metadata validated): ``inputs`` is
    ``[x, dt, A, B, C, D, z, dt_bias, slots]`` (the last four may be ``None``)."""
    x, dt, A, B, C, D, z, dt_bias, slots = inputs
    _data_checks.check_slots("state_batch_indices", slots, state.shape[0], pad_slot_id, unique=True)
    if x.shape[0] == 0:
        return
    if SELECTIVE_STATE_UPDATE.resolve(x.device) == "torch":
        selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, slots, pad_slot_id, out)
    else:
        _launch_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, slots, pad_slot_id, out)


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: torch.Tensor | None = None,
    pad_slot_id: int = PAD_SLOT_ID,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step of the selective SSM; ``state`` is updated in place.

    Plain form / heads form (mamba2), all fp32/fp16/bf16 (math in fp32, any strides):
        state: ``[slots, D, N]`` / ``[slots, H, P, N]``, read and written (may be fp32 while x is bf16).
        x, dt, z: ``[B, D]`` / ``[B, H, P]``.
        A: ``[D, N]`` / ``[H, P, N]`` (mamba2's expanded ``[H]`` with zero strides is fine).
        B, C: ``[B, N]`` / ``[B, G, N]``, G dividing H (head h reads group ``h // (H // G)``).
        D, dt_bias: ``[D]`` / ``[H, P]``.
        dt_softplus: apply softplus to ``dt + dt_bias`` (values above 20 pass through).
        state_batch_indices: ``[B]`` int32/int64 slot of each row (default: row b uses slot b);
            a row at ``pad_slot_id`` reads and writes no state and gets a zero output row. A slot
            other than the pad slot may appear once (two rows updating one state would race on a
            GPU): a repeat raises ValueError, except under CUDA-graph capture, where the check is
            skipped and repeated rows race (the result is then undefined).
        out: optional destination like ``x``.

    Returns ``out`` (or a new tensor like ``x``): ``(state . C + D x) * silu(z)`` with the new state
    ``state * exp(dt A) + dt B x``. Validating ``state_batch_indices`` (range, repeats) syncs with the
    device once (skipped under CUDA-graph capture, where out-of-range rows are treated as pad rows).

    Example:
        >>> state = torch.zeros(4, 8, 16); x = torch.randn(2, 8); A = -torch.rand(8, 16)
        >>> y = selective_state_update(state, x, x.abs(), A, torch.randn(2, 16), torch.randn(2, 16),
        ...                            state_batch_indices=torch.tensor([3, -1]))
        >>> y.shape, bool(state[:3].eq(0).all()), bool(y[1].eq(0).all())
        (torch.Size([2, 8]), True, True)
    """
    check_tensor("state", state, ndim=(3, 4), dtypes=FLOAT_DTYPES)
    dev = state.device
    heads_form = state.dim() == 4
    dim, dstate = state.shape[-2], state.shape[-1]
    heads = state.shape[1] if heads_form else 1
    row = [heads, dim] if heads_form else [dim]
    check_tensor("x", x, ndim=len(row) + 1, dtypes=FLOAT_DTYPES, device=dev)
    batch = x.shape[0]
    for name, t in (("x", x), ("dt", dt), ("z", z), ("out", out)):
        if check_optional(name, t, dtypes=FLOAT_DTYPES, device=dev) is not None:
            check_shape(name, t, [batch, *row])
    if out is not None and out.dtype != x.dtype:
        raise TypeError(f"out must have x's dtype {x.dtype}, got {out.dtype}")
    check_shape("A", check_tensor("A", A, dtypes=FLOAT_DTYPES, device=dev), [*row, dstate])
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if check_optional(name, t, dtypes=FLOAT_DTYPES, device=dev) is not None:
            check_shape(name, t, row)
    for name, t in (("B", B), ("C", C)):
        check_tensor(name, t, ndim=3 if heads_form else 2, dtypes=FLOAT_DTYPES, device=dev)
        check_shape(name, t, [batch, None, dstate] if heads_form else [batch, dstate])
    groups = B.shape[1] if heads_form else 1
    if heads_form and (C.shape[1] != groups or groups == 0 or heads % groups):
        raise ValueError(f"B and C need the same number of groups dividing H={heads}, got "
                         f"{B.shape[1]} and {C.shape[1]}")
    slots = check_index("state_batch_indices", state_batch_indices, batch, dev)
    if slots is None:
        check_default_slots("state", state.shape[0], batch, "state_batch_indices", exact=True)
    inputs = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias}
    check_distinct_rows("state", state)
    check_no_overlap("state", state, inputs)
    if out is None:
        out = _alloc.empty_like(x)
    else:
        check_no_overlap("out", out, {**inputs, "state": state})
    if not heads_form:  # the plain form is the heads form with one head and one group
        state, A = state.unsqueeze(1), A.unsqueeze(0)
        x, dt, B, C = x.unsqueeze(1), dt.unsqueeze(1), B.unsqueeze(1), C.unsqueeze(1)
        D, dt_bias = (None if t is None else t.unsqueeze(0) for t in (D, dt_bias))
        z = None if z is None else z.unsqueeze(1)
    _selective_state_update(
        state, out if heads_form else out.unsqueeze(1), [x, dt, A, B, C, D, z, dt_bias, slots],
        bool(dt_softplus), pad_slot_of(slots, check_pad_slot_id(pad_slot_id)),
    )
    return out
