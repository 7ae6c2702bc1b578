"""What the Mamba-2 families get beyond HF's torch path (the shared oracle tests over every family
are in test_transformers.py): training through our differentiable chunk scan and conv (gradients
equal HF's), and packed sequences (``seq_idx``), which HF's torch path refuses."""

from __future__ import annotations

import pytest
import torch

from tests.pyiface.integrations.hf_models import build, ops_seen, prompt
from tests.utils import assert_close
from triton_kernels import use_backend

transformers = pytest.importorskip("transformers")
from pyiface.integrations.transformers import apply_kernels, revert_kernels  # noqa: E402

pytestmark = pytest.mark.oracle
# Relative error of fp32 gradients vs fp64: most are ~1e-6 on both paths; A_log's sums dt*A terms over
# every position with cancellation (seen: ours 2.4e-5, HF's own fp32 path 8e-6).
GRAD_TOL = 5e-5


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(autouse=True)
def _torch_backend_and_clean_patches():
    with use_backend(None if torch.cuda.is_available() else "torch"):
        yield
    revert_kernels()


def _grads(model, ids) -> dict[str, torch.Tensor]:
    model(ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_training_step_runs_our_ops_with_hf_gradients():
    """model.train() without a cache: HF's fused ``mamba2_split_conv1d_scan_combined`` returns None
    on its torch path, the mixer takes the unfused path, and that backpropagates through our ops.
    fp32 gradients within GRAD_TOL of HF's fp64 ones, per parameter."""
    ids = prompt(length=9)
    ref = _grads(build("mamba2", dtype=torch.float64).train(), ids)
    hf = _grads(build("mamba2").train(), ids)
    model = build("mamba2").train()
    apply_kernels(model)
    with ops_seen() as seen:
        ours = _grads(model, ids)
    assert seen >= {"ifk::mamba_chunk_scan", "ifk::causal_conv1d_fwd"}, seen
    assert ours.keys() == hf.keys() == ref.keys()
    for name in ref:
        hf_err, our_err = _rel(hf[name], ref[name]), _rel(ours[name], ref[name])
        assert our_err <= GRAD_TOL, (name, our_err, hf_err)


def test_packed_sequences_with_seq_idx_match_separate_runs():
    """Two prompts packed in one row with ``seq_idx`` (passed to the backbone: the CausalLM head does
    not forward it): each one's hidden states equal its own forward (conv and scan restart at the
    boundary). HF's torch path raises for ``seq_idx``."""
    first, second = prompt(batch=1, length=6), prompt(batch=1, length=5, seed=2)
    backbone = build("mamba2").backbone
    packed = torch.cat([first, second], 1)
    seq_idx = torch.tensor([[0] * 6 + [1] * 5], dtype=torch.int32)
    with torch.no_grad(), pytest.raises(ValueError, match="packed sequences"):
        backbone(packed, seq_idx=seq_idx)
    apply_kernels(backbone)
    with ops_seen() as seen, torch.no_grad():
        got = backbone(packed, seq_idx=seq_idx).last_hidden_state
    assert seen >= {"ifk::mamba_chunk_scan", "ifk::causal_conv1d_fwd"}, seen
    with torch.no_grad():
        expected = torch.cat([backbone(first).last_hidden_state, backbone(second).last_hidden_state], 1)
    assert_close(got, expected, tol=1e-5)
