"""The Mamba-1 selective scan backward: the torch backend (:func:`scan_bwd_torch`), the dispatch to
the backend the registry picks, and the custom op ``ifk::selective_scan_bwd``.

Contract (every backend, ``scan_bwd_<backend>(dout, dlast, u, delta, A, B, C, D, z, delta_bias,
delta_softplus) -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)``):

- ``dout [Bt, D, L]`` any float dtype, ``dlast [Bt, D, N]`` or None (the gradient flowing into the
  returned last state); u, delta, z ``[Bt, D, L]``; A ``[D, N]``; B, C ``[D, N]`` or
  ``[Bt, G, N, L]``; D, delta_bias ``[D]`` or None.
- Gradients in fp32 (fp64 for fp64 inputs on the torch backend) shaped like the inputs, None where
  the input is None. Per-channel dB/dC and dA, dD, ddelta_bias are summed over batch and length;
  grouped dB/dC over the channels of the group.
- Deterministic: no float atomics, reductions in a fixed order.

The math, with ``a_t = exp(dt_t A)``, ``b_t = dt_t u_t B_t``, ``h_t = a_t h_{t-1} + b_t``,
``y_t = C_t . h_t + D u_t``, ``out_t = y_t silu(z_t)`` and the state adjoint
``lambda_t = dL/dh_t = dy_t C_t + a_{t+1} lambda_{t+1}`` (``lambda_{L-1} = dy C + dlast``)::

    dB_t = lambda_t dt_t u_t           dC_t = dy_t h_t
    du_t = dt_t (lambda_t . B_t) + D dy_t
    ddt_t = u_t (lambda_t . B_t) + A . (lambda_t a_t h_{t-1})
    dA = sum_t dt_t lambda_t a_t h_{t-1}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (the universal alias)

from triton_kernels import _alloc
from triton_kernels._checks import check_shape, check_tensor
from triton_kernels._ops import destination_op
from triton_kernels.mamba.ops_torch import CHUNK_TOKENS, per_channel, scan_chunk
from triton_kernels.mamba.selective_scan_bwd_cpu import scan_bwd_cpu
from triton_kernels.mamba.tiles import check_tile_states
from triton_kernels.registry import SELECTIVE_SCAN

Grads = tuple[torch.Tensor | None, ...]


def _reduce_bc(acc: torch.Tensor, full: torch.Tensor, s: int, e: int) -> None:
    """Fold a chunk's per-channel gradient ``full [Bt, D, l, N]`` into dB/dC ``acc``: summed over batch
    and length for ``[D, N]``, over the channels of each group for ``[Bt, N, L]`` / ``[Bt, G, N, L]``."""
    if acc.dim() == 2:
        acc += full.sum((0, 2))
    elif acc.dim() == 3:
        acc[..., s:e] = full.sum(1).transpose(-1, -2)
    else:
        acc[..., s:e] = full.unflatten(1, (acc.shape[1], -1)).sum(2).transpose(-1, -2)


def _chunk_terms(u, delta, A, B, delta_bias, delta_softplus: bool, s: int, e: int, cdt: torch.dtype):
    """``(pre, dt, dA, dBu)`` of tokens ``s:e``: the step before softplus ``[Bt, D, l]``, the step, and
    the decays and inputs ``[Bt, D, l, N]``."""
    pre = delta[..., s:e].to(cdt)
    if delta_bias is not None:
        pre = pre + delta_bias.to(cdt)[:, None]
    dt = F.softplus(pre) if delta_softplus else pre  # threshold 20, like the forward
    dA = torch.exp(dt[..., None] * A[:, None, :])
    dBu = (dt * u[..., s:e].to(cdt))[..., None] * per_channel(B, u.shape[0], u.shape[1], s, e).to(cdt)
    return pre, dt, dA, dBu


def scan_bwd_torch(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool,
                   chunk_size: int | None = None) -> Grads:
    """The torch backend of the backward (see the module docstring for the contract).

    Chunked like :func:`~triton_kernels.mamba.ops_torch.selective_scan_ref`: a forward pass keeps
    the state entering each chunk of ``chunk_size`` tokens (``[Bt, D, N]`` per chunk, 1/chunk of a
    ``[Bt, D, L, N]`` tensor); the reverse pass recomputes each chunk's states, scans the adjoint
    backwards over the flipped chunk with the same doubling scan and carries ``a_s lambda_s`` into
    the previous chunk. Work tensors are ``[Bt, D, chunk, N]``."""
    cdt = torch.float64 if u.dtype == torch.float64 else torch.float32
    bsz, dim, seqlen = u.shape
    lc = chunk_size or CHUNK_TOKENS
    A = A.to(cdt)
    bounds = [(s, min(s + lc, seqlen)) for s in range(0, seqlen, lc)]
    h = u.new_zeros((bsz, dim, A.shape[1]), dtype=cdt)
    entering = []
    for s, e in bounds:
        entering.append(h)
        _, _, dA, dBu = _chunk_terms(u, delta, A, B, delta_bias, delta_softplus, s, e, cdt)
        h = scan_chunk(dA, dBu, h)[:, :, -1]

    du, ddelta = torch.empty_like(u, dtype=cdt), torch.empty_like(u, dtype=cdt)
    dz = None if z is None else torch.empty_like(z, dtype=cdt)
    dB = (torch.zeros if B.dim() == 2 else torch.empty)(B.shape, dtype=cdt, device=u.device)
    dC = (torch.zeros if C.dim() == 2 else torch.empty)(C.shape, dtype=cdt, device=u.device)
    dAsum = torch.zeros_like(A)
    dD = None if D is None else torch.zeros(dim, dtype=cdt, device=u.device)
    dbias = None if delta_bias is None else torch.zeros(dim, dtype=cdt, device=u.device)
    carry = torch.zeros_like(h) if dlast is None else dlast.to(cdt)  # dL/dh at the chunk's last token, from later
    for (s, e), h0 in zip(reversed(bounds), reversed(entering)):
        pre, dt, dA, dBu = _chunk_terms(u, delta, A, B, delta_bias, delta_softplus, s, e, cdt)
        hs = scan_chunk(dA, dBu, h0)
        Cc = per_channel(C, bsz, dim, s, e).to(cdt)
        uc, dy = u[..., s:e].to(cdt), dout[..., s:e].to(cdt)
        if z is not None:
            y = (hs * Cc).sum(-1) + (0 if D is None else uc * D.to(cdt)[:, None])
            zc = z[..., s:e].to(cdt)
            sig = torch.sigmoid(zc)
            dz[..., s:e] = dy * y * sig * (1 + zc * (1 - sig))
            dy = dy * zc * sig
        # lambda_t = dy_t C_t + a_{t+1} lambda_{t+1}: the doubling scan on the flipped chunk
        a_next = torch.cat([dA[:, :, 1:], torch.ones_like(dA[:, :, :1])], 2)
        lam = scan_chunk(a_next.flip(2), (dy[..., None] * Cc).flip(2), carry).flip(2)
        carry = dA[:, :, 0] * lam[:, :, 0]
        _reduce_bc(dC, dy[..., None] * hs, s, e)
        _reduce_bc(dB, lam * (dt * uc)[..., None], s, e)
        lam_b = (lam * per_channel(B, bsz, dim, s, e).to(cdt)).sum(-1)  # [Bt, D, l]
        lam_ah = lam * dA * torch.cat([h0[:, :, None], hs[:, :, :-1]], 2)  # lambda_t a_t h_{t-1}
        dAsum += (lam_ah * dt[..., None]).sum((0, 2))
        ddt = uc * lam_b + (lam_ah * A[:, None, :]).sum(-1)
        du[..., s:e] = dt * lam_b
        if D is not None:
            du[..., s:e] += D.to(cdt)[:, None] * dy
            dD += (dy * uc).sum((0, 2))
        if delta_softplus:
            ddt = ddt * torch.where(pre <= 20, torch.sigmoid(pre), 1.0)
        ddelta[..., s:e] = ddt
        if dbias is not None:
            dbias += ddt.sum((0, 2))
    return du, ddelta, dAsum, dB, dC, dD, dz, dbias


# ---- dispatch ---------------------------------------------------------------------------------

def _check_bwd(grads: dict, dout, dlast, u, delta, A, B, C, D, z, delta_bias, tile_states) -> None:
    """Shape facts the backends rely on (run inside the op: a traced call skips the wrapper's checks)."""
    check_tensor("u", u, ndim=3)
    bsz, dim, seqlen = u.shape
    check_shape("A", A, (dim, None))
    dstate = A.shape[1]
    for name, t in (("dout", dout), ("delta", delta), ("z", z)):
        if t is not None:
            check_shape(name, t, (bsz, dim, seqlen))
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_shape(name, t, (dim,))
    if dlast is not None:
        check_shape("dlast", dlast, (bsz, dim, dstate))
    for name, M in (("B", B), ("C", C)):
        check_tensor(name, M, ndim=(2, 4))
        check_shape(name, M, (dim, dstate) if M.dim() == 2 else (bsz, None, dstate, seqlen))
        if M.dim() == 4 and (M.shape[1] == 0 or dim % M.shape[1]):
            raise ValueError(f"{name} has {M.shape[1]} groups, which must divide the {dim} channels")
    if B.dim() == C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f"B and C must have the same number of groups, got {B.shape[1]} and {C.shape[1]}")
    like = dict(du=u, ddelta=u, dA=A, dB=B, dC=C, dD=D, dz=z, ddelta_bias=delta_bias)
    for name, grad in grads.items():
        if (grad is None) != (like[name] is None):
            raise ValueError(f"{name} must be given exactly when its input is, got {name}="
                             f"{'None' if grad is None else 'a tensor'}")
        if grad is not None:
            check_shape(name, grad, tuple(like[name].shape))
    if tile_states is not None:
        check_tile_states(tile_states, u, A)


