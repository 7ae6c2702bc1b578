"""The C++ CPU selective scan (csrc/mamba/selective_scan_cpu.cpp) against the float64 oracle
(triton_kernels/mamba/naive.py), its automatic choice on CPU, and the torch fallback when it
cannot be built."""

from __future__ import annotations

import pytest
import torch

import triton_kernels.mamba.selective_scan as scan_module
from tests.triton_kernels.mamba.scan_inputs import make_batched, make_varlen, ref64, varlen_expected
from tests.utils import assert_close, assert_equal, poisoned
from triton_kernels import PAD_SLOT_ID, _csrc, selective_scan_fn, selective_scan_varlen, use_backend


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    try:
        _csrc.load("mamba_cpu")
    except _csrc.ExtensionBuildError as exc:
        pytest.skip(f"no C++ toolchain here: {exc}")


@pytest.mark.parametrize(
    ("shape", "flags"),
    [
        pytest.param(dict(bsz=2, dim=37, dstate=16, seqlen=200), {}, id="L200-D37-N16-token"),
        pytest.param(dict(bsz=1, dim=10, dstate=4, seqlen=1, bc="group2"), {}, id="L1-D10-N4-G2"),
        pytest.param(dict(bsz=2, dim=6, dstate=3, seqlen=130, bc="channel"), dict(z=False, softplus=False),
                     id="L130-D6-N3-perchannelB"),
        pytest.param(dict(bsz=1, dim=8, dstate=16, seqlen=65, dtype=torch.bfloat16),
                     dict(D=False, bias=False), id="L65-D8-N16-bf16"),
        # bug 4: .contiguous() keeps any stride along a size-1 or empty dim; the kernel refused them
        pytest.param(dict(bsz=2, dim=5, dstate=1, seqlen=9), {}, id="L9-D5-N1"),
        pytest.param(dict(bsz=2, dim=5, dstate=1, seqlen=9, bc="channel"), {}, id="L9-D5-N1-perchannelB"),
        pytest.param(dict(bsz=0, dim=5, dstate=4, seqlen=9), {}, id="B0"),
        pytest.param(dict(bsz=2, dim=5, dstate=4, seqlen=0), {}, id="L0"),
    ],
)
def test_cpu_kernel_matches_reference(shape, flags):
    args = make_batched(**shape, **flags, device="cpu")
    ref_out, ref_state = ref64(args)
    with use_backend("cpu"):
        out, last = selective_scan_fn(**args, return_last_state=True)
    assert out.shape == ref_out.shape
    assert last.shape == ref_state.shape
    if out.numel():
        assert_close(out, ref_out.to(out.dtype) if out.dtype != torch.float32 else ref_out, name="out")
    if last.numel():
        assert_close(last, ref_state, tol=1e-5, name="last_state")


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_varlen_with_cache(state_dtype):
    args = make_varlen([70, 4, 1, 33], 9, 16, 3, num_slots=6, state_dtype=state_dtype, device="cpu")
    slots, has_init = [5, PAD_SLOT_ID, 0, 2], [True, True, False, True]
    ref_out, ref_states = varlen_expected(args, slots, has_init)
    before = args["ssm_states"].clone()
    out = poisoned(args["u"].shape, torch.float32, device="cpu")
    with use_backend("cpu"):
        selective_scan_varlen(**args, cache_indices=torch.tensor(slots), out=out,
                              has_initial_state=torch.tensor(has_init))
    written = ~torch.isnan(ref_out[0])
    assert_close(out[:, written], ref_out[:, written], name="out")
    assert int((~written).sum()) == 4
    assert torch.isnan(out[:, ~written]).all(), "a pad sequence's output columns were written"
    tol = 1e-5 if state_dtype == torch.float32 else 1.6e-2
    assert_close(args["ssm_states"][[5, 0, 2]].float(), ref_states[[5, 0, 2]].float(), tol=tol, name="states")
    assert_equal(args["ssm_states"][[1, 3, 4]], before[[1, 3, 4]], name="untouched slots")


def test_cpu_is_the_default_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = []
    launch = scan_module.scan_fwd_cpu
    monkeypatch.setattr(scan_module, "scan_fwd_cpu", lambda *a: calls.append(1) or launch(*a))
    args = make_batched(1, 5, 4, 9, device="cpu")
    assert_close(selective_scan_fn(**args), ref64(args)[0])
    assert calls == [1]


def test_falls_back_to_torch_with_a_warning_when_the_build_fails(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def broken(name):
        raise _csrc.ExtensionBuildError(f"could not build csrc extension {name!r} (test)")

    monkeypatch.setattr(_csrc, "load", broken)
    monkeypatch.setattr(scan_module, "scan_fwd_cpu", lambda *a: pytest.fail("the cpu kernel ran"))
    args = make_batched(1, 5, 4, 9, device="cpu")
    with pytest.warns(RuntimeWarning, match="falling back to the torch backend"):
        out = selective_scan_fn(**args)
    assert_close(out, ref64(args)[0])
    with use_backend("cpu"), pytest.raises(_csrc.ExtensionBuildError):
        selective_scan_fn(**args)
