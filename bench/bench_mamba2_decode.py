"""Mamba-2 decode-step benchmarks: ``selective_state_update`` (``triton_kernels/mamba/state_update.py``) in
its Mamba-2 form, with heads: A ``[H, P, N]`` expanded from ``[H]`` (the tied per-head path), dt
expanded from ``[B, H]``, D and dt_bias from ``[H]``, B and C ``[B, G, N]``. The Mamba-1 form is
timed in ``bench_mamba_state_update.py``.

Bytes by formula (what the op must move at least): the gathered state read and written
(``2 B H P N`` in the state dtype) + x, z read and out written (``3 B H P``) + dt (``B H``) + B, C
(``2 B G N``) + A, D, dt_bias (``3 H`` fp32). Baselines: transformers' Mamba-2 torch decode math
(``mamba2_selective_state_update``: what a user without kernels runs) and, on a GPU,
``torch.compile`` of our reference; on a GPU our rows are also timed as CUDA-graph replays (how
vLLM runs decode), which skips the eager path's one index-validation sync.
"""

from __future__ import annotations

import torch

from bench.harness import Context, Row
from triton_kernels import selective_state_update
from triton_kernels.registry import SELECTIVE_STATE_UPDATE

FAMILY = "mamba2_decode"
HEAD_DIM, STATE_SIZE, GROUPS = 64, 128, 8  # Mamba-2 2.7B / Codestral-Mamba-like heads


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _inputs(batch: int, heads: int, dtype: torch.dtype, state_dtype: torch.dtype, dev: torch.device) -> dict:
    """One decode step as HF's cache branch and vLLM build it (per-head A, dt, dt_bias, D)."""
    p, n = HEAD_DIM, STATE_SIZE

    def rnd(*shape):
        return torch.randn(*shape, device=dev).to(dtype)

    def per_head(values: torch.Tensor, *inner: int) -> torch.Tensor:  # [H] -> [H, *inner], stride 0
        return values.view(heads, *(1 for _ in inner)).expand(heads, *inner)

    state = torch.randn(2 * batch, heads, p, n, device=dev).to(state_dtype)  # rows gathered by slot
    x = rnd(batch, heads, p)
    return dict(
        state=state, slots=torch.randperm(2 * batch, device=dev)[:batch].to(torch.int32), x=x, z=rnd(batch, heads, p),
        dt=rnd(batch, heads)[..., None].expand(batch, heads, p), A=per_head(-torch.rand(heads, device=dev) * 8, p, n),
        D=per_head(torch.randn(heads, device=dev), p), dt_bias=per_head(torch.randn(heads, device=dev), p),
        B=rnd(batch, GROUPS, n), C=rnd(batch, GROUPS, n), out=torch.empty_like(x),
        hf_state=state[:batch].clone(),  # HF has no slot indices: the batch's own states
    )


def _ours(s: dict) -> None:
    selective_state_update(s["state"], s["x"], s["dt"], s["A"], s["B"], s["C"], s["D"], s["z"], s["dt_bias"], True,
                           s["slots"], out=s["out"])


def _hf(s: dict) -> None:
    from transformers.models.mamba2.modeling_mamba2 import mamba2_selective_state_update

    mamba2_selective_state_update(s["hf_state"], s["x"], s["dt"], s["A"], s["B"], s["C"], s["D"],
                                  dt_bias=s["dt_bias"], dt_softplus=True, z=s["z"])


def _compiled_reference():
    # A fresh dynamo cache per case: the cases (and bench_mamba_state_update's, which compiles the
    # same function) would otherwise pass dynamo's recompile limit and run eager unannounced.
    torch.compiler.reset()
    compiled = torch.compile(SELECTIVE_STATE_UPDATE.reference_fn())

    def call(s: dict) -> None:
        compiled(s["state"], s["x"], s["dt"], s["A"], s["B"], s["C"], s["D"], s["z"], s["dt_bias"], True, s["slots"],
                 -1, s["out"])

    return call


def _case_rows(ctx: Context, batch: int, heads: int, dtype: torch.dtype, state_dtype: torch.dtype) -> list[Row]:
    p, n = HEAD_DIM, STATE_SIZE
    sets = ctx.input_sets(lambda: _inputs(batch, heads, dtype, state_dtype, ctx.device))
    elt, state_elt = sets[0]["x"].element_size(), sets[0]["state"].element_size()
    nbytes = (2 * batch * heads * p * n * state_elt + 3 * batch * heads * p * elt + batch * heads * elt
              + 2 * batch * GROUPS * n * elt + 3 * heads * 4)
    case = f"decode-B{batch}-H{heads}-P{p}-N{n}-G{GROUPS}-{_name(dtype)}-{_name(state_dtype)}state"
    rows = ctx.ours_rows(FAMILY, case, SELECTIVE_STATE_UPDATE, [dtype, state_dtype], _ours, sets, nbytes,
                         graphs=True)
    rows.append(ctx.row(FAMILY, case, "HF mamba2_selective_state_update", _hf, sets, nbytes))
    if ctx.device.type == "cuda":
        rows.append(ctx.row(FAMILY, case, "torch.compile(reference)", _compiled_reference(), sets, nbytes))
    return rows


def run(ctx: Context) -> list[Row]:
    if ctx.device.type != "cuda":
        return [row for batch in (1, 16) for row in _case_rows(ctx, batch, 16, torch.float32, torch.float32)]
    bf16, fp32 = torch.bfloat16, torch.float32
    decode = [(1, 64), (256, 128)] if ctx.quick else [(b, h) for b in (1, 64, 256) for h in (64, 128)]
    cases = [(b, h, bf16, bf16) for b, h in decode] + [(256, 128, bf16, fp32)]
    return [row for case in cases for row in _case_rows(ctx, *case)]
