"""Mamba-2 SSD training step: forward + backward of ``mamba_chunk_scan_combined`` (gradients of
x, dt, A, B, C, D, dt_bias and a gradient flowing in through the final states), beside the
forward-only rows of ``bench_mamba2.py``.

Baselines: autograd through HF transformers' torch chunked path (``mamba2_chunk_scan``, what a
Mamba2Mixer trains with without mamba_ssm), ``torch.compile`` of that path (GPU), and mamba_ssm's
Triton ``mamba_chunk_scan_combined`` forward + backward when importable (not on the CPU machine).

Cost by formula: bytes = the forward's (x, out in, dt, B, C) plus the backward's reads (x, dt,
B, C, dout) and writes (dx, ddt, dB, dC) in the input dtype, plus the fp32 final state and its
gradient; FLOPs = 3x the forward's chunked-form count (the backward does about twice the
forward's matmuls). On CUDA each row also reports its peak memory (``extra["peak_mib"]``).
"""

from __future__ import annotations

import importlib.util

import torch

from bench.harness import Context, Row
from triton_kernels import mamba_chunk_scan_combined
from triton_kernels.registry import MAMBA_CHUNK_SCAN

FAMILY = "mamba2_train"
LEAVES = ("x", "dt", "A", "B", "C", "D", "dt_bias")


def _make(b: int, seqlen: int, h: int, p: int, g: int, n: int, dtype: torch.dtype, device) -> dict:
    def rnd(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device=device) * scale).to(dt)

    a = dict(x=rnd(b, seqlen, h, p), dt=rnd(b, seqlen, h, scale=0.5), A=-(torch.rand(h, device=device) + 0.05),
             B=rnd(b, seqlen, g, n), C=rnd(b, seqlen, g, n), D=rnd(h, dt=torch.float32),
             dt_bias=rnd(h, scale=0.5, dt=torch.float32))
    for k in LEAVES:
        a[k].requires_grad_(True)
    a["dout"], a["dfinal"] = rnd(b, seqlen, h, p), rnd(b, h, p, n, dt=torch.float32)
    return a


def _cost(tokens: int, h: int, p: int, g: int, n: int, chunk: int, elt: int, b: int) -> tuple[float, float]:
    nbytes = elt * tokens * (5 * h * p + 4 * h + 8 * g * n) + 2 * 4 * b * h * p * n
    flops = 3 * (2 * tokens * chunk * (g * n + h * p) + 4 * tokens * h * p * n)
    return float(nbytes), float(flops)


def _step(scan, chunk: int):
    """One forward + backward through ``scan`` (mamba_ssm's signature) on an input set."""
    def fn(a: dict):
        out, final = scan(a["x"], a["dt"], a["A"], a["B"], a["C"], chunk, D=a["D"], dt_bias=a["dt_bias"],
                          dt_softplus=True, return_final_states=True)
        return torch.autograd.grad((out, final), [a[k] for k in LEAVES], (a["dout"], a["dfinal"]))
    return fn


def _hf_scan(*args, **kwargs):
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    return mamba2_chunk_scan(*args, **kwargs)


def _peak(ctx: Context, make_row) -> Row:
    if ctx.device.type != "cuda":
        return make_row()
    torch.cuda.reset_peak_memory_stats(ctx.device)
    base = torch.cuda.memory_allocated(ctx.device)
    row = make_row()
    row.extra["peak_mib"] = (torch.cuda.max_memory_allocated(ctx.device) - base) / 2**20
    return row


def _rows(ctx: Context, b: int, seqlen: int, h: int, p: int, g: int, n: int, chunk: int,
          dtype: torch.dtype) -> list[Row]:
    sets = ctx.input_sets(lambda: _make(b, seqlen, h, p, g, n, dtype, ctx.device))
    case = f"ssd-fwd+bwd-b{b}-L{seqlen}-h{h}-p{p}-g{g}-n{n}-c{chunk}-{str(dtype).removeprefix('torch.')}"
    nbytes, flops = _cost(b * seqlen, h, p, g, n, chunk, torch.tensor([], dtype=dtype).element_size(), b)
    rows = []
    for backend in ctx.our_backends(MAMBA_CHUNK_SCAN, [dtype]):
        def ours(a, backend=backend):
            from triton_kernels import use_backend

            with use_backend(backend):
                return _step(mamba_chunk_scan_combined, chunk)(a)
        rows.append(_peak(ctx, lambda ours=ours, backend=backend: ctx.row(
            FAMILY, case, f"ours[{backend}]", ours, sets, nbytes, flops)))
    baselines = [("HF transformers torch chunked (autograd)", _step(_hf_scan, chunk))]
    if ctx.device.type == "cuda":
        baselines.append(("torch.compile(HF torch chunked)", _step(torch.compile(_hf_scan), chunk)))
        if importlib.util.find_spec("mamba_ssm") is not None:
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as mamba_ssm_scan

            baselines.append(("mamba_ssm triton", _step(mamba_ssm_scan, chunk)))
    for impl, fn in baselines:
        rows.append(_peak(ctx, lambda impl=impl, fn=fn: ctx.row(FAMILY, case, impl, fn, sets, nbytes, flops)))
    return rows


def run(ctx: Context) -> list[Row]:
    if ctx.device.type != "cuda":
        return _rows(ctx, 1, 2048, 32, 64, 1, 64, 256, torch.float32)
    shapes = [(1, 4096, 8)] if ctx.quick else [(b, seqlen, g) for b, seqlen in ((1, 2048), (1, 8192), (4, 4096))
                                               for g in (1, 8)]
    return [row for b, seqlen, g in shapes for row in _rows(ctx, b, seqlen, 64, 64, g, 128, 256, torch.bfloat16)]
