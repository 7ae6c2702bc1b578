"""The causal conv1d backward (``ifk::causal_conv1d_bwd``, triton_kernels/mamba/causal_conv1d_bwd.py):
every backend's gradients of ``causal_conv1d_fn`` against autograd through the float64 oracle
(W 2/3/4, L 0/1/7/65, bias, silu, initial and final states, seq_idx, transposed x, several
workspace chunks), determinism, opcheck, torch.compile, bad input, gpu tier. Outputs are poisoned
by the package (IFK_POISON_OUTPUTS=1 in conftest)."""

from __future__ import annotations

import pytest
import torch

from tests import utils
from tests.utils import KERNEL_DEVICE, assert_close, backends
from triton_kernels import use_backend
from triton_kernels.mamba import naive as oracle
from triton_kernels.mamba.causal_conv1d import causal_conv1d_fn
from triton_kernels.registry import CAUSAL_CONV1D

BACKENDS = backends(CAUSAL_CONV1D)
NAMES = ["x", "weight", "bias", "initial_states"]


def rnd(*shape, grad=False, **kwargs):
    """:func:`tests.utils.rnd`, a leaf that requires grad when ``grad``."""
    return utils.rnd(*shape, **kwargs).requires_grad_(grad)


def _seq_idx(batch, length, cuts, device=KERNEL_DEVICE):
    """``[B, L]`` int32: row b holds sequences split at the positions ``cuts[b]``."""
    rows = [[sum(t >= c for c in cuts[b]) for t in range(length)] for b in range(batch)]
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _grads(fn, leaves, d_out, d_final):
    """Gradients of ``fn() -> (out, final | None)`` for ``leaves`` (None kept) given the incoming
    ``d_out`` / ``d_final``; an empty ``out`` (L = 0) takes no gradient."""
    out, final = fn()
    outs, grads = [], []
    if out.numel():
        outs, grads = [out], [d_out.to(out.dtype)]
    if final is not None:
        outs, grads = [*outs, final], [*grads, d_final.to(final.dtype)]
    live = [t for t in leaves if t is not None]
    found = iter(torch.autograd.grad(outs, live, grads, allow_unused=True, materialize_grads=True))
    return [None if t is None else next(found) for t in leaves]


def check_against_oracle(backend, x, weight, bias, act, init=None, seq_idx=None, final=False, tol=None):
    """Our gradients (``backend``) == autograd through the float64 oracle, for every leaf (with
    causal-conv1d's padding rule: the output is 0 where ``seq_idx < 0``); returns ours."""
    d_out, d_final = rnd(*x.shape, dtype=x.dtype), rnd(*x.shape[:2], weight.shape[1] - 1, dtype=x.dtype)
    leaves = [x, weight, bias, init]

    def ours():
        with use_backend(backend):
            res = causal_conv1d_fn(x, weight, bias, act, initial_states=init, seq_idx=seq_idx,
                                   return_final_states=final)
        return res if final else (res, None)

    def ref():
        out, fin = oracle.causal_conv1d(x, weight, bias, act is not None, init, seq_idx=seq_idx)
        if seq_idx is not None:
            out = out * (seq_idx >= 0)[:, None, :]
        return out, fin if final else None

    got = _grads(ours, leaves, d_out, d_final)
    want = _grads(ref, leaves, d_out.double(), d_final.double())
    for name, g, r, leaf in zip(NAMES, got, want, leaves):
        if leaf is not None:
            assert g.dtype == leaf.dtype, name
            assert_close(g, r, tol, name=f"d_{name}")
    return got


# ------------------------------------------------------------------ against the oracle

