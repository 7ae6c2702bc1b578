"""Mamba-2 SSD benchmarks (``triton_kernels/mamba2/ssd.py``): ``mamba_chunk_scan_combined`` forward
(batched), its training step (forward + backward: gradients of x, dt, A, B, C, D, dt_bias and a gradient
flowing in through the final states), and ``mamba_chunk_scan_varlen`` (packed, random initial states in a
permuted cache). The decode step is ``bench/bench_mamba2_decode.py``, the gated norm
``bench/bench_mamba2_norm.py``.

Baselines: HF transformers' torch chunked path (``modeling_mamba2.mamba2_chunk_scan``, what a Mamba2Mixer
runs and trains with without mamba_ssm; autograd through it for the training rows), and on a GPU
torch.compile (of our torch core forward, of HF's path for training), our Mamba-1 selective scan at the
same state size (forward: ``h p`` channels of state ``n``, B and C shared by the channels of a group as the
heads share them), and mamba_ssm's Triton ``mamba_chunk_scan_combined`` when it is importable.

Cost by formula: forward bytes = x, z and out (``3 T h p``), dt (``T h``), B and C (``2 T g n``) in the
input dtype, plus the fp32 states read and written; FLOPs of the chunked form with chunk ``L``:
``2 T L (g n + h p)`` for the intra-chunk scores and their product with x, plus ``4 T h p n`` for the
state in and out. Training bytes = the forward's (x, out, dt, B, C) plus the backward's reads (x, dt, B,
C, dout) and writes (dx, ddt, dB, dC) in the input dtype, plus the fp32 final state and its gradient;
FLOPs = 3x the forward's (the backward does about twice the forward's matmuls). On CUDA each row also
reports the peak memory it allocates above its inputs (``extra["peak_mib"]``).
"""

from __future__ import annotations

import importlib.util
import math

import torch

from bench.harness import Context, Row
from triton_kernels import mamba_chunk_scan_combined, mamba_chunk_scan_varlen, selective_scan_fn, use_backend
from triton_kernels.registry import MAMBA_CHUNK_SCAN

FAMILY = "mamba2"
VARLEN_LENGTHS_GPU = (3000, 2048, 1500, 1024, 512, 100, 7, 1)  # 8192 tokens
VARLEN_LENGTHS_CPU = (1000, 700, 300, 47, 1)  # 2048 tokens
VARLEN_LENGTHS_CPU_QUICK = (500, 350, 150, 23, 1)  # 1024 tokens
TRAIN_LEAVES = ("x", "dt", "A", "B", "C", "D", "dt_bias")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _inputs(b: int, seqlen: int, h: int, p: int, g: int, n: int, dtype: torch.dtype, device) -> dict:
    """One batched call's tensors: x, z ``[b, l, h, p]``, dt ``[b, l, h]``, B, C ``[b, l, g, n]``,
    A, D, dt_bias ``[h]`` (fp32)."""
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    return dict(x=rnd(b, seqlen, h, p), dt=rnd(b, seqlen, h, scale=0.5), A=-(torch.rand(h, device=device) + 0.05),
                B=rnd(b, seqlen, g, n), C=rnd(b, seqlen, g, n), D=torch.randn(h, device=device),
                z=rnd(b, seqlen, h, p), dt_bias=torch.randn(h, device=device) * 0.5)


def _cost(tokens: int, h: int, p: int, g: int, n: int, chunk: int, elt: int, states: int) -> tuple[float, float]:
    nbytes = elt * tokens * (3 * h * p + h + 2 * g * n) + 2 * 4 * states * h * p * n
    flops = 2 * tokens * chunk * (g * n + h * p) + 4 * tokens * h * p * n
    return float(nbytes), float(flops)


def _row(ctx: Context, case: str, impl: str, fn, sets: list, nbytes: float, flops: float) -> Row:
    return ctx.row(FAMILY, case, impl, fn, sets, nbytes, flops, peak_memory=True)


def _ours_rows(ctx: Context, case: str, dtype: torch.dtype, fn, sets: list, nbytes: float, flops: float) -> list[Row]:
    """``ours[<backend>]`` rows of ``fn`` for each backend :meth:`Context.our_backends` times (with
    FLOPs and peak memory, which :meth:`Context.ours_rows` does not record)."""
    def under(backend: str):
        def call(a: dict):
            with use_backend(backend):
                return fn(a)

        return call

    return [_row(ctx, case, f"ours[{backend}]", under(backend), sets, nbytes, flops)
            for backend in ctx.our_backends(MAMBA_CHUNK_SCAN, [dtype])]


def _combined_kwargs(a: dict, chunk: int) -> dict:
    return dict(chunk_size=chunk, D=a["D"], z=a["z"], dt_bias=a["dt_bias"], dt_softplus=True,
                return_final_states=True)


