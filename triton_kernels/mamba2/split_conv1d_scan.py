"""The fused Mamba-2 mixer: mamba_ssm's ``mamba_split_conv1d_scan_combined``.

One autograd Function over the ops of this package: split ``zxbcdt``, causal conv1d (+ SiLU) of
``xBC``, the SSD chunked scan, the gated RMSNorm (or the scan's own ``silu(z)`` gate), the optional
SwiGLU of the non-SSM channels, and ``out_proj``. The forward runs them without autograd and saves
only the inputs, plus the scan output ``y`` where the backward needs it (the norm's and out_proj's
input); the backward recomputes the conv output (cheap) and calls each op's backward core directly:
``ifk::rms_norm_gated_bwd``, ``ifk::mamba_chunk_scan_bwd`` (which recomputes its chunk states) and
the conv's closed form. So nothing of ``[b, l, conv_dim]`` is kept between forward and backward
(autograd through the unfused ops keeps the conv output, x/B/C, the gate, the norm input and the
out_proj input); every piece is a registered op or plain torch, so torch.compile traces it.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional

from triton_kernels import _alloc
from triton_kernels._checks import GRAD_DTYPES, check_optional, check_shape, check_tensor
from triton_kernels.mamba.causal_conv1d import _causal_conv1d_fwd, _check_weight, _silu_flag
from triton_kernels.mamba.ops_torch import causal_conv1d_bwd_ref
from triton_kernels.mamba2.rms_norm_gated import _backward as _norm_bwd
from triton_kernels.mamba2.rms_norm_gated import _forward as _norm_fwd
from triton_kernels.mamba2.ssd import DEFAULT_DT_LIMIT, _check_chunk_size, _check_dt_limit, _chunk_scan_forward


class _Dims:
    """The sizes of one call: ``zxbcdt [b, l, 2 d_nonssm + 2 dim + 2 g n + h]``, dim = h p."""

    def __init__(self, zxbcdt: torch.Tensor, conv_dim: int, nheads: int, headdim: int, ngroups: int) -> None:
        self.batch, self.seqlen, total = zxbcdt.shape
        self.nheads, self.headdim, self.ngroups = nheads, headdim, ngroups
        self.dim = nheads * headdim
        self.dstate = (conv_dim - self.dim) // (2 * ngroups)
        self.conv_dim = conv_dim
        self.d_nonssm = (total - self.dim - conv_dim - nheads) // 2

    def split(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``zxbcdt``-shaped ``t`` as views ``(zx0, z, xBC, dt)``."""
        return torch.split(t, [2 * self.d_nonssm, self.dim, self.conv_dim, self.nheads], dim=-1)

    def ssm(self, xbc_conv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``[b, l, conv_dim]`` as ``x [b, l, h, p]``, ``B, C [b, l, g, n]`` (views)."""
        gn = self.ngroups * self.dstate
        x, B, C = torch.split(xbc_conv, [self.dim, gn, gn], dim=-1)
        return (x.unflatten(-1, (self.nheads, self.headdim)), B.unflatten(-1, (self.ngroups, self.dstate)),
                C.unflatten(-1, (self.ngroups, self.dstate)))


def _conv(xbc: torch.Tensor, weight, bias, seq_idx, silu: bool) -> torch.Tensor:
    """The conv of ``xBC [b, l, conv_dim]`` (any strides) into a new ``[b, l, conv_dim]`` tensor."""
    out = _alloc.empty(xbc.shape, xbc.dtype, xbc.device)
    _causal_conv1d_fwd(out.transpose(1, 2), None, [xbc.transpose(1, 2), weight, bias, None, seq_idx], silu)
    return out


def _swiglu(zx0: torch.Tensor) -> torch.Tensor:
    """``silu(a) * g`` for ``zx0 = [a, g]`` along the last dim."""
    a, g = zx0.chunk(2, dim=-1)
    return functional.silu(a) * g


def _swiglu_bwd(zx0: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    a, g = zx0.float().chunk(2, dim=-1)
    sig = torch.sigmoid(a)
    dout = dout.float()
    return torch.cat([dout * g * sig * (1 + a * (1 - sig)), dout * a * sig], dim=-1).to(zx0.dtype)


def _forward(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, initial_states, seq_idx, rmsnorm_weight, outproj_weight,
             outproj_bias, dims: _Dims, s: dict):
    """Returns ``(out, final_states or None, y)``: y ``[b, l, h, p]`` the scan output."""
    zx0, z, xbc, dt = dims.split(zxbcdt)
    x, B, C = dims.ssm(_conv(xbc, conv_weight, conv_bias, seq_idx, s["silu"]))
    z_heads = z.unflatten(-1, (dims.nheads, dims.headdim))
    res = _chunk_scan_forward(x, dt, A, B, C, s["chunk_size"], D, None if s["norm"] else z_heads, dt_bias,
                              initial_states, seq_idx, None, True, s["dt_limit"], s["final"], False)
    y, final = res if s["final"] else (res, None)
    out = _output(zx0, z, y, rmsnorm_weight, dims, s)
    if outproj_weight is not None:
        out = functional.linear(out, outproj_weight, outproj_bias)
    return out, final, y


def _output(zx0, z, y, rmsnorm_weight, dims: _Dims, s: dict) -> torch.Tensor:
    """out_proj's input ``[b, l, d_nonssm + dim]`` from the scan output y."""
    out = y.flatten(-2)
    if rmsnorm_weight is not None:
        out = _norm_fwd(out, rmsnorm_weight, z, s["eps"], dims.dim // dims.ngroups, s["norm_before_gate"])
    return torch.cat([_swiglu(zx0), out], dim=-1) if dims.d_nonssm else out


class _SplitConv1dScanFn(torch.autograd.Function):
    """Saves the inputs and, where the norm or out_proj needs it in backward, the scan output y
    ``[b, l, h, p]`` (mamba_ssm keeps the same); recomputes the conv output in backward."""

    @staticmethod
    def forward(ctx, zxbcdt, conv_weight, conv_bias, dt_bias, A, D, initial_states, seq_idx, rmsnorm_weight,
                outproj_weight, outproj_bias, dims, s):
        ctx.set_materialize_grads(False)
        out, final, y = _forward(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, initial_states, seq_idx,
                                 rmsnorm_weight, outproj_weight, outproj_bias, dims, s)
        keep_y = rmsnorm_weight is not None or outproj_weight is not None
        ctx.save_for_backward(zxbcdt, conv_weight, conv_bias, dt_bias, A, D, initial_states, seq_idx, rmsnorm_weight,
                              outproj_weight, outproj_bias, y if keep_y else None)
        ctx.dims, ctx.s = dims, s
        return (out, final) if s["final"] else out

    @staticmethod
    def backward(ctx, dout, dfinal=None):
        (zxbcdt, conv_weight, conv_bias, dt_bias, A, D, initial_states, seq_idx, rmsnorm_weight, outproj_weight,
         outproj_bias, y) = ctx.saved_tensors
        dims, s = ctx.dims, ctx.s
        zx0, z, xbc, dt = dims.split(zxbcdt)
        out_dim = dims.d_nonssm + dims.dim if outproj_weight is None else outproj_weight.shape[0]
        if dout is None:
            dout = torch.zeros((dims.batch, dims.seqlen, out_dim), dtype=zxbcdt.dtype, device=zxbcdt.device)
        d_outproj_w = d_outproj_b = None
        if outproj_weight is not None:  # out_proj's input recomputed from y (a norm, no scan)
            inp = _output(zx0, z, y, rmsnorm_weight, dims, s)
            d_outproj_w = (dout.flatten(0, 1).t() @ inp.flatten(0, 1).to(dout.dtype)).to(outproj_weight.dtype)
            d_outproj_b = None if outproj_bias is None else dout.sum((0, 1)).to(outproj_bias.dtype)
            dout = dout @ outproj_weight.to(dout.dtype)
        dzx0, dout = dout.split([dims.d_nonssm, dims.dim], dim=-1)
        d_norm_w = dz = None
        if rmsnorm_weight is not None:
            dy, d_norm_w, dz = _norm_bwd(dout, y.flatten(-2), rmsnorm_weight, z, s["eps"],
                                               dims.dim // dims.ngroups, s["norm_before_gate"])
        else:
            dy = dout
        x, B, C = dims.ssm(_conv(xbc, conv_weight, conv_bias, seq_idx, s["silu"]))
        z_heads = None if rmsnorm_weight is not None else z.unflatten(-1, (dims.nheads, dims.headdim))

        def empty(t):
            return None if t is None else _alloc.empty(t.shape, t.dtype, t.device)

        grads = [empty(t) for t in (x, dt, A, B, C, D, z_heads, dt_bias, initial_states)]
        dy = dy.to(x.dtype).unflatten(-1, (dims.nheads, dims.headdim))
        torch.ops.ifk.mamba_chunk_scan_bwd(*grads, [dy, dfinal, None, x, dt, A, B, C, D, z_heads, dt_bias,
                                                    initial_states, seq_idx, None],
                                           True, *s["dt_limit"], s["chunk_size"])
        dx, ddt, dA, dB, dC, dD, dz_scan, ddt_bias, dinit = grads
        d_conv_out = torch.cat([dx.flatten(-2), dB.flatten(-2), dC.flatten(-2)], dim=-1)
        dxbc, d_conv_w, d_conv_b, _ = causal_conv1d_bwd_ref(xbc.transpose(1, 2), conv_weight, conv_bias, s["silu"],
                                                           None, d_conv_out.transpose(1, 2), None, seq_idx)
        dz = dz_scan.flatten(-2) if dz is None else dz
        parts = [_swiglu_bwd(zx0, dzx0)] if dims.d_nonssm else []
        dzxbcdt = torch.cat([*parts, dz.to(zxbcdt.dtype), dxbc.transpose(1, 2).to(zxbcdt.dtype),
                             ddt.to(zxbcdt.dtype)], dim=-1)
        return (dzxbcdt, d_conv_w.to(conv_weight.dtype), None if conv_bias is None else d_conv_b.to(conv_bias.dtype),
                ddt_bias, dA, dD, dinit, None, d_norm_w, d_outproj_w, d_outproj_b, None, None)


def _validated(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states, seq_idx, activation,
               rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups) -> _Dims:
    """Metadata checks of the fused call (the inner ops check their own arguments again)."""
    check_tensor("zxbcdt", zxbcdt, ndim=3, dtypes=GRAD_DTYPES)
    device = zxbcdt.device
    check_tensor("D", D, ndim=(1, 2), dtypes=GRAD_DTYPES, device=device)
    if D.dim() == 2:
        nheads, headdim = D.shape
    elif isinstance(headdim, bool) or not isinstance(headdim, int) or headdim < 1:
        raise ValueError(f"headdim must be a positive int when D is 1-D ([nheads]), got {headdim!r}")
    else:
        nheads = D.shape[0]
    if isinstance(ngroups, bool) or not isinstance(ngroups, int) or ngroups < 1 or nheads % ngroups:
        raise ValueError(f"ngroups must be a positive int dividing the {nheads} heads, got {ngroups!r}")
    conv_dim = _check_weight(conv1d_weight, conv1d_bias, device, dtypes=GRAD_DTYPES)
    dim = nheads * headdim
    if conv_dim <= dim or (conv_dim - dim) % (2 * ngroups):
        raise ValueError(f"conv1d_weight has {conv_dim} channels, expected dim + 2 * ngroups * dstate with "
                         f"dim={dim} (nheads * headdim), ngroups={ngroups}, dstate >= 1")
    rest = zxbcdt.shape[-1] - dim - conv_dim - nheads
    if rest < 0 or rest % 2:
        raise ValueError(f"zxbcdt's last dim {zxbcdt.shape[-1]} must be 2 * d_nonssm + 2 * dim + 2 * ngroups * "
                         f"dstate + nheads (dim={dim}, conv dim={conv_dim}, nheads={nheads}, d_nonssm >= 0)")
    for name, t in (("dt_bias", dt_bias), ("A", A)):
        check_shape(name, check_tensor(name, t, ndim=1, dtypes=GRAD_DTYPES, device=device), (nheads,))
    _check_chunk_size(chunk_size)
    dims = _Dims(zxbcdt, conv_dim, nheads, headdim, ngroups)
    state = (dims.batch, nheads, headdim, dims.dstate)
    if check_optional("initial_states", initial_states, ndim=4, dtypes=GRAD_DTYPES, device=device) is not None:
        check_shape("initial_states", initial_states, state)
    if check_optional("seq_idx", seq_idx, ndim=2, dtypes=(torch.int32, torch.int64), device=device) is not None:
        check_shape("seq_idx", seq_idx, (dims.batch, dims.seqlen))
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if check_optional("rmsnorm_weight", rmsnorm_weight, ndim=1, dtypes=GRAD_DTYPES, device=device) is not None:
        check_shape("rmsnorm_weight", rmsnorm_weight, (dim,))
        if not isinstance(rmsnorm_eps, (int, float)) or not (math.isfinite(rmsnorm_eps) and rmsnorm_eps >= 0):
            raise ValueError(f"rmsnorm_eps must be a finite number >= 0, got {rmsnorm_eps!r}")
    if check_optional("outproj_weight", outproj_weight, ndim=2, dtypes=GRAD_DTYPES, device=device) is not None:
        check_shape("outproj_weight", outproj_weight, (None, dims.d_nonssm + dim))
        if check_optional("outproj_bias", outproj_bias, ndim=1, dtypes=GRAD_DTYPES, device=device) is not None:
            check_shape("outproj_bias", outproj_bias, (outproj_weight.shape[0],))
    elif outproj_bias is not None:
        raise ValueError("outproj_bias is given without outproj_weight")
    return dims


def mamba_split_conv1d_scan_combined(
    zxbcdt: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
    return_final_states: bool = False,
    activation: str | None = "silu",
    rmsnorm_weight: torch.Tensor | None = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: torch.Tensor | None = None,
    outproj_bias: torch.Tensor | None = None,
    headdim: int | None = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
):
    """mamba_ssm's fused Mamba-2 mixer (what HF transformers' Mamba-2 family calls when training).

    ``zxbcdt`` splits along its last dim into ``[zx0 (2 d_nonssm), z (dim), xBC (dim + 2 g n), dt (h)]``;
    ``xBC`` goes through the causal conv (+ ``activation``) and splits into x ``[b, l, h, p]``, B, C
    ``[b, l, g, n]``; the SSD scan runs with ``dt_softplus=True``; its output is normed and gated by
    ``rms_norm_gated(y, rmsnorm_weight, z, rmsnorm_eps, group_size=dim // ngroups, norm_before_gate)``
    (without ``rmsnorm_weight``: gated by ``silu(z)`` inside the scan); ``silu(zx0[:d]) * zx0[d:]`` is
    put in front when ``d_nonssm > 0``; then ``out_proj`` applies when ``outproj_weight`` is given.

    Args:
        zxbcdt: ``[b, l, 2 d_nonssm + 2 dim + 2 g n + h]`` fp32/fp16/bf16, dim = h p; float64 runs on the
            torch backend (gradient checks).
        conv1d_weight: ``[dim + 2 g n, W]`` (W in 2..4); conv1d_bias: ``[dim + 2 g n]`` or None.
        dt_bias, A: ``[h]``. D: ``[h]`` (then ``headdim`` is needed) or ``[h, p]``.
        chunk_size: the SSD chunk length, a power of two.
        initial_states: ``[b, h, p, n]`` SSM states to start from. seq_idx: ``[b, l]`` int32/int64,
            several sequences per row (conv and scan reset where it changes).
        dt_limit: ``(lo, hi)`` clamp of ``softplus(dt + dt_bias)``.
        return_final_states: also return the final SSM states ``[b, h, p, n]`` fp32.
        rmsnorm_weight: ``[dim]`` or None; rmsnorm_eps its epsilon.
        outproj_weight: ``[out, d_nonssm + dim]`` or None; outproj_bias ``[out]`` (needs the weight).
        ngroups: g, dividing h. norm_before_gate: ``norm(y) * silu(z)`` if True, ``norm(y * silu(z))`` if False.

    Returns ``out [b, l, out]`` (``[b, l, d_nonssm + dim]`` without out_proj) in the dtype the last
    step gives, or ``(out, final_states)``. Differentiable in every tensor argument but seq_idx
    (gradients flow in through the final states too); only the inputs and the scan output are kept
    for the backward pass, which recomputes the conv.

    Example:
        >>> h, p, g, n, W = 4, 8, 1, 16, 4; dim = h * p; conv = dim + 2 * g * n
        >>> zxbcdt = torch.randn(2, 50, dim + conv + h)
        >>> out = mamba_split_conv1d_scan_combined(zxbcdt, torch.randn(conv, W), None, torch.rand(h),
        ...     -torch.rand(h), torch.randn(h), 32, headdim=p, rmsnorm_weight=torch.ones(dim))
        >>> out.shape
        torch.Size([2, 50, 32])
    """
    dims = _validated(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states, seq_idx,
                      activation, rmsnorm_weight, rmsnorm_eps, outproj_weight, outproj_bias, headdim, ngroups)
    s = dict(silu=_silu_flag(activation), chunk_size=chunk_size, dt_limit=_check_dt_limit(dt_limit),
             final=bool(return_final_states), norm=rmsnorm_weight is not None, eps=float(rmsnorm_eps),
             norm_before_gate=bool(norm_before_gate))
    args = (zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, initial_states, seq_idx, rmsnorm_weight,
            outproj_weight, outproj_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
        return _SplitConv1dScanFn.apply(*args, dims, s)
    out, final, _ = _forward(*args, dims, s)
    return (out, final) if s["final"] else out
