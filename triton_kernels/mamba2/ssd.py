"""Mamba-2 SSD prefill (state-space duality): mamba_ssm's ``mamba_chunk_scan_combined`` and the
packed form with a state cache, ``mamba_chunk_scan_varlen``.

Both reduce to ONE packed core, in fp32 arithmetic (backends: ``ssd_core_triton`` in
:mod:`.ssd_triton`, ``ssd_core_torch`` in :mod:`.ssd_torch`)::

    ssd_core(out, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, seq_starts, seq_starts_t,
             init_states, init_index, final_states, final_index, chunk_size) -> None

    out [T, h, p] written (rows of each passed sequence); x [T, h, p]; dt [T, h]; A [h];
    B, C [T, g, n] (head i uses group i // (h // g)); D [h] | [h, p] | None; z [T, h, p] | None;
    dt_bias [h] | None; seq_starts: host list of nseq + 1 offsets, seq_starts_t the same as an
    int64 tensor; init_states / final_states [S, h, p, n] | None (may be one tensor) with int64
    [nseq] row indices init_index / final_index (-1: start from zeros / not written);
    chunk_size a power of two: chunks start at each sequence's first token.

Per sequence: ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t (x) B_t``, ``y_t = C_t . h_t + D x_t``,
``y_t *= silu(z_t)``, final state ``h_L``, where ``dt = softplus(dt + dt_bias)`` clamped to
``dt_limit`` (each step optional, in that order).

The public functions map onto it: the batched form packs ``[b, l]`` into ``T = b l`` (a view when
the strides allow) with one sequence per row, or per ``seq_idx`` segment / ``cu_seqlens``
sequence; the packed form drops pad sequences and reads/writes the cache through
``cache_indices``. Both read offsets on the host inside their custom op (one sync on a GPU), so
they cannot be captured in a CUDA graph.
"""

from __future__ import annotations

import itertools
import math

import torch

from triton_kernels import _alloc
from triton_kernels._checks import (
    FLOAT_DTYPES,
    GRAD_DTYPES,
    INDEX_DTYPES,
    check_distinct_rows,
    check_no_overlap,
    check_optional,
    check_shape,
    check_tensor,
    on_device,
)
from triton_kernels._data_checks import check_offsets
from triton_kernels._ops import destination_op
from triton_kernels.constants import PAD_SLOT_ID
from triton_kernels.mamba._args import check_index, check_pad_slot_id, check_query_start_loc, pad_slot_of
from triton_kernels.mamba.metadata import MambaVarlenMeta, unpack_host, varlen_arguments
from triton_kernels.mamba2.ssd_bwd_torch import ssd_core_bwd_torch
from triton_kernels.mamba2.ssd_bwd_triton import ssd_core_bwd_triton
from triton_kernels.mamba2.ssd_torch import ssd_core_torch
from triton_kernels.mamba2.ssd_triton import ssd_core_triton
from triton_kernels.registry import MAMBA_CHUNK_SCAN

DEFAULT_DT_LIMIT = (0.0, math.inf)


# The largest chunk_size accepted: launch 3 runs one program per 32 rows of a chunk on a grid axis that CUDA
# caps at 65535 (2^16 / 32 = 2048 there; mamba_ssm's models use 256).
MAX_CHUNK_SIZE = 1 << 16

# ---- backend choice -----------------------------------------------------------------------------


def _core(device: torch.device, dtypes, backward: bool = False):
    """The (forward or backward) core function of the backend that runs on ``device`` for these dtypes."""
    torch_backend = MAMBA_CHUNK_SCAN.resolve(device, dtypes) == "torch"
    if backward:
        return ssd_core_bwd_torch if torch_backend else ssd_core_bwd_triton
    return ssd_core_torch if torch_backend else ssd_core_triton


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _bounded_chunk(chunk_size: int, seq_starts: list[int]) -> int:
    """The chunk size the cores run: at most the longest sequence (rounded up to a power of two, at
    least 16), so no grid axis grows with a chunk larger than the data. The result does not depend on
    the chunk size beyond rounding, and chunks never span two sequences either way."""
    longest = max((b - a for a, b in itertools.pairwise(seq_starts)), default=0)
    return min(chunk_size, max(16, 1 << max(longest - 1, 0).bit_length()))


