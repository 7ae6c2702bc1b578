"""``python -m bench [--quick] [--only FAMILY ...] [--out DIR]``: run the benchmark suite.

Runs on the best device present (CUDA, else CPU, where the torch/cpu backends are timed against
the naive baselines). Prints one table per family, writes JSON rows (rewritten after every family,
so a run cut short keeps what it measured) and a PNG chart.

Families (one module ``bench/bench_<family>.py`` each, mirroring ``triton_kernels/``):
  multimodal          fused multimodal embed / placeholder scatter (multimodal/scatter.py)
  lora                multi-LoRA add_lora_linear, shrink + expand (lora/)
  mamba               selective scan, batched and packed varlen (mamba/selective_scan.py)
  mamba_state_update  the decode step selective_state_update (mamba/state_update.py)
  mamba_conv          causal_conv1d_fn and causal_conv1d_update (mamba/causal_conv1d.py)
  mamba2              Mamba-2 SSD: prefill batched and packed varlen, forward+backward (mamba2/ssd.py)
  mamba2_decode       the decode step in its Mamba-2 form, with heads (mamba/state_update.py)
  mamba2_norm         the gated RMSNorm ending each Mamba-2 block (mamba2/rms_norm_gated.py)
A new ``bench/bench_<name>.py`` with ``run(ctx)`` is picked up as family ``<name>``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import torch

from bench.harness import (
    RESULTS_DIR,
    Context,
    compare,
    draw_chart,
    environment,
    format_table,
    measure_copy_roof,
    write_results,
)

FAMILIES = tuple(sorted(p.stem.removeprefix("bench_") for p in Path(__file__).parent.glob("bench_*.py")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    parser.add_argument("--only", nargs="+", choices=FAMILIES, metavar="FAMILY",
                        help=f"run only these families: {', '.join(FAMILIES)}")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("IFK_BENCH_OUT", RESULTS_DIR)),
                        help="where JSON and PNG go (default bench/results, or $IFK_BENCH_OUT)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    print(f"device: {env['device']} ({device.type}), torch {env['torch']}, triton {env['triton']}, "
          f"git {env['git_rev']}", flush=True)
    if device.type == "cpu":
        print("no GPU: timing the CPU backends (torch / cpu) against the naive baselines", flush=True)
    roof = measure_copy_roof(device, args.quick)
    print(f"measured copy roof: {roof:.1f} GB/s", flush=True)

    def progress(msg: str) -> None:
        print(f"  .. {msg}", file=sys.stderr, flush=True)

    ctx = Context(device=device, quick=args.quick, roof_gbps=roof, progress=progress)
    rows = []
    path = None
    for family in args.only or FAMILIES:
        module = importlib.import_module(f"bench.bench_{family}")
        family_rows = module.run(ctx)
        compare(family_rows)
        print(f"\n== {family} ==\n{format_table(family_rows)}", flush=True)
        rows.extend(family_rows)
        path = write_results(rows, env, roof, args.out, path)
    chart = draw_chart(rows, env, path.with_suffix(".png"))
    print(f"\nwrote {path}" + (f" and {chart}" if chart else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
