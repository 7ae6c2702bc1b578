"""add_lora_linear (fused, per-slot ranks) and lora_linear (training) against the package reference
in float64."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import triton_kernels._data_checks
import triton_kernels.lora.fused_torch
from tests.triton_kernels.aliasing import sharing
from tests.triton_kernels.lora.helpers import lora_weights, oracle_delta, prepared_meta, token_mapping
from tests.utils import KERNEL_DEVICE, REL_TOL, assert_close, assert_equal, backends
from triton_kernels import LoRAKernelMeta, add_lora_linear, lora_linear, use_backend
from triton_kernels.registry import ADD_LORA_LINEAR

BACKENDS = backends(ADD_LORA_LINEAR)

# (T, H_in, R capacity, slice widths, slot ranks or None, mapping kind)
CASES = [
    pytest.param(7, 67, 16, (20, 9, 9), None, "interleaved", id="T7-H67-R16-qkv"),
    pytest.param(9, 67, 16, (20, 9, 9), (1, 8, 12, 16), "interleaved", id="T9-H67-qkv-ranks1-8-12-16"),
    pytest.param(9, 40, 64, (33, 17), (8, 64, 12, 1), "interleaved", id="T9-H40-2slices-ranks8-64-12-1"),
    pytest.param(6, 40, 12, (70,), (12, 0, 5, 12), "interleaved", id="T6-1slice-wide-rank0-slot"),
    pytest.param(1, 67, 8, (20, 9, 9), None, "interleaved", id="T1"),
    pytest.param(3, 24, 8, (70, 40, 30), (8, 2, 5, 8), "interleaved", id="T3-qkv-columns-split"),
    pytest.param(1, 24, 8, (130, 70, 60), (8, 3, 8, 1), "interleaved", id="T1-qkv-per-slice-split"),
    pytest.param(9, 33, 8, (8, 9, 10, 11), (8, 3, 8, 1), "skewed", id="T9-4slices-skewed"),
    pytest.param(520, 24, 16, (16, 8), (16, 8, 1, 12), "interleaved", id="T520-prefill-tiles"),
    pytest.param(5, 67, 8, (20, 9), None, "no_lora", id="all-minus1"),
    pytest.param(0, 67, 8, (20, 9), (8, 8, 8, 8), "interleaved", id="T0"),
]
NUM_SLOTS = 4


def _case(num_tokens, hidden, rank, widths, ranks, kind, dtype, four_d=False):
    mapping = token_mapping(kind, num_tokens, NUM_SLOTS)
    x = torch.randn(num_tokens, hidden).to(dtype).to(KERNEL_DEVICE)
    a, b = lora_weights(NUM_SLOTS, rank, hidden, widths, dtype, four_d=four_d)
    ranks = None if ranks is None else torch.tensor(ranks, dtype=torch.int32, device=KERNEL_DEVICE)
    return mapping, x, a, b, ranks, prepared_meta(mapping, NUM_SLOTS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("num_tokens", "hidden", "rank", "widths", "ranks", "kind"), CASES)
def test_add_lora_linear(num_tokens, hidden, rank, widths, ranks, kind, dtype, backend):
    mapping, x, a, b, ranks, meta = _case(
        num_tokens, hidden, rank, widths, ranks, kind, dtype, four_d=rank == 16
    )
    y = torch.randn(num_tokens, sum(widths)).to(dtype).to(KERNEL_DEVICE)
    expected = y.double() + oracle_delta(x, a, b, mapping, 0.75, ranks)
    untouched = (mapping == -1).to(y.device)
    keep = y[untouched].clone()
    with use_backend(backend):
        out = add_lora_linear(y, x, a, b, 0.75, widths, meta, lora_ranks=ranks)
    assert out is y
    assert_equal(y[untouched], keep, "rows of slot -1 tokens")
    assert_close(y, expected, REL_TOL[dtype])


@st.composite
def _random_batches(draw):
    rank = draw(st.integers(1, 20))
    slots = draw(st.integers(1, 5))
    return dict(
        num_tokens=draw(st.integers(0, 40)),
        hidden=draw(st.integers(1, 70)),
        rank=rank,
        widths=tuple(draw(st.lists(st.integers(1, 80), min_size=1, max_size=4))),
        slots=slots,
        ranks=draw(st.none() | st.lists(st.integers(0, rank), min_size=slots, max_size=slots)),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=25, deadline=None)
@given(_random_batches())
def test_random_shapes_match_the_oracle(batch):
    """Any sizes (1s included), any slice widths and count, any mix of ranks and -1 tokens."""
    torch.manual_seed(batch["seed"])
    t, slots = batch["num_tokens"], batch["slots"]
    mapping = torch.randint(-1, slots, (t,), dtype=torch.int32)
    x = torch.randn(t, batch["hidden"], device=KERNEL_DEVICE)
    a, b = lora_weights(slots, batch["rank"], batch["hidden"], batch["widths"], torch.float32)
    ranks = None if batch["ranks"] is None else torch.tensor(batch["ranks"], device=KERNEL_DEVICE)
    y = torch.randn(t, sum(batch["widths"]), device=KERNEL_DEVICE)
    expected = y.double() + oracle_delta(x, a, b, mapping, 1.5, ranks)
    with use_backend("triton"):
        add_lora_linear(y, x, a, b, 1.5, batch["widths"], prepared_meta(mapping, slots), lora_ranks=ranks)
    assert_close(y, expected)


def test_rank_costs_only_its_rows():
    """Rows of A and columns of B past a slot's rank are never read: poisoning them changes nothing."""
    _, x, a, b, ranks, meta = _case(9, 40, 64, (33, 17), (8, 64, 12, 1), "interleaved", torch.float32)
    clean = add_lora_linear(torch.zeros(9, 50), x, a, b, 1.0, (33, 17), meta, lora_ranks=ranks)
    for slot, r in enumerate(ranks.tolist()):
        for w in a:
            w[slot, r:] = float("nan")
        for w in b:
            w[slot, :, r:] = float("nan")
    for backend in BACKENDS:
        with use_backend(backend):
            y = add_lora_linear(torch.zeros(9, 50), x, a, b, 1.0, (33, 17), meta, lora_ranks=ranks)
        assert_close(y, clean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    ("num_tokens", "kind", "ranks", "mapping"),
    [
        pytest.param(12, "interleaved", (5, 5, 5, 5), None, id="uniform-rank5-padded"),
        pytest.param(8, None, (3, 3, 3, 3), (2, 0, 1, 0, 2, 1, -1, -1), id="dense-groups-rank3"),
        pytest.param(8, None, None, (3, 0, 3, 3, 0, -1, 3, 0), id="empty-slots-inside-the-range"),
        pytest.param(6, None, (8, 8, 5, 8), (2, 2, 2, 2, 2, 2), id="one-slot-all-tokens-rank5"),
        pytest.param(6, None, (4, 4, 4, 4), (2, -1, 2, 2, -1, 2), id="one-slot-view"),
        pytest.param(200, "skewed", None, None, id="skewed-T200-loop-fallback"),
        pytest.param(12, "interleaved", (8, 2, 8, 8), None, id="mixed-ranks-masked"),
    ],
)
def test_torch_backend_batched_paths(num_tokens, kind, ranks, mapping, dtype):
    """The torch backend's batched form (padded groups, views of the sorted indices, one rank per
    range, mixed ranks masked) and its loop fallback, with NaN in every weight row and column past a slot's rank."""
    rank, widths = 8, (20, 9, 9)
    if mapping is None:
        mapping = token_mapping(kind, num_tokens, NUM_SLOTS)
    else:
        mapping = torch.tensor(mapping, dtype=torch.int32)
    x = torch.randn(num_tokens, 33).to(dtype).to(KERNEL_DEVICE)
    a, b = lora_weights(NUM_SLOTS, rank, 33, widths, dtype)
    ranks = None if ranks is None else torch.tensor(ranks, dtype=torch.int32, device=KERNEL_DEVICE)
    expected_delta = oracle_delta(x, a, b, mapping, 0.75, ranks)
    for slot, r in enumerate(ranks.tolist() if ranks is not None else []):
        for w in a:
            w[slot, r:] = float("nan")
        for w in b:
            w[slot, :, r:] = float("nan")
    base = torch.randn(num_tokens, 2 * sum(widths)).to(dtype).to(KERNEL_DEVICE)
    y = base[:, ::2]  # a strided view: written in place, never copied
    expected = y.double() + expected_delta
    untouched = (mapping == -1).to(y.device)
    keep = y[untouched].clone()
    with use_backend("torch"):
        add_lora_linear(y, x, a, b, 0.75, widths, prepared_meta(mapping, NUM_SLOTS), lora_ranks=ranks)
    assert_close(y, expected, REL_TOL[dtype])
    assert_equal(y[untouched], keep, "rows of slot -1 tokens")


