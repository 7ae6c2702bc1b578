"""Timing, roofline and reporting shared by every benchmark family.

A family module (``bench/bench_<family>.py``) exposes ``run(ctx: Context) -> list[Row]``; each
row times one implementation of one case. ``python -m bench`` prints the rows as tables, writes
them as JSON under ``bench/results/`` and draws a PNG chart.

Timing: the implementations of one case are timed together, in alternating rounds (A B C, C B A,
A B C, ...; :func:`sample_rounds`), each call alone (CUDA events on a GPU, ``perf_counter`` on
CPU). A row keeps the 20th, 50th and 80th percentile of its own calls, and its ratio to ours is
the median over rounds of the two medians within a round (:func:`paired_ratios`), so load that
comes and goes during a run slows both sides of a ratio alike. Inputs rotate so caches do not
flatter the numbers: a case builds ``K`` independent input sets (:func:`input_sets`), together
about twice the last-level cache (the GPU's L2, the CPU's L3), and the timed loop cycles through
them. The pytest-benchmark files (``bench/test_bench_*.py``) use the same per-call timing through
:data:`CLOCK` and :func:`clocked`.

Load: every row records the 1-minute load average and a copy probe (:class:`CopyProbe`) taken
around its case, beside the roof the same copy reached at startup; rows whose probe fell below
``LOADED_FRACTION`` of that roof are flagged ``loaded``, rows whose load average exceeded the core
count (other processes competing with the bench's threads; also at startup, which the probe cannot
see) ``busy``. Rows whose input sets together move less than the last-level cache holds are flagged
``in-cache``: their GB/s is a cache bandwidth, and %roof may pass 100 (see :class:`CopyProbe`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from triton_kernels import use_backend
from triton_kernels._csrc import ExtensionBuildError
from triton_kernels.backend import BackendUnavailableError, Op

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROTATE_FACTOR = 2  # the input sets of a case together span this many last-level caches
# Enough sets for small inputs to span ROTATE_FACTOR LLCs (256 sets of 256 KiB on a 32 MiB L3). The sets'
# bytes, not their count, cost the building time, and those are about ROTATE_FACTOR LLCs either way.
MAX_SETS = {"cuda": 256, "cpu": 256}
SETS_BUDGET_BYTES = {"cuda": 16 << 30, "cpu": 2 << 30}  # memory all the sets of one case may take
CPU_LLC_FALLBACK = 32 << 20
ROUNDS = 10  # rounds of a case when its calls are fast enough: each call gets rep_ms / ROUNDS per round
MIN_ROUNDS = 5  # rounds even when the slowest call takes longer than rep_ms
MAX_CALLS = 1000  # timed calls of one implementation in a case, at most
LOADED_FRACTION = 0.7  # a row whose copy probe fell below this share of the startup roof is flagged "loaded"


@dataclasses.dataclass
class Row:
    family: str
    case: str  # a readable shape, e.g. "T16384-H4096-bf16-8items"
    impl: str  # "ours[triton]", "vllm masked_scatter", ...
    median_ms: float
    p20_ms: float
    p80_ms: float
    bytes_moved: float  # bytes the op must move at least, by formula
    flops: float = 0.0
    roof_gbps: float = 0.0  # the copy roof measured at startup (the machine's idle value)
    balance: float = 0.0  # the machine's FLOP per byte: matmul roof / copy roof, both measured at startup
    ratio: float | None = None  # baseline / ours: this row's time over our best's, paired by round; > 1: ours faster
    probe_gbps: float = math.nan  # the copy probe around this row's case (the lower of one before, one after)
    load_1min: float = math.nan  # os.getloadavg()[0] when the case started
    flags: list[str] = dataclasses.field(default_factory=list)  # "loaded", "busy", "in-cache"
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes_moved / (self.median_ms * 1e-3) / 1e9 if self.median_ms > 0 else math.nan

    @property
    def pct_roof(self) -> float:
        return 100.0 * self.gbps / self.roof_gbps if self.roof_gbps else 0.0

    @property
    def compute_bound(self) -> bool:
        """Declared FLOPs per byte above the machine balance: TFLOP/s, not GB/s, says how close it runs."""
        return bool(self.flops and self.balance and self.flops / self.bytes_moved > self.balance)

    @property
    def tflops(self) -> float:
        return self.flops / (self.median_ms * 1e-3) / 1e12 if self.median_ms > 0 else 0.0


@dataclasses.dataclass
class _Pending:
    """One registered implementation of the case being gathered, timed at :meth:`Context.flush`."""

    row: Row
    fn: Callable[[Any], object]
    sets: Sequence[Any]
    rates: dict[str, float]
    peak_memory: bool


@dataclasses.dataclass
class Context:
    device: torch.device
    quick: bool
    roof_gbps: float
    progress: Callable[[str], None]
    probe: CopyProbe | None = None  # the startup copy, measured again around every case
    balance: float = 0.0  # FLOP per byte (:func:`measure_matmul_roof` / ``roof_gbps``)
    _pending: list[_Pending] = dataclasses.field(default_factory=list, repr=False)

    def input_sets(self, make: Callable[[], Any], shared: Any = None) -> list[Any]:
        """``make()`` called as often as :func:`input_sets` says (about 2 LLCs of inputs)."""
        return input_sets(make, self.device, shared)

    def row(self, family: str, case: str, impl: str, fn: Callable[[Any], object], sets: Sequence[Any],
            bytes_moved: float, flops: float = 0.0, *, rates: dict[str, float] | None = None,
            peak_memory: bool = False, **extra) -> Row:
        """Register ``fn(inputs)``, cycling through ``sets``, as one implementation of ``case``; returns
        its row, whose times are filled in when the case is timed: at the first row of another case or
        at :meth:`flush` (so the rows of a case are registered one after another). Then ``rates``
        (name -> amount per call) become ``extra[name]`` = amount per second, and with ``peak_memory``
        on CUDA ``extra["peak_mib"]`` is what one call allocates at its peak above its inputs. A failure
        is recorded in the row (NaN times, ``extra["error"]``), not raised, so one broken implementation
        does not cost a whole run on a lent GPU."""
        if self._pending and (self._pending[0].row.family, self._pending[0].row.case) != (family, case):
            self.flush()
        self.progress(f"{family} {case} {impl}")
        row = Row(family, case, impl, math.nan, math.nan, math.nan, bytes_moved, flops, self.roof_gbps, self.balance,
                  extra={**extra, "input_sets": len(sets)})
        self._pending.append(_Pending(row, fn, sets, rates or {}, peak_memory))
        return row

    def flush(self) -> None:
        """Time the rows of the case registered so far, interleaved (:func:`sample_rounds`), between two
        copy probes; fill in their times, ratios (:func:`paired_ratios` against the fastest ours row),
        load, probe and flags."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        load = os.getloadavg()[0]
        before = self.probe.gbps() if self.probe else math.nan
        rep_ms = 30.0 if self.quick else 150.0
        results = sample_rounds([(p.fn, p.sets) for p in pending], self.device, rep_ms)
        probe = min(before, self.probe.gbps()) if self.probe else math.nan
        llc = last_level_cache_bytes(self.device)
        for p, result in zip(pending, results):
            row = p.row
            row.load_1min, row.probe_gbps = load, probe
            row.flags += ["loaded"] * (probe < LOADED_FRACTION * self.roof_gbps)
            row.flags += ["busy"] * (load > (os.cpu_count() or 1) + 0.5)
            row.flags += ["in-cache"] * (len(p.sets) * row.bytes_moved < llc)  # one cycle of the sets moves this
            if isinstance(result, Exception):
                self.progress(f"FAILED {row.family} {row.case} {row.impl}: {type(result).__name__}: {result}")
                row.extra["error"] = f"{type(result).__name__}: {result}"
                continue
            row.p20_ms, row.median_ms, row.p80_ms = percentiles_ms([t for burst in result for t in burst])
            row.extra.update({name: amount / (row.median_ms * 1e-3) for name, amount in p.rates.items()})
            if p.peak_memory and self.device.type == "cuda":
                row.extra["peak_mib"] = peak_mib(self.device, p.fn, p.sets[0])
        ours = [i for i, p in enumerate(pending) if p.row.impl.startswith("ours") and not math.isnan(p.row.median_ms)]
        if ours:
            best = min(ours, key=lambda i: pending[i].row.median_ms)
            for p, ratio in zip(pending, paired_ratios(results, best)):
                p.row.ratio = ratio

    def our_backends(self, op: Op, dtypes: Sequence[torch.dtype]) -> list[str]:
        """The backends of ``op`` worth timing here, each the one :meth:`Op.resolve` says actually runs
        when forced; the automatic choice first. On a GPU the torch reference is left to the baselines."""
        auto = op.resolve(self.device, dtypes)
        names = [auto]
        for backend in op.backends:
            if backend in names or (backend == "torch" and self.device.type == "cuda"):
                continue
            try:
                with use_backend(backend):
                    if op.resolve(self.device, dtypes) == backend:
                        names.append(backend)
            except (BackendUnavailableError, ExtensionBuildError) as exc:
                self.progress(f"skip {op.name}[{backend}]: {exc}")
        self.progress(f"{op.name} on {self.device.type}: {auto} runs by default; timing {', '.join(names)}")
        return names


    def ours_rows(self, family: str, case: str, op: Op, dtypes: Sequence[torch.dtype], fn: Callable[[Any], object],
                  sets: Sequence[Any], bytes_moved: float, *, label: str = "", graphs: bool = False) -> list[Row]:
        """A row ``ours[<backend>]<label>`` of ``fn`` under each of :meth:`our_backends`; with ``graphs``
        on a GPU, each also timed as CUDA-graph replays (one graph per input set)."""
        rows = []
        for backend in self.our_backends(op, dtypes):
            def call(inputs, backend=backend):
                with use_backend(backend):
                    return fn(inputs)

            impl = f"ours[{backend}]{label}"
            rows.append(self.row(family, case, impl, call, sets, bytes_moved))
            if graphs and self.device.type == "cuda":
                rows.append(self._graph_row(family, case, f"{impl} cuda-graph", call, sets, bytes_moved))
        return rows

    def _graph_row(self, family: str, case: str, impl: str, fn: Callable[[Any], object], sets: Sequence[Any],
                   bytes_moved: float) -> Row:
        try:
            replays = [graphed(functools.partial(fn, inputs)) for inputs in sets]
        except Exception as exc:  # a failed capture is a row with its error, as a failed run
            return self._failed(family, case, impl, exc, bytes_moved, {})
        return self.row(family, case, impl, lambda replay: replay(), replays, bytes_moved)

    def _failed(self, family: str, case: str, impl: str, exc: Exception, bytes_moved: float, extra: dict) -> Row:
        self.progress(f"FAILED {family} {case} {impl}: {type(exc).__name__}: {exc}")
        extra = {**extra, "error": f"{type(exc).__name__}: {exc}"}
        return Row(family, case, impl, math.nan, math.nan, math.nan, bytes_moved, 0.0, self.roof_gbps, extra=extra)


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured once in a CUDA graph (after a warm-up call); the result replays it."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes(device: torch.device) -> int:
    """The GPU's L2 or the CPU's largest cache (sysfs), the cache rotation must defeat."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=CPU_LLC_FALLBACK)


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` (containers, object attributes)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not callable(obj):
        return tensor_bytes(vars(obj), seen)
    return 0


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    return [t for v in obj for t in _tensors(v)] if isinstance(obj, (list, tuple)) else []


def input_sets(make: Callable[[], Any], device: torch.device, shared: Any = None) -> list[Any]:
    """``K`` independent results of ``make()``: enough that together they span ``ROTATE_FACTOR``
    last-level caches, at most ``MAX_SETS`` and ``SETS_BUDGET_BYTES`` in all (at least one). Tensors
    in ``shared`` (a table every set indexes into) do not count in a set's size."""
    first = make()
    size = max(tensor_bytes(first, {t.untyped_storage().data_ptr() for t in _tensors(shared)}), 1)
    want = math.ceil(ROTATE_FACTOR * last_level_cache_bytes(device) / size)
    count = max(1, min(want, MAX_SETS[device.type], SETS_BUDGET_BYTES[device.type] // size))
    return [first] + [make() for _ in range(count - 1)]


def warm_up(fn: Callable[[Any], object], sets: Sequence[Any], device: torch.device, budget_ms: float) -> None:
    """Run ``fn`` on the first set, then on every other set if that fits in ``budget_ms``: first-call
    work per set (an index check, a cache fill) then stays out of the samples, unless the op is
    slow enough for it not to matter."""
    first_ms = time_call_ms(functools.partial(fn, sets[0]), device)
    if first_ms * len(sets) <= budget_ms:
        for inputs in sets[1:]:
            fn(inputs)


def cycling(fn: Callable[[Any], object], sets: Sequence[Any]) -> Callable[[], object]:
    """A no-argument callable that runs ``fn`` on the next input set each call."""
    order = itertools.cycle(sets)
    return lambda: fn(next(order))


def time_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """One call of ``fn`` in ms: CUDA events around it on a GPU, ``perf_counter`` on CPU."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


Rounds = list[list[float]]  # per round, the per-call times (ms) of one implementation's burst


def sample_rounds(impls: Sequence[tuple[Callable[[Any], object], Sequence[Any]]], device: torch.device,
                  rep_ms: float) -> list[Rounds | Exception]:
    """Per-call times of each ``(fn, sets)``, ``fn`` cycling through its sets, taken in rounds: each
    round runs every implementation in turn, the order reversed every other round (A B C, C B A, ...),
    for a burst of about ``rep_ms / ROUNDS`` ms, so the implementations of one round see the machine
    in the same state. ``ROUNDS`` rounds, or fewer (at least ``MIN_ROUNDS``) where the slowest call
    takes more than ``rep_ms / ROUNDS``; each implementation is warmed up first (:func:`warm_up`) and
    its burst sized from one more timed call. An implementation that raises gets its exception in
    place of its rounds and sits out the later rounds."""
    results: list[Rounds | Exception] = []
    calls, first_ms = {}, {}
    for i, (fn, sets) in enumerate(impls):
        results.append([])
        try:
            warm_up(fn, sets, device, rep_ms)
            calls[i] = cycling(fn, sets)
            first_ms[i] = max(time_call_ms(calls[i], device), 1e-3)
        except Exception as exc:  # the error lands in the row, the other implementations go on
            results[i] = exc
    if not calls:
        return results
    rounds = max(MIN_ROUNDS, min(ROUNDS, int(rep_ms / max(first_ms.values()))))
    bursts = {i: max(1, min(MAX_CALLS // rounds, round(rep_ms / rounds / ms))) for i, ms in first_ms.items()}
    order = list(calls)
    for r in range(rounds):
        for i in order if r % 2 == 0 else reversed(order):
            if i in calls:
                try:
                    results[i].append([time_call_ms(calls[i], device) for _ in range(bursts[i])])
                except Exception as exc:
                    results[i] = exc
                    del calls[i]
    return results


def paired_ratios(results: Sequence[Rounds | Exception], ref: int) -> list[float | None]:
    """Each implementation's time relative to ``results[ref]``: the median over rounds of (its median
    in a round / the reference's median in the same round). None where either side failed."""
    base = results[ref]
    ratios = []
    for result in results:
        if isinstance(result, Exception) or isinstance(base, Exception):
            ratios.append(None)
            continue
        ratios.append(statistics.median(statistics.median(mine) / statistics.median(theirs)
                                        for mine, theirs in zip(result, base)))
    return ratios


def percentiles_ms(times: Sequence[float]) -> tuple[float, float, float]:
    """(p20, p50, p80) of ``times``."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return deciles[1], statistics.median(times), deciles[7]


class HarnessClock:
    """A clock for pytest-benchmark (``@pytest.mark.benchmark(timer=CLOCK)``) that advances only by
    the harness's measurement of each :func:`clocked` call, so pytest-benchmark's statistics are
    built from CUDA-event (GPU) or ``perf_counter`` (CPU) times of the call alone."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self) -> float:
        return self.seconds


CLOCK = HarnessClock()


def clocked(fn: Callable[[Any], object], sets: Sequence[Any], device: torch.device) -> Callable[[], None]:
    """A ``benchmark.pedantic`` target: each call times ``fn`` on the next input set and advances
    :data:`CLOCK` by that time. Warms up first (:func:`warm_up`)."""
    warm_up(fn, sets, device, budget_ms=1000.0)
    call = cycling(fn, sets)

    def target() -> None:
        CLOCK.seconds += time_call_ms(call, device) * 1e-3

    return target


def peak_mib(device: torch.device, fn: Callable[[Any], object], inputs: Any) -> float:
    """MiB one call of ``fn(inputs)`` allocates at its peak above what was allocated before (CUDA)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(inputs)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


class CopyProbe:
    """A device-to-device copy of one fp32 buffer far larger than the last-level cache (CUDA 1 GiB,
    CPU 128 MiB; half that with ``quick``), in GB/s of the bytes read plus the bytes written.

    This is the bandwidth roof of %roof, measured once at startup (:meth:`roof`) and again around
    every case (:meth:`gbps`). Two reasons a row can pass 100 % of it: its data fit in the cache (the
    row is flagged ``in-cache``; :data:`MAX_SETS` is sized so that rotating input sets rarely allow
    it), or, on a CPU, the op mostly reads: the copy's stores first read their destination lines
    (write-allocate), traffic the read + write count leaves out, so a read-mostly op can reach about
    1.5x the copy. A roof measured on a busy machine is low too, which is why :meth:`roof` keeps the
    fastest copy."""

    def __init__(self, device: torch.device, quick: bool = False) -> None:
        numel = (1 << 28 if device.type == "cuda" else 1 << 25) // (2 if quick else 1)
        self.device = device
        self.src = torch.randn(numel, device=device)
        self.dst = torch.empty_like(self.src)

    def _copy_ms(self, copies: int) -> list[float]:
        self.dst.copy_(self.src)  # untimed: first touch of the destination
        return [time_call_ms(lambda: self.dst.copy_(self.src), self.device) for _ in range(copies)]

    def _gbps(self, ms: float) -> float:
        return 2 * self.src.numel() * self.src.element_size() / (ms * 1e-3) / 1e9

    def roof(self, copies: int = 20) -> float:
        """GB/s of the fastest of ``copies`` copies: what the machine reaches (load only slows a copy)."""
        return self._gbps(min(self._copy_ms(copies)))

    def gbps(self, copies: int = 3) -> float:
        """GB/s of the median of ``copies`` copies: what the machine gives right now."""
        return self._gbps(statistics.median(self._copy_ms(copies)))


def measure_matmul_roof(device: torch.device, calls: int = 3) -> float:
    """FLOP/s of the fastest of ``calls`` square matmuls (after one untimed): bf16 8192^3 on CUDA,
    fp32 1024^3 on CPU, the dtypes the families time. Cheap on purpose: with the copy roof it gives
    the machine balance (FLOP per byte) that decides which rows are compute-bound."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    a @ a
    return 2 * n**3 / (min(time_call_ms(lambda: a @ a, device) for _ in range(calls)) * 1e-3)


RATIO_NOTE = ("ratio = baseline / ours (> 1: ours faster): the row's time over our fastest row's, the median over "
              "interleaved rounds of the ratio within a round")


def format_table(rows: Sequence[Row]) -> str:
    """One text table: p20/p50/p80 times in ms, GB/s and %roof (of the startup copy roof) at the
    median, TFLOP/s for compute-bound rows only, the paired ratio to ours (:data:`RATIO_NOTE`), the
    load average and copy probe of the row's case (the probe as % of the startup roof) and its flags."""
    first = rows[0] if rows else Row("", "", "", 0, 0, 0, 0)
    notes = [RATIO_NOTE,
             f"load = 1-min load average; probe = copy roof around the case, % of the startup roof "
             f"({first.roof_gbps:.1f} GB/s); flags: loaded = probe below {LOADED_FRACTION:.0%}, busy = load above the "
             f"core count, in-cache = the input sets fit in the last-level cache; TFLOP/s only where FLOP/byte > the "
             f"machine balance ({first.balance:.1f})"]
    header = (f"{'case':<46} {'impl':<30} {'p20 ms':>10} {'p50 ms':>10} {'p80 ms':>10} {'GB/s':>9} {'%roof':>6} "
              f"{'TFLOP/s':>8} {'ratio':>7} {'load':>5} {'probe':>6}  flags")
    lines = [*notes, header, "-" * len(header)]
    for r in rows:
        ratio = f"{r.ratio:7.2f}" if r.ratio is not None else "      -"
        tf = f"{r.tflops:8.2f}" if r.compute_bound else "       -"
        probe = 100.0 * r.probe_gbps / r.roof_gbps if r.roof_gbps else math.nan
        lines.append(
            f"{r.case:<46} {r.impl:<30} {r.p20_ms:10.4f} {r.median_ms:10.4f} {r.p80_ms:10.4f} {r.gbps:9.1f} "
            f"{r.pct_roof:6.1f} {tf} {ratio} {r.load_1min:5.2f} {probe:5.0f}%  {','.join(r.flags)}"
        )
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def environment(device: torch.device) -> dict:
    """Device, versions of everything a row runs (torch, triton, CUDA, the C++ compiler that builds the
    ``cpu`` backend, the baselines' and integrations' packages) and the git revision, written beside
    every result."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    libraries = {}
    for dist in ("transformers", "peft", "kernels", "einops", "numpy", "mamba_ssm", "causal_conv1d"):
        try:
            libraries[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            libraries[dist] = None
    return {
        "device": name,
        "device_type": device.type,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "cxx": _first_line([os.environ.get("CXX", "c++"), "--version"]),
        **libraries,
        "git_rev": _first_line(["git", "rev-parse", "--short", "HEAD"]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _first_line(command: list[str]) -> str | None:
    try:
        out = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent, check=False).stdout
    except OSError:
        return None
    return out.strip().split("\n", 1)[0] or None


def write_results(rows: Sequence[Row], env: dict, machine: dict, out_dir: Path, path: Path | None = None) -> Path:
    """JSON rows with the environment and the ``machine`` measurements (roofs, startup load), to
    ``path`` (rewritten) or a new file; returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if env["device_type"] == "cuda" else "cpu"
    stamp = env["date"].replace("-", "").replace(":", "")
    path = path or out_dir / f"bench-{tag}-{env['git_rev'] or 'norev'}-{stamp}.json"
    payload = {
        "environment": env,
        **machine,
        "ratio": RATIO_NOTE,
        "loaded_fraction": LOADED_FRACTION,
        "rows": [
            {**dataclasses.asdict(r), "gbps": r.gbps, "pct_roof": r.pct_roof, "compute_bound": r.compute_bound,
             "tflops": r.tflops}
            for r in rows
        ],
    }
    path.write_text(json.dumps(payload, indent=1))
    return path


def draw_chart(rows: Sequence[Row], env: dict, path: Path) -> Path | None:
    """Bar chart of the median time per implementation with p20-p80 whiskers and the ratio to ours past
    each whisker, one panel per case (log scale where a case spans more than 20x); names wrapped so that
    no label runs into the next panel. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = list(dict.fromkeys(r.case for r in rows))
    cols = min(3, len(cases)) or 1
    nrows = (len(cases) + cols - 1) // cols
    tallest = max((sum(r.case == c for r in rows) for c in cases), default=1)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.6 * cols, (0.55 * tallest + 1.3) * nrows), squeeze=False,
                             layout="constrained")
    for ax, case in zip(axes.flat, cases):
        case_rows = [r for r in rows if r.case == case]
        medians = [r.median_ms for r in case_rows]
        spread = [[r.median_ms - r.p20_ms for r in case_rows], [r.p80_ms - r.median_ms for r in case_rows]]
        labels = [textwrap.fill(r.impl + (" *" if r.flags else ""), 24) for r in case_rows]
        ax.barh(labels, medians, xerr=spread, capsize=2,
                color=["tab:green" if r.impl.startswith("ours") else "tab:gray" for r in case_rows])
        for y, r in enumerate(case_rows):  # the ratio right of the whisker
            if r.ratio is not None and math.isfinite(r.p80_ms):
                ax.annotate(f"{r.ratio:.2f}x", (r.p80_ms, y), xytext=(4, 0), textcoords="offset points",
                            va="center", fontsize=6)
        finite = [m for m in medians if m > 0 and math.isfinite(m)]
        if finite and max(finite) > 20 * min(finite):
            ax.set_xscale("log")
        ax.margins(x=0.15)
        ax.set_title(textwrap.fill(f"{case_rows[0].family}: {case}", 44, break_on_hyphens=False), fontsize=7)
        ax.set_xlabel("median ms, p20-p80 (lower is better); at the bar: baseline / ours", fontsize=6)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.suptitle(f"{env['device']} - torch {env['torch']} - triton {env['triton']} - {env['git_rev']}  "
                 "(* flagged: loaded or in-cache, see the JSON)", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
