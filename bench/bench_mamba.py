"""Mamba selective-scan benchmarks (``triton_kernels/mamba/selective_scan.py``): the prefill scan,
batched and packed varlen. The decode step is ``bench/bench_mamba_state_update.py``, the causal
conv ``bench/bench_mamba_conv.py``.

Scan cost by formula: bytes = u, delta, z read and out written (``4 B D L`` elements) + B, C
(``2 B G N L``) + A, D, bias (+ the states read and written for varlen); exponentials
``B D L N`` (one decay per state element and token, reported as Gexp/s in ``extra``); about 7
FLOPs per state element and token.

Forward + backward (``fwdbwd-`` cases): ``torch.autograd.grad`` of the output against a random
``dout`` for every input. Bytes add dout read and du, ddelta, dz written (``+4 B D L``, inputs read
again: ``+3 B D L + 2 B G N L``, dB, dC written ``+2 B G N L``); exponentials count the backward's
two per state element and token (the recomputed decay and the next token's). Baselines: autograd
through HF's sequential loop and, on a GPU, through ``torch.compile`` of our reference. On CUDA each
row reports the peak memory one call allocates above its inputs (``extra["peak_mib"]``).
"""

from __future__ import annotations

import functools

import torch

from bench.harness import Context, Row
from triton_kernels import selective_scan_fn, selective_scan_varlen, use_backend
from triton_kernels.mamba.ops_torch import selective_scan_ref
from triton_kernels.registry import SELECTIVE_SCAN

FAMILY = "mamba"
FLOPS_PER_STATE_TOKEN = 7
VARLEN_LENGTHS_GPU = (3000, 2048, 1500, 1024, 512, 100, 7, 1)  # sums to 8192
VARLEN_LENGTHS_CPU = (700, 200, 100, 23, 1)  # sums to 1024


def _backend(name: str, fn, *args, **kwargs):
    with use_backend(name):
        return fn(*args, **kwargs)


def _scan_inputs(bsz: int, dim: int, dstate: int, seqlen: int, dtype: torch.dtype, device) -> dict:
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    return dict(u=rnd(bsz, dim, seqlen), delta=rnd(bsz, dim, seqlen, scale=0.5),
                A=-torch.rand(dim, dstate, device=device) - 0.1, B=rnd(bsz, dstate, seqlen),
                C=rnd(bsz, dstate, seqlen), D=torch.randn(dim, device=device), z=rnd(bsz, dim, seqlen),
                delta_bias=torch.randn(dim, device=device) * 0.5)


def _scan_bytes(bsz: int, dim: int, dstate: int, tokens: int, elt: int, states: int = 0) -> float:
    return elt * (4 * bsz * dim * tokens + 2 * bsz * dstate * tokens) + 4 * (dim * dstate + 2 * dim) \
        + 2 * 4 * states * dim * dstate


def _row(ctx: Context, case: str, impl: str, fn, sets: list, nbytes: float, exps: float, **kw) -> Row:
    return ctx.row(FAMILY, case, impl, fn, sets, nbytes, flops=FLOPS_PER_STATE_TOKEN * exps,
                   rates={"gexp_per_s": exps / 1e9}, **kw)


def _hf_loop(a: dict):
    """transformers' MambaMixer slow path: the sequential scan in ``mamba_selective_scan``."""
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    return mamba_selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"],
                                delta_softplus=True)


def _batched_rows(ctx: Context, dim: int, dstate: int, seqlen: int, dtype: torch.dtype) -> list[Row]:
    sets = ctx.input_sets(lambda: _scan_inputs(1, dim, dstate, seqlen, dtype, ctx.device))
    case = f"scan-D{dim}-N{dstate}-L{seqlen}-{str(dtype).removeprefix('torch.')}"
    nbytes, exps = _scan_bytes(1, dim, dstate, seqlen, sets[0]["u"].element_size()), float(dim * seqlen * dstate)
    impls = [(f"ours[{b}]", functools.partial(_ours_batched, b)) for b in ctx.our_backends(SELECTIVE_SCAN, [dtype])]
    if ctx.device.type == "cuda":
        from bench.naive_scan import naive_selective_scan

        compiled = torch.compile(functools.partial(selective_scan_ref, chunk_size=256))
        impls += [("naive triton scan", lambda a: naive_selective_scan(**a)),
                  ("torch.compile(reference)", lambda a: compiled(**a, delta_softplus=True))]
    impls.append(("HF transformers loop", _hf_loop))
    return [_row(ctx, case, impl, fn, sets, nbytes, exps) for impl, fn in impls]


def _ours_batched(backend: str, a: dict):
    return _backend(backend, selective_scan_fn, **a, delta_softplus=True)


