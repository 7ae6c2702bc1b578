"""lora_shrink / lora_expand against the package reference in float64 (vLLM semantics)."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import triton_kernels._data_checks
from tests.triton_kernels.aliasing import sharing
from tests.triton_kernels.lora.helpers import lora_weights, oracle_expand, oracle_shrink, prepared_meta, token_mapping
from tests.utils import KERNEL_DEVICE, REL_TOL, assert_close, assert_equal, backends, poisoned
from triton_kernels import LoRAKernelMeta, lora_expand, lora_shrink, use_backend
from triton_kernels.registry import LORA_EXPAND, LORA_SHRINK

# (T, H_in, R, slice widths, slots, mapping kind)
CASES = [
    pytest.param(7, 67, 12, (20, 9, 9), 4, "interleaved", id="T7-H67-R12-qkv-interleaved"),
    pytest.param(1, 67, 8, (33,), 3, "interleaved", id="T1-H67-R8-1slice"),
    pytest.param(9, 40, 16, (33, 17), 3, "skewed", id="T9-H40-R16-2slices-skewed"),
    pytest.param(6, 67, 1, (5, 7), 2, "interleaved", id="T6-H67-R1"),
    pytest.param(5, 33, 64, (18,), 2, "one_slot", id="T5-H33-R64"),
    pytest.param(6, 24, 8, (8, 9, 10, 11), 3, "interleaved", id="T6-4slices-two-launches"),
    pytest.param(520, 24, 8, (16,), 5, "interleaved", id="T520-prefill-tiles"),
    pytest.param(5, 67, 8, (20, 9), 3, "no_lora", id="T5-all-minus1"),
    pytest.param(0, 67, 8, (20, 9), 3, "interleaved", id="T0"),
]


def _shrink_case(num_tokens, hidden, rank, widths, slots, kind, dtype, four_d=False):
    mapping = token_mapping(kind, num_tokens, slots)
    x = torch.randn(num_tokens, hidden).to(dtype).to(KERNEL_DEVICE)
    a, _ = lora_weights(slots, rank, hidden, widths, dtype, four_d=four_d)
    return mapping, x, a, prepared_meta(mapping, slots)


@pytest.mark.parametrize("backend", backends(LORA_SHRINK))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("num_tokens", "hidden", "rank", "widths", "slots", "kind"), CASES)
def test_shrink(num_tokens, hidden, rank, widths, slots, kind, dtype, backend):
    mapping, x, a, meta = _shrink_case(
        num_tokens, hidden, rank, widths, slots, kind, dtype, four_d=rank == 12
    )
    out = poisoned((len(widths), num_tokens, rank), torch.float32)
    with use_backend(backend):
        lora_shrink(x, a, out, *meta.meta_args(num_tokens), 0.7)
    if (mapping == -1).all():  # vLLM returns at once: nothing written
        assert torch.isnan(out).all()
    else:
        assert_close(out.cpu(), oracle_shrink(x, a, mapping, 0.7).cpu(), REL_TOL[dtype])


@pytest.mark.parametrize("backend", backends(LORA_EXPAND))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("add_inputs", "offset_start"), [(False, 0), (True, 0), (False, 5), (True, 3)])
@pytest.mark.parametrize(("num_tokens", "hidden", "rank", "widths", "slots", "kind"), CASES)
def test_expand(num_tokens, hidden, rank, widths, slots, kind, add_inputs, offset_start, dtype, backend):
    mapping = token_mapping(kind, num_tokens, slots)
    meta = prepared_meta(mapping, slots)
    _, b = lora_weights(slots, rank, hidden, widths, dtype, four_d=add_inputs)
    inputs = torch.randn(len(widths), num_tokens, rank, device=KERNEL_DEVICE) / rank**0.5
    out = torch.randn(num_tokens, offset_start + sum(widths) + 3).to(dtype).to(KERNEL_DEVICE)
    expected, written = oracle_expand(inputs, b, mapping, out, offset_start, add_inputs)
    if not add_inputs:
        out[written.to(out.device)] = float("nan")  # must be overwritten
    with use_backend(backend):
        lora_expand(
            inputs, b, out, *meta.meta_args(num_tokens), offset_start=offset_start, add_inputs=add_inputs
        )
    out = out.cpu()
    assert_equal(out[~written], expected[~written].to(dtype), "untouched elements")
    assert_close(out[written], expected[written], REL_TOL[dtype])


@pytest.mark.parametrize("backend", backends(LORA_SHRINK, LORA_EXPAND))
def test_strided_inputs(backend):
    """A transposed x and a column slice of a wider output are read/written through their strides."""
    mapping, _, a, meta = _shrink_case(6, 40, 8, (16, 8), 3, "interleaved", torch.float32)
    x = torch.randn(40, 6, device=KERNEL_DEVICE).T
    shrunk = poisoned((2, 6, 8), torch.float32)
    _, b = lora_weights(3, 8, 40, (16, 8), torch.float32)
    wide = torch.randn(6, 50, device=KERNEL_DEVICE)
    out = wide[:, 10:40]
    expected, _ = oracle_expand(oracle_shrink(x, a, mapping, 1.0), b, mapping, out, 2, True)
    with use_backend(backend):
        lora_shrink(x, a, shrunk, *meta.meta_args(6), 1.0)
        lora_expand(shrunk, b, out, *meta.meta_args(6), offset_start=2, add_inputs=True)
    assert_close(out.cpu(), expected.float())


@settings(max_examples=20, deadline=None)
@given(
    st.integers(0, 30),
    st.integers(1, 70),
    st.integers(1, 40),
    st.lists(st.integers(1, 70), min_size=1, max_size=4),
    st.integers(1, 4),
    st.integers(0, 3),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_random_shapes_match_the_oracle(num_tokens, hidden, rank, widths, slots, offset, add, seed):
    torch.manual_seed(seed)
    mapping = torch.randint(-1, slots, (num_tokens,), dtype=torch.int32)
    meta = prepared_meta(mapping, slots)
    x = torch.randn(num_tokens, hidden, device=KERNEL_DEVICE)
    a, b = lora_weights(slots, rank, hidden, widths, torch.float32)
    shrunk = torch.zeros(len(widths), num_tokens, rank, device=KERNEL_DEVICE)
    out = torch.randn(num_tokens, offset + sum(widths), device=KERNEL_DEVICE)
    expected, _ = oracle_expand(oracle_shrink(x, a, mapping, 0.5), b, mapping, out, offset, add)
    with use_backend("triton"):
        lora_shrink(x, a, shrunk, *meta.meta_args(num_tokens), 0.5)
        lora_expand(shrunk, b, out, *meta.meta_args(num_tokens), offset_start=offset, add_inputs=add)
    assert_close(out.cpu(), expected.float())


def _expand_args(dtype=torch.float32):
    mapping = token_mapping("interleaved", 5, 3)
    meta = prepared_meta(mapping, 3)
    _, b = lora_weights(3, 8, 16, (6, 4), dtype)
    return torch.randn(2, 5, 8, device=KERNEL_DEVICE), b, torch.randn(5, 12, device=KERNEL_DEVICE), meta


def test_shrink_bad_inputs_raise_before_writing():
    _, x, a, meta = _shrink_case(5, 16, 8, (6, 4), 3, "interleaved", torch.float32)
    out = torch.randn(2, 5, 8, device=KERNEL_DEVICE)
    keep = out.clone()
    args = meta.meta_args(5)
    bad = [
        (
            TypeError,
            "lora_a_weights\\[0\\] has dtype",
            lambda: lora_shrink(x, [w.half() for w in a], out, *args, 1.0),
        ),
        (ValueError, "hidden size", lambda: lora_shrink(x[:, :15], a, out, *args, 1.0)),
        (
            ValueError,
            "token_lora_mapping has 5 entries, expected 4",
            lambda: lora_shrink(x[:4], a, out[:, :4], *args, 1.0),
        ),
        (TypeError, "output_tensor must have dtype", lambda: lora_shrink(x, a, out.half(), *args, 1.0)),
        (ValueError, "output_tensor must have shape", lambda: lora_shrink(x, a, out[:1], *args, 1.0)),
        (ValueError, "max_loras=3 slots", lambda: lora_shrink(x, [w[:2] for w in a], out, *args, 1.0)),
        (TypeError, "no_lora_flag_cpu", lambda: lora_shrink(x, a, out, *args[:5], torch.tensor([0]), 1.0)),
        (TypeError, "non-empty list", lambda: lora_shrink(x, [], out, *args, 1.0)),
    ]
    for exc, match, call in bad:
        with pytest.raises(exc, match=match):
            call()
        assert_equal(out, keep)


def test_expand_bad_inputs_raise_before_writing():
    inputs, b, out, meta = _expand_args()
    keep = out.clone()
    args = meta.meta_args(5)
    bad = [
        (ValueError, ">= 13 columns", lambda: lora_expand(inputs, b, out, *args, offset_start=3)),
        (ValueError, "offset_start", lambda: lora_expand(inputs, b, out, *args, offset_start=-1)),
        (ValueError, "inputs must have shape", lambda: lora_expand(inputs[:1], b, out, *args)),
        (
            TypeError,
            "lora_b_weights\\[1\\] has dtype",
            lambda: lora_expand(inputs, [b[0], b[1].half()], out, *args),
        ),
        (ValueError, "last dim", lambda: lora_expand(inputs, [b[0], b[1][..., :4]], out, *args)),
        (
            ValueError,
            "has 4 entries, expected 5",
            lambda: lora_expand(inputs, b, out, args[0][:4], *args[1:]),
        ),
    ]
    for exc, match, call in bad:
        with pytest.raises(exc, match=match):
            call()
        assert_equal(out, keep)



@pytest.mark.parametrize("backend", backends(LORA_SHRINK))
@pytest.mark.parametrize("other", ["inputs", "lora_a_weights[1]"])
def test_shrink_output_overlapping_an_input_is_refused_before_writing(other, backend):
    """output_tensor sharing memory with inputs or a weight passed validation (the kernel raced on a GPU)."""
    _, x, a, meta = _shrink_case(5, 16, 8, (6, 4), 3, "interleaved", torch.float32)
    buffer, out, shared = sharing((2, 5, 8), x.shape if other == "inputs" else a[1].shape)
    x, a = (shared, a) if other == "inputs" else (x, [a[0], shared])
    before = buffer.clone()
    with use_backend(backend), pytest.raises(ValueError, match=re.escape(f"output_tensor overlaps {other} in")):
        lora_shrink(x, a, out, *meta.meta_args(5), 1.0)
    assert_equal(buffer, before)


@pytest.mark.parametrize("backend", backends(LORA_EXPAND))
@pytest.mark.parametrize("other", ["inputs", "lora_b_weights[0]"])
@pytest.mark.parametrize("add_inputs", [False, True])
def test_expand_output_overlapping_an_input_is_refused_before_writing(other, add_inputs, backend):
    inputs, b, out, meta = _expand_args()
    buffer, out, shared = sharing(out.shape, inputs.shape if other == "inputs" else b[0].shape)
    inputs, b = (shared, b) if other == "inputs" else (inputs, [shared, b[1]])
    before = buffer.clone()
    with use_backend(backend), pytest.raises(ValueError, match=re.escape(f"output_tensor overlaps {other} in")):
        lora_expand(inputs, b, out, *meta.meta_args(5), add_inputs=add_inputs)
    assert_equal(buffer, before)


# --- vLLM's two forms of the metadata arguments --------------------------------------------------
def _call(form: str, x, a, b, shrunk, out, meta) -> None:
    """lora_shrink then lora_expand as vLLM >= 0.32 calls them (seven metadata arguments, the last
    ``num_active_loras``), as vLLM < 0.32 does (six tensors), or with ``scaling`` by keyword."""
    seven = meta.meta_args(x.shape[0], True)  # vLLM's call: meta_args(T, specialize_active_lora)
    if form == "seven":
        lora_shrink(x, a, shrunk, *seven, 0.5)
        lora_expand(shrunk, b, out, *seven, offset_start=1, add_inputs=True)
    elif form == "six":
        lora_shrink(x, a, shrunk, *seven[:6], 0.5)
        lora_expand(shrunk, b, out, *seven[:6], offset_start=1, add_inputs=True)
    else:
        lora_shrink(x, a, shrunk, *seven, scaling=0.5)
        lora_shrink(x, a, shrunk, *seven[:6], scaling=0.5)
        lora_expand(shrunk, b, out, *seven, offset_start=1, add_inputs=True)


@pytest.mark.parametrize("backend", backends(LORA_SHRINK, LORA_EXPAND))
@pytest.mark.parametrize("form", ["seven", "six", "scaling-keyword"])
def test_both_vllm_forms_of_the_metadata_arguments(form, backend):
    mapping, x, a, meta = _shrink_case(7, 40, 8, (16, 9), 3, "interleaved", torch.float32)
    _, b = lora_weights(3, 8, 40, (16, 9), torch.float32)
    shrunk = poisoned((2, 7, 8), torch.float32)
    out = torch.randn(7, 27, device=KERNEL_DEVICE)
    expected, _ = oracle_expand(oracle_shrink(x, a, mapping, 0.5), b, mapping, out, 1, True)
    with use_backend(backend):
        _call(form, x, a, b, shrunk, out, meta)
    assert_close(shrunk.cpu(), oracle_shrink(x, a, mapping, 0.5).cpu())
    assert_close(out.cpu(), expected.float())


@pytest.mark.parametrize("backend", backends(LORA_SHRINK, LORA_EXPAND))
def test_bad_num_active_loras_and_argument_counts_raise_before_writing(backend):
    _, x, a, meta = _shrink_case(5, 16, 8, (6, 4), 3, "interleaved", torch.float32)
    inputs, b, out, _ = _expand_args()
    shrunk = torch.randn(2, 5, 8, device=KERNEL_DEVICE)
    keep = (shrunk.clone(), out.clone())
    six = meta.meta_args(5)[:6]
    bad = [
        (TypeError, "num_active_loras must be an int, got float 2.0", (*six, 2.0)),
        (TypeError, "num_active_loras must be an int, got bool", (*six, True)),
        (TypeError, "num_active_loras must be an int, got Tensor", (*six, torch.tensor(4))),
        (ValueError, r"num_active_loras must lie in \[0, 4\] \(the groups of lora_ids\), got 5", (*six, 5)),
        (ValueError, r"num_active_loras must lie in \[0, 4\]", (*six, -1)),
        (TypeError, "expected the 7 arguments of LoRAKernelMeta.meta_args", (*six, 4, 4)),
        (TypeError, "expected the 7 arguments of LoRAKernelMeta.meta_args", six[:5]),
    ]
    with use_backend(backend):
        for exc, match, args in bad:
            with pytest.raises(exc, match=match):
                lora_shrink(x, a, shrunk, *args, scaling=0.5)
            with pytest.raises(exc, match=match):
                lora_expand(inputs, b, out, *args)
        with pytest.raises(TypeError, match="lora_shrink needs scaling"):
            lora_shrink(x, a, shrunk)
    assert_equal(shrunk, keep[0])
    assert_equal(out, keep[1])


@pytest.mark.parametrize("backend", backends(LORA_SHRINK, LORA_EXPAND))
def test_inference_mode_reads_the_metadata_once_per_step(backend, monkeypatch):
    """Under ``torch.inference_mode()`` (vLLM, HF generate) the ops run (reading the inference
    tensors' version counters crashed before) and, the metadata buffers being normal tensors, read
    their values once per prepared step, not once per call."""
    reads = []
    check_offsets = triton_kernels.lora._args.check_offsets
    monkeypatch.setattr(triton_kernels.lora._args, "check_offsets", lambda *a: reads.append(1) or check_offsets(*a))
    with torch.inference_mode(), use_backend(backend):
        mapping, x, a, meta = _shrink_case(6, 24, 8, (16, 8), 3, "interleaved", torch.float32)
        _, b = lora_weights(3, 8, 24, (16, 8), torch.float32)
        shrunk, out = torch.zeros(2, 6, 8, device=KERNEL_DEVICE), torch.zeros(6, 24, device=KERNEL_DEVICE)
        for _ in range(2):
            lora_shrink(x, a, shrunk, *meta.meta_args(6), 1.0)
            lora_expand(shrunk, b, out, *meta.meta_args(6))
        assert len(reads) == 1
        flipped = mapping.flip(0)
        meta.prepare_tensors(flipped.to(KERNEL_DEVICE))  # a new step: read again
        lora_shrink(x, a, shrunk, *meta.meta_args(6), 1.0)
        assert len(reads) == 2
    assert_close(shrunk.cpu(), oracle_shrink(x, a, flipped, 1.0).cpu())

@pytest.mark.parametrize("backend", backends(LORA_EXPAND))
def test_expand_fp32_inputs_beyond_fp16_range(backend):
    """fp32 shrink results past 65504 times small fp16 B give a finite fp16 output on every
    backend: the product runs in fp32, never on inputs rounded to fp16."""
    mapping = token_mapping("interleaved", 6, 3)
    _, b = lora_weights(3, 8, 16, (6, 5), torch.float32)
    b = [(w * 1e-3).half() for w in b]
    inputs = torch.randn(2, 6, 8, device=KERNEL_DEVICE) * 1e5
    out = torch.randn(6, 11, device=KERNEL_DEVICE).half()
    expected, written = oracle_expand(inputs, b, mapping, out, 0, True)
    with use_backend(backend):
        lora_expand(inputs, b, out, *prepared_meta(mapping, 3).meta_args(6), offset_start=0, add_inputs=True)
    assert_close(out.cpu()[written], expected[written], REL_TOL[torch.float16])


# --- metadata that does not belong to the batch ----------------------------------------------------
def _meta_for(num_tokens: int) -> LoRAKernelMeta:
    meta = LoRAKernelMeta.make(3, 8, KERNEL_DEVICE)
    meta.prepare_tensors(token_mapping("interleaved", num_tokens, 3).to(KERNEL_DEVICE))
    return meta


def _run_both(backend, compiled, x, a, b, args, shrunk, out):
    """lora_shrink then lora_expand (each eager or compiled), each expected to raise ValueError."""
    def shrink(x, shrunk, args):
        lora_shrink(x, a, shrunk, *args, 0.5)

    def expand(shrunk, out, args):
        lora_expand(shrunk, b, out, *args, offset_start=0, add_inputs=True)

    if compiled:
        shrink, expand = (torch.compile(f, fullgraph=True, backend="aot_eager") for f in (shrink, expand))
    with use_backend(backend):
        with pytest.raises(ValueError, match="lora_token_start_loc must rise from 0 to the token count 5"):
            shrink(x, shrunk, args)
        with pytest.raises(ValueError, match="lora_token_start_loc must rise from 0 to the token count 5"):
            expand(shrunk, out, args)


@pytest.mark.parametrize("backend", backends(LORA_SHRINK, LORA_EXPAND))
@pytest.mark.parametrize(
    ("prepared", "compiled"),
    [pytest.param(8, False, id="prepared8-eager"), pytest.param(8, True, id="prepared8-compiled"),
     pytest.param(3, False, id="prepared3-eager")],
)  # fmt: skip
def test_metadata_of_another_batch_raises_before_writing(prepared, compiled, backend):
    """``meta.meta_args(5)`` of a meta prepared for 8 (or 3) tokens passes every shape check; the
    value check refuses it, eager and compiled, before anything is written."""
    meta = _meta_for(prepared)
    x = torch.randn(5, 16, device=KERNEL_DEVICE)
    a, b = lora_weights(3, 4, 16, (6, 5), torch.float32)
    shrunk_buf, out_buf = torch.randn(2, 8, 4, device=KERNEL_DEVICE), torch.randn(8, 11, device=KERNEL_DEVICE)
    keep = (shrunk_buf.clone(), out_buf.clone())
    _run_both(backend, compiled, x, a, b, meta.meta_args(5), shrunk_buf[:, :5], out_buf[:5])
    assert_equal(shrunk_buf, keep[0], "shrink output buffer")
    assert_equal(out_buf, keep[1], "expand output buffer")


def _corrupt(meta: LoRAKernelMeta, what: str) -> None:
    if what == "counts":
        meta.num_tokens_per_lora[1] += 1
    elif what == "ids":
        meta.active_lora_ids[2] = 7
    elif what == "order":
        meta.token_indices_sorted_by_lora_ids[0] = 100
    elif what == "starts":
        meta.lora_token_start_loc[2] = 6


@pytest.mark.parametrize("backend", backends(LORA_SHRINK, LORA_EXPAND))
@pytest.mark.parametrize(
    ("what", "match"),
    [
        ("counts", "num_tokens_per_lora holds"),
        ("ids", "lora_ids holds 7, outside the weights' slots \\[0, 3\\)"),
        ("order", "token_indices_sorted_by_lora_ids holds token 100, outside the batch \\[0, 5\\)"),
        ("starts", "lora_token_start_loc must rise"),
    ],
)
def test_corrupted_metadata_raises_before_writing(what, match, backend):
    meta = _meta_for(5)
    _corrupt(meta, what)
    x = torch.randn(5, 16, device=KERNEL_DEVICE)
    a, b = lora_weights(3, 4, 16, (6, 5), torch.float32)
    shrunk, out = torch.randn(2, 5, 4, device=KERNEL_DEVICE), torch.randn(5, 11, device=KERNEL_DEVICE)
    keep = (shrunk.clone(), out.clone())
    with use_backend(backend):
        with pytest.raises(ValueError, match=match):
            lora_shrink(x, a, shrunk, *meta.meta_args(5), 0.5)
        with pytest.raises(ValueError, match=match):
            lora_expand(shrunk, b, out, *meta.meta_args(5))
    assert_equal(shrunk, keep[0])
    assert_equal(out, keep[1])


@pytest.mark.parametrize("what", ["another-batch", "counts", "ids", "order", "starts"])
def test_kernels_stay_inside_their_tensors_when_value_checks_are_skipped(what, monkeypatch):
    """As under CUDA-graph capture (the value check skipped): bad metadata gives an undefined result
    inside the outputs, never a write outside them (the outputs are views into larger buffers)."""
    monkeypatch.setattr(triton_kernels._data_checks, "capturing", lambda t: True)
    meta = _meta_for(8 if what == "another-batch" else 5)
    _corrupt(meta, what)
    x = torch.randn(5, 16, device=KERNEL_DEVICE)
    a, b = lora_weights(3, 4, 16, (6, 5), torch.float32)
    shrunk_buf, out_buf = torch.randn(2, 9, 4, device=KERNEL_DEVICE), torch.randn(9, 13, device=KERNEL_DEVICE)
    keep = (shrunk_buf.clone(), out_buf.clone())
    with use_backend("triton"):
        lora_shrink(x, a, shrunk_buf[:, 2:7], *meta.meta_args(5), 0.5)
        lora_expand(shrunk_buf[:, 2:7], b, out_buf[2:7, 1:12], *meta.meta_args(5), add_inputs=True)
    inside = torch.zeros(9, 13, dtype=torch.bool)
    inside[2:7, 1:12] = True
    assert_equal(shrunk_buf[:, [0, 1, 7, 8]], keep[0][:, [0, 1, 7, 8]], "shrink buffer outside the output")
    assert_equal(out_buf[~inside], keep[1][~inside], "expand buffer outside the output")


def test_opcheck():
    _, x, a, meta = _shrink_case(5, 16, 8, (6, 4), 3, "interleaved", torch.float32)
    inputs, b, out, _ = _expand_args()
    with use_backend("torch"):
        args = list(meta.meta_args(5)[:6])  # the raw ops take the six tensors
        torch.library.opcheck(torch.ops.ifk.lora_shrink.default, (torch.empty(2, 5, 8), [x, *args, *a], 0.5))
        torch.library.opcheck(torch.ops.ifk.lora_expand.default, (out, [inputs, *args, *b], 1, True))


def test_compile_fullgraph():
    _, x, a, meta = _shrink_case(5, 16, 8, (6, 4), 3, "interleaved", torch.float32)
    _, b = lora_weights(3, 8, 16, (6, 4), torch.float32)

    def step(x, y, args):
        buf = torch.zeros(2, x.shape[0], 8)
        lora_shrink(x, a, buf, *args, 0.5)
        lora_expand(buf, b, y, *args, offset_start=0, add_inputs=True)
        return y

    with use_backend("torch"):
        want = step(x, torch.ones(5, 10), meta.meta_args(5))
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(
            x, torch.ones(5, 10), meta.meta_args(5)
        )
    assert_close(got, want)


# --- gpu tier: real sizes, bf16 -------------------------------------------------------------------
LLAMA3_8B_QKV = (4096, 1024, 1024)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [4096, 2049])
@pytest.mark.parametrize("num_tokens", [1, 64, 1000])
def test_shrink_expand_bf16_llama_qkv(num_tokens, hidden):
    mapping, x, a, meta = _shrink_case(
        num_tokens, hidden, 16, LLAMA3_8B_QKV, 8, "interleaved", torch.bfloat16
    )
    _, b = lora_weights(8, 16, hidden, LLAMA3_8B_QKV, torch.bfloat16, four_d=True)
    shrunk = poisoned((3, num_tokens, 16), torch.float32)
    lora_shrink(x, a, shrunk, *meta.meta_args(num_tokens), 0.5)
    assert_close(shrunk.cpu(), oracle_shrink(x, a, mapping, 0.5).cpu(), REL_TOL[torch.bfloat16])
    out = torch.randn(num_tokens, sum(LLAMA3_8B_QKV), device="cuda").bfloat16()
    expected, written = oracle_expand(shrunk, b, mapping, out, 0, True)
    lora_expand(shrunk, b, out, *meta.meta_args(num_tokens), offset_start=0, add_inputs=True)
    assert_equal(out.cpu()[~written], expected[~written].bfloat16())
    assert_close(out.cpu()[written], expected[written], REL_TOL[torch.bfloat16])


@pytest.mark.gpu
def test_opcheck_and_compile_triton_on_gpu():
    _, x, a, meta = _shrink_case(64, 512, 16, (256, 128), 4, "interleaved", torch.bfloat16)
    _, b = lora_weights(4, 16, 512, (256, 128), torch.bfloat16)
    args = meta.meta_args(64)[:6]  # the raw ops take the six tensors
    buf = torch.empty(2, 64, 16, device="cuda")
    torch.library.opcheck(torch.ops.ifk.lora_shrink.default, (buf, [x, *args, *a], 0.5))
    out = torch.randn(64, 384, device="cuda").bfloat16()
    torch.library.opcheck(
        torch.ops.ifk.lora_expand.default, (out, [torch.randn(2, 64, 16, device="cuda"), *args, *b], 0, True)
    )

    def step(x, y):
        buf = torch.zeros(2, x.shape[0], 16, device=x.device)
        lora_shrink(x, a, buf, *args, 0.5)
        lora_expand(buf, b, y, *args, offset_start=0, add_inputs=True)
        return y

    want = step(x, torch.zeros(64, 384, device="cuda").bfloat16())
    got = torch.compile(step, fullgraph=True)(x, torch.zeros(64, 384, device="cuda").bfloat16())
    assert_close(got, want, REL_TOL[torch.bfloat16])


@pytest.mark.gpu
def test_offsets_past_2_31():
    """Rows of x and of the expand output start past element 2^31 of their buffer (int64 offsets)."""
    rows, stride = 17, 2**27  # row 16 starts at element 2^31
    mapping = torch.tensor([0, 1] * 8 + [2], dtype=torch.int32)
    meta = prepared_meta(mapping, 3)
    big = torch.empty(rows, stride, dtype=torch.float16, device="cuda")
    x, out = big[:, :64], big[:, -32:]
    x.copy_(torch.randn(rows, 64, device="cuda"))
    out.copy_(torch.randn(rows, 32, device="cuda"))
    a, b = lora_weights(3, 16, 64, (20, 12), torch.float16)
    shrunk = poisoned((2, rows, 16), torch.float32)
    lora_shrink(x, a, shrunk, *meta.meta_args(rows), 0.5)
    assert_close(shrunk.cpu(), oracle_shrink(x, a, mapping, 0.5).cpu(), REL_TOL[torch.float16])
    expected, written = oracle_expand(shrunk, b, mapping, out, 0, True)
    lora_expand(shrunk, b, out, *meta.meta_args(rows), offset_start=0, add_inputs=True)
    assert_close(out.cpu()[written], expected[written], REL_TOL[torch.float16])
