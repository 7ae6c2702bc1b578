"""selective_state_update in its Mamba-2 decode forms: A ``[H, P, N]`` expanded from ``[H]`` (the tied
path), dt and dt_bias broadcast over P, B and C ``[B, G, N]`` with G dividing H, states in fp32 or
the input dtype, pad slots; every backend against one float64 oracle, HF transformers' Mamba-2
decode math as an oracle from another project, and the gpu tier at real sizes."""

from __future__ import annotations

import functools

import pytest
import torch

from tests import utils
from tests.utils import KERNEL_DEVICE, assert_close, assert_equal, backends, poisoned
from triton_kernels import PAD_SLOT_ID, selective_state_update, use_backend
from triton_kernels.mamba.state_update import _tie_hdim
from triton_kernels.registry import SELECTIVE_STATE_UPDATE

BACKENDS = backends(SELECTIVE_STATE_UPDATE)


def oracle(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, state_batch_indices=None,
           pad_slot_id=PAD_SLOT_ID):
    """The decode step in float64, row by row: ``(new cache, out)``; pad rows give zeros and leave
    the cache as it was."""
    cache = state.double().clone()
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    rep = x.shape[1] // B.shape[1]
    for b in range(x.shape[0]):
        slot = b if state_batch_indices is None else int(state_batch_indices[b])
        if slot == pad_slot_id:
            continue
        delta = dt[b].double() + (0 if dt_bias is None else dt_bias.double())  # [H, P]
        if dt_softplus:
            delta = torch.where(delta <= 20, torch.log1p(torch.exp(delta)), delta)
        Bh = B[b].double().repeat_interleave(rep, 0)[:, None, :]  # [H, 1, N]
        Ch = C[b].double().repeat_interleave(rep, 0)[:, None, :]
        new = cache[slot] * torch.exp(delta[..., None] * A.double()) + (delta * x[b].double())[..., None] * Bh
        cache[slot] = new
        y = (new * Ch).sum(-1)
        if D is not None:
            y = y + D.double() * x[b].double()
        if z is not None:
            y = y * z[b].double() * torch.sigmoid(z[b].double())
        out[b] = y
    return cache, out


def make_mamba2(batch, num_slots, heads, dim, dstate, groups, *, dtype=torch.float32, state_dtype=None,
                form="tied", device=KERNEL_DEVICE):
    """The arguments of a Mamba-2 decode step as HF and vLLM build them.

    form: ``tied`` (A, dt, dt_bias, D expanded from per-head values), ``tied-D-per-channel`` (D
    ``[H, P]``, mamba_ssm's ``D_has_hdim``), ``tied-no-bias`` (no dt_bias, D or z), ``untied`` (every
    tensor full), ``A-tied-only`` (A expanded, dt per channel: the general path).
    """
    rnd = functools.partial(utils.rnd, dtype=dtype, device=device)

    a_h = -torch.rand(heads, device=device) * 4 - 0.1
    args = {
        "state": torch.randn(num_slots, heads, dim, dstate, device=device).to(state_dtype or dtype),
        "x": rnd(batch, heads, dim),
        "dt": rnd(batch, heads)[..., None].expand(batch, heads, dim),
        "A": a_h[:, None, None].expand(heads, dim, dstate),
        "B": rnd(batch, groups, dstate),
        "C": rnd(batch, groups, dstate),
        "D": torch.randn(heads, device=device)[:, None].expand(heads, dim),
        "z": rnd(batch, heads, dim),
        "dt_bias": (torch.randn(heads, device=device) - 2)[:, None].expand(heads, dim),
        "dt_softplus": True,
    }
    if form == "tied-D-per-channel":
        args["D"] = torch.randn(heads, dim, device=device)
    elif form == "tied-no-bias":
        dt_h = torch.rand(batch, heads, device=device).to(dtype) + 0.1  # positive: no softplus
        args.update(dt_bias=None, D=None, z=None, dt=dt_h[..., None].expand(batch, heads, dim), dt_softplus=False)
    elif form == "untied":
        args.update(A=-torch.rand(heads, dim, dstate, device=device) - 0.1, dt=rnd(batch, heads, dim),
                    dt_bias=torch.randn(heads, dim, device=device), D=torch.randn(heads, dim, device=device))
    elif form == "A-tied-only":
        args["dt"] = rnd(batch, heads, dim)
    return args