@pytest.mark.parametrize("slot_macs", [0, 2**40], ids=["loop", "batched"])
def test_torch_backend_mixed_ranks_zero_or_poisoned_padding(monkeypatch, slot_macs):
    """Mixed ranks on the torch backend, forced into the per-slot loop and into the batched form:
    zero-padded weights (as LoRASlots keeps them: run unmasked at the largest rank, the padding
    check cached), then the same weights poisoned with NaN past the ranks in place (the cached
    check must see the new version and mask), then fixed again."""
    monkeypatch.setattr(triton_kernels.lora.fused_torch, "BATCHED_SLOT_MACS", slot_macs)
    mapping, x, a, b, ranks, meta = _case(13, 33, 8, (20, 9), (8, 2, 0, 5), "interleaved", torch.float32)
    for slot, r in enumerate(ranks.tolist()):
        for w in a:
            w[slot, r:] = 0
        for w in b:
            w[slot, :, r:] = 0
    y0 = torch.randn(13, 29)
    expected = y0.double() + oracle_delta(x, a, b, mapping, 0.75, ranks)
    for poison in (0.0, float("nan"), 0.0):
        a[1][1, 2:] = poison
        b[0][3, :, 5:] = poison
        y = y0.clone()
        with use_backend("torch"):
            add_lora_linear(y, x, a, b, 0.75, (20, 9), meta, lora_ranks=ranks)
        assert_close(y, expected, name=f"padding {poison}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ranks", [None, (3, 8, 1, 5)], ids=["full-rank", "mixed-ranks"])
