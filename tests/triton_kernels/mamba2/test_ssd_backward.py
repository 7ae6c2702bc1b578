"""mamba_chunk_scan_combined's backward: gradcheck of the torch core in float64, every backend's
gradients against autograd through the float64 sequential oracle (lengths 1 / 7 / 63 / 64 / 65,
chunk boundaries, groups, D, z, dt_bias, softplus, dt_limit, initial and final states, seq_idx,
cu_seqlens with varlen states), determinism, opcheck, torch.compile, checkpointing, bad input,
HF transformers' Mamba2Mixer as an oracle, and the gpu tier (bf16, real sizes)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional

from tests.triton_kernels.mamba2.ssd_inputs import batched, make
from tests.utils import KERNEL_DEVICE, assert_close, backends, poisoned, rnd
from triton_kernels import mamba_chunk_scan_combined, use_backend
from triton_kernels.mamba2.naive import ssd_oracle_fn
from triton_kernels.mamba2.ssd_bwd_torch import ssd_core_bwd_torch
from triton_kernels.mamba2.ssd_torch import ssd_core_torch
from triton_kernels.registry import MAMBA_CHUNK_SCAN

F32 = torch.float32
DEV = KERNEL_DEVICE
BACKENDS = backends(MAMBA_CHUNK_SCAN)
GRAD_TOL = {"torch": 1e-5, "triton": 1e-4}  # fp32 gradients against the float64 oracle
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def leaves(shape: dict, flags: dict, init: bool) -> dict:
    """Random ``[b, l, ...]`` inputs of mamba_chunk_scan_combined (keyword arguments)."""
    b, seqlen, h, p, g, n = (shape[k] for k in ("b", "l", "h", "p", "g", "n"))
    kw = batched(make(b * seqlen, h, p, g, n, **flags), b)
    kw["initial_states"] = rnd(b, h, p, n) if init else None
    return kw


def ours(backend: str, kw: dict, cotangents: list, **call) -> dict:
    """Gradients of ``sum(result_i * cotangent_i)`` through our op (None: that result unused)."""
    kw = {k: v.detach().clone().requires_grad_() if k in NAMES and v is not None else v for k, v in kw.items()}
    with use_backend(backend):
        result = mamba_chunk_scan_combined(**kw, **call)
    result = result if isinstance(result, tuple) else (result,)
    sum((r * c).sum() for r, c in zip(result, cotangents, strict=True) if c is not None).backward()
    return {k: kw[k].grad for k in NAMES if kw[k] is not None}


def expected(kw: dict, seq_starts: list[int], init_index: list[int], dout, terms, dt_limit=(0.0, math.inf)) -> dict:
    """The same gradients by autograd through the float64 oracle over the packed sequences;
    ``terms``: ``(segments, cotangent)`` pairs, the final states of those segments."""
    kw64 = {k: kw[k].detach().double().requires_grad_() for k in NAMES if kw[k] is not None}
    b, seqlen = kw["x"].shape[:2]

    def packed(k):
        t = kw64.get(k)
        return None if t is None else t.reshape(b * seqlen, *t.shape[2:])

    out, finals = ssd_oracle_fn(packed("x"), packed("dt"), kw64["A"], packed("B"), packed("C"), kw64.get("D"),
                                packed("z"), kw64.get("dt_bias"), kw["dt_softplus"], dt_limit, seq_starts,
                                kw64.get("initial_states"), init_index)
    loss = (out * dout.double().reshape(out.shape)).sum()
    for segments, cot in terms:
        if cot is not None:
            loss = loss + (finals[segments] * cot.double()).sum()
    loss.backward()
    return {k: v.grad for k, v in kw64.items()}


def compare(got: dict, want: dict, tol: float) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert_close(got[k], want[k], tol=tol, name=f"d{k}")


# ---- gradcheck of the torch core in float64 -----------------------------------------------------


class _TorchCore(torch.autograd.Function):
    """The packed torch forward core with the torch backward core as its backward."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, init, meta):
        starts, init_index, final_index, dt_limit, chunk_size = meta
        out = torch.empty_like(x)
        final = x.new_zeros((len(starts) - 1, *x.shape[1:], B.shape[-1]))  # row 2 is not written
        ssd_core_torch(out, x, dt, A, B, C, D, z, dt_bias, True, dt_limit, starts, None, init, init_index, final,
                       final_index, chunk_size)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, init)
        ctx.meta = meta
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        saved = ctx.saved_tensors
        starts, init_index, final_index, dt_limit, chunk_size = ctx.meta
        grads = [torch.full_like(t, math.nan) for t in saved[:8]]
        dinit = torch.zeros_like(saved[8])
        ssd_core_bwd_torch(*grads, dinit, dout, dfinal, *saved[:8], True, dt_limit, starts, None, saved[8],
                           init_index, final_index, chunk_size)
        return (*grads, dinit, None)


