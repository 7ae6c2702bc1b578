"""causal_conv1d_fn / _varlen / _update: every backend (Triton under the interpreter, torch) against the
float64 oracle, prefill then decode == whole sequence, pad and untouched slots, gradients, bad input,
HF oracles, gpu tier. Outputs are poisoned by the package (IFK_POISON_OUTPUTS=1 in conftest)."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.triton_kernels.aliasing import sharing
from tests.utils import KERNEL_DEVICE, assert_close, assert_equal, backends, rnd
from triton_kernels import PAD_SLOT_ID, BackendUnavailableError, use_backend
from triton_kernels.mamba import naive as oracle
from triton_kernels.mamba.causal_conv1d import causal_conv1d_fn, causal_conv1d_update, causal_conv1d_varlen
from triton_kernels.mamba.ops_torch import causal_conv1d_fn_ref, causal_conv1d_update_ref
from triton_kernels.registry import CAUSAL_CONV1D, CAUSAL_CONV1D_UPDATE, CAUSAL_CONV1D_VARLEN

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


def tol(dtype):
    return None if dtype == torch.float32 else 4e-3


# ------------------------------------------------------------------ causal_conv1d_fn

FN_CASES = [
    pytest.param(2, 37, 9, 4, True, "silu", True, id="B2-D37-L9-W4-bias-silu-init"),
    pytest.param(1, 5, 1, 2, False, None, False, id="B1-D5-L1-W2"),
    pytest.param(3, 16, 2, 4, True, None, True, id="B3-L2-shorter-than-state"),
    pytest.param(2, 12, 2, 4, True, "silu", False, id="B2-L2-shorter-than-state-no-init"),
    pytest.param(1, 70, 131, 3, False, "swish", False, id="B1-D70-L131-W3-multiblock"),
    pytest.param(2, 6, 0, 4, True, "silu", True, id="B2-L0-init"),  # bug 7: torch raised on L = 0
    pytest.param(2, 6, 0, 3, False, None, False, id="B2-L0"),
    pytest.param(2, 11, 9, 5, True, "silu", True, id="B2-L9-W5-init"),
    pytest.param(2, 7, 3, 8, True, None, True, id="B2-L3-W8-shorter-than-state"),
    pytest.param(1, 20, 70, 8, False, "silu", True, id="B1-L70-W8-multiblock"),
]


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "dim", "length", "width", "has_bias", "act", "has_init"), FN_CASES)
def test_fn_matches_oracle(backend, dtype, batch, dim, length, width, has_bias, act, has_init):
    x = rnd(batch, dim, length, dtype=dtype)
    weight, bias = rnd(dim, width, dtype=dtype), rnd(dim, dtype=dtype) if has_bias else None
    init = rnd(batch, dim, width - 1, dtype=dtype) if has_init else None
    ref_out, ref_final = oracle.causal_conv1d(x, weight, bias, act is not None, init)
    with use_backend(backend):
        out, final = causal_conv1d_fn(x, weight, bias, act, initial_states=init, return_final_states=True)
        plain = causal_conv1d_fn(x, weight, bias, act, initial_states=init)
    assert out.dtype == dtype
    assert final.dtype == dtype
    if length:
        assert_close(out, ref_out, tol(dtype))
    assert out.shape == x.shape
    assert_equal(final, ref_final.to(dtype), "final_states")
    assert_equal(plain, out, "out without final states")


@pytest.mark.parametrize("has_init", [False, True])
def test_fn_reference_writes_into_out(has_init):
    """The torch backend's ``out=`` path (the activation written into the destination)."""
    x, weight, bias = rnd(2, 6, 5), rnd(6, 4), rnd(6)
    init = rnd(2, 6, 3) if has_init else None
    into = torch.full_like(x, float("nan"))
    causal_conv1d_fn_ref(x, weight, bias, True, init, out=into)
    assert_close(into, oracle.causal_conv1d(x, weight, bias, True, init)[0])


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D))
def test_fn_noncontiguous_input(backend):
    """x as a slice of the ``[B, L, 2D]`` in_proj output, transposed (vLLM/HF layout): no copy needed."""
    proj = rnd(2, 11, 2 * 24)
    x = proj.transpose(1, 2)[:, :24]
    weight = rnd(24, 4)
    with use_backend(backend):
        out = causal_conv1d_fn(x, weight, activation="silu")
    assert_close(out, oracle.causal_conv1d(x, weight, None, True)[0])


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D))
def test_fn_gradients_match_reference_autograd(backend):
    x = rnd(2, 12, 7).requires_grad_()
    weight, bias, init = rnd(12, 4).requires_grad_(), rnd(12).requires_grad_(), rnd(2, 12, 3).requires_grad_()
    d_out, d_final = rnd(2, 12, 7), rnd(2, 12, 3)
    with use_backend(backend):
        out, final = causal_conv1d_fn(x, weight, bias, "silu", initial_states=init, return_final_states=True)
    grads = torch.autograd.grad([out, final], [x, weight, bias, init], [d_out, d_final])
    ref_out, ref_final = oracle.causal_conv1d(x, weight, bias, True, init)
    ref_grads = torch.autograd.grad([ref_out, ref_final], [x, weight, bias, init], [d_out, d_final])
    for name, g, r in zip(["x", "weight", "bias", "initial_states"], grads, ref_grads):
        assert_close(g, r, name=f"d_{name}")
    # and only x needing a gradient, no final states
    x2 = x.detach().requires_grad_()
    with use_backend(backend):
        (g_x,) = torch.autograd.grad(causal_conv1d_fn(x2, weight.detach(), None, None), [x2], [d_out])
    (r_x,) = torch.autograd.grad(oracle.causal_conv1d(x2, weight.detach(), None, False)[0], [x2], [d_out])
    assert_close(g_x, r_x)


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D))
def test_fn_gradients_of_an_empty_sequence(backend):
    """L = 0: no output; the final states are the initial states, so their gradient passes through."""
    x, weight, bias = rnd(2, 6, 0).requires_grad_(), rnd(6, 4).requires_grad_(), rnd(6).requires_grad_()
    init, d_final = rnd(2, 6, 3).requires_grad_(), rnd(2, 6, 3)
    with use_backend(backend):
        _, final = causal_conv1d_fn(x, weight, bias, "silu", initial_states=init, return_final_states=True)
    g_x, g_w, g_b, g_init = torch.autograd.grad([final], [x, weight, bias, init], [d_final])
    assert g_x.shape == x.shape
    assert_equal(g_w, torch.zeros_like(weight), "d_weight")
    assert_equal(g_b, torch.zeros_like(bias), "d_bias")
    assert_equal(g_init, d_final, "d_initial_states")


# ------------------------------------------------------------------ seq_idx and final_states_out


