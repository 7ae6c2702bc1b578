"""``python -m bench [--quick] [--only FAMILY ...] [--threads N] [--out DIR]``: run the benchmark suite.

Runs on the best device present (CUDA, else CPU, where the torch/cpu backends are timed against
the naive baselines). Prints one table per family, writes JSON rows (rewritten after every family,
so a run cut short keeps what it measured) and a PNG chart. The implementations of a case are timed
in alternating rounds; each ratio (baseline / ours, > 1: ours faster) pairs times from the same round,
and each row carries the load average and a copy probe of the machine while it ran (bench/harness.py).

On CPU the suite runs torch single-threaded unless --threads says otherwise: with two or more threads,
every parallel region of an op waits for its slowest thread, and on a machine where another process
holds a core that is a scheduler time slice per region, so an op made of many small parallel ops
slows by 10x or more while one made of a few large ones slows 2x, and load flips ratios (measured on
the 2-core CI machine under load: SSD forward 23 ms single-threaded, 230-900 ms with 2 threads). One
thread slows in proportion to the share of a core it gets, which the interleaved pairs cancel.

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
    CopyProbe,
    draw_chart,
    environment,
    format_table,
    measure_matmul_roof,
    write_results,
)

FAMILIES = tuple(sorted(p.stem.removeprefix("bench_") for p in Path(__file__).parent.glob("bench_*.py")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    parser.add_argument("--only", nargs="+", choices=FAMILIES, metavar="FAMILY",
                        help=f"run only these families: {', '.join(FAMILIES)}")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="CPU only: torch (and OpenMP) threads, 0 for torch's default (default 1: see below)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("IFK_BENCH_OUT", RESULTS_DIR)),
                        help="where JSON and PNG go (default bench/results, or $IFK_BENCH_OUT)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    env = environment(device)
    print(f"device: {env['device']} ({device.type}), torch {env['torch']}, triton {env['triton']}, "
          f"git {env['git_rev']}", flush=True)
    if device.type == "cpu":
        print(f"no GPU: timing the CPU backends (torch / cpu) against the naive baselines, "
              f"{torch.get_num_threads()} thread(s)", flush=True)
    probe = CopyProbe(device, args.quick)
    roof, flops = probe.roof(), measure_matmul_roof(device)
    machine = {"copy_roof_gbps": roof, "matmul_roof_tflops": flops / 1e12,
               "balance_flop_per_byte": flops / (roof * 1e9), "startup_load_1min": os.getloadavg()[0]}
    print(f"measured copy roof: {roof:.1f} GB/s, matmul roof: {flops / 1e12:.2f} TFLOP/s, balance: "
          f"{machine['balance_flop_per_byte']:.1f} FLOP/byte; load average {machine['startup_load_1min']:.2f}",
          flush=True)

    def progress(msg: str) -> None:
        print(f"  .. {msg}", file=sys.stderr, flush=True)

    ctx = Context(device=device, quick=args.quick, roof_gbps=roof, progress=progress, probe=probe,
                  balance=machine["balance_flop_per_byte"])
    rows = []
    path = None
    for family in args.only or FAMILIES:
        module = importlib.import_module(f"bench.bench_{family}")
        family_rows = module.run(ctx)
        ctx.flush()  # the family's last case
        print(f"\n== {family} ==\n{format_table(family_rows)}", flush=True)
        rows.extend(family_rows)
        path = write_results(rows, env, machine, args.out, path)
    chart = draw_chart(rows, env, path.with_suffix(".png"))
    print(f"\nwrote {path}" + (f" and {chart}" if chart else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
