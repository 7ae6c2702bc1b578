"""Gated RMSNorm, the norm every Mamba-2 block ends with (mamba_ssm ``RMSNormGated`` / ``rmsnorm_fn``).

Per group of ``group_size`` channels: ``rmsnorm(x) * weight * silu(z)`` when the norm comes before
the gate, ``rmsnorm(x * silu(z)) * weight`` otherwise (HF transformers' ``MambaRMSNormGated``). One
program normalises one group of one row in fp32: one read of x and z, one write of out.

Backward (``ifk::rms_norm_gated_bwd``): with ``h`` the normalised input (``x``, or ``x * silu(z)``
when the gate comes first), ``r = rsqrt(mean(h^2) + eps)`` per group, ``n = h r`` and ``dn`` the
gradient reaching ``n``: ``dh = r (dn - n mean(dn n))``. The kernel recomputes ``r`` from x (and z),
which it reads anyway, instead of saving it in the forward: no extra write there, no extra read
here. ``dweight`` is a sum over rows: each program sums its own block of rows into one row of a
``[n_blocks, H]`` fp32 workspace, and a fixed-order ``sum(0)`` finishes it - no atomics, so the
same inputs give bit-identical gradients.
"""

from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

from triton_kernels import _alloc
from triton_kernels._checks import GRAD_DTYPES, check_optional, check_shape, check_tensor, on_device, unit_stride_last
from triton_kernels._ops import destination_op
from triton_kernels._tl_math import silu
from triton_kernels.registry import RMS_NORM_GATED

# Channels one program holds in registers at once (fp32: 32 KB for x, as much again for z). A group
# of up to MAX_BLOCK channels is read once; a wider one is read twice (sum of squares, then output).
MAX_BLOCK = 8192
# Row blocks of the backward (one dweight partial each) per SM on a GPU: a few programs per SM hide
# memory latency; the [n_blocks, H] fp32 partials stay a small fraction of the traffic. A fixed count
# on CPU (the interpreter runs programs one after another).
BWD_BLOCKS_PER_SM = 4
BWD_BLOCKS_CPU = 4


@triton.jit
def _gated_input(p_x, p_z, o, m, GATE_FIRST: tl.constexpr):
    """``x`` (times ``silu(z)`` when the gate comes before the norm) at offsets ``o``, fp32."""
    b_x = tl.load(p_x + o, mask=m, other=0.0).to(tl.float32)
    if GATE_FIRST:
        b_x *= silu(tl.load(p_z + o, mask=m, other=0.0).to(tl.float32))
    return b_x


@triton.jit
def _write_output(p_out, p_w, p_z, o, m, b_x, rstd, GATE_AFTER: tl.constexpr):
    """``out = x * rstd * w`` (times ``silu(z)`` when the gate comes after the norm) at offsets ``o``."""
    b_y = b_x * rstd * tl.load(p_w + o, mask=m, other=0.0).to(tl.float32)
    if GATE_AFTER:
        b_y *= silu(tl.load(p_z + o, mask=m, other=0.0).to(tl.float32))
    tl.store(p_out + o, b_y.to(p_out.dtype.element_ty), mask=m)


@triton.jit
def _rms_norm_gated_kernel(
    # pointers
    x_ptr,  # [M, H]
    w_ptr,  # [H]
    z_ptr,  # [M, H], when GATE_FIRST or GATE_AFTER
    out_ptr,  # [M, H], written
    # sizes
    group_size,
    eps,
    # strides (the channel stride is 1)
    stride_x_m,
    stride_z_m,
    stride_out_m,
    # meta
    GATE_FIRST: tl.constexpr,
    GATE_AFTER: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    i_g = tl.program_id(1).to(tl.int64)
    o_g = i_g * group_size
    p_x = x_ptr + i_m * stride_x_m + o_g
    p_z = z_ptr + i_m * stride_z_m + o_g
    p_out = out_ptr + i_m * stride_out_m + o_g
    p_w = w_ptr + o_g
    if ONE_BLOCK:
        o = tl.arange(0, BLOCK)
        m = o < group_size
        b_x = _gated_input(p_x, p_z, o, m, GATE_FIRST)
        rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=0) / group_size + eps)
        _write_output(p_out, p_w, p_z, o, m, b_x, rstd, GATE_AFTER)
    else:
        b_sq = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, group_size, BLOCK):
            o = start + tl.arange(0, BLOCK)
            b_x = _gated_input(p_x, p_z, o, o < group_size, GATE_FIRST)
            b_sq += b_x * b_x
        rstd = 1.0 / tl.sqrt(tl.sum(b_sq, axis=0) / group_size + eps)
        for start in range(0, group_size, BLOCK):
            o = start + tl.arange(0, BLOCK)
            m = o < group_size
            b_x = _gated_input(p_x, p_z, o, m, GATE_FIRST)
            _write_output(p_out, p_w, p_z, o, m, b_x, rstd, GATE_AFTER)