def _seq_idx(batch, length, cuts):
    """``[B, L]`` int32: row b holds sequences split at the positions ``cuts[b]``."""
    rows = [[sum(t >= c for c in cuts[b]) for t in range(length)] for b in range(batch)]
    return torch.tensor(rows, dtype=torch.int32, device=KERNEL_DEVICE)


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("length", "width", "cuts"), [
    pytest.param(11, 4, [[3, 4, 9], []], id="L11-W4-cuts"),
    pytest.param(70, 3, [[1], [64, 65, 69]], id="L70-W3-multiblock"),
])
def test_fn_seq_idx_matches_oracle(backend, dtype, length, width, cuts):
    x, weight, bias = rnd(2, 19, length, dtype=dtype), rnd(19, width, dtype=dtype), rnd(19, dtype=dtype)
    seq_idx = _seq_idx(2, length, cuts)
    with use_backend(backend):
        out = causal_conv1d_fn(x, weight, bias, "silu", seq_idx=seq_idx)
    assert_close(out, oracle.causal_conv1d(x, weight, bias, True, seq_idx=seq_idx)[0], tol(dtype))
    # each piece alone == its columns of the packed row
    for b in range(2):
        bounds = [0, *cuts[b], length]
        for s, e in itertools.pairwise(bounds):
            alone = oracle.causal_conv1d(x[b : b + 1, :, s:e], weight, bias, True)[0]
            assert_close(out[b : b + 1, :, s:e], alone, tol(dtype), name=f"row {b} piece {s}:{e}")


def padded_oracle(x, weight, bias, silu_act, seq_idx):
    """causal-conv1d's padding rule on the oracle: the output is 0 where ``seq_idx < 0`` (a padding
    position feeds no real one already: its ``seq_idx`` differs)."""
    return oracle.causal_conv1d(x, weight, bias, silu_act, seq_idx=seq_idx)[0] * (seq_idx >= 0)[:, None, :]


SEQ_IDX_PAD = [  # rows of seq_idx; negative = padding
    pytest.param([[0, 0, 0, 1, 1, 1, 1, -1, -1, -1]], 4, id="L10-W4-tail"),  # the reported case
    pytest.param([[-1] * 2 + [0] * 60 + [-1] * 5 + [1] * 3, [0] * 63 + [-2] * 4 + [1] * 3], 3,
                 id="L70-W3-head-middle-across-blocks"),
    pytest.param([[0, 0, -1, 1, 1, 1, 1, 1, 1, -1, 2]], 8, id="L11-W8"),
]


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "width"), SEQ_IDX_PAD)
def test_fn_seq_idx_padding_outputs_zero(backend, dtype, rows, width):
    """causal-conv1d: positions with ``seq_idx < 0`` output exactly 0 (no bias, no activation of it)
    and feed no later position."""
    seq_idx = torch.tensor(rows, dtype=torch.int32, device=KERNEL_DEVICE)
    batch, length = seq_idx.shape
    x, weight, bias = rnd(batch, 10, length, dtype=dtype), rnd(10, width, dtype=dtype), rnd(10, dtype=dtype)
    for act in (None, "silu"):
        with use_backend(backend):
            out = causal_conv1d_fn(x, weight, bias, act, seq_idx=seq_idx)
        pad = (seq_idx < 0)[:, None, :].expand_as(out)
        assert_equal(out[pad], torch.zeros_like(out[pad]), f"{act}: padding positions")
        assert_close(out, padded_oracle(x, weight, bias, act is not None, seq_idx), tol(dtype), name=f"{act}")


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D))
def test_fn_seq_idx_gradients_match_oracle(backend):
    x, weight, bias = rnd(2, 6, 9).requires_grad_(), rnd(6, 4).requires_grad_(), rnd(6).requires_grad_()
    seq_idx, d_out = _seq_idx(2, 9, [[2, 3], [5]]), rnd(2, 6, 9)
    with use_backend(backend):
        out = causal_conv1d_fn(x, weight, bias, "silu", seq_idx=seq_idx)
    grads = torch.autograd.grad([out], [x, weight, bias], [d_out])
    ref = torch.autograd.grad([oracle.causal_conv1d(x, weight, bias, True, seq_idx=seq_idx)[0]], [x, weight, bias],
                              [d_out])
    for name, g, r in zip(["x", "weight", "bias"], grads, ref):
        assert_close(g, r, name=f"d_{name}")


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D))
def test_fn_final_states_out_is_written_and_returned(backend):
    """A caller-given destination (here a strided view) receives the final states."""
    x, weight, init = rnd(2, 6, 5).requires_grad_(), rnd(6, 4), rnd(2, 6, 3)
    buffer = torch.full((2, 6, 6), float("nan"), device=KERNEL_DEVICE)
    dest = buffer[..., ::2]
    with use_backend(backend):
        out, final = causal_conv1d_fn(x, weight, None, None, initial_states=init, return_final_states=True,
                                      final_states_out=dest)
    ref_out, ref_final = oracle.causal_conv1d(x, weight, None, False, init)
    assert final is dest
    assert_equal(buffer[..., ::2], ref_final.float(), "final_states_out")
    assert torch.isnan(buffer[..., 1::2]).all(), "final_states_out wrote between its columns"
    assert_close(out, ref_out)
    d_final = rnd(2, 6, 3)
    (g_x,) = torch.autograd.grad([final], [x], [d_final])
    (r_x,) = torch.autograd.grad([oracle.causal_conv1d(x, weight, None, False, init)[1]], [x], [d_final])
    assert_close(g_x, r_x)


# ------------------------------------------------------------------ varlen and update


def make_varlen(lengths, dim, width, num_slots, slots, has_init, state_len=None, dtype=torch.float32):
    qsl = torch.tensor(
        [0, *torch.tensor(lengths).cumsum(0).tolist()], device=KERNEL_DEVICE, dtype=torch.int32
    )
    return {
        "x": rnd(dim, qsl[-1].item(), dtype=dtype),
        "weight": rnd(dim, width, dtype=dtype),
        "bias": rnd(dim, dtype=dtype),
        "conv_states": rnd(num_slots, dim, state_len or width - 1, dtype=dtype),
        "query_start_loc": qsl,
        "cache_indices": None if slots is None else torch.tensor(slots, device=KERNEL_DEVICE),
        "has_initial_state": None if has_init is None else torch.tensor(has_init, device=KERNEL_DEVICE),
    }


def varlen_expected(args, activation="silu"):
    """The float64 oracle: ``(out [D, T], conv_states)``."""
    return oracle.causal_conv1d_varlen(
        args["x"], args["weight"], args["bias"], args["conv_states"], args["query_start_loc"].tolist(),
        args["cache_indices"], args["has_initial_state"], activation is not None, PAD_SLOT_ID)


