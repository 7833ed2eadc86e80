#!/usr/bin/env bash
# bench/gpu.sh: the one script a session with a lent GPU runs. Offline: the GPU image already has
# torch, triton, transformers, numba, pybind11, scikit-build-core and pytest-benchmark.
#
# Stages run highest value first, each under its own `timeout` (SIGINT first, so pytest and
# pytest-benchmark still write their reports; SIGKILL 10 s later), each writing its own files under
# $RESULTS ($OUT when set, else bench/results/gpu/). A stage that fails or runs out of time is
# marked in summary.tsv / summary.md, and the next stage still runs: what earlier stages wrote stays.
# Benchmarks also append one JSON line per case as it ends (*.jsonl, bench/gpu_bench_jsonl.py).
#
#   stage        limit (s)  what                                                files under $RESULTS
#   0-env            10     nvidia-smi, versions, CPU / memory / disk           0-env.log
#   0-build          70     offline build + install (pip -e, no deps)           0-build.log
#   0-info           15     alignkit info (extension status, backends)          0-info.log
#   1-kernels        60     every Triton kernel, one small shape, pinned        1-kernels.jsonl, .log
#                           config, against the CPU implementation
#   1-syncfree       30     tests/test_sync_free.py + test_cuda_graphs.py       1-syncfree.xml, .log
#   2-logprobs       60     bench_logprobs: alignkit, matmul, liger             2-logprobs.json(l), .log
#   2-gae            25     bench_advantages: alignkit, copy bandwidth          2-gae.json(l), .log
#   3-tests          45     GPU test suite (-k "triton or gpu"), pinned config  3-tests.xml, .log
#   3-losses         20     bench_losses                                        3-losses.json(l), .log
#   3-peers          10     the peers of 2-*: torch / trl log-probs, verl       3-peers-*.json, .jsonl
#                           loop / torchrl GAE
#   3-rollout        45     bench_rollout: engine (CUDA graphs), engine eager,  3-rollout.json(l), .log
#                           HF generate
#   3-shared         20     bench_shared_prompts: shared vs whole rows, bf16    3-shared.json(l), .log
#   3-trainer        20     alignkit demo --device cuda, 3 RL iterations        3-trainer/, .log
#   3-fsdp2          15     bench/gpu_fsdp2.py under torchrun (skip if absent)  3-fsdp2.json, .log
#   4-render          5     bench/render.py: markdown of every benchmark JSON   *.md
#                   ---
#                   450     = GPU_SH_BUDGET_S: a stage gets min(its limit, what is left); under
#                           10 s left, the remaining stages are marked not-run (a failure)
#
# Knobs: GPU_SH_DRY_RUN=1 prints the stages and their commands and runs nothing (tests/
# test_gpu_script.py); GPU_SH_STAGES="1-kernels 2-gae" runs only those (prefixes: "1" = stage 1);
# GPU_SH_BUDGET_S changes the total; PYTHON picks the interpreter. A rerun appends to summary.tsv.
# Exit status: 0 when every stage that ran passed (or was skipped), else 1.
#
# Back on the development machine, with the files copied into bench/results/gpu/:
#   python bench/render.py bench/results/gpu/2-logprobs.json --out bench/results/cuda.md --readme README.md
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
DRY="${GPU_SH_DRY_RUN:-0}"
ONLY="${GPU_SH_STAGES:-}"
BUDGET="${GPU_SH_BUDGET_S:-450}"
RESULTS="${OUT:-$REPO/bench/results/gpu}"
SUMMARY="$RESULTS/summary.tsv"
START=$SECONDS
failures=0
last_status=none

if [ "$DRY" != 1 ]; then
  mkdir -p "$RESULTS"
  [ -f "$SUMMARY" ] || printf 'stage\tstatus\texit\tseconds\tlimit\n' >"$SUMMARY"
else
  echo "dry run: stages, limits (s) and commands; results would go to $RESULTS"
fi

selected() {  # is stage $1 in GPU_SH_STAGES (all when unset)?
  [ -z "$ONLY" ] && return 0
  local want
  for want in $ONLY; do
    case "$1" in "$want"*) return 0 ;; esac
  done
  return 1
}

record() {  # stage status exit seconds limit
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$SUMMARY"
  printf '== %-11s %-8s exit %-4s %4ss of %ss\n' "$@"
}

# stage NAME LIMIT COMMAND: run COMMAND (a bash string) under its limit, log to $RESULTS/NAME.log.
# Exit 77 from COMMAND means "skipped" (nothing to check here), as in automake.
stage() {
  local name=$1 limit=$2 command=$3
  selected "$name" || return 0
  if [ "$DRY" = 1 ]; then
    printf '%-11s %4s  %s\n' "$name" "$limit" "$command"
    return 0
  fi
  local left=$((BUDGET - (SECONDS - START)))
  if ((left < 10)); then
    record "$name" not-run - 0 "$limit"
    echo "   (the total budget of ${BUDGET}s is spent)"
    failures=$((failures + 1))
    return 0
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS log="$RESULTS/$name.log"
  echo "-- $name (limit ${limit}s): $command" | tee "$log"
  timeout -s INT -k 10 "$limit" bash -c "$command" >>"$log" 2>&1
  local rc=$? status
  case $rc in
    0) status=ok ;;
    77) status=skipped ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  [ "$status" = timeout ] || [ "$status" = failed ] && failures=$((failures + 1))
  last_status=$status
  tail -n 12 "$log" | sed 's/^/   | /'
  record "$name" "$status" "$rc" $((SECONDS - t0)) "$limit"
}

