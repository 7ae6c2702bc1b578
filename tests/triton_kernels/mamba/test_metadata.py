"""MambaVarlenMeta: a packed batch's offsets, slots and flags read and checked once per step; the
varlen ops given ``metadata=`` give what they give without it, read nothing back on the Triton
backend (a host sync per layer on a GPU before), and refuse metadata made for another call."""

from __future__ import annotations

import pytest
import torch

from tests.utils import assert_close, rnd
from triton_kernels import (
    MambaVarlenMeta,
    causal_conv1d_varlen,
    mamba_chunk_scan_varlen,
    selective_scan_varlen,
    use_backend,
)

D, N, SLOTS = 8, 4, 4
H, P = 2, 4
QSL = [0, 3, 3, 10]  # three sequences, the second empty
DEV = "cpu"


def _step_tensors():
    return (torch.tensor(QSL, dtype=torch.int32), torch.tensor([2, -1, 0, 99], dtype=torch.int32),
            torch.tensor([True, False, True]))


def _run(name, *, metadata=None, qsl=None, idx=None, init=None):
    """One call of op ``name`` on fixed random inputs: (output, states after)."""
    gen = torch.Generator().manual_seed(3)
    total = QSL[-1]
    if name == "selective_scan_varlen":
        states = rnd(SLOTS, D, N, generator=gen, device=DEV)
        out = selective_scan_varlen(rnd(D, total, generator=gen, device=DEV), states,
                                    rnd(D, total, generator=gen, device=DEV).abs(),
                                    -rnd(D, N, generator=gen, device=DEV).abs(), rnd(1, N, total, generator=gen,
                                                                                    device=DEV),
                                    rnd(1, N, total, generator=gen, device=DEV), query_start_loc=qsl,
                                    cache_indices=idx, has_initial_state=init, metadata=metadata)
    elif name == "mamba_chunk_scan_varlen":
        states = rnd(SLOTS, H, P, N, generator=gen, device=DEV)
        out = mamba_chunk_scan_varlen(rnd(total, H, P, generator=gen, device=DEV), states,
                                      rnd(total, H, generator=gen, device=DEV).abs(),
                                      -rnd(H, generator=gen, device=DEV).abs(), rnd(total, 1, N, generator=gen,
                                                                                    device=DEV),
                                      rnd(total, 1, N, generator=gen, device=DEV), 4, query_start_loc=qsl,
                                      cache_indices=idx, has_initial_state=init, metadata=metadata)
    else:
        states = rnd(SLOTS, D, 3, generator=gen, device=DEV)
        out = causal_conv1d_varlen(rnd(D, total, generator=gen, device=DEV), rnd(D, 4, generator=gen, device=DEV),
                                   None, states, qsl, cache_indices=idx, has_initial_state=init, metadata=metadata)
    return out, states


OPS = ["selective_scan_varlen", "mamba_chunk_scan_varlen", "causal_conv1d_varlen"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", OPS)
def test_metadata_gives_what_the_tensors_give(name, backend):
    qsl, idx, init = _step_tensors()
    meta = MambaVarlenMeta.prepare(qsl, idx, init, num_slots=SLOTS)
    assert (meta.batch, meta.num_tokens, meta.slots, meta.initial) == (3, 10, (2, -1, 0), (True, False, True))
    with use_backend(backend):
        ref_out, ref_states = _run(name, qsl=qsl, idx=idx, init=init)
        out, states = _run(name, metadata=meta)
    assert_close(out, ref_out)
    assert_close(states, ref_states)


@pytest.mark.parametrize("name", OPS)
def test_no_host_read_with_metadata_on_triton(name, monkeypatch):
    """Prepared once, the step's varlen calls read nothing back (tolist / item: a sync each on a GPU)."""
    qsl, idx, init = _step_tensors()
    meta = MambaVarlenMeta.prepare(qsl, idx, init, num_slots=SLOTS)
    reads = []
    for method in ("tolist", "item"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, *a, _o=original, _m=method: reads.append(_m) or _o(self, *a))
    with use_backend("triton"):
        _run(name, metadata=meta)
    assert reads == []
    with use_backend("triton"):
        _run(name, qsl=qsl, idx=idx, init=init)
    assert reads, "without metadata the op reads the offsets back (the test would not see a read otherwise)"


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    pytest.param(dict(query_start_loc=torch.tensor([0, 5, 3])), ValueError, "must rise from 0", id="offsets-fall"),
    pytest.param(dict(cache_indices=torch.tensor([1, -1, 1])), ValueError, "holds slot 1 twice", id="repeat"),
    pytest.param(dict(cache_indices=torch.tensor([1, -1, 4])), ValueError, r"outside the cache \[0, 4\)",
                 id="slot-range"),
    pytest.param(dict(cache_indices=torch.tensor([1, 2])), ValueError, "at least 3", id="indices-short"),
    pytest.param(dict(has_initial_state=torch.tensor([1, 0, 1])), TypeError, "has_initial_state", id="flags-int"),
    pytest.param(dict(num_slots=-1), ValueError, "num_slots", id="num-slots"),
])
def test_prepare_refuses_bad_step_data(kwargs, error, match):
    args = dict(query_start_loc=torch.tensor(QSL), cache_indices=None, has_initial_state=None, num_slots=SLOTS)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        MambaVarlenMeta.prepare(args.pop("query_start_loc"), **args)


