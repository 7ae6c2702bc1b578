"""selective_state_update: every backend (Triton under the interpreter, torch) against the float64
oracle, pad and untouched slots, awkward sizes, bad input, the HF transformers oracle, and the gpu tier."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from tests import utils
from tests.utils import KERNEL_DEVICE, assert_close, assert_equal, backends, poisoned
from triton_kernels import PAD_SLOT_ID, BackendUnavailableError, use_backend
from triton_kernels.mamba import naive as oracle
from triton_kernels.mamba.state_update import selective_state_update
from triton_kernels.registry import SELECTIVE_STATE_UPDATE

BACKENDS = backends(SELECTIVE_STATE_UPDATE)


def make_case(
    batch,
    num_slots,
    dim,
    dstate,
    *,
    heads=None,
    groups=1,
    dtype=torch.float32,
    state_dtype=torch.float32,
    optional=True,
    device=KERNEL_DEVICE,
):
    """Random signed inputs in the plain form (``heads=None``) or the heads form."""
    row = (dim,) if heads is None else (heads, dim)
    bc = (batch, dstate) if heads is None else (batch, groups, dstate)

    rnd = functools.partial(utils.rnd, dtype=dtype, device=device)

    args = {
        "state": rnd(num_slots, *row, dstate, dtype=state_dtype),
        "x": rnd(batch, *row),
        "dt": rnd(batch, *row) * 0.5,
        "A": -torch.rand(*row, dstate, device=device) - 0.1,
        "B": rnd(*bc),
        "C": rnd(*bc),
    }
    if optional:
        args.update(D=rnd(*row), z=rnd(batch, *row), dt_bias=rnd(*row) * 0.5, dt_softplus=True)
    return args


def expected(args, slots, pad_slot_id=PAD_SLOT_ID):
    """The float64 oracle in the heads form: ``(new_state, out)`` shaped like the inputs."""
    a = dict(args)
    plain = a["state"].dim() == 3
    if plain:
        a["state"], a["A"] = a["state"].unsqueeze(1), a["A"].unsqueeze(0)
        for k in ("x", "dt", "B", "C", "z"):
            if a.get(k) is not None:
                a[k] = a[k].unsqueeze(1)
        for k in ("D", "dt_bias"):
            if a.get(k) is not None:
                a[k] = a[k].unsqueeze(0)
    state, out = oracle.selective_state_update(**a, slots=slots, pad_slot_id=pad_slot_id)
    return (state.squeeze(1), out.squeeze(1)) if plain else (state, out)


CASES = [
    pytest.param(dict(batch=3, num_slots=5, dim=37, dstate=16), [4, PAD_SLOT_ID, 1], id="D37-N16-pad"),
    pytest.param(dict(batch=1, num_slots=1, dim=5, dstate=3), None, id="B1-D5-N3"),
    pytest.param(dict(batch=2, num_slots=2, dim=33, dstate=40, optional=False), None, id="D33-N40-bare"),
    pytest.param(
        dict(batch=3, num_slots=4, dim=6, dstate=5, heads=4, groups=2),
        [2, 0, PAD_SLOT_ID],
        id="heads4-P6-G2-pad",
    ),
    pytest.param(dict(batch=2, num_slots=3, dim=1, dstate=16, heads=3, groups=1), [1, 2], id="heads3-P1-G1"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "state_dtype"),
    [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.float16, torch.float16)],
    ids=["fp32", "fp16-state32", "fp16"],
)
@pytest.mark.parametrize(("case", "slots"), CASES)
def test_matches_reference(backend, dtype, state_dtype, case, slots):
    args = make_case(**case, dtype=dtype, state_dtype=state_dtype)
    idx = None if slots is None else torch.tensor(slots, device=KERNEL_DEVICE)
    ref_state, ref_out = expected(args, idx)
    before = args["state"].clone()
    out = poisoned(args["x"].shape, dtype)
    with use_backend(backend):
        result = selective_state_update(**args, state_batch_indices=idx, out=out)
    assert result is out
    assert_close(out, ref_out.to(dtype), tol=None if dtype == torch.float32 else 4e-3)
    assert_close(args["state"], ref_state.to(state_dtype))
    untouched = torch.ones(args["state"].shape[0], dtype=torch.bool, device=KERNEL_DEVICE)
    if idx is not None:
        untouched[idx[idx != PAD_SLOT_ID].long()] = False
        assert_equal(out[idx == PAD_SLOT_ID], torch.zeros_like(out[idx == PAD_SLOT_ID]), "pad rows")
        assert_equal(args["state"][untouched], before[untouched], "untouched slots")
    else:
        assert not torch.equal(args["state"], before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softplus_threshold_and_formula(backend):
    """One channel by hand: dt + bias above 20 passes through softplus unchanged."""
    args = make_case(2, 2, 4, 2, optional=False)
    args["dt"][0] = 25.0
    args["dt"][1] = -3.0
    args["dt"][1, 1] = -30.0  # bug 3: fp32 log(1 + exp(-30)) is 0; from a zero state dt B x must show
    args["state"][1, 1] = 0.0
    state0 = args["state"].clone()
    with use_backend(backend):
        y = selective_state_update(**args, dt_softplus=True)
    for b, dt in ((0, 25.0), (1, math.log1p(math.exp(-3.0)))):
        new = state0[b, 0] * torch.exp(dt * args["A"][0]) + dt * args["B"][b] * args["x"][b, 0]
        torch.testing.assert_close(args["state"][b, 0], new, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y[b, 0], (new * args["C"][b]).sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(args["state"][1, 1], math.exp(-30.0) * args["B"][1] * args["x"][1, 1],
                               rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_expanded_a(backend):
    """mamba2 passes A, dt_bias and D expanded from ``[H]`` (zero strides) and x sliced from a wider
    projection; nothing needs copying."""
    heads, dim, dstate, batch = 3, 8, 4, 2
    args = make_case(batch, batch, dim, dstate, heads=heads, groups=3)
    a_h = -torch.rand(heads, device=KERNEL_DEVICE) - 0.1
    args["A"] = a_h[:, None, None].expand(heads, dim, dstate)
    args["dt_bias"] = torch.randn(heads, device=KERNEL_DEVICE)[:, None].expand(heads, dim)
    wide = torch.randn(batch, heads, 2 * dim, device=KERNEL_DEVICE)
    args["x"] = wide[..., ::2]
    ref_state, ref_out = expected(args, None)
    with use_backend(backend):
        out = selective_state_update(**args)
    assert_close(out, ref_out)
    assert_close(args["state"], ref_state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    args = make_case(0, 3, 4, 2)
    before = args["state"].clone()
    with use_backend(backend):
        empty = torch.zeros(0, dtype=torch.int32, device=KERNEL_DEVICE)
        out = selective_state_update(**args, state_batch_indices=empty)
    assert out.shape == (0, 4)
    assert_equal(args["state"], before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_prompt_then_decode_steps_equal_whole_scan(backend):
    """selective_scan_fn over the prompt (its last state into slots 3 and 0), then one state update
    per token == selective_scan_fn over the whole sequence, outputs and final states."""
    from triton_kernels.mamba import selective_scan_fn  # the sibling prefill op

    batch, dim, dstate, prompt, steps = 2, 12, 8, 5, 3
    u, delta, z = (torch.randn(batch, dim, prompt + steps, device=KERNEL_DEVICE) for _ in range(3))
    B, C = (torch.randn(batch, dstate, prompt + steps, device=KERNEL_DEVICE) for _ in range(2))
    A, D, bias = -torch.rand(dim, dstate, device=KERNEL_DEVICE), *torch.randn(2, dim, device=KERNEL_DEVICE)
    kw = dict(D=D, delta_bias=bias, delta_softplus=True, return_last_state=True)
    with use_backend("torch"):  # the scan's own backends are tested beside it
        whole, last = selective_scan_fn(u, delta, A, B, C, z=z, **kw)
        head, head_last = selective_scan_fn(
            u[..., :prompt], delta[..., :prompt], A, B[..., :prompt], C[..., :prompt], z=z[..., :prompt], **kw
        )
    state = torch.randn(4, dim, dstate, device=KERNEL_DEVICE)
    idx = torch.tensor([3, 0], device=KERNEL_DEVICE)
    state[idx] = head_last
    before = state.clone()
    with use_backend(backend):
        for t in range(prompt, prompt + steps):
            y = selective_state_update(
                state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], bias, True, idx
            )
            assert_close(y, whole[..., t], name=f"token {t}")
    assert_close(head, whole[..., :prompt])
    assert_close(state[idx], last)
    assert_equal(state[[1, 2]], before[[1, 2]], "untouched slots")


@pytest.mark.parametrize("forced", ["cpu", "cuda"])
def test_forced_backend_without_kernel_raises(forced):
    args = make_case(2, 2, 4, 2)
    before = args["state"].clone()
    with use_backend(forced), pytest.raises(BackendUnavailableError, match=f"no {forced} kernel"):
        selective_state_update(**args)
    assert_equal(args["state"], before)


def test_torch_library_opcheck():
    args = make_case(3, 4, 6, 5, heads=2, groups=2)
    a = dict(args)
    state = a.pop("state")
    torch.library.opcheck(
        torch.ops.ifk.selective_state_update,
        (
            state,
            torch.empty_like(a["x"]),
            [
                a["x"],
                a["dt"],
                a["A"],
                a["B"],
                a["C"],
                a["D"],
                a["z"],
                a["dt_bias"],
                torch.tensor([3, PAD_SLOT_ID, 0], device=KERNEL_DEVICE),
            ],
            True,
            PAD_SLOT_ID,
        ),
    )
    # optional inputs absent, default slots
    torch.library.opcheck(
        torch.ops.ifk.selective_state_update,
        (state[:3].clone(), torch.empty_like(a["x"]), [a["x"], a["dt"], a["A"], a["B"], a["C"], None, None, None, None],
         False, PAD_SLOT_ID),
    )


def test_torch_compile_fullgraph_decode_step():
    args = make_case(3, 4, 6, 5, heads=2, groups=1)
    eager = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    idx = torch.tensor([3, PAD_SLOT_ID, 1], device=KERNEL_DEVICE)
    step = torch.compile(selective_state_update, fullgraph=True)
    assert_close(
        step(**args, state_batch_indices=idx), selective_state_update(**eager, state_batch_indices=idx)
    )
    assert_equal(args["state"], eager["state"], "state")


def _bad(**changes):
    args = make_case(2, 3, 6, 4, heads=2, groups=2)
    args["state_batch_indices"] = torch.tensor([0, 2], device=KERNEL_DEVICE)
    args.update(changes)
    return args


BAD = [
    pytest.param(lambda a: {"x": a["x"][:, :1]}, ValueError, r"x must have shape \[2, 2, 6\]", id="x-heads"),
    pytest.param(lambda a: {"dt": a["dt"][:1]}, ValueError, r"dt must have shape", id="dt-batch"),
    pytest.param(lambda a: {"A": a["A"][..., :3]}, ValueError, r"A must have shape \[2, 6, 4\]", id="A-N"),
    pytest.param(lambda a: {"B": a["B"][:, :, :3]}, ValueError, r"B must have shape", id="B-N"),
    pytest.param(
        lambda a: {"B": a["B"].repeat(1, 2, 1)[:, :3], "C": a["C"].repeat(1, 2, 1)[:, :3]},
        ValueError,
        r"groups dividing H=2",
        id="groups-not-dividing",
    ),
    pytest.param(lambda a: {"D": a["D"][:1]}, ValueError, r"D must have shape", id="D"),
    pytest.param(lambda a: {"x": a["x"].int()}, TypeError, r"x must have dtype", id="x-int"),
    pytest.param(lambda a: {"state": a["state"][0]}, ValueError, r"x must be 2-D", id="state-rank"),
    pytest.param(
        lambda a: {"out": torch.empty_like(a["x"], dtype=torch.float16)},
        TypeError,
        r"out must have x's",
        id="out-dtype",
    ),
    pytest.param(
        lambda a: {"state_batch_indices": torch.tensor([0, 3], device=KERNEL_DEVICE)},
        ValueError,
        r"state_batch_indices holds 3, outside the cache \[0, 3\)",
        id="index-past-end",
    ),
    pytest.param(
        lambda a: {"state_batch_indices": torch.tensor([-2, 0], device=KERNEL_DEVICE)},
        ValueError,
        r"holds -2, outside the cache",
        id="index-negative",
    ),
    pytest.param(
        lambda a: {"state_batch_indices": torch.tensor([PAD_SLOT_ID, 7], device=KERNEL_DEVICE)},
        ValueError,
        r"holds 7, outside the cache",
        id="index-past-end-beside-pad",
    ),
    pytest.param(
        lambda a: {"state_batch_indices": torch.tensor([2, 2], device=KERNEL_DEVICE)},
        ValueError,
        r"state_batch_indices holds slot 2 twice",
        id="slot-twice",
    ),
    pytest.param(
        lambda a: {"state_batch_indices": torch.tensor([0.0, 1.0], device=KERNEL_DEVICE)},
        TypeError,
        r"state_batch_indices must have dtype",
        id="index-float",
    ),
    pytest.param(
        lambda a: {"state_batch_indices": None},
        ValueError,
        r"state has 3 slots for 2 rows; pass state_batch_indices",
        id="no-index-slot-mismatch",
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("change", "exc", "match"), BAD)
def test_bad_input_raises_and_writes_nothing(backend, change, exc, match):
    args = _bad()
    args.update(change(args))
    state_before = args["state"].clone()
    with use_backend(backend), pytest.raises(exc, match=match):
        selective_state_update(**args)
    assert_equal(args["state"], state_before, "state")


@pytest.mark.oracle
@pytest.mark.parametrize("with_optional", [True, False], ids=["D-z-bias", "bare"])
def test_oracle_hf_selective_state_update(with_optional):
    """transformers' ``mamba_selective_state_update`` (its torch path) on the same inputs."""
    modeling = pytest.importorskip("transformers.models.mamba.modeling_mamba")
    args = make_case(3, 3, 21, 16, optional=with_optional)
    hf_state = args["state"].clone()
    kw = {k: args.get(k) for k in ("D", "z", "dt_bias")}
    hf_out = modeling.mamba_selective_state_update(
        hf_state,
        args["x"],
        args["dt"],
        args["A"],
        args["B"],
        args["C"],
        kw["D"],
        dt_bias=kw["dt_bias"],
        dt_softplus=with_optional,
        z=kw["z"],
    )
    out = selective_state_update(**args)
    assert_close(out, hf_out)
    assert_close(args["state"], hf_state)


