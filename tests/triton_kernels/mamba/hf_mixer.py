"""A ``MambaMixer.forward`` on our ops (conv, state update, scan), for the HF model oracles
(tests/triton_kernels/mamba/test_mamba_model_oracle.py, test_selective_scan_backward.py)."""

from __future__ import annotations

import types

import torch

from triton_kernels import use_backend
from triton_kernels.mamba.causal_conv1d import causal_conv1d_fn, causal_conv1d_update, causal_conv1d_varlen
from triton_kernels.mamba.state_update import selective_state_update

# The prefill scan is the sibling op under test elsewhere; under the CPU interpreter its Triton kernel
# takes ~30 s per call at these sizes, so here it runs on its torch backend (our ops stay on Triton).
SCAN_BACKEND = None if torch.cuda.is_available() else "torch"


def mixer_on_our_ops(run: types.SimpleNamespace):
    """A ``MambaMixer.forward`` replacement; ``run`` says the mode: ``cache`` None (whole sequences,
    no state), prefill (``decode`` False: varlen conv + scan, states written to ``slots``) or decode."""
    from triton_kernels.mamba import selective_scan_fn  # the prefill scan (the sibling op)

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        batch, length, _ = hidden_states.shape
        x, gate = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # [B, D, L] each
        weight, bias = self.conv1d.weight.squeeze(1), self.conv1d.bias
        A = -torch.exp(self.A_log.float())
        if run.cache is None:
            x = causal_conv1d_fn(x, weight, bias, "silu")
        else:
            conv_state, ssm_state = run.cache.layer(self.layer_idx)
            if run.decode:
                x = causal_conv1d_update(x[..., 0], conv_state, weight, bias, "silu",
                                         conv_state_indices=run.slots)[..., None]
            else:
                packed = x.transpose(0, 1).reshape(x.shape[1], batch * length)  # [D, T], sequence-major
                qsl = torch.arange(0, batch * length + 1, length, device=x.device, dtype=torch.int32)
                fresh = torch.zeros(batch, dtype=torch.bool, device=x.device)
                out = causal_conv1d_varlen(packed, weight, bias, conv_state, qsl, run.slots, fresh, "silu")
                x = out.reshape(-1, batch, length).transpose(0, 1)
        sizes = [self.time_step_rank, self.ssm_state_size, self.ssm_state_size]
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)), sizes, dim=-1)
        dt = self.dt_proj.weight @ dt.transpose(1, 2)  # [B, D, L]
        if run.cache is not None and run.decode:
            y = selective_state_update(
                ssm_state,
                x[..., 0],
                dt[..., 0],
                A,
                B[:, 0],
                C[:, 0],
                self.D,
                z=gate[..., 0],
                dt_bias=self.dt_proj.bias,
                dt_softplus=True,
                state_batch_indices=run.slots,
            )[..., None]
        else:
            with use_backend(SCAN_BACKEND):
                y, last = selective_scan_fn(
                    x,
                    dt,
                    A,
                    B.transpose(1, 2),
                    C.transpose(1, 2),
                    self.D.float(),
                    z=gate,
                    delta_bias=self.dt_proj.bias.float(),
                    delta_softplus=True,
                    return_last_state=True,
                )
            if run.cache is not None:
                ssm_state[run.slots.long()] = last.to(ssm_state.dtype)
        return self.out_proj(y.transpose(1, 2).to(hidden_states.dtype))

    return forward
