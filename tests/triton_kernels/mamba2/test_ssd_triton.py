"""ssd_core_triton (the Mamba-2 SSD Triton kernels) against a float64 sequential recurrence.

Small shapes under the interpreter (fp32/fp16); bf16 and real sizes in the gpu tier. Every case
poisons ``out``, checks the final rows written and the other state rows untouched.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.utils import KERNEL_DEVICE, REL_TOL, assert_close, assert_equal, poisoned
from triton_kernels.mamba2.naive import ssd_oracle
from triton_kernels.mamba2.ssd_triton import ssd_core_triton

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# REL_TOL per dtype. Measured here (interpreter): fp32 <= 4.1e-7 (tl.dot in IEEE fp32: summation
# order only), fp16 <= 2.6e-4 (the scaled B, C.B^T and the entering states are rounded to x's dtype
# for the dots, as in mamba_ssm). bf16 is measured in the gpu tier only.
TOL = REL_TOL


def _oracle(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, seq_starts, init_states, init_index):
    """:func:`ssd_oracle` (float64) into fresh float64 buffers: returns ``(y [T, h, p], finals [nseq, h, p, n])``."""
    num_tokens, h, p = x.shape
    nseq = len(seq_starts) - 1
    y = torch.zeros(num_tokens, h, p, dtype=torch.float64)
    finals = torch.zeros(nseq, h, p, B.shape[2], dtype=torch.float64)
    ssd_oracle(y, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, seq_starts, None, init_states,
               torch.as_tensor(init_index), finals, torch.arange(nseq), None)
    return y, finals


def _strided(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Random values in a non-contiguous view (last dim stride 1, padded rows)."""
    big = torch.randn(*shape[:-1], shape[-1] + 3, device=device).to(dtype)
    return big[..., : shape[-1]]


def _run_case(lengths, h, p, n, g, chunk, dtype, *, D="h", z=True, dt_bias=True, dt_softplus=True,
              dt_limit=(0.0, math.inf), init="some", final="alias", strided=False, device=KERNEL_DEVICE):
    seq_starts = [0]
    for length in lengths:
        seq_starts.append(seq_starts[-1] + length)
    num_tokens, nseq = seq_starts[-1], len(lengths)
    make = (lambda *s: _strided(s, dtype, device)) if strided else (lambda *s: torch.randn(*s, device=device).to(dtype))
    x = make(num_tokens, h, p)
    dt = (torch.rand(num_tokens, h, device=device) - 0.5).to(dtype)  # softplus'd below (or bias-shifted)
    if not dt_softplus:
        dt = (torch.rand(num_tokens, h, device=device) * 0.5 + 0.01).to(dtype)
    A = -torch.rand(h, device=device) * 2 - 0.1
    B, C = make(num_tokens, g, n), make(num_tokens, g, n)
    d = {None: None, "h": torch.randn(h, device=device), "hp": torch.randn(h, p, device=device)}[D]
    zz = make(num_tokens, h, p) if z else None
    bias = torch.randn(h, device=device) * 0.5 if dt_bias else None
    slots = nseq + 2
    init_states = torch.randn(slots, h, p, n, device=device) if init else None
    # sequences start from rows nseq+1, 0, 1, ... ("some": every other one from zeros)
    init_rows = [(s - 1) % slots if init == "all" or s % 2 == 0 else -1 for s in range(nseq)] if init else [-1] * nseq
    init_index = torch.tensor(init_rows, dtype=torch.int64, device=device)
    if final == "alias":  # the state cache: sequence s writes row s, which sequence s + 1 may read
        final_states = init_states if init_states is not None else torch.randn(slots, h, p, n, device=device)
        final_rows = list(range(nseq))
    elif final == "separate":
        final_states = torch.randn(slots, h, p, n, device=device).to(dtype)
        final_rows = [(s + 1) if s % 3 != 2 else -1 for s in range(nseq)]
    else:
        final_states, final_rows = None, [-1] * nseq
    final_index = torch.tensor(final_rows, dtype=torch.int64, device=device)
    init_before = init_states.clone() if init_states is not None else None
    final_before = final_states.clone() if final_states is not None else None

    y_ref, fin_ref = _oracle(x.cpu(), dt.cpu(), A.cpu(), B.cpu(), C.cpu(), None if d is None else d.cpu(),
                             None if zz is None else zz.cpu(), None if bias is None else bias.cpu(), dt_softplus,
                             dt_limit, seq_starts, None if init_before is None else init_before.cpu(), init_rows)
    out = poisoned((num_tokens, h, p), dtype, device)
    ssd_core_triton(out, x, dt, A, B, C, d, zz, bias, dt_softplus, dt_limit, seq_starts,
                    torch.tensor(seq_starts, dtype=torch.int64, device=device), init_states, init_index,
                    final_states, final_index, chunk)
    tol = TOL[dtype]
    if num_tokens:
        assert_close(out.cpu(), y_ref, tol=tol, name="out")
    if final_states is not None:
        for s, row in enumerate(final_rows):
            if row >= 0:
                assert_close(final_states[row].cpu(), fin_ref[s], tol=tol, name=f"final row {row} (seq {s})")
        untouched = [r for r in range(slots) if r not in final_rows]
        assert_equal(final_states[untouched].cpu(), final_before[untouched].cpu(), name="rows not written")


