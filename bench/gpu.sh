#!/usr/bin/env bash
# The one script a session with a lent GPU runs (budget: under 8 minutes). Offline: the GPU image
# already has torch, triton, transformers, numba, pybind11, scikit-build-core, pytest-benchmark.
#   1. build and install alignkit (no network, no dependency changes)
#   2. every test that runs a Triton kernel (the triton-backend cases, compiled on the GPU, and the
#      GPU-only tests); the CPU-only tests already ran in CI
#   3. all GPU benchmarks -> bench/results/cuda.json + cuda.md (and copies under $OUT if set)
# Back on the development machine, with cuda.json copied into bench/results/:
#   python bench/render.py bench/results/cuda.json --out bench/results/cuda.md --readme README.md
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
status=0

python -m pip install --no-build-isolation --no-deps -q -e . || exit 1
python -m alignkit.cli info || exit 1

timeout 220 python -m pytest tests -q -k "triton or gpu" --maxfail=25 -p no:cacheprovider --durations=15 \
  | tee "${OUT:-/tmp}/gpu-tests.log" || status=1
timeout 230 python bench/run.py --device cuda || status=1

if [ -n "${OUT:-}" ]; then
  cp bench/results/cuda.json bench/results/cuda.md "$OUT"/ 2>/dev/null || true
fi
exit $status