def test_lora_linear_gradients(ranks, backend):
    mapping, x, a, b, ranks, meta = _case(
        11, 24, 8, (12, 5, 5), ranks, "interleaved", torch.float32, four_d=True
    )
    leaves = [x, *a, *b]
    for t in leaves:
        t.requires_grad_(True)
    grad = torch.randn(11, 22, device=KERNEL_DEVICE)
    with use_backend(backend):
        out = lora_linear(x, a, b, 0.5, meta, lora_ranks=ranks)
    got = torch.autograd.grad(out, leaves, grad)
    want_out = oracle_delta(x, a, b, mapping, 0.5, ranks)
    want = torch.autograd.grad(want_out, leaves, grad.double())
    assert_close(out, want_out)
    for name, g, w in zip(["x"] + [f"A{i}" for i in range(3)] + [f"B{i}" for i in range(3)], got, want):
        assert g.shape == w.shape
        assert_close(g, w, name=f"d{name}")


def test_lora_linear_gradcheck_float64():
    mapping = torch.tensor([1, -1, 0, 2, 1, 0], dtype=torch.int32)
    meta = prepared_meta(mapping, 3)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    a, b = lora_weights(3, 3, 5, (4, 2), torch.float64)
    ranks = torch.tensor([3, 1, 2], device=KERNEL_DEVICE)
    for t in [*a, *b]:
        t.requires_grad_(True)

    def fn(x, a0, a1, b0, b1):
        return lora_linear(x, (a0, a1), (b0, b1), 0.7, meta, lora_ranks=ranks)

    with use_backend("torch"):
        assert torch.autograd.gradcheck(fn, (x, *a, *b))


def _small(dtype=torch.float32):
    return _case(6, 16, 8, (6, 4), (8, 2, 5, 8), "interleaved", dtype)


