"""The batch wrapper: per-step metadata in fixed buffers, and the linear / logits / embedding
updates against a float64 per-token loop, with slot -1 tokens, interleaved slots, changing
mappings between steps, on the torch backend and the Triton kernels."""

import pytest
import torch

from pyiface.lora import LoRABatchWrapper, LoRAEmbeddingSlots, LoRASlots
from tests.pyiface.lora.common import BACKENDS, oracle_delta, random_adapter
from tests.utils import KERNEL_DEVICE, assert_close, assert_equal
from triton_kernels import use_backend

DEV = KERNEL_DEVICE
H_IN, SLICES, MAX_LORAS, MAX_RANK = 19, (12, 5, 7), 4, 8


def _filled_slots(ranks: dict[int, int], widths=SLICES, dtype=torch.float32):
    slots = LoRASlots(MAX_LORAS, MAX_RANK, H_IN, widths, dtype=dtype, device=DEV)
    adapters = {}
    for slot, rank in ranks.items():
        adapters[slot] = random_adapter(rank, H_IN, widths)
        slots.set_lora(slot, *adapters[slot])
    return slots, adapters


def _linear_step(wrapper, slots, mapping, dtype=torch.float32, sampled=None):
    x = torch.randn(len(mapping), H_IN, dtype=dtype, device=DEV)
    base = torch.randn(len(mapping), sum(slots.output_slices), dtype=dtype, device=DEV)
    y = base.clone()
    sampled = None if sampled is None else torch.tensor(sampled)
    wrapper.update_metadata(torch.tensor(mapping, dtype=torch.int64, device=DEV), sampled)
    out = wrapper.add_lora_linear(
        y,
        x,
        slots.lora_a_stacked,
        slots.lora_b_stacked,
        1.0,
        slots.output_slices,
        lora_ranks=slots.lora_ranks,
    )
    assert out is y, "the inference path updates y in place"
    return x, base, y