def test_metadata_made_for_another_call_is_refused():
    qsl, idx, init = _step_tensors()
    meta = MambaVarlenMeta.prepare(qsl, idx, init, num_slots=SLOTS)
    other = MambaVarlenMeta.prepare(torch.tensor([0, 4]), num_slots=SLOTS)
    with pytest.raises(ValueError, match="prepared for 4 tokens"):
        _run("mamba_chunk_scan_varlen", metadata=other)
    with pytest.raises(ValueError, match="either metadata or query_start_loc"):
        _run("selective_scan_varlen", metadata=meta, qsl=qsl)
    with pytest.raises(TypeError, match="metadata must be a MambaVarlenMeta"):
        _run("causal_conv1d_varlen", metadata={"query_start_loc": qsl})
    with pytest.raises(ValueError, match="prepared for 10 tokens and 8 slots"):
        _run("selective_scan_varlen", metadata=MambaVarlenMeta.prepare(qsl, idx, init, num_slots=8))


def test_without_indices_every_sequence_is_real_and_longer_indices_are_cut():
    meta = MambaVarlenMeta.prepare(torch.tensor(QSL), num_slots=SLOTS, pad_slot_id=0)
    assert meta.slots == (0, 1, 2)
    padded = MambaVarlenMeta.prepare(torch.tensor(QSL), torch.tensor([3, 1, 0, 7, 7]), num_slots=SLOTS)
    assert padded.slots == (3, 1, 0)
    assert padded.cache_indices.shape == (3,)


def test_compiled_call_with_metadata_matches_eager():
    qsl, idx, init = _step_tensors()
    meta = MambaVarlenMeta.prepare(qsl, idx, init, num_slots=SLOTS)
    ref_out, ref_states = _run("mamba_chunk_scan_varlen", metadata=meta)
    torch._dynamo.reset()
    out, states = torch.compile(lambda: _run("mamba_chunk_scan_varlen", metadata=meta), backend="eager")()
    assert_close(out, ref_out)
    assert_close(states, ref_states)


@pytest.mark.parametrize("offsets", [[0, -5, 10**6], [0, 9, 2], [10**9, 0, 10], [0, 2**31 - 1, 10]],
                         ids=["negative-huge", "falling", "start-huge", "int32-max"])
@pytest.mark.parametrize("name", ["selective_scan_varlen", "causal_conv1d_varlen"])
def test_offsets_changed_after_prepare_stay_inside_the_tensors(name, offsets):
    """The ops given metadata do not re-check the device offsets: changed after prepare, they are
    garbage to the kernels, which clamp them into [0, T] (before, the interpreter crashed reading
    outside x). The result is undefined, but every access stays inside the tensors."""
    qsl = torch.tensor([0, 3, 10], dtype=torch.int32)
    meta = MambaVarlenMeta.prepare(qsl, torch.tensor([1, 0], dtype=torch.int32), torch.tensor([True, True]),
                                   num_slots=2)
    qsl.copy_(torch.tensor(offsets, dtype=torch.int32))
    gen = torch.Generator().manual_seed(0)
    with use_backend("triton"):
        if name == "selective_scan_varlen":
            out = selective_scan_varlen(rnd(D, 10, generator=gen, device=DEV), rnd(2, D, N, generator=gen, device=DEV),
                                        rnd(D, 10, generator=gen, device=DEV).abs(),
                                        -rnd(D, N, generator=gen, device=DEV).abs(),
                                        rnd(1, N, 10, generator=gen, device=DEV),
                                        rnd(1, N, 10, generator=gen, device=DEV), metadata=meta)
        else:
            out = causal_conv1d_varlen(rnd(D, 10, generator=gen, device=DEV), rnd(D, 4, generator=gen, device=DEV),
                                       None, rnd(2, D, 3, generator=gen, device=DEV), None, metadata=meta)
    assert out.shape == (D, 10)