def _train_rows(ctx: Context, dim: int, dstate: int, seqlen: int, dtype: torch.dtype) -> list[Row]:
    """Forward + backward of the batched scan (softplus, D, z, delta_bias, B/C per token)."""
    def make() -> dict:
        a = {k: v.requires_grad_() for k, v in _scan_inputs(1, dim, dstate, seqlen, dtype, ctx.device).items()}
        return dict(args=a, dout=torch.randn(1, dim, seqlen, device=ctx.device, dtype=dtype))

    def train(scan):
        return lambda s: torch.autograd.grad(scan(s["args"]), list(s["args"].values()), s["dout"])

    sets = ctx.input_sets(make)
    elt = sets[0]["args"]["u"].element_size()
    case = f"fwdbwd-scan-D{dim}-N{dstate}-L{seqlen}-{str(dtype).removeprefix('torch.')}"
    nbytes = elt * (11 * dim * seqlen + 8 * dstate * seqlen) + 8 * (dim * dstate + 2 * dim)
    exps = 3.0 * dim * seqlen * dstate
    backends = ctx.our_backends(SELECTIVE_SCAN, [dtype])
    impls = [(f"ours[{b}]", train(functools.partial(_ours_batched, b))) for b in backends]
    if ctx.device.type == "cuda":
        compiled = torch.compile(functools.partial(selective_scan_ref, chunk_size=256))
        impls.append(("torch.compile(reference)", train(lambda a: compiled(**a, delta_softplus=True)[0])))
    impls.append(("HF transformers loop", train(_hf_loop)))
    return [_row(ctx, case, impl, fn, sets, nbytes, exps, peak_memory=True) for impl, fn in impls]


def _varlen_rows(ctx: Context, dim: int, dstate: int, lengths: tuple[int, ...],
                 dtype: torch.dtype) -> list[Row]:
    """Packed sequences of mixed lengths, random initial states in a permuted cache."""
    total, batch = sum(lengths), len(lengths)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist()))

    def make() -> dict:
        a = _scan_inputs(1, dim, dstate, total, dtype, ctx.device)
        packed = {k: (v[0] if k in ("u", "delta", "z", "B", "C") else v) for k, v in a.items()}
        packed["B"], packed["C"] = packed["B"][None], packed["C"][None]
        kw = dict(query_start_loc=offsets.to(ctx.device), delta_softplus=True,
                  ssm_states=torch.randn(2 * batch, dim, dstate, device=ctx.device),
                  cache_indices=torch.randperm(2 * batch)[:batch].to(ctx.device),
                  has_initial_state=torch.ones(batch, dtype=torch.bool, device=ctx.device))
        slices = [{k: (v[..., s:e].contiguous() if v.dim() == 3 else v) for k, v in a.items()}
                  for s, e in bounds] if ctx.device.type == "cuda" else None  # the naive per-sequence baseline
        return dict(packed=packed, kw=kw, slices=slices)

    sets = ctx.input_sets(make)
    case = f"varlen-D{dim}-N{dstate}-T{total}-{batch}seqs-{str(dtype).removeprefix('torch.')}"
    nbytes = _scan_bytes(1, dim, dstate, total, sets[0]["packed"]["u"].element_size(), states=batch)
    exps = float(dim * total * dstate)
    backends = ctx.our_backends(SELECTIVE_SCAN, [dtype])
    backends += [] if "torch" in backends else ["torch"]  # the packed torch reference, on a GPU too
    impls = [(f"ours[{b}]", functools.partial(_ours_varlen, b)) for b in backends]
    if ctx.device.type == "cuda":
        from bench.naive_scan import naive_selective_scan

        impls.append(("naive triton scan per sequence (no initial state)",
                      lambda s: [naive_selective_scan(**sl) for sl in s["slices"]]))
    return [_row(ctx, case, impl, fn, sets, nbytes, exps) for impl, fn in impls]


def _ours_varlen(backend: str, s: dict):
    return _backend(backend, selective_scan_varlen, **s["packed"], **s["kw"])


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    if ctx.device.type == "cuda":
        shapes = [(5120, 2048)] if ctx.quick else [(d, n) for d in (2048, 5120) for n in (512, 2048, 8192)]
        for dim, seqlen in shapes:
            rows += _batched_rows(ctx, dim, 16, seqlen, torch.bfloat16)
        rows += _varlen_rows(ctx, 5120, 16, VARLEN_LENGTHS_GPU, torch.bfloat16)
        for dim in (5120,) if ctx.quick else (2048, 5120):
            rows += _train_rows(ctx, dim, 16, 2048, torch.bfloat16)
    else:
        for seqlen in (1024,) if ctx.quick else (1024, 4096):
            rows += _batched_rows(ctx, 1024, 16, seqlen, torch.float32)
        rows += _varlen_rows(ctx, 1024, 16, VARLEN_LENGTHS_CPU, torch.float32)
        if not ctx.quick:  # HF's loop under autograd grows ~L^2 (a [B, D, L, N] zero gradient per step):
            # ~5 minutes a call at L 1024, ~20 s at L 256, so the CPU case runs at L 256
            rows += _train_rows(ctx, 1024, 16, 256, torch.float32)
    return rows