@destination_op("selective_scan_bwd",
                mutates_args=("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"))
def _selective_scan_bwd(
    du: torch.Tensor,
    ddelta: torch.Tensor,
    dA: torch.Tensor,
    dB: torch.Tensor,
    dC: torch.Tensor,
    dD: torch.Tensor | None,
    dz: torch.Tensor | None,
    ddelta_bias: torch.Tensor | None,
    inputs: list[torch.Tensor | None],
    delta_softplus: bool,
) -> None:
    """Destination-passing backward: ``inputs`` is ``[dout, dlast, u, delta, A, B, C, D, z,
    delta_bias, tile_states]`` (the contract's shapes; ``tile_states [Bt, n_tiles, D, N]`` fp32 are
    the states the Triton forward saved at the start of each tile, or None); every gradient is
    written (None exactly where its input is None), in its buffer's dtype."""
    dout, dlast, u, delta, A, B, C, D, z, delta_bias, tile_states = inputs
    outs = dict(du=du, ddelta=ddelta, dA=dA, dB=dB, dC=dC, dD=dD, dz=dz, ddelta_bias=ddelta_bias)
    _check_bwd(outs, dout, dlast, u, delta, A, B, C, D, z, delta_bias, tile_states)
    args = (dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    dtypes = [t.dtype for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    backend = SELECTIVE_SCAN.resolve(u.device, dtypes)
    if backend == "triton":
        from triton_kernels.mamba.selective_scan_bwd_triton import scan_bwd_triton

        grads = scan_bwd_triton(*args, tile_states=tile_states)
    else:
        grads = (scan_bwd_cpu if backend == "cpu" else scan_bwd_torch)(*args)
    for out, grad in zip(outs.values(), grads):
        if out is not None:
            out.copy_(grad)


def selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool,
                       tile_states: torch.Tensor | None = None) -> Grads:
    """The gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)`` through ``ifk::selective_scan_bwd``,
    each in its input's dtype (None where the input is None)."""
    like = (u, delta, A, B, C, D, z, delta_bias)
    grads = [None if t is None else _alloc.empty(t.shape, torch.promote_types(t.dtype, torch.float32), t.device)
             for t in like]
    _selective_scan_bwd(*grads, [dout, dlast, u, delta, A, B, C, D, z, delta_bias, tile_states],
                        bool(delta_softplus))
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, like))
