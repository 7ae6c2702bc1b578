"""Mamba decode and conv benchmarks: ``selective_state_update``, ``causal_conv1d_fn`` and
``causal_conv1d_update``. ``bench/bench_mamba.py`` adds these rows to the ``mamba`` family.

Bytes by formula (what the op must move at least):
    state update: the gathered state read and written (``2 B D N`` in the state dtype) + A (``D N``
        fp32) + x, dt, z read and out written (``4 B D``) + B, C (``2 B N``) + D, dt_bias.
    conv fn: x read and out written (``2 B D L``) + weight and bias.
    conv update: x read, out written (``2 B D``) + the conv state read and written (``2 B D (W-1)``).
Baselines: transformers' Mamba torch paths (what a user without kernels runs) and, on a GPU,
``torch.compile`` of our reference; on a GPU our decode rows are also timed as CUDA-graph replays
(how vLLM runs decode), which skips the eager path's one index-validation sync.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.harness import Context, Row
from triton_kernels import use_backend
from triton_kernels.mamba.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from triton_kernels.mamba.conv_reference import causal_conv1d_fn_ref, selective_state_update_ref
from triton_kernels.mamba.state_update import selective_state_update

FAMILY = "mamba"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ours(ctx: Context) -> list[tuple[str, str | None]]:
    """``(impl name, backend)`` of our rows: Triton on a GPU, the torch reference on a CPU."""
    return [("ours[triton]", "triton")] if ctx.device.type == "cuda" else [("ours[torch]", "torch")]


def _with_backend(backend: str, fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with use_backend(backend):
            return fn()

    return call


def _graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once in a CUDA graph; the returned callable replays it."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _timed(
    ctx: Context, case: str, impls: list[tuple[str, Callable[[], object]]], nbytes: float
) -> list[Row]:
    rows = []
    for impl, fn in impls:
        rows.append(ctx.row(FAMILY, case, impl, fn, nbytes))
        if ctx.device.type == "cuda" and impl.startswith("ours"):
            rows.append(ctx.row(FAMILY, case, f"{impl} cuda-graph", _graphed(fn), nbytes))
    return rows


def _state_update_rows(ctx: Context, batch: int, dim: int, dstate: int, dtype: torch.dtype) -> list[Row]:
    from transformers.models.mamba.modeling_mamba import mamba_selective_state_update

    dev = ctx.device

    def rnd(*shape):
        return torch.randn(*shape, device=dev).to(dtype)

    state = torch.randn(2 * batch, dim, dstate, device=dev)  # fp32 state, rows gathered by slot
    slots = torch.randperm(2 * batch, device=dev)[:batch].to(torch.int32)
    x, dt, z, B, C = rnd(batch, dim), rnd(batch, dim), rnd(batch, dim), rnd(batch, dstate), rnd(batch, dstate)
    A, D, dt_bias = (
        -torch.rand(dim, dstate, device=dev),
        torch.randn(dim, device=dev),
        torch.randn(dim, device=dev),
    )
    out = torch.empty_like(x)
    hf_state = state[:batch].clone()  # HF has no slot indices: the batch's own states
    elt = x.element_size()
    nbytes = (
        2 * batch * dim * dstate * 4
        + dim * dstate * 4
        + 4 * batch * dim * elt
        + 2 * batch * dstate * elt
        + 2 * dim * 4
    )
    case = f"state-update-B{batch}-D{dim}-N{dstate}-{_name(dtype)}-fp32state"
    impls = [
        (
            name,
            _with_backend(
                b, lambda: selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True, slots, out=out)
            ),
        )
        for name, b in _ours(ctx)
    ]
    impls.append(
        (
            "HF mamba_selective_state_update",
            lambda: mamba_selective_state_update(
                hf_state, x, dt, A, B, C, D, dt_bias=dt_bias, dt_softplus=True, z=z
            ),
        )
    )
    if ctx.device.type == "cuda":
        compiled = torch.compile(selective_state_update_ref)
        h = (
            state.unsqueeze(1),
            x.unsqueeze(1),
            dt.unsqueeze(1),
            A.unsqueeze(0),
            B.unsqueeze(1),
            C.unsqueeze(1),
            D.unsqueeze(0),
            z.unsqueeze(1),
            dt_bias.unsqueeze(0),
            True,
            slots,
            -1,
            out.unsqueeze(1),
        )
        impls.append(("torch.compile(reference)", lambda: compiled(*h)))
    return _timed(ctx, case, impls, nbytes)


def _conv_fn_rows(ctx: Context, batch: int, dim: int, length: int, dtype: torch.dtype) -> list[Row]:
    dev = ctx.device
    x = torch.randn(batch, dim, length, device=dev).to(dtype)
    conv = torch.nn.Conv1d(dim, dim, 4, groups=dim, padding=3, device=dev, dtype=dtype)
    weight, bias = conv.weight.detach().squeeze(1), conv.bias.detach()
    nbytes = 2 * batch * dim * length * x.element_size() + 5 * dim * x.element_size()
    case = f"conv-fn-B{batch}-D{dim}-L{length}-W4-{_name(dtype)}"
    impls = [
        (name, _with_backend(b, lambda: causal_conv1d_fn(x, weight, bias, "silu"))) for name, b in _ours(ctx)
    ]
    impls.append(("HF nn.Conv1d(padding=W-1)+silu", lambda: torch.nn.functional.silu(conv(x)[..., :length])))
    if ctx.device.type == "cuda":
        compiled = torch.compile(causal_conv1d_fn_ref)
        impls.append(("torch.compile(reference)", lambda: compiled(x, weight, bias, True)))
    with torch.no_grad():
        return _timed(ctx, case, impls, nbytes)


def _conv_update_rows(ctx: Context, batch: int, dim: int, dtype: torch.dtype) -> list[Row]:
    from transformers.models.mamba.modeling_mamba import causal_conv1d_update as hf_update

    dev = ctx.device
    x = torch.randn(batch, dim, device=dev).to(dtype)
    weight, bias = torch.randn(dim, 4, device=dev).to(dtype), torch.randn(dim, device=dev).to(dtype)
    state = torch.randn(2 * batch, dim, 3, device=dev).to(dtype)
    slots = torch.randperm(2 * batch, device=dev)[:batch].to(torch.int32)
    hf_state = torch.randn(batch, dim, 4, device=dev).to(dtype)  # HF keeps W columns
    elt = x.element_size()
    nbytes = 2 * batch * dim * elt + 2 * batch * dim * 3 * elt + 5 * dim * elt
    case = f"conv-update-B{batch}-D{dim}-W4-{_name(dtype)}"
    impls = [
        (name, _with_backend(b, lambda: causal_conv1d_update(x, state, weight, bias, "silu", slots)))
        for name, b in _ours(ctx)
    ]
    impls.append(("HF causal_conv1d_update", lambda: hf_update(x[..., None], hf_state, weight, bias, "silu")))
    return _timed(ctx, case, impls, nbytes)


def conv_and_update_rows(ctx: Context) -> list[Row]:
    """Rows for the decode state update, the conv over whole sequences and the conv update."""
    gpu = ctx.device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    rows: list[Row] = []
    for batch in (1, 64) if ctx.quick else (1, 64, 256):
        rows += _state_update_rows(ctx, batch, 5120, 16, dtype)
    if gpu:
        for batch in (1, 4) if ctx.quick else (1, 2, 4):
            rows += _conv_fn_rows(ctx, batch, 4096, 2048, dtype)
    else:
        rows += _conv_fn_rows(ctx, 1, 1024, 512, dtype)
    rows += _conv_update_rows(ctx, 64, 4096, dtype)
    return rows
