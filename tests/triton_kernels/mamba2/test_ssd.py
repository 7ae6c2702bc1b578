"""mamba_chunk_scan_combined / mamba_chunk_scan_varlen: every backend against the float64 oracle,
packed == each sequence alone, chunks chained through the cache == whole, seq_idx resets ==
separate sequences, mamba_ssm's return conventions, bad input, opcheck / compile, and the gpu
tier (real sizes, bf16, a 70K-token packed batch)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.triton_kernels.mamba2.ssd_inputs import batched, make
from tests.utils import KERNEL_DEVICE, assert_close, assert_equal, backends, poisoned, rnd
from triton_kernels import PAD_SLOT_ID, mamba_chunk_scan_combined, mamba_chunk_scan_varlen, use_backend
from triton_kernels.mamba2.naive import ssd_oracle
from triton_kernels.registry import MAMBA_CHUNK_SCAN

F32, F16 = torch.float32, torch.float16
DEV = KERNEL_DEVICE
BACKENDS = backends(MAMBA_CHUNK_SCAN)
# fp32 budgets against the float64 oracle: torch tight; Triton's tl.dot may sum in another order
FP32_TOL = {"torch": 1e-5, "triton": 1e-4}


def oracle(args, seq_starts, init=None, init_index=None, final_rows=None, dt_limit=(0.0, math.inf)):
    """The float64 oracle over packed sequences: ``(out [T, h, p], finals [nseq, h, p, n])``."""
    T, h, p = args["x"].shape
    n, nseq = args["B"].shape[-1], len(seq_starts) - 1
    out = torch.full((T, h, p), math.nan, dtype=torch.float64, device=args["x"].device)
    finals = torch.full((nseq, h, p, n), math.nan, dtype=torch.float64, device=args["x"].device)
    index = torch.arange(nseq) if final_rows is None else final_rows
    ssd_oracle(out, args["x"], args["dt"], args["A"], args["B"], args["C"], args["D"], args["z"], args["dt_bias"],
               args["dt_softplus"], dt_limit, seq_starts, None, init,
               None if init_index is None else torch.tensor(init_index), finals, index, 64)
    return out, finals


COMBINED = [
    pytest.param(dict(b=2, l=1, h=4, p=16, g=1, n=16), {}, id="L1-g1"),
    pytest.param(dict(b=1, l=7, h=4, p=16, g=2, n=16), dict(D="hp"), id="L7-g2-Dhp"),
    pytest.param(dict(b=2, l=63, h=3, p=16, g=3, n=16), dict(z=False, bias=False), id="L63-g=h-noz-nobias"),
    pytest.param(dict(b=1, l=64, h=2, p=16, g=1, n=64), dict(D=None), id="L64-n64-noD"),
    pytest.param(dict(b=2, l=65, h=2, p=64, g=2, n=16), dict(softplus=False), id="L65-p64-nosoftplus"),
    pytest.param(dict(b=1, l=300, h=4, p=16, g=2, n=16), dict(limit=(0.05, 0.6)), id="L300-g2-dtlimit"),
    pytest.param(dict(b=2, l=70, h=4, p=16, g=2, n=16), dict(dtype=F16), id="L70-g2-fp16"),
]


@pytest.mark.parametrize(("shape", "flags"), COMBINED)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("init", [False, True], ids=["zero-init", "init"])
def test_combined_matches_oracle(backend, init, shape, flags):
    b, seqlen, h, p, g, n = (shape[k] for k in ("b", "l", "h", "p", "g", "n"))
    flags = dict(flags)
    limit = flags.pop("limit", (0.0, math.inf))
    dtype = flags.get("dtype", F32)
    args = make(b * seqlen, h, p, g, n, **flags)
    states = rnd(b, h, p, n) if init else None
    ref_out, ref_final = oracle(args, [i * seqlen for i in range(b + 1)], states,
                                list(range(b)) if init else None, dt_limit=limit)
    with use_backend(backend):
        out, final = mamba_chunk_scan_combined(**batched(args, b), chunk_size=64, initial_states=states,
                                               dt_limit=limit, return_final_states=True)
    assert out.dtype == dtype
    assert final.dtype == F32
    tol = FP32_TOL[backend] if dtype == F32 else None
    assert_close(out, ref_out.reshape(out.shape).to(dtype), tol=tol, name="out")
    assert_close(final, ref_final, tol=FP32_TOL[backend] if dtype == F32 else 1e-3, name="final_states")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [16, 128, 256])
def test_combined_chunk_sizes_and_non_contiguous_inputs(backend, chunk_size):
    args = make(2 * 150, 4, 16, 2, 16)
    ref_out, _ = oracle(args, [0, 150, 300])
    strided = batched(args, 2)
    for k in ("x", "z"):  # [b, l, h, p] with l innermost
        strided[k] = strided[k].transpose(1, 3).contiguous().transpose(1, 3)
    strided["B"] = strided["B"].transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided["x"].is_contiguous()
    with use_backend(backend):
        out = mamba_chunk_scan_combined(**strided, chunk_size=chunk_size)
    assert_close(out, ref_out.reshape(out.shape), tol=FP32_TOL[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_seq_idx_resets_equal_separate_sequences(backend):
    """seq_idx segments [0]*40 + [1]*1 + [2]*99 in row 0 and [5]*140 in row 1; the initial state
    applies to each row's first segment, the final state is each row's last."""
    args = make(280, 4, 16, 2, 16)
    seq_idx = torch.tensor([[0] * 40 + [1] + [2] * 99, [5] * 140], dtype=torch.int32, device=DEV)
    states = rnd(2, 4, 16, 16)
    starts = [0, 40, 41, 140, 280]
    ref_out, ref_finals = oracle(args, starts, states, [0, -1, -1, 1])
    with use_backend(backend):
        out, final = mamba_chunk_scan_combined(**batched(args, 2), chunk_size=64, initial_states=states,
                                               seq_idx=seq_idx, return_final_states=True)
    assert_close(out, ref_out.reshape(out.shape), tol=FP32_TOL[backend], name="out")
    assert_close(final, ref_finals[[2, 3]], tol=FP32_TOL[backend], name="final_states")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("final", "varlen"), [(False, True), (True, True), (True, False)])
def test_cu_seqlens_return_conventions(backend, final, varlen):
    """batch 1 with cu_seqlens (and the matching seq_idx, as mamba_ssm needs): returns ``(out,
    varlen)``, ``(out, final, varlen)`` or ``(out, final)``; varlen states in C's dtype."""
    cu = [0, 5, 5, 70, 200]
    args = make(200, 4, 16, 1, 16)
    seq_idx = torch.repeat_interleave(torch.arange(4), torch.tensor([5, 0, 65, 130]))[None].to(DEV)
    states = rnd(1, 4, 16, 16)
    ref_out, ref_finals = oracle(args, cu, states, [0, -1, -1, -1])
    with use_backend(backend):
        result = mamba_chunk_scan_combined(
            **batched(args, 1), chunk_size=64, initial_states=states, seq_idx=seq_idx,
            cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=DEV), return_final_states=final,
            return_varlen_states=varlen)
    assert isinstance(result, tuple)
    assert len(result) == 1 + final + varlen
    tol = FP32_TOL[backend]
    assert_close(result[0], ref_out[None], tol=tol, name="out")
    if final:
        assert_close(result[1], ref_finals[-1:], tol=tol, name="final_states")
    if varlen:
        assert result[-1].dtype == args["C"].dtype
        assert_close(result[-1], ref_finals, tol=tol, name="varlen_states")