def touched_mask(num_slots, slots):
    mask = torch.zeros(num_slots, dtype=torch.bool, device=KERNEL_DEVICE)
    if slots is not None:
        mask[slots[slots != PAD_SLOT_ID].long()] = True
    return mask


VARLEN_CASES = [
    pytest.param(
        [5, 1, 0, 70, 3],
        4,
        7,
        [6, 0, 2, PAD_SLOT_ID, 3],
        [True, False, True, True, False],
        None,
        id="mixed-lengths-empty-pad-W4",
    ),
    pytest.param([1], 2, 1, None, None, None, id="single-token-W2-defaults"),
    pytest.param([2, 9], 3, 3, [2, 1], [True, True], 5, id="W3-state-wider-than-W-1"),
    pytest.param([4, 4, 4], 4, 3, None, [False, True, False], None, id="no-indices"),
    pytest.param([1, 2, 9, 70], 8, 5, [4, 0, 1, 2], [True, True, True, False], None, id="W8-multiblock"),
    # 4 tokens a sequence on average: the L-block must still cover the W-1 = 7 state columns
    pytest.param([2, 1, 9], 8, 3, [1, 2, 0], [True, True, True], 9, id="W8-short-blocks"),
    pytest.param([6, 3], 6, 2, None, [True, False], None, id="W6-no-indices"),
]


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D_VARLEN))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("lengths", "width", "num_slots", "slots", "has_init", "state_len"), VARLEN_CASES)
def test_varlen_matches_reference(backend, dtype, lengths, width, num_slots, slots, has_init, state_len):
    args = make_varlen(lengths, 19, width, num_slots, slots, has_init, state_len, dtype)
    ref_out, ref_states = varlen_expected(args)
    before = args["conv_states"].clone()
    with use_backend(backend):
        out = causal_conv1d_varlen(**args)
    assert_close(out, ref_out, tol(dtype))
    assert_equal(args["conv_states"], ref_states.to(dtype), "conv_states")
    untouched = ~touched_mask(num_slots, args["cache_indices"]) if slots is not None else None
    if untouched is not None:
        assert_equal(args["conv_states"][untouched], before[untouched], "untouched slots")
        pad_tokens = torch.zeros(out.shape[1], dtype=torch.bool, device=KERNEL_DEVICE)
        qsl = args["query_start_loc"].tolist()
        for i, s in enumerate(slots):
            if s == PAD_SLOT_ID:
                pad_tokens[qsl[i] : qsl[i + 1]] = True
        assert_equal(out[:, pad_tokens], torch.zeros_like(out[:, pad_tokens]), "pad tokens")


UPDATE_CASES = [
    pytest.param(3, 37, 1, 4, 3, [4, PAD_SLOT_ID, 1], 5, True, id="B3-D37-x2d-W4-pad"),
    pytest.param(1, 5, 1, 2, 1, None, 1, False, id="B1-W2-nobias"),
    pytest.param(2, 16, 3, 3, 6, [0, 2], 3, True, id="L3-W3-state6"),
    pytest.param(2, 70, 2, 4, 3, [1, PAD_SLOT_ID], 2, True, id="L2-D70-blocks"),
    pytest.param(2, 9, 1, 6, 5, [1, 0], 2, True, id="W6-state5"),
    pytest.param(3, 12, 3, 8, 10, [2, PAD_SLOT_ID, 0], 3, False, id="L3-W8-state10-pad"),
]


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D_UPDATE))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("batch", "dim", "length", "width", "state_len", "slots", "num_slots", "has_bias"), UPDATE_CASES
)
def test_update_matches_reference(
    backend, dtype, batch, dim, length, width, state_len, slots, num_slots, has_bias
):
    x = (
        rnd(batch, dim, dtype=dtype)
        if length == 1 and slots is not None
        else rnd(batch, dim, length, dtype=dtype)
    )
    weight, bias = rnd(dim, width, dtype=dtype), rnd(dim, dtype=dtype) if has_bias else None
    state = rnd(num_slots, dim, state_len, dtype=dtype)
    idx = None if slots is None else torch.tensor(slots, device=KERNEL_DEVICE, dtype=torch.int32)
    x3 = x if x.dim() == 3 else x.unsqueeze(-1)
    ref_out, ref_state = oracle.causal_conv1d_update(x3, state, weight, bias, True, idx, PAD_SLOT_ID)
    before = state.clone()
    with use_backend(backend):
        out = causal_conv1d_update(x, state, weight, bias, "silu", conv_state_indices=idx)
    assert out.shape == x.shape
    assert out.dtype == dtype
    assert_close(out, ref_out.reshape(x.shape), tol(dtype))
    assert_equal(state, ref_state.to(dtype), "conv_state")
    if idx is not None:
        untouched = ~touched_mask(num_slots, idx)
        assert_equal(state[untouched], before[untouched], "untouched slots")
        pad = idx == PAD_SLOT_ID
        assert_equal(out[pad], torch.zeros_like(out[pad]), "pad rows")


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D, CAUSAL_CONV1D_VARLEN, CAUSAL_CONV1D_UPDATE))
@pytest.mark.parametrize("width", [2, 3, 4, 8])
def test_prefill_then_decode_equals_whole_sequence(backend, width):
    """varlen over the prompts, then one update per new token == causal_conv1d_fn over everything."""
    dim, prompt, steps, slots = 21, [6, 1, 2], 3, [4, 0, 2]
    full = [rnd(dim, n + steps) for n in prompt]
    weight, bias = rnd(dim, width), rnd(dim)
    states = rnd(5, dim, width - 1)
    before = states.clone()
    idx = torch.tensor(slots, device=KERNEL_DEVICE)
    qsl = torch.tensor([0, *torch.tensor(prompt).cumsum(0).tolist()], device=KERNEL_DEVICE)
    with use_backend(backend):
        packed = causal_conv1d_varlen(
            torch.cat([f[:, :n] for f, n in zip(full, prompt)], 1),
            weight,
            bias,
            states,
            qsl,
            idx,
            torch.zeros(3, dtype=torch.bool, device=KERNEL_DEVICE),
        )
        decoded = [
            causal_conv1d_update(
                torch.stack([f[:, n + t] for f, n in zip(full, prompt)]), states, weight, bias, "silu",
                conv_state_indices=idx,
            )
            for t in range(steps)
        ]
        for i, f in enumerate(full):
            whole, final = causal_conv1d_fn(f[None], weight, bias, "silu", return_final_states=True)
            got = torch.cat([packed[:, qsl[i] : qsl[i + 1]], torch.stack([d[i] for d in decoded], 1)], 1)
            assert_close(got, whole[0], name=f"sequence {i}")
            assert_close(states[slots[i]], final[0], name=f"state {i}")
    assert_equal(states[[1, 3]], before[[1, 3]], "untouched slots")


