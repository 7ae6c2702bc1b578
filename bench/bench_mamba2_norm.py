"""Mamba-2 gated RMSNorm benchmarks: ``rms_norm_gated`` (``triton_kernels/mamba2/rms_norm_gated.py``), the
norm that ends every Mamba-2 block, in HF's order ``rmsnorm(x * silu(z)) * weight`` per group; forward
alone and forward + backward (training).

Bytes by formula (what the op must move at least): forward, x and z read, out written (``3 M H``
elements) + weight (``H``); forward + backward, that plus dy, x, z read and dx, dz written (``8 M H``
in all) + weight read twice and dweight written. Baselines: transformers' ``Mamba2RMSNormGated``
(5.24: ``MambaRMSNormGated``; what a user without kernels runs; autograd through it for the
backward) and, on a GPU, ``torch.compile`` of our reference. On CUDA every row reports the peak
memory one call allocates above its inputs (``extra["peak_mib"]``).
"""

from __future__ import annotations

import torch

from bench.harness import Context, Row
from triton_kernels import rms_norm_gated, use_backend
from triton_kernels.registry import RMS_NORM_GATED

FAMILY = "mamba2_norm"
EPS = 1e-5


def _inputs(rows: int, hidden: int, dtype: torch.dtype, dev: torch.device, train: bool = False) -> dict:
    """x, z (leaves that require grad when ``train``), and dy when ``train``."""
    def rnd() -> torch.Tensor:
        return torch.randn(rows, hidden, device=dev).to(dtype)

    if not train:
        return dict(x=rnd(), z=rnd())
    return dict(x=rnd().requires_grad_(), z=rnd().requires_grad_(), dy=rnd())


def _case_name(kind: str, rows: int, hidden: int, groups: int, dtype: torch.dtype) -> str:
    return f"rmsnorm-gated-{kind}M{rows}-H{hidden}-G{groups}-{str(dtype).removeprefix('torch.')}"


def _hf_norm(ctx: Context, hidden: int, group_size: int, dtype: torch.dtype, train: bool):
    from transformers.models.mamba2 import modeling_mamba2

    from pyiface.integrations.transformers import mamba2_gated_norm_class

    norm_class = mamba2_gated_norm_class(modeling_mamba2)
    hf = norm_class(hidden, group_size=group_size, eps=EPS).to(device=ctx.device, dtype=dtype)
    with torch.no_grad():
        hf.weight.uniform_(0.5, 1.5)  # not all ones
    return hf.requires_grad_(train)


def _ours(ctx: Context, dtype: torch.dtype, fn) -> list[tuple[str, object]]:
    """``("ours[<backend>]", fn under that backend)`` for each backend worth timing here."""
    impls = []
    for backend in ctx.our_backends(RMS_NORM_GATED, [dtype]):
        def call(s, backend=backend):
            with use_backend(backend):
                return fn(s)

        impls.append((f"ours[{backend}]", call))
    return impls


def _timed_rows(ctx: Context, case: str, impls, sets, nbytes: float) -> list[Row]:
    """One row per implementation; on CUDA with the peak memory of one call (``extra["peak_mib"]``)."""
    return [ctx.row(FAMILY, case, impl, fn, sets, nbytes, peak_memory=True) for impl, fn in impls]


def _case_rows(ctx: Context, rows: int, hidden: int, groups: int, dtype: torch.dtype) -> list[Row]:
    """Forward only."""
    group_size = hidden // groups
    hf = _hf_norm(ctx, hidden, group_size, dtype, train=False)
    weight = hf.weight
    sets = ctx.input_sets(lambda: _inputs(rows, hidden, dtype, ctx.device))
    nbytes = 3 * rows * hidden * sets[0]["x"].element_size() + hidden * weight.element_size()
    impls = _ours(ctx, dtype, lambda s: rms_norm_gated(s["x"], weight, s["z"], EPS, group_size, False))
    impls.append(("HF Mamba2RMSNormGated", lambda s: hf(s["x"], s["z"])))
    if ctx.device.type == "cuda":
        compiled = torch.compile(RMS_NORM_GATED.reference_fn())
        impls.append(("torch.compile(reference)", lambda s: compiled(s["x"], weight, s["z"], EPS, group_size, False)))
    return _timed_rows(ctx, _case_name("", rows, hidden, groups, dtype), impls, sets, nbytes)


def _train_rows(ctx: Context, rows: int, hidden: int, groups: int, dtype: torch.dtype) -> list[Row]:
    """Forward + backward: ``torch.autograd.grad`` of the output against dy, for x, z and weight (no
    accumulation into ``.grad``)."""
    group_size = hidden // groups
    hf = _hf_norm(ctx, hidden, group_size, dtype, train=True)
    weight = hf.weight
    sets = ctx.input_sets(lambda: _inputs(rows, hidden, dtype, ctx.device, train=True))
    nbytes = 8 * rows * hidden * sets[0]["x"].element_size() + 3 * hidden * weight.element_size()

    def train(norm):
        return lambda s: torch.autograd.grad(norm(s["x"], s["z"]), (s["x"], s["z"], weight), s["dy"])

    impls = _ours(ctx, dtype, train(lambda x, z: rms_norm_gated(x, weight, z, EPS, group_size, False)))
    impls.append(("HF Mamba2RMSNormGated", train(hf)))
    if ctx.device.type == "cuda":
        compiled = torch.compile(RMS_NORM_GATED.reference_fn())
        impls.append(("torch.compile(reference)", train(lambda x, z: compiled(x, weight, z, EPS, group_size, False))))
    return _timed_rows(ctx, _case_name("fwdbwd-", rows, hidden, groups, dtype), impls, sets, nbytes)


def run(ctx: Context) -> list[Row]:
    if ctx.device.type != "cuda":
        return _case_rows(ctx, 1024, 2048, 1, torch.float32) + _train_rows(ctx, 1024, 2048, 1, torch.float32)
    shapes = [(16384, 8192, 1)] if ctx.quick else [(m, h, 1) for m in (4096, 16384) for h in (4096, 8192)] + [
        (16384, 8192, 8)]
    train_shapes = [(16384, 4096, 1)] + ([] if ctx.quick else [(16384, 8192, 8)])
    return [row for m, h, g in shapes for row in _case_rows(ctx, m, h, g, torch.bfloat16)] + [
        row for m, h, g in train_shapes for row in _train_rows(ctx, m, h, g, torch.bfloat16)]
