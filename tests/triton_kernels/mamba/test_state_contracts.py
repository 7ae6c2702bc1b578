"""The state-cache contract of the ops that write states in place, on every backend: an ``out`` or a
cache that overlaps an input is refused before anything is written; a cache whose slots share memory
(``expand``, stride 0) is refused; ``pad_slot_id`` means padding only inside an index tensor (vLLM's
rule); index tensors may be longer than the batch (vLLM pads them), the extra entries unused.
Ops: ``selective_scan_varlen``, ``selective_state_update`` (plain and heads form),
``mamba_chunk_scan_varlen``."""

from __future__ import annotations

import pytest
import torch

from tests.utils import assert_close, backends, poisoned, rnd
from triton_kernels import mamba_chunk_scan_varlen, selective_scan_varlen, selective_state_update, use_backend
from triton_kernels.registry import MAMBA_CHUNK_SCAN, SELECTIVE_SCAN, SELECTIVE_STATE_UPDATE

D, N, T, SLOTS = 8, 4, 10, 3
H, P, G = 2, 4, 1
QSL = [0, 4, 10]  # two sequences


def _qsl(dev):
    return torch.tensor(QSL, dtype=torch.int32, device=dev)


def _scan(dev, out=None, states=None, cache_indices=None, pad_slot_id=-1, **kw):
    gen = torch.Generator().manual_seed(0)
    u = rnd(D, T, generator=gen, device=dev)
    args = dict(u=u, delta=rnd(D, T, generator=gen, device=dev).abs(), A=-rnd(D, N, generator=gen, device=dev).abs(),
                B=rnd(1, N, T, generator=gen, device=dev), C=rnd(1, N, T, generator=gen, device=dev))
    args.update(kw)
    states = rnd(SLOTS, D, N, generator=gen, device=dev) if states is None else states
    out = selective_scan_varlen(args.pop("u"), states, **args, query_start_loc=_qsl(dev), cache_indices=cache_indices,
                                has_initial_state=torch.ones(2, dtype=torch.bool, device=dev), pad_slot_id=pad_slot_id,
                                out=out)
    return out, states


def _ssd(dev, out=None, states=None, cache_indices=None, pad_slot_id=-1, x=None):
    gen = torch.Generator().manual_seed(1)
    x = rnd(T, H, P, generator=gen, device=dev) if x is None else x
    states = rnd(SLOTS, H, P, N, generator=gen, device=dev) if states is None else states
    out = mamba_chunk_scan_varlen(
        x, states, rnd(T, H, generator=gen, device=dev).abs(), -rnd(H, generator=gen, device=dev).abs(),
        rnd(T, G, N, generator=gen, device=dev), rnd(T, G, N, generator=gen, device=dev), 4, query_start_loc=_qsl(dev),
        cache_indices=cache_indices, has_initial_state=torch.ones(2, dtype=torch.bool, device=dev),
        pad_slot_id=pad_slot_id, out=out)
    return out, states


def _step(dev, out=None, state=None, indices=None, pad_slot_id=-1, x=None):
    gen = torch.Generator().manual_seed(2)
    x = rnd(2, D, generator=gen, device=dev) if x is None else x
    state = rnd(2, D, N, generator=gen, device=dev) if state is None else state
    out = selective_state_update(state, x, rnd(2, D, generator=gen, device=dev).abs(),
                                 -rnd(D, N, generator=gen, device=dev).abs(), rnd(2, N, generator=gen, device=dev),
                                 rnd(2, N, generator=gen, device=dev), state_batch_indices=indices,
                                 pad_slot_id=pad_slot_id, out=out)
    return out, state


CASES = {"selective_scan_varlen": (SELECTIVE_SCAN, _scan), "mamba_chunk_scan_varlen": (MAMBA_CHUNK_SCAN, _ssd),
         "selective_state_update": (SELECTIVE_STATE_UPDATE, _step)}
PARAMS = [pytest.param(name, b, id=f"{name}-{b}") for name, (op, _) in CASES.items() for b in backends(op)]