@pytest.mark.parametrize("forced", ["cpu", "cuda"])
def test_forced_backend_without_kernel_raises(forced):
    x, weight, state = rnd(2, 6), rnd(6, 4), rnd(2, 6, 3)
    before = state.clone()
    with use_backend(forced), pytest.raises(BackendUnavailableError, match=f"no {forced} kernel"):
        causal_conv1d_update(x, state, weight)
    with use_backend(forced), pytest.raises(BackendUnavailableError, match=f"no {forced} kernel"):
        causal_conv1d_fn(x[..., None], weight)
    assert_equal(state, before)


def test_torch_library_opcheck():
    x, w, b = rnd(2, 6, 5), rnd(6, 4), rnd(6)
    torch.library.opcheck(
        torch.ops.ifk.causal_conv1d_fwd,
        (torch.empty_like(x), torch.empty(2, 6, 3), [x, w, b, rnd(2, 6, 3), None], True),
    )
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 2, 3, 3]], dtype=torch.int32, device=KERNEL_DEVICE)
    torch.library.opcheck(torch.ops.ifk.causal_conv1d_fwd, (torch.empty_like(x), None, [x, w, b, None, seq_idx], False))
    slots = torch.tensor([2, PAD_SLOT_ID], device=KERNEL_DEVICE)
    torch.library.opcheck(
        torch.ops.ifk.causal_conv1d_update,
        (torch.empty_like(x), rnd(3, 6, 3), [x, w, b, slots, None], True, PAD_SLOT_ID),
    )
    torch.library.opcheck(
        torch.ops.ifk.causal_conv1d_update,
        (torch.empty_like(x), rnd(3, 6, 4), [x, w, b, slots, _dev(5, 2, dtype=torch.int32)], True, PAD_SLOT_ID)
    )
    v = make_varlen([3, 2], 6, 4, 3, [1, 0], [True, False])
    inputs = [v["x"], v["weight"], v["bias"], v["query_start_loc"], v["cache_indices"], v["has_initial_state"]]
    torch.library.opcheck(
        torch.ops.ifk.causal_conv1d_varlen, (torch.empty_like(v["x"]), v["conv_states"], inputs, True, PAD_SLOT_ID)
    )


def test_torch_compile_fullgraph_update_and_training():
    """The decode update and a training step through causal_conv1d_fn trace without graph breaks."""
    x, weight, bias = rnd(3, 10), rnd(10, 4), rnd(10)
    idx = torch.tensor([2, PAD_SLOT_ID, 0], device=KERNEL_DEVICE)
    state = rnd(4, 10, 3)
    state_eager = state.clone()
    step = torch.compile(causal_conv1d_update, fullgraph=True)
    assert_close(
        step(x, state, weight, bias, "silu", conv_state_indices=idx),
        causal_conv1d_update(x, state_eager, weight, bias, "silu", conv_state_indices=idx),
    )
    assert_equal(state, state_eager, "conv_state")
    seqlens = _dev(5, 0, 2, dtype=torch.int32)  # the circular buffer
    assert_close(step(x, state, weight, bias, "silu", seqlens, idx),
                 causal_conv1d_update(x, state_eager, weight, bias, "silu", seqlens, idx))
    assert_equal(state, state_eager, "conv_state (circular)")

    xs = rnd(2, 10, 7).requires_grad_()
    loss = torch.compile(lambda t: causal_conv1d_fn(t, weight, bias, "silu").square().sum(), fullgraph=True)
    (g_compiled,) = torch.autograd.grad(loss(xs), [xs])
    (g_eager,) = torch.autograd.grad(causal_conv1d_fn_ref(xs, weight, bias, True)[0].square().sum(), [xs])
    assert_close(g_compiled, g_eager)


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D_VARLEN, CAUSAL_CONV1D_UPDATE))
def test_out_of_range_slots_under_capture_count_as_pad(backend, monkeypatch):
    """With the value checks skipped (as under CUDA-graph capture), a slot outside the cache reads
    and writes no state and gets a zero output, in the varlen conv and the update."""
    monkeypatch.setattr("triton_kernels._data_checks.capturing", lambda t: True)
    args = make_varlen([3, 4], 6, 4, 2, [1, 9], [True, True])
    ref_out, ref_states = varlen_expected({**args, "cache_indices": _dev(1, PAD_SLOT_ID)})
    with use_backend(backend):
        out = causal_conv1d_varlen(**args)
    assert_close(out, ref_out)
    assert_equal(args["conv_states"], ref_states.float(), "conv_states")
    x, state, weight = rnd(2, 6), rnd(2, 6, 3), rnd(6, 4)
    idx = _dev(-5, 1)
    ref_out, ref_state = oracle.causal_conv1d_update(x[..., None], state, weight, None, True,
                                                     _dev(PAD_SLOT_ID, 1), PAD_SLOT_ID)
    with use_backend(backend):
        out = causal_conv1d_update(x, state, weight, None, "silu", conv_state_indices=idx)
    assert_close(out, ref_out[..., 0])
    assert_equal(state, ref_state.float(), "conv_state")


# ------------------------------------------------------------------ cache_seqlens (circular conv state)


def circular_oracle(x, conv_state, weight, bias, silu_act, cache_seqlens, slots=None, pad_slot_id=PAD_SLOT_ID):
    """causal-conv1d's ``causal_conv1d_update_ref`` with ``cache_seqlens``, token by token in float64:
    row b reads the W-1 columns before ``head = cache_seqlens[b] mod S`` (cyclically, floor mod),
    then writes ``x[b, :, t]`` to column ``(head + t) mod S`` in order (a later token wins, as in
    causal-conv1d's kernel). Returns ``(out [B, D, L], new_state)``; pad rows: zero, state untouched."""
    width, state_len = weight.shape[1], conv_state.shape[-1]
    new = conv_state.double().clone()
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for b in range(x.shape[0]):
        slot = b if slots is None else int(slots[b])
        if slot == pad_slot_id:
            continue
        head = int(cache_seqlens[b]) % state_len
        prev = new[slot][:, [(head - (width - 1) + j) % state_len for j in range(width - 1)]]
        out[b] = oracle.causal_conv1d(x[b][None], weight, bias, silu_act, prev[None])[0][0]
        for t in range(x.shape[-1]):
            new[slot][:, (head + t) % state_len] = x[b, :, t].double()
    return out, new


CIRCULAR_CASES = [  # batch, dim, L (0: x 2-D), W, S, cache_seqlens, slots, num_slots
    pytest.param(3, 19, 0, 4, 3, [0, 2, 7], None, 3, id="x2d-W4-S3"),
    pytest.param(3, 37, 2, 4, 5, [4, 11, 0], [4, PAD_SLOT_ID, 1], 6, id="L2-S5-indices-pad"),
    pytest.param(2, 16, 7, 3, 4, [1, 6], [0, 2], 3, id="L7-longer-than-S4"),
    pytest.param(2, 8, 3, 8, 7, [3, -2], None, 2, id="W8-S7-negative-count"),
    pytest.param(1, 70, 1, 2, 1, [12345], None, 1, id="W2-S1-D70"),
]


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D_UPDATE))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "dim", "length", "width", "state_len", "seqlens", "slots", "num_slots"),
                         CIRCULAR_CASES)
