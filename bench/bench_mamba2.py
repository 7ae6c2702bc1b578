"""Mamba-2 SSD prefill benchmarks: ``mamba_chunk_scan_combined`` (batched) and
``mamba_chunk_scan_varlen`` (packed, random initial states in a permuted cache).

Baselines: HF transformers' torch chunked path (``modeling_mamba2.mamba2_chunk_scan``),
torch.compile of our torch core (GPU), our Mamba-1 selective scan at the same state size
(``h p`` channels of state ``n``), and mamba_ssm's Triton ``mamba_chunk_scan_combined`` when it
is importable (it is not installed on the CPU machine).

Cost by formula: bytes = x, z and out (``3 T h p``), dt (``T h``), B and C (``2 T g n``) in the
input dtype, plus the fp32 states read and written; FLOPs of the chunked form with chunk ``L``:
``2 T L (g n + h p)`` for the intra-chunk scores and their product with x, plus ``4 T h p n``
for the state in and out. On CUDA each row also reports the peak memory it allocates
(``extra["peak_mib"]``).
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch

from bench.harness import Context, Row
from triton_kernels import mamba_chunk_scan_combined, mamba_chunk_scan_varlen, selective_scan_fn, use_backend
from triton_kernels.mamba2.ssd_reference import ssd_core_torch

FAMILY = "mamba2"
VARLEN_LENGTHS_GPU = (3000, 2048, 1500, 1024, 512, 100, 7, 1)  # 8192 tokens
VARLEN_LENGTHS_CPU = (1000, 700, 300, 47, 1)  # 2048 tokens


def _inputs(b: int, seqlen: int, h: int, p: int, g: int, n: int, dtype: torch.dtype, device) -> dict:
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    return dict(x=rnd(b, seqlen, h, p), dt=rnd(b, seqlen, h, scale=0.5), A=-(torch.rand(h, device=device) + 0.05),
                B=rnd(b, seqlen, g, n), C=rnd(b, seqlen, g, n), D=torch.randn(h, device=device),
                z=rnd(b, seqlen, h, p), dt_bias=torch.randn(h, device=device) * 0.5)


def _cost(tokens: int, h: int, p: int, g: int, n: int, chunk: int, elt: int, states: int) -> tuple[float, float]:
    nbytes = elt * tokens * (3 * h * p + h + 2 * g * n) + 2 * 4 * states * h * p * n
    flops = 2 * tokens * chunk * (g * n + h * p) + 4 * tokens * h * p * n
    return float(nbytes), float(flops)


def _row(ctx: Context, case: str, impl: str, fn, nbytes: float, flops: float) -> Row:
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
        base = torch.cuda.memory_allocated(ctx.device)
    row = ctx.row(FAMILY, case, impl, fn, nbytes, flops)
    if ctx.device.type == "cuda":
        row.extra["peak_mib"] = (torch.cuda.max_memory_allocated(ctx.device) - base) / 2**20
    return row


def _with(backend: str, fn, *args, **kwargs):
    with use_backend(backend):
        return fn(*args, **kwargs)


def _hf(a: dict, chunk: int):
    """transformers' torch chunked path (what Mamba2Mixer runs without mamba_ssm)."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    return mamba2_chunk_scan(a["x"], a["dt"], a["A"], a["B"], a["C"], chunk, D=a["D"], dt_bias=a["dt_bias"],
                             dt_softplus=True, return_final_states=True)


def _mamba1_same_state(a: dict):
    """Our Mamba-1 scan over ``h p`` channels with state ``n`` (token-shared B, C of group 0)."""
    b, seqlen, h, p = a["x"].shape
    u = a["x"].reshape(b, seqlen, h * p).transpose(1, 2)
    delta = a["dt"].repeat_interleave(p, dim=2).transpose(1, 2)
    A = a["A"].repeat_interleave(p)[:, None].expand(h * p, a["B"].shape[-1])
    B, C = (M.permute(0, 2, 3, 1) for M in (a["B"], a["C"]))  # [b, g, n, l]
    return functools.partial(selective_scan_fn, u, delta, A, B, C, delta_softplus=True)