@pytest.mark.parametrize("backend", BACKENDS)
def test_combined_empty_length_returns_initial_state(backend):
    args = make(0, 2, 16, 1, 16)
    states = rnd(3, 2, 16, 16)
    with use_backend(backend):
        out, final = mamba_chunk_scan_combined(**batched(args, 3), chunk_size=64, initial_states=states,
                                               return_final_states=True)
    assert out.shape == (3, 0, 2, 16)
    assert_equal(final, states)


# ---- packed sequences with a state cache --------------------------------------------------------


def varlen_case(lengths, slots, has_init, *, h=4, p=16, g=2, n=16, num_slots=8, dtype=F32, state_dtype=F32):
    args = make(sum(lengths), h, p, g, n, dtype=dtype)
    starts = [0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()]
    cache = rnd(num_slots, h, p, n, dtype=state_dtype)
    return args, starts, cache


def varlen_expected(args, starts, cache, slots, has_init):
    """Each live sequence alone through the oracle: ``(out, cache after)`` (pad rows NaN)."""
    live = [i for i, s in enumerate(slots) if s != PAD_SLOT_ID]
    T, h, p = args["x"].shape
    out = torch.full((T, h, p), math.nan, dtype=torch.float64, device=DEV)
    after = cache.clone()
    for i in live:
        one = {k: (v[starts[i]:starts[i + 1]] if k in ("x", "dt", "B", "C", "z") else v) for k, v in args.items()}
        init = cache[slots[i]][None] if has_init[i] else None
        o, f = oracle(one, [0, starts[i + 1] - starts[i]], init, [0] if has_init[i] else None)
        out[starts[i]:starts[i + 1]] = o
        after[slots[i]] = f[0].to(cache.dtype)
    return out, after


