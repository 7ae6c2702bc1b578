"""Timing, roofline and reporting shared by every benchmark family.

A family module (``bench/bench_<family>.py``) exposes ``run(ctx: Context) -> list[Row]``; each
row times one implementation of one case. ``python -m bench`` prints the rows as tables, writes
them as JSON under ``bench/results/`` and draws a PNG chart.

Timing: each call is timed alone (CUDA events on a GPU, ``perf_counter`` on CPU) and a row keeps
the 20th, 50th and 80th percentile. Inputs rotate so caches do not flatter the numbers: a case
builds ``K`` independent input sets (:func:`input_sets`), together about twice the last-level
cache (the GPU's L2, the CPU's L3), and the timed loop cycles through them. The pytest-benchmark
files (``bench/test_bench_*.py``) use the same timing through :data:`CLOCK` and :func:`clocked`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import itertools
import json
import math
import platform
import statistics
import subprocess
import sys
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
MAX_SETS = {"cuda": 256, "cpu": 16}  # CPU: set building costs time in the 2-minute quick run
SETS_BUDGET_BYTES = {"cuda": 16 << 30, "cpu": 2 << 30}  # memory all the sets of one case may take
CPU_LLC_FALLBACK = 32 << 20


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
    roof_gbps: float = 0.0
    baseline_ms: float | None = None  # the row this one is compared against (filled by ``compare``)
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes_moved / (self.median_ms * 1e-3) / 1e9 if self.median_ms > 0 else math.nan

    @property
    def pct_roof(self) -> float:
        return 100.0 * self.gbps / self.roof_gbps if self.roof_gbps else 0.0

    @property
    def tflops(self) -> float:
        return self.flops / (self.median_ms * 1e-3) / 1e12 if self.median_ms > 0 else 0.0


@dataclasses.dataclass
class Context:
    device: torch.device
    quick: bool
    roof_gbps: float
    progress: Callable[[str], None]

    def input_sets(self, make: Callable[[], Any]) -> list[Any]:
        """``make()`` called as often as :func:`input_sets` says (about 2 LLCs of inputs)."""
        return input_sets(make, self.device)

    def row(self, family: str, case: str, impl: str, fn: Callable[[Any], object], sets: Sequence[Any],
            bytes_moved: float, flops: float = 0.0, **extra) -> Row:
        """Time ``fn(inputs)`` cycling through ``sets``; a failure is recorded in the row (NaN times,
        ``extra["error"]``), not raised, so one broken implementation does not cost a whole run on a
        lent GPU."""
        self.progress(f"{family} {case} {impl}")
        extra = {**extra, "input_sets": len(sets)}
        rep_ms = 30.0 if self.quick else 150.0
        try:
            warm_up(fn, sets, self.device, rep_ms)
            p20, p50, p80 = percentiles_ms(sample_times_ms(cycling(fn, sets), self.device, rep_ms=rep_ms))
        except Exception as exc:  # report and go on: the error lands in the table and the JSON
            return self._failed(family, case, impl, exc, bytes_moved, extra)
        return Row(family, case, impl, p50, p20, p80, bytes_moved, flops, self.roof_gbps, extra=extra)

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


def input_sets(make: Callable[[], Any], device: torch.device) -> list[Any]:
    """``K`` independent results of ``make()``: enough that together they span ``ROTATE_FACTOR``
    last-level caches, at most ``MAX_SETS`` and ``SETS_BUDGET_BYTES`` in all (at least one)."""
    first = make()
    size = max(tensor_bytes(first), 1)
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


def sample_times_ms(fn: Callable[[], object], device: torch.device, *, rep_ms: float = 150.0,
                    min_reps: int = 5, max_reps: int = 1000) -> list[float]:
    """Per-call times of ``fn`` (after one warm-up call) for about ``rep_ms`` of calls."""
    fn()
    _sync(device)
    times = [time_call_ms(fn, device)]
    reps = int(min(max_reps, max(min_reps, rep_ms / max(times[0], 1e-3))))
    times += [time_call_ms(fn, device) for _ in range(reps - 1)]
    return times


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


def measure_copy_roof(device: torch.device, quick: bool = False) -> float:
    """GB/s of a large device-to-device copy (read + write bytes): the bandwidth roof."""
    numel = (1 << 28 if device.type == "cuda" else 1 << 25) // (2 if quick else 1)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = sample_times_ms(lambda: dst.copy_(src), device, rep_ms=100.0 if not quick else 30.0)
    return 2 * src.numel() * src.element_size() / (statistics.median(times) * 1e-3) / 1e9


def compare(rows: Sequence[Row], ours_prefix: str = "ours") -> None:
    """Give every row of a case the time of that case's best 'ours' row as the comparison point."""
    by_case: dict[str, list[Row]] = {}
    for row in rows:
        by_case.setdefault(row.case, []).append(row)
    for case_rows in by_case.values():
        ours = [r.median_ms for r in case_rows if r.impl.startswith(ours_prefix) and not math.isnan(r.median_ms)]
        for row in case_rows:
            row.baseline_ms = min(ours) if ours else None