FLAGS = [  # (bias, activation, initial states, final states with an incoming gradient)
    pytest.param(True, "silu", True, True, id="bias-silu-init-final"),
    pytest.param(False, None, False, False, id="plain"),
    pytest.param(False, "silu", False, True, id="silu-final"),
    pytest.param(True, None, True, False, id="bias-init"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [2, 3, 4, 8])
@pytest.mark.parametrize("length", [0, 1, 7, 65])
@pytest.mark.parametrize(("has_bias", "act", "has_init", "final"), FLAGS)
def test_grads_match_oracle(backend, width, length, has_bias, act, has_init, final):
    batch, dim = 2, 5
    x, weight = rnd(batch, dim, length, grad=True), rnd(dim, width, grad=True)
    bias = rnd(dim, grad=True) if has_bias else None
    init = rnd(batch, dim, width - 1, grad=True) if has_init else None
    check_against_oracle(backend, x, weight, bias, act, init, final=final)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_fp16(backend):
    x, weight, bias = (rnd(2, 19, 70, dtype=torch.float16, grad=True), rnd(19, 4, dtype=torch.float16, grad=True),
                       rnd(19, dtype=torch.float16, grad=True))
    init = rnd(2, 19, 3, dtype=torch.float16, grad=True)
    check_against_oracle(backend, x, weight, bias, "silu", init, final=True, tol=4e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [2, 3, 4, 6])
@pytest.mark.parametrize("act", [None, "silu"])
def test_grads_seq_idx(backend, width, act):
    """Cuts inside a tile, at a tile boundary (64) and right after it; a one-token sequence."""
    x, weight, bias = rnd(2, 6, 70, grad=True), rnd(6, width, grad=True), rnd(6, grad=True)
    seq_idx = _seq_idx(2, 70, [[3, 4, 9, 64], [1, 63, 65]])
    check_against_oracle(backend, x, weight, bias, act, seq_idx=seq_idx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [2, 4, 8])
@pytest.mark.parametrize("act", [None, "silu"])
def test_grads_seq_idx_padding(backend, width, act):
    """causal-conv1d's padding (seq_idx < 0: output 0) at a row start, across the tile boundary at 64
    and at the end: no gradient reaches a padding position, nor d_weight / d_bias from one."""
    rows = [[-1] * 3 + [0] * 58 + [-1] * 6 + [1] * 3, [0] * 5 + [1] * 60 + [-3] * 5]
    seq_idx = torch.tensor(rows, dtype=torch.int32, device=KERNEL_DEVICE)
    x, weight, bias = rnd(2, 6, 70, grad=True), rnd(6, width, grad=True), rnd(6, grad=True)
    d_x = check_against_oracle(backend, x, weight, bias, act, seq_idx=seq_idx)[0]
    pad = (seq_idx < 0)[:, None, :].expand_as(d_x)
    assert torch.equal(d_x[pad], torch.zeros_like(d_x[pad])), "d_x at padding positions"


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_transposed_x_and_strided_grad(backend):
    """x as a transposed ``[B, L, 2D]`` in_proj slice (stride_l = 2D), the incoming gradient a
    transposed view too; the weight as HF's ``[D, 1, W]`` conv weight squeezed."""
    proj = rnd(2, 33, 2 * 12, grad=True)
    x = proj.transpose(1, 2)[:, :12]
    conv_weight = rnd(12, 1, 4, grad=True)
    with use_backend(backend):
        out = causal_conv1d_fn(x, conv_weight.squeeze(1), None, "silu")
    d_out = rnd(2, 33, 12).transpose(1, 2)
    got = torch.autograd.grad([out], [proj, conv_weight], [d_out])
    ref = oracle.causal_conv1d(x, conv_weight.squeeze(1), None, True)[0]
    want = torch.autograd.grad([ref], [proj, conv_weight], [d_out.double()])
    for name, g, r in zip(["proj", "weight"], got, want):
        assert_close(g, r, name=f"d_{name}")


def test_grads_several_chunks_are_deterministic():
    """L = 530: 9 tiles of 64, 2 workspace rows per sequence; every backend twice bit-identical,
    and right (one oracle run for both)."""
    x, weight, bias = rnd(2, 3, 530, grad=True), rnd(3, 4, grad=True), rnd(3, grad=True)
    init, d_out, d_final = rnd(2, 3, 3, grad=True), rnd(2, 3, 530), rnd(2, 3, 3)
    leaves = [x, weight, bias, init]
    ref_out, ref_final = oracle.causal_conv1d(x, weight, bias, True, init)
    want = torch.autograd.grad([ref_out, ref_final], leaves, [d_out.double(), d_final.double()])

    def grads(backend):
        with use_backend(backend):
            out, final = causal_conv1d_fn(x, weight, bias, "silu", initial_states=init, return_final_states=True)
        return torch.autograd.grad([out, final], leaves, [d_out, d_final])

    for backend in BACKENDS:
        first, second = grads(backend), grads(backend)
        for name, a, b, r in zip(NAMES, first, second, want):
            assert torch.equal(a, b), f"{backend}: d_{name} differs between two runs"
            assert_close(a, r, name=f"{backend} d_{name}")


# ------------------------------------------------------------------ registration


def test_torch_library_opcheck():
    x, w, b, init = rnd(2, 6, 9), rnd(6, 4), rnd(6), rnd(2, 6, 3)
    d_out, d_final = rnd(2, 6, 9), rnd(2, 6, 3)
    torch.library.opcheck(
        torch.ops.ifk.causal_conv1d_bwd,
        (torch.empty_like(x), torch.empty_like(w), torch.empty_like(b), torch.empty_like(init),
         [x, w, b, init, None, d_out, d_final], True),
    )
    seq_idx = _seq_idx(2, 9, [[2, 3], [5]])
    torch.library.opcheck(
        torch.ops.ifk.causal_conv1d_bwd,
        (torch.empty_like(x), torch.empty_like(w), None, None, [x, w, None, None, seq_idx, d_out, None], False),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_forward_and_backward(backend):
    x, weight, bias, init = rnd(2, 10, 13, grad=True), rnd(10, 3, grad=True), rnd(10, grad=True), \
        rnd(2, 10, 2, grad=True)

    def loss(x, weight, bias, init):
        out, final = causal_conv1d_fn(x, weight, bias, "silu", initial_states=init, return_final_states=True)
        return out.square().sum() + (final * final.detach()).sum()

    with use_backend(backend):
        got = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x, weight, bias, init), [x, weight, bias, init])
    ref_out, ref_final = oracle.causal_conv1d(x, weight, bias, True, init)
    ref = ref_out.square().sum() + (ref_final * ref_final.detach()).sum()
    for name, g, r in zip(NAMES, got, torch.autograd.grad(ref, [x, weight, bias, init])):
        assert_close(g, r, name=f"d_{name}")


