"""Mamba causal-conv benchmarks (``triton_kernels/mamba/causal_conv1d.py``): ``causal_conv1d_fn``
over whole sequences and the decode step ``causal_conv1d_update``.

Bytes by formula (what the op must move at least):
    conv fn: x read and out written (``2 B D L``) + weight and bias.
    conv update: x read, out written (``2 B D``) + the conv state read and written (``2 B D (W-1)``).
Baselines: transformers' Mamba torch paths (what a user without kernels runs) and, on a GPU,
``torch.compile`` of our reference; on a GPU the update rows are also timed as CUDA-graph replays
(how vLLM runs decode).

Forward + backward (``fwdbwd-`` cases): ``torch.autograd.grad`` of ``silu(conv(x))`` against a
random ``dout`` for x, weight and bias. Bytes: the forward's x read and out written, then dout and x
read (the backward recomputes the pre-activation) and dx written: ``5 B D L`` elements + weight and
bias. Baselines: autograd through HF's ``nn.Conv1d(padding=W-1)`` + silu and, on a GPU, through
``torch.compile`` of our reference. On CUDA each row reports the peak memory one call allocates
above its inputs (``extra["peak_mib"]``).
"""

from __future__ import annotations

import torch

from bench.harness import Context, Row
from triton_kernels import use_backend
from triton_kernels.mamba.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from triton_kernels.mamba.ops_torch import causal_conv1d_fn_ref
from triton_kernels.registry import CAUSAL_CONV1D, CAUSAL_CONV1D_UPDATE

FAMILY = "mamba_conv"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _conv_fn_rows(ctx: Context, batch: int, dim: int, length: int, dtype: torch.dtype) -> list[Row]:
    dev = ctx.device

    def make() -> dict:
        conv = torch.nn.Conv1d(dim, dim, 4, groups=dim, padding=3, device=dev, dtype=dtype).requires_grad_(False)
        x = torch.randn(batch, dim, length, device=dev).to(dtype)
        return dict(x=x, conv=conv, weight=conv.weight.squeeze(1), bias=conv.bias)

    sets = ctx.input_sets(make)
    elt = sets[0]["x"].element_size()
    nbytes = 2 * batch * dim * length * elt + 5 * dim * elt
    case = f"conv-fn-B{batch}-D{dim}-L{length}-W4-{_name(dtype)}"
    rows = ctx.ours_rows(FAMILY, case, CAUSAL_CONV1D, [dtype],
                         lambda s: causal_conv1d_fn(s["x"], s["weight"], s["bias"], "silu"), sets, nbytes)
    rows.append(ctx.row(FAMILY, case, "HF nn.Conv1d(padding=W-1)+silu",
                        lambda s: torch.nn.functional.silu(s["conv"](s["x"])[..., :length]), sets, nbytes))
    if ctx.device.type == "cuda":
        compiled = torch.compile(causal_conv1d_fn_ref)
        rows.append(ctx.row(FAMILY, case, "torch.compile(reference)",
                            lambda s: compiled(s["x"], s["weight"], s["bias"], True), sets, nbytes))
    return rows


def _train_rows(ctx: Context, batch: int, dim: int, length: int, dtype: torch.dtype) -> list[Row]:
    dev = ctx.device

    def make() -> dict:
        conv = torch.nn.Conv1d(dim, dim, 4, groups=dim, padding=3, device=dev, dtype=dtype)
        return dict(x=torch.randn(batch, dim, length, device=dev).to(dtype).requires_grad_(), conv=conv,
                    weight=conv.weight.detach().squeeze(1).requires_grad_(), bias=conv.bias.detach().requires_grad_(),
                    dout=torch.randn(batch, dim, length, device=dev).to(dtype))

    def train(conv_silu, params):
        return lambda s: torch.autograd.grad(conv_silu(s), [s["x"], *params(s)], s["dout"])

    def ours(backend):
        def conv_silu(s):
            with use_backend(backend):
                return causal_conv1d_fn(s["x"], s["weight"], s["bias"], "silu")
        return conv_silu

    sets = ctx.input_sets(make)
    elt = sets[0]["x"].element_size()
    nbytes = 5 * batch * dim * length * elt + 10 * dim * elt
    case = f"fwdbwd-conv-fn-B{batch}-D{dim}-L{length}-W4-{_name(dtype)}"
    impls = [(f"ours[{backend}]", train(ours(backend), lambda s: [s["weight"], s["bias"]]))
             for backend in ctx.our_backends(CAUSAL_CONV1D, [dtype])]
    impls.append(("HF nn.Conv1d(padding=W-1)+silu", train(
        lambda s: torch.nn.functional.silu(s["conv"](s["x"])[..., :length]), lambda s: [s["conv"].weight,
                                                                                        s["conv"].bias])))
    if ctx.device.type == "cuda":
        compiled = torch.compile(causal_conv1d_fn_ref)
        impls.append(("torch.compile(reference)", train(lambda s: compiled(s["x"], s["weight"], s["bias"], True)[0],
                                                        lambda s: [s["weight"], s["bias"]])))
    return [ctx.row(FAMILY, case, impl, fn, sets, nbytes, peak_memory=True) for impl, fn in impls]


def _conv_update_rows(ctx: Context, batch: int, dim: int, dtype: torch.dtype) -> list[Row]:
    from transformers.models.mamba.modeling_mamba import causal_conv1d_update as hf_update

    dev = ctx.device

    def make() -> dict:
        return dict(x=torch.randn(batch, dim, device=dev).to(dtype), weight=torch.randn(dim, 4, device=dev).to(dtype),
                    bias=torch.randn(dim, device=dev).to(dtype),
                    state=torch.randn(2 * batch, dim, 3, device=dev).to(dtype),
                    slots=torch.randperm(2 * batch, device=dev)[:batch].to(torch.int32),
                    hf_state=torch.randn(batch, dim, 4, device=dev).to(dtype))  # HF keeps W columns

    sets = ctx.input_sets(make)
    elt = sets[0]["x"].element_size()
    nbytes = 2 * batch * dim * elt + 2 * batch * dim * 3 * elt + 5 * dim * elt
    case = f"conv-update-B{batch}-D{dim}-W4-{_name(dtype)}"
    rows = ctx.ours_rows(
        FAMILY, case, CAUSAL_CONV1D_UPDATE, [dtype],
        lambda s: causal_conv1d_update(s["x"], s["state"], s["weight"], s["bias"], "silu",
                                       conv_state_indices=s["slots"]), sets, nbytes,
        graphs=True)
    rows.append(ctx.row(FAMILY, case, "HF causal_conv1d_update",
                        lambda s: hf_update(s["x"][..., None], s["hf_state"], s["weight"], s["bias"], "silu"), sets,
                        nbytes))
    return rows


def run(ctx: Context) -> list[Row]:
    gpu = ctx.device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    rows: list[Row] = []
    if gpu:
        for batch in (1, 4) if ctx.quick else (1, 2, 4):
            rows += _conv_fn_rows(ctx, batch, 4096, 2048, dtype)
        rows += _train_rows(ctx, 2, 4096, 2048, dtype)
    else:
        rows += _conv_fn_rows(ctx, 1, 1024, 512, dtype)
        rows += _train_rows(ctx, 1, 1024, 512, dtype)
    rows += _conv_update_rows(ctx, 64, 4096, dtype)
    return rows
