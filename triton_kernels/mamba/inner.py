"""The fused Mamba-1 mixer: mamba_ssm's ``mamba_inner_fn``.

One autograd Function over the ops of this package: split ``xz`` into x and the gate z, causal
conv1d + SiLU of x, ``x_proj`` (dt rank, B, C), ``dt_proj``, the selective scan gated by
``silu(z)``, and ``out_proj``. The forward runs them without autograd and saves the inputs, the
scan output (out_proj's input) and, where the Triton backward may run, the scan's fp32 tile states;
the backward recomputes the conv output and the projections (cheap: a conv and two thin matmuls)
and calls the scan's backward core (``ifk::selective_scan_bwd``), the conv's closed form and the
matmul transposes directly. So none of conv output, ``x_dbl``, delta, B, C is kept between forward
and backward (autograd through the unfused ops keeps each of them); every piece is a registered
op or plain torch, so torch.compile traces forward and backward.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from triton_kernels import _alloc
from triton_kernels._checks import GRAD_DTYPES, check_optional, check_shape, check_tensor
from triton_kernels.backend import interpreter_enabled
from triton_kernels.mamba.causal_conv1d import _check_weight, _conv_forward
from triton_kernels.mamba.ops_torch import causal_conv1d_bwd_ref
from triton_kernels.mamba.selective_scan import _as_groups, _scan_forward
from triton_kernels.mamba.selective_scan import _validated as _scan_args
from triton_kernels.mamba.selective_scan_bwd import selective_scan_bwd
from triton_kernels.mamba.tiles import tile_states_shape


def _project(xz, conv_weight, conv_bias, x_proj_weight, delta_proj_weight, B, C, B_proj_bias, C_proj_bias):
    """``(x, scan arguments u, delta, B, C, z, x_dbl)``: x, u, delta, z ``[b, D, l]``, x_dbl
    ``[b, R (+ N) (+ N), l]`` (dt rank rows, then the projected B, then the projected C)."""
    dim, rank = delta_proj_weight.shape
    x, z = xz[:, :dim], xz[:, dim:]
    u = _conv_forward(x, conv_weight, conv_bias, None, None, None, True)
    x_dbl = torch.matmul(x_proj_weight.to(u.dtype), u)
    delta = torch.matmul(delta_proj_weight.to(u.dtype), x_dbl[:, :rank])
    row = rank
    if B is None:  # [b, N, l], unit stride along l
        dstate = (x_dbl.shape[1] - rank) // (2 if C is None else 1)
        B, row = x_dbl[:, rank:rank + dstate], rank + dstate
        B = B if B_proj_bias is None else B + B_proj_bias.to(B.dtype)[:, None]
    if C is None:
        C = x_dbl[:, row:]
        C = C if C_proj_bias is None else C + C_proj_bias.to(C.dtype)[:, None]
    return x, u, delta, B, C, z, x_dbl


class _MambaInnerFn(torch.autograd.Function):
    """Saves the inputs, the scan output ``[b, D, l]`` and the scan's tile states (Triton backward);
    recomputes the conv output, x_dbl, delta, B and C in backward."""

    @staticmethod
    def forward(ctx, xz, conv_weight, conv_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias,
                A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus):
        _, u, delta, B_, C_, z, _ = _project(xz, conv_weight, conv_bias, x_proj_weight, delta_proj_weight, B, C,
                                              B_proj_bias, C_proj_bias)
        args = _scan_args(u, delta, A, B_, C_, D, z, delta_bias, varlen=False)
        tile_states = None
        if u.is_cuda or interpreter_enabled():  # where the Triton scan backward may run
            tile_states = _alloc.empty(tile_states_shape(u, A), torch.float32, u.device)
        y = _scan_forward(*args, delta_softplus, False, tile_states)
        ctx.save_for_backward(xz, conv_weight, conv_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                              out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, y, tile_states)
        ctx.delta_softplus = delta_softplus
        return _out_proj(y, out_proj_weight, out_proj_bias)

    @staticmethod
    def backward(ctx, dout):
        (xz, conv_weight, conv_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias, A, B, C, D,
         delta_bias, B_proj_bias, C_proj_bias, y, tile_states) = ctx.saved_tensors
        d_out_w = torch.einsum("blo,bdl->od", dout, y.to(dout.dtype)).to(out_proj_weight.dtype)
        d_out_b = None if out_proj_bias is None else dout.sum((0, 1)).to(out_proj_bias.dtype)
        dy = torch.matmul(out_proj_weight.t().to(dout.dtype), dout.transpose(1, 2))  # [b, D, l]
        x, u, delta, B_, C_, z, x_dbl = _project(xz, conv_weight, conv_bias, x_proj_weight, delta_proj_weight, B, C,
                                                 B_proj_bias, C_proj_bias)
        u, delta, A_, B_, C_, D_, z, delta_bias_ = _scan_args(u, delta, A, B_, C_, D, z, delta_bias, varlen=False)
        du, ddelta, dA, dB, dC, dD, dz, ddelta_bias = selective_scan_bwd(
            dy.to(u.dtype), None, u, delta, A_, _as_groups(B_), _as_groups(C_), D_, z, delta_bias_,
            ctx.delta_softplus, tile_states)
        dB, dC = dB.view(B_.shape), dC.view(C_.shape)
        rank = delta_proj_weight.shape[1]
        ddelta = ddelta.to(x_dbl.dtype)
        d_delta_w = torch.einsum("bdl,brl->dr", ddelta, x_dbl[:, :rank]).to(delta_proj_weight.dtype)
        parts = [torch.matmul(delta_proj_weight.t().to(ddelta.dtype), ddelta)]
        d_bias = []
        for given, grad, bias in ((B, dB, B_proj_bias), (C, dC, C_proj_bias)):
            if given is None:  # a projected B or C: its gradient flows into x_dbl
                parts.append(grad.to(ddelta.dtype))
            d_bias.append(None if bias is None else grad.sum((0, 2)).to(bias.dtype))
        dx_dbl = torch.cat(parts, dim=1)  # [b, K, l]
        d_x_proj_w = torch.einsum("bkl,bdl->kd", dx_dbl, u.to(dx_dbl.dtype)).to(x_proj_weight.dtype)
        du = du.to(dx_dbl.dtype) + torch.matmul(x_proj_weight.t().to(dx_dbl.dtype), dx_dbl)
        dx, d_conv_w, d_conv_b, _ = causal_conv1d_bwd_ref(x, conv_weight, conv_bias, True, None, du, None)
        dxz = torch.cat([dx.to(xz.dtype), dz.to(xz.dtype)], dim=1)
        return (dxz, d_conv_w.to(conv_weight.dtype), None if conv_bias is None else d_conv_b.to(conv_bias.dtype),
                d_x_proj_w, d_delta_w, d_out_w, d_out_b, dA, None if B is None else dB, None if C is None else dC,
                dD, ddelta_bias, *d_bias, None)


def _out_proj(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[b, D, l]`` through out_proj: ``[b, l, out]`` in y's dtype."""
    return functional.linear(y.transpose(1, 2), weight.to(y.dtype), None if bias is None else bias.to(y.dtype))


