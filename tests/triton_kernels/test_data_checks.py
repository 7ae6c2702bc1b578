"""The value checks shared by every op (offsets, slots), and the shared Triton math helpers."""

import pytest
import torch
import triton
import triton.language as tl

from tests.utils import KERNEL_DEVICE, assert_close
from triton_kernels import _alloc, _tl_math
from triton_kernels._data_checks import check_offsets, check_offsets_and_slots, check_once, check_slots


@pytest.mark.parametrize(
    ("offsets", "total", "match"),
    [
        pytest.param([1, 3], 3, "rise from 0", id="not-from-zero"),
        pytest.param([0, 2], 3, "token count 3", id="short"),
        pytest.param([0, 3, 2, 3], 3, "without decreasing", id="decreasing"),
    ],
)
def test_bad_offsets(offsets, total, match):
    with pytest.raises(ValueError, match=match):
        check_offsets("query_start_loc", torch.tensor(offsets), total)
    with pytest.raises(ValueError, match="query_start_loc"):
        check_offsets_and_slots("query_start_loc", torch.tensor(offsets), total, "cache_indices",
                                torch.zeros(len(offsets) - 1, dtype=torch.long), 4, -1)


def test_good_offsets_come_back_as_a_list():
    assert check_offsets("qsl", torch.tensor([0, 0, 5, 7], dtype=torch.int32), 7) == [0, 0, 5, 7]


@pytest.mark.parametrize(
    ("slots", "unique", "match"),
    [
        pytest.param([0, 4], False, "holds 4, outside the cache", id="past-end"),
        pytest.param([-2, 0], False, "holds -2", id="negative-not-pad"),
        pytest.param([1, 3, 1], True, "holds slot 1 twice", id="duplicate"),
    ],
)
def test_bad_slots(slots, unique, match):
    with pytest.raises(ValueError, match=match):
        check_slots("state_batch_indices", torch.tensor(slots), 4, -1, unique=unique)


def test_pad_slots_may_repeat_and_duplicates_pass_unless_unique():
    check_slots("idx", torch.tensor([-1, 2, -1, 0]), 4, -1, unique=True)
    check_slots("idx", torch.tensor([2, 2]), 4, -1)


@triton.jit
def _math_kernel(x_ptr, sp_ptr, silu_ptr, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    m = o < n
    x = tl.load(x_ptr + o, mask=m)
    tl.store(sp_ptr + o, _tl_math.softplus(x), mask=m)
    tl.store(silu_ptr + o, _tl_math.silu(x), mask=m)


def test_softplus_and_silu_keep_their_digits():
    """softplus keeps relative accuracy far below x = -16, where log(1 + exp(x)) rounds to 0."""
    x = torch.tensor([-80.0, -40.0, -20.0, -16.5, -12.0, -1e-3, 0.0, 1e-3, 3.0, 19.9, 20.0, 20.5, 80.0],
                     device=KERNEL_DEVICE)
    sp, si = torch.empty_like(x), torch.empty_like(x)
    _math_kernel[(1,)](x, sp, si, x.numel(), BLOCK=16)
    ref = torch.nn.functional.softplus(x.double())
    assert ((sp.double() - ref).abs() <= 1e-6 * ref.abs()).all(), (sp, ref)
    assert_close(si, torch.nn.functional.silu(x.double()), tol=1e-6)


def test_poisoned_allocation_under_the_test_tier():
    assert _alloc.POISON, "conftest sets IFK_POISON_OUTPUTS=1 before the package is imported"
    assert _alloc.empty((3,), torch.float16, torch.device("cpu")).isnan().all()
    assert (_alloc.empty((2,), torch.int32, torch.device("cpu")) == _alloc.INT_POISON).all()


def test_check_once_reruns_only_when_the_tensors_change():
    calls = []
    t = torch.arange(4)
    check_once(lambda: calls.append(1), (t,), 4)
    check_once(lambda: calls.append(1), (t,), 4)
    assert len(calls) == 1  # same tensor, unchanged, same sizes: not read again
    check_once(lambda: calls.append(1), (t,), 5)
    t.add_(1)  # an in-place op bumps the version
    check_once(lambda: calls.append(1), (t,), 4)
    check_once(lambda: calls.append(1), (t.clone(),), 4)  # another tensor, same values
    assert len(calls) == 4

    def bad() -> None:
        raise ValueError("bad")

    u = torch.arange(3)
    for _ in range(2):  # a failed check is not remembered
        with pytest.raises(ValueError, match="bad"):
            check_once(bad, (u,))


def test_check_once_under_inference_mode():
    """Inference tensors keep no version counter (reading it raised before) and inside inference
    mode torch writes them without a trace: their check runs on every call. Normal tensors written
    inside inference mode still bump their counters, so theirs runs once per change."""
    calls = []
    with torch.inference_mode():
        t = torch.arange(4)
        check_once(lambda: calls.append(1), (t,), 4)
        t.add_(1)
        check_once(lambda: calls.append(1), (t,), 4)
    check_once(lambda: calls.append(1), (torch.arange(4), t), 4)  # one inference tensor among others
    assert len(calls) == 3
    u = torch.arange(4)
    with torch.inference_mode():
        check_once(lambda: calls.append(1), (u,), 4)
        check_once(lambda: calls.append(1), (u,), 4)
        assert len(calls) == 4
        u.add_(1)
        check_once(lambda: calls.append(1), (u,), 4)
    assert len(calls) == 5