MAPPINGS = [
    pytest.param([0, -1, 2, 0, 3, -1, 2, 2, 0], id="interleaved-with-minus-1"),
    pytest.param([3] * 10 + [1], id="skewed"),  # slot 1 has one token
    pytest.param([-1, -1, -1], id="all-minus-1"),
    pytest.param([2], id="T1"),
    pytest.param([], id="T0"),
    pytest.param([1, 1, 0], id="empty-slot-1"),  # slot 1 holds no adapter: no update
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mapping", MAPPINGS)
def test_add_lora_linear_matches_loop(backend, mapping):
    slots, adapters = _filled_slots({0: 1, 2: 8, 3: 5})
    wrapper = LoRABatchWrapper(MAX_LORAS, 16, DEV)
    with use_backend(backend):
        x, base, y = _linear_step(wrapper, slots, mapping)
    ref = base.double() + oracle_delta(x.cpu(), mapping, adapters, SLICES).to(DEV)
    assert_close(y, ref.float())
    untouched = torch.tensor([s in (-1, 1) for s in mapping], dtype=torch.bool, device=DEV)
    assert_equal(y[untouched], base[untouched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_matches_loop(backend):
    slots, adapters = _filled_slots({0: 4, 1: 8}, dtype=torch.float16)
    stored = {s: ([t.half().float() for t in a], b, sc) for s, (a, b, sc) in adapters.items()}
    wrapper = LoRABatchWrapper(MAX_LORAS, 16, DEV)
    mapping = [1, 0, -1, 1, 0, 0, 1]
    with use_backend(backend):
        x, base, y = _linear_step(wrapper, slots, mapping, dtype=torch.float16)
    ref = base.double() + oracle_delta(x.cpu().float(), mapping, stored, SLICES).to(DEV)
    assert_close(y, ref.half())


@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_mappings_keep_buffers(backend):
    """Steps with different mappings and lengths reuse the same metadata storage (CUDA graphs)."""
    slots, adapters = _filled_slots({0: 3, 1: 8, 2: 2})
    wrapper = LoRABatchWrapper(MAX_LORAS, 12, DEV, max_num_samples=4)
    metas = (wrapper.token_meta, wrapper.sampler_meta)
    ptrs = [t.data_ptr() for m in metas for t in m.meta_args(m.max_num_tokens)[:6]]
    with use_backend(backend):
        for mapping in ([0, 1, 2, -1], [2, 2, 2, 2, 2, 2, 1, 0, -1, 0, 1, 2], [-1, -1], [1, 0, 1]):
            x, base, y = _linear_step(wrapper, slots, mapping, sampled=mapping[-4:])
            assert_close(y, (base.double() + oracle_delta(x.cpu(), mapping, adapters, SLICES).to(DEV)).float())
            assert (wrapper.num_tokens, wrapper.num_samples) == (len(mapping), len(mapping[-4:]))
    assert [t.data_ptr() for m in metas for t in m.meta_args(m.max_num_tokens)[:6]] == ptrs


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_lora_logits_uses_sampler_mapping(backend):
    vocab = 23
    slots, adapters = _filled_slots({1: 6, 3: 2}, widths=(vocab,))
    wrapper = LoRABatchWrapper(MAX_LORAS, 8, DEV, max_num_samples=3)
    sampled = [3, -1, 1]  # one row per sequence: its own mapping, not the 6 tokens'
    wrapper.update_metadata(torch.tensor([1, 1, 3, 3, 3, -1], device=DEV), torch.tensor(sampled))
    x = torch.randn(3, H_IN, device=DEV)
    base = torch.randn(3, vocab, device=DEV)
    y = base.clone()
    with use_backend(backend):
        out = wrapper.add_lora_logits(
            y, x, slots.lora_a_stacked[0], slots.lora_b_stacked[0], 1.0, lora_ranks=slots.lora_ranks
        )
    assert out is y
    assert_close(y, (base.double() + oracle_delta(x.cpu(), sampled, adapters, (vocab,)).to(DEV)).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_lora_embedding_matches_loop(backend):
    vocab, hidden = 17, 9
    slots = LoRAEmbeddingSlots(MAX_LORAS, MAX_RANK, vocab, hidden, device=DEV)
    tables = {0: (torch.randn(3, vocab), torch.randn(hidden, 3), 0.5), 2: (torch.randn(8, vocab),
              torch.randn(hidden, 8), 2.0)}  # fmt: skip
    for slot, (a, b, sc) in tables.items():
        slots.set_lora(slot, a, b, sc)
    mapping = [2, -1, 0, 0, 2, 1, -1, 2]
    ids = torch.randint(0, vocab, (len(mapping),), device=DEV)
    base = torch.randn(len(mapping), hidden, device=DEV)
    y = base.clone()
    wrapper = LoRABatchWrapper(MAX_LORAS, 8, DEV)
    wrapper.update_metadata(torch.tensor(mapping))
    with use_backend(backend):
        wrapper.add_lora_embedding(y, ids, slots.lora_a_stacked[0], slots.lora_b_stacked[0], scale=1.5)
    ref = base.double().clone()
    for t, slot in enumerate(mapping):
        if slot in tables:
            a, b, sc = tables[slot]
            ref[t] += 1.5 * sc * (b.double() @ a.double()[:, ids[t].item()])
    assert_close(y, ref.float())


def test_bad_mapping_leaves_wrapper_unusable_until_next_update():
    slots, _ = _filled_slots({0: 2})
    wrapper = LoRABatchWrapper(MAX_LORAS, 4, DEV, max_num_samples=2)
    wrapper.update_metadata(torch.tensor([0, 0]))
    for bad, sampled, match in (
        ([0, MAX_LORAS], None, "slot id 4, outside"),
        ([-2, 0], None, "slot id -2"),
        ([0, 0], [0, 7], "slot id 7"),
        ([0] * 5, [0], "5 tokens, more than max_num_tokens=4"),
        ([0, 0, 0], None, "3 tokens, more than max_num_samples=2"),
        ([0.0], None, "dtype"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            wrapper.update_metadata(torch.tensor(bad), None if sampled is None else torch.tensor(sampled))
        assert wrapper.num_tokens == wrapper.num_samples == 0
    y = torch.randn(2, sum(SLICES), device=DEV)
    before = y.clone()
    a, b = slots.lora_a_stacked, slots.lora_b_stacked
    with pytest.raises(ValueError, match="2 rows but the last successful update_metadata mapped 0"):
        wrapper.add_lora_linear(y, torch.randn(2, H_IN, device=DEV), a, b, 1.0, SLICES)
    assert_equal(y, before)


def test_row_count_must_match_mapping():
    slots, _ = _filled_slots({0: 2})
    emb = LoRAEmbeddingSlots(MAX_LORAS, MAX_RANK, 10, 4, device=DEV)
    wrapper = LoRABatchWrapper(MAX_LORAS, 8, DEV)
    wrapper.update_metadata(torch.tensor([0, 0, -1]))
    y = torch.randn(4, sum(SLICES), device=DEV)
    before = y.clone()
    a, b = slots.lora_a_stacked, slots.lora_b_stacked
    with pytest.raises(ValueError, match=r"4 rows .* mapped 3 tokens"):
        wrapper.add_lora_linear(y, torch.randn(4, H_IN, device=DEV), a, b, 1.0, SLICES)
    assert_equal(y, before)
    ids, y_emb = torch.zeros(4, dtype=torch.long, device=DEV), torch.randn(4, 4, device=DEV)
    with pytest.raises(ValueError, match=r"4 rows .* mapped 3 tokens"):
        wrapper.add_lora_embedding(y_emb, ids, *emb.lora_a_stacked, *emb.lora_b_stacked)
    with pytest.raises(ValueError, match="max_loras"):
        LoRABatchWrapper(0, 8, DEV)
    with pytest.raises(ValueError, match="max_num_samples"):
        LoRABatchWrapper(2, 8, DEV, max_num_samples=0)