def _validated(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias,
               A, B, C, B_proj_bias, C_proj_bias, checkpoint_lvl) -> torch.Tensor:
    """Metadata checks of the fused call (the scan checks its own arguments again); returns the
    conv weight as ``[D, W]``."""
    check_tensor("xz", xz, ndim=3, dtypes=GRAD_DTYPES)
    device = xz.device
    if xz.shape[1] % 2:
        raise ValueError(f"xz must be [b, 2 D, l] (x then z), got an odd channel count: shape {list(xz.shape)}")
    dim = xz.shape[1] // 2
    check_tensor("conv1d_weight", conv1d_weight, ndim=(2, 3), dtypes=GRAD_DTYPES, device=device)
    if conv1d_weight.dim() == 3:
        check_shape("conv1d_weight", conv1d_weight, (dim, 1, None))
        conv1d_weight = conv1d_weight[:, 0]
    if _check_weight(conv1d_weight, conv1d_bias, device, dtypes=GRAD_DTYPES) != dim:
        raise ValueError(f"conv1d_weight has {conv1d_weight.shape[0]} channels, xz has D={dim}")
    check_tensor("delta_proj_weight", delta_proj_weight, ndim=2, dtypes=GRAD_DTYPES, device=device)
    check_shape("delta_proj_weight", delta_proj_weight, (dim, None))
    check_tensor("A", A, ndim=2, dtypes=GRAD_DTYPES, device=device)  # complex A raises here
    check_shape("A", A, (dim, None))
    for name, bias, given in (("B_proj_bias", B_proj_bias, B), ("C_proj_bias", C_proj_bias, C)):
        if check_optional(name, bias, ndim=1, dtypes=GRAD_DTYPES, device=device) is not None:
            if given is not None:
                raise ValueError(f"{name} applies to the projected {name[0]}: pass {name[0]}=None with it")
            check_shape(name, bias, (A.shape[1],))
    rows = delta_proj_weight.shape[1] + A.shape[1] * ((B is None) + (C is None))
    check_tensor("x_proj_weight", x_proj_weight, ndim=2, dtypes=GRAD_DTYPES, device=device)
    check_shape("x_proj_weight", x_proj_weight, (rows, dim))
    check_tensor("out_proj_weight", out_proj_weight, ndim=2, dtypes=GRAD_DTYPES, device=device)
    check_shape("out_proj_weight", out_proj_weight, (None, dim))
    if check_optional("out_proj_bias", out_proj_bias, ndim=1, dtypes=GRAD_DTYPES, device=device) is not None:
        check_shape("out_proj_bias", out_proj_bias, (out_proj_weight.shape[0],))
    if checkpoint_lvl not in (0, 1):
        raise ValueError(f"checkpoint_lvl must be 0 or 1, got {checkpoint_lvl!r}")
    return conv1d_weight


