"""Mamba-2 gated RMSNorm benchmarks: ``rms_norm_gated`` (``triton_kernels/mamba2/rms_norm_gated.py``), the
norm that ends every Mamba-2 block, in HF's order ``rmsnorm(x * silu(z)) * weight`` per group.

Bytes by formula (what the op must move at least): x and z read, out written (``3 M H`` elements)
+ weight (``H``). Baselines: transformers' ``MambaRMSNormGated`` (what a user without kernels runs)
and, on a GPU, ``torch.compile`` of our reference.
"""

from __future__ import annotations

import torch

from bench.harness import Context, Row
from triton_kernels import rms_norm_gated
from triton_kernels.registry import RMS_NORM_GATED

FAMILY = "mamba2_norm"
EPS = 1e-5


def _inputs(rows: int, hidden: int, dtype: torch.dtype, dev: torch.device) -> dict:
    return dict(x=torch.randn(rows, hidden, device=dev).to(dtype), z=torch.randn(rows, hidden, device=dev).to(dtype))


def _case_rows(ctx: Context, rows: int, hidden: int, groups: int, dtype: torch.dtype) -> list[Row]:
    from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated

    group_size = hidden // groups
    hf = MambaRMSNormGated(hidden, group_size=group_size, eps=EPS).to(device=ctx.device, dtype=dtype)
    weight = hf.requires_grad_(False).weight.uniform_(0.5, 1.5)  # no autograd graph; not all ones
    sets = ctx.input_sets(lambda: _inputs(rows, hidden, dtype, ctx.device))
    nbytes = 3 * rows * hidden * sets[0]["x"].element_size() + hidden * weight.element_size()
    case = f"rmsnorm-gated-M{rows}-H{hidden}-G{groups}-{str(dtype).removeprefix('torch.')}"
    out = ctx.ours_rows(FAMILY, case, RMS_NORM_GATED, [dtype],
                        lambda s: rms_norm_gated(s["x"], weight, s["z"], EPS, group_size, False), sets, nbytes)
    out.append(ctx.row(FAMILY, case, "HF MambaRMSNormGated", lambda s: hf(s["x"], s["z"]), sets, nbytes))
    if ctx.device.type == "cuda":
        compiled = torch.compile(RMS_NORM_GATED.reference_fn())
        out.append(ctx.row(FAMILY, case, "torch.compile(reference)",
                           lambda s: compiled(s["x"], weight, s["z"], EPS, group_size, False), sets, nbytes))
    return out


def run(ctx: Context) -> list[Row]:
    if ctx.device.type != "cuda":
        return _case_rows(ctx, 1024, 2048, 1, torch.float32)
    shapes = [(16384, 8192, 1)] if ctx.quick else [(m, h, 1) for m in (4096, 16384) for h in (4096, 8192)] + [
        (16384, 8192, 8)]
    return [row for m, h, g in shapes for row in _case_rows(ctx, m, h, g, torch.bfloat16)]
