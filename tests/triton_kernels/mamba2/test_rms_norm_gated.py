"""rms_norm_gated: every backend against one float64 oracle, both gate orders, groups, awkward sizes
(H not a power of two, 1 and 0 rows, a group wider than one block), strided inputs, bad input,
opcheck, torch.compile, HF transformers' Mamba-2 RMSNormGated as an oracle, and the gpu tier; the
backward likewise (gradients against autograd through the oracle, gradcheck, bit-for-bit
determinism, opcheck of ``ifk::rms_norm_gated_bwd``, torch.compile of forward + backward)."""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

from tests.utils import KERNEL_DEVICE, REL_TOL, assert_close, backends
from triton_kernels import BackendUnavailableError, rms_norm_gated, use_backend
from triton_kernels.registry import RMS_NORM_GATED

BACKENDS = backends(RMS_NORM_GATED)
# the module (the package attribute of the same name is the function)
RMS = importlib.import_module("triton_kernels.mamba2.rms_norm_gated")


def oracle(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """The definition in float64: per group of ``group_size`` channels, ``x / sqrt(mean(x^2) + eps)``
    times weight, with ``x * silu(z)`` normalised instead when the gate comes first."""
    x, w = x.double(), weight.double()
    gate = None if z is None else z.double() * torch.sigmoid(z.double())
    if gate is not None and not norm_before_gate:
        x = x * gate
    groups = x.unflatten(-1, (-1, group_size or x.shape[-1]))
    y = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * w
    return y * gate if gate is not None and norm_before_gate else y


def make(lead, hidden, dtype=torch.float32, gate=True, device=KERNEL_DEVICE):
    x = torch.randn(*lead, hidden, device=device).to(dtype)
    z = torch.randn(*lead, hidden, device=device).to(dtype) * 2 if gate else None
    return x, torch.randn(hidden, device=device) * 0.5 + 1.0, z


def leaves(*tensors):
    """Fresh leaves that require grad (None stays None)."""
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def grads_of(fn, dy, *inputs):
    """``(dx, dweight, dz)`` of ``(fn(*inputs) * dy).sum()`` (dz None without z)."""
    inputs = leaves(*inputs)
    fn(*inputs).backward(dy)
    return [None if t is None else t.grad for t in inputs]


def oracle_grads(dy, x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """Autograd through the float64 oracle."""
    double = [None if t is None else t.double() for t in (x, weight, z)]
    return grads_of(lambda *a: oracle(*a, eps, group_size, norm_before_gate), dy.double(), *double)


def assert_grads_close(got, expected, tol=None):
    for name, g, e in zip(("dx", "dweight", "dz"), got, expected):
        assert (g is None) == (e is None), name
        if g is not None:
            assert_close(g, e.to(g.dtype), tol=tol, name=name)


CASES = [
    pytest.param((7,), 37, None, True, id="M7-H37-nogate"),
    pytest.param((2, 3), 48, 12, True, id="B2xL3-H48-G12"),
    pytest.param((1,), 100, None, True, id="M1-H100"),
    pytest.param((5,), 96, 32, True, id="M5-H96-G32"),
    pytest.param((4,), 30, 1, True, id="M4-H30-G1"),
    pytest.param((3, 1), 24, 24, False, id="B3xL1-H24-nogate"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("norm_before_gate", [True, False], ids=["norm-gate", "gate-norm"])
@pytest.mark.parametrize(("lead", "hidden", "group_size", "gate"), CASES)
def test_matches_oracle(backend, dtype, norm_before_gate, lead, hidden, group_size, gate):
    x, w, z = make(lead, hidden, dtype, gate)
    with use_backend(backend):
        out = rms_norm_gated(x, w, z, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    assert out.dtype == dtype
    assert_close(out, oracle(x, w, z, 1e-5, group_size, norm_before_gate).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(backend):
    x, w, z = make((0, 3), 16)
    with use_backend(backend):
        out = rms_norm_gated(x, w, z, group_size=8)
    assert out.shape == (0, 3, 16)


@pytest.mark.parametrize("norm_before_gate", [True, False], ids=["norm-gate", "gate-norm"])
def test_group_wider_than_one_block(monkeypatch, norm_before_gate):
    """A group of 40 channels read in blocks of 16 (the two-pass path of groups above MAX_BLOCK)."""
    monkeypatch.setattr(RMS, "MAX_BLOCK", 16)
    x, w, z = make((3,), 80)
    with use_backend("triton"):
        out = rms_norm_gated(x, w, z, group_size=40, norm_before_gate=norm_before_gate)
    assert_close(out, oracle(x, w, z, 1e-6, 40, norm_before_gate).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """x and z as column slices of one projection (HF's split), and a transposed x (copied)."""
    proj = torch.randn(4, 5, 3 * 24, device=KERNEL_DEVICE)
    z, x = proj[..., :24], proj[..., 24:48]
    w = torch.randn(24, device=KERNEL_DEVICE)
    xt = torch.randn(24, 6, device=KERNEL_DEVICE).t()
    with use_backend(backend):
        out = rms_norm_gated(x, w, z, group_size=8, norm_before_gate=False)
        out_t = rms_norm_gated(xt, w, group_size=6)
    assert_close(out, oracle(x, w, z, 1e-6, 8, False).float())
    assert_close(out_t, oracle(xt, w, None, 1e-6, 6).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend):
    """fp16 x with an fp32 gate and a bf16 weight: out in x's dtype, math in fp32."""
    x, _, z = make((6,), 40, torch.float16)
    z, w = z.float(), torch.randn(40, device=KERNEL_DEVICE).to(torch.bfloat16)
    with use_backend(backend):
        out = rms_norm_gated(x, w, z)
    assert out.dtype == torch.float16
    assert_close(out, oracle(x, w, z).half())


def _hf_norm_class() -> type:
    """transformers' Mamba-2 gated norm class, under whichever name the installed release gives it."""
    modeling = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    from pyiface.integrations.transformers import mamba2_gated_norm_class

    return mamba2_gated_norm_class(modeling)


@pytest.mark.oracle
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [1, 4])
def test_oracle_hf_mamba_rms_norm_gated(backend, groups):
    """transformers' Mamba-2 ``RMSNormGated`` (what Mamba-2 models run): gate before the norm."""
    hidden = 72
    norm = _hf_norm_class()(hidden, group_size=hidden // groups, eps=1e-5).to(KERNEL_DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden))
    x, _, z = make((2, 3), hidden)
    with torch.no_grad():
        expected = norm(x, z)
    with use_backend(backend):
        out = rms_norm_gated(x, norm.weight.detach(), z, eps=1e-5, group_size=hidden // groups,
                             norm_before_gate=False)
    assert_close(out, expected)


@pytest.mark.parametrize("forced", ["cpu", "cuda"])
def test_forced_backend_without_kernel_raises(forced):
    x, w, z = make((2,), 8)
    with use_backend(forced), pytest.raises(BackendUnavailableError, match=f"no {forced} kernel"):
        rms_norm_gated(x, w, z)


def test_torch_library_opcheck():
    x, w, z = make((5,), 24)
    for inputs, nbg in (([x, w, z], True), ([x, w, z], False), ([x, w, None], True)):
        torch.library.opcheck(torch.ops.ifk.rms_norm_gated, (torch.empty_like(x), inputs, 1e-6, 8, nbg))


def test_torch_compile_fullgraph():
    x, w, z = make((2, 3), 24)
    fn = torch.compile(rms_norm_gated, fullgraph=True)
    out = fn(x, w, z, group_size=8, norm_before_gate=False)
    assert_close(out, oracle(x, w, z, 1e-6, 8, False).float())


def test_custom_op_rechecks_shapes():
    """The op itself refuses shapes the kernel would overrun (the wrapper's checks may be traced away)."""
    x, w, z = make((3,), 12)
    with pytest.raises(ValueError, match=r"group_size=5 must be >= 1 and divide the last dim H=12"):
        torch.ops.ifk.rms_norm_gated(torch.empty_like(x), [x, w, z], 1e-6, 5, True)
    with pytest.raises(ValueError, match=r"weight must have shape \[12\]"):
        torch.ops.ifk.rms_norm_gated(torch.empty_like(x), [x, w[:6], z], 1e-6, 12, True)
    with pytest.raises(ValueError, match=r"x needs a unit stride"):
        torch.ops.ifk.rms_norm_gated(torch.empty_like(x), [x.t().contiguous().t(), w, z], 1e-6, 12, True)


def _bad_args(**changes):
    x, w, z = make((3,), 12)
    args = dict(x=x, weight=w, z=z, eps=1e-6, group_size=4, norm_before_gate=True)
    args.update(changes)
    return args


BAD = [
    pytest.param(dict(group_size=5), ValueError, r"group_size=5 must be >= 1 and divide the last dim H=12",
                 id="group-not-dividing"),
    pytest.param(dict(group_size=0), ValueError, r"group_size=0 must be >= 1", id="group-zero"),
    pytest.param(dict(group_size=4.0), TypeError, r"group_size must be an int or None, got float", id="group-float"),
    pytest.param(dict(weight=torch.ones(13)), ValueError, r"weight must have shape \[12\], got \[13\]", id="weight"),
    pytest.param(dict(weight=torch.ones(1, 12)), ValueError, r"weight must have shape \[12\]", id="weight-2d"),
    pytest.param(dict(z=torch.ones(3, 6)), ValueError, r"z must have shape \[3, 12\], got \[3, 6\]", id="z-shape"),
    pytest.param(dict(x=torch.ones(3, 12, dtype=torch.int32)), TypeError, r"x must have dtype", id="x-int"),
    pytest.param(dict(x=torch.ones(3, 12, dtype=torch.int64)), TypeError, r"x must have dtype", id="x-int64"),
    pytest.param(dict(z=torch.ones(3, 12, dtype=torch.int64)), TypeError, r"z must have dtype", id="z-int"),
    pytest.param(dict(weight=[1.0] * 12), TypeError, r"weight must be a torch.Tensor, got list", id="weight-list"),
    pytest.param(dict(x=torch.ones(3, 0), weight=torch.ones(0), z=None), ValueError, r"last dim H >= 1",
                 id="H0"),
    pytest.param(dict(x=torch.tensor(1.0)), ValueError, r"last dim H >= 1", id="x-scalar"),
    pytest.param(dict(eps=-1.0), ValueError, r"eps must be a finite number >= 0, got -1.0", id="eps-negative"),
    pytest.param(dict(eps=float("nan")), ValueError, r"eps must be a finite number", id="eps-nan"),
    pytest.param(dict(weight=torch.ones(12, device="meta")), ValueError, r"weight is on meta", id="weight-device"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("changes", "exc", "match"), BAD)
def test_bad_input_raises(backend, changes, exc, match):
    with use_backend(backend), pytest.raises(exc, match=match):
        rms_norm_gated(**_bad_args(**changes))


# ---------------------------------------------------------------- backward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("norm_before_gate", [True, False], ids=["norm-gate", "gate-norm"])
@pytest.mark.parametrize(("lead", "hidden", "group_size", "gate"), CASES)
def test_grads_match_oracle(backend, dtype, norm_before_gate, lead, hidden, group_size, gate):
    x, w, z = make(lead, hidden, dtype, gate)
    dy = torch.randn_like(x)
    with use_backend(backend):
        got = grads_of(lambda *a: rms_norm_gated(*a, 1e-5, group_size, norm_before_gate), dy, x, w, z)
    assert [None if g is None else g.dtype for g in got] == [dtype, torch.float32, dtype if gate else None]
    assert_grads_close(got, oracle_grads(dy, x, w, z, 1e-5, group_size, norm_before_gate))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [True, False], ids=["gate", "nogate"])
def test_grads_zero_rows(backend, gate):
    x, w, z = make((0, 3), 16, gate=gate)
    with use_backend(backend):
        dx, dw, dz = grads_of(lambda *a: rms_norm_gated(*a, group_size=8), torch.randn(0, 3, 16), x, w, z)
    assert dx.shape == (0, 3, 16)
    assert torch.equal(dw, torch.zeros(16))
    assert dz is None if not gate else dz.shape == (0, 3, 16)


@pytest.mark.parametrize("norm_before_gate", [True, False], ids=["norm-gate", "gate-norm"])
def test_grads_group_wider_than_one_block(monkeypatch, norm_before_gate):
    """Groups of 40 channels read in blocks of 16: the two-pass backward, dweight accumulated in the
    workspace; 9 rows over 4 row blocks (the last one short)."""
    monkeypatch.setattr(RMS, "MAX_BLOCK", 16)
    x, w, z = make((9,), 80)
    dy = torch.randn_like(x)
    with use_backend("triton"):
        got = grads_of(lambda *a: rms_norm_gated(*a, 1e-6, 40, norm_before_gate), dy, x, w, z)
    assert_grads_close(got, oracle_grads(dy, x, w, z, 1e-6, 40, norm_before_gate))


@pytest.mark.parametrize("norm_before_gate", [True, False], ids=["norm-gate", "gate-norm"])
@pytest.mark.parametrize("gate", [True, False], ids=["gate", "nogate"])
def test_gradcheck_float64_torch_backend(norm_before_gate, gate):
    """The closed-form torch backward against finite differences (float64 through the autograd
    Function: the public op takes fp32/fp16/bf16 only)."""
    x, w, z = (None if t is None else t.double() for t in make((3, 2), 12, gate=gate))

    def fn(*a):
        return RMS._RMSNormGatedFn.apply(*a, 1e-5, 4, norm_before_gate)

    with use_backend("torch"):
        assert torch.autograd.gradcheck(fn, tuple(leaves(x, w, z)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_before_gate", [True, False], ids=["norm-gate", "gate-norm"])
def test_backward_is_deterministic(backend, norm_before_gate):
    """Twice the same backward, bit-identical gradients (dweight sums 33 rows over several row blocks)."""
    x, w, z = make((33,), 48, torch.float16)
    dy = torch.randn_like(x)
    with use_backend(backend):
        first, second = (grads_of(lambda *a: rms_norm_gated(*a, 1e-6, 16, norm_before_gate), dy, x, w, z)
                         for _ in range(2))
    for name, a, b in zip(("dx", "dweight", "dz"), first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_strided_inputs(backend):
    """x and z as column slices of one projection (HF's split): the gradient lands in the projection;
    ``out.sum()`` sends a stride-0 dy."""
    proj = torch.randn(4, 5, 3 * 24, device=KERNEL_DEVICE)
    w = torch.randn(24, device=KERNEL_DEVICE)

    def split(norm):
        return lambda p, w: norm(p[..., 24:48], w, p[..., :24], 1e-6, 8, False).sum()

    with use_backend(backend):
        got = grads_of(split(rms_norm_gated), torch.tensor(1.0), proj, w)
    expected = grads_of(split(oracle), torch.tensor(1.0, dtype=torch.float64), proj.double(), w.double())
    assert_close(got[0], expected[0].float(), name="dproj")
    assert_close(got[1], expected[1].float(), name="dweight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_mixed_dtypes(backend):
    """fp16 x with an fp32 gate and a bf16 weight: each gradient in its input's dtype."""
    x, _, z = make((6,), 40, torch.float16)
    z, w = z.float(), torch.randn(40, device=KERNEL_DEVICE).to(torch.bfloat16)
    dy = torch.randn_like(x)
    with use_backend(backend):
        got = grads_of(lambda *a: rms_norm_gated(*a, norm_before_gate=False), dy, x, w, z)
    assert [g.dtype for g in got] == [torch.float16, torch.bfloat16, torch.float32]
    expected = oracle_grads(dy, x, w, z, norm_before_gate=False)
    assert_grads_close(got, expected, tol=REL_TOL[torch.float16])
    assert_close(got[1], expected[1].to(torch.bfloat16), name="dweight")


@pytest.mark.oracle
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [1, 4])
def test_oracle_hf_mamba_rms_norm_gated_grads(backend, groups):
    """Gradients of transformers' Mamba-2 ``RMSNormGated`` (autograd through HF's fp32 torch code)."""
    hidden = 72
    norm = _hf_norm_class()(hidden, group_size=hidden // groups, eps=1e-5).to(KERNEL_DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden))
    x, _, z = make((2, 3), hidden)
    dy = torch.randn_like(x)
    hx, hz = leaves(x, z)
    norm(hx, hz).backward(dy)
    with use_backend(backend):
        got = grads_of(lambda *a: rms_norm_gated(*a, 1e-5, hidden // groups, False), dy, x, norm.weight.detach(), z)
    assert_grads_close(got, [hx.grad, norm.weight.grad, hz.grad])


def test_torch_library_opcheck_backward():
    """The backward op, and the forward op on inputs that require grad (what training calls)."""
    x, w, z = make((5,), 24)
    dy = torch.randn_like(x)
    for gate, nbg in ((z, True), (z, False), (None, True)):
        dz = None if gate is None else torch.empty_like(x)
        args = (torch.empty_like(x), dz, torch.empty_like(w), [dy, x, w, gate], 1e-6, 8, nbg)
        torch.library.opcheck(torch.ops.ifk.rms_norm_gated_bwd, args)
    torch.library.opcheck(torch.ops.ifk.rms_norm_gated, (torch.empty_like(x), leaves(x, w, z), 1e-6, 8, False))


def test_torch_compile_fullgraph_backward():
    x, w, z = make((2, 3), 24)
    dy = torch.randn_like(x)
    fn = torch.compile(lambda *a: rms_norm_gated(*a, group_size=8, norm_before_gate=False), fullgraph=True)
    assert_grads_close(grads_of(fn, dy, x, w, z), oracle_grads(dy, x, w, z, 1e-6, 8, False))


def test_backward_op_rechecks_shapes():
    x, w, z = make((3,), 12)
    dy, dx, dw = torch.randn_like(x), torch.empty_like(x), torch.empty_like(w)
    with pytest.raises(ValueError, match=r"dz must be given exactly when z is, got dz=None and z=a tensor"):
        torch.ops.ifk.rms_norm_gated_bwd(dx, None, dw, [dy, x, w, z], 1e-6, 12, True)
    with pytest.raises(ValueError, match=r"dy must have shape \[3, 12\], got \[3, 6\]"):
        torch.ops.ifk.rms_norm_gated_bwd(dx, torch.empty_like(x), dw, [dy[:, :6], x, w, z], 1e-6, 12, True)
    with pytest.raises(ValueError, match=r"dweight must have shape \[12\]"):
        torch.ops.ifk.rms_norm_gated_bwd(dx, torch.empty_like(x), dw[:4], [dy, x, w, z], 1e-6, 12, True)
    with pytest.raises(ValueError, match=r"dy needs a unit stride"):
        torch.ops.ifk.rms_norm_gated_bwd(dx, torch.empty_like(x), dw, [dy.t().contiguous().t(), x, w, z], 1e-6, 12,
                                         True)


# ---------------------------------------------------------------- gpu tier (real sizes, bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("norm_before_gate", [True, False], ids=["norm-gate", "gate-norm"])
@pytest.mark.parametrize(("rows", "hidden", "groups"), [(4096, 4096, 1), (1000, 8192, 8), (3, 20480, 1)],
                         ids=["M4096-H4096", "M1000-H8192-G8", "M3-H20480-twopass"])
def test_gpu_bf16_real_sizes(norm_before_gate, rows, hidden, groups):
    x, w, z = make((rows,), hidden, torch.bfloat16, device="cuda")
    out = rms_norm_gated(x, w, z, group_size=hidden // groups, norm_before_gate=norm_before_gate)
    ref = oracle(x, w, z, 1e-6, hidden // groups, norm_before_gate)
    assert_close(out, ref.to(torch.bfloat16), tol=REL_TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    x, w, z = make((64,), 1024, torch.bfloat16, device="cuda")
    torch.library.opcheck(torch.ops.ifk.rms_norm_gated, (torch.empty_like(x), [x, w, z], 1e-6, 256, False))
    compiled = torch.compile(rms_norm_gated, fullgraph=True)
    torch.testing.assert_close(compiled(x, w, z, group_size=256), rms_norm_gated(x, w, z, group_size=256))


@pytest.mark.gpu
@pytest.mark.parametrize("norm_before_gate", [True, False], ids=["norm-gate", "gate-norm"])
@pytest.mark.parametrize(("rows", "hidden", "groups"), [(4096, 4096, 1), (1000, 8192, 8), (3, 20480, 1)],
                         ids=["M4096-H4096", "M1000-H8192-G8", "M3-H20480-twopass"])
def test_gpu_bf16_grads_real_sizes(norm_before_gate, rows, hidden, groups):
    x, w, z = make((rows,), hidden, torch.bfloat16, device="cuda")
    dy = torch.randn_like(x)
    fn = functools.partial(rms_norm_gated, eps=1e-6, group_size=hidden // groups, norm_before_gate=norm_before_gate)
    got = grads_of(fn, dy, x, w, z)
    assert_grads_close(got, oracle_grads(dy, x, w, z, 1e-6, hidden // groups, norm_before_gate),
                       tol=REL_TOL[torch.bfloat16])
    for name, a, b in zip(("dx", "dweight", "dz"), got, grads_of(fn, dy, x, w, z)):
        assert torch.equal(a, b), f"{name} differs between two identical backward passes"


@pytest.mark.gpu
def test_gpu_backward_opcheck_and_compile():
    x, w, z = make((64,), 1024, torch.bfloat16, device="cuda")
    dy = torch.randn_like(x)
    args = (torch.empty_like(x), torch.empty_like(z), torch.empty_like(w), [dy, x, w, z], 1e-6, 256, False)
    torch.library.opcheck(torch.ops.ifk.rms_norm_gated_bwd, args)
    fn = functools.partial(rms_norm_gated, group_size=256, norm_before_gate=False)
    for name, a, b in zip(("dx", "dweight", "dz"), grads_of(torch.compile(fn, fullgraph=True), dy, x, w, z),
                          grads_of(fn, dy, x, w, z)):
        torch.testing.assert_close(a, b, msg=name)