FORMS = ["tied", "tied-D-per-channel", "tied-no-bias", "untied", "A-tied-only"]
SHAPES = [
    pytest.param(dict(batch=3, num_slots=5, heads=4, dim=6, dstate=5, groups=2), [4, PAD_SLOT_ID, 1],
                 id="H4-P6-N5-G2-pad"),
    pytest.param(dict(batch=2, num_slots=2, heads=3, dim=8, dstate=16, groups=1), None, id="H3-P8-N16-G1"),
    pytest.param(dict(batch=1, num_slots=3, heads=2, dim=5, dstate=12, groups=2), [2], id="B1-H2-P5-N12-G2"),
    pytest.param(dict(batch=2, num_slots=4, heads=4, dim=1, dstate=8, groups=4), [PAD_SLOT_ID, 3],
                 id="H4-P1-N8-G4-pad"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("dtype", "state_dtype"),
                         [(torch.float32, torch.float32), (torch.float16, torch.float32),
                          (torch.float16, torch.float16)],
                         ids=["fp32", "fp16-state32", "fp16"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("shape", "slots"), SHAPES)
def test_matches_oracle(backend, dtype, state_dtype, form, shape, slots):
    args = make_mamba2(**shape, dtype=dtype, state_dtype=state_dtype, form=form)
    idx = None if slots is None else torch.tensor(slots, device=KERNEL_DEVICE, dtype=torch.int32)
    ref_cache, ref_out = oracle(**args, state_batch_indices=idx)
    before = args["state"].clone()
    out = poisoned(args["x"].shape, dtype)
    with use_backend(backend):
        result = selective_state_update(**args, state_batch_indices=idx, out=out)
    assert result is out
    assert_close(out, ref_out.to(dtype))
    assert_close(args["state"], ref_cache.to(state_dtype), name="state")
    if idx is not None:
        pad = idx == PAD_SLOT_ID
        assert_equal(out[pad], torch.zeros_like(out[pad]), "pad rows")
        untouched = torch.ones(args["state"].shape[0], dtype=torch.bool, device=KERNEL_DEVICE)
        untouched[idx[~pad].long()] = False
        assert_equal(args["state"][untouched], before[untouched], "untouched slots")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_steps_chain(backend):
    """Four decode steps on one cache equal four oracle steps (the state carries over)."""
    args = make_mamba2(3, 4, 4, 8, 16, 2, form="tied")
    idx = torch.tensor([2, 0, PAD_SLOT_ID], device=KERNEL_DEVICE)
    cache = args["state"].double()
    for step in range(4):
        torch.manual_seed(step + 1)
        fresh = make_mamba2(3, 4, 4, 8, 16, 2, form="tied")
        step_args = {**fresh, "state": args["state"], "A": args["A"], "D": args["D"], "dt_bias": args["dt_bias"]}
        cache, ref_out = oracle(**{**step_args, "state": cache}, state_batch_indices=idx)
        with use_backend(backend):
            out = selective_state_update(**step_args, state_batch_indices=idx)
        assert_close(out, ref_out.float(), name=f"step {step}")
    assert_close(args["state"], cache.float(), name="state")


@pytest.mark.oracle
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("groups", [1, 2])
def test_oracle_hf_mamba2_decode(backend, groups):
    """transformers' Mamba-2 decode step (``mamba2_selective_state_update``, its torch path) with the
    arguments ``Mamba2Mixer.forward`` builds in its cache branch."""
    modeling = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    batch, heads, dim, dstate = 3, 4, 8, 16
    args = make_mamba2(batch, batch, heads, dim, dstate, groups, form="tied")
    hf_state = args["state"].clone()
    hf_out = modeling.mamba2_selective_state_update(
        hf_state, args["x"], args["dt"], args["A"], args["B"], args["C"], args["D"], z=None,
        dt_bias=args["dt_bias"], dt_softplus=True,
    )
    with use_backend(backend):
        out = selective_state_update(**{**args, "z": None})
    assert_close(out, hf_out)
    assert_close(args["state"], hf_state, name="state")


def test_opcheck_and_compile_with_expanded_inputs():
    """The zero-stride expands survive the custom op's checks and torch.compile(fullgraph=True)."""
    args = make_mamba2(3, 4, 4, 8, 16, 2, form="tied")
    idx = torch.tensor([3, PAD_SLOT_ID, 0], device=KERNEL_DEVICE)
    inputs = [args[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")] + [idx]
    torch.library.opcheck(torch.ops.ifk.selective_state_update,
                          (args["state"].clone(), torch.empty_like(args["x"]), inputs, True, PAD_SLOT_ID))
    eager = {**args, "state": args["state"].clone()}
    step = torch.compile(selective_state_update, fullgraph=True)
    assert_close(step(**args, state_batch_indices=idx), selective_state_update(**eager, state_batch_indices=idx))
    assert_equal(args["state"], eager["state"], "state")


def test_tied_path_is_chosen_for_mamba2_expands():
    """The kernel's per-head (TIE_HDIM) path: taken for HF's / vLLM's expands, not for full tensors."""
    tied = make_mamba2(2, 2, 3, 4, 8, 1, form="tied")
    assert _tie_hdim(tied["A"], tied["dt"], tied["dt_bias"])
    assert _tie_hdim(tied["A"], tied["dt"], None)
    one_channel = make_mamba2(2, 2, 3, 1, 8, 1, form="untied")
    assert not _tie_hdim(one_channel["A"], one_channel["dt"], one_channel["dt_bias"])  # A varies along N
    for form in ("untied", "A-tied-only"):
        full = make_mamba2(2, 2, 3, 4, 8, 1, form=form)
        assert not _tie_hdim(full["A"], full["dt"], full["dt_bias"]), form
    assert not _tie_hdim(tied["A"], tied["dt"], torch.randn(3, 4))  # dt_bias per channel


# ---------------------------------------------------------------- gpu tier (real sizes, bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32], ids=["state-bf16", "state-fp32"])
@pytest.mark.parametrize(("batch", "heads"), [(1, 64), (64, 128), (256, 128)], ids=["B1-H64", "B64-H128", "B256-H128"])
def test_gpu_mamba2_decode_bf16(state_dtype, batch, heads):
    args = make_mamba2(batch, batch + 5, heads, 64, 128, 8, dtype=torch.bfloat16, state_dtype=state_dtype,
                       device="cuda")
    idx = torch.randperm(batch + 5, device="cuda")[:batch].int()
    idx[3::7] = PAD_SLOT_ID
    sub = sorted({0, batch // 2, batch - 1, min(3, batch - 1)})  # the float64 oracle on a few rows only
    ref_cache, ref_out = oracle(**{**args, **{k: args[k][sub] for k in ("x", "dt", "B", "C", "z")}},
                                state_batch_indices=idx[sub])
    out = selective_state_update(**args, state_batch_indices=idx)
    assert_close(out[sub], ref_out.to(torch.bfloat16))
    live = idx[sub][idx[sub] != PAD_SLOT_ID].long()
    assert_close(args["state"][live], ref_cache[live].to(state_dtype), name="state")
