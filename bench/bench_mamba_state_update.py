"""Mamba decode-step benchmarks: ``selective_state_update`` (``triton_kernels/mamba/state_update.py``).

Bytes by formula (what the op must move at least): the gathered state read and written
(``2 B D N`` in the state dtype) + A (``D N`` fp32) + x, dt, z read and out written (``4 B D``) +
B, C (``2 B N``) + D, dt_bias. Baselines: transformers' Mamba torch path (what a user without
kernels runs) and, on a GPU, ``torch.compile`` of our reference; on a GPU our rows are also timed
as CUDA-graph replays (how vLLM runs decode), which skips the eager path's one index-validation sync.
"""

from __future__ import annotations

import torch

from bench.harness import Context, Row
from triton_kernels.mamba.ops_torch import selective_state_update_ref
from triton_kernels.mamba.state_update import selective_state_update
from triton_kernels.registry import SELECTIVE_STATE_UPDATE

FAMILY = "mamba_state_update"


def _inputs(batch: int, dim: int, dstate: int, dtype: torch.dtype, dev: torch.device) -> dict:
    def rnd(*shape):
        return torch.randn(*shape, device=dev).to(dtype)

    state = torch.randn(2 * batch, dim, dstate, device=dev)  # fp32 state, rows gathered by slot
    x = rnd(batch, dim)
    return dict(
        state=state, slots=torch.randperm(2 * batch, device=dev)[:batch].to(torch.int32), x=x, dt=rnd(batch, dim),
        z=rnd(batch, dim), B=rnd(batch, dstate), C=rnd(batch, dstate), A=-torch.rand(dim, dstate, device=dev),
        D=torch.randn(dim, device=dev), dt_bias=torch.randn(dim, device=dev), out=torch.empty_like(x),
        hf_state=state[:batch].clone(),  # HF has no slot indices: the batch's own states
    )


def _ours(s: dict) -> None:
    selective_state_update(s["state"], s["x"], s["dt"], s["A"], s["B"], s["C"], s["D"], s["z"], s["dt_bias"], True,
                           s["slots"], out=s["out"])


def _hf(s: dict) -> None:
    from transformers.models.mamba.modeling_mamba import mamba_selective_state_update

    mamba_selective_state_update(s["hf_state"], s["x"], s["dt"], s["A"], s["B"], s["C"], s["D"],
                                 dt_bias=s["dt_bias"], dt_softplus=True, z=s["z"])


def _compiled_reference():
    compiled = torch.compile(selective_state_update_ref)

    def call(s: dict) -> None:
        compiled(s["state"].unsqueeze(1), s["x"].unsqueeze(1), s["dt"].unsqueeze(1), s["A"].unsqueeze(0),
                 s["B"].unsqueeze(1), s["C"].unsqueeze(1), s["D"].unsqueeze(0), s["z"].unsqueeze(1),
                 s["dt_bias"].unsqueeze(0), True, s["slots"], -1, s["out"].unsqueeze(1))

    return call


def _case_rows(ctx: Context, batch: int, dim: int, dstate: int, dtype: torch.dtype) -> list[Row]:
    sets = ctx.input_sets(lambda: _inputs(batch, dim, dstate, dtype, ctx.device))
    elt = sets[0]["x"].element_size()
    nbytes = 2 * batch * dim * dstate * 4 + dim * dstate * 4 + 4 * batch * dim * elt + 2 * batch * dstate * elt \
        + 2 * dim * 4
    case = f"state-update-B{batch}-D{dim}-N{dstate}-{str(dtype).removeprefix('torch.')}-fp32state"
    rows = ctx.ours_rows(FAMILY, case, SELECTIVE_STATE_UPDATE, [dtype], _ours, sets, nbytes, graphs=True)
    rows.append(ctx.row(FAMILY, case, "HF mamba_selective_state_update", _hf, sets, nbytes))
    if ctx.device.type == "cuda":
        rows.append(ctx.row(FAMILY, case, "torch.compile(reference)", _compiled_reference(), sets, nbytes))
    return rows


def run(ctx: Context) -> list[Row]:
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    return [row for batch in ((1, 64) if ctx.quick else (1, 64, 256))
            for row in _case_rows(ctx, batch, 5120, 16, dtype)]
