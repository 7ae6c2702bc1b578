"""Every Mamba Triton kernel compiles for sm_90 without register spills, in the variants its launchers use.

Each case calls a public op on CPU tensors of real model sizes (bf16 activations, fp32 SSM state);
``tests/sm90.py`` records the launches it makes and compiles them for sm_90 (see there).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.sm90 import assert_no_spills, case_params, needs_ptxas, results_fixture
from triton_kernels import (
    causal_conv1d_fn,
    causal_conv1d_update,
    causal_conv1d_varlen,
    selective_scan_fn,
    selective_scan_varlen,
    selective_state_update,
)

BF16, F32 = torch.bfloat16, torch.float32


def _t(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.randn(shape).to(dtype)


def _idx(values: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# ---- the cases: one public-op call each, at the sizes of real models ----------------------------------
D_MODEL = 5120  # mamba-2.8b's d_inner


def _scan_batched(n: int, *, full: bool = True, groups: int = 0, per_channel: bool = False) -> Callable:
    def call() -> None:
        b, length = 2, 256
        u, delta = _t(b, D_MODEL, length), _t(b, D_MODEL, length)
        if per_channel:
            bc = (_t(D_MODEL, n, dtype=F32), _t(D_MODEL, n, dtype=F32))
        elif groups:
            bc = (_t(b, groups, n, length), _t(b, groups, n, length))
        else:
            bc = (_t(b, n, length), _t(b, n, length))
        extras = dict(D=_t(D_MODEL, dtype=F32), z=_t(b, D_MODEL, length), delta_bias=_t(D_MODEL, dtype=F32),
                      delta_softplus=True, return_last_state=True) if full else {}
        selective_scan_fn(u, delta, -_t(D_MODEL, n, dtype=F32).abs(), *bc, **extras)
    return call


def _scan_fwd_bwd(n: int, *, full: bool = True, groups: int = 0, per_channel: bool = False) -> Callable:
    """Forward + backward (the recorder runs cases under no_grad: grad is enabled here)."""
    def call() -> None:
        b, length = 2, 256
        with torch.enable_grad():
            u, delta = _t(b, D_MODEL, length).requires_grad_(), _t(b, D_MODEL, length).requires_grad_()
            if per_channel:
                bc = (_t(D_MODEL, n, dtype=F32), _t(D_MODEL, n, dtype=F32))
            elif groups:
                bc = (_t(b, groups, n, length), _t(b, groups, n, length))
            else:
                bc = (_t(b, n, length), _t(b, n, length))
            extras = dict(D=_t(D_MODEL, dtype=F32), z=_t(b, D_MODEL, length), delta_bias=_t(D_MODEL, dtype=F32),
                          delta_softplus=True) if full else {}
            res = selective_scan_fn(u, delta, -_t(D_MODEL, n, dtype=F32).abs(), *bc, **extras,
                                    return_last_state=full)
            outs = res if full else (res,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return call


def _scan_varlen(n: int, *, full: bool = True, index: torch.dtype = torch.int32, groups: int = 1) -> Callable:
    def call() -> None:
        tokens = 700
        u, delta = _t(D_MODEL, tokens), _t(D_MODEL, tokens)
        states = torch.zeros(8, D_MODEL, n, dtype=F32)
        qsl = _idx([0, 100, 356, tokens], index)
        extras = dict(D=_t(D_MODEL, dtype=F32), z=_t(D_MODEL, tokens), delta_bias=_t(D_MODEL, dtype=F32),
                      delta_softplus=True, cache_indices=_idx([5, 0, 2], index),
                      has_initial_state=torch.tensor([True, False, True])) if full else {}
        selective_scan_varlen(u, states, delta, -_t(D_MODEL, n, dtype=F32).abs(), _t(groups, n, tokens),
                                       _t(groups, n, tokens), query_start_loc=qsl, **extras)
    return call


def _update_plain(n: int, *, full: bool = True) -> Callable:
    def call() -> None:
        b = 4
        state = torch.zeros(8 if full else b, D_MODEL, n, dtype=F32)
        extras = dict(D=_t(D_MODEL, dtype=F32), z=_t(b, D_MODEL), dt_bias=_t(D_MODEL, dtype=F32), dt_softplus=True,
                      state_batch_indices=_idx([7, 0, 3, 1], torch.int32)) if full else {}
        selective_state_update(state, _t(b, D_MODEL), _t(b, D_MODEL), -_t(D_MODEL, n, dtype=F32).abs(),
                                          _t(b, n), _t(b, n), **extras)
    return call


def _update_heads(n: int, *, groups: int = 8, index: torch.dtype = torch.int64) -> Callable:
    """mamba2's decode: per-head A, D, dt_bias expanded over [H, P(, N)] with zero strides."""
    def call() -> None:
        b, heads, hdim = 4, 80, 64
        state = torch.zeros(8, heads, hdim, n, dtype=F32)
        a = -_t(heads, dtype=F32).abs()
        selective_state_update(
            state, _t(b, heads, hdim), _t(b, heads, hdim), a[:, None, None].expand(heads, hdim, n),
            _t(b, groups, n), _t(b, groups, n), D=_t(heads, dtype=F32)[:, None].expand(heads, hdim),
            z=_t(b, heads, hdim), dt_bias=_t(heads, dtype=F32)[:, None].expand(heads, hdim), dt_softplus=True,
            state_batch_indices=_idx([7, 0, 3, 1], index))
    return call


