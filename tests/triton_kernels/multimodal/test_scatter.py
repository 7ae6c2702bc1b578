"""Multimodal placeholder scatter: every backend against the torch reference, exactly."""

from __future__ import annotations

import re

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tests.triton_kernels.aliasing import sharing
from tests.utils import KERNEL_DEVICE, assert_equal, backends, poison_, poisoned
from triton_kernels import (
    _alloc,
    embed_multimodal_tokens,
    merge_multimodal_embeddings,
    merge_multimodal_embeddings_by_mask,
    use_backend,
)
from triton_kernels.multimodal import scatter
from triton_kernels.registry import MULTIMODAL_SCATTER

PLACEHOLDER = 7
VOCAB = 50
# The csrc kernel joins on a GPU machine (built on first use).
KERNEL_BACKENDS = ["triton", "torch", *(["cuda"] if torch.cuda.is_available() else [])]


def make_case(num_tokens, hidden, item_rows, dtype, *, device=KERNEL_DEVICE, item_dtype=None, shuffle=True):
    """Random ids with ``sum(item_rows)`` placeholders scattered among text tokens, and items."""
    num_mm = sum(item_rows)
    assert num_mm <= num_tokens
    ids = torch.randint(0, VOCAB, (num_tokens,), device=device)
    ids[ids == PLACEHOLDER] = PLACEHOLDER + 1
    positions = torch.randperm(num_tokens, device=device)[:num_mm] if shuffle else torch.arange(num_mm)
    ids[positions] = PLACEHOLDER
    items = [torch.randn(r, hidden, dtype=item_dtype or dtype, device=device) for r in item_rows]
    return ids, items


def expected(ids, base, items):
    """Plain torch: text rows from ``base``, placeholder rows from the concatenated items."""
    out = base.clone()
    if items:
        out[ids == PLACEHOLDER] = torch.cat(items).to(base.dtype)
    return out


CASES = [
    pytest.param(1, 8, [1], id="T1-all-placeholder"),
    pytest.param(1, 8, [], id="T1-text-only"),
    pytest.param(37, 123, [5, 1, 9], id="T37-H123-3items"),
    pytest.param(64, 96, [], id="T64-zero-placeholders"),
    pytest.param(40, 33, [10, 10, 10, 10], id="T40-all-placeholders-4items"),
    pytest.param(150, 20, [1] * 30, id="T150-30-one-row-items"),
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("num_tokens", "hidden", "item_rows"), CASES)
def test_embed_matches_reference(backend, dtype, num_tokens, hidden, item_rows):
    ids, items = make_case(num_tokens, hidden, item_rows, dtype)
    weight = torch.randn(VOCAB, hidden, dtype=dtype, device=KERNEL_DEVICE)
    out = poisoned((num_tokens, hidden), dtype)
    with use_backend(backend):
        result = embed_multimodal_tokens(ids, weight, items, placeholder_token_id=PLACEHOLDER, out=out)
    assert result is out
    text = weight[ids.clamp(max=VOCAB - 1)]
    assert_equal(out, expected(ids, text, items))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(("num_tokens", "hidden", "item_rows"), CASES)
