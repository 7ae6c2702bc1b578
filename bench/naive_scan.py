"""The naive Triton selective scan, a benchmark baseline: one program per (batch, channel) walks the
sequence one token at a time with an ``[N]`` state. Contiguous ``[B, D, L]`` inputs, B/C ``[B, N, L]``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _naive_scan_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
                       seqlen, dim, dstate, BLOCK_N: tl.constexpr):
    i_b = tl.program_id(0).to(tl.int64)
    i_d = tl.program_id(1)
    o_n = tl.arange(0, BLOCK_N)
    m_n = o_n < dstate
    row = (i_b * dim + i_d) * seqlen
    p_bc = i_b * dstate * seqlen + o_n * seqlen
    b_a = tl.load(A_ptr + i_d * dstate + o_n, mask=m_n, other=0.0)
    b_skip = tl.load(D_ptr + i_d)
    b_bias = tl.load(bias_ptr + i_d)
    b_h = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t in range(seqlen):
        dt = tl.load(delta_ptr + row + t).to(tl.float32) + b_bias
        dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        x = tl.load(u_ptr + row + t).to(tl.float32)
        b_B = tl.load(B_ptr + p_bc + t, mask=m_n, other=0.0).to(tl.float32)
        b_C = tl.load(C_ptr + p_bc + t, mask=m_n, other=0.0).to(tl.float32)
        b_h = tl.exp(dt * b_a) * b_h + dt * x * b_B
        zz = tl.load(z_ptr + row + t).to(tl.float32)
        y = (tl.sum(b_h * b_C) + b_skip * x) * zz / (1.0 + tl.exp(-zz))
        tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty))


def naive_selective_scan(u, delta, A, B, C, D, z, delta_bias) -> torch.Tensor:
    """Softplus'd delta with bias, D skip and z gate (the Mamba prefill case); returns ``[B, D, L]``."""
    bsz, dim, seqlen = u.shape
    out = torch.empty_like(u)
    _naive_scan_kernel[(bsz, dim)](u, delta, A, B, C, D, z, delta_bias, out, seqlen, dim, A.shape[1],
                                   BLOCK_N=triton.next_power_of_2(A.shape[1]))
    return out