def test_update_cache_seqlens_matches_oracle(backend, dtype, batch, dim, length, width, state_len, seqlens, slots,
                                             num_slots):
    """causal-conv1d's positional order: the sixth argument is cache_seqlens, the seventh the indices."""
    x = rnd(batch, dim, length, dtype=dtype) if length else rnd(batch, dim, dtype=dtype)
    weight, bias = rnd(dim, width, dtype=dtype), rnd(dim, dtype=dtype)
    state = rnd(num_slots, dim, state_len, dtype=dtype)
    cache_seqlens = _dev(*seqlens, dtype=torch.int32)
    idx = None if slots is None else _dev(*slots, dtype=torch.int32)
    x3 = x if length else x[..., None]
    ref_out, ref_state = circular_oracle(x3, state, weight, bias, True, cache_seqlens, idx)
    with use_backend(backend):
        out = causal_conv1d_update(x, state, weight, bias, "silu", cache_seqlens, idx)
    assert out.shape == x.shape
    assert_close(out, ref_out.reshape(x.shape), tol(dtype))
    assert_equal(state, ref_state.to(dtype), "conv_state")


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D, CAUSAL_CONV1D_UPDATE))
@pytest.mark.parametrize(("width", "state_len", "chunk"), [(4, 3, 1), (4, 6, 2), (3, 5, 3)])
def test_circular_decode_equals_whole_sequence(backend, width, state_len, chunk):
    """Tokens appended ``chunk`` at a time to a zeroed circular buffer, ``cache_seqlens`` advanced by
    the caller, give causal_conv1d_fn's outputs over the whole sequences."""
    dim, steps, slots = 13, 4, [2, 0]
    seqs = rnd(2, dim, chunk * steps)
    weight, bias = rnd(dim, width), rnd(dim)
    state = torch.zeros(3, dim, state_len, device=KERNEL_DEVICE)
    idx = _dev(*slots, dtype=torch.int32)
    cache_seqlens = _dev(0, 0, dtype=torch.int32)
    with use_backend(backend):
        whole = causal_conv1d_fn(seqs, weight, bias, "silu")
        pieces = []
        for t in range(0, chunk * steps, chunk):
            pieces.append(causal_conv1d_update(seqs[..., t : t + chunk], state, weight, bias, "silu", cache_seqlens,
                                               idx))
            cache_seqlens += chunk
    assert_close(torch.cat(pieces, -1), whole)
    assert_equal(state[1], torch.zeros_like(state[1]), "untouched slot")


# ------------------------------------------------------------------ index tensors longer than the batch (vLLM)


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D_VARLEN))
def test_varlen_longer_indices_ignore_the_extra_entries(backend):
    """vLLM pads cache_indices / has_initial_state for CUDA graphs: the entries past the batch (an
    unused real slot, out-of-range slots, True flags) are never read."""
    args = make_varlen([3, 5, 1], 9, 4, 5, [2, 0, PAD_SLOT_ID], [True, False, True])
    ref_out, ref_states = varlen_expected(args)
    before = args["conv_states"].clone()
    args["cache_indices"] = torch.cat([args["cache_indices"], _dev(3, 99, -5)])
    args["has_initial_state"] = torch.cat([args["has_initial_state"], _dev(True, True, True)])
    with use_backend(backend):
        out = causal_conv1d_varlen(**args)
    assert_close(out, ref_out)
    assert_equal(args["conv_states"], ref_states.float(), "conv_states")
    assert_equal(args["conv_states"][[1, 3, 4]], before[[1, 3, 4]], "slots named only past the batch")


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D_UPDATE))
@pytest.mark.parametrize("circular", [False, True], ids=["linear", "circular"])
def test_update_longer_indices_ignore_the_extra_entries(backend, circular):
    x, weight, bias, state = rnd(2, 7), rnd(7, 4), rnd(7), rnd(4, 7, 5)
    idx, seqlens = _dev(1, 0, dtype=torch.int32), _dev(3, 8, dtype=torch.int32)
    if circular:
        ref_out, ref_state = circular_oracle(x[..., None], state, weight, bias, True, seqlens, idx)
    else:
        ref_out, ref_state = oracle.causal_conv1d_update(x[..., None], state, weight, bias, True, idx, PAD_SLOT_ID)
    before = state.clone()
    long_idx = torch.cat([idx, _dev(2, 3, 77, -9, dtype=torch.int32)])
    long_seqlens = torch.cat([seqlens, _dev(1, 2, 3, 4, dtype=torch.int32)]) if circular else None
    with use_backend(backend):
        out = causal_conv1d_update(x, state, weight, bias, "silu", long_seqlens, long_idx)
    assert_close(out, ref_out[..., 0])
    assert_equal(state, ref_state.float(), "conv_state")
    assert_equal(state[2:], before[2:], "slots named only past the batch")


# ------------------------------------------------------------------ pad_slot_id: padding only inside an index tensor


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D_VARLEN))
def test_varlen_pad_slot_id_applies_only_with_cache_indices(backend):
    """Without cache_indices every sequence is real even when pad_slot_id is one of its slots (0);
    with them, a sequence at the pad slot (here 1, a real slot number) gets zeros and leaves slot 1."""
    args = make_varlen([3, 4], 8, 4, 2, None, [True, True])
    ref_out, ref_states = varlen_expected(args)
    with use_backend(backend):
        out = causal_conv1d_varlen(**args, pad_slot_id=0)
    assert_close(out, ref_out)
    assert_equal(args["conv_states"], ref_states.float(), "conv_states")

    args = make_varlen([3, 4, 2], 8, 4, 4, [1, 0, 2], [True, True, False])
    ref_out, ref_states = oracle.causal_conv1d_varlen(
        args["x"], args["weight"], args["bias"], args["conv_states"], args["query_start_loc"].tolist(),
        args["cache_indices"], args["has_initial_state"], True, pad_slot_id=1)
    before = args["conv_states"].clone()
    with use_backend(backend):
        out = causal_conv1d_varlen(**args, pad_slot_id=1)
    assert_equal(out[:, :3], torch.zeros_like(out[:, :3]), "the pad sequence's tokens")
    assert_close(out, ref_out)
    assert_equal(args["conv_states"], ref_states.float(), "conv_states")
    assert_equal(args["conv_states"][[1, 3]], before[[1, 3]], "the pad slot and an unused slot")


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D_UPDATE))
def test_update_pad_slot_id_applies_only_with_indices(backend):
    x, weight, bias, state = rnd(2, 6), rnd(6, 4), rnd(6), rnd(2, 6, 3)
    ref_out, ref_state = oracle.causal_conv1d_update(x[..., None], state, weight, bias, True)
    with use_backend(backend):
        out = causal_conv1d_update(x, state, weight, bias, "silu", pad_slot_id=0)
    assert_close(out, ref_out[..., 0])
    assert_equal(state, ref_state.float(), "conv_state")

    x, state, idx = rnd(3, 6), rnd(3, 6, 3), _dev(1, 0, 2, dtype=torch.int32)
    ref_out, ref_state = oracle.causal_conv1d_update(x[..., None], state, weight, bias, True, idx, pad_slot_id=1)
    before = state.clone()
    with use_backend(backend):
        out = causal_conv1d_update(x, state, weight, bias, "silu", conv_state_indices=idx, pad_slot_id=1)
    assert_equal(out[0], torch.zeros_like(out[0]), "the pad row")
    assert_close(out, ref_out[..., 0])
    assert_equal(state, ref_state.float(), "conv_state")
    assert_equal(state[1], before[1], "the pad slot")