def _run_core(out, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, seq_starts, init_states, init_index,
              final_states, final_index, chunk_size) -> None:
    chunk_size = _bounded_chunk(chunk_size, seq_starts)
    device = x.device
    dtypes = {t.dtype for t in (x, dt, B, C, init_states, final_states) if t is not None}
    core = _core(device, dtypes)
    with on_device(device):
        core(out, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, seq_starts, _index(seq_starts, device),
             init_states, _index(init_index, device), final_states, _index(final_index, device), chunk_size)


# ---- validation (metadata only; run by the public functions and again inside the custom ops) ----


def _check_chunk_size(chunk_size: object) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1 \
            or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a positive power of two, got {chunk_size!r}")
    if chunk_size > MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be at most {MAX_CHUNK_SIZE} (a chunk's row blocks are one grid axis, "
                         f"limited to 65535 on a GPU), got {chunk_size}")


def _check_dt_limit(dt_limit: object) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise TypeError(f"dt_limit must be a pair of floats (lo, hi), got {dt_limit!r}") from None
    if not lo <= hi:
        raise ValueError(f"dt_limit must have lo <= hi, got {dt_limit!r}")
    return lo, hi


def _check_ssm(x, dt, A, B, C, D, z, dt_bias, lead: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Check the arguments both forms share (``lead`` = ``(b, l)`` or ``(T,)``); return h, p, g, n.
    The head count comes from A (``[h]``), so a transposed x is reported as a bad x. float64 runs on the
    torch backend (gradient checks)."""
    check_tensor("x", x, ndim=len(lead) + 2, dtypes=GRAD_DTYPES)
    device = x.device
    check_tensor("A", A, ndim=1, dtypes=GRAD_DTYPES, device=device)
    nheads = A.shape[0]
    if tuple(x.shape[:-1]) != (*lead, nheads):
        raise ValueError(f"x must have shape [{', '.join(map(str, lead))}, {nheads}, *] (h from A {list(A.shape)}), "
                         f"got {list(x.shape)}")
    headdim = x.shape[-1]
    check_tensor("dt", dt, dtypes=GRAD_DTYPES, device=device)
    check_shape("dt", dt, (*lead, nheads))
    check_tensor("B", B, ndim=len(lead) + 2, dtypes=GRAD_DTYPES, device=device)
    check_shape("B", B, (*lead, None, None))
    groups, dstate = B.shape[-2:]
    if groups == 0 or nheads % groups:
        raise ValueError(f"B has {groups} groups, which must divide the {nheads} heads of x")
    if dstate == 0:
        raise ValueError(f"B must have a state size n >= 1, got shape {list(B.shape)}")
    check_tensor("C", C, dtypes=GRAD_DTYPES, device=device)
    check_shape("C", C, B.shape)
    if check_optional("D", D, ndim=(1, 2), dtypes=GRAD_DTYPES, device=device) is not None:
        check_shape("D", D, (nheads,) if D.dim() == 1 else (nheads, headdim))
    if check_optional("z", z, dtypes=GRAD_DTYPES, device=device) is not None:
        check_shape("z", z, x.shape)
    if check_optional("dt_bias", dt_bias, ndim=1, dtypes=GRAD_DTYPES, device=device) is not None:
        check_shape("dt_bias", dt_bias, (nheads,))
    return nheads, headdim, groups, dstate


def _check_combined(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens) -> tuple[int, ...]:
    check_tensor("x", x, ndim=4, dtypes=GRAD_DTYPES)
    batch, seqlen = x.shape[:2]
    nheads, headdim, _, dstate = _check_ssm(x, dt, A, B, C, D, z, dt_bias, (batch, seqlen))
    if check_optional("initial_states", initial_states, ndim=4, dtypes=GRAD_DTYPES, device=x.device) is not None:
        check_shape("initial_states", initial_states, (batch, nheads, headdim, dstate))
    if check_optional("seq_idx", seq_idx, ndim=2, dtypes=INDEX_DTYPES, device=x.device) is not None:
        check_shape("seq_idx", seq_idx, (batch, seqlen))
    if check_optional("cu_seqlens", cu_seqlens, ndim=1, dtypes=INDEX_DTYPES, device=x.device) is not None:
        if batch != 1:
            raise ValueError(f"cu_seqlens needs batch 1 (sequences packed along l), got x of shape {list(x.shape)}")
        if cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must hold at least 2 offsets (one sequence), got {cu_seqlens.shape[0]}")
    return batch, seqlen, nheads, headdim, dstate


def _check_varlen(x, ssm_states, dt, A, B, C, D, z, dt_bias, query_start_loc, cache_indices,
                  has_initial_state) -> int:
    """Return the number of sequences."""
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    nheads, headdim, _, dstate = _check_ssm(x, dt, A, B, C, D, z, dt_bias, (x.shape[0],))
    check_tensor("ssm_states", ssm_states, ndim=4, dtypes=FLOAT_DTYPES, device=x.device)
    check_shape("ssm_states", ssm_states, (None, nheads, headdim, dstate))
    check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=INDEX_DTYPES, device=x.device)
    batch = query_start_loc.shape[0] - 1
    if batch < 0:
        raise ValueError("query_start_loc must hold at least one offset (batch + 1 entries), got none")
    if check_optional("cache_indices", cache_indices, ndim=1, dtypes=INDEX_DTYPES, device=x.device) is None:
        if batch > ssm_states.shape[0]:
            raise ValueError(f"cache_indices=None maps sequence b to slot b, but there are {batch} sequences "
                             f"and ssm_states has {ssm_states.shape[0]} slots")
    else:
        check_shape("cache_indices", cache_indices, (batch,))
    if check_optional("has_initial_state", has_initial_state, ndim=1, dtypes=(torch.bool,),
                      device=x.device) is not None:
        check_shape("has_initial_state", has_initial_state, (batch,))
    return batch


# ---- batched form -------------------------------------------------------------------------------


def _segments(batch: int, seqlen: int, seq_idx: torch.Tensor | None, cu: list[int] | None):
    """Split the packed ``[b l]`` tokens into core sequences: in each row, at each ``seq_idx``
    change and each ``cu_seqlens`` offset (batch 1). Returns ``(starts, opens, closes_row,
    closes_seq)``: packed offsets ``[nseg + 1]``, and per segment the row it opens, the row it
    closes and the ``cu_seqlens`` sequence it closes (each -1 where none)."""
    changes: list[list[int]] = [[] for _ in range(batch)]
    if seq_idx is not None and seqlen > 1:
        for r, j in torch.nonzero(seq_idx[:, 1:] != seq_idx[:, :-1]).tolist():
            changes[r].append(j + 1)
    bounds = [(0, seqlen)] if cu is None else list(itertools.pairwise(cu))  # sequences of a row
    starts, opens, closes_row, closes_seq = [0], [], [], []
    for r in range(batch):
        for i, (s0, s1) in enumerate(bounds):
            ends = [c for c in changes[r] if s0 < c < s1] + [s1]
            for k, end in enumerate(ends):
                starts.append(r * seqlen + end)
                opens.append(r if i == 0 and k == 0 else -1)
                closes_row.append(r if i == len(bounds) - 1 and k == len(ends) - 1 else -1)
                closes_seq.append(i if cu is not None and k == len(ends) - 1 else -1)
    return starts, opens, closes_row, closes_seq


@destination_op("mamba_chunk_scan", mutates_args=("out", "final_states", "varlen_states"))
def _chunk_scan_op(
    out: torch.Tensor,
    final_states: torch.Tensor | None,
    varlen_states: torch.Tensor | None,
    inputs: list[torch.Tensor | None],
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    chunk_size: int,
) -> None:
    """Destination-passing core of :func:`mamba_chunk_scan_combined`.

    out ``[b, l, h, p]``; final_states ``[b, h, p, n]`` fp32 or None; varlen_states
    ``[nseq, h, p, n]`` or None; inputs = ``[x, dt, A, B, C, D, z, dt_bias, initial_states,
    seq_idx, cu_seqlens]``.
    """
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens = inputs
    batch, seqlen, nheads, headdim, _ = _check_combined(*inputs)
    _check_chunk_size(chunk_size)
    cu = None if cu_seqlens is None else check_offsets("cu_seqlens", cu_seqlens, seqlen, what="length")
    if cu_seqlens is not None and cu is None:
        raise ValueError("mamba_chunk_scan_combined reads cu_seqlens on the host: it cannot run in a CUDA graph")
    starts, opens, closes_row, closes_seq = _segments(batch, seqlen, seq_idx, cu)
    init_index = opens if initial_states is not None else [-1] * len(opens)
    target, final_index = final_states, closes_row if final_states is not None else [-1] * len(opens)
    if varlen_states is not None:  # the row's final state is then the last sequence's
        state_dtype = torch.promote_types(x.dtype, torch.float32)
        target = varlen_states if varlen_states.dtype == state_dtype else _alloc.empty(
            varlen_states.shape, state_dtype, x.device)
        final_index = closes_seq

    def packed(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(batch * seqlen, *t.shape[2:])

    flat_out = out.view(batch * seqlen, nheads, headdim)
    _run_core(flat_out, packed(x), packed(dt), A, packed(B), packed(C), D, packed(z), dt_bias, dt_softplus,
              (dt_min, dt_max), starts, initial_states, init_index, target, final_index, chunk_size)
    if varlen_states is not None:
        if target is not varlen_states:
            varlen_states.copy_(target)
        if final_states is not None:
            final_states.copy_(target[-1:])



def _chunk_scan_forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                        dt_softplus, dt_limit, return_final_states, return_varlen_states):
    batch, _, nheads, headdim, dstate = x.shape[0], *x.shape[1:], B.shape[-1]
    out = _alloc.empty(x.shape, x.dtype, x.device)
    state_dtype = torch.promote_types(x.dtype, torch.float32)  # fp32 (fp64 for fp64 inputs)
    final = _alloc.empty((batch, nheads, headdim, dstate), state_dtype, x.device) if return_final_states else None
    varlen = None
    if return_varlen_states:
        varlen = _alloc.empty((cu_seqlens.shape[0] - 1, nheads, headdim, dstate), C.dtype, x.device)
    _chunk_scan_op(out, final, varlen, [x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx,
                                                        cu_seqlens], dt_softplus, *dt_limit, chunk_size)
    result = (out, *(t for t in (final, varlen) if t is not None))
    return result if len(result) > 1 else out


@destination_op("mamba_chunk_scan_bwd", mutates_args=("dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias", "dinit"))
def _chunk_scan_bwd_op(
    dx: torch.Tensor,
    ddt: torch.Tensor,
    dA: torch.Tensor,
    dB: torch.Tensor,
    dC: torch.Tensor,
    dD: torch.Tensor | None,
    dz: torch.Tensor | None,
    ddt_bias: torch.Tensor | None,
    dinit: torch.Tensor | None,
    inputs: list[torch.Tensor | None],
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    chunk_size: int,
) -> None:
    """Destination-passing backward of :func:`mamba_chunk_scan_combined`.

    Writes the gradients dx ``[b, l, h, p]``, ddt ``[b, l, h]``, dA ``[h]``, dB, dC ``[b, l, g, n]``,
    and where the input exists dD, dz, ddt_bias, dinit (initial_states' shape), each in its input's
    dtype. inputs = ``[dout, dfinal, dvarlen, x, dt, A, B, C, D, z, dt_bias, initial_states,
    seq_idx, cu_seqlens]``: the gradients of ``out`` ``[b, l, h, p]``, of the returned final states
    ``[b, h, p, n]`` and varlen states ``[nseq, h, p, n]`` (None: no gradient), then the forward's inputs.
    """
    dout, dfinal, dvarlen, *fwd = inputs
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens = fwd
    batch, seqlen, nheads, headdim, dstate = _check_combined(*fwd)
    _check_chunk_size(chunk_size)
    _check_grads(dict(dx=(dx, x), ddt=(ddt, dt), dA=(dA, A), dB=(dB, B), dC=(dC, C), dD=(dD, D), dz=(dz, z),
                      ddt_bias=(ddt_bias, dt_bias), dinit=(dinit, initial_states), dout=(dout, x)))
    state_shape = (nheads, headdim, dstate)
    if check_optional("dfinal", dfinal, ndim=4, dtypes=GRAD_DTYPES, device=x.device) is not None:
        check_shape("dfinal", dfinal, (batch, *state_shape))
    cu = None if cu_seqlens is None else check_offsets("cu_seqlens", cu_seqlens, seqlen, what="length")
    if cu_seqlens is not None and cu is None:
        raise ValueError("mamba_chunk_scan_combined reads cu_seqlens on the host: it cannot run in a CUDA graph")
    if check_optional("dvarlen", dvarlen, ndim=4, dtypes=GRAD_DTYPES, device=x.device) is not None:
        if cu is None:
            raise ValueError("dvarlen (the gradient of the varlen states) needs cu_seqlens")
        check_shape("dvarlen", dvarlen, (len(cu) - 1, *state_shape))
    starts, opens, closes_row, closes_seq = _segments(batch, seqlen, seq_idx, cu)
    nseg = len(opens)
    init_index = opens if initial_states is not None else [-1] * nseg
    target, final_index = dfinal, closes_row if dfinal is not None else [-1] * nseg
    if dvarlen is not None:  # one gradient row per segment: its row's and its sequence's final state
        target = torch.zeros((nseg, *state_shape), dtype=torch.promote_types(x.dtype, torch.float32),
                             device=x.device)
        for grad, closes in ((dfinal, closes_row), (dvarlen, closes_seq)):
            if grad is not None:
                seg = [i for i, c in enumerate(closes) if c >= 0]
                target[seg] += grad[[closes[i] for i in seg]].float()
        final_index = list(range(nseg))

    def packed(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(batch * seqlen, *t.shape[2:])

    device = x.device
    core = _core(device, {t.dtype for t in (x, dt, B, C, initial_states) if t is not None}, backward=True)
    with on_device(device):
        core(packed(dx), packed(ddt), dA, packed(dB), packed(dC), dD, packed(dz), ddt_bias, dinit, packed(dout),
             target, packed(x), packed(dt), A, packed(B), packed(C), D, packed(z), dt_bias, dt_softplus,
             (dt_min, dt_max), starts, _index(starts, device), initial_states, _index(init_index, device),
             _index(final_index, device), _bounded_chunk(chunk_size, starts))



def _check_grads(pairs: dict) -> None:
    """Each gradient (None exactly where its input is None) has its input's shape, dtype and device."""
    for name, (grad, like) in pairs.items():
        if (grad is None) != (like is None):
            raise ValueError(f"{name} must be given exactly when its input is, got {type(grad).__name__}")
        if grad is not None:
            check_tensor(name, grad, dtypes=(like.dtype,), device=like.device)
            check_shape(name, grad, like.shape)


class _ChunkScanFn(torch.autograd.Function):
    """Forward: ``ifk::mamba_chunk_scan``; backward: ``ifk::mamba_chunk_scan_bwd``, which
    recomputes the chunk-boundary states (only the inputs are saved)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus,
                dt_limit, return_final_states, return_varlen_states):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens)
        ctx.scalars = (dt_softplus, *dt_limit, chunk_size)
        ctx.returns = (return_final_states, return_varlen_states)
        return _chunk_scan_forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                                   dt_softplus, dt_limit, return_final_states, return_varlen_states)

    @staticmethod
    def backward(ctx, dout, *dstates):
        fwd = ctx.saved_tensors
        x, dt, A, B, C, D, z, dt_bias, initial_states = fwd[:9]
        dfinal = dstates[0] if ctx.returns[0] else None
        dvarlen = dstates[-1] if ctx.returns[1] else None
        if dout is None:
            dout = torch.zeros_like(x)

        def grad(t):
            return None if t is None else _alloc.empty(t.shape, t.dtype, t.device)

        grads = [grad(t) for t in (x, dt, A, B, C, D, z, dt_bias, initial_states)]
        _chunk_scan_bwd_op(*grads, [dout, dfinal, dvarlen, *fwd], *ctx.scalars)
        dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = grads
        return dx, ddt, dA, dB, dC, None, dD, dz, ddt_bias, dinit, None, None, None, None, None, None


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
    return_final_states: bool = False,
    return_varlen_states: bool = False,
):
    """mamba_ssm's Mamba-2 chunked scan: ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t (x) B_t``,
    ``y_t = C_t . h_t + D x_t`` (times ``silu(z_t)``), per head.

    Args:
        x: ``[b, l, h, p]`` fp32/fp16/bf16. dt: ``[b, l, h]``; ``dt = dt + dt_bias``, then
            ``softplus`` when ``dt_softplus``, then clamped to ``dt_limit`` (mamba_ssm's order).
        A: ``[h]`` (negative). B, C: ``[b, l, g, n]``, head i uses group ``i // (h / g)``.
        chunk_size: a power of two (64/128/256); the result does not depend on it beyond rounding.
        D: ``[h]`` or ``[h, p]`` skip. z: ``[b, l, h, p]`` gate. dt_bias: ``[h]``.
        initial_states: ``[b, h, p, n]``: the state each row (its first segment) starts from.
        seq_idx: ``[b, l]`` int32/int64: the state resets wherever it changes along a row.
        cu_seqlens: ``[nseq + 1]`` offsets along l (batch 1): sequences, the state resets at each.
        return_final_states: also return the state at the end of each row, ``[b, h, p, n]`` fp32.
        return_varlen_states: also return each ``cu_seqlens`` sequence's final state,
            ``[nseq, h, p, n]`` in C's dtype (needs ``cu_seqlens``).

    Returns ``out [b, l, h, p]`` in x's dtype, then ``final_states`` and/or ``varlen_states`` as
    mamba_ssm does: ``out``, ``(out, final)``, ``(out, varlen)`` or ``(out, final, varlen)``.
    Arithmetic is fp32. Reads seq_idx / cu_seqlens on the host (one sync on a GPU) when given.
    Differentiable in x, dt, A, B, C, D, z, dt_bias and initial_states (gradients also flow in
    through the returned states); the backward recomputes the chunk-boundary states and is
    deterministic (no float atomics).

    Example:
        >>> x = torch.randn(1, 100, 4, 16); dt = torch.rand(1, 100, 4); A = -torch.rand(4)
        >>> B = torch.randn(1, 100, 1, 8)
        >>> out, last = mamba_chunk_scan_combined(x, dt, A, B, B, 64, return_final_states=True)
        >>> out.shape, last.shape
        (torch.Size([1, 100, 4, 16]), torch.Size([1, 4, 16, 8]))
    """
    _check_combined(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens)
    _check_chunk_size(chunk_size)
    dt_limit = _check_dt_limit(dt_limit)
    if return_varlen_states and cu_seqlens is None:
        raise ValueError("return_varlen_states=True needs cu_seqlens (the sequences whose states to return)")
    args = (x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, bool(dt_softplus),
            dt_limit, bool(return_final_states), bool(return_varlen_states))
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in args):
        return _ChunkScanFn.apply(*args)
    return _chunk_scan_forward(*args)


# ---- packed form with a state cache -------------------------------------------------------------


@destination_op("mamba_chunk_scan_varlen", mutates_args=("out", "ssm_states"))
def _chunk_scan_varlen_op(
    out: torch.Tensor,
    ssm_states: torch.Tensor,
    inputs: list[torch.Tensor | None],
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    chunk_size: int,
    pad_slot_id: int,
    host: list[int] | None = None,
) -> None:
    """Destination-passing core of :func:`mamba_chunk_scan_varlen`: out ``[T, h, p]``, the
    ``[slots, h, p, n]`` cache; inputs = ``[x, dt, A, B, C, D, z, dt_bias, query_start_loc,
    cache_indices, has_initial_state]``; ``host``: their values, read and checked once per step
    (:meth:`MambaVarlenMeta.host`), or None to read them here."""
    x, dt, A, B, C, D, z, dt_bias, qsl, cache_indices, has_init = inputs
    batch = _check_varlen(x, ssm_states, *inputs[1:])
    _check_chunk_size(chunk_size)
    num_tokens, num_slots = x.shape[0], ssm_states.shape[0]
    if host is not None:
        starts, slots, init = unpack_host(host, batch)
    else:  # one host read of all three, checked as the step's metadata would be
        meta = MambaVarlenMeta.prepare(qsl, cache_indices, has_init, num_slots=num_slots, pad_slot_id=pad_slot_id,
                                       num_tokens=num_tokens)
        starts, slots, init = meta.starts, meta.slots, meta.initial
    # runs of live sequences between pad sequences that own tokens: one core call each
    b = 0
    while b < batch:
        if slots[b] == pad_slot_id:
            b += 1
            continue
        live = []
        while b < batch and (slots[b] != pad_slot_id or starts[b] == starts[b + 1]):
            if slots[b] != pad_slot_id:
                live.append(b)
            b += 1
        t0, t1 = starts[live[0]], starts[live[-1] + 1]
        run = [starts[i] - t0 for i in live] + [t1 - t0]

        def part(t: torch.Tensor | None, t0=t0, t1=t1) -> torch.Tensor | None:
            return None if t is None else t[t0:t1]

        _run_core(part(out), part(x), part(dt), A, part(B), part(C), D, part(z), dt_bias, dt_softplus,
                  (dt_min, dt_max), run, ssm_states, [slots[i] if init[i] else -1 for i in live], ssm_states,
                  [slots[i] for i in live], chunk_size)



def mamba_chunk_scan_varlen(
    x: torch.Tensor,
    ssm_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = DEFAULT_DT_LIMIT,
    query_start_loc: torch.Tensor | None = None,
    cache_indices: torch.Tensor | None = None,
    has_initial_state: torch.Tensor | None = None,
    pad_slot_id: int = PAD_SLOT_ID,
    out: torch.Tensor | None = None,
    *,
    metadata: MambaVarlenMeta | None = None,
) -> torch.Tensor:
    """Mamba-2 prefill of packed sequences with a state cache (vLLM's layout).

    Args:
        x: ``[T, h, p]`` fp32/fp16/bf16, the sequences packed along T. dt: ``[T, h]``.
        ssm_states: ``[slots, h, p, n]`` fp32/fp16/bf16. Sequence b starts from row
            ``cache_indices[b]`` when ``has_initial_state[b]`` (else from zeros) and its final
            state overwrites that row; other rows are untouched.
        A: ``[h]``. B, C: ``[T, g, n]`` (g divides h). D: ``[h]`` or ``[h, p]``. z: ``[T, h, p]``.
        dt_bias: ``[h]``. dt_softplus, dt_limit: as :func:`mamba_chunk_scan_combined`.
        chunk_size: a power of two; chunks start at each sequence's first token (never span two).
        query_start_loc: ``[batch + 1]`` int32/int64 offsets from 0 to T, non-decreasing (None:
            one sequence of T tokens).
        cache_indices: ``[batch]`` int32/int64 distinct slots (None: slot b for sequence b; longer is
            fine, the entries past the batch are unused). Sequences whose index is ``pad_slot_id`` are
            skipped: no state read or written, no output row written (``pad_slot_id`` means nothing
            without cache_indices).
        has_initial_state: ``[batch]`` bool (None: every sequence starts from zeros).
        out: optional ``[T, h, p]`` destination in x's dtype.
        metadata: the step's :class:`~triton_kernels.MambaVarlenMeta` (offsets, slots and flags read and
            checked once per step, for every layer) in place of query_start_loc, cache_indices,
            has_initial_state and pad_slot_id: then nothing is read back here in eager mode.

    Returns ``out`` (a new tensor when not given: zeros in the rows of pad sequences). Reads
    query_start_loc, cache_indices and has_initial_state on the host (one sync on a GPU).

    Example:
        >>> x = torch.randn(10, 4, 16); dt = torch.rand(10, 4); A = -torch.rand(4)
        >>> B = torch.randn(10, 1, 8); states = torch.zeros(3, 4, 16, 8)
        >>> qsl = torch.tensor([0, 3, 10], dtype=torch.int32)
        >>> mamba_chunk_scan_varlen(x, states, dt, A, B, B, 64, query_start_loc=qsl,
        ...                         cache_indices=torch.tensor([2, 0])).shape
        torch.Size([10, 4, 16])
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    if metadata is not None:
        query_start_loc, cache_indices, has_initial_state, pad_slot_id = varlen_arguments(
            metadata, (query_start_loc, cache_indices, has_initial_state), x.shape[0], "ssm_states", ssm_states)
    if query_start_loc is None:
        query_start_loc = torch.tensor([0, x.shape[0]], dtype=torch.int32, device=x.device)
    batch = check_query_start_loc(query_start_loc, x.device)
    cache_indices = check_index("cache_indices", cache_indices, batch, x.device)  # (longer: vLLM's padding)
    has_initial_state = check_index("has_initial_state", has_initial_state, batch, x.device, (torch.bool,))
    _check_varlen(x, ssm_states, dt, A, B, C, D, z, dt_bias, query_start_loc, cache_indices, has_initial_state)
    _check_chunk_size(chunk_size)
    dt_limit = _check_dt_limit(dt_limit)
    pad_slot_id = pad_slot_of(cache_indices, check_pad_slot_id(pad_slot_id))
    inputs = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias}
    check_distinct_rows("ssm_states", ssm_states)
    check_no_overlap("ssm_states", ssm_states, inputs)
    if out is None:
        out = torch.zeros_like(x) if cache_indices is not None else _alloc.empty(x.shape, x.dtype, x.device)
    else:
        check_tensor("out", out, ndim=3, dtypes=(x.dtype,), device=x.device)
        check_shape("out", out, x.shape)
        check_no_overlap("out", out, {**inputs, "ssm_states": ssm_states})
    _chunk_scan_varlen_op(
        out, ssm_states, [x, dt, A, B, C, D, z, dt_bias, query_start_loc, cache_indices, has_initial_state],
        bool(dt_softplus), *dt_limit, chunk_size, pad_slot_id, None if metadata is None else metadata.host())
    return out