def varlen_call(args, cache, starts, slots, has_init, **kw):
    return mamba_chunk_scan_varlen(
        args["x"], cache, args["dt"], args["A"], args["B"], args["C"], 64, D=args["D"], z=args["z"],
        dt_bias=args["dt_bias"], dt_softplus=args["dt_softplus"],
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEV),
        cache_indices=None if slots is None else torch.tensor(slots, dtype=torch.int32, device=DEV),
        has_initial_state=None if has_init is None else torch.tensor(has_init, dtype=torch.bool, device=DEV), **kw)


VARLEN = [
    # lengths, slots, has_init
    pytest.param([7, 1, 0, 65, 130], [3, 0, 5, PAD_SLOT_ID, 1], [True, False, True, True, False],
                 dict(), id="lens7-1-0-65pad-130"),
    pytest.param([64, 3, 63], [PAD_SLOT_ID, 7, 2], [False, True, True], dict(g=1, n=64), id="pad-first-n64-g1"),
    pytest.param([30, 5, 17], [4, 6, 2], [True, False, True], dict(dtype=F16, state_dtype=F32),
                 id="fp16-state32"),
]


@pytest.mark.parametrize(("lengths", "slots", "has_init", "kw"), VARLEN)
@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_packed_equals_each_sequence_alone(backend, lengths, slots, has_init, kw):
    args, starts, cache = varlen_case(lengths, slots, has_init, **kw)
    dtype = args["x"].dtype
    ref_out, ref_cache = varlen_expected(args, starts, cache, slots, has_init)
    before = cache.clone()
    out = poisoned(args["x"].shape, dtype)
    with use_backend(backend):
        got = varlen_call(args, cache, starts, slots, has_init, out=out)
    assert got is out
    written = ~torch.isnan(ref_out[:, 0, 0])
    assert_close(out[written], ref_out[written].to(dtype), tol=FP32_TOL[backend] if dtype == F32 else None,
                 name="out")
    assert torch.isnan(out[~written]).all(), "a pad sequence's output rows were written"
    used = [s for s in slots if s != PAD_SLOT_ID]
    assert_close(cache[used], ref_cache[used], tol=FP32_TOL[backend] if dtype == F32 else 1e-3, name="states")
    untouched = [s for s in range(cache.shape[0]) if s not in used]
    assert_equal(cache[untouched], before[untouched], name="untouched slots")
    with use_backend(backend):  # a new out: zeros in pad rows
        fresh = varlen_call(args, before.clone(), starts, slots, has_init)
    assert_equal(fresh[~written], torch.zeros_like(fresh[~written]), name="pad rows")


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_chunks_chained_through_cache_equal_whole(backend):
    args, _, cache = varlen_case([150], [1], [True])
    whole_cache = cache.clone()
    with use_backend(backend):
        whole = varlen_call(args, whole_cache, [0, 150], [1], [True])
        pieces = []
        for s, e in [(0, 9), (9, 10), (10, 150)]:
            part = {k: (v[s:e] if k in ("x", "dt", "B", "C", "z") else v) for k, v in args.items()}
            pieces.append(varlen_call(part, cache, [0, e - s], [1], [True]))
    assert_close(torch.cat(pieces), whole, tol=FP32_TOL[backend], name="out")
    assert_close(cache[1], whole_cache[1], tol=FP32_TOL[backend], name="state")
    assert_equal(cache[[0, *range(2, 8)]], whole_cache[[0, *range(2, 8)]], name="untouched slots")


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_defaults_and_empty_batch(backend):
    args, _, cache = varlen_case([11], [0], [False], num_slots=2)
    before = cache.clone()
    ref_out, ref_cache = varlen_expected(args, [0, 11], cache, [0], [False])
    with use_backend(backend):
        out = mamba_chunk_scan_varlen(args["x"], cache, args["dt"], args["A"], args["B"], args["C"], 64,
                                      D=args["D"], z=args["z"], dt_bias=args["dt_bias"], dt_softplus=True)
    assert_close(out, ref_out, tol=FP32_TOL[backend])
    assert_close(cache[0], ref_cache[0], tol=FP32_TOL[backend])
    assert_equal(cache[1], before[1])
    empty, _, cache = varlen_case([], [], [])
    before = cache.clone()
    with use_backend(backend):
        out = varlen_call(empty, cache, [0], [], [])
    assert out.shape == (0, 4, 16)
    assert_equal(cache, before)