def test_merge_writes_only_placeholders(backend, num_tokens, hidden, item_rows):
    ids, items = make_case(num_tokens, hidden, item_rows, torch.float32)
    embeds = torch.randn(num_tokens, hidden, device=KERNEL_DEVICE)
    before = embeds.clone()
    with use_backend(backend):
        result = merge_multimodal_embeddings(ids, embeds, items, PLACEHOLDER)
    assert result is embeds
    assert_equal(embeds, expected(ids, before, items))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_by_mask_and_3d_items(backend):
    ids, _ = make_case(48, 40, [3 * 8], torch.float16)
    items = torch.randn(3, 8, 40, dtype=torch.float16, device=KERNEL_DEVICE)
    embeds = torch.randn(48, 40, dtype=torch.float16, device=KERNEL_DEVICE)
    before = embeds.clone()
    with use_backend(backend):
        merge_multimodal_embeddings_by_mask(embeds, items, ids == PLACEHOLDER)
    assert_equal(embeds, expected(ids, before, [items.reshape(-1, 40)]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_placeholder_ids_outside_vocab_and_list(backend):
    """Placeholder ids never index the table: ids 1000/1001 with a 50-row table."""
    ids, items = make_case(30, 16, [4, 6], torch.float32)
    ids[ids == PLACEHOLDER] = torch.tensor([1000, 1001], device=KERNEL_DEVICE).repeat(5)
    weight = torch.randn(VOCAB, 16, device=KERNEL_DEVICE)
    with use_backend(backend):
        out = embed_multimodal_tokens(ids, weight, items, placeholder_token_id=[1000, 1001])
    mask = ids >= 1000
    ref = weight[ids.masked_fill(mask, 0)]
    ref[mask] = torch.cat(items)
    assert_equal(out, ref)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_items_int32_ids_and_cast(backend):
    """Non-contiguous items (row stride > H) in fp32 cast to an fp16 table; int32 ids."""
    ids, _ = make_case(25, 12, [9], torch.float16)
    ids = ids.to(torch.int32)
    wide = torch.randn(2, 9, 30, device=KERNEL_DEVICE)
    items = [wide[0, :4, 3:15], wide[1, :5, 10:22]]
    weight = torch.randn(VOCAB, 12, dtype=torch.float16, device=KERNEL_DEVICE)
    with use_backend(backend):
        out = embed_multimodal_tokens(ids, weight, items, placeholder_token_id=PLACEHOLDER)
    assert_equal(out, expected(ids, weight[ids.long()], [it.half() for it in items]))


def test_poisoned_out_without_placeholders_is_fully_written():
    ids, _ = make_case(17, 24, [], torch.float32)
    weight = torch.randn(VOCAB, 24, device=KERNEL_DEVICE)
    out = poison_(torch.empty(17, 24, device=KERNEL_DEVICE))
    with use_backend("triton"):
        embed_multimodal_tokens(ids, weight, [], placeholder_token_id=PLACEHOLDER, out=out)
    assert_equal(out, weight[ids])


def test_empty_batch():
    ids = torch.empty(0, dtype=torch.int64, device=KERNEL_DEVICE)
    weight = torch.randn(VOCAB, 8, device=KERNEL_DEVICE)
    with use_backend("triton"):
        out = embed_multimodal_tokens(ids, weight, [], placeholder_token_id=PLACEHOLDER)
    assert out.shape == (0, 8)


# --- bad input: a clear error, nothing written ---------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    ("items", "message"),
    [
        pytest.param([torch.randn(25, 16)] * 2, "25 + 25 = 50 multimodal tokens to 49 placeholders", id="list"),
        pytest.param(torch.randn(7, 8, 16), "Attempted to assign 7 x 8 = 56 multimodal tokens to 49", id="3d"),
    ],
)
def test_count_mismatch_message_and_untouched(backend, items, message):
    ids, _ = make_case(60, 16, [49], torch.float32)
    embeds = torch.randn(60, 16, device=KERNEL_DEVICE)
    before = embeds.clone()
    items = [t.to(KERNEL_DEVICE) for t in items] if isinstance(items, list) else items.to(KERNEL_DEVICE)
    with use_backend(backend), pytest.raises(ValueError, match=re.escape(message)):
        merge_multimodal_embeddings(ids, embeds, items, PLACEHOLDER)
    assert_equal(embeds, before)


BAD_CALLS = {
    "hidden": (lambda c: merge_multimodal_embeddings(c.ids, c.embeds, [torch.randn(3, 15)], PLACEHOLDER),
               ValueError, "hidden size 15"),
    "item-1d": (lambda c: merge_multimodal_embeddings(c.ids, c.embeds, [torch.randn(16)], PLACEHOLDER),
                ValueError, r"multimodal_embeddings\[0\] must be 2-D or 3-D"),
    "item-int": (lambda c: merge_multimodal_embeddings(c.ids, c.embeds, [torch.ones(3, 16, dtype=torch.int64)],
                                                       PLACEHOLDER), TypeError, "dtype"),
    "items-type": (lambda c: merge_multimodal_embeddings(c.ids, c.embeds, "img", PLACEHOLDER),
                   TypeError, "multimodal_embeddings must be"),
    "float-ids": (lambda c: merge_multimodal_embeddings(c.ids.float(), c.embeds, [torch.randn(3, 16)],
                                                        PLACEHOLDER), TypeError, "input_ids"),
    "placeholder-type": (lambda c: merge_multimodal_embeddings(c.ids, c.embeds, [torch.randn(3, 16)], 7.0),
                         TypeError, "placeholder_token_id"),
    "rows": (lambda c: merge_multimodal_embeddings(c.ids[:5], c.embeds, [torch.randn(3, 16)], PLACEHOLDER),
             ValueError, "inputs_embeds has 12 rows"),
    "mask-dtype": (lambda c: merge_multimodal_embeddings_by_mask(c.embeds, [torch.randn(3, 16)], c.ids),
                   TypeError, "is_multimodal"),
    "text-id-oob": (lambda c: embed_multimodal_tokens(c.ids.masked_fill(c.ids == 0, VOCAB + 3), c.weight,
                                                      [torch.randn(3, 16)], placeholder_token_id=PLACEHOLDER,
                                                      out=c.embeds), ValueError, "token id 53"),
    "negative-id": (lambda c: embed_multimodal_tokens(c.ids.masked_fill(c.ids == 0, -2), c.weight,
                                                      [torch.randn(3, 16)], placeholder_token_id=PLACEHOLDER,
                                                      out=c.embeds), ValueError, "token id -2"),
    "both-locators": (lambda c: embed_multimodal_tokens(c.ids, c.weight, [torch.randn(3, 16)], out=c.embeds,
                                                        placeholder_token_id=7, is_multimodal=c.ids == 7),
                      ValueError, "exactly one"),
    "out-dtype": (lambda c: embed_multimodal_tokens(c.ids, c.weight, [torch.randn(3, 16)], placeholder_token_id=7,
                                                    out=c.embeds.half()), ValueError, "out must be"),
    "num-placeholders-type": (lambda c: merge_multimodal_embeddings(c.ids, c.embeds, [torch.randn(3, 16)], 7,
                                                                    num_placeholders=-1),
                              TypeError, "num_placeholders"),
    "host-count-mismatch": (lambda c: merge_multimodal_embeddings(c.ids, c.embeds, [torch.randn(3, 16)], 7,
                                                                  num_placeholders=4), ValueError,
                            re.escape("Attempted to assign 3 = 3 multimodal tokens to 4 placeholders")),
    # torch compares an int32 tensor with 2**32 + 2 as if it were 2: that would overwrite text token 2.
    "placeholder-wraps-int32": (lambda c: merge_multimodal_embeddings(c.ids.int(), c.embeds, [torch.randn(3, 16)],
                                                                      2**32 + 2), ValueError,
                                r"placeholder_token_id 4294967298 is outside .* torch.int32"),
    "placeholder-list-wraps-int32": (lambda c: merge_multimodal_embeddings(c.ids.int(), c.embeds, [torch.randn(3, 16)],
                                                                           [7, 2**32 + 2]), ValueError,
                                     "placeholder_token_id 4294967298 is outside"),
    "placeholder-beyond-int64": (lambda c: embed_multimodal_tokens(c.ids, c.weight, [torch.randn(3, 16)],
                                                                   placeholder_token_id=2**64, out=c.embeds),
                                 ValueError, "placeholder_token_id 18446744073709551616 is outside"),
}


class _Case:
    def __init__(self):
        self.ids = torch.tensor([0, 1, 7, 7, 7, 2, 3, 4, 5, 6, 8, 9])
        self.embeds = torch.randn(12, 16)
        self.weight = torch.randn(VOCAB, 16)


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_and_writes_nothing(name):
    call, exc, message = BAD_CALLS[name]
    case = _Case()
    before = case.embeds.clone()
    with use_backend("torch"), pytest.raises(exc, match=message):
        call(case)
    assert_equal(case.embeds, before)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        pytest.param(lambda c: [c.ids, c.weight, c.ids == 7, torch.randn(3, 15)], "items must be", id="item-hidden"),
        pytest.param(lambda c: [c.ids, c.weight[:, :8], c.ids == 7, torch.randn(3, 16)], "embedding_weight",
                     id="weight-hidden"),
        pytest.param(lambda c: [c.ids[:5], c.weight, c.ids == 7, torch.randn(3, 16)], "input_ids", id="ids-rows"),
        pytest.param(lambda c: [c.ids, c.weight, c.ids, torch.randn(3, 16)], "is_multimodal", id="mask-dtype"),
    ],
)
def test_custom_op_checks_metadata_itself(inputs, message):
    """The registered op re-checks what its kernels rely on (torch.compile may drop the wrapper's
    checks), before writing anything."""
    case = _Case()
    before = case.embeds.clone()
    with use_backend("triton"), pytest.raises(ValueError, match=message):
        torch.ops.ifk.multimodal_scatter(case.embeds, inputs(case), "3", None)
    assert_equal(case.embeds, before)


