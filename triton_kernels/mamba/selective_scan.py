"""Mamba selective scan (prefill): mamba_ssm's batched form and vLLM's packed form with a state cache.

The public ops, their validation, the destination-passing custom op and the autograd Function. The
backends: :mod:`.selective_scan_triton` (one Triton kernel for both forms; CUDA, or CPU under
``TRITON_INTERPRET=1``), :mod:`.selective_scan_cpu` (the C++ kernel, default on CPU) and
:mod:`.ops_torch` (torch); the backward is :mod:`.selective_scan_bwd` (with its ``_triton`` and ``_cpu``
backends).
"""

from __future__ import annotations

import torch

from triton_kernels import _alloc, _data_checks
from triton_kernels._checks import (
    FLOAT_DTYPES,
    GRAD_DTYPES,
    check_distinct_rows,
    check_no_overlap,
    check_optional,
    check_shape,
    check_tensor,
    unit_stride_last,
)
from triton_kernels._ops import destination_op
from triton_kernels.backend import interpreter_enabled
from triton_kernels.constants import PAD_SLOT_ID
from triton_kernels.mamba._args import (
    check_default_slots,
    check_index,
    check_pad_slot_id,
    check_query_start_loc,
    pad_slot_of,
)
from triton_kernels.mamba.metadata import MambaVarlenMeta, varlen_arguments
from triton_kernels.mamba.ops_torch import selective_scan_ref, selective_scan_varlen_ref
from triton_kernels.mamba.selective_scan_bwd import selective_scan_bwd
from triton_kernels.mamba.selective_scan_cpu import scan_fwd_cpu
from triton_kernels.mamba.selective_scan_triton import scan_fwd_triton
from triton_kernels.mamba.tiles import check_tile_states, tile_length, tile_states_shape
from triton_kernels.registry import SELECTIVE_SCAN


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
    values_checked: bool = False,
) -> None:
    """Destination-passing core of both public ops (metadata validated; ``values_checked``: the offsets
    and slots too, once per step by :class:`MambaVarlenMeta`, so nothing is read back). ``inputs`` is
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
        if not values_checked:
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
        scan_fwd_cpu(*args)
        if tile_states is not None:  # only under the interpreter (a CPU forward before a Triton backward)
            selective_scan_ref(u, delta, A, B, C, None, None, delta_bias, delta_softplus,
                               **_tile_states_kwargs(tile_states, A))
    else:
        groups = max(M.shape[1] if M.dim() == 4 else 1 for M in (B, C))
        scan_fwd_triton(*args, n_seq, groups, tile_states)


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
    the backward is ``ifk::selective_scan_bwd`` (:mod:`.selective_scan_bwd`)."""

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
    *,
    metadata: MambaVarlenMeta | None = None,
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
        metadata: the step's :class:`~triton_kernels.MambaVarlenMeta` in place of query_start_loc,
            cache_indices, has_initial_state and pad_slot_id (checked once per step: no host read here
            in eager mode).

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
    if metadata is not None:
        query_start_loc, cache_indices, has_initial_state, pad_slot_id = varlen_arguments(
            metadata, (query_start_loc, cache_indices, has_initial_state), num_tokens, "ssm_states", ssm_states)
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
                                      cache_indices, has_initial_state], bool(delta_softplus), pad_slot_id,
                   metadata is not None and not torch.compiler.is_compiling())
    return out