@pytest.mark.parametrize(("d_out_shape", "d_final_shape", "match"), [
    pytest.param((2, 6, 8), None, r"d_out must have shape \[2, 6, 9\]", id="d_out"),
    pytest.param((2, 6, 9), (2, 6, 2), r"d_final must have shape \[2, 6, 3\]", id="d_final"),
])
def test_op_bad_gradient_shapes_write_nothing(d_out_shape, d_final_shape, match):
    """The op checks the incoming gradients' shapes itself (its body is what runs under compile)."""
    x, w = rnd(2, 6, 9), rnd(6, 4)
    d_x, d_w = torch.zeros_like(x), torch.zeros_like(w)
    d_final = None if d_final_shape is None else rnd(*d_final_shape)
    with pytest.raises(ValueError, match=match):
        torch.ops.ifk.causal_conv1d_bwd(d_x, d_w, None, None, [x, w, None, None, None, rnd(*d_out_shape), d_final],
                                        True)
    assert not d_x.any()
    assert not d_w.any()


# ------------------------------------------------------------------ gpu tier (real sizes)

GPU_CHANNELS = [*range(40), *range(4090, 4096)]  # the oracle's token loop on every channel would take minutes


def _oracle_grads_on_channels(channels, x, weight, bias, init, seq_idx, d_out, d_final):
    """Autograd through the float64 oracle on the given channels only (a depthwise conv: each
    channel's gradients depend on that channel alone): ``[d_x, d_weight, d_bias, d_init]``."""
    idx = torch.tensor(channels, device=x.device)

    def leaf(t, dim):
        return None if t is None else t.detach().index_select(dim, idx).double().requires_grad_()

    leaves = [leaf(x, 1), leaf(weight, 0), leaf(bias, 0), leaf(init, 1)]
    out, fin = oracle.causal_conv1d(leaves[0], leaves[1], leaves[2], True, leaves[3], seq_idx=seq_idx)
    outs, grads = [out], [d_out.index_select(1, idx).double()]
    if d_final is not None:
        outs, grads = [out, fin], [*grads, d_final.index_select(1, idx).double()]
    live = [t for t in leaves if t is not None]
    found = iter(torch.autograd.grad(outs, live, grads))
    return [None if t is None else next(found) for t in leaves], idx