def _launch_triton(out, x, weight, z, eps: float, group_size: int, norm_before_gate: bool) -> None:
    rows, hidden = x.shape
    block = min(MAX_BLOCK, triton.next_power_of_2(group_size))
    with on_device(x.device):
        _rms_norm_gated_kernel[(rows, hidden // group_size)](
            x, weight, x if z is None else z, out,
            group_size, eps,
            x.stride(0), 0 if z is None else z.stride(0), out.stride(0),
            GATE_FIRST=z is not None and not norm_before_gate,
            GATE_AFTER=z is not None and norm_before_gate,
            BLOCK=block, ONE_BLOCK=block >= group_size,
            num_warps=min(max(block // 256, 1), 8),  # mamba_ssm's rule: one warp per 256 channels, at most 8
        )


@triton.jit
def _silu_grad(b_z):
    """``d silu(z) / dz = s (1 + z (1 - s))`` with ``s = sigmoid(z)``, fp32."""
    b_s = tl.sigmoid(b_z)
    return b_s * (1.0 + b_z * (1.0 - b_s))


@triton.jit
def _bwd_load(p_dy, p_x, p_z, o, m, HAS_Z: tl.constexpr):
    """``(dy, x, z)`` at offsets ``o`` in fp32 (z is 0 without a gate)."""
    b_dy = tl.load(p_dy + o, mask=m, other=0.0).to(tl.float32)
    b_x = tl.load(p_x + o, mask=m, other=0.0).to(tl.float32)
    b_z = tl.zeros(o.shape, dtype=tl.float32)
    if HAS_Z:
        b_z = tl.load(p_z + o, mask=m, other=0.0).to(tl.float32)
    return b_dy, b_x, b_z


@triton.jit
def _bwd_terms(b_dy, b_x, b_w, b_z, GATE_FIRST: tl.constexpr, GATE_AFTER: tl.constexpr):
    """``(h, dn, gate)``: the normalised input ``h`` (``x``, times ``silu(z)`` when the gate comes first),
    the gradient ``dn = dy w`` (times ``silu(z)`` when it comes after) reaching ``n = h r``, and
    ``gate = silu(z)`` (1 without z)."""
    b_gate = silu(b_z) if GATE_FIRST or GATE_AFTER else tl.full(b_x.shape, 1.0, tl.float32)
    b_h = b_x * b_gate if GATE_FIRST else b_x
    b_dn = b_dy * b_w * b_gate if GATE_AFTER else b_dy * b_w
    return b_h, b_dn, b_gate


@triton.jit
def _bwd_write(p_dx, p_dz, o, m, b_dy, b_x, b_w, b_z, rstd, b_c,
               GATE_FIRST: tl.constexpr, GATE_AFTER: tl.constexpr):
    """Write dx (and dz) at offsets ``o`` given the group's ``rstd`` and ``b_c = mean(dn n)``; return
    this row's dweight term ``dy n`` (times ``silu(z)`` when the gate comes after), fp32."""
    b_h, b_dn, b_gate = _bwd_terms(b_dy, b_x, b_w, b_z, GATE_FIRST, GATE_AFTER)
    b_n = b_h * rstd
    b_dh = (b_dn - b_n * b_c) * rstd
    tl.store(p_dx + o, (b_dh * b_gate if GATE_FIRST else b_dh).to(p_dx.dtype.element_ty), mask=m)
    if GATE_FIRST:
        tl.store(p_dz + o, (b_dh * b_x * _silu_grad(b_z)).to(p_dz.dtype.element_ty), mask=m)
    if GATE_AFTER:
        tl.store(p_dz + o, (b_dy * b_n * b_w * _silu_grad(b_z)).to(p_dz.dtype.element_ty), mask=m)
    return b_dy * b_n * b_gate if GATE_AFTER else b_dy * b_n


@triton.jit(do_not_specialize=["rows", "rows_per_program"])
def _rms_norm_gated_bwd_kernel(
    # pointers
    dy_ptr,  # [M, H]
    x_ptr,  # [M, H]
    w_ptr,  # [H]
    z_ptr,  # [M, H], when GATE_FIRST or GATE_AFTER
    dx_ptr,  # [M, H], written
    dz_ptr,  # [M, H], written when GATE_FIRST or GATE_AFTER
    dw_ptr,  # [n_blocks, H] fp32 workspace: row i_b written (ONE_BLOCK) or accumulated into (zeroed first)
    # sizes
    rows,
    rows_per_program,
    group_size,
    eps,
    # strides (the channel stride is 1)
    stride_dy_m,
    stride_x_m,
    stride_z_m,
    stride_dx_m,
    stride_dz_m,
    stride_dw_b,
    # meta
    GATE_FIRST: tl.constexpr,
    GATE_AFTER: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    """Program ``(i_b, i_g)``: rows ``[i_b * rows_per_program, ...)`` of group ``i_g``."""
    HAS_Z: tl.constexpr = GATE_FIRST or GATE_AFTER
    i_b = tl.program_id(0).to(tl.int64)
    i_g = tl.program_id(1).to(tl.int64)
    o_g = i_g * group_size
    row_start = i_b * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, rows)
    p_w = w_ptr + o_g
    p_dw = dw_ptr + i_b * stride_dw_b + o_g
    if ONE_BLOCK:  # the whole group in registers: dy, x, z read once, dweight summed in registers
        o = tl.arange(0, BLOCK)
        m = o < group_size
        b_w = tl.load(p_w + o, mask=m, other=0.0).to(tl.float32)
        b_dw = tl.zeros((BLOCK,), dtype=tl.float32)
        for i_m in range(row_start, row_end):
            p_dy, p_x = dy_ptr + i_m * stride_dy_m + o_g, x_ptr + i_m * stride_x_m + o_g
            b_dy, b_x, b_z = _bwd_load(p_dy, p_x, z_ptr + i_m * stride_z_m + o_g, o, m, HAS_Z)
            b_h, b_dn, _ = _bwd_terms(b_dy, b_x, b_w, b_z, GATE_FIRST, GATE_AFTER)
            rstd = 1.0 / tl.sqrt(tl.sum(b_h * b_h, axis=0) / group_size + eps)
            b_c = tl.sum(b_dn * b_h, axis=0) * rstd / group_size
            b_dw += _bwd_write(dx_ptr + i_m * stride_dx_m + o_g, dz_ptr + i_m * stride_dz_m + o_g, o, m,
                               b_dy, b_x, b_w, b_z, rstd, b_c, GATE_FIRST, GATE_AFTER)
        tl.store(p_dw + o, b_dw, mask=m)
    else:  # a wide group: two passes per row, dweight accumulated in this program's workspace row
        for i_m in range(row_start, row_end):
            p_dy, p_x = dy_ptr + i_m * stride_dy_m + o_g, x_ptr + i_m * stride_x_m + o_g
            p_z = z_ptr + i_m * stride_z_m + o_g
            b_sq = tl.zeros((BLOCK,), dtype=tl.float32)
            b_dot = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, group_size, BLOCK):
                o = start + tl.arange(0, BLOCK)
                m = o < group_size
                b_dy, b_x, b_z = _bwd_load(p_dy, p_x, p_z, o, m, HAS_Z)
                b_w = tl.load(p_w + o, mask=m, other=0.0).to(tl.float32)
                b_h, b_dn, _ = _bwd_terms(b_dy, b_x, b_w, b_z, GATE_FIRST, GATE_AFTER)
                b_sq += b_h * b_h
                b_dot += b_dn * b_h
            rstd = 1.0 / tl.sqrt(tl.sum(b_sq, axis=0) / group_size + eps)
            b_c = tl.sum(b_dot, axis=0) * rstd / group_size
            for start in range(0, group_size, BLOCK):
                o = start + tl.arange(0, BLOCK)
                m = o < group_size
                b_dy, b_x, b_z = _bwd_load(p_dy, p_x, p_z, o, m, HAS_Z)
                b_w = tl.load(p_w + o, mask=m, other=0.0).to(tl.float32)
                b_t = _bwd_write(dx_ptr + i_m * stride_dx_m + o_g, dz_ptr + i_m * stride_dz_m + o_g, o, m,
                                 b_dy, b_x, b_w, b_z, rstd, b_c, GATE_FIRST, GATE_AFTER)
                tl.store(p_dw + o, tl.load(p_dw + o, mask=m, other=0.0) + b_t, mask=m)
            tl.debug_barrier()  # the next row adds to what every thread stored here


def _bwd_blocks(rows: int, device: torch.device) -> int:
    """Row blocks of the backward grid (one dweight partial each): a fixed function of the row count
    and the device, so the reduction order, hence every bit of dweight, is too."""
    if device.type != "cuda":
        return min(rows, BWD_BLOCKS_CPU)
    return min(rows, BWD_BLOCKS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count)


def _launch_triton_bwd(dx, dz, dweight, dy, x, weight, z, eps: float, group_size: int, norm_before_gate: bool) -> None:
    rows, hidden = x.shape
    block = min(MAX_BLOCK, triton.next_power_of_2(group_size))
    rows_per_program = triton.cdiv(rows, _bwd_blocks(rows, x.device))
    n_blocks = triton.cdiv(rows, rows_per_program)
    one_block = block >= group_size
    # [n_blocks, H] fp32: every row written by the ONE_BLOCK path, accumulated into by the wide one
    workspace = (_alloc.empty if one_block else torch.zeros)((n_blocks, hidden), dtype=torch.float32, device=x.device)
    with on_device(x.device):
        _rms_norm_gated_bwd_kernel[(n_blocks, hidden // group_size)](
            dy, x, weight, x if z is None else z, dx, dx if dz is None else dz, workspace,
            rows, rows_per_program, group_size, eps,
            dy.stride(0), x.stride(0), 0 if z is None else z.stride(0), dx.stride(0),
            0 if dz is None else dz.stride(0), workspace.stride(0),
            GATE_FIRST=z is not None and not norm_before_gate,
            GATE_AFTER=z is not None and norm_before_gate,
            BLOCK=block, ONE_BLOCK=one_block,
            num_warps=min(max(block // 256, 1), 8),
        )
    dweight.copy_(workspace.sum(0))  # fixed order: deterministic


def _check_groups(group_size: int, hidden: int) -> None:
    if group_size < 1 or hidden % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the last dim H={hidden}")


def _check_unit_stride(**tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride along its last dim, got strides {t.stride()}")


def _check_shapes(x, weight, z, group_size: int, **like_x: torch.Tensor | None) -> None:
    """The shape facts the kernels rely on, for x, weight, z and the named ``[M, H]`` tensors
    ``like_x`` (run again inside the custom ops: under torch.compile the wrapper's eager checks may be
    traced away)."""
    check_tensor("x", x, ndim=2)
    hidden = x.shape[1]
    check_shape("weight", weight, [hidden])
    for name, t in {"z": z, **like_x}.items():
        if t is not None:
            check_shape(name, t, list(x.shape))
    _check_groups(group_size, hidden)
    _check_unit_stride(x=x, weight=weight, z=z, **like_x)


@destination_op("rms_norm_gated", mutates_args=("out",))
def _rms_norm_gated(
    out: torch.Tensor,
    inputs: list[torch.Tensor | None],
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> None:
    """Destination-passing core: ``inputs`` is ``[x [M, H], weight [H], z [M, H] or None]``, every
    last dim with unit stride; ``out [M, H]`` is written."""
    x, weight, z = inputs
    _check_shapes(x, weight, z, group_size, out=out)
    if x.numel() == 0:
        return
    dtypes = [t.dtype for t in (x, weight, z) if t is not None]
    if RMS_NORM_GATED.resolve(x.device, dtypes) == "torch":
        out.copy_(rms_norm_gated_ref(x, weight, z, eps, group_size, norm_before_gate))
    else:
        _launch_triton(out, x, weight, z, eps, group_size, norm_before_gate)



@destination_op("rms_norm_gated_bwd", mutates_args=("dx", "dz", "dweight"))
def _rms_norm_gated_bwd(
    dx: torch.Tensor,
    dz: torch.Tensor | None,
    dweight: torch.Tensor,
    inputs: list[torch.Tensor | None],
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> None:
    """Destination-passing backward: ``inputs`` is ``[dy [M, H], x [M, H], weight [H], z [M, H] or
    None]``, every last dim with unit stride; ``dx [M, H]``, ``dz [M, H]`` (None exactly when z is)
    and ``dweight [H]`` are written."""
    dy, x, weight, z = inputs
    if (dz is None) != (z is None):
        raise ValueError(f"dz must be given exactly when z is, got dz={'None' if dz is None else 'a tensor'} "
                         f"and z={'None' if z is None else 'a tensor'}")
    _check_shapes(x, weight, z, group_size, dy=dy, dx=dx, dz=dz)
    check_shape("dweight", dweight, [x.shape[1]])
    if x.shape[0] == 0:
        dweight.zero_()
        return
    dtypes = [t.dtype for t in (x, weight, z) if t is not None]
    if RMS_NORM_GATED.resolve(x.device, dtypes) == "torch":
        grads = rms_norm_gated_bwd_ref(dy, x, weight, z, eps, group_size, norm_before_gate)
        for out, grad in zip((dx, dweight, dz), grads):
            if out is not None:
                out.copy_(grad)
    else:
        _launch_triton_bwd(dx, dz, dweight, dy, x, weight, z, eps, group_size, norm_before_gate)



def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """``[..., H]`` as ``[M, H]`` with a unit channel stride (a view when the layout allows)."""
    return None if t is None else unit_stride_last(t.reshape(-1, t.shape[-1]))


def _forward(x, weight, z, eps: float, group_size: int, norm_before_gate: bool) -> torch.Tensor:
    out = _alloc.empty(x.shape, x.dtype, x.device)
    _rms_norm_gated(
        out.view(-1, x.shape[-1]), [_rows(x), weight.contiguous(), _rows(z)], eps, group_size, norm_before_gate
    )
    return out


def _backward(dy, x, weight, z, eps: float, group_size: int, norm_before_gate: bool):
    """``(dx, dweight, dz)`` in the dtypes of x, weight, z (dz None without z)."""
    dx = _alloc.empty_like(x)
    dz = None if z is None else _alloc.empty_like(z)
    dweight = _alloc.empty_like(weight)
    hidden = x.shape[-1]
    _rms_norm_gated_bwd(
        dx.view(-1, hidden), None if dz is None else dz.view(-1, hidden), dweight,
        [_rows(dy), _rows(x), weight.contiguous(), _rows(z)], eps, group_size, norm_before_gate,
    )
    return dx, dweight, dz


class _RMSNormGatedFn(torch.autograd.Function):
    """Saves x, weight, z (not the output, not rstd: the backward recomputes rstd from x)."""

    @staticmethod
    def forward(ctx, x, weight, z, eps, group_size, norm_before_gate):
        ctx.save_for_backward(x, weight, z)
        ctx.scalars = (eps, group_size, norm_before_gate)
        return _forward(x, weight, z, eps, group_size, norm_before_gate)

    @staticmethod
    def backward(ctx, dy):
        x, weight, z = ctx.saved_tensors
        dx, dweight, dz = _backward(dy, x, weight, z, *ctx.scalars)
        return dx, dweight, dz, None, None, None


def _validated(x, weight, z, eps, group_size) -> int:
    """Metadata checks before anything runs; returns the group size."""
    check_tensor("x", x, dtypes=GRAD_DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a last dim H >= 1, got shape {list(x.shape)}")
    hidden = x.shape[-1]
    check_shape("weight", check_tensor("weight", weight, dtypes=GRAD_DTYPES, device=x.device), [hidden])
    if check_optional("z", z, dtypes=GRAD_DTYPES, device=x.device) is not None:
        check_shape("z", z, list(x.shape))
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if group_size is None:
        return hidden
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise TypeError(f"group_size must be an int or None, got {type(group_size).__name__}")
    _check_groups(group_size, hidden)
    return group_size


def rms_norm_gated(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> torch.Tensor:
    """Gated RMSNorm over groups of the last dim (mamba_ssm ``rmsnorm_fn`` without bias).

    Args:
        x: ``[..., H]`` fp32/fp16/bf16 (float64 on the torch backend: gradient checks), any leading dims
            (``[B, L, H]`` in a Mamba-2 block).
        weight: ``[H]``, any of those dtypes.
        z: optional gate ``[..., H]`` like x (any of those dtypes).
        eps: added to the mean square of each group.
        group_size: channels per group, dividing H (default H: one group). Mamba-2 with ``ngroups``
            groups uses ``H // ngroups``.
        norm_before_gate: ``rmsnorm(x) * weight * silu(z)`` (mamba_ssm's default) when True,
            ``rmsnorm(x * silu(z)) * weight`` (HF's Mamba-2 ``<Family>RMSNormGated``) when False.
            Ignored without z.

    Returns a new ``[..., H]`` tensor in x's dtype; the arithmetic is fp32 (fp64 for fp64 inputs). Non-contiguous inputs
    are read in place when their last dim has unit stride. Differentiable in x, weight and z on
    every backend (``ifk::rms_norm_gated_bwd``): gradients in each input's dtype, fp32 arithmetic,
    bit-identical from run to run (no atomics).

    Example:
        >>> x, z = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
        >>> rms_norm_gated(x, torch.ones(64), z, group_size=16, norm_before_gate=False).shape
        torch.Size([2, 5, 64])
    """
    group_size = _validated(x, weight, z, eps, group_size)
    args = (x, weight, z, float(eps), group_size, bool(norm_before_gate))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, z)):
        return _RMSNormGatedFn.apply(*args)
    return _forward(*args)


def rms_norm_gated_ref(
    x: torch.Tensor,  # [M, H]
    weight: torch.Tensor,  # [H]
    z: torch.Tensor | None,  # [M, H]
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> torch.Tensor:
    """The torch backend: mamba_ssm's ``rms_norm_ref`` (fp32 math, float64 kept), result in x's dtype."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(cdt)
    gate = None if z is None else torch.nn.functional.silu(z.to(cdt))
    if gate is not None and not norm_before_gate:
        h = h * gate
    y = torch.nn.functional.rms_norm(h.unflatten(-1, (-1, group_size)), (group_size,), eps=eps).flatten(-2)
    y.mul_(weight.to(cdt))  # y is a fresh fp32 tensor: scale and gate in place
    if gate is not None and norm_before_gate:
        y.mul_(gate)
    return y.to(x.dtype)


def rms_norm_gated_bwd_ref(
    dy: torch.Tensor,  # [M, H]
    x: torch.Tensor,  # [M, H]
    weight: torch.Tensor,  # [H]
    z: torch.Tensor | None,  # [M, H]
    eps: float,
    group_size: int,
    norm_before_gate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The torch backend's backward, closed form (fp32 math, float64 kept): ``(dx [M, H], dweight [H],
    dz [M, H] or None)`` in the dtypes of x, weight, z. ``dweight`` is a ``sum(0)`` over rows."""
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc, dyc, w = x.to(cdt), dy.to(cdt), weight.to(cdt).unflatten(-1, (-1, group_size))
    gate_first = z is not None and not norm_before_gate
    gate_after = z is not None and norm_before_gate
    if z is not None:
        zc = z.to(cdt)
        sig = torch.sigmoid(zc)
        gate = zc * sig
        dgate = torch.addcmul(sig, gate, 1 - sig)  # d silu / dz = s + silu(z) (1 - s)
    # [M, groups, G] views; in-place only on tensors made here (x.to(cdt) may be x itself)
    h = (xc * gate if gate_first else xc).unflatten(-1, (-1, group_size))
    rstd = torch.rsqrt(torch.linalg.vecdot(h, h).unsqueeze(-1) / group_size + eps)  # [M, groups, 1]
    n = h.mul_(rstd) if gate_first else h * rstd  # the normalised input
    dyg = (dyc * gate if gate_after else dyc).unflatten(-1, (-1, group_size))  # the gradient reaching n w
    dn = dyg * w
    dweight = (dyg.mul_(n) if gate_after else dyg * n).flatten(-2).sum(0)
    c = torch.linalg.vecdot(dn, n).unsqueeze(-1) / group_size  # mean(dn n) per group
    dh = torch.addcmul(dn, n, c, value=-1).mul_(rstd).flatten(-2)
    dz = None
    if gate_first:
        dz = (dh * xc).mul_(dgate).to(z.dtype)
        dh.mul_(gate)
    elif gate_after:
        dz = (dyc * n.flatten(-2)).mul_(w.flatten(-2)).mul_(dgate).to(z.dtype)
    return dh.to(x.dtype), dweight.to(weight.dtype), dz