# ---- bad input: a clear error naming the argument, nothing written ------------------------------


def _bad_varlen():
    def ints(*v):
        return torch.tensor(v, dtype=torch.int32, device=DEV)

    return [
        pytest.param(dict(query_start_loc=ints(0, 6, 4, 10)), ValueError, "query_start_loc", id="qsl-decreasing"),
        pytest.param(dict(query_start_loc=ints(0, 4, 4, 9)), ValueError, "query_start_loc", id="qsl-short"),
        pytest.param(dict(cache_indices=ints(0, 3, 1)), ValueError, "cache_indices holds 3", id="slot-out-of-range"),
        pytest.param(dict(cache_indices=ints(1, 0, 1)), ValueError, "cache_indices holds slot 1 twice",
                     id="slot-twice"),
        pytest.param(dict(cache_indices=None, query_start_loc=ints(0, 2, 4, 6, 10)), ValueError,
                     "4 sequences and ssm_states has 3 slots", id="more-seqs-than-slots"),
        pytest.param(dict(chunk_size=48), ValueError, "chunk_size", id="chunk-not-pow2"),
        pytest.param(dict(dt=torch.randn(9, 4, device=DEV)), ValueError, "dt", id="dt-length"),
        pytest.param(dict(B=torch.randn(10, 3, 5, device=DEV), C=torch.randn(10, 3, 5, device=DEV)), ValueError,
                     "groups", id="h-not-divisible-by-g"),
        pytest.param(dict(C=torch.randn(11, 2, 5, device=DEV)), ValueError, "C", id="C-length"),
        pytest.param(dict(D=torch.randn(4, 7, device=DEV)), ValueError, "D", id="D-shape"),
        pytest.param(dict(ssm_states=torch.zeros(3, 4, 8, 6, device=DEV)), ValueError, "ssm_states", id="state-n"),
        pytest.param(dict(has_initial_state=torch.ones(3, device=DEV)), TypeError, "has_initial_state",
                     id="has-init-float"),
        pytest.param(dict(out=torch.zeros(10, 4, 8, dtype=F16, device=DEV)), TypeError, "out", id="out-dtype"),
        pytest.param(dict(dt_limit=(1.0, 0.5)), ValueError, "dt_limit", id="dt-limit-reversed"),
    ]


@pytest.mark.parametrize(("override", "exc", "match"), _bad_varlen())
def test_varlen_bad_input_raises_and_writes_nothing(override, exc, match):
    args = make(10, 4, 8, 2, 5)
    call = dict(x=args["x"], ssm_states=rnd(3, 4, 8, 5), dt=args["dt"], A=args["A"], B=args["B"], C=args["C"],
                chunk_size=64, D=args["D"], query_start_loc=torch.tensor([0, 4, 4, 10], device=DEV),
                cache_indices=torch.tensor([0, 2, 1], device=DEV), out=poisoned((10, 4, 8), F32))
    call.update(override)
    before = call["ssm_states"].clone()
    with pytest.raises(exc, match=match):
        mamba_chunk_scan_varlen(**call)
    assert_equal(call["ssm_states"], before, name="ssm_states")
    if call["out"].dtype == F32:
        assert torch.isnan(call["out"]).all(), "out was written before the error"