@pytest.mark.gpu
@pytest.mark.parametrize("seq", [False, True], ids=["init-final", "seq_idx"])
def test_gpu_grads_bf16_real_size(seq):
    """B 2, D 4096, L 2048, bf16: against the float64 oracle, and bit-identical twice."""
    batch, dim, length = 2, 4096, 2048
    x = rnd(batch, dim, length, dtype=torch.bfloat16, device="cuda", grad=True)
    weight = rnd(dim, 4, dtype=torch.bfloat16, device="cuda", grad=True)
    bias = rnd(dim, dtype=torch.bfloat16, device="cuda", grad=True)
    init = None if seq else rnd(batch, dim, 3, dtype=torch.bfloat16, device="cuda", grad=True)
    seq_idx = _seq_idx(batch, length, [[100, 101, 700], [5]], device="cuda") if seq else None
    d_out = rnd(batch, dim, length, dtype=torch.bfloat16, device="cuda")
    d_final = None if seq else rnd(batch, dim, 3, dtype=torch.bfloat16, device="cuda")
    leaves = [x, weight, bias, init]

    def grads():
        res = causal_conv1d_fn(x, weight, bias, "silu", initial_states=init, seq_idx=seq_idx,
                               return_final_states=not seq)
        outs, grad_outs = ([res], [d_out]) if seq else (list(res), [d_out, d_final])
        found = iter(torch.autograd.grad(outs, [t for t in leaves if t is not None], grad_outs))
        return [None if t is None else next(found) for t in leaves]

    first, second = grads(), grads()
    want, idx = _oracle_grads_on_channels(GPU_CHANNELS, x, weight, bias, init, seq_idx, d_out, d_final)
    for name, a, b, r, dim_c in zip(NAMES, first, second, want, [1, 0, 0, 1]):
        if a is not None:
            assert torch.equal(a, b), f"d_{name} differs between two runs"
            assert_close(a.index_select(dim_c, idx), r, name=f"d_{name}")


@pytest.mark.gpu
def test_gpu_transposed_x_compile_and_opcheck():
    """x as a ``[B, L, D]`` view (stride_l = D), fwd + bwd under torch.compile(fullgraph=True)."""
    x = rnd(2, 1024, 4096, dtype=torch.bfloat16, device="cuda").transpose(1, 2).requires_grad_()
    weight = rnd(4096, 4, dtype=torch.bfloat16, device="cuda", grad=True)
    bias = rnd(4096, dtype=torch.bfloat16, device="cuda", grad=True)
    d_out = rnd(2, 4096, 1024, dtype=torch.bfloat16, device="cuda")

    def run(x, weight, bias):
        return causal_conv1d_fn(x, weight, bias, "silu")

    got = torch.autograd.grad(torch.compile(run, fullgraph=True)(x, weight, bias), [x, weight, bias], [d_out])
    want, idx = _oracle_grads_on_channels(GPU_CHANNELS, x, weight, bias, None, None, d_out, None)
    for name, g, r, dim_c in zip(NAMES, got, want, [1, 0, 0]):
        assert_close(g.index_select(dim_c, idx), r, name=f"d_{name}")
    xs, ws, bs, ds = x.detach()[:, :64, :100], weight.detach()[:64], bias.detach()[:64], d_out[:, :64, :100]
    torch.library.opcheck(
        torch.ops.ifk.causal_conv1d_bwd,
        (torch.empty_like(xs), torch.empty_like(ws), torch.empty_like(bs), None, [xs, ws, bs, None, None, ds, None],
         True),
    )