# ---------------------------------------------------------------- gpu tier (real sizes)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_gpu_decode_bf16_fp32_state(batch):
    args = make_case(batch, batch + 7, 5120, 16, dtype=torch.bfloat16, device="cuda")
    idx = torch.randperm(batch + 7, device="cuda")[:batch].int()
    idx[::9] = PAD_SLOT_ID
    ref_state, ref_out = expected(args, idx)
    before = args["state"].clone()
    out = poisoned(args["x"].shape, torch.bfloat16)
    selective_state_update(**args, state_batch_indices=idx, out=out)
    assert_close(out, ref_out.to(torch.bfloat16))
    assert_close(args["state"], ref_state)
    untouched = torch.ones(batch + 7, dtype=torch.bool, device="cuda")
    untouched[idx[idx != PAD_SLOT_ID].long()] = False
    assert_equal(args["state"][untouched], before[untouched])


@pytest.mark.gpu
def test_gpu_heads_form_mamba2_sizes():
    args = make_case(32, 40, 64, 128, heads=80, groups=8, dtype=torch.bfloat16, device="cuda")
    idx = torch.arange(32, device="cuda", dtype=torch.int32) + 8
    ref_state, ref_out = expected(args, idx)
    out = selective_state_update(**args, state_batch_indices=idx)
    assert_close(out, ref_out.to(torch.bfloat16))
    assert_close(args["state"], ref_state)