@pytest.mark.parametrize(("name", "backend"), PARAMS)
def test_out_aliasing_an_input_is_refused_before_writing(name, backend):
    """The finding: ``mamba_chunk_scan_varlen(..., out=x)`` passed validation and was off by up to 13.6 on
    Triton (the chunk-scan kernel overwrote rows of x that later row blocks still read)."""
    dev = "cpu"
    with use_backend(backend):
        if name == "mamba_chunk_scan_varlen":
            x = rnd(T, H, P, device=dev)
            before = x.clone()
            with pytest.raises(ValueError, match="out overlaps x in memory"):
                _ssd(dev, out=x, x=x)
        elif name == "selective_state_update":
            x = rnd(2, D, device=dev)
            before = x.clone()
            with pytest.raises(ValueError, match="out overlaps x in memory"):
                _step(dev, out=x, x=x)
        else:
            u = rnd(D, T, device=dev)
            before = u.clone()
            with pytest.raises(ValueError, match="out overlaps u in memory"):
                _scan(dev, out=u, u=u)
            x = u
    assert torch.equal(x, before)


@pytest.mark.parametrize(("name", "backend"), PARAMS)
def test_state_cache_overlapping_an_input_or_itself_is_refused(name, backend):
    _, run = CASES[name]
    dev = "cpu"
    shape = {"selective_scan_varlen": (1, D, N), "mamba_chunk_scan_varlen": (1, H, P, N),
             "selective_state_update": (1, D, N)}[name]
    rows = 2 if name == "selective_state_update" else SLOTS
    shared = rnd(*shape, device=dev).expand(rows, *shape[1:])  # every slot the same memory
    kw = {"state": shared} if name == "selective_state_update" else {"states": shared}
    with use_backend(backend), pytest.raises(ValueError, match="share memory"):
        run(dev, **kw)


@pytest.mark.parametrize(("name", "backend"), PARAMS)
def test_pad_slot_id_without_indices_is_not_padding(name, backend):
    """``pad_slot_id`` equal to a real slot (0) with no index tensor: every row is real, as on the default
    ``pad_slot_id`` (backends disagreed: Triton skipped row 0 of the decode step, torch skipped sequence 0
    of the scan, and unwritten rows stayed NaN)."""
    _, run = CASES[name]
    dev = "cpu"
    with use_backend(backend):
        ref_out, ref_states = run(dev)
        shape = ref_out.shape
        out, states = run(dev, out=poisoned(shape, ref_out.dtype, dev), pad_slot_id=0)
    assert_close(out, ref_out)
    assert_close(states, ref_states)


@pytest.mark.parametrize(("name", "backend"), PARAMS)
def test_index_tensor_longer_than_the_batch(name, backend):
    """vLLM pads index buffers for CUDA graphs: entries past the batch (here out of range) are unused."""
    _, run = CASES[name]
    dev = "cpu"
    with use_backend(backend):
        exact = torch.tensor([1, 0], dtype=torch.int32)
        longer = torch.tensor([1, 0, 99, -7, 1], dtype=torch.int32)
        key = "indices" if name == "selective_state_update" else "cache_indices"
        ref_out, ref_states = run(dev, **{key: exact})
        out, states = run(dev, **{key: longer})
    assert_close(out, ref_out)
    assert_close(states, ref_states)


@pytest.mark.parametrize("backend", backends(SELECTIVE_STATE_UPDATE))
def test_state_that_is_a_slice_of_a_larger_cache_is_accepted(backend):
    """A strided view with distinct elements (HF zamba's per-head state: strides (256, 8, 1) for [2, 16, 8],
    which torch's quick overlap check calls "too hard to tell") is no shared-memory cache."""
    big = rnd(2, 2 * D, N, device="cpu")
    view = big[:, :D]
    expected = view.clone()
    with use_backend(backend):
        out, _ = _step("cpu", state=view)
        ref, _ = _step("cpu", state=expected)
    assert_close(out, ref)
    assert_close(view, expected)
