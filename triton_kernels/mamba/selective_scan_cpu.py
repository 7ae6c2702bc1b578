"""The selective scan's forward on the C++ CPU kernel (``csrc/mamba/selective_scan_cpu.cpp``, op
``ifk::selective_scan_cpu``, built on first use)."""

from __future__ import annotations

import torch


def _as_f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def scan_fwd_cpu(out, state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, qsl, cache_indices,
                has_initial_state, pad_slot_id) -> None:
    """The C++ kernel takes fp32, and B/C token-major ``[Bb, G, L, N]`` (copies the size of B and C;
    a per-channel ``[D, N]`` becomes a zero-stride ``[1, D, L, N]`` view); fp16/bf16 buffers
    round-trip through fp32 copies."""
    seqlen = u.shape[2]

    def token_major(M: torch.Tensor) -> torch.Tensor:
        M = M.float()
        if M.dim() == 2:
            M = M.contiguous()
            return M.as_strided((1, M.shape[0], seqlen, M.shape[1]), (0, M.shape[1], 0, 1))
        return M.transpose(-1, -2).contiguous()

    out32 = out if out.dtype == torch.float32 else out.float()
    state32 = state if state is None or state.dtype == torch.float32 else state.float()
    torch.ops.ifk.selective_scan_cpu(
        out32, state32, _as_f32(u), _as_f32(delta), A.float(), token_major(B), token_major(C), _as_f32(D),
        _as_f32(z), _as_f32(delta_bias), delta_softplus, None if qsl is None else qsl.long(),
        None if cache_indices is None else cache_indices.long(), has_initial_state, pad_slot_id,
    )
    if out32 is not out:
        out.copy_(out32)
    if state32 is not state:
        state.copy_(state32)
