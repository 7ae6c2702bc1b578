"""Mamba-2 decode-side benchmarks: the gated RMSNorm that ends every block (``rms_norm_gated``) and
the decode state update in its Mamba-2 form (``selective_state_update`` with heads, A expanded from
``[H]``: the tied per-head path).

Bytes by formula (what the op must move at least):
    rms_norm_gated: x and z read, out written (``3 M H`` elements) + weight (``H`` fp32).
    state update: the gathered state read and written (``2 B H P N`` in the state dtype) + x, z read
        and out written (``3 B H P``) + dt (``B H``) + B, C (``2 B G N``) + A, D, dt_bias (``3 H`` fp32).
Baselines: transformers' Mamba-2 torch paths (``MambaRMSNormGated``, ``mamba2_selective_state_update``:
what a user without kernels runs) and, on a GPU, ``torch.compile`` of our norm reference; on a GPU
our decode rows are also timed as CUDA-graph replays (how vLLM runs decode), which skips the eager
path's one index-validation sync.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.bench_mamba_conv import _graphed, _with_backend
from bench.harness import Context, Row
from triton_kernels import rms_norm_gated, selective_state_update
from triton_kernels.registry import RMS_NORM_GATED

FAMILY = "mamba2_decode"
HEAD_DIM, STATE_SIZE, GROUPS = 64, 128, 8  # Mamba-2 2.7B / Codestral-Mamba-like heads


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ours(ctx: Context) -> tuple[str, str]:
    """``(impl name, backend)``: Triton on a GPU, the torch reference on a CPU."""
    return ("ours[triton]", "triton") if ctx.device.type == "cuda" else ("ours[torch]", "torch")


def _rows(ctx: Context, case: str, impls: list[tuple[str, Callable[[], object]]], nbytes: float,
          graph: bool = False) -> list[Row]:
    rows = []
    with torch.no_grad():
        for impl, fn in impls:
            rows.append(ctx.row(FAMILY, case, impl, fn, nbytes))
            if graph and ctx.device.type == "cuda" and impl.startswith("ours"):
                rows.append(ctx.row(FAMILY, case, f"{impl} cuda-graph", _graphed(fn), nbytes))
    return rows


def _norm_rows(ctx: Context, rows: int, hidden: int, groups: int, dtype: torch.dtype) -> list[Row]:
    """The end of a Mamba-2 block: ``rmsnorm(y * silu(z)) * weight`` per group (HF's order)."""
    from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated

    dev = ctx.device
    x, z = (torch.randn(rows, hidden, device=dev).to(dtype) for _ in range(2))
    group_size = hidden // groups
    hf = MambaRMSNormGated(hidden, group_size=group_size, eps=1e-5).to(device=dev, dtype=dtype)
    weight = hf.weight.detach()
    nbytes = 3 * rows * hidden * x.element_size() + hidden * weight.element_size()
    case = f"rmsnorm-gated-M{rows}-H{hidden}-G{groups}-{_name(dtype)}"
    impl, backend = _ours(ctx)
    kw = dict(eps=1e-5, group_size=group_size, norm_before_gate=False)
    impls = [(impl, _with_backend(backend, lambda: rms_norm_gated(x, weight, z, **kw))),
             ("HF MambaRMSNormGated", lambda: hf(x, z))]
    if ctx.device.type == "cuda":
        compiled = torch.compile(RMS_NORM_GATED.reference_fn())
        impls.append(("torch.compile(reference)", lambda: compiled(x, weight, z, 1e-5, group_size, False)))
    return _rows(ctx, case, impls, nbytes)


def _decode_rows(ctx: Context, batch: int, heads: int, dtype: torch.dtype, state_dtype: torch.dtype) -> list[Row]:
    """One Mamba-2 decode step as HF's cache branch and vLLM build it (per-head A, dt, dt_bias, D)."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_selective_state_update

    dev, p, n = ctx.device, HEAD_DIM, STATE_SIZE

    def rnd(*shape):
        return torch.randn(*shape, device=dev).to(dtype)

    state = torch.randn(2 * batch, heads, p, n, device=dev).to(state_dtype)  # rows gathered by slot
    slots = torch.randperm(2 * batch, device=dev)[:batch].to(torch.int32)
    hf_state = state[:batch].clone()  # HF has no slot indices: the batch's own states
    x, z, out = rnd(batch, heads, p), rnd(batch, heads, p), rnd(batch, heads, p)
    dt = rnd(batch, heads)[..., None].expand(batch, heads, p)
    A = (-torch.rand(heads, device=dev) * 8)[:, None, None].expand(heads, p, n)
    D, dt_bias = (torch.randn(heads, device=dev)[:, None].expand(heads, p) for _ in range(2))
    B, C = rnd(batch, GROUPS, n), rnd(batch, GROUPS, n)
    elt = x.element_size()
    nbytes = (2 * batch * heads * p * n * state.element_size() + 3 * batch * heads * p * elt
              + batch * heads * elt + 2 * batch * GROUPS * n * elt + 3 * heads * 4)
    case = f"decode-B{batch}-H{heads}-P{p}-N{n}-G{GROUPS}-{_name(dtype)}-{_name(state_dtype)}state"
    impl, backend = _ours(ctx)
    impls = [
        (impl, _with_backend(backend, lambda: selective_state_update(
            state, x, dt, A, B, C, D, z, dt_bias, True, slots, out=out))),
        ("HF mamba2_selective_state_update", lambda: mamba2_selective_state_update(
            hf_state, x, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=True, z=z)),
    ]
    return _rows(ctx, case, impls, nbytes, graph=True)


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    if ctx.device.type == "cuda":
        norm_shapes = [(16384, 8192, 1)] if ctx.quick else [
            (m, h, 1) for m in (4096, 16384) for h in (4096, 8192)] + [(16384, 8192, 8)]
        for m, h, g in norm_shapes:
            rows += _norm_rows(ctx, m, h, g, torch.bfloat16)
        decode = [(1, 64), (256, 128)] if ctx.quick else [(b, h) for b in (1, 64, 256) for h in (64, 128)]
        for batch, heads in decode:
            rows += _decode_rows(ctx, batch, heads, torch.bfloat16, torch.bfloat16)
        rows += _decode_rows(ctx, 256, 128, torch.bfloat16, torch.float32)
    else:
        rows += _norm_rows(ctx, 1024, 2048, 1, torch.float32)
        for batch in (1, 16):
            rows += _decode_rows(ctx, batch, 16, torch.float32, torch.float32)
    return rows