def test_bad_inputs_raise_before_writing():
    _, x, a, b, ranks, meta = _small()
    y = torch.randn(6, 10, device=KERNEL_DEVICE)
    keep = y.clone()
    other_meta = prepared_meta(torch.tensor([0, 1, 2], dtype=torch.int32), NUM_SLOTS)
    wide_meta = prepared_meta(token_mapping("interleaved", 6, NUM_SLOTS), NUM_SLOTS + 1)
    too_high = torch.tensor([8, 9, 1, 1], dtype=torch.int32, device=KERNEL_DEVICE)
    bad = [
        (ValueError, "outside \\[0, 8\\]", dict(lora_ranks=too_high)),
        (ValueError, "outside \\[0, 8\\]", dict(lora_ranks=-too_high)),
        (ValueError, "one per slot", dict(lora_ranks=ranks[:3])),
        (ValueError, "prepared for 3 tokens", dict(meta=other_meta)),
        (ValueError, "max_loras=5 slots", dict(meta=wide_meta)),
        (ValueError, "output_slices", dict(output_slices=(5, 5))),
        (TypeError, "lora_a_stacked\\[0\\] has dtype", dict(lora_a_stacked=[w.half() for w in a])),
        (ValueError, "hidden size", dict(x=x[:, :15])),
        (ValueError, "y must have shape", dict(y=y[:, :9])),
        (TypeError, "y must have dtype", dict(y=y.half())),
        (ValueError, "lora_b_stacked must hold", dict(lora_b_stacked=b[:1], output_slices=(6,))),
        (TypeError, "meta must be", dict(meta=meta.meta_args(6))),
    ]
    base = dict(y=y, x=x, lora_a_stacked=a, lora_b_stacked=b, scale=1.0, output_slices=(6, 4), meta=meta)
    for exc, match, change in bad:
        kwargs = {**base, "lora_ranks": ranks, **change}
        for backend in BACKENDS:
            with use_backend(backend), pytest.raises(exc, match=match):
                add_lora_linear(**kwargs)
            assert_equal(y, keep)


@pytest.mark.parametrize("backend", backends(ADD_LORA_LINEAR))
@pytest.mark.parametrize("other", ["x", "lora_a_stacked[0]", "lora_b_stacked[1]"])
def test_y_overlapping_an_input_is_refused_before_writing(other, backend):
    """``y += delta`` reads y itself (fine) but must not read x or a weight through y's memory: that passed
    validation and raced on a GPU."""
    _, x, a, b, ranks, meta = _small()
    shapes = {"x": x.shape, "lora_a_stacked[0]": a[0].shape, "lora_b_stacked[1]": b[1].shape}
    buffer, y, shared = sharing((6, 10), shapes[other])
    x = shared if other == "x" else x
    a = [shared, a[1]] if other == "lora_a_stacked[0]" else a
    b = [b[0], shared] if other == "lora_b_stacked[1]" else b
    before = buffer.clone()
    with use_backend(backend), pytest.raises(ValueError, match=re.escape(f"y overlaps {other} in memory")):
        add_lora_linear(y, x, a, b, 1.0, (6, 4), meta, lora_ranks=ranks)
    assert_equal(buffer, before)


def test_lora_linear_no_lora_batch_is_zero():
    _, x, a, b, _, _ = _small()
    meta = prepared_meta(token_mapping("no_lora", 6, NUM_SLOTS), NUM_SLOTS)
    x.requires_grad_(True)
    out = lora_linear(x, a, b, 1.0, meta)
    assert_equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert_equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_intermediate_beyond_fp16_range(backend):
    """``x @ A^T`` past 65504 with small B: a finite fp16 delta on every backend (the rank-sized
    intermediate stays in fp32; the Triton kernel used to round it to fp16, i.e. to inf)."""
    mapping, x, a, b, ranks, meta = _case(7, 32, 16, (20, 9), (16, 8, 3, 16), "interleaved", torch.float32)
    x = (x * 100).half()
    a = [(w * 1000).half() for w in a]
    b = [(w * 1e-3).half() for w in b]
    expected = oracle_delta(x, a, b, mapping, 1.0, ranks)
    assert expected.abs().max() < 60000 < oracle_delta(x, a, [torch.ones_like(w) for w in b], mapping, 1.0).abs().max()
    y = torch.zeros(7, 29, device=KERNEL_DEVICE).half()
    with use_backend(backend):
        add_lora_linear(y, x, a, b, 1.0, (20, 9), meta, lora_ranks=ranks)
    assert_close(y, expected, REL_TOL[torch.float16])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["add_lora_linear", "lora_linear"])