# ------------------------------------------------------------------ bad input


def _dev(*values, dtype=None):
    return torch.tensor(values, device=KERNEL_DEVICE, dtype=dtype)


FN_BAD = [
    pytest.param(dict(weight=rnd(6, 9)), ValueError, r"width W must be in 2\.\.8, got 9", id="W9"),
    pytest.param(dict(weight=rnd(6, 1)), ValueError, r"width W must be in 2\.\.8, got 1", id="W1"),
    pytest.param(dict(weight=rnd(7, 4)), ValueError, r"x has 6 channels but weight has 7", id="channels"),
    pytest.param(dict(bias=rnd(5)), ValueError, r"bias must have shape \[6\]", id="bias"),
    pytest.param(
        dict(initial_states=rnd(2, 6, 2)),
        ValueError,
        r"initial_states must have shape \[2, 6, 3\]",
        id="init-shape",
    ),
    pytest.param(
        dict(activation="relu"), ValueError, r"activation must be None, 'silu' or 'swish'", id="act"
    ),
    pytest.param(dict(x=rnd(6, 5)), ValueError, r"x must be 3-D", id="x-rank"),
    pytest.param(dict(seq_idx=_dev(0, 0, 1, 1)), ValueError, r"seq_idx must be 2-D", id="seq-idx-rank"),
    pytest.param(dict(seq_idx=torch.zeros(2, 4, dtype=torch.int32, device=KERNEL_DEVICE)), ValueError,
                 r"seq_idx must have shape \[2, 5\]", id="seq-idx-shape"),
    pytest.param(dict(seq_idx=torch.zeros(2, 5, device=KERNEL_DEVICE)), TypeError, r"seq_idx must have dtype",
                 id="seq-idx-float"),
    pytest.param(dict(seq_idx=torch.zeros(2, 5, dtype=torch.int32, device=KERNEL_DEVICE), initial_states=rnd(2, 6, 3)),
                 ValueError, r"seq_idx cannot be combined", id="seq-idx-with-init"),
    pytest.param(dict(final_states_out=rnd(2, 6, 3)), ValueError, r"return_final_states is False",
                 id="final-out-without-return"),
    pytest.param(dict(final_states_out=rnd(2, 6, 2), return_final_states=True), ValueError,
                 r"final_states_out must have shape \[2, 6, 3\]", id="final-out-shape"),
    pytest.param(dict(final_states_out=rnd(2, 6, 3, dtype=torch.float16), return_final_states=True), TypeError,
                 r"final_states_out must have dtype", id="final-out-dtype"),
]


@pytest.mark.parametrize(("change", "exc", "match"), FN_BAD)
def test_fn_bad_input(change, exc, match):
    args = dict(x=rnd(2, 6, 5), weight=rnd(6, 4), bias=None, activation=None)
    args.update(change)
    with pytest.raises(exc, match=match):
        causal_conv1d_fn(**args)


VARLEN_BAD = [
    pytest.param(
        dict(conv_states=rnd(4, 6, 2)),
        ValueError,
        r"conv_states must have shape \[slots, 6, >= 3\]",
        id="state-too-short",
    ),
    pytest.param(
        dict(cache_indices=_dev(0, 4)),
        ValueError,
        r"cache_indices holds 4, outside the cache \[0, 4\)",
        id="index-past-end",
    ),
    pytest.param(
        dict(cache_indices=_dev(0)), ValueError, r"cache_indices has 1 entries, expected at least 2", id="index-count"
    ),
    pytest.param(dict(cache_indices=_dev(3, 3)), ValueError, r"cache_indices holds slot 3 twice", id="slot-twice"),
    pytest.param(
        dict(conv_states=rnd(1, 6, 3), cache_indices=None),
        ValueError,
        r"conv_states has 1 slots for 2 sequences; pass cache_indices",
        id="more-sequences-than-slots",
    ),
    pytest.param(
        dict(query_start_loc=_dev(0, 3, 6)),
        ValueError,
        r"query_start_loc must rise from 0 to the "
        r"token count 5",
        id="qsl-past-end",
    ),
    pytest.param(
        dict(query_start_loc=_dev(0, 4, 2, 5), cache_indices=None, has_initial_state=None),
        ValueError,
        r"query_start_loc must rise",
        id="qsl-decreasing",
    ),
    pytest.param(
        dict(has_initial_state=_dev(1, 0)), TypeError, r"has_initial_state must have dtype", id="init-int"
    ),
    pytest.param(dict(weight=rnd(6, 9)), ValueError, r"width W must be in 2\.\.8, got 9", id="W9"),
]


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D_VARLEN))
@pytest.mark.parametrize(("change", "exc", "match"), VARLEN_BAD)
def test_varlen_bad_input_writes_nothing(backend, change, exc, match):
    args = dict(
        x=rnd(6, 5),
        weight=rnd(6, 4),
        bias=None,
        conv_states=rnd(4, 6, 3),
        query_start_loc=_dev(0, 3, 5),
        cache_indices=_dev(2, 0),
        has_initial_state=_dev(True, False),
    )
    args.update(change)
    before = args["conv_states"].clone()
    with use_backend(backend), pytest.raises(exc, match=match):
        causal_conv1d_varlen(**args)
    assert_equal(args["conv_states"], before, "conv_states")