# --- gpu tier ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_real_size(backend, dtype):
    ids, items = make_case(16384, 4096, [1024] * 8, dtype, device="cuda")
    weight = torch.randn(VOCAB, 4096, dtype=dtype, device="cuda")
    out = poisoned((16384, 4096), dtype, device="cuda")
    with use_backend(backend):
        embed_multimodal_tokens(ids, weight, items, placeholder_token_id=PLACEHOLDER, out=out)
    assert_equal(out, expected(ids, weight[ids], items))
    embeds = torch.randn(16384, 4096, dtype=dtype, device="cuda")
    before = embeds.clone()
    with use_backend(backend):
        merge_multimodal_embeddings(ids, embeds, items, PLACEHOLDER)
    assert_equal(embeds, expected(ids, before, items))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_cuda_graph_capture(backend):
    ids, _ = make_case(4096, 2048, [2 * 512], torch.bfloat16, device="cuda")
    items = torch.randn(2, 512, 2048, dtype=torch.bfloat16, device="cuda")
    weight = torch.randn(VOCAB, 2048, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(4096, 2048, dtype=torch.bfloat16, device="cuda")
    with use_backend(backend):
        embed_multimodal_tokens(ids, weight, items, placeholder_token_id=PLACEHOLDER, out=out)  # warm up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            embed_multimodal_tokens(ids, weight, items, placeholder_token_id=PLACEHOLDER, out=out)
    items.copy_(torch.randn_like(items))
    poison_(out)
    graph.replay()
    torch.cuda.synchronize()
    assert_equal(out, expected(ids, weight[ids], [items.reshape(-1, 2048)]))


@pytest.mark.gpu
def test_gpu_opcheck_and_compile():
    ids, items = make_case(300, 257, [100, 20], torch.bfloat16, device="cuda")
    weight = torch.randn(VOCAB, 257, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(300, 257, dtype=torch.bfloat16, device="cuda")
    torch.library.opcheck(
        torch.ops.ifk.multimodal_scatter, (out, [ids, weight, ids == PLACEHOLDER, *items], "100 + 20", None)
    )
    compiled = torch.compile(
        lambda i, w, it: embed_multimodal_tokens(i, w, it, placeholder_token_id=PLACEHOLDER), fullgraph=True
    )
    assert_equal(compiled(ids, weight, items), expected(ids, weight[ids], items))


def test_opcheck_and_compile_cpu():
    ids, items = make_case(20, 12, [3, 4], torch.float32)
    weight = torch.randn(VOCAB, 12, device=KERNEL_DEVICE)
    out = torch.empty(20, 12, device=KERNEL_DEVICE)
    with use_backend("torch"):
        for host_count in (None, 7):
            torch.library.opcheck(
                torch.ops.ifk.multimodal_scatter, (out, [ids, weight, ids == PLACEHOLDER, *items], "3 + 4", host_count)
            )
        compiled = torch.compile(
            lambda i, w, it: embed_multimodal_tokens(i, w, it, placeholder_token_id=PLACEHOLDER), fullgraph=True
        )
        assert_equal(compiled(ids, weight, items), expected(ids, weight[ids], items))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_out_rows(backend):
    """``out`` a column slice of a wider buffer (row stride > H): only its own columns change."""
    ids, items = make_case(19, 10, [2, 5], torch.float32)
    weight = torch.randn(VOCAB, 10, device=KERNEL_DEVICE)
    wide = torch.randn(19, 16, device=KERNEL_DEVICE)
    before = wide.clone()
    with use_backend(backend):
        embed_multimodal_tokens(ids, weight, items, placeholder_token_id=PLACEHOLDER, out=wide[:, 3:13])
    assert_equal(wide[:, 3:13], expected(ids, weight[ids], items))
    assert_equal(wide[:, :3], before[:, :3])
    assert_equal(wide[:, 13:], before[:, 13:])


# --- aliasing, dtypes, strides, the host count ---------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_item_that_is_a_view_of_the_target(backend):
    """An item cut from ``inputs_embeds`` over the placeholder rows: the result vLLM gets by
    concatenating first (the item's rows as they were before the call)."""
    embeds = torch.randn(20, 8, device=KERNEL_DEVICE)
    ids = torch.randint(0, VOCAB, (20,), device=KERNEL_DEVICE)
    ids[ids == PLACEHOLDER] = 0
    ids[2:8] = PLACEHOLDER
    before = embeds.clone()
    with use_backend(backend):
        merge_multimodal_embeddings(ids, embeds, [embeds[4:10]], PLACEHOLDER)
    assert_equal(embeds, expected(ids, before, [before[4:10]]))

    weight = torch.randn(VOCAB, 8, device=KERNEL_DEVICE)
    out = torch.randn(20, 8, device=KERNEL_DEVICE)
    before = out.clone()
    with use_backend(backend):
        embed_multimodal_tokens(ids, weight, [out[:6]], placeholder_token_id=PLACEHOLDER, out=out)
    assert_equal(out, expected(ids, weight[ids], [before[:6]]))


OVERLAP_CALLS = {
    # (dtype of the index tensor, the call with (ids or mask, target), the names in the message)
    "merge-ids": (torch.int64, lambda ids, t: merge_multimodal_embeddings(ids, t, [torch.randn(3, 8)], PLACEHOLDER),
                  "inputs_embeds overlaps input_ids"),
    "by-mask": (torch.bool, lambda mask, t: merge_multimodal_embeddings_by_mask(t, [torch.randn(3, 8)], mask),
                "inputs_embeds overlaps is_multimodal"),
    "embed-ids": (torch.int64, lambda ids, t: embed_multimodal_tokens(ids, torch.randn(VOCAB, 8), [torch.randn(3, 8)],
                                                                      placeholder_token_id=PLACEHOLDER, out=t),
                  "out overlaps input_ids"),
    "embed-mask": (torch.bool, lambda mask, t: embed_multimodal_tokens(torch.zeros(12, dtype=torch.int64),
                                                                       torch.randn(VOCAB, 8), [torch.randn(3, 8)],
                                                                       is_multimodal=mask, out=t),
                   "out overlaps is_multimodal"),
}


@pytest.mark.parametrize("backend", backends(MULTIMODAL_SCATTER))
@pytest.mark.parametrize("name", list(OVERLAP_CALLS))
def test_target_overlapping_the_ids_or_mask_is_refused_before_writing(name, backend):
    """The target is written while the ids / mask are read (items and the table are copied when they
    overlap it: see above; the ids and the mask are not): that passed validation, now ValueError."""
    index_dtype, call, message = OVERLAP_CALLS[name]
    buffer, target, index = sharing((12, 8), (12,), torch.float32, index_dtype)
    if index_dtype == torch.bool:
        index.copy_(torch.arange(12) % 4 == 1)  # 3 placeholders
    else:
        index.copy_(torch.tensor([0, 1, 7, 7, 7, 2, 3, 4, 5, 6, 8, 9]))
    before = buffer.clone()
    with use_backend(backend), pytest.raises(ValueError, match=message):
        call(index, target)
    assert_equal(buffer, before)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_float64_items_are_cast(backend):
    ids, items = make_case(23, 10, [4, 3], torch.float16, item_dtype=torch.float64)
    weight = torch.randn(VOCAB, 10, dtype=torch.float16, device=KERNEL_DEVICE)
    with use_backend(backend):
        out = embed_multimodal_tokens(ids, weight, items, placeholder_token_id=PLACEHOLDER)
    assert_equal(out, expected(ids, weight[ids], [it.half() for it in items]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_column_strided_target(backend):
    """``inputs_embeds`` / ``out`` transposed views (stride along H = T): accepted, written alike."""
    ids, items = make_case(21, 9, [5, 2], torch.float32)
    embeds = torch.randn(9, 21, device=KERNEL_DEVICE).t()
    before = embeds.clone()
    with use_backend(backend):
        assert merge_multimodal_embeddings(ids, embeds, items, PLACEHOLDER) is embeds
    assert_equal(embeds, expected(ids, before, items))

    weight = torch.randn(VOCAB, 9, device=KERNEL_DEVICE)
    out = poison_(torch.empty(9, 21, device=KERNEL_DEVICE)).t()
    with use_backend(backend):
        embed_multimodal_tokens(ids, weight, items, is_multimodal=ids == PLACEHOLDER, out=out)
    assert_equal(out, expected(ids, weight[ids], items))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_host_count_skips_the_checks(backend):
    """With ``num_placeholders`` nothing is read back: the result matches, and an out-of-vocab
    text id (no longer checked) gives a zero row on every backend, never an out-of-bounds read."""
    ids, items = make_case(30, 12, [6, 4], torch.float32)
    weight = torch.randn(VOCAB, 12, device=KERNEL_DEVICE)
    mask = ids == PLACEHOLDER
    with use_backend(backend):
        out = embed_multimodal_tokens(ids, weight, items, is_multimodal=mask, num_placeholders=10)
    assert_equal(out, expected(ids, weight[ids], items))

    text = (~mask).nonzero().squeeze(1)
    ids[text[0]], ids[text[1]] = VOCAB + 1000, -5
    ref = expected(ids, weight[ids.clamp(0, VOCAB - 1)], items)
    ref[text[:2]] = 0
    with use_backend(backend):
        out = embed_multimodal_tokens(ids, weight, items, placeholder_token_id=PLACEHOLDER, num_placeholders=10)
    assert_equal(out, ref)


class _KernelRecorder:
    """Stands in for the Triton kernel: records one launch, runs nothing."""

    def __init__(self, launches: list[str]):
        self.launches = launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append("kernel")


# Top-level aten ops that launch nothing on a GPU (allocation, views, the host side of a sync).
_NO_LAUNCH = {"aten::empty", "aten::reshape", "aten::view", "aten::select", "aten::resolve_conj",
              "aten::resolve_neg", "aten::detach_", "aten::contiguous", "aten::to", "aten::item"}


def _device_work(monkeypatch, call) -> tuple[list[str], int]:
    """The launches (device ops, host-to-device copies, the kernel) and host syncs of ``call`` on
    the triton backend, counted on CPU with torch.profiler: ``torch.tensor`` of host data
    (``lift_fresh``) is a copy to the device on a GPU; ``.to`` counts only when it copies."""
    kernels: list[str] = []
    syncs: list[str] = []
    monkeypatch.setattr(scatter, "_embed_scatter_kernel", _KernelRecorder(kernels))
    monkeypatch.setattr(_alloc, "POISON", False)  # the test tier's NaN fill is not part of the op
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: syncs.append("tolist") or tolist(t))
    with use_backend("triton"), profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    launches = []
    for e in prof.events():
        parent = e.cpu_parent
        if not e.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue
        if e.name == "aten::lift_fresh":
            launches.append("host-to-device copy")
        elif e.name not in _NO_LAUNCH or (e.name == "aten::to" and e.cpu_children):
            launches.append(e.name)
    syncs += [e.name for e in prof.events() if e.name == "aten::_local_scalar_dense"]
    return launches + kernels, len(syncs)


def test_launch_count(monkeypatch):
    """The numbers the docstring of triton_kernels.multimodal.scatter gives."""
    ids, items = make_case(40, 16, [6, 4], torch.float32)
    weight = torch.randn(VOCAB, 16, device=KERNEL_DEVICE)
    one_item = torch.cat(items)[None]
    mask = ids == PLACEHOLDER

    def by_id(embeddings, **kwargs):
        return lambda: embed_multimodal_tokens(ids, weight, embeddings, placeholder_token_id=PLACEHOLDER, **kwargs)

    launches, syncs = _device_work(monkeypatch, by_id(one_item))
    assert (len(launches), syncs) == (6, 1), launches
    launches, syncs = _device_work(monkeypatch, by_id(items))
    assert (len(launches), syncs) == (7, 1), launches
    launches, syncs = _device_work(monkeypatch, by_id(items, num_placeholders=10))
    assert (len(launches), syncs) == (4, 0), launches
    launches, syncs = _device_work(monkeypatch, lambda: embed_multimodal_tokens(
        ids, weight, one_item, is_multimodal=mask, num_placeholders=10))
    assert (len(launches), syncs) == (2, 0), launches
    embeds = torch.randn(40, 16, device=KERNEL_DEVICE)
    launches, syncs = _device_work(monkeypatch, lambda: merge_multimodal_embeddings(ids, embeds, one_item, PLACEHOLDER))
    assert (len(launches), syncs) == (3, 1), launches


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_every_position_a_placeholder_with_an_empty_table(backend):
    """V = 0 and no text position: nothing indexes the table, so nothing to complain about."""
    ids = torch.full((5,), 3, device=KERNEL_DEVICE)
    items = [torch.randn(5, 4, device=KERNEL_DEVICE)]
    with use_backend(backend):
        out = embed_multimodal_tokens(ids, torch.empty(0, 4, device=KERNEL_DEVICE), items, placeholder_token_id=3)
    assert_equal(out, items[0])
    with use_backend(backend), pytest.raises(ValueError, match=r"token id 0 at a text position, outside .*\[0, 0\)"):
        embed_multimodal_tokens(ids.masked_fill(torch.arange(5) == 1, 0), torch.empty(0, 4, device=KERNEL_DEVICE),
                                [torch.randn(4, 4, device=KERNEL_DEVICE)], placeholder_token_id=3)