def test_meta_of_another_batch_raises_compiled(op, backend):
    """Under torch.compile the wrapper's token-count check is traced away; the custom op's own
    value check refuses a meta prepared for 8 tokens with a 5-token batch (it used to corrupt the
    heap on triton), before anything is written."""
    _, _, a, b, ranks, _ = _small()
    meta = LoRAKernelMeta.make(NUM_SLOTS, 8, KERNEL_DEVICE)
    meta.prepare_tensors(token_mapping("interleaved", 8, NUM_SLOTS).to(KERNEL_DEVICE))
    x = torch.randn(5, 16, device=KERNEL_DEVICE)
    y = torch.randn(5, 10, device=KERNEL_DEVICE)
    keep = y.clone()

    def step(x, y, meta: LoRAKernelMeta):
        if op == "add_lora_linear":
            return add_lora_linear(y, x, a, b, 0.5, (6, 4), meta, lora_ranks=ranks)
        return y + lora_linear(x, a, b, 0.5, meta, lora_ranks=ranks)

    with use_backend(backend):
        with pytest.raises(ValueError, match="prepared for 8 tokens, but x has 5"):
            step(x, y, meta)
        with pytest.raises(ValueError, match="lora_token_start_loc must rise from 0 to the token count 5"):
            torch.compile(step, fullgraph=True, backend="aot_eager")(x, y, meta)
    assert_equal(y, keep)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupted_metadata_raises_before_writing(backend):
    _, x, a, b, ranks, meta = _small()
    meta.active_lora_ids[3] = NUM_SLOTS
    y = torch.randn(6, 10, device=KERNEL_DEVICE)
    keep = y.clone()
    with use_backend(backend), pytest.raises(ValueError, match="lora_ids holds 4, outside the weights' slots"):
        add_lora_linear(y, x, a, b, 1.0, (6, 4), meta, lora_ranks=ranks)
    assert_equal(y, keep)


def test_kernel_stays_inside_its_tensors_when_value_checks_are_skipped(monkeypatch):
    """As under CUDA-graph capture: a meta of another batch, a slot id past the weights and ranks
    past the capacity give an undefined result inside ``y`` (a view into a larger buffer), never
    a read or write outside."""
    monkeypatch.setattr(triton_kernels._data_checks, "capturing", lambda t: True)
    _, _, a, b, _, _ = _small()
    meta = LoRAKernelMeta.make(NUM_SLOTS, 8, KERNEL_DEVICE)
    meta.prepare_tensors(torch.tensor([0, 1, 2, 3, 3, 2, 1, 0], dtype=torch.int32, device=KERNEL_DEVICE))
    meta.active_lora_ids[2] = 9
    meta.num_tokens = 5  # the wrapper's eager count check passes; the metadata still holds 8 tokens
    ranks = torch.tensor([8, 99, -3, 8], dtype=torch.int32, device=KERNEL_DEVICE)
    x = torch.randn(5, 16, device=KERNEL_DEVICE)
    buf = torch.randn(9, 13, device=KERNEL_DEVICE)
    keep = buf.clone()
    with use_backend("triton"):
        add_lora_linear(buf[2:7, 1:11], x, a, b, 1.0, (6, 4), meta, lora_ranks=ranks)
    inside = torch.zeros(9, 13, dtype=torch.bool)
    inside[2:7, 1:11] = True
    assert_equal(buf[~inside], keep[~inside], "buffer outside y")


def test_opcheck():
    _, x, a, b, ranks, meta = _small()
    args = list(meta.meta_args(6)[:6])  # the raw op takes the six tensors
    for t in [x, *a, *b]:
        t.requires_grad_(True)
    with use_backend("torch"):
        for r in (ranks, None):
            y = torch.randn(6, 10)
            torch.library.opcheck(torch.ops.ifk.add_lora_linear.default, (y, [x, r, *args, *a, *b], 0.5))
        frozen = [t.detach() for t in (x, *a, *b)]
        grads = (torch.empty(6, 16), torch.empty(2, NUM_SLOTS, 8, 16), torch.empty(NUM_SLOTS, 10, 8))
        inputs = [torch.randn(6, 10), frozen[0], ranks, *args, *frozen[1:]]
        torch.library.opcheck(torch.ops.ifk.lora_linear_backward.default, (*grads, inputs, 0.5))


