#!/usr/bin/env bash
# One command for a lent GPU machine (torch + triton present, no network): the gpu test tier,
# the benchmarks, then the default tier on the GPU, each under a time cap, logs under $OUT.
# Usage: OUT=/some/dir bash bench/gpu_check.sh   (at most about 8.5 minutes: 240 + 240 + 60 s caps)
# The benchmarks run with --quick (one shape per headline case) to fit a 15-minute device lease;
# a failing implementation is recorded as a NaN row with its error, not a crash, and the JSON is
# rewritten after every family, so a run cut by the cap keeps the families it finished.
# BENCH_FAMILIES lists the `python -m bench --only` families (python -m bench --help); add new ones there.
BENCH_FAMILIES="${BENCH_FAMILIES:-multimodal lora mamba mamba_state_update mamba_conv mamba2 mamba2_decode mamba2_norm hf}"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export IFK_CACHE_DIR="${IFK_CACHE_DIR:-/tmp/ifk-cache}"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse --short HEAD 2>/dev/null; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

echo "== gpu tier =="
timeout 240 python -m pytest tests -m gpu -q --maxfail=20 -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25

echo "== benchmarks =="
# shellcheck disable=SC2086  # the family list splits into words on purpose
IFK_BENCH_OUT="$OUT" timeout 240 python -m bench --quick --only $BENCH_FAMILIES 2>&1 | tee "$OUT/bench.log" | grep -v '^  \.\.'

echo "== default tier on the GPU =="
timeout 60 python -m pytest tests -m "not gpu" -q -x -p no:cacheprovider 2>&1 | tee "$OUT/default_tier.log" | tail -15
echo "logs in $OUT"