def _compiled_reference(a: dict, chunk: int):
    """torch.compile of our torch core on the packed layout (one sequence per batch row)."""
    b, seqlen, h, p = a["x"].shape
    n = a["B"].shape[-1]
    starts = [i * seqlen for i in range(b + 1)]
    packed = {k: a[k].reshape(b * seqlen, *a[k].shape[2:]) for k in ("x", "dt", "B", "C", "z")}
    out = torch.empty_like(packed["x"])
    final = torch.empty(b, h, p, n, device=out.device)
    index = torch.arange(b, device=out.device)
    core = torch.compile(ssd_core_torch)
    return lambda: core(out, packed["x"], packed["dt"], a["A"], packed["B"], packed["C"], a["D"], packed["z"],
                        a["dt_bias"], True, (0.0, math.inf), starts, None, None, index, final, index, chunk)


def _batched_rows(ctx: Context, b: int, seqlen: int, h: int, p: int, g: int, n: int, chunk: int,
                  dtype: torch.dtype) -> list[Row]:
    a = _inputs(b, seqlen, h, p, g, n, dtype, ctx.device)
    case = f"ssd-b{b}-L{seqlen}-h{h}-p{p}-g{g}-n{n}-c{chunk}-{str(dtype).removeprefix('torch.')}"
    nbytes, flops = _cost(b * seqlen, h, p, g, n, chunk, a["x"].element_size(), states=b)
    kw = dict(chunk_size=chunk, D=a["D"], z=a["z"], dt_bias=a["dt_bias"], dt_softplus=True, return_final_states=True)
    args = (a["x"], a["dt"], a["A"], a["B"], a["C"])
    impls = []
    if ctx.device.type == "cuda":
        impls.append(("ours[triton]", functools.partial(_with, "triton", mamba_chunk_scan_combined, *args, **kw)))
    impls.append(("ours[torch]", functools.partial(_with, "torch", mamba_chunk_scan_combined, *args, **kw)))
    impls.append(("HF transformers torch chunked", functools.partial(_hf, a, chunk)))
    if ctx.device.type == "cuda":
        impls.append(("torch.compile(reference)", _compiled_reference(a, chunk)))
        impls.append(("Mamba-1 scan, same state (ours)", _mamba1_same_state(a)))
        if importlib.util.find_spec("mamba_ssm") is not None:
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as mamba_ssm_scan

            impls.append(("mamba_ssm triton", functools.partial(mamba_ssm_scan, *args, **kw)))
    return [_row(ctx, case, impl, fn, nbytes, flops) for impl, fn in impls]


def _varlen_rows(ctx: Context, lengths: tuple[int, ...], h: int, p: int, g: int, n: int, chunk: int,
                 dtype: torch.dtype) -> list[Row]:
    total, batch = sum(lengths), len(lengths)
    a = {k: (v[0] if v.dim() > 1 and k != "D" else v) for k, v in _inputs(1, total, h, p, g, n, dtype,
                                                                           ctx.device).items()}
    states = torch.randn(2 * batch, h, p, n, device=ctx.device)
    kw = dict(D=a["D"], z=a["z"], dt_bias=a["dt_bias"], dt_softplus=True,
              query_start_loc=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                                           device=ctx.device),
              cache_indices=torch.randperm(2 * batch)[:batch].to(ctx.device),
              has_initial_state=torch.ones(batch, dtype=torch.bool, device=ctx.device))
    args = (a["x"], states, a["dt"], a["A"], a["B"], a["C"], chunk)
    case = f"ssd-varlen-T{total}-{batch}seqs-h{h}-p{p}-g{g}-n{n}-{str(dtype).removeprefix('torch.')}"
    nbytes, flops = _cost(total, h, p, g, n, chunk, a["x"].element_size(), states=batch)
    backends = ("triton", "torch") if ctx.device.type == "cuda" else ("torch",)
    return [_row(ctx, case, f"ours[{b}]", functools.partial(_with, b, mamba_chunk_scan_varlen, *args, **kw),
                 nbytes, flops) for b in backends]


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    if ctx.device.type == "cuda":
        bf16 = torch.bfloat16
        shapes = [(1, 4096, 8)] if ctx.quick else [(b, seqlen, g) for b, seqlen in ((1, 2048), (1, 8192), (4, 4096))
                                                   for g in (1, 8)]
        for b, seqlen, g in shapes:
            rows += _batched_rows(ctx, b, seqlen, 64, 64, g, 128, 256, bf16)
        rows += _varlen_rows(ctx, VARLEN_LENGTHS_GPU, 64, 64, 8, 128, 256, bf16)
    else:
        rows += _batched_rows(ctx, 1, 2048, 32, 64, 1, 64, 256, torch.float32)
        rows += _varlen_rows(ctx, VARLEN_LENGTHS_CPU, 32, 64, 1, 64, 256, torch.float32)
    return rows