def test_raw_op_input_list_of_wrong_length_raises():
    """The one input list is ``[x, lora_ranks, *meta (6), *lora_a (S), *lora_b (S)]``: a count that
    does not split so raises TypeError naming the layout, before anything is written."""
    _, x, a, b, ranks, meta = _small()
    y = torch.randn(6, 10, device=KERNEL_DEVICE)
    keep = y.clone()
    with pytest.raises(TypeError, match=r"ifk::add_lora_linear takes inputs \[x, lora_ranks, \*meta_args"):
        torch.ops.ifk.add_lora_linear(y, [x, ranks, *meta.meta_args(6)[:6], *a, b[0]], 0.5)
    assert_equal(y, keep)


def test_compile_fullgraph_forward_and_backward():
    _, x, a, b, ranks, meta = _small()
    x.requires_grad_(True)

    def step(x, y, meta: LoRAKernelMeta):
        add_lora_linear(y, x.detach(), a, b, 0.5, (6, 4), meta, lora_ranks=ranks)
        return y + lora_linear(x, a, b, 0.5, meta, lora_ranks=ranks)

    with use_backend("torch"):
        want = step(x, torch.ones(6, 10), meta)
        (want_grad,) = torch.autograd.grad(want.sum(), x)
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, torch.ones(6, 10), meta)
        (got_grad,) = torch.autograd.grad(got.sum(), x)
    assert_close(got, want)
    assert_close(got_grad, want_grad)


def test_meta_device_mismatch_and_plain_tensors_refused():
    _, x, a, b, _, _ = _small()
    with pytest.raises(TypeError, match="lora_a_stacked must be a non-empty list"):
        add_lora_linear(torch.zeros(6, 10), x, a[0], b, 1.0, (6, 4), prepared_meta(torch.zeros(6).int(), 4))


# --- gpu tier: real sizes, bf16, CUDA graphs -----------------------------------------------------
LLAMA3_8B_QKV = (4096, 1024, 1024)


def _llama(num_tokens, hidden, widths, ranks, kind, slots=8, rank=64):
    mapping = token_mapping(kind, num_tokens, slots)
    x = torch.randn(num_tokens, hidden, device="cuda").bfloat16()
    a, b = lora_weights(slots, rank, hidden, widths, torch.bfloat16, four_d=True)
    ranks = None if ranks is None else torch.tensor(ranks, dtype=torch.int32, device="cuda")
    return mapping, x, a, b, ranks, prepared_meta(mapping, slots)


@pytest.mark.gpu
@pytest.mark.parametrize("ranks", [None, (8, 64, 16, 8, 64, 1, 12, 64)], ids=["rank64", "mixed-ranks"])
@pytest.mark.parametrize(
    ("num_tokens", "hidden", "widths", "kind"),
    [
        pytest.param(1, 4096, LLAMA3_8B_QKV, "interleaved", id="T1-qkv"),
        pytest.param(64, 4096, LLAMA3_8B_QKV, "interleaved", id="T64-qkv"),
        pytest.param(256, 4096, (4096,), "skewed", id="T256-o_proj-skewed"),
        pytest.param(8192, 4096, LLAMA3_8B_QKV, "one_slot", id="T8192-qkv-prefill"),
        pytest.param(333, 2049, (1000, 520, 520), "interleaved", id="T333-H2049"),
    ],
)
def test_add_lora_linear_bf16_real_sizes(num_tokens, hidden, widths, kind, ranks):
    mapping, x, a, b, ranks, meta = _llama(num_tokens, hidden, widths, ranks, kind)
    y = torch.randn(num_tokens, sum(widths), device="cuda").bfloat16()
    expected = y.double() + oracle_delta(x, a, b, mapping, 0.5, ranks)
    add_lora_linear(y, x, a, b, 0.5, widths, meta, lora_ranks=ranks)
    assert_close(y, expected, REL_TOL[torch.bfloat16])


