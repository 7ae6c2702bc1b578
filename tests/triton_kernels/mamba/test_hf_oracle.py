"""Oracle: HF transformers' own Mamba reference (nothing downloaded, tiny random-init configs)."""

from __future__ import annotations

import pytest
import torch

from tests.utils import KERNEL_DEVICE, assert_close
from triton_kernels import selective_scan_fn, use_backend

modeling_mamba = pytest.importorskip("transformers.models.mamba.modeling_mamba")

pytestmark = pytest.mark.oracle


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_selective_scan_matches_hf_mamba_selective_scan(backend):
    """transformers' sequential scan (``mamba_selective_scan``, the MambaMixer slow path), in fp64."""
    bsz, dim, dstate, seqlen = 2, 10, 4, 33
    u, delta, z = (torch.randn(bsz, dim, seqlen) for _ in range(3))
    A = -torch.rand(dim, dstate) - 0.1
    B, C = torch.randn(bsz, dstate, seqlen), torch.randn(bsz, dstate, seqlen)
    D, bias = torch.randn(dim), torch.randn(dim) * 0.5
    hf_out, hf_state = modeling_mamba.mamba_selective_scan(
        *(t.double() for t in (u, delta, A, B, C, D, z, bias)), delta_softplus=True, return_last_state=True)
    dev = [t.to(KERNEL_DEVICE) for t in (u, delta, A, B, C, D, z, bias)]
    with use_backend(backend):
        out, state = selective_scan_fn(*dev, delta_softplus=True, return_last_state=True)
    assert_close(out, hf_out, name="out")
    assert_close(state, hf_state, name="last_state")


def test_mamba_mixer_with_our_scan_matches_hf_slow_path(monkeypatch):
    """A tiny random-init MambaMixer: its forward with our scan swapped in equals its own slow path."""
    config = modeling_mamba.MambaConfig(hidden_size=16, state_size=4, intermediate_size=24, conv_kernel=4,
                                        time_step_rank=4, num_hidden_layers=1)
    mixer = modeling_mamba.MambaMixer(config, layer_idx=0).to(KERNEL_DEVICE).eval()
    hidden = torch.randn(2, 19, 16, device=KERNEL_DEVICE)
    calls = []
    with torch.no_grad():
        expected = mixer(hidden)

        def ours(hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                 return_last_state=False, **_hf_flags):
            calls.append(tuple(hidden_states.shape))
            return selective_scan_fn(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus,
                                     return_last_state)

        monkeypatch.setattr(modeling_mamba, "mamba_selective_scan", ours)
        got = mixer(hidden)
    assert calls == [(2, 24, 19)], "the mixer did not call our scan"
    assert_close(got, expected, tol=1e-5)
