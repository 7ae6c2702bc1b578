"""The harness's interleaved timing: rounds alternate their order, a failure stays in its row, ratios
pair times of the same round, rows are filled when their case is timed. Sleeps stand in for kernels
(they cost no CPU, so a busy machine moves them little)."""

import math
import time

import pytest
import torch

from bench.harness import Context, format_table, input_sets, paired_ratios, sample_rounds

CPU = torch.device("cpu")


def _sleeper(ms: float, log: list | None = None, name: str = ""):
    def fn(_inputs):
        if log is not None:
            log.append(name)
        time.sleep(ms * 1e-3)

    return fn


def test_rounds_alternate_order():
    """Calls slower than a round's slice get one call a round and the fewest rounds: the order after
    the warm-up and sizing calls (A A B B) is A B, B A, A B, ..."""
    log = []
    results = sample_rounds([(_sleeper(2.0, log, "A"), [0]), (_sleeper(2.0, log, "B"), [0])], CPU, rep_ms=10.0)
    assert [len(r) for r in results] == [5, 5]
    assert "".join(log) == "AABB" + "ABBAABBAAB"


def test_failure_stays_in_its_row():
    calls = []

    def flaky(_inputs):
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("boom")

    results = sample_rounds([(flaky, [0]), (_sleeper(0.1), [0])], CPU, rep_ms=5.0)
    assert isinstance(results[0], RuntimeError)
    assert len(results[1]) >= 5
    assert paired_ratios(results, 1) == [None, 1.0]


def test_ratio_pairs_rounds():
    """A machine twice as slow in the second round moves both sides: the paired ratio stays 2."""
    ours, theirs = [[1.0, 1.1], [2.0, 2.1], [1.0, 1.0]], [[2.0, 2.2], [4.0, 4.2], [2.0, 2.0]]
    assert paired_ratios([ours, theirs], 0) == pytest.approx([1.0, 2.0])


def test_rows_filled_when_their_case_is_timed():
    ctx = Context(device=CPU, quick=True, roof_gbps=10.0, progress=lambda msg: None)
    fast = ctx.row("f", "case1", "ours[x]", _sleeper(1.0), [0], 1e6, rates={"items_per_s": 10.0})
    slow = ctx.row("f", "case1", "baseline", _sleeper(3.0), [0], 1e6)
    assert math.isnan(fast.median_ms)
    later = ctx.row("f", "case2", "ours[x]", _sleeper(0.1), [0], 1e6)  # another case: case1 is timed now
    assert fast.ratio == 1.0
    assert 1.5 < slow.ratio < 6.0
    assert fast.extra["items_per_s"] == pytest.approx(10.0 / (fast.median_ms * 1e-3))
    assert "in-cache" in fast.flags  # 1 MB a call, one set
    assert math.isnan(later.median_ms)
    ctx.flush()
    assert later.median_ms > 0
    assert "baseline / ours" in format_table([fast, slow, later])


def test_shared_tensors_do_not_count():
    table = torch.zeros(1 << 20)  # 4 MiB every set indexes into
    sets = input_sets(lambda: (table, torch.zeros(1 << 10)), CPU, shared=table)
    assert len(sets) > 1