UPDATE_BAD = [
    pytest.param(
        dict(conv_state_indices=_dev(0, -5)),
        ValueError,
        r"holds -5, outside the cache \[0, 3\)",
        id="index-negative",
    ),
    pytest.param(
        dict(conv_state_indices=_dev(3, 0)), ValueError, r"holds 3, outside the cache", id="index-end"
    ),
    pytest.param(
        dict(conv_state_indices=_dev(1, 1)), ValueError, r"conv_state_indices holds slot 1 twice", id="slot-twice"
    ),
    pytest.param(
        dict(conv_state_indices=None), ValueError, r"conv_state has 3 slots for 2 rows; pass conv_state_indices",
        id="no-index",
    ),
    pytest.param(dict(x=rnd(2, 7)), ValueError, r"x has 7 channels but weight has 6", id="channels"),
    pytest.param(dict(conv_state=rnd(3, 6, 2)), ValueError, r"conv_state must have shape", id="state-short"),
    pytest.param(dict(weight=rnd(6, 1)), ValueError, r"width W must be", id="W1"),
    pytest.param(
        dict(conv_state_indices=_dev(0.0, 1.0)),
        TypeError,
        r"conv_state_indices must have dtype",
        id="index-float",
    ),
    pytest.param(dict(cache_seqlens=_dev(1.0, 2.0)), TypeError, r"cache_seqlens must have dtype", id="seqlens-float"),
    pytest.param(dict(cache_seqlens=_dev(3, dtype=torch.int32)), ValueError,
                 r"cache_seqlens has 1 entries, expected at least 2", id="seqlens-short"),
    pytest.param(dict(cache_seqlens=torch.zeros(2, 1, dtype=torch.int32, device=KERNEL_DEVICE)), ValueError,
                 r"cache_seqlens must be 1-D", id="seqlens-2d"),
]


@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D_UPDATE))
@pytest.mark.parametrize(("change", "exc", "match"), UPDATE_BAD)
def test_update_bad_input_writes_nothing(backend, change, exc, match):
    args = dict(x=rnd(2, 6), conv_state=rnd(3, 6, 3), weight=rnd(6, 4), conv_state_indices=_dev(2, 0))
    args.update(change)
    before = args["conv_state"].clone()
    with use_backend(backend), pytest.raises(exc, match=match):
        causal_conv1d_update(**args)
    assert_equal(args["conv_state"], before, "conv_state")


# ------------------------------------------------------------------ aliasing: states written in place


def _varlen(x=None, weight=None, bias=None, conv_states=None):
    """causal_conv1d_varlen on two sequences of a [6, 5] input with W 4 and 4 slots (defaults random)."""
    return causal_conv1d_varlen(rnd(6, 5) if x is None else x, rnd(6, 4) if weight is None else weight,
                                rnd(6) if bias is None else bias,
                                rnd(4, 6, 3) if conv_states is None else conv_states, _dev(0, 3, 5),
                                cache_indices=_dev(2, 0), has_initial_state=_dev(True, False))


def _update(x=None, weight=None, bias=None, conv_state=None):
    """causal_conv1d_update of 2 rows [2, 6, 2] with W 4 and 3 slots (defaults random)."""
    return causal_conv1d_update(rnd(2, 6, 2) if x is None else x, rnd(3, 6, 3) if conv_state is None else conv_state,
                                rnd(6, 4) if weight is None else weight, rnd(6) if bias is None else bias,
                                conv_state_indices=_dev(2, 0))


STATE_OPS = {"varlen": (CAUSAL_CONV1D_VARLEN, _varlen, "conv_states", (4, 6, 3)),
             "update": (CAUSAL_CONV1D_UPDATE, _update, "conv_state", (3, 6, 3))}
STATE_INPUTS = {"varlen": {"x": (6, 5), "weight": (6, 4), "bias": (6,)},
                "update": {"x": (2, 6, 2), "weight": (6, 4), "bias": (6,)}}
ALIAS_PARAMS = [pytest.param(name, other, b, id=f"{name}-{other}-{b}") for name, (op, *_) in STATE_OPS.items()
                for other in STATE_INPUTS[name] for b in backends(op)]


@pytest.mark.parametrize(("name", "other", "backend"), ALIAS_PARAMS)
def test_state_cache_overlapping_an_input_is_refused_before_writing(name, other, backend):
    """The conv state cache is written in place while x, weight and bias are read: a cache sharing memory
    with one of them passed validation (and raced on a GPU); now ValueError, nothing written."""
    _, run, state_name, state_shape = STATE_OPS[name]
    buffer, state, inp = sharing(state_shape, STATE_INPUTS[name][other])
    before = buffer.clone()
    with use_backend(backend), pytest.raises(ValueError, match=f"{state_name} overlaps {other} in memory"):
        run(**{state_name: state, other: inp})
    assert_equal(buffer, before, "the shared buffer")


@pytest.mark.parametrize(("name", "backend"), [pytest.param(n, b, id=f"{n}-{b}") for n, (op, *_) in STATE_OPS.items()
                                               for b in backends(op)])
def test_state_cache_whose_slots_share_memory_is_refused(name, backend):
    """A cache made with ``expand`` (stride 0 over slots): every slot would write one location."""
    _, run, state_name, state_shape = STATE_OPS[name]
    shared = rnd(1, *state_shape[1:]).expand(state_shape)
    before = shared.clone()
    with use_backend(backend), pytest.raises(ValueError, match=f"{state_name} has elements that share memory"):
        run(**{state_name: shared})
    assert_equal(shared, before, "conv state")


@pytest.mark.parametrize("other", ["x", "weight", "initial_states"])
@pytest.mark.parametrize("backend", backends(CAUSAL_CONV1D))
def test_fn_final_states_out_overlapping_an_input_is_refused(backend, other):
    shapes = {"x": (2, 6, 5), "weight": (6, 4), "initial_states": (2, 6, 3)}
    buffer, dest, inp = sharing((2, 6, 3), shapes[other])
    args = {"x": rnd(2, 6, 5), "weight": rnd(6, 4), "initial_states": rnd(2, 6, 3), other: inp}
    before = buffer.clone()
    with use_backend(backend), pytest.raises(ValueError, match=f"final_states_out overlaps {other} in memory"):
        causal_conv1d_fn(args.pop("x"), args.pop("weight"), None, "silu", **args, return_final_states=True,
                         final_states_out=dest)
    assert_equal(buffer, before, "the shared buffer")


# ------------------------------------------------------------------ oracles: HF transformers' Mamba pieces


@pytest.mark.oracle
@pytest.mark.parametrize("width", [2, 4])
def test_oracle_hf_mixer_conv1d_module(width):
    """MambaMixer's conv path: ``nn.Conv1d(groups=D, padding=W-1)`` then ``[..., :L]``, then act."""
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    cfg = MambaConfig(hidden_size=16, intermediate_size=32, conv_kernel=width, state_size=4)
    conv = MambaMixer(cfg, layer_idx=0).conv1d.to(KERNEL_DEVICE)
    x = rnd(2, 32, 13)
    with torch.no_grad():
        hf = torch.nn.functional.silu(conv(x)[..., :13])
        ours = causal_conv1d_fn(x, conv.weight.squeeze(1), conv.bias, "silu")
    assert_close(ours, hf)