def mamba_inner_fn(
    xz: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    x_proj_weight: torch.Tensor,
    delta_proj_weight: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor | None = None,
    C: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    B_proj_bias: torch.Tensor | None = None,
    C_proj_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    checkpoint_lvl: int = 1,
) -> torch.Tensor:
    """mamba_ssm's fused Mamba-1 mixer (what HF transformers' Mamba family calls when training).

    ``x, z = xz`` split along channels; ``u = silu(conv1d(x))``; ``x_dbl = x_proj_weight @ u`` gives
    the dt-rank rows, then B (when ``B`` is None; ``+ B_proj_bias``), then C (when ``C`` is None;
    ``+ C_proj_bias``); ``delta = delta_proj_weight @ x_dbl[:R]``; ``y = selective_scan(u, delta, A, B, C,
    D, z, delta_bias, delta_softplus)`` (gated by ``silu(z)``); returns ``out_proj(y)``.

    Args:
        xz: ``[b, 2 D, l]`` fp32/fp16/bf16 (in_proj's output transposed; any strides); float64 runs on
            the torch backend (gradient checks).
        conv1d_weight: ``[D, 1, W]`` (nn.Conv1d's) or ``[D, W]``, W in 2..4; conv1d_bias ``[D]`` or None.
        x_proj_weight: ``[R + N (B projected) + N (C projected), D]``. delta_proj_weight: ``[D, R]``.
        out_proj_weight: ``[out, D]``; out_proj_bias ``[out]`` or None. Weights are cast to xz's dtype.
        A: ``[D, N]`` real. B, C: None (projected from x_dbl, the Mamba case) or the scan's forms
            ``[D, N]`` / ``[b, N, l]`` / ``[b, G, N, l]``. D, delta_bias: ``[D]`` or None.
        B_proj_bias, C_proj_bias: ``[N]``, added to the projected B / C.
        checkpoint_lvl: 0 or 1, accepted for mamba_ssm compatibility; the conv output and delta are
            recomputed in backward either way.

    Returns ``out [b, l, out]`` in xz's dtype. Differentiable in every tensor argument; the backward
    is deterministic and keeps only the inputs, the scan output and the scan's tile states.

    Example:
        >>> D, N, R, W = 16, 8, 2, 4; xz = torch.randn(2, 2 * D, 10)
        >>> out = mamba_inner_fn(xz, torch.randn(D, 1, W), torch.randn(D), torch.randn(R + 2 * N, D),
        ...                      torch.randn(D, R), torch.randn(12, D), None, -torch.rand(D, N))
        >>> out.shape
        torch.Size([2, 10, 12])
    """
    conv_weight = _validated(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                             out_proj_bias, A, B, C, B_proj_bias, C_proj_bias, checkpoint_lvl)
    args = (xz, conv_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight, out_proj_bias, A, B, C,
            D, delta_bias, B_proj_bias, C_proj_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return _MambaInnerFn.apply(*args, bool(delta_softplus))
    _, u, delta, B_, C_, z, _ = _project(*args[:5], B, C, B_proj_bias, C_proj_bias)
    y = _scan_forward(*_scan_args(u, delta, A, B_, C_, D, z, delta_bias, varlen=False), bool(delta_softplus), False)
    return _out_proj(y, out_proj_weight, out_proj_bias)
