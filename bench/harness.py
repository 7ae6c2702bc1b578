"""Timing, roofline and reporting shared by every benchmark family.

A family module (``bench/bench_<family>.py``) exposes ``run(ctx: Context) -> list[Row]``; each
row times one implementation of one case. ``python -m bench`` prints the rows as tables, writes
them as JSON under ``bench/results/`` and draws a PNG chart.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Row:
    family: str
    case: str  # a readable shape, e.g. "T16384-H4096-bf16-8items"
    impl: str  # "ours[triton]", "vllm masked_scatter", ...
    median_ms: float
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

    def time(self, fn: Callable[[], object], *, rep_ms: float | None = None) -> float:
        return median_time_ms(fn, self.device, rep_ms=rep_ms or (30.0 if self.quick else 150.0))

    def row(self, family: str, case: str, impl: str, fn: Callable[[], object], bytes_moved: float,
            flops: float = 0.0, **extra) -> Row:
        """Time ``fn``; a failure is recorded in the row (NaN time, ``extra["error"]``), not raised,
        so one broken implementation does not cost a whole run on a lent GPU."""
        self.progress(f"{family} {case} {impl}")
        try:
            ms = self.time(fn)
        except Exception as exc:  # report and go on: the error lands in the table and the JSON
            self.progress(f"FAILED {family} {case} {impl}: {type(exc).__name__}: {exc}")
            ms, extra = math.nan, {**extra, "error": f"{type(exc).__name__}: {exc}"}
        return Row(family, case, impl, ms, bytes_moved, flops, self.roof_gbps, extra=extra)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_ms(fn: Callable[[], object], device: torch.device, *, rep_ms: float = 150.0,
                   min_reps: int = 5, max_reps: int = 1000) -> float:
    """Median wall time of ``fn`` in ms: CUDA events on a GPU (L2 flushed between runs),
    perf_counter on CPU. ``fn`` should rotate its own inputs when caches could flatter it."""
    fn()
    _sync(device)
    if device.type == "cuda":
        flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        est = max(time.perf_counter() - start, 1e-6) * 1e3
        reps = int(min(max_reps, max(min_reps, rep_ms / est)))
        times = []
        for _ in range(reps):
            flush.zero_()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        return statistics.median(times)
    times = []
    deadline = time.perf_counter() + rep_ms * 1e-3
    while len(times) < min_reps or (time.perf_counter() < deadline and len(times) < max_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_copy_roof(device: torch.device, quick: bool = False) -> float:
    """GB/s of a large device-to-device copy (read + write bytes): the bandwidth roof."""
    numel = (1 << 28 if device.type == "cuda" else 1 << 25) // (2 if quick else 1)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = median_time_ms(lambda: dst.copy_(src), device, rep_ms=100.0 if not quick else 30.0)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


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
    """One text table: speedup is how many times slower the row is than our best for the case."""
    header = f"{'case':<38} {'impl':<30} {'ms':>10} {'GB/s':>9} {'%roof':>6} {'TFLOP/s':>8} {'t/ours':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        speed = f"{r.median_ms / r.baseline_ms:7.2f}" if r.baseline_ms else "      -"
        tf = f"{r.tflops:8.2f}" if r.flops else "       -"
        lines.append(
            f"{r.case:<38} {r.impl:<30} {r.median_ms:10.4f} {r.gbps:9.1f} {r.pct_roof:6.1f} {tf} {speed}"
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
    return {
        "device": name,
        "device_type": device.type,
        "cpu_count": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "git_rev": rev,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_results(rows: Sequence[Row], env: dict, roof_gbps: float, out_dir: Path) -> Path:
    """JSON rows with the environment; returns the file path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if env["device_type"] == "cuda" else "cpu"
    stamp = env["date"].replace("-", "").replace(":", "")
    path = out_dir / f"bench-{tag}-{env['git_rev'] or 'norev'}-{stamp}.json"
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
    """Bar chart of median time per implementation, one panel per case; None without matplotlib."""
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
        ax.barh([r.impl for r in case_rows], [r.median_ms for r in case_rows],
                color=["tab:green" if r.impl.startswith("ours") else "tab:gray" for r in case_rows])
        ax.set_title(f"{case_rows[0].family}: {case}", fontsize=8)
        ax.set_xlabel("median ms (lower is better)", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.suptitle(f"{env['device']} - torch {env['torch']} - triton {env['triton']} - {env['git_rev']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
