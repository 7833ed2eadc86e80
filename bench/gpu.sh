#!/usr/bin/env bash
# The one script a session with a lent GPU runs (budget: under 8 minutes). Offline: the GPU image
# already has torch, triton, transformers, numba, pybind11, scikit-build-core, pytest-benchmark.
#   1. build and install alignkit (no network, no dependency changes)
#   2. the whole test suite, Triton kernels compiled on the GPU (GPU-only tests included)
#   3. all GPU benchmarks -> bench/results/cuda.json + cuda.md (and copies under $OUT if set)
# Back on the development machine, with cuda.json copied into bench/results/:
#   python bench/render.py bench/results/cuda.json --out bench/results/cuda.md --readme README.md
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0

python -m pip install --no-build-isolation --no-deps -q -e . || exit 1
python -m alignkit.cli info || exit 1

timeout 180 python -m pytest tests -q -x -p no:cacheprovider --durations=15 || status=1
timeout 270 python bench/run.py --device cuda || status=1

if [ -n "${OUT:-}" ]; then
  cp bench/results/cuda.json bench/results/cuda.md "$OUT"/ 2>/dev/null || true
fi
exit $status
