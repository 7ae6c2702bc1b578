"""mamba_inner_fn: forward and gradients against a plain float64 composition (the tap-by-tap conv
and sequential scan oracles, matmuls) and against autograd through the unfused public ops, on every
backend, for every option of mamba_ssm's signature (B/C projected or given in each form, their
projection biases, D, delta_bias, delta_softplus, out_proj bias, conv bias); determinism;
torch.compile; the saved-tensor bytes below the unfused ops; bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional

from tests.utils import KERNEL_DEVICE, assert_close, backends, mixer_output_and_grads, rnd
from triton_kernels import causal_conv1d_fn, mamba_inner_fn, selective_scan_fn, use_backend
from triton_kernels.backend import interpreter_enabled
from triton_kernels.mamba.naive import causal_conv1d as conv_oracle
from triton_kernels.mamba.naive import selective_scan as scan_oracle
from triton_kernels.mamba.tiles import tile_states_shape
from triton_kernels.registry import CAUSAL_CONV1D, SELECTIVE_SCAN

F32, F64 = torch.float32, torch.float64
DEV = KERNEL_DEVICE
# The composite forces one backend on the conv and the scan: those both have (not the scan's cpu).
BACKENDS = backends(CAUSAL_CONV1D, SELECTIVE_SCAN)
TOL = {"torch": 1e-5, "triton": 1e-4}  # fp32 against the float64 composition
TENSORS = ("xz", "conv1d_weight", "conv1d_bias", "x_proj_weight", "delta_proj_weight", "out_proj_weight",
           "out_proj_bias", "A", "B", "C", "D", "delta_bias", "B_proj_bias", "C_proj_bias")

# name: (b, D, l, N, R, W, options)
CASES = {
    "hf": (2, 6, 13, 4, 2, 4, dict(D=True, delta_bias=True)),
    "proj-biases-2d-conv": (2, 6, 9, 4, 3, 3, dict(conv_bias=False, conv2d=True, B_proj_bias=True,
                                                   C_proj_bias=True, out_proj_bias=True, D=True)),
    "given-grouped-B-channel-C": (2, 6, 11, 4, 2, 4, dict(B="grouped", C="channel", softplus=False)),
    "given-C-only": (1, 5, 9, 3, 2, 2, dict(C="batch", D=True, delta_bias=True, C_proj_bias=False)),
    "L1": (2, 6, 1, 4, 2, 4, dict(D=True, delta_bias=True, out_proj_bias=True)),
}


def make(b, dim, seqlen, n, rank, width, opt) -> dict:
    """Keyword arguments of mamba_inner_fn, random (never zeros)."""
    given = {"grouped": lambda: rnd(b, 2, n, seqlen), "channel": lambda: rnd(dim, n),
             "batch": lambda: rnd(b, n, seqlen)}
    B = given[opt["B"]]() if "B" in opt else None
    C = given[opt["C"]]() if "C" in opt else None
    rows = rank + n * ((B is None) + (C is None))
    out_dim = 7
    return dict(
        xz=rnd(b, 2 * dim, seqlen),
        conv1d_weight=rnd(dim, width, scale=0.5) if opt.get("conv2d") else rnd(dim, 1, width, scale=0.5),
        conv1d_bias=rnd(dim) if opt.get("conv_bias", True) else None,
        x_proj_weight=rnd(rows, dim, scale=0.4), delta_proj_weight=rnd(dim, rank, scale=0.4),
        out_proj_weight=rnd(out_dim, dim, scale=0.3), out_proj_bias=rnd(out_dim) if opt.get("out_proj_bias") else None,
        A=-torch.rand(dim, n, device=DEV) - 0.2, B=B, C=C, D=rnd(dim) if opt.get("D") else None,
        delta_bias=rnd(dim, scale=0.5) if opt.get("delta_bias") else None,
        B_proj_bias=rnd(n) if opt.get("B_proj_bias") else None, C_proj_bias=rnd(n) if opt.get("C_proj_bias") else None,
        delta_softplus=opt.get("softplus", True),
    )


def _split(kw: dict, conv):
    """Shared by both compositions: conv output u, x_dbl, delta, B, C, z (the given conv op)."""
    dim, rank = kw["delta_proj_weight"].shape
    n = kw["A"].shape[1]
    x, z = kw["xz"][:, :dim], kw["xz"][:, dim:]
    u = conv(x, kw["conv1d_weight"].reshape(dim, -1), kw["conv1d_bias"])
    x_dbl = torch.einsum("kd,bdl->bkl", kw["x_proj_weight"], u)
    delta = torch.einsum("dr,brl->bdl", kw["delta_proj_weight"], x_dbl[:, :rank])
    B, C, row = kw["B"], kw["C"], rank
    if B is None:
        B, row = x_dbl[:, rank:rank + n], rank + n
        B = B if kw["B_proj_bias"] is None else B + kw["B_proj_bias"][:, None]
    if C is None:
        C = x_dbl[:, row:row + n]
        C = C if kw["C_proj_bias"] is None else C + kw["C_proj_bias"][:, None]
    return u, delta, B, C, z


def oracle(kw: dict) -> torch.Tensor:
    """The plain float64 composition."""
    kw = {k: v.to(F64) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    u, delta, B, C, z = _split(kw, lambda x, w, b: conv_oracle(x, w, b, True)[0])
    y, _ = scan_oracle(u, delta, kw["A"], B, C, kw["D"], z, kw["delta_bias"], kw["delta_softplus"])
    return functional.linear(y.transpose(1, 2), kw["out_proj_weight"], kw["out_proj_bias"])


def unfused(kw: dict) -> torch.Tensor:
    """The same mixer through the public unfused ops (autograd through each)."""
    u, delta, B, C, z = _split(kw, lambda x, w, b: causal_conv1d_fn(x, w, b, "silu"))
    y = selective_scan_fn(u, delta, kw["A"], B, C, kw["D"], z, kw["delta_bias"], kw["delta_softplus"])
    return functional.linear(y.transpose(1, 2), kw["out_proj_weight"], kw["out_proj_bias"])


def grads(fn, kw: dict, dout, dtype=None) -> tuple[torch.Tensor, dict]:
    """``(out, gradients)`` of ``sum(out * dout)`` through ``fn``."""
    kw = dict(kw)
    for k in TENSORS:
        if kw[k] is not None:
            kw[k] = kw[k].detach().to(dtype or kw[k].dtype).requires_grad_()
    out = fn(kw)
    (out * dout.to(out.dtype)).sum().backward()
    return out.detach(), {k: kw[k].grad for k in TENSORS if kw[k] is not None}


def fused(kw: dict) -> torch.Tensor:
    return mamba_inner_fn(**kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_grads_match_float64_composition(case, backend):
    kw = make(*CASES[case])
    dout = torch.randn_like(oracle(kw), dtype=F32)
    ref_out, ref_grads = grads(oracle, kw, dout, F64)
    with use_backend(backend):
        out, got = grads(fused, kw, dout)
        with torch.no_grad():  # the inference path gives the same output
            assert_close(fused(kw), ref_out, tol=TOL[backend], name="out (no grad)")
    assert_close(out, ref_out, tol=TOL[backend])
    assert got.keys() == ref_grads.keys()
    for k in got:
        assert_close(got[k], ref_grads[k], tol=TOL[backend], name=f"d{k}")


@pytest.mark.parametrize("case", ["hf", "given-grouped-B-channel-C"])
def test_matches_autograd_through_unfused_ops(case):
    kw = make(*CASES[case])
    dout = torch.randn_like(oracle(kw), dtype=F32)
    with use_backend("torch"):
        out, got = grads(fused, kw, dout)
        ref_out, want = grads(unfused, kw, dout)
    assert_close(out, ref_out, tol=1e-6)
    for k in want:
        assert_close(got[k], want[k], tol=1e-5, name=f"d{k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_deterministic(backend):
    kw = make(*CASES["hf"])
    dout = torch.randn_like(oracle(kw), dtype=F32)
    with use_backend(backend):
        first = grads(fused, kw, dout)[1]
        second = grads(fused, kw, dout)[1]
    for k in first:
        assert torch.equal(first[k], second[k]), k


def saved_bytes(fn, kw: dict) -> int:
    """Bytes of the distinct storages autograd keeps for backward, not counting the inputs."""
    kw = {k: v.detach().requires_grad_() if k in TENSORS and v is not None else v for k, v in kw.items()}
    inputs = {kw[k].untyped_storage().data_ptr() for k in TENSORS if kw[k] is not None}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in inputs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(kw)
    del out
    return sum(seen.values())


def test_saves_less_than_autograd_through_unfused_ops():
    b, dim, seqlen, n = 2, 32, 64, 16
    kw = make(b, dim, seqlen, n, 4, 4, dict(D=True, delta_bias=True))
    with use_backend("torch"):
        ours, theirs = saved_bytes(fused, kw), saved_bytes(unfused, kw)
    saves_tiles = DEV.type == "cuda" or interpreter_enabled()
    tiles = math.prod(tile_states_shape(kw["xz"][:, :dim], kw["A"])) * 4 if saves_tiles else 0
    assert ours == b * dim * seqlen * 4 + tiles  # only the scan output y and the scan's fp32 tile states
    assert (ours - tiles) * 5 <= theirs - tiles  # unfused: the conv output, x_dbl, delta, B, C, z, y, the tiles


def test_torch_compile_fullgraph_forward_backward():
    kw = make(*CASES["hf"])
    dout = torch.randn_like(oracle(kw), dtype=F32)
    with use_backend("torch"):
        out, want = grads(fused, kw, dout)
        got_out, got = grads(torch.compile(fused, fullgraph=True), kw, dout)
    assert_close(got_out, out, tol=1e-6)
    for k in want:
        assert_close(got[k], want[k], tol=1e-6, name=f"d{k}")


@pytest.mark.parametrize(("change", "match"), [
    (dict(xz=torch.randn(2, 11, 13)), "xz"),
    (dict(conv1d_weight=torch.randn(6, 2, 4)), "conv1d_weight"),
    (dict(conv1d_weight=torch.randn(6, 5)), "W"),
    (dict(x_proj_weight=torch.randn(9, 6)), "x_proj_weight"),
    (dict(delta_proj_weight=torch.randn(5, 2)), "delta_proj_weight"),
    (dict(out_proj_weight=torch.randn(7, 5)), "out_proj_weight"),
    (dict(out_proj_bias=torch.randn(3)), "out_proj_bias"),
    (dict(A=torch.randn(6, 4, dtype=torch.complex64)), "A"),
    (dict(B=torch.randn(6, 4), B_proj_bias=torch.randn(4)), "B_proj_bias"),
    (dict(checkpoint_lvl=2), "checkpoint_lvl"),
])
def test_bad_input_raises_before_running(change, match):
    kw = make(*CASES["hf"])
    kw.update({k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises((ValueError, TypeError), match=match):
        mamba_inner_fn(**kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_sizes(dtype):
    kw = make(2, 256, 512, 16, 16, 4, dict(D=True, delta_bias=True))
    dout = torch.randn_like(oracle(kw), dtype=F32)
    ref_out, ref_grads = grads(oracle, kw, dout, F64)
    out, got = grads(fused, kw, dout, dtype)
    assert_close(out, ref_out, tol=3e-2)
    for k in got:
        assert_close(got[k], ref_grads[k], tol=5e-2, name=f"d{k}")


@pytest.mark.oracle
@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_mamba_mixer_training_path(backend, monkeypatch):
    """A tiny random-init MambaMixer in training mode calls our op exactly as it calls mamba_ssm's;
    its output and gradients (input and every parameter) equal those of its own torch path."""
    modeling_mamba = pytest.importorskip("transformers.models.mamba.modeling_mamba")
    config = modeling_mamba.MambaConfig(hidden_size=8, state_size=4, expand=2, conv_kernel=4, time_step_rank=2,
                                        num_hidden_layers=1)
    mixer = modeling_mamba.MambaMixer(config, layer_idx=0).to(DEV).train()
    hidden, cot = torch.randn(2, 11, 8, device=DEV), torch.randn(2, 11, 8, device=DEV)

    want = mixer_output_and_grads(mixer, hidden, cot)  # the hub-kernel stub returns None: HF's torch path

    def ours(*args, **kwargs):
        with use_backend(backend):
            return mamba_inner_fn(*args, **kwargs)

    monkeypatch.setattr(modeling_mamba, "mamba_inner_fn", ours)
    names = ["out", "hidden"] + [n for n, _ in mixer.named_parameters()]
    for name, got, exp in zip(names, mixer_output_and_grads(mixer, hidden, cot), want, strict=True):
        assert_close(got, exp, tol=TOL[backend] * 10, name=name)
