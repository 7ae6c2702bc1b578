#!/usr/bin/env bash
# Compile-check every csrc source without a GPU: .cu with nvcc (sm_90), .cpp with the host compiler.
# A CPU-only torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h, so an empty stand-in is provided.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_dir=$(python -c "import os, torch; print(os.path.dirname(torch.__file__))")
py_inc=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
mkdir -p "$shim/c10/cuda/impl"
echo '#pragma once' > "$shim/c10/cuda/impl/cuda_cmake_macros.h"
includes=(-I"$shim" -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" -I"$py_inc")
status=0
while IFS= read -r -d '' src; do
  case "$src" in
    *.cu)
      command -v nvcc >/dev/null || { echo "skip $src: no nvcc"; continue; }
      cmd=(nvcc -std=c++20 -O3 -arch=sm_90 -diag-suppress 3306 --expt-relaxed-constexpr "${includes[@]}" -c "$src" -o /dev/null) ;;
    *.cpp) cmd=(g++ -std=c++20 -O3 -fopenmp -fPIC "${includes[@]}" -c "$src" -o /dev/null) ;;
  esac
  if "${cmd[@]}"; then echo "ok   $src"; else echo "FAIL $src"; status=1; fi
done < <(find csrc -name '*.cu' -print0 -o -name '*.cpp' -print0)
exit $status