def test_gradcheck_torch_core_float64():
    """Three sequences (7, 1 and 9 tokens, chunks of 4): init rows 2 / none / 0, final rows
    1 / none / 0; groups, D [h, p], z, dt_bias, softplus and a dt_limit that clamps."""
    f64 = dict(dtype=torch.float64, device=DEV)
    T, h, p, g, n = 17, 4, 3, 2, 2
    args = [torch.randn(T, h, p, **f64), torch.randn(T, h, **f64), -(torch.rand(h, **f64) + 0.1),
            torch.randn(T, g, n, **f64), torch.randn(T, g, n, **f64), torch.randn(h, p, **f64),
            torch.randn(T, h, p, **f64), torch.randn(h, **f64) * 0.5, torch.randn(3, h, p, n, **f64)]
    meta = ([0, 7, 8, 17], torch.tensor([2, -1, 0], device=DEV), torch.tensor([1, -1, 0], device=DEV),
            (0.2, 1.0), 4)
    args = [t.requires_grad_() for t in args]
    assert torch.autograd.gradcheck(lambda *a: _TorchCore.apply(*a, meta), args, fast_mode=True)


# ---- every backend against the float64 oracle ---------------------------------------------------

CASES = [
    pytest.param(dict(b=2, l=1, h=2, p=16, g=1, n=16), {}, True, 64, (0.0, math.inf), id="L1-g1-init"),
    pytest.param(dict(b=1, l=7, h=4, p=16, g=2, n=16), dict(D="hp"), True, 64, (0.0, math.inf), id="L7-g2-Dhp"),
    pytest.param(dict(b=1, l=63, h=2, p=16, g=2, n=16), dict(z=False, bias=False, softplus=False), False, 32,
                 (0.0, math.inf), id="L63-g=h-noz-nobias-nosoftplus-chunk32"),
    pytest.param(dict(b=1, l=64, h=2, p=16, g=1, n=16), dict(D=None), True, 32, (0.0, math.inf),
                 id="L64-noD-chunk-boundary"),
    pytest.param(dict(b=2, l=65, h=2, p=16, g=1, n=16), {}, True, 32, (0.05, 0.6), id="L65-g1-dtlimit"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "flags", "init", "chunk_size", "dt_limit"), CASES)
