"""Oracle: HF transformers' own Mamba-2 torch path (``modeling_mamba2.mamba2_chunk_scan``, the
chunked scan of ``Mamba2Mixer``), nothing downloaded, tiny random-init configs."""

from __future__ import annotations

import pytest
import torch

from tests.utils import KERNEL_DEVICE, assert_close, backends
from triton_kernels import mamba_chunk_scan_combined, use_backend
from triton_kernels.registry import MAMBA_CHUNK_SCAN

modeling_mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")

pytestmark = pytest.mark.oracle

BACKENDS = backends(MAMBA_CHUNK_SCAN)
TOL = 2e-5  # both sides fp32 (HF casts to fp32), summed in different orders


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("seqlen", "groups", "dh"), [(100, 2, "h"), (64, 1, "hp"), (33, 4, "h")],
                         ids=["L100-g2", "L64-g1-Dhp", "L33-g=h"])
def test_chunk_scan_matches_hf_mamba2_chunk_scan(backend, seqlen, groups, dh):
    """transformers' chunked torch scan with initial states, dt_bias, softplus and a dt limit."""
    b, h, p, n = 2, 4, 16, 8
    x = torch.randn(b, seqlen, h, p)
    dt = torch.randn(b, seqlen, h) * 0.5
    A = -(torch.rand(h) + 0.05)
    B, C = torch.randn(b, seqlen, groups, n), torch.randn(b, seqlen, groups, n)
    D = torch.randn(h) if dh == "h" else torch.randn(h, p)
    dt_bias, init = torch.randn(h) * 0.5, torch.randn(b, h, p, n)
    kw = dict(chunk_size=32, D=D, dt_bias=dt_bias, initial_states=init, dt_softplus=True, dt_limit=(0.0, 0.9),
              return_final_states=True)
    if dh == "hp":  # HF's skip broadcasts only a [h] D: add the [h, p] one outside
        hf_out, hf_state = modeling_mamba2.mamba2_chunk_scan(x, dt, A, B, C, **{**kw, "D": None})
        hf_out = hf_out + D * x
    else:
        hf_out, hf_state = modeling_mamba2.mamba2_chunk_scan(x, dt, A, B, C, **kw)
    dev = {k: v.to(KERNEL_DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with use_backend(backend):
        out, state = mamba_chunk_scan_combined(*(t.to(KERNEL_DEVICE) for t in (x, dt, A, B, C)), **dev)
    assert_close(out, hf_out, tol=TOL, name="out")
    assert_close(state, hf_state, tol=TOL, name="final_states")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mamba2_mixer_with_our_scan_matches_hf_torch_forward(backend, monkeypatch):
    """A tiny random-init Mamba2Mixer: its forward with our op swapped in for the chunked scan
    equals its own torch path."""
    config = modeling_mamba2.Mamba2Config(hidden_size=32, num_heads=4, head_dim=16, expand=2, state_size=16,
                                          n_groups=2, chunk_size=16, conv_kernel=4, num_hidden_layers=1)
    mixer = modeling_mamba2.Mamba2Mixer(config, layer_idx=0).to(KERNEL_DEVICE).eval()
    hidden = torch.randn(2, 37, 32, device=KERNEL_DEVICE)
    calls = []
    with torch.no_grad():
        expected = mixer(hidden)

        def ours(*args, **kwargs):
            calls.append(tuple(args[0].shape))
            with use_backend(backend):
                return mamba_chunk_scan_combined(*args, **kwargs)

        monkeypatch.setattr(modeling_mamba2, "mamba2_chunk_scan", ours)
        got = mixer(hidden)
    assert calls == [(2, 37, 4, 16)], "the mixer did not call our scan"
    assert_close(got, expected, tol=TOL)