@pytest.mark.gpu
def test_gpu_opcheck():
    args = make_case(8, 9, 256, 16, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(
        torch.ops.ifk.selective_state_update,
        (
            args["state"].unsqueeze(1),
            torch.empty_like(args["x"]).unsqueeze(1),
            [
                args["x"].unsqueeze(1),
                args["dt"].unsqueeze(1),
                args["A"].unsqueeze(0),
                args["B"].unsqueeze(1),
                args["C"].unsqueeze(1),
                args["D"].unsqueeze(0),
                args["z"].unsqueeze(1),
                args["dt_bias"].unsqueeze(0),
                torch.arange(8, device="cuda"),
            ],
            True,
            PAD_SLOT_ID,
        ),
    )


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    """The decode step captured once, replayed on new inputs written into the same buffers."""
    args = make_case(64, 80, 5120, 16, dtype=torch.bfloat16, device="cuda")
    idx = torch.arange(64, device="cuda", dtype=torch.int32) + 16
    out = torch.empty_like(args["x"])
    selective_state_update(**args, state_batch_indices=idx, out=out)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        selective_state_update(**args, state_batch_indices=idx, out=out)
    args["x"].copy_(torch.randn_like(args["x"]))
    idx[5] = PAD_SLOT_ID
    ref_state, ref_out = expected(args, idx)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, ref_out.to(torch.bfloat16))
    assert_close(args["state"], ref_state)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    args = make_case(16, 16, 512, 16, dtype=torch.bfloat16, device="cuda")
    ref_state, ref_out = expected(args, None)
    step = torch.compile(selective_state_update, fullgraph=True)
    out = step(**args)
    assert_close(out, ref_out.to(torch.bfloat16))
    assert_close(args["state"], ref_state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pad_slot_id_inside_cache_and_empty_cache(backend):
    """The slot check accepts a pad id that is also a cache index (it is then a pad row) and a batch
    of pad rows over an empty cache."""
    args = make_case(2, 3, 5, 4)
    idx = torch.tensor([1, 2], device=KERNEL_DEVICE)
    ref_state, ref_out = expected(args, idx, pad_slot_id=2)
    with use_backend(backend):
        out = selective_state_update(**args, state_batch_indices=idx, pad_slot_id=2)
    assert_close(out, ref_out)
    assert_close(args["state"], ref_state)
    assert bool(out[1].eq(0).all())
    empty = make_case(2, 0, 5, 4)
    with use_backend(backend):
        out = selective_state_update(**empty, state_batch_indices=torch.full((2,), PAD_SLOT_ID, device=KERNEL_DEVICE))
    assert bool(out.eq(0).all())