def test_grads_match_oracle(backend, shape, flags, init, chunk_size, dt_limit):
    """Gradients of every input, with a gradient flowing in through the returned final states."""
    kw = leaves(shape, flags, init)
    b, seqlen = shape["b"], shape["l"]
    dout, dfinal = rnd(*kw["x"].shape), rnd(b, shape["h"], shape["p"], shape["n"])
    got = ours(backend, kw, [dout, dfinal], chunk_size=chunk_size, dt_limit=dt_limit, return_final_states=True)
    want = expected(kw, [i * seqlen for i in range(b + 1)], list(range(b)) if init else None, dout,
                    [(list(range(b)), dfinal)], dt_limit)
    compare(got, want, GRAD_TOL[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dt_gradient_is_zero_where_clamped(backend):
    kw = leaves(dict(b=1, l=40, h=2, p=16, g=1, n=16), {}, False)
    lo, hi = 0.3, 0.8
    got = ours(backend, kw, [rnd(*kw["x"].shape)], chunk_size=16, dt_limit=(lo, hi))
    v = functional.softplus(kw["dt"] + kw["dt_bias"])
    clamped = (v < lo) | (v > hi)
    assert clamped.any()
    assert (~clamped).any()
    assert (got["dt"][clamped] == 0).all()
    assert (got["dt"][~clamped] != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_seq_idx_grads_match_oracle(backend):
    """Row 0 in segments of 20, 1 and 29 tokens, row 1 one segment: the initial state feeds each
    row's first segment, the final state is each row's last."""
    kw = leaves(dict(b=2, l=50, h=2, p=16, g=1, n=16), {}, True)
    kw["seq_idx"] = torch.tensor([[0] * 20 + [1] + [2] * 29, [5] * 50], dtype=torch.int32, device=DEV)
    dout, dfinal = rnd(*kw["x"].shape), rnd(2, 2, 16, 16)
    got = ours(backend, kw, [dout, dfinal], chunk_size=16, return_final_states=True)
    want = expected(kw, [0, 20, 21, 50, 100], [0, -1, -1, 1], dout, [([2, 3], dfinal)])
    compare(got, want, GRAD_TOL[backend])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("final", [False, True], ids=["varlen", "final+varlen"])
def test_cu_seqlens_grads_through_varlen_states(backend, final):
    """cu_seqlens [0, 5, 5, 40, 60] (an empty sequence): gradients flow in through every
    sequence's varlen state (and the row's final state, the last sequence's)."""
    cu = [0, 5, 5, 40, 60]
    kw = leaves(dict(b=1, l=60, h=2, p=16, g=2, n=16), {}, True)
    kw["cu_seqlens"] = torch.tensor(cu, dtype=torch.int32, device=DEV)
    kw["seq_idx"] = torch.repeat_interleave(torch.arange(4), torch.tensor([5, 0, 35, 20]))[None].to(DEV)
    dout, dfinal, dvarlen = rnd(*kw["x"].shape), rnd(1, 2, 16, 16) if final else None, rnd(4, 2, 16, 16)
    got = ours(backend, kw, [dout, dfinal, dvarlen] if final else [dout, dvarlen], chunk_size=16,
               return_final_states=final, return_varlen_states=True)
    want = expected(kw, cu, [0, -1, -1, -1], dout, [([3], dfinal), ([0, 1, 2, 3], dvarlen)])
    compare(got, want, GRAD_TOL[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    kw = leaves(dict(b=1, l=45, h=2, p=16, g=1, n=16), dict(D="hp"), True)
    cots = [rnd(*kw["x"].shape), rnd(1, 2, 16, 16)]
    first = ours(backend, kw, cots, chunk_size=16, dt_limit=(0.05, 0.9), return_final_states=True)
    second = ours(backend, kw, cots, chunk_size=16, dt_limit=(0.05, 0.9), return_final_states=True)
    for k in first:
        assert torch.equal(first[k], second[k]), f"d{k} differs between two backward passes"


def test_unused_outputs_and_partial_requires_grad():
    """Only x requires grad and only the final state is used: dx still matches the oracle."""
    kw = leaves(dict(b=1, l=20, h=2, p=16, g=1, n=16), {}, False)
    x = kw["x"].clone().requires_grad_()
    dfinal = rnd(1, 2, 16, 16)
    with use_backend("torch"):
        _, final = mamba_chunk_scan_combined(**{**kw, "x": x}, chunk_size=16, return_final_states=True)
    (final * dfinal).sum().backward()
    want = expected(kw, [0, 20], None, torch.zeros_like(kw["x"]), [([0], dfinal)])
    assert_close(x.grad, want["x"], tol=GRAD_TOL["torch"], name="dx")


# ---- custom op, torch.compile, checkpointing ----------------------------------------------------


def test_opcheck_backward_op():
    kw = leaves(dict(b=2, l=20, h=4, p=8, g=2, n=5), {}, True)
    like = [kw[k] for k in NAMES]
    with use_backend("torch"):
        torch.library.opcheck(torch.ops.ifk.mamba_chunk_scan_bwd.default, (
            *(poisoned(t.shape, t.dtype) for t in like),
            [rnd(2, 20, 4, 8), rnd(2, 4, 8, 5), None, *like,
             torch.tensor([[0] * 5 + [1] * 15] * 2, device=DEV), None],
            True, 0.0, math.inf, 16))


def _loss_fn(kw, cots, **call):
    def fn(*tensors):
        out, final = mamba_chunk_scan_combined(**{**kw, **dict(zip(NAMES, tensors, strict=True))}, **call)
        return (out * cots[0]).sum() + (final * cots[1]).sum()
    return fn


def _grads(fn, kw):
    tensors = [kw[k].detach().clone().requires_grad_() for k in NAMES]
    fn(*tensors).backward()
    return [t.grad for t in tensors]


def test_compile_fullgraph_forward_and_backward():
    kw = leaves(dict(b=1, l=30, h=4, p=8, g=2, n=5), {}, True)
    cots = [rnd(*kw["x"].shape), rnd(1, 4, 8, 5)]
    fn = _loss_fn(kw, cots, chunk_size=16, return_final_states=True)
    with use_backend("torch"):
        eager = _grads(fn, kw)
        compiled = _grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), kw)
    for name, got, want in zip(NAMES, compiled, eager, strict=True):
        assert_close(got, want, tol=1e-6, name=f"d{name}")


def test_activation_checkpointing():
    kw = leaves(dict(b=1, l=30, h=4, p=8, g=2, n=5), {}, True)
    cots = [rnd(*kw["x"].shape), rnd(1, 4, 8, 5)]
    fn = _loss_fn(kw, cots, chunk_size=16, return_final_states=True)
    with use_backend("torch"):
        eager = _grads(fn, kw)
        ckpt = _grads(lambda *t: torch.utils.checkpoint.checkpoint(fn, *t, use_reentrant=False), kw)
    for got, want in zip(ckpt, eager, strict=True):
        assert torch.equal(got, want)


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "match"), [
    ("x", lambda kw: kw["x"].to(torch.complex64), "x"),
    ("seq_idx", lambda kw: torch.zeros(1, 20, device=DEV), "seq_idx"),
], ids=["x-complex", "seq_idx-float"])
def test_differentiable_call_bad_input(key, value, match):
    """A non-float x, or an index tensor that is float (the only kind that can require grad), is
    refused by name before anything runs."""
    kw = leaves(dict(b=1, l=20, h=2, p=8, g=1, n=4), {}, False)
    kw[key] = value(kw).requires_grad_()
    with pytest.raises(TypeError, match=match):
        mamba_chunk_scan_combined(**kw, chunk_size=16)


def test_backward_op_checks_gradient_shapes():
    kw = leaves(dict(b=1, l=20, h=2, p=8, g=1, n=4), {}, False)
    like = [kw[k] for k in NAMES]
    grads = [None if t is None else torch.empty_like(t) for t in like]
    grads[0] = torch.empty(1, 19, 2, 8, device=DEV)
    with pytest.raises(ValueError, match="dx"):
        torch.ops.ifk.mamba_chunk_scan_bwd(*grads, [rnd(1, 20, 2, 8), None, None, *like, None, None],
                                           True, 0.0, math.inf, 16)


# ---- HF transformers' Mamba2Mixer as an oracle --------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("backend", BACKENDS)
def test_mamba2_mixer_grads_match_hf_torch_forward(backend, monkeypatch):
    """Gradients of a tiny random-init Mamba2Mixer (its parameters and input) with our op in place
    of its chunked scan equal those of its own torch path."""
    modeling_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    config = modeling_mamba2.Mamba2Config(hidden_size=32, num_heads=4, head_dim=16, expand=2, state_size=16,
                                          n_groups=2, chunk_size=16, conv_kernel=4, num_hidden_layers=1,
                                          time_step_limit=(0.0, 0.7))
    mixer = modeling_mamba2.Mamba2Mixer(config, layer_idx=0).to(DEV)
    hidden = torch.randn(2, 37, 32, device=DEV)
    cot = torch.randn(2, 37, 32, device=DEV)

    def grads():
        mixer.zero_grad()
        h = hidden.clone().requires_grad_()
        (mixer(h) * cot).sum().backward()
        return [h.grad] + [p.grad.clone() for p in mixer.parameters()]

    expected_grads = grads()

    def ours_scan(*args, **kwargs):
        with use_backend(backend):
            return mamba_chunk_scan_combined(*args, **kwargs)

    monkeypatch.setattr(modeling_mamba2, "mamba2_chunk_scan", ours_scan)
    names = ["hidden"] + [n for n, _ in mixer.named_parameters()]
    for name, got, want in zip(names, grads(), expected_grads, strict=True):
        assert_close(got, want, tol=1e-4, name=f"d{name}")


# ---- gpu tier -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, F32])
def test_gpu_grads_real_sizes(dtype):
    """h 64 p 64 n 128, 2 x 1000 tokens, chunk 256: Triton gradients against the torch backend in
    fp32 (16-bit: the inputs rounded once, so both see the same values), and deterministic."""
    kw = leaves(dict(b=2, l=1000, h=64, p=64, g=1, n=128), {}, True)
    kw = {k: v.to(dtype) if k in ("x", "B", "C", "z") else v for k, v in kw.items()}
    cots = [rnd(*kw["x"].shape), rnd(2, 64, 64, 128)]
    call = dict(chunk_size=256, dt_limit=(0.0, 0.9), return_final_states=True)
    got = ours("triton", kw, cots, **call)
    again = ours("triton", kw, cots, **call)
    want = ours("torch", {k: v.float() if k in ("x", "B", "C", "z") else v for k, v in kw.items()}, cots, **call)
    tol = 1e-4 if dtype == F32 else 3e-2
    for k in want:
        assert torch.equal(got[k], again[k]), f"d{k} not deterministic"
        assert_close(got[k].float(), want[k], tol=tol, name=f"d{k}")