CASES = [
    # (lengths, h, p, n, g, chunk, dtype, options)
    pytest.param([1], 2, 16, 16, 1, 16, F32, {}, id="L1"),
    pytest.param([7], 2, 8, 8, 1, 16, F32, {}, id="L7-p8-n8"),
    pytest.param([63], 2, 16, 16, 2, 32, F32, {"D": "hp"}, id="L63-g2-Dhp"),
    pytest.param([64], 4, 16, 16, 4, 64, F32, {"init": "all"}, id="L64-gh"),
    pytest.param([65], 2, 16, 16, 1, 64, F32, {"dt_limit": (0.05, 0.6)}, id="L65-dtlimit"),
    pytest.param([65], 2, 16, 16, 1, 16, F32, {"D": None, "z": False, "dt_bias": False, "dt_softplus": False,
                                                "init": None, "final": None}, id="L65-plain"),
    pytest.param([5, 0, 70, 33, 1, 17], 4, 16, 16, 2, 16, F32, {}, id="varlen-empty-alias"),
    pytest.param([40, 0, 3, 29], 4, 16, 16, 1, 32, F32, {"final": "separate", "strided": True},
                 id="varlen-strided-separate"),
    pytest.param([0, 0], 2, 16, 16, 1, 16, F32, {"init": "all"}, id="all-empty"),
    pytest.param([300], 2, 16, 16, 1, 64, F32, {"init": "all"}, id="L300"),
    pytest.param([63, 7, 65], 2, 16, 16, 2, 32, F16, {"D": "hp"}, id="varlen-fp16"),
    pytest.param([64, 1], 2, 16, 16, 1, 16, F16, {"final": "separate", "dt_limit": (0.0, 0.5)},
                 id="fp16-separate-dtlimit"),
]


@pytest.mark.parametrize(("lengths", "h", "p", "n", "g", "chunk", "dtype", "opts"), CASES)
def test_ssd_core_triton_matches_oracle(lengths, h, p, n, g, chunk, dtype, opts) -> None:
    _run_case(lengths, h, p, n, g, chunk, dtype, **opts)


def test_final_row_read_as_another_sequences_init() -> None:
    """Sequence 0 writes the row sequence 1 starts from: every init read precedes every final write."""
    dev, h, p, n = KERNEL_DEVICE, 2, 16, 16
    seq_starts = [0, 20, 45]
    x, z = torch.randn(45, h, p, device=dev), None
    dt, A = torch.rand(45, h, device=dev) * 0.3, -torch.rand(h, device=dev)
    B, C = torch.randn(45, 1, n, device=dev), torch.randn(45, 1, n, device=dev)
    cache = torch.randn(3, h, p, n, device=dev)
    init_rows, final_rows = [1, 0], [0, 2]
    y_ref, fin_ref = _oracle(x.cpu(), dt.cpu(), A.cpu(), B.cpu(), C.cpu(), None, z, None, False, (0.0, math.inf),
                             seq_starts, cache.cpu().clone(), init_rows)
    out = poisoned((45, h, p), F32, dev)
    ssd_core_triton(out, x, dt, A, B, C, None, z, None, False, (0.0, math.inf), seq_starts,
                    torch.tensor(seq_starts, device=dev), cache, torch.tensor(init_rows, device=dev), cache,
                    torch.tensor(final_rows, device=dev), 16)
    assert_close(out.cpu(), y_ref, tol=TOL[F32])
    assert_close(cache[0].cpu(), fin_ref[0], tol=TOL[F32], name="final seq 0")
    assert_close(cache[2].cpu(), fin_ref[1], tol=TOL[F32], name="final seq 1")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [BF16, F16, F32])
@pytest.mark.parametrize("chunk", [64, 256])
def test_ssd_core_triton_gpu_model_sizes(dtype, chunk) -> None:
    """Real head sizes (h 8 of a 64-128 model, p 64, n 128, g 2), mixed lengths, the state cache."""
    _run_case([1, 300, 0, 1000, 257], 8, 64, 128, 2, chunk, dtype, D="h", init="some", final="alias",
              device=torch.device("cuda"))



@pytest.mark.gpu
def test_ssd_core_triton_gpu_offsets_past_int32() -> None:
    """x holds 2^31+ elements (mamba_ssm issue 1015: its SSD kernels go wrong beyond ~61K tokens at
    these sizes); the last sequence, whose offsets pass 2^31, matches the oracle."""
    dev, h, p, n, tail = torch.device("cuda"), 64, 64, 128, 100
    num_tokens = 2**31 // (h * p) + 4096
    seq_starts = [0, num_tokens - tail, num_tokens]
    x = torch.randn(num_tokens, h, p, device=dev, dtype=BF16)
    dt = torch.rand(num_tokens, h, device=dev, dtype=BF16) * 0.2
    A = -torch.rand(h, device=dev)
    B, C = (torch.randn(num_tokens, 1, n, device=dev, dtype=BF16) for _ in range(2))
    out, final = torch.empty_like(x), torch.zeros(2, h, p, n, device=dev)
    index = torch.tensor([-1, 1], device=dev)
    ssd_core_triton(out, x, dt, A, B, C, None, None, None, False, (0.0, math.inf), seq_starts,
                    torch.tensor(seq_starts, device=dev), None, index, final, index, 256)
    part = slice(num_tokens - tail, num_tokens)
    y_ref, fin_ref = _oracle(x[part].cpu(), dt[part].cpu(), A.cpu(), B[part].cpu(), C[part].cpu(), None, None,
                             None, False, (0.0, math.inf), [0, tail], None, [-1])
    assert_close(out[part].cpu(), y_ref, tol=TOL[BF16])
    assert_close(final[1].cpu(), fin_ref[0], tol=TOL[BF16], name="final")