@pytest.mark.parametrize(
    ("override", "exc", "match"),
    [
        pytest.param(dict(B=torch.randn(2, 8, 3, 5), C=torch.randn(2, 8, 3, 5)), ValueError, "groups",
                     id="h-not-divisible-by-g"),
        pytest.param(dict(dt=torch.randn(2, 7, 4)), ValueError, "dt", id="dt-length"),
        pytest.param(dict(chunk_size=100), ValueError, "chunk_size", id="chunk-not-pow2"),
        pytest.param(dict(chunk_size=True), ValueError, "chunk_size", id="chunk-bool"),
        pytest.param(dict(initial_states=torch.randn(2, 4, 8, 4)), ValueError, "initial_states", id="init-shape"),
        pytest.param(dict(seq_idx=torch.zeros(2, 8)), TypeError, "seq_idx", id="seq-idx-float"),
        pytest.param(dict(cu_seqlens=torch.tensor([0, 8])), ValueError, "batch 1", id="cu-seqlens-batch2"),
        pytest.param(dict(return_varlen_states=True), ValueError, "cu_seqlens", id="varlen-states-no-cu"),
        pytest.param(dict(A=torch.randn(3)), ValueError, "A", id="A-shape"),
        pytest.param(dict(z=torch.ones(2, 8, 4, 8, dtype=torch.int32)), TypeError, "z", id="z-int32"),
    ],
)
def test_combined_bad_input(override, exc, match):
    args = batched(make(16, 4, 8, 2, 5, device="cpu"), 2)
    del args["dt_softplus"]
    args["chunk_size"] = 64
    args.update(override)
    args = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(exc, match=match):
        mamba_chunk_scan_combined(**args)


def test_combined_cu_seqlens_values_checked():
    args = batched(make(16, 4, 8, 2, 5), 1)
    with pytest.raises(ValueError, match="cu_seqlens"):
        mamba_chunk_scan_combined(**args, chunk_size=64, cu_seqlens=torch.tensor([0, 9, 4, 16], device=DEV))


# ---- custom ops: opcheck and torch.compile ------------------------------------------------------


def test_opcheck_both_ops():
    a = make(2 * 20, 4, 8, 2, 5)
    b = batched(a, 2)
    with use_backend("torch"):
        torch.library.opcheck(torch.ops.ifk.mamba_chunk_scan.default, (
            poisoned((2, 20, 4, 8), F32), poisoned((2, 4, 8, 5), F32), None,
            [b["x"], b["dt"], a["A"], b["B"], b["C"], a["D"], b["z"], a["dt_bias"], rnd(2, 4, 8, 5),
             torch.tensor([[0] * 5 + [1] * 15] * 2, device=DEV), None],
            True, 0.0, math.inf, 64))
        torch.library.opcheck(torch.ops.ifk.mamba_chunk_scan_varlen.default, (
            poisoned((40, 4, 8), F32), rnd(3, 4, 8, 5),
            [a["x"], a["dt"], a["A"], a["B"], a["C"], None, None, None,
             torch.tensor([0, 15, 40], device=DEV), torch.tensor([2, 0], device=DEV),
             torch.tensor([True, False], device=DEV)],
            False, 0.0, 1.0, 64, PAD_SLOT_ID))


def test_compile_fullgraph_matches_eager():
    a = make(30, 4, 8, 2, 5)
    qsl = torch.tensor([0, 12, 30], dtype=torch.int32, device=DEV)
    slots = torch.tensor([1, PAD_SLOT_ID], dtype=torch.int32, device=DEV)
    cache_e = rnd(2, 4, 8, 5)
    cache_c = cache_e.clone()

    def varlen(cache):
        return mamba_chunk_scan_varlen(a["x"], cache, a["dt"], a["A"], a["B"], a["C"], 64, D=a["D"], z=a["z"],
                                       dt_bias=a["dt_bias"], dt_softplus=True, query_start_loc=qsl,
                                       cache_indices=slots)

    def combined():
        return mamba_chunk_scan_combined(**batched(a, 1), chunk_size=64, return_final_states=True)

    with use_backend("torch"):
        eager_v, eager_c = varlen(cache_e), combined()
        compiled_v = torch.compile(varlen, fullgraph=True)(cache_c)
        compiled_c = torch.compile(combined, fullgraph=True)()
    assert_equal(compiled_v, eager_v)
    assert_equal(cache_c, cache_e)
    assert_equal(compiled_c[0], eager_c[0])
    assert_equal(compiled_c[1], eager_c[1])


