"""mamba_split_conv1d_scan_combined: forward and gradients against a plain float64 composition
(the tap-by-tap conv and the sequential SSD oracles, a float64 gated RMSNorm, SwiGLU, linear) and
against autograd through the unfused public ops, on every backend, for every option of mamba_ssm's
signature; determinism; torch.compile; the saved-tensor bytes below the unfused ops; bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional

from tests.utils import KERNEL_DEVICE, assert_close, backends, mixer_output_and_grads, rnd
from triton_kernels import (
    causal_conv1d_fn,
    mamba_chunk_scan_combined,
    mamba_split_conv1d_scan_combined,
    rms_norm_gated,
    use_backend,
)
from triton_kernels.mamba.naive import causal_conv1d as conv_oracle
from triton_kernels.mamba2.naive import ssd_oracle_fn
from triton_kernels.registry import CAUSAL_CONV1D, MAMBA_CHUNK_SCAN, RMS_NORM_GATED

F32, F64 = torch.float32, torch.float64
DEV = KERNEL_DEVICE
# The composite forces one backend on each op it calls: those all three have.
BACKENDS = backends(CAUSAL_CONV1D, MAMBA_CHUNK_SCAN, RMS_NORM_GATED)
TOL = {"torch": 1e-5, "triton": 1e-4}  # fp32 against the float64 composition
TENSORS = ("zxbcdt", "conv1d_weight", "conv1d_bias", "dt_bias", "A", "D", "initial_states", "rmsnorm_weight",
           "outproj_weight", "outproj_bias")

# name: (b, l, h, p, g, n, W, d_nonssm, options)
CASES = {
    "base": (2, 13, 4, 4, 1, 8, 4, 0, dict(rmsnorm=True, outproj=True, outproj_bias=True)),
    "no-norm-no-proj": (2, 13, 4, 4, 1, 8, 4, 0, dict()),
    "gate-first-groups": (1, 11, 4, 3, 2, 8, 3, 0, dict(rmsnorm=True, norm_before_gate=False, D2=True,
                                                         conv_bias=False, outproj=True)),
    "init-final-dtlimit": (2, 9, 2, 4, 1, 4, 4, 0, dict(rmsnorm=True, init=True, final=True, dt_limit=(0.05, 0.8))),
    "seq-idx": (2, 12, 2, 4, 1, 4, 4, 0, dict(rmsnorm=True, seq_idx=True, outproj=True, final=True)),
    "nonssm": (1, 7, 2, 4, 1, 4, 2, 3, dict(rmsnorm=True, outproj=True, outproj_bias=True)),
    "no-activation-L1": (2, 1, 2, 4, 1, 4, 4, 0, dict(activation=None, outproj=True, init=True, final=True)),
}


def make(b, seqlen, h, p, g, n, width, d_nonssm, opt) -> dict:
    """Keyword arguments of mamba_split_conv1d_scan_combined, random (never zeros)."""
    dim, conv_dim = h * p, h * p + 2 * g * n
    out_dim = 5
    kw = dict(
        zxbcdt=rnd(b, seqlen, 2 * d_nonssm + dim + conv_dim + h), conv1d_weight=rnd(conv_dim, width, scale=0.5),
        conv1d_bias=rnd(conv_dim) if opt.get("conv_bias", True) else None,
        dt_bias=rnd(h, scale=0.5), A=-torch.rand(h, device=DEV) - 0.2,
        D=rnd(h, p) if opt.get("D2") else rnd(h), chunk_size=4,
        initial_states=rnd(b, h, p, n) if opt.get("init") else None,
        seq_idx=None, dt_limit=opt.get("dt_limit", (0.0, math.inf)), return_final_states=opt.get("final", False),
        activation=opt.get("activation", "silu"),
        rmsnorm_weight=rnd(dim) + 1 if opt.get("rmsnorm") else None, rmsnorm_eps=1e-5,
        outproj_weight=rnd(out_dim, d_nonssm + dim, scale=0.3) if opt.get("outproj") else None,
        outproj_bias=rnd(out_dim) if opt.get("outproj_bias") else None,
        headdim=p, ngroups=g, norm_before_gate=opt.get("norm_before_gate", True),
    )
    if opt.get("seq_idx"):
        cut = [seqlen // 3, seqlen // 2]
        kw["seq_idx"] = torch.tensor([[0 if t < cut[r] else 1 for t in range(seqlen)] for r in range(b)],
                                     dtype=torch.int32, device=DEV)
    return kw


def _segments(b: int, seqlen: int, seq_idx) -> tuple[list[int], list[int], list[int]]:
    """Packed segment starts, each segment's init row (-1: zeros) and each row's last segment."""
    starts, init, last = [0], [], []
    for r in range(b):
        cuts = [] if seq_idx is None else [t for t in range(1, seqlen) if seq_idx[r, t] != seq_idx[r, t - 1]]
        for k, end in enumerate([*cuts, seqlen]):
            starts.append(r * seqlen + end)
            init.append(r if k == 0 else -1)
        last.append(len(init) - 1)
    return starts, init, last


def oracle(kw: dict):
    """The plain float64 composition: ``(out, final_states or None)``."""
    t = {k: None if kw[k] is None else kw[k].to(F64) for k in TENSORS}
    h, p, g = kw["A"].shape[0], kw["headdim"], kw["ngroups"]
    b, seqlen, _ = t["zxbcdt"].shape
    dim, conv_dim = h * p, t["conv1d_weight"].shape[0]
    n = (conv_dim - dim) // (2 * g)
    d_nonssm = (t["zxbcdt"].shape[-1] - dim - conv_dim - h) // 2
    zx0, z, xbc, dt = torch.split(t["zxbcdt"], [2 * d_nonssm, dim, conv_dim, h], dim=-1)
    xbc, _ = conv_oracle(xbc.transpose(1, 2), t["conv1d_weight"], t["conv1d_bias"], kw["activation"] is not None,
                         seq_idx=kw["seq_idx"])
    x, B, C = torch.split(xbc.transpose(1, 2), [dim, g * n, g * n], dim=-1)
    starts, init, last = _segments(b, seqlen, kw["seq_idx"])
    norm = t["rmsnorm_weight"] is not None
    y, finals = ssd_oracle_fn(x.reshape(b * seqlen, h, p), dt.reshape(b * seqlen, h), t["A"],
                              B.reshape(b * seqlen, g, n), C.reshape(b * seqlen, g, n), t["D"],
                              None if norm else z.reshape(b * seqlen, h, p), t["dt_bias"], True, kw["dt_limit"],
                              starts, t["initial_states"], init if t["initial_states"] is not None else None)
    y = y.reshape(b, seqlen, dim)
    if norm:
        gate = functional.silu(z)
        v = y if kw["norm_before_gate"] else y * gate
        vg = v.unflatten(-1, (g, dim // g))
        v = (vg * torch.rsqrt(vg.square().mean(-1, keepdim=True) + kw["rmsnorm_eps"])).flatten(-2) * t["rmsnorm_weight"]
        y = v * gate if kw["norm_before_gate"] else v
    if d_nonssm:
        a, gz = zx0.chunk(2, dim=-1)
        y = torch.cat([functional.silu(a) * gz, y], dim=-1)
    if t["outproj_weight"] is not None:
        y = functional.linear(y, t["outproj_weight"], t["outproj_bias"])
    return y, finals[last] if kw["return_final_states"] else None


def unfused(kw: dict):
    """The same block through the public unfused ops (autograd through each)."""
    h, p, g = kw["A"].shape[0], kw["headdim"], kw["ngroups"]
    dim, conv_dim = h * p, kw["conv1d_weight"].shape[0]
    n = (conv_dim - dim) // (2 * g)
    d_nonssm = (kw["zxbcdt"].shape[-1] - dim - conv_dim - h) // 2
    zx0, z, xbc, dt = torch.split(kw["zxbcdt"], [2 * d_nonssm, dim, conv_dim, h], dim=-1)
    xbc = causal_conv1d_fn(xbc.transpose(1, 2), kw["conv1d_weight"], kw["conv1d_bias"], kw["activation"],
                           seq_idx=kw["seq_idx"]).transpose(1, 2)
    x, B, C = torch.split(xbc, [dim, g * n, g * n], dim=-1)
    norm = kw["rmsnorm_weight"] is not None
    res = mamba_chunk_scan_combined(
        x.unflatten(-1, (h, p)), dt, kw["A"], B.unflatten(-1, (g, n)), C.unflatten(-1, (g, n)), kw["chunk_size"],
        D=kw["D"], z=None if norm else z.unflatten(-1, (h, p)), dt_bias=kw["dt_bias"],
        initial_states=kw["initial_states"], seq_idx=kw["seq_idx"], dt_softplus=True, dt_limit=kw["dt_limit"],
        return_final_states=kw["return_final_states"])
    y, final = res if kw["return_final_states"] else (res, None)
    y = y.flatten(-2)
    if norm:
        y = rms_norm_gated(y, kw["rmsnorm_weight"], z, kw["rmsnorm_eps"], dim // g, kw["norm_before_gate"])
    if d_nonssm:
        a, gz = zx0.chunk(2, dim=-1)
        y = torch.cat([functional.silu(a) * gz, y], dim=-1)
    if kw["outproj_weight"] is not None:
        y = functional.linear(y, kw["outproj_weight"], kw["outproj_bias"])
    return y, final


def fused(kw: dict):
    res = mamba_split_conv1d_scan_combined(**kw)
    return res if kw["return_final_states"] else (res, None)


def grads(fn, kw: dict, dout, dfinal, dtype=None) -> tuple[torch.Tensor, dict]:
    """``(out, gradients)`` of ``sum(out * dout) + sum(final * dfinal)`` through ``fn``."""
    kw = dict(kw)
    for k in TENSORS:
        if kw[k] is not None:
            kw[k] = kw[k].detach().to(dtype or kw[k].dtype).requires_grad_()
    out, final = fn(kw)
    loss = (out * dout.to(out.dtype)).sum()
    if final is not None:
        loss = loss + (final * dfinal.to(final.dtype)).sum()
    loss.backward()
    return out.detach(), {k: kw[k].grad for k in TENSORS if kw[k] is not None}


def cotangents(kw: dict):
    out, final = oracle({k: v for k, v in kw.items()})
    return torch.randn_like(out, dtype=F32), None if final is None else torch.randn_like(final, dtype=F32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_grads_match_float64_composition(case, backend):
    kw = make(*CASES[case][:-1], CASES[case][-1])
    dout, dfinal = cotangents(kw)
    ref_out, ref_grads = grads(oracle, kw, dout, dfinal, F64)
    with use_backend(backend):
        out, got = grads(fused, kw, dout, dfinal)
        with torch.no_grad():  # the inference path gives the same output
            assert_close(fused(kw)[0], ref_out, tol=TOL[backend], name="out (no grad)")
    assert_close(out, ref_out, tol=TOL[backend])
    assert got.keys() == ref_grads.keys()
    for k in got:
        assert_close(got[k], ref_grads[k], tol=TOL[backend], name=f"d{k}")


@pytest.mark.parametrize("case", ["base", "seq-idx", "nonssm", "init-final-dtlimit"])
def test_matches_autograd_through_unfused_ops(case):
    kw = make(*CASES[case][:-1], CASES[case][-1])
    dout, dfinal = cotangents(kw)
    with use_backend("torch"):
        out, got = grads(fused, kw, dout, dfinal)
        ref_out, want = grads(unfused, kw, dout, dfinal)
    assert_close(out, ref_out, tol=1e-6)
    for k in want:
        assert_close(got[k], want[k], tol=1e-5, name=f"d{k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_deterministic(backend):
    kw = make(*CASES["base"][:-1], CASES["base"][-1])
    dout, dfinal = cotangents(kw)
    with use_backend(backend):
        first = grads(fused, kw, dout, dfinal)[1]
        second = grads(fused, kw, dout, dfinal)[1]
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
        out, _ = fn(kw)
    del out
    return sum(seen.values())


def test_saves_less_than_autograd_through_unfused_ops():
    kw = make(2, 64, 4, 8, 1, 16, 4, 0, dict(rmsnorm=True, outproj=True, outproj_bias=True))
    with use_backend("torch"):
        ours, theirs = saved_bytes(fused, kw), saved_bytes(unfused, kw)
    b, seqlen, h, p = 2, 64, 4, 8
    assert ours == b * seqlen * h * p * 4  # only the scan output y (fp32)
    assert ours * 4 <= theirs  # unfused: the conv output, the norm input and out_proj input too


def test_torch_compile_fullgraph_forward_backward():
    kw = make(*CASES["base"][:-1], CASES["base"][-1])
    dout, dfinal = cotangents(kw)
    with use_backend("torch"):
        out, want = grads(fused, kw, dout, dfinal)
        compiled = torch.compile(fused, fullgraph=True)
        got_out, got = grads(compiled, kw, dout, dfinal)
    assert_close(got_out, out, tol=1e-6)
    for k in want:
        assert_close(got[k], want[k], tol=1e-6, name=f"d{k}")


@pytest.mark.parametrize(("change", "match"), [
    (dict(headdim=None), "headdim"),
    (dict(ngroups=3), "ngroups"),
    (dict(activation="relu"), "activation"),
    (dict(chunk_size=6), "chunk_size"),
    (dict(outproj_weight=None), "outproj_bias"),
    (dict(rmsnorm_weight=torch.ones(7)), "rmsnorm_weight"),
    (dict(dt_bias=torch.ones(3)), "dt_bias"),
    (dict(zxbcdt=torch.randn(2, 13, 71)), "zxbcdt"),
    (dict(initial_states=torch.randn(2, 4, 4, 9)), "initial_states"),
    (dict(seq_idx=torch.zeros(2, 12, dtype=torch.int32)), "seq_idx"),
])
def test_bad_input_raises_before_running(change, match):
    kw = make(*CASES["base"][:-1], CASES["base"][-1])
    kw.update({k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        mamba_split_conv1d_scan_combined(**kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_sizes(dtype):
    kw = make(2, 512, 8, 64, 1, 64, 4, 0, dict(rmsnorm=True, outproj=True, norm_before_gate=False))
    kw["chunk_size"] = 128
    dout, dfinal = cotangents(kw)
    ref_out, ref_grads = grads(oracle, kw, dout, dfinal, F64)
    out, got = grads(fused, kw, dout, dfinal, dtype)
    assert_close(out, ref_out, tol=3e-2)
    for k in got:
        assert_close(got[k], ref_grads[k], tol=5e-2, name=f"d{k}")


@pytest.mark.oracle
@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_mamba2_mixer_training_path(backend, monkeypatch):
    """A tiny random-init Mamba2Mixer in training mode calls our op exactly as it calls mamba_ssm's;
    its output and gradients (input and every parameter) equal those of its own torch path."""
    modeling_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    config = modeling_mamba2.Mamba2Config(hidden_size=16, num_heads=4, head_dim=8, expand=2, state_size=8,
                                          n_groups=2, chunk_size=8, conv_kernel=4, num_hidden_layers=1,
                                          time_step_limit=(0.0, 0.7))
    mixer = modeling_mamba2.Mamba2Mixer(config, layer_idx=0).to(DEV).train()
    hidden, cot = torch.randn(2, 13, 16, device=DEV), torch.randn(2, 13, 16, device=DEV)

    want = mixer_output_and_grads(mixer, hidden, cot)  # the hub-kernel stub returns None: HF's torch path

    def ours(*args, **kwargs):
        with use_backend(backend):
            return mamba_split_conv1d_scan_combined(*args, **kwargs)

    monkeypatch.setattr(modeling_mamba2, "mamba2_split_conv1d_scan_combined", ours)
    names = ["out", "hidden"] + [n for n, _ in mixer.named_parameters()]
    for name, got, exp in zip(names, mixer_output_and_grads(mixer, hidden, cot), want, strict=True):
        assert_close(got, exp, tol=TOL[backend] * 10, name=name)
