"""torch.autograd.gradcheck through the public API of every differentiable op, in float64 (which runs on
the torch backend): the analytical backward of each (closed-form or chunked, not autograd through the
forward) against finite differences."""

from __future__ import annotations

import pytest
import torch

from triton_kernels import (
    BackendUnavailableError,
    LoRAKernelMeta,
    causal_conv1d_fn,
    lora_linear,
    mamba_chunk_scan_combined,
    mamba_inner_fn,
    mamba_split_conv1d_scan_combined,
    rms_norm_gated,
    selective_scan_fn,
    use_backend,
)

F64 = torch.float64


def _leaves(*shapes, positive=(), negative=()):
    gen = torch.Generator().manual_seed(0)
    out = []
    for i, shape in enumerate(shapes):
        t = torch.randn(*shape, generator=gen, dtype=F64)
        if i in positive:
            t = t.abs() + 0.1
        if i in negative:
            t = -(t.abs() + 0.1)
        out.append(t.requires_grad_())
    return out


@pytest.mark.parametrize("groups", [0, 1, 2], ids=["B-per-channel", "B-one-group", "B-two-groups"])
def test_selective_scan_fn(groups):
    b, d, n, length = 1, 4, 3, 6
    bc = (d, n) if groups == 0 else (b, n, length) if groups == 1 else (b, groups, n, length)
    u, delta, A, B, C, D, z, bias = _leaves((b, d, length), (b, d, length), (d, n), bc, bc, (d,), (b, d, length),
                                            (d,), negative=(2,))

    def f(*args):
        return selective_scan_fn(*args, delta_softplus=True, return_last_state=True)

    assert torch.autograd.gradcheck(f, (u, delta, A, B, C, D, z, bias))


@pytest.mark.parametrize("chunk", [2, 4, 16])
def test_mamba_chunk_scan_combined(chunk):
    b, length, h, p, g, n = 1, 6, 2, 3, 1, 2
    x, dt, A, B, C, D, z, bias, init = _leaves((b, length, h, p), (b, length, h), (h,), (b, length, g, n),
                                               (b, length, g, n), (h,), (b, length, h, p), (h,), (b, h, p, n),
                                               positive=(1,), negative=(2,))

    def f(x, dt, A, B, C, D, z, bias, init):
        return mamba_chunk_scan_combined(x, dt, A, B, C, chunk, D=D, z=z, dt_bias=bias, initial_states=init,
                                         dt_softplus=True, return_final_states=True)

    assert torch.autograd.gradcheck(f, (x, dt, A, B, C, D, z, bias, init))


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_rms_norm_gated(norm_before_gate):
    x, w, z = _leaves((3, 8), (8,), (3, 8))
    assert torch.autograd.gradcheck(
        lambda x, w, z: rms_norm_gated(x, w, z, group_size=4, norm_before_gate=norm_before_gate), (x, w, z))


def test_lora_linear_two_slices_and_a_no_lora_token():
    meta = LoRAKernelMeta.make(2, 4, "cpu")
    meta.prepare_tensors(torch.tensor([0, -1, 1, 0]))
    x, a0, a1, b0, b1 = _leaves((4, 6), (2, 3, 6), (2, 3, 6), (2, 5, 3), (2, 4, 3))
    assert torch.autograd.gradcheck(lambda x, a0, a1, b0, b1: lora_linear(x, (a0, a1), (b0, b1), 0.5, meta),
                                    (x, a0, a1, b0, b1))


@pytest.mark.parametrize("form", ["initial-and-final-states", "seq-idx", "plain"])
def test_causal_conv1d_fn(form):
    x, w, b, init = _leaves((1, 3, 5), (3, 3), (3,), (1, 3, 2))
    if form == "initial-and-final-states":
        def f(x, w, b, init):
            return causal_conv1d_fn(x, w, b, "silu", initial_states=init, return_final_states=True)
        args = (x, w, b, init)
    elif form == "seq-idx":  # two sequences and a padding position
        seq_idx = torch.tensor([[0, 0, 1, 1, -1]])
        def f(x, w, b):
            return causal_conv1d_fn(x, w, b, "silu", seq_idx=seq_idx)
        args = (x, w, b)
    else:
        def f(x, w):
            return causal_conv1d_fn(x, w, return_final_states=True)
        args = (x, w)
    assert torch.autograd.gradcheck(f, args)


def test_mamba_inner_fn():
    d, n, r, w = 3, 2, 1, 3
    xz, conv_w, conv_b, x_proj, dt_proj, out_w, out_b, D, dt_bias, A = _leaves(
        (1, 2 * d, 4), (d, 1, w), (d,), (r + 2 * n, d), (d, r), (2, d), (2,), (d,), (d,), (d, n), negative=(9,))

    def f(xz, conv_w, conv_b, x_proj, dt_proj, out_w, out_b, D, dt_bias, A):
        return mamba_inner_fn(xz, conv_w, conv_b, x_proj, dt_proj, out_w, out_b, A, D=D, delta_bias=dt_bias)

    assert torch.autograd.gradcheck(f, (xz, conv_w, conv_b, x_proj, dt_proj, out_w, out_b, D, dt_bias, A))


def test_mamba_split_conv1d_scan_combined():
    h, p, n, w = 2, 2, 2, 3
    dim, conv = h * p, h * p + 2 * n
    zxbcdt, conv_w, conv_b, dt_bias, A, D, init, norm_w, out_w = _leaves(
        (1, 5, dim + conv + h), (conv, w), (conv,), (h,), (h,), (h,), (1, h, p, n), (dim,), (3, dim), negative=(4,))

    def f(zxbcdt, conv_w, conv_b, dt_bias, A, D, init, norm_w, out_w):
        return mamba_split_conv1d_scan_combined(zxbcdt, conv_w, conv_b, dt_bias, A, D, 4, initial_states=init,
                                                return_final_states=True, rmsnorm_weight=norm_w,
                                                outproj_weight=out_w, headdim=p)

    assert torch.autograd.gradcheck(f, (zxbcdt, conv_w, conv_b, dt_bias, A, D, init, norm_w, out_w))


def test_float64_is_refused_by_a_forced_kernel_backend():
    x, w = _leaves((2, 8), (8,))
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="not float64"):
        rms_norm_gated(x, w)
    x, w = _leaves((1, 3, 5), (3, 4))
    with use_backend("triton"), pytest.raises(BackendUnavailableError, match="not float64"):
        causal_conv1d_fn(x, w)