def format_table(rows: Sequence[Row]) -> str:
    """One text table: p20/p50/p80 times in ms, GB/s and %roof at the median, and t/ours, how many
    times slower the row's median is than our best median for the case."""
    header = (f"{'case':<46} {'impl':<30} {'p20 ms':>10} {'p50 ms':>10} {'p80 ms':>10} {'GB/s':>9} {'%roof':>6} "
              f"{'TFLOP/s':>8} {'t/ours':>7}")
    lines = [header, "-" * len(header)]
    for r in rows:
        speed = f"{r.median_ms / r.baseline_ms:7.2f}" if r.baseline_ms else "      -"
        tf = f"{r.tflops:8.2f}" if r.flops else "       -"
        lines.append(
            f"{r.case:<46} {r.impl:<30} {r.p20_ms:10.4f} {r.median_ms:10.4f} {r.p80_ms:10.4f} {r.gbps:9.1f} "
            f"{r.pct_roof:6.1f} {tf} {speed}"
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
    """Device, versions and git revision, written beside every result."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=False).stdout.strip() or None
    except OSError:
        rev = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    libraries = {}
    for dist in ("transformers", "peft", "kernels", "einops", "numpy"):  # what the baselines and integrations run
        try:
            libraries[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            libraries[dist] = None
    return {
        "device": name,
        "device_type": device.type,
        "cpu_count": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        **libraries,
        "git_rev": rev,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_results(rows: Sequence[Row], env: dict, roof_gbps: float, out_dir: Path, path: Path | None = None) -> Path:
    """JSON rows with the environment, to ``path`` (rewritten) or a new file; returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if env["device_type"] == "cuda" else "cpu"
    stamp = env["date"].replace("-", "").replace(":", "")
    path = path or out_dir / f"bench-{tag}-{env['git_rev'] or 'norev'}-{stamp}.json"
    payload = {
        "environment": env,
        "copy_roof_gbps": roof_gbps,
        "rows": [
            {**dataclasses.asdict(r), "gbps": r.gbps, "pct_roof": r.pct_roof, "tflops": r.tflops,
             "slowdown_vs_ours": (r.median_ms / r.baseline_ms) if r.baseline_ms else None}
            for r in rows
        ],
    }
    path.write_text(json.dumps(payload, indent=1))
    return path


def draw_chart(rows: Sequence[Row], env: dict, path: Path) -> Path | None:
    """Bar chart of the median time per implementation with p20-p80 whiskers, one panel per case;
    None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cases = list(dict.fromkeys(r.case for r in rows))
    cols = min(4, len(cases)) or 1
    nrows = (len(cases) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, case in zip(axes.flat, cases):
        case_rows = [r for r in rows if r.case == case]
        spread = [[r.median_ms - r.p20_ms for r in case_rows], [r.p80_ms - r.median_ms for r in case_rows]]
        ax.barh([r.impl for r in case_rows], [r.median_ms for r in case_rows], xerr=spread, capsize=2,
                color=["tab:green" if r.impl.startswith("ours") else "tab:gray" for r in case_rows])
        ax.set_title(f"{case_rows[0].family}: {case}", fontsize=8)
        ax.set_xlabel("median ms, p20-p80 whiskers (lower is better)", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.suptitle(f"{env['device']} - torch {env['torch']} - triton {env['triton']} - {env['git_rev']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