def _conv_fn(width: int, length: int, *, full: bool = True) -> Callable:
    def call() -> None:
        b = 2
        x, w = _t(b, D_MODEL, length), _t(D_MODEL, width)
        if full:
            causal_conv1d_fn(x, w, _t(D_MODEL), "silu", initial_states=_t(b, D_MODEL, width - 1),
                                      return_final_states=True)
        else:
            causal_conv1d_fn(x, w)
    return call


def _conv_train(width: int, length: int, *, full: bool = True, seq_idx: bool = False) -> Callable:
    """Forward + backward (the recorder runs cases under no_grad)."""
    def call() -> None:
        b = 2
        x, w = _t(b, D_MODEL, length).requires_grad_(), _t(D_MODEL, width).requires_grad_()
        with torch.enable_grad():
            if full:
                bias, init = _t(D_MODEL).requires_grad_(), _t(b, D_MODEL, width - 1).requires_grad_()
                out, final = causal_conv1d_fn(x, w, bias, "silu", initial_states=init, return_final_states=True)
                torch.autograd.grad([out, final], [x, w, bias, init], [torch.ones_like(out), torch.ones_like(final)])
            else:
                cuts = _idx([0] * (length // 2) + [1] * (length - length // 2), torch.int32)[None].expand(b, -1)
                out = causal_conv1d_fn(x, w, activation="silu" if seq_idx else None,
                                       seq_idx=cuts if seq_idx else None)
                torch.autograd.grad([out], [x, w], [torch.ones_like(out)])
    return call


def _conv_varlen(width: int, bounds: list[int], *, full: bool = True, index: torch.dtype = torch.int32) -> Callable:
    def call() -> None:
        batch = len(bounds) - 1
        states = _t(batch + 2, D_MODEL, width - 1)
        extras = dict(cache_indices=_idx(list(range(batch + 1, 0, -1))[:batch], index),
                      has_initial_state=torch.arange(batch) % 2 == 0) if full else {}
        causal_conv1d_varlen(_t(D_MODEL, bounds[-1]), _t(D_MODEL, width), _t(D_MODEL) if full else None,
                                      states, _idx(bounds, index), **extras)
    return call


def _conv_update(width: int, *, full: bool = True, length: int = 0) -> Callable:
    def call() -> None:
        b = 4
        x = _t(b, D_MODEL, length) if length else _t(b, D_MODEL)
        if full:
            causal_conv1d_update(x, _t(8, D_MODEL, width - 1), _t(D_MODEL, width), _t(D_MODEL), "silu",
                                          conv_state_indices=_idx([7, 0, 3, 1], torch.int32))
        else:
            causal_conv1d_update(x, _t(b, D_MODEL, width - 1), _t(D_MODEL, width))
    return call


CASES: dict[str, Callable] = {
    "scan_batched_N16_full": _scan_batched(16),
    "scan_batched_N16_plain": _scan_batched(16, full=False),
    "scan_batched_N16_per_channel_BC": _scan_batched(16, per_channel=True),
    "scan_batched_N64_full_grouped": _scan_batched(64, groups=8),
    "scan_batched_N64_plain": _scan_batched(64, full=False),
    "scan_fwd_bwd_N16_full": _scan_fwd_bwd(16),
    "scan_fwd_bwd_N16_plain": _scan_fwd_bwd(16, full=False),
    "scan_fwd_bwd_N16_per_channel_BC": _scan_fwd_bwd(16, per_channel=True),
    "scan_fwd_bwd_N64_full_grouped": _scan_fwd_bwd(64, groups=8),
    "scan_varlen_N16_full_i32": _scan_varlen(16),
    "scan_varlen_N16_plain_i64": _scan_varlen(16, full=False, index=torch.int64),
    "scan_varlen_N64_full_i64_grouped": _scan_varlen(64, index=torch.int64, groups=8),
    "scan_varlen_N64_plain_i32": _scan_varlen(64, full=False),
    "update_plain_N16_full": _update_plain(16),
    "update_plain_N64_plain": _update_plain(64, full=False),
    "update_heads_N64_i32": _update_heads(64, index=torch.int32),
    "update_heads_N128_i64": _update_heads(128, groups=1),
    "update_heads_N256_i64": _update_heads(256),
}
for _w in (2, 3, 4):
    CASES |= {
        f"conv_fn_W{_w}_L1024_full": _conv_fn(_w, 1024),
        f"conv_fn_W{_w}_L1024_plain": _conv_fn(_w, 1024, full=False),
        f"conv_fn_W{_w}_L8_full": _conv_fn(_w, 8),
        f"conv_varlen_W{_w}_long_full_i32": _conv_varlen(_w, [0, 300, 1024]),
        f"conv_varlen_W{_w}_short_plain_i64": _conv_varlen(_w, list(range(0, 65, 4)), full=False, index=torch.int64),
        f"conv_update_W{_w}_full": _conv_update(_w),
        f"conv_update_W{_w}_L2_plain": _conv_update(_w, full=False, length=2),
        f"conv_train_W{_w}_L1024_full": _conv_train(_w, 1024),
        f"conv_train_W{_w}_L1024_plain": _conv_train(_w, 1024, full=False),
        f"conv_train_W{_w}_L1024_seq_idx": _conv_train(_w, 1024, full=False, seq_idx=True),
        f"conv_train_W{_w}_L8_full": _conv_train(_w, 8),
    }

# Cases that spill on sm_90 (none so far): id -> reason, run as strict xfail.
SPILLS: dict[str, str] = {}
sm90_results = results_fixture(CASES)


@needs_ptxas
@pytest.mark.parametrize("case", case_params(CASES, SPILLS))
def test_mamba_kernel_compiles_for_sm90_without_spills(sm90_results: dict, case: str) -> None:
    assert_no_spills(sm90_results, case)