# A pytest-benchmark run of one bench/ module: its own JSON (written when pytest ends, also on
# SIGINT) and one JSON line per case as it goes.
bench() {  # output-name module [-k expression]
  printf '%s' "cd bench && PYTHONPATH=\"\$PWD\${PYTHONPATH:+:\$PYTHONPATH}\" GPU_BENCH_JSONL=$RESULTS/$1.jsonl" \
    " TRITON_CACHE_AUTOTUNING=1 TRITON_PRINT_AUTOTUNING=1 $PY -m pytest -c pytest.ini $2 -m gpu" \
    "${3:+ -k \"$3\"} -p gpu_bench_jsonl --benchmark-json=$RESULTS/$1.json -q -rs"
}
PINNED="ALIGNKIT_PIN_CONFIG=1"

stage 0-env 10 "set -e; nvidia-smi; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit \
--format=csv; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \
\"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(torch.cuda.get_device_name(0), \
torch.cuda.get_device_capability(0))'; $PY -m pip list 2>/dev/null | grep -i -E \
'^(torch|triton|transformers|numba|numpy|pybind11|scikit-build|cmake|ninja|pytest|liger|trl|torchrl) '; \
nproc; free -g; df -h ."
stage 0-build 70 "$PY -m pip install --no-build-isolation --no-deps -v -e ."
if [ "$DRY" != 1 ] && selected 0-build && [ "$last_status" != ok ]; then
  # No installed alignkit: the source tree still imports (the ops and kernels do not need alignkit._C).
  # .pkgroot holds only the alignkit symlink: the repository root would also expose kernels/ as a
  # top-level module, which transformers would take for the `kernels` package.
  export PYTHONPATH="$REPO/.pkgroot${PYTHONPATH:+:$PYTHONPATH}"
  echo "   build failed: using the source tree on PYTHONPATH (replay buffer unavailable)"
fi
stage 0-info 15 "$PY -m alignkit.cli info"

stage 1-kernels 60 "$PINNED $PY bench/gpu_kernels.py --out $RESULTS/1-kernels.jsonl"
stage 1-syncfree 30 "$PINNED $PY -m pytest tests/test_sync_free.py tests/test_cuda_graphs.py -v -p no:cacheprovider \
--junitxml=$RESULTS/1-syncfree.xml"

stage 2-logprobs 60 "$(bench 2-logprobs bench_logprobs.py 'alignkit or matmul or liger')"
stage 2-gae 25 "$(bench 2-gae bench_advantages.py 'alignkit or copy_bandwidth')"

# The existing tests expect bad mask values to raise on CUDA tensors too: full validation here.
stage 3-tests 45 "$PINNED ALIGNKIT_VALIDATION=full $PY -m pytest tests -k 'triton or gpu' \
--ignore=tests/test_sync_free.py --ignore=tests/test_cuda_graphs.py -v --maxfail=25 -p no:cacheprovider \
--durations=15 --junitxml=$RESULTS/3-tests.xml"
stage 3-losses 20 "$(bench 3-losses bench_losses.py)"
stage 3-peers 10 "($(bench 3-peers-logprobs bench_logprobs.py 'not (alignkit or matmul or liger)')); \
s=\$?; ($(bench 3-peers-gae bench_advantages.py 'not (alignkit or copy_bandwidth)')) && exit \$s"
stage 3-rollout 45 "$(bench 3-rollout bench_rollout.py)"
stage 3-shared 20 "$(bench 3-shared bench_shared_prompts.py)"
stage 3-trainer 20 "$PY -m alignkit.cli demo --device cuda --iterations 3 --warm-start-steps 20 --held-out 32 \
--eval-every 3 --no-progress --output $RESULTS/3-trainer"
stage 3-fsdp2 15 "if [ ! -f bench/gpu_fsdp2.py ] || ! command -v torchrun >/dev/null; then \
echo 'skipped: bench/gpu_fsdp2.py or torchrun absent'; exit 77; fi; \
$PY bench/gpu_fsdp2.py --preflight --out $RESULTS/3-fsdp2.json || exit \$?; \
torchrun --standalone --nproc_per_node=\$(nvidia-smi -L | wc -l) bench/gpu_fsdp2.py --out $RESULTS/3-fsdp2.json"

stage 4-render 5 "for f in $RESULTS/[23]-*.json; do [ -s \"\$f\" ] || continue; \
$PY bench/render.py \"\$f\" --out \"\${f%.json}.md\" || exit 1; done"

if [ "$DRY" = 1 ]; then
  exit 0
fi
{
  echo "# bench/gpu.sh summary ($((SECONDS - START)) s of a ${BUDGET} s budget)"
  echo
  echo "| stage | status | exit | seconds | limit |"
  echo "| --- | --- | --- | ---: | ---: |"
  tail -n +2 "$SUMMARY" | awk -F'\t' '{ printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5 }'
} >"$RESULTS/summary.md"
echo "results in $RESULTS ($((SECONDS - START)) s); $failures stage(s) failed or timed out"
[ "$failures" -eq 0 ]