# ---- gpu tier -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("h", "p", "n", "g", "seqlen"), [(64, 64, 128, 1, 4096), (128, 64, 128, 8, 16384)])
def test_gpu_real_sizes_bf16(h, p, n, g, seqlen):
    """Against the torch backend on fp32 copies (itself checked against the float64 oracle above)."""
    args = make(seqlen, h, p, g, n, dtype=torch.bfloat16, z=False)
    kw = dict(chunk_size=256, initial_states=rnd(1, h, p, n), return_final_states=True)
    out, final = mamba_chunk_scan_combined(**batched(args, 1), **kw)
    fp32 = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with use_backend("torch"):
        ref_out, ref_final = mamba_chunk_scan_combined(**batched(fp32, 1), **kw)
    assert_close(out, ref_out.bfloat16())
    assert_close(final, ref_final, tol=1e-2)


@pytest.mark.gpu
def test_gpu_70k_token_packed_batch_int32_offsets():
    """mamba_ssm issue 1015: offsets past 2^31 elements in a long packed batch (70K tokens x 128
    heads x 64 x 128-state cache rows)."""
    lengths = [40000, 1, 17000, 13000, 9]
    h, p, n = 128, 64, 128
    args = make(sum(lengths), h, p, 8, n, dtype=torch.bfloat16, z=False)
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cache = rnd(6, h, p, n)
    slots, has_init = [5, 0, PAD_SLOT_ID, 3, 1], [True, False, True, True, False]
    out = varlen_call(args, cache, starts, slots, has_init)
    with use_backend("torch"):
        cache_ref = cache.clone()
        ref = varlen_call(args, cache_ref, starts, slots, has_init)
    assert_close(out, ref, tol=2e-2)
    assert_close(cache, cache_ref, tol=1e-2)


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    a = make(2 * 300, 64, 64, 8, 128, dtype=torch.bfloat16)
    b = batched(a, 2)
    torch.library.opcheck(torch.ops.ifk.mamba_chunk_scan.default, (
        torch.empty(2, 300, 64, 64, dtype=torch.bfloat16, device="cuda"),
        torch.empty(2, 64, 64, 128, device="cuda"), None,
        [b["x"], b["dt"], a["A"], b["B"], b["C"], a["D"], b["z"], a["dt_bias"], None, None, None],
        True, 0.0, math.inf, 256))

    def combined():
        return mamba_chunk_scan_combined(**b, chunk_size=256)

    assert_equal(torch.compile(combined, fullgraph=True)(), combined())


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_larger_than_the_data_runs_on_a_grid_bounded_by_the_data(backend):
    """The finding: at l 8 a chunk of 2^20 took 176 s in the interpreter (the grid grew with chunk_size,
    past the 65535 GPU limit from 2^22). Now the cores run a chunk bounded by the longest sequence:
    quick, the oracle's result, forward and backward; chunks above MAX_CHUNK_SIZE are refused."""
    torch.manual_seed(0)
    args = make(8, 2, 4, 1, 4)
    x = args.pop("x").requires_grad_()
    ref, _ = oracle({**args, "x": x.detach()}, [0, 8])
    with use_backend(backend):
        out = mamba_chunk_scan_combined(x[None], *(args[k][None] for k in ("dt",)), args["A"], args["B"][None],
                                        args["C"][None], 1 << 16, D=args["D"], z=args["z"][None],
                                        dt_bias=args["dt_bias"], dt_softplus=True)
        out.sum().backward()
        with pytest.raises(ValueError, match=r"chunk_size must be at most 65536 .* got 131072"):
            mamba_chunk_scan_combined(x[None], args["dt"][None], args["A"], args["B"][None], args["C"][None], 1 << 17)
    assert_close(out[0], ref.float(), tol=FP32_TOL[backend])
    assert torch.isfinite(x.grad).all()
