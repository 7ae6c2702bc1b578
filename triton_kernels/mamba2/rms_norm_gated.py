"""Gated RMSNorm, the norm every Mamba-2 block ends with (mamba_ssm ``RMSNormGated`` / ``rmsnorm_fn``).

Per group of ``group_size`` channels: ``rmsnorm(x) * weight * silu(z)`` when the norm comes before
the gate, ``rmsnorm(x * silu(z)) * weight`` otherwise (HF transformers' ``MambaRMSNormGated``). One
program normalises one group of one row in fp32: one read of x and z, one write of out.
"""

from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

from triton_kernels import _alloc
from triton_kernels._checks import FLOAT_DTYPES, check_optional, check_shape, check_tensor, on_device, unit_stride_last
from triton_kernels._tl_math import silu
from triton_kernels.registry import RMS_NORM_GATED

# Channels one program holds in registers at once (fp32: 32 KB for x, as much again for z). A group
# of up to MAX_BLOCK channels is read once; a wider one is read twice (sum of squares, then output).
MAX_BLOCK = 8192


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


def _check_groups(group_size: int, hidden: int) -> None:
    if group_size < 1 or hidden % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the last dim H={hidden}")


def _check_shapes(out, x, weight, z, group_size: int) -> None:
    """The shape facts the kernel relies on (run again inside the custom op: under torch.compile the
    wrapper's eager checks may be traced away)."""
    check_tensor("x", x, ndim=2)
    hidden = x.shape[1]
    check_shape("out", out, list(x.shape))
    check_shape("weight", weight, [hidden])
    if z is not None:
        check_shape("z", z, list(x.shape))
    _check_groups(group_size, hidden)
    for name, t in (("x", x), ("weight", weight), ("z", z), ("out", out)):
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride along its last dim, got strides {t.stride()}")


@torch.library.custom_op("ifk::rms_norm_gated", mutates_args=("out",))
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
    _check_shapes(out, x, weight, z, group_size)
    if x.numel() == 0:
        return
    dtypes = [t.dtype for t in (x, weight, z) if t is not None]
    if RMS_NORM_GATED.resolve(x.device, dtypes) == "torch":
        out.copy_(rms_norm_gated_ref(x, weight, z, eps, group_size, norm_before_gate))
    else:
        _launch_triton(out, x, weight, z, eps, group_size, norm_before_gate)


@_rms_norm_gated.register_fake
def _(out, inputs, eps, group_size, norm_before_gate) -> None:
    return None


def _forward(x, weight, z, eps: float, group_size: int, norm_before_gate: bool) -> torch.Tensor:
    out = _alloc.empty(x.shape, x.dtype, x.device)
    hidden = x.shape[-1]
    torch.ops.ifk.rms_norm_gated(
        out.view(-1, hidden),
        [unit_stride_last(x.reshape(-1, hidden)), weight.contiguous(),
         None if z is None else unit_stride_last(z.reshape(-1, hidden))],
        eps, group_size, norm_before_gate,
    )
    return out


class _RMSNormGatedFn(torch.autograd.Function):
    """Forward-only for now: the backward pass comes with the training issue and raises until then."""

    @staticmethod
    def forward(ctx, x, weight, z, eps, group_size, norm_before_gate):
        return _forward(x, weight, z, eps, group_size, norm_before_gate)

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(
            "rms_norm_gated has no backward pass yet (forward-only); call it under torch.no_grad() "
            "or with inputs that do not require grad"
        )


def _validated(x, weight, z, eps, group_size) -> int:
    """Metadata checks before anything runs; returns the group size."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a last dim H >= 1, got shape {list(x.shape)}")
    hidden = x.shape[-1]
    check_shape("weight", check_tensor("weight", weight, dtypes=FLOAT_DTYPES, device=x.device), [hidden])
    if check_optional("z", z, dtypes=FLOAT_DTYPES, device=x.device) is not None:
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
        x: ``[..., H]`` fp32/fp16/bf16, any leading dims (``[B, L, H]`` in a Mamba-2 block).
        weight: ``[H]``, any float dtype.
        z: optional gate ``[..., H]`` like x (any float dtype).
        eps: added to the mean square of each group.
        group_size: channels per group, dividing H (default H: one group). Mamba-2 with ``ngroups``
            groups uses ``H // ngroups``.
        norm_before_gate: ``rmsnorm(x) * weight * silu(z)`` (mamba_ssm's default) when True,
            ``rmsnorm(x * silu(z)) * weight`` (HF's ``MambaRMSNormGated``, Mamba-2 models) when False.
            Ignored without z.

    Returns a new ``[..., H]`` tensor in x's dtype; the arithmetic is fp32. Non-contiguous inputs
    are read in place when their last dim has unit stride. Forward only: backward raises
    NotImplementedError.

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