@pytest.mark.gpu
def test_cuda_graph_replay_with_changing_mappings():
    widths = LLAMA3_8B_QKV
    _, x, a, b, ranks, _ = _llama(64, 4096, widths, (8, 64, 16, 8, 64, 1, 12, 64), "interleaved")
    meta = LoRAKernelMeta.make(8, 128, "cuda")
    meta.prepare_tensors(token_mapping("interleaved", 64, 8).cuda())
    y = torch.zeros(64, sum(widths), device="cuda").bfloat16()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile, check the ranks once
        add_lora_linear(y, x, a, b, 0.5, widths, meta, lora_ranks=ranks)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y.zero_()
        add_lora_linear(y, x, a, b, 0.5, widths, meta, lora_ranks=ranks)
    for kind in ["skewed", "interleaved", "no_lora", "one_slot"]:
        mapping = token_mapping(kind, 64, 8)
        meta.prepare_tensors(mapping.cuda())
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(y, oracle_delta(x, a, b, mapping, 0.5, ranks), REL_TOL[torch.bfloat16], name=kind)


@pytest.mark.gpu
def test_opcheck_compile_and_grads_triton_on_gpu():
    mapping, x, a, b, ranks, meta = _llama(
        64, 512, (256, 128), (8, 16, 4, 16), "interleaved", slots=4, rank=16
    )
    args = list(meta.meta_args(64)[:6])
    y = torch.randn(64, 384, device="cuda").bfloat16()
    a3, b3 = [w.squeeze(1) for w in a], [w.squeeze(1) for w in b]  # the raw op takes 3-D weights
    torch.library.opcheck(torch.ops.ifk.add_lora_linear.default, (y, [x, ranks, *args, *a3, *b3], 0.5))
    a32 = [w.float().requires_grad_(True) for w in a]
    b32 = [w.float().requires_grad_(True) for w in b]
    x32 = x.float().requires_grad_(True)
    grads = (torch.empty(64, 512, device="cuda"), torch.empty(2, 4, 16, 512, device="cuda"),
             torch.empty(4, 384, 16, device="cuda"))
    inputs = [torch.randn(64, 384, device="cuda"), x32.detach(), ranks, *args, *(w.detach().squeeze(1) for w in a32),
              *(w.detach().squeeze(1) for w in b32)]
    torch.library.opcheck(torch.ops.ifk.lora_linear_backward.default, (*grads, inputs, 0.5))

    frozen_a, frozen_b = [w.detach() for w in a32], [w.detach() for w in b32]

    def step(x, y):
        add_lora_linear(y, x.detach(), frozen_a, frozen_b, 0.5, (256, 128), meta, lora_ranks=ranks)
        return y + lora_linear(x, a32, b32, 0.5, meta, lora_ranks=ranks)

    got = torch.compile(step, fullgraph=True)(x32, torch.zeros(64, 384, device="cuda"))
    leaves = [x32, *a32, *b32]
    grads = torch.autograd.grad(got.sum(), leaves)
    delta = oracle_delta(x32, a32, b32, mapping, 0.5, ranks)
    assert_close(got, 2 * delta, 1e-5, name="y + delta")
    want_grads = torch.autograd.grad(delta.sum(), leaves)  # only lora_linear's half carries gradients
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert_close(g, w, 1e-5, name=f"grad of leaf {i}")


@pytest.mark.gpu
def test_offsets_past_2_31():
    """Rows of x and y start past element 2^31 of their buffer (int64 offsets)."""
    rows, stride = 17, 2**27  # row 16 starts at element 2^31
    mapping = torch.tensor([0, 1] * 8 + [2], dtype=torch.int32)
    big = torch.empty(rows, stride, dtype=torch.bfloat16, device="cuda")
    x, y = big[:, :64], big[:, -48:]
    x.copy_(torch.randn(rows, 64, device="cuda"))
    y.copy_(torch.randn(rows, 48, device="cuda"))
    a, b = lora_weights(3, 16, 64, (32, 16), torch.bfloat16)
    expected = y.double() + oracle_delta(x, a, b, mapping, 0.5)
    add_lora_linear(y, x, a, b, 0.5, (32, 16), prepared_meta(mapping, 3))
    assert_close(y, expected, REL_TOL[torch.bfloat16])
