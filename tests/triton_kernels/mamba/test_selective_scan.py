"""selective_scan_fn / selective_scan_varlen: every backend (the Triton kernel under the interpreter on
CPU, the torch backend; the C++ kernel in tests/csrc) against the float64 sequential oracle, packed ==
alone, chunks chained through the cache == whole, untouched slots, bad input, and the gpu tier (real
sizes, bf16, opcheck, compile, graphs)."""

from __future__ import annotations

import pytest
import torch

from tests.triton_kernels.mamba.scan_inputs import make_batched, make_varlen, ref64, varlen_expected
from tests.utils import KERNEL_DEVICE, assert_close, assert_equal, poisoned
from triton_kernels import PAD_SLOT_ID, selective_scan_fn, selective_scan_varlen, use_backend
from triton_kernels.mamba.ops_torch import selective_scan_ref

F32, F16 = torch.float32, torch.float16

BATCHED = [
    pytest.param(dict(bsz=2, dim=5, dstate=4, seqlen=1), {}, id="L1-D5-N4-token"),
    pytest.param(dict(bsz=1, dim=14, dstate=16, seqlen=7, bc="group2"), {}, id="L7-D14-N16-G2"),
    pytest.param(dict(bsz=2, dim=19, dstate=1, seqlen=63), dict(z=False, bias=False), id="L63-D19-N1-noz"),
    pytest.param(dict(bsz=1, dim=6, dstate=16, seqlen=128, bc="group2", dtype=F16), {},
                 id="L128-D6-N16-G2-fp16"),
    pytest.param(dict(bsz=1, dim=3, dstate=4, seqlen=300, bc="channel"), dict(D=False, softplus=False),
                 id="L300-D3-N4-perchannelB-nosoftplus"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(("shape", "flags"), BATCHED)
def test_selective_scan_fn_matches_oracle(backend, shape, flags):
    args = make_batched(**shape, **flags)
    ref_out, ref_state = ref64(args)
    with use_backend(backend):
        out, last = selective_scan_fn(**args, return_last_state=True)
    assert out.dtype == args["u"].dtype
    assert last.dtype == torch.float32
    assert_close(out, ref_out.to(out.dtype) if out.dtype == F16 else ref_out, name="out")
    assert_close(last, ref_state, tol=1e-5, name="last_state")


def test_selective_scan_fn_non_contiguous_and_plain_output():
    args = make_batched(2, 9, 4, 20)
    ref_out, _ = ref64(args)
    strided = {k: (v.transpose(-1, -2).contiguous().transpose(-1, -2) if isinstance(v, torch.Tensor)
                   and v.dim() == 3 else v) for k, v in args.items()}
    assert not strided["u"].is_contiguous()
    assert_close(selective_scan_fn(**strided), ref_out)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_softplus_keeps_tiny_steps(backend):
    """Bug 3: ``log(1 + exp(x))`` in fp32 rounds to 0 below x = -16, so dt vanished and the state
    never moved; the stable softplus keeps dt = exp(x) there."""
    args = make_batched(1, 4, 2, 6, z=False, D=False, bias=False)
    args["delta"] = torch.full_like(args["delta"], -30.0)
    _, ref_state = ref64(args)
    with use_backend(backend):
        _, last = selective_scan_fn(**args, return_last_state=True)
    assert ref_state.abs().min() > 0
    assert_close(last, ref_state, name="last_state")


# ---- packed sequences with a state cache -------------------------------------------------------


VARLEN = [
    pytest.param([7, 1, 0, 63], 12, 4, 2, F32, F32, id="lens7-1-0-63-D12-N4-G2"),
    pytest.param([30, 5, 17], 5, 16, 1, F16, F32, id="lens30-5-17-D5-N16-fp16-state32"),
]


@pytest.mark.parametrize(("lengths", "dim", "dstate", "groups", "dtype", "state_dtype"), VARLEN)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_varlen_packed_equals_each_sequence_alone(backend, lengths, dim, dstate, groups, dtype, state_dtype):
    args = make_varlen(lengths, dim, dstate, groups, num_slots=len(lengths) + 2, dtype=dtype,
                       state_dtype=state_dtype)
    slots = [*[4, PAD_SLOT_ID, 0, 2][:len(lengths) - 1], 1]
    has_init = [True, False, True, False][: len(lengths)]
    ref_out, ref_states = varlen_expected(args, slots, has_init)
    before = args["ssm_states"].clone()
    out = poisoned(args["u"].shape, dtype)
    cache = torch.tensor(slots, device=KERNEL_DEVICE)
    with use_backend(backend):
        got = selective_scan_varlen(**args, cache_indices=cache, out=out,
                                    has_initial_state=torch.tensor(has_init, device=KERNEL_DEVICE))
    assert got is out
    written = ~torch.isnan(ref_out[0])
    assert_close(out[:, written], ref_out[:, written].to(dtype), name="out")
    assert torch.isnan(out[:, ~written]).all(), "a pad sequence's output columns were written"
    used = [s for s in slots if s != PAD_SLOT_ID]
    assert_close(args["ssm_states"][used].float(), ref_states[used].float(), tol=1e-5, name="states")
    untouched = [s for s in range(before.shape[0]) if s not in used]
    assert_equal(args["ssm_states"][untouched], before[untouched], name="untouched slots")


def test_varlen_chunks_chained_through_cache_equal_whole_sequence():
    args = make_varlen([50], 6, 4, 1, num_slots=3)
    whole = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    whole_out = selective_scan_varlen(**whole, cache_indices=torch.tensor([1]).to(KERNEL_DEVICE),
                                      has_initial_state=torch.tensor([True], device=KERNEL_DEVICE))
    states = args["ssm_states"]
    pieces = []
    for i, (s, e) in enumerate([(0, 9), (9, 10), (10, 50)]):
        part = {k: args[k][..., s:e] for k in ("u", "delta", "B", "C", "z")}
        part.update({k: args[k] for k in ("A", "D", "delta_bias", "delta_softplus")})
        pieces.append(selective_scan_varlen(
            **part, ssm_states=states, cache_indices=torch.tensor([1], device=KERNEL_DEVICE),
            has_initial_state=torch.tensor([True], device=KERNEL_DEVICE)))
        del i
    assert_close(torch.cat(pieces, dim=1), whole_out, name="out")
    assert_close(states[1], whole["ssm_states"][1], name="state")
    assert_equal(states[[0, 2]], whole["ssm_states"][[0, 2]], name="untouched slots")


def test_varlen_defaults_one_sequence_from_zeros_into_slot_0():
    args = make_varlen([11], 4, 2, 1, num_slots=2)
    before = args["ssm_states"].clone()
    del args["query_start_loc"]
    out = selective_scan_varlen(**args)
    one = {k: args[k][None] for k in ("u", "delta", "B", "C", "z")}
    one.update({k: args[k] for k in ("A", "D", "delta_bias", "delta_softplus")})
    ref_out, ref_state = ref64(one)
    assert_close(out, ref_out[0])
    assert_close(args["ssm_states"][0], ref_state[0])
    assert_equal(args["ssm_states"][1], before[1])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_varlen_empty_batch_and_no_tokens(backend):
    args = make_varlen([], 4, 2, 1, num_slots=2)
    before = args["ssm_states"].clone()
    no_slots = torch.zeros(0, dtype=torch.int32, device=KERNEL_DEVICE)
    with use_backend(backend):
        out = selective_scan_varlen(**args, cache_indices=no_slots)
    assert out.shape == (4, 0)
    assert_equal(args["ssm_states"], before)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_varlen_more_sequences_than_slots_without_cache_indices_raises(backend):
    """Bug 1: with cache_indices=None, sequence b writes slot b: more sequences than slots wrote past
    the cache. A metadata check (no sync) refuses it before anything is written."""
    args = make_varlen([3, 2, 4], 4, 2, 1, num_slots=2)
    before = args["ssm_states"].clone()
    out = poisoned(args["u"].shape, F32)
    with use_backend(backend), pytest.raises(ValueError, match="ssm_states has 2 slots for 3 sequences; pass "
                                             "cache_indices"):
        selective_scan_varlen(**args, out=out)
    assert_equal(args["ssm_states"], before)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_varlen_out_of_range_slot_under_capture_counts_as_pad(backend, monkeypatch):
    """With the value checks skipped (as under CUDA-graph capture), a cache index outside the cache
    reads and writes nothing: the sequence is treated like a pad sequence."""
    monkeypatch.setattr("triton_kernels._data_checks.capturing", lambda t: True)
    args = make_varlen([3, 4], 4, 2, 1, num_slots=2)
    ref_out, ref_states = varlen_expected(args, [1, PAD_SLOT_ID], [True, False])
    out = poisoned(args["u"].shape, F32)
    with use_backend(backend):
        selective_scan_varlen(**args, out=out, cache_indices=torch.tensor([1, 7], device=KERNEL_DEVICE),
                              has_initial_state=torch.tensor([True, True], device=KERNEL_DEVICE))
    assert_close(out[:, :3], ref_out[:, :3], name="out")
    assert torch.isnan(out[:, 3:]).all(), "the out-of-range sequence's columns were written"
    assert_close(args["ssm_states"], ref_states, name="states")


# ---- bad input: a clear error and nothing written ---------------------------------------------


def _bad_varlen_calls():
    def qsl(*v):
        return torch.tensor(v, dtype=torch.int32, device=KERNEL_DEVICE)

    return [
        pytest.param(dict(query_start_loc=qsl(0, 6, 4, 10)), ValueError, "query_start_loc",
                     id="qsl-decreasing"),
        pytest.param(dict(query_start_loc=qsl(0, 4, 4, 9)), ValueError, "query_start_loc", id="qsl-short"),
        pytest.param(dict(cache_indices=torch.tensor([0, 3, 1], device=KERNEL_DEVICE)), ValueError,
                     "cache_indices holds 3", id="slot-outside-cache"),
        pytest.param(dict(cache_indices=torch.tensor([0, 1], device=KERNEL_DEVICE)), ValueError,
                     "cache_indices", id="cache-indices-short"),
        pytest.param(dict(cache_indices=torch.tensor([1, PAD_SLOT_ID, 1], device=KERNEL_DEVICE)), ValueError,
                     "cache_indices holds slot 1 twice", id="slot-twice"),
        pytest.param(dict(has_initial_state=torch.ones(3, device=KERNEL_DEVICE)), TypeError,
                     "has_initial_state", id="has-init-float"),
        pytest.param(dict(delta=torch.randn(6, 9, device=KERNEL_DEVICE)), ValueError, "delta",
                     id="delta-shape"),
        pytest.param(dict(B=torch.randn(4, 3, 10, device=KERNEL_DEVICE)), ValueError, "groups",
                     id="groups-bad"),
        pytest.param(dict(C=torch.randn(1, 3, 11, device=KERNEL_DEVICE)), ValueError, "C", id="C-length"),
        pytest.param(dict(A=torch.randn(6, 3, dtype=torch.complex64, device=KERNEL_DEVICE)), TypeError,
                     "complex", id="complex-A"),
        pytest.param(dict(ssm_states=torch.zeros(3, 6, 5, device=KERNEL_DEVICE)), ValueError, "ssm_states",
                     id="state-N"),
        pytest.param(dict(out=torch.zeros(6, 10, dtype=F16, device=KERNEL_DEVICE)), TypeError, "out",
                     id="out-dtype"),
    ]


@pytest.mark.parametrize(("override", "exc", "match"), _bad_varlen_calls())
def test_varlen_bad_input_raises_and_writes_nothing(override, exc, match):
    args = make_varlen([4, 0, 6], 6, 3, 2, num_slots=3)
    args.update(cache_indices=torch.tensor([0, 2, 1], device=KERNEL_DEVICE), out=poisoned((6, 10), F32))
    args.update(override)
    states_before = args["ssm_states"].clone()
    with pytest.raises(exc, match=match):
        selective_scan_varlen(**args)
    assert_equal(args["ssm_states"], states_before, name="ssm_states")
    if args["out"].dtype == F32:
        assert torch.isnan(args["out"]).all(), "out was written before the error"


@pytest.mark.parametrize(
    ("override", "exc", "match"),
    [
        pytest.param(dict(delta=torch.randn(2, 5, 7)), ValueError, "delta", id="delta-shape"),
        pytest.param(dict(A=torch.randn(5, 3, dtype=torch.complex64)), TypeError, "complex", id="complex-A"),
        pytest.param(dict(B=torch.randn(2, 3, 7)), ValueError, "B", id="B-length"),
        pytest.param(dict(B=torch.randn(2, 2, 3, 8), C=torch.randn(2, 2, 3, 8)), ValueError, "groups",
                     id="groups-not-dividing-D"),
        pytest.param(dict(D=torch.randn(4)), ValueError, "D", id="D-size"),
        pytest.param(dict(A=torch.randn(5, 0), B=torch.randn(2, 0, 8), C=torch.randn(2, 0, 8)), ValueError,
                     "state size", id="N0"),
        pytest.param(dict(z=torch.ones(2, 5, 8, dtype=torch.int32)), TypeError, "z", id="z-int32"),
        pytest.param(dict(u=torch.randn(5, 8)), ValueError, "u", id="u-2d"),
    ],
)
def test_selective_scan_fn_bad_input(override, exc, match):
    args = make_batched(2, 5, 3, 8, device="cpu")
    args.update(override)
    args = {k: (v.to(KERNEL_DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(exc, match=match):
        selective_scan_fn(**args)


def test_opcheck_both_forms():
    args = make_batched(1, 4, 2, 6)
    out, last = poisoned((1, 4, 6), F32), poisoned((1, 4, 2), F32)
    torch.library.opcheck(torch.ops.ifk.selective_scan.default, (
        out, last, None, [args["u"], args["delta"], args["A"], args["B"], args["C"], args["D"], args["z"],
                    args["delta_bias"], None, None, None], True, PAD_SLOT_ID))
    v = make_varlen([2, 3], 4, 2, 1, num_slots=3)
    torch.library.opcheck(torch.ops.ifk.selective_scan.default, (
        poisoned((4, 5), F32), v["ssm_states"], None, [v["u"], v["delta"], v["A"], v["B"], v["C"], None, None, None,
                                                 v["query_start_loc"], torch.tensor([2, 0], device=KERNEL_DEVICE),
                                                 None], False, PAD_SLOT_ID))


# ---- gpu tier ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("dim", "dstate", "seqlen", "bc"),
                         [(5120, 16, 2048, "token"), (768, 64, 4096, "group2")])
def test_gpu_real_sizes_bf16(dim, dstate, seqlen, bc):
    args = make_batched(1, dim, dstate, seqlen, bc=bc, dtype=torch.bfloat16)
    ref_out, ref_state = selective_scan_ref(**{k: (v.float() if isinstance(v, torch.Tensor) else v)
                                               for k, v in args.items()})
    out, last = selective_scan_fn(**args, return_last_state=True)
    assert_close(out, ref_out.bfloat16())
    assert_close(last, ref_state, tol=1e-4)


@pytest.mark.gpu
def test_gpu_varlen_long_bf16_state32_compile_and_graph():
    args = make_varlen([2048, 1, 300, 3000], 256, 16, 2, num_slots=6, dtype=torch.bfloat16)
    cache = torch.tensor([5, 0, PAD_SLOT_ID, 3], device="cuda")
    has_init = torch.tensor([True, False, True, True], device="cuda")
    ref_out, ref_states = varlen_expected(args, cache.tolist(), has_init.tolist())
    eager_states = args["ssm_states"].clone()
    eager = selective_scan_varlen(**{**args, "ssm_states": eager_states}, cache_indices=cache,
                                  has_initial_state=has_init)
    written = ~torch.isnan(ref_out[0])
    assert_close(eager[:, written], ref_out[:, written].bfloat16())
    assert_close(eager_states[[5, 0, 3]], ref_states[[5, 0, 3]], tol=1e-4)

    compiled = torch.compile(selective_scan_varlen, fullgraph=True)
    states_c = args["ssm_states"].clone()
    out_c = compiled(**{**args, "ssm_states": states_c}, cache_indices=cache, has_initial_state=has_init)
    assert_equal(out_c, eager)
    assert_equal(states_c, eager_states)

    states_g, out_g = args["ssm_states"].clone(), torch.zeros_like(eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        selective_scan_varlen(**{**args, "ssm_states": states_g}, cache_indices=cache,
                              has_initial_state=has_init, out=out_g)
    graph.replay()
    assert_equal(out_g, eager)
    assert_equal(states_g, eager_states)


@pytest.mark.gpu
def test_gpu_opcheck_and_compile_batched():
    args = make_batched(2, 256, 16, 100, dtype=torch.bfloat16)
    out, last = torch.empty_like(args["u"]), torch.empty(2, 256, 16, device="cuda")
    torch.library.opcheck(torch.ops.ifk.selective_scan.default, (
        out, last, None, [args["u"], args["delta"], args["A"], args["B"], args["C"], args["D"], args["z"],
                    args["delta_bias"], None, None, None], True, PAD_SLOT_ID))
    eager = selective_scan_fn(**args)
    assert_equal(torch.compile(selective_scan_fn, fullgraph=True)(**args), eager)