@pytest.mark.oracle
def test_oracle_hf_conv_fn_and_update():
    """transformers' ``causal_conv1d_fn`` / ``causal_conv1d_update`` torch paths; HF keeps a W-wide
    conv state, which our update accepts as a state wider than W-1."""
    modeling = pytest.importorskip("transformers.models.mamba.modeling_mamba")
    x, weight, bias = rnd(2, 24, 9), rnd(24, 4), rnd(24)
    assert_close(
        causal_conv1d_fn(x, weight, bias, "silu"), modeling.causal_conv1d_fn(x, weight, bias, "silu")
    )
    hf_state = rnd(2, 24, 4)
    ours_state = hf_state.clone()
    step = rnd(2, 24, 1)
    hf = modeling.causal_conv1d_update(step, hf_state, weight, bias, activation="silu")
    ours = causal_conv1d_update(step, ours_state, weight, bias, "silu")
    assert_close(ours, hf)
    assert_equal(ours_state, hf_state, "conv_state")


# ------------------------------------------------------------------ gpu tier (real sizes)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_fn_bf16_real_size(batch):
    x = rnd(batch, 4096, 2048, dtype=torch.bfloat16, device="cuda")
    weight, bias = (
        rnd(4096, 4, dtype=torch.bfloat16, device="cuda"),
        rnd(4096, dtype=torch.bfloat16, device="cuda"),
    )
    init = rnd(batch, 4096, 3, dtype=torch.bfloat16, device="cuda")
    out, final = causal_conv1d_fn(x, weight, bias, "silu", initial_states=init, return_final_states=True)
    ref, ref_final = causal_conv1d_fn_ref(x, weight, bias, True, init)
    assert_close(out, ref)
    assert_equal(final, ref_final.to(torch.bfloat16))


@pytest.mark.gpu
def test_gpu_varlen_bf16_real_sizes():
    lengths = [1, 17, 300, 1024, 64, 5]
    dim = 2048
    args = make_varlen(
        lengths,
        dim,
        4,
        16,
        [3, 9, PAD_SLOT_ID, 0, 15, 7],
        [True, False, True, True, False, True],
        dtype=torch.bfloat16,
    )
    ref_out, ref_states = varlen_expected(args)
    out = causal_conv1d_varlen(**args)
    assert_close(out, ref_out.to(torch.bfloat16))
    assert_equal(args["conv_states"], ref_states.to(torch.bfloat16))


@pytest.mark.gpu
def test_gpu_update_graph_capture_compile_and_opcheck():
    dim, batch = 4096, 64
    x = rnd(batch, dim, dtype=torch.bfloat16, device="cuda")
    weight, bias = (
        rnd(dim, 4, dtype=torch.bfloat16, device="cuda"),
        rnd(dim, dtype=torch.bfloat16, device="cuda"),
    )
    state = rnd(80, dim, 3, dtype=torch.bfloat16, device="cuda")
    idx = torch.arange(batch, device="cuda", dtype=torch.int32) + 16
    torch.library.opcheck(
        torch.ops.ifk.causal_conv1d_update,
        (torch.empty_like(x).unsqueeze(-1), state.clone(), [x.unsqueeze(-1), weight, bias, idx, None], True,
         PAD_SLOT_ID),
    )
    out = causal_conv1d_update(x, state, weight, bias, "silu", conv_state_indices=idx)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = causal_conv1d_update(x, state, weight, bias, "silu", conv_state_indices=idx)
    idx[3] = PAD_SLOT_ID
    ref_state = state.clone()
    ref_out = torch.empty(batch, dim, 1, device="cuda")
    causal_conv1d_update_ref(x.unsqueeze(-1), ref_state, weight, bias, True, idx, PAD_SLOT_ID, ref_out)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(captured, ref_out[..., 0].to(torch.bfloat16))
    assert_equal(state, ref_state)
    compiled = torch.compile(causal_conv1d_update, fullgraph=True)
    out = compiled(x, state.clone(), weight, bias, "silu", conv_state_indices=idx)
    assert out.shape == (batch, dim)


@pytest.mark.gpu
def test_gpu_fn_seq_idx_and_final_states_out_bf16():
    x = rnd(2, 2048, 1024, dtype=torch.bfloat16, device="cuda")
    weight, bias = rnd(2048, 4, dtype=torch.bfloat16, device="cuda"), rnd(2048, dtype=torch.bfloat16, device="cuda")
    seq_idx = _seq_idx(2, 1024, [[100, 101, 700], [5]])
    out = causal_conv1d_fn(x, weight, bias, "silu", seq_idx=seq_idx)
    assert_close(out, causal_conv1d_fn_ref(x, weight, bias, True, seq_idx=seq_idx)[0])
    dest = torch.empty(2, 2048, 3, dtype=torch.bfloat16, device="cuda")
    _, final = causal_conv1d_fn(x, weight, bias, "silu", return_final_states=True, final_states_out=dest)
    assert final is dest
    assert_equal(dest, x[..., -3:])


@pytest.mark.gpu
@pytest.mark.parametrize("width", [4, 8])
def test_gpu_update_cache_seqlens_seq_idx_padding_bf16(width):
    """The circular buffer and seq_idx padding at real sizes: Triton against the torch backend."""
    dim, batch = 4096, 64
    x = rnd(batch, dim, 2, dtype=torch.bfloat16, device="cuda")
    weight, bias = rnd(dim, width, dtype=torch.bfloat16, device="cuda"), rnd(dim, dtype=torch.bfloat16, device="cuda")
    state = rnd(80, dim, width + 3, dtype=torch.bfloat16, device="cuda")
    idx = torch.randperm(80, device="cuda")[:batch].to(torch.int32)
    seqlens = torch.randint(0, 1000, (batch,), device="cuda", dtype=torch.int32)
    ref_state = state.clone()
    with use_backend("torch"):
        ref = causal_conv1d_update(x, ref_state, weight, bias, "silu", seqlens, idx)
    assert_close(causal_conv1d_update(x, state, weight, bias, "silu", seqlens, idx), ref)
    assert_equal(state, ref_state)
    seq_idx = torch.tensor([[-1] * 5 + [0] * 1000 + [-1] * 19 + [1] * 1000], dtype=torch.int32, device="cuda")
    xs = rnd(1, dim, 2024, dtype=torch.bfloat16, device="cuda")
    out = causal_conv1d_fn(xs, weight, bias, "silu", seq_idx=seq_idx)
    assert_close(out, causal_conv1d_fn_ref(xs, weight, bias, True, seq_idx=seq_idx)[0])
    assert not out[..., (seq_idx[0] < 0)].any()
