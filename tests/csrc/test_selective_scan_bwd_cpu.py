"""The C++ CPU selective scan backward (csrc/mamba/selective_scan_cpu.cpp, launched by
triton_kernels/mamba/selective_scan_bwd_cpu.py) against autograd through the float64 sequential oracle
(triton_kernels/mamba/naive.py): every B/C form, each optional input on and off, dlast,
awkward lengths around the kernel's 64-token chunks, empty batch and length, and bit-identical
gradients run to run and across OpenMP thread counts."""

from __future__ import annotations

import pytest
import torch

from tests.triton_kernels.mamba.scan_inputs import make_batched
from tests.utils import assert_close, rnd
from triton_kernels import _csrc
from triton_kernels.mamba import naive as oracle
from triton_kernels.mamba.selective_scan_bwd_cpu import scan_bwd_cpu

INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")  # the order of scan_bwd_cpu's grads


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    try:
        _csrc.load("mamba_cpu")
    except _csrc.ExtensionBuildError as exc:
        pytest.skip(f"no C++ toolchain here: {exc}")


def make_case(bsz, dim, dstate, seqlen, *, bc="token", dlast=True, dtype=torch.float32, **flags):
    """Inputs (``bc`` also "perchannelBC": both B and C ``[D, N]``), dout ``[Bt, D, L]`` and dlast."""
    args = make_batched(bsz, dim, dstate, seqlen, bc="channel" if bc == "perchannelBC" else bc, dtype=dtype,
                        device="cpu", **flags)
    if bc == "perchannelBC":
        args["C"] = rnd(dim, dstate, dtype=dtype, device="cpu")
    dout = rnd(bsz, dim, seqlen, device="cpu")
    return args, dout, rnd(bsz, dim, dstate, device="cpu") if dlast else None


def oracle_grads(args, dout, dlast) -> dict[str, torch.Tensor]:
    """float64 gradients of ``sum(out * dout) + sum(last * dlast)`` through the sequential oracle."""
    leaves = {k: args[k].double().requires_grad_() for k in INPUTS if args[k] is not None}
    out, last = oracle.selective_scan(**leaves, delta_softplus=args["delta_softplus"])
    loss = (out * dout.double()).sum() + (0 if dlast is None else (last * dlast.double()).sum())
    if not loss.requires_grad:  # an empty batch or length: nothing depends on the inputs
        return {k: torch.zeros_like(t) for k, t in leaves.items()}
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(leaves, grads))


def cpu_grads(args, dout, dlast) -> dict[str, torch.Tensor | None]:
    """scan_bwd_cpu's grads, called as the autograd wiring calls it: B/C ``[Bt, N, L]`` as one group."""
    B, C = (args[k][:, None] if args[k].dim() == 3 else args[k] for k in ("B", "C"))
    grads = scan_bwd_cpu(dout, dlast, args["u"], args["delta"], args["A"], B, C, args["D"], args["z"],
                         args["delta_bias"], args["delta_softplus"])
    grads = dict(zip(INPUTS, grads))
    for k in ("B", "C"):
        grads[k] = grads[k][:, 0] if args[k].dim() == 3 else grads[k]
    return grads


CASES = [
    pytest.param(dict(bsz=2, dim=5, dstate=4, seqlen=1), {}, id="L1-D5-N4-token"),
    pytest.param(dict(bsz=1, dim=14, dstate=16, seqlen=7, bc="group2"), {}, id="L7-D14-N16-G2"),
    pytest.param(dict(bsz=2, dim=19, dstate=1, seqlen=63), dict(z=False, bias=False), id="L63-D19-N1-noz-nobias"),
    pytest.param(dict(bsz=1, dim=3, dstate=4, seqlen=300, bc="channel"), dict(D=False, softplus=False),
                 id="L300-D3-N4-perchannelB-noD-nosoftplus"),
    pytest.param(dict(bsz=2, dim=37, dstate=5, seqlen=130), {}, id="L130-D37-N5-token-3blocks"),
    pytest.param(dict(bsz=2, dim=40, dstate=3, seqlen=65, bc="group2"), dict(z=False), id="L65-D40-N3-G2-noz"),
    pytest.param(dict(bsz=2, dim=6, dstate=2, seqlen=64, bc="perchannelBC", dlast=False),
                 dict(D=False, bias=False, softplus=False), id="L64-D6-N2-perchannelBC-bare-nodlast"),
    pytest.param(dict(bsz=1, dim=4, dstate=3, seqlen=7, dlast=False), {}, id="L7-D4-N3-nodlast"),
    pytest.param(dict(bsz=1, dim=6, dstate=16, seqlen=70, bc="group2", dtype=torch.float16), {},
                 id="L70-D6-N16-G2-fp16"),
    pytest.param(dict(bsz=0, dim=5, dstate=4, seqlen=9), {}, id="B0"),
    pytest.param(dict(bsz=0, dim=4, dstate=4, seqlen=9, bc="channel"), {}, id="B0-perchannelB"),
    pytest.param(dict(bsz=2, dim=6, dstate=4, seqlen=0, bc="group2"), {}, id="L0"),
    pytest.param(dict(bsz=2, dim=5, dstate=4, seqlen=0, bc="channel"), {}, id="L0-perchannelB"),
]


@pytest.mark.parametrize(("shape", "flags"), CASES)
def test_grads_match_oracle(shape, flags):
    args, dout, dlast = make_case(**shape, **flags)
    ref = oracle_grads(args, dout, dlast)
    ours = cpu_grads(args, dout, dlast)
    for name in INPUTS:
        if args[name] is None:
            assert ours[name] is None, name
            continue
        assert ours[name].dtype == torch.float32, name
        assert ours[name].shape == args[name].shape, name
        if ours[name].numel():
            assert_close(ours[name], ref[name], name=f"d{name}")


def test_noncontiguous_dout_and_inputs():
    """An expanded dout (the gradient of a sum), and u, delta, z with non-unit strides along L."""
    args, _, dlast = make_case(2, 9, 4, 20)
    for k in ("u", "delta", "z"):
        args[k] = args[k].transpose(1, 2).contiguous().transpose(1, 2)  # channel-major: stride 9 along L
    dout = torch.tensor(0.7).expand(2, 9, 20)
    ref = oracle_grads(args, dout, dlast)
    ours = cpu_grads(args, dout, dlast)
    for name in INPUTS:
        assert_close(ours[name], ref[name], name=f"d{name}")


@pytest.mark.parametrize("bc", ["token", "group2", "channel"])
def test_deterministic_across_runs_and_thread_counts(bc):
    """Bit-identical gradients: twice, and with 1 and 2 OpenMP threads (torch.set_num_threads drives
    the one libgomp the extension shares with torch)."""
    args, dout, dlast = make_case(2, 40, 16, 150, bc=bc)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (2, 2, 1):
            torch.set_num_threads(n)
            runs.append(cpu_grads(args, dout, dlast))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for name in INPUTS:
            assert torch.equal(run[name], runs[0][name]), f"d{name} differs between runs"


def test_refuses_inconsistent_shapes():
    """The op's own checks (the launcher trusts its caller): a dlast of the wrong shape is refused
    before anything is read out of bounds."""
    args, dout, _ = make_case(2, 5, 4, 9)
    with pytest.raises(RuntimeError, match="dlast has shape"):
        cpu_grads(args, dout, torch.randn(2, 5, 3))