def _hf(chunk: int):
    """transformers' torch chunked path (what Mamba2Mixer runs without mamba_ssm)."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    return lambda a: mamba2_chunk_scan(a["x"], a["dt"], a["A"], a["B"], a["C"], chunk, D=a["D"],
                                       dt_bias=a["dt_bias"], dt_softplus=True, return_final_states=True)


def _mamba1_args(a: dict) -> dict:
    """``selective_scan_fn`` arguments for the same problem as Mamba-1: ``h p`` channels of state
    ``n`` (A and dt repeated per channel of a head; B, C ``[b, g, n, l]``)."""
    b, seqlen, h, p = a["x"].shape
    return dict(u=a["x"].reshape(b, seqlen, h * p).transpose(1, 2),
                delta=a["dt"].repeat_interleave(p, dim=2).transpose(1, 2),
                A=a["A"].repeat_interleave(p)[:, None].expand(h * p, a["B"].shape[-1]),
                B=a["B"].permute(0, 2, 3, 1), C=a["C"].permute(0, 2, 3, 1), delta_softplus=True)


def _compiled_reference(b: int, seqlen: int, chunk: int, device: torch.device):
    """torch.compile of our torch core on the packed layout (one sequence per batch row)."""
    # A fresh dynamo cache per case: the core specializes on the host offsets, and the cases would
    # otherwise pass dynamo's recompile limit and run eager unannounced.
    torch.compiler.reset()
    core = torch.compile(MAMBA_CHUNK_SCAN.reference_fn())
    starts = [i * seqlen for i in range(b + 1)]
    index = torch.arange(b, device=device)

    def call(a: dict) -> torch.Tensor:
        x, dt, B, C, z = (a[k].flatten(0, 1) for k in ("x", "dt", "B", "C", "z"))
        out = torch.empty_like(x)
        final = torch.empty(b, *x.shape[1:], B.shape[-1], device=device)
        core(out, x, dt, a["A"], B, C, a["D"], z, a["dt_bias"], True, (0.0, math.inf), starts, None, None, index,
             final, index, chunk)
        return out

    return call


def _batched_rows(ctx: Context, b: int, seqlen: int, h: int, p: int, g: int, n: int, chunk: int,
                  dtype: torch.dtype) -> list[Row]:
    sets = ctx.input_sets(lambda: _inputs(b, seqlen, h, p, g, n, dtype, ctx.device))
    case = f"ssd-b{b}-L{seqlen}-h{h}-p{p}-g{g}-n{n}-c{chunk}-{_name(dtype)}"
    cost = _cost(b * seqlen, h, p, g, n, chunk, sets[0]["x"].element_size(), states=b)

    def ours(a: dict):
        return mamba_chunk_scan_combined(a["x"], a["dt"], a["A"], a["B"], a["C"], **_combined_kwargs(a, chunk))

    rows = _ours_rows(ctx, case, dtype, ours, sets, *cost)
    rows.append(_row(ctx, case, "HF transformers torch chunked", _hf(chunk), sets, *cost))
    if ctx.device.type != "cuda":
        return rows
    rows.append(_row(ctx, case, "torch.compile(reference)", _compiled_reference(b, seqlen, chunk, ctx.device), sets,
                     *cost))
    rows.append(_row(ctx, case, "Mamba-1 scan, same state (ours)", lambda a: selective_scan_fn(**a),
                     [_mamba1_args(a) for a in sets], *cost))
    if importlib.util.find_spec("mamba_ssm") is not None:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as mamba_ssm_scan

        rows.append(_row(ctx, case, "mamba_ssm triton",
                         lambda a: mamba_ssm_scan(a["x"], a["dt"], a["A"], a["B"], a["C"],
                                                  **_combined_kwargs(a, chunk)), sets, *cost))
    return rows


def _varlen_inputs(lengths: tuple[int, ...], h: int, p: int, g: int, n: int, dtype: torch.dtype, device) -> dict:
    """``mamba_chunk_scan_varlen`` keyword arguments: the sequences packed along T, a ``[2 batch]``
    fp32 state cache of which a random half is read (every sequence has an initial state) and written."""
    batch = len(lengths)
    a = {k: v[0] if k in ("x", "dt", "B", "C", "z") else v
         for k, v in _inputs(1, sum(lengths), h, p, g, n, dtype, device).items()}
    offsets = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    return dict(a, ssm_states=torch.randn(2 * batch, h, p, n, device=device), dt_softplus=True,
                query_start_loc=offsets, cache_indices=torch.randperm(2 * batch, device=device)[:batch],
                has_initial_state=torch.ones(batch, dtype=torch.bool, device=device))


def _varlen_rows(ctx: Context, lengths: tuple[int, ...], h: int, p: int, g: int, n: int, chunk: int,
                 dtype: torch.dtype) -> list[Row]:
    total, batch = sum(lengths), len(lengths)
    sets = ctx.input_sets(lambda: _varlen_inputs(lengths, h, p, g, n, dtype, ctx.device))
    case = f"ssd-varlen-T{total}-{batch}seqs-h{h}-p{p}-g{g}-n{n}-{_name(dtype)}"
    cost = _cost(total, h, p, g, n, chunk, sets[0]["x"].element_size(), states=batch)
    return _ours_rows(ctx, case, dtype, lambda a: mamba_chunk_scan_varlen(chunk_size=chunk, **a), sets, *cost)


def _train_inputs(b: int, seqlen: int, h: int, p: int, g: int, n: int, dtype: torch.dtype, device) -> dict:
    """:func:`_inputs` (no z) with the leaves requiring grad, plus the incoming gradients: dout
    ``[b, l, h, p]`` and dfinal ``[b, h, p, n]`` (fp32)."""
    a = _inputs(b, seqlen, h, p, g, n, dtype, device)
    del a["z"]
    for k in TRAIN_LEAVES:
        a[k].requires_grad_(True)
    return dict(a, dout=torch.randn_like(a["x"]), dfinal=torch.randn(b, h, p, n, device=device))


def _train_cost(tokens: int, h: int, p: int, g: int, n: int, chunk: int, elt: int, b: int) -> tuple[float, float]:
    nbytes = elt * tokens * (5 * h * p + 4 * h + 8 * g * n) + 2 * 4 * b * h * p * n
    return float(nbytes), 3 * _cost(tokens, h, p, g, n, chunk, elt, 0)[1]


def _train_step(scan, chunk: int):
    """One forward + backward through ``scan`` (mamba_ssm's signature) on a :func:`_train_inputs` set."""
    def fn(a: dict):
        out, final = scan(a["x"], a["dt"], a["A"], a["B"], a["C"], chunk, D=a["D"], dt_bias=a["dt_bias"],
                          dt_softplus=True, return_final_states=True)
        return torch.autograd.grad((out, final), [a[k] for k in TRAIN_LEAVES], (a["dout"], a["dfinal"]))

    return fn


def _hf_scan(*args, **kwargs):
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    return mamba2_chunk_scan(*args, **kwargs)


def _train_rows(ctx: Context, b: int, seqlen: int, h: int, p: int, g: int, n: int, chunk: int,
                dtype: torch.dtype) -> list[Row]:
    sets = ctx.input_sets(lambda: _train_inputs(b, seqlen, h, p, g, n, dtype, ctx.device))
    case = f"ssd-fwd+bwd-b{b}-L{seqlen}-h{h}-p{p}-g{g}-n{n}-c{chunk}-{_name(dtype)}"
    cost = _train_cost(b * seqlen, h, p, g, n, chunk, sets[0]["x"].element_size(), b)
    rows = _ours_rows(ctx, case, dtype, _train_step(mamba_chunk_scan_combined, chunk), sets, *cost)
    baselines = [("HF transformers torch chunked (autograd)", _train_step(_hf_scan, chunk))]
    if ctx.device.type == "cuda":
        baselines.append(("torch.compile(HF torch chunked)", _train_step(torch.compile(_hf_scan), chunk)))
        if importlib.util.find_spec("mamba_ssm") is not None:
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as mamba_ssm_scan

            baselines.append(("mamba_ssm triton", _train_step(mamba_ssm_scan, chunk)))
    return rows + [_row(ctx, case, impl, fn, sets, *cost) for impl, fn in baselines]


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    if ctx.device.type == "cuda":
        bf16 = torch.bfloat16
        shapes = [(1, 4096, 8)] if ctx.quick else [(b, seqlen, g) for b, seqlen in ((1, 2048), (1, 8192), (4, 4096))
                                                   for g in (1, 8)]
        for b, seqlen, g in shapes:
            rows += _batched_rows(ctx, b, seqlen, 64, 64, g, 128, 256, bf16)
        for b, seqlen, g in shapes:
            rows += _train_rows(ctx, b, seqlen, 64, 64, g, 128, 256, bf16)
        rows += _varlen_rows(ctx, VARLEN_LENGTHS_GPU, 64, 64, 8, 128, 256, bf16)
    else:
        seqlen = 1024 if ctx.quick else 2048
        rows += _batched_rows(ctx, 1, seqlen, 32, 64, 1, 64, 256, torch.float32)
        rows += _train_rows(ctx, 1, seqlen, 32, 64, 1, 64, 256, torch.float32)
        rows += _varlen_rows(ctx, VARLEN_LENGTHS_CPU_QUICK if ctx.quick else VARLEN_LENGTHS_CPU, 32, 64, 1, 64, 256,
                             torch.float32)
    return rows
