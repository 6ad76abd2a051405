#!/usr/bin/env bash
# The whole GPU verification of trainscope in two phases that fit a short GPU window: `test`
# builds for one architecture and runs every test that needs the GPU, `bench` runs every benchmark
# at sizes chosen to fit, reusing the test phase's build. Each phase keeps to a time budget (a step
# that would overrun is cut short or skipped, and the summary says so), so a failed phase can be
# rerun in the same window. bench/README.md ("The GPU check") says how to run it on a GPU machine.
#
#   bench/gpu_check.sh [--dry-run] test|bench [OUT_DIR]
#
# OUT_DIR (default: $OUT when set, else bench/results/latest) receives two files per phase:
#   <phase>-summary.md   one line per step (result, seconds, tests or goals), failures' log tails
#   <phase>-logs.tar.gz  every log, the tests' XML reports, the benchmarks' JSON, the environment
# The summary is also printed last. Exit status: 0 when every step passed or was skipped for a
# stated reason, 1 otherwise.
#
# --dry-run runs the same steps on a machine without a GPU: what needs one is skipped (or, like
# the CUDA test suites, runs and skips its tests), ctest and pytest run a small selection (the full
# suites run in `make test`), and the benchmarks run their --quick CPU smoke sizes. It checks the
# plumbing: tests/python/test_gpu_check.py runs it, so CI keeps it working.
#
# Environment (all optional):
#   PYTHON        interpreter with torch (default: .venv/bin/python if present, else python3)
#   BUILD_DIR     CMake build tree, shared by both phases (default: build/gpu-check)
#   CUDA_ARCH     CMAKE_CUDA_ARCHITECTURES (default: 90, the H100/H200)
#   JOBS          parallel build and test jobs (default: every core)
#   BUDGET_S      seconds for the phase (default: test 400, bench 240)
#   TRAINSCOPE_COMMIT  the commit checked, when the tree has no .git (recorded in the summary)
#   PEER_WHEELS   folder of the peers' wheels (default: .whl, filled by `make peer-wheels`)
#   CPP_ARGS, PY_ARGS, PS_ARGS, DEAD_UNITS_ARGS, RANK_ARGS, MONITOR_ARGS, PS_HIST_ARGS, PS_MODELS_ARGS
#                 replace the default arguments of bench_param_stats (C++), bench_param_stats.py,
#                 bench_per_sample_stats.py (MLP grid), bench_dead_units.py, bench_rank.py,
#                 bench_monitor.py, bench_per_sample_hist.py, bench_per_sample_stats.py (whole
#                 models: GPT-2, ResNet-18)
set -uo pipefail

usage() {
  sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

DRY_RUN=0
PHASE=""
OUT_DIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    test|bench) if [[ -z "$PHASE" ]]; then PHASE="$arg"; else OUT_DIR="$arg"; fi ;;
    -*) echo "gpu_check: unknown option $arg" >&2; usage >&2; exit 2 ;;
    *) if [[ -z "$PHASE" ]]; then echo "gpu_check: PHASE must be test or bench, got '$arg'" >&2; exit 2; fi
       OUT_DIR="$arg" ;;
  esac
done
if [[ -z "$PHASE" ]]; then echo "gpu_check: give a PHASE: test or bench" >&2; usage >&2; exit 2; fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1  # pytest finds its configuration (pyproject.toml) from here
OUT_DIR="${OUT_DIR:-${OUT:-$ROOT/bench/results/latest}}"
mkdir -p "$OUT_DIR" || exit 1
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
BUILD="${BUILD_DIR:-$ROOT/build/gpu-check}"
CUDA_ARCH="${CUDA_ARCH:-90}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 4)}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
PYTHON="$(command -v "$PYTHON" || echo "$PYTHON")"
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
if [[ "$PHASE" == test ]]; then DEFAULT_BUDGET=400; else DEFAULT_BUDGET=240; fi
BUDGET_S="${BUDGET_S:-$DEFAULT_BUDGET}"
RESERVE_S=5  # kept back for packing the results

START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
WORK="$(mktemp -d)"
DIR="$WORK/gpu_check_$PHASE"
LOGS="$DIR/logs"
mkdir -p "$LOGS" "$DIR/xml" "$DIR/json"
SUMMARY_ROWS="$DIR/.rows"
: >"$SUMMARY_ROWS"
FAILED=0
PEER_WHEELS="${PEER_WHEELS:-}"

# The op library and the package's sources, from this tree and this build (no installation).
export TRAINSCOPE_OPS_LIBRARY="$BUILD/libtrainscope_ops.so"
export PYTHONPATH="$ROOT/python_bindings${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export CMAKE_POLICY_VERSION_MINIMUM=3.5  # GoogleTest's sources with CMake 4

# ---------------------------------------------------------------------------------------------
# Steps: each runs with its output in logs/<name>.log, within min(its cap, the time left), and
# adds one row to the summary.

# row NAME RESULT SECONDS DETAIL
row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY_ROWS"; }

time_left() { echo $((DEADLINE - $(date +%s) - RESERVE_S)); }

# What a log says about its tests or goals, on one line.
detail_of() {
  local log="$1" d=""
  if grep -q '^\[==========\] .* ran\.' "$log" 2>/dev/null; then  # GoogleTest
    local n p s f
    n="$(grep -h '^\[==========\] .* ran\.' "$log" | tail -n 1 | awk '{ print $2 }')"
    p="$(grep -h '^\[  PASSED  \] [0-9]' "$log" | tail -n 1 | awk '{ print $4 }')"
    s="$(grep -h '^\[  SKIPPED \] [0-9]' "$log" | tail -n 1 | awk '{ print $4 }')"
    f="$(grep -h '^\[  FAILED  \] [0-9]' "$log" | tail -n 1 | awk '{ print $4 }')"
    d="$n tests: ${p:-0} passed${s:+, $s skipped}${f:+, $f FAILED}"
  elif grep -qE '^[0-9]+% tests passed' "$log" 2>/dev/null; then  # ctest
    d="$(grep -hE '^[0-9]+% tests passed' "$log" | tail -n 1)"
  elif grep -qE '(passed|failed|error|skipped|no tests ran)( in |,)' "$log" 2>/dev/null; then  # pytest
    d="$(grep -hE '(passed|failed|error|skipped|no tests ran)( in |,)' "$log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')"
  fi
  local goals
  goals="$(grep -hcE '^goal' "$log" 2>/dev/null)"
  if [[ "${goals:-0}" -gt 0 ]]; then d="${d:+$d; }goals below"; fi
  echo "$d"
}

# step NAME CAP_S COMMAND...
step() {
  local name="$1" cap="$2"
  shift 2
  local left
  left=$(time_left)
  if (( left < 5 )); then
    row "$name" "skipped" 0 "out of time (phase budget ${BUDGET_S} s)"
    echo "[gpu_check] $name: skipped, out of time"
    return 1
  fi
  local limit=$(( cap < left ? cap : left ))
  local t0 rc
  t0=$(date +%s)
  echo "[gpu_check] $name (up to ${limit} s): $*"
  if declare -F "$1" >/dev/null; then  # a function of this script (exported below): through bash
    timeout --kill-after=10 "$limit" bash -c '"$@"' bash "$@" >"$LOGS/$name.log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  fi
  rc=$?
  local secs=$(( $(date +%s) - t0 ))
  local result detail
  detail="$(detail_of "$LOGS/$name.log")"
  if (( rc == 0 )); then
    result="ok"
  elif (( rc == 124 || rc == 137 )); then
    result="TIMEOUT"
    detail="stopped after ${limit} s${detail:+; $detail}"
    FAILED=1
  else
    result="FAILED"
    detail="exit $rc${detail:+; $detail}"
    FAILED=1
  fi
  row "$name" "$result" "$secs" "$detail"
  echo "[gpu_check] $name: $result ($secs s) $detail"
  pack
  [[ "$result" == ok ]]
}

# skip NAME REASON
skip() {
  row "$1" "skipped" 0 "$2"
  echo "[gpu_check] $1: skipped ($2)"
}

write_summary() {
  local f="$DIR/summary.md" mode="GPU"
  (( DRY_RUN )) && mode="dry run (no GPU needed)"
  {
    echo "# trainscope GPU check: $PHASE phase, $mode"
    echo
    echo "- date (UTC): $(date -u -d "@$START" +%Y-%m-%dT%H:%M:%SZ), elapsed $(( $(date +%s) - START )) s of a ${BUDGET_S} s budget"
    echo "- command: bench/gpu_check.sh $( (( DRY_RUN )) && echo '--dry-run ')$PHASE"
    echo "- commit: $(commit_id)"
    echo "- GPU: $(gpu_name)"
    echo "- build: $BUILD (CMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH, $JOBS jobs); python: $PYTHON"
    echo
    echo "| step | result | s | detail |"
    echo "| --- | --- | ---: | --- |"
    awk -F'\t' '{ gsub(/\|/, "\\|", $4); printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4 }' "$SUMMARY_ROWS"
    if ls "$LOGS"/*.log >/dev/null 2>&1 && grep -qhE '^goal' "$LOGS"/*.log 2>/dev/null; then
      echo
      echo "## Goals"
      echo
      for log in "$LOGS"/*.log; do
        grep -hE '^goal' "$log" 2>/dev/null | sed "s|^|- $(basename "$log" .log): |"
      done
    fi
    if [[ -f "$DIR/notes.md" ]]; then
      echo
      cat "$DIR/notes.md"
    fi
    local bad
    bad="$(awk -F'\t' '$2 == "FAILED" || $2 == "TIMEOUT" { print $1 }' "$SUMMARY_ROWS")"
    if [[ -n "$bad" ]]; then
      echo
      echo "## Failures (last 40 lines of each log)"
      for name in $bad; do
        echo
        echo "### $name"
        echo
        echo '```'
        tail -n 40 "$LOGS/$name.log" 2>/dev/null
        echo '```'
      done
    fi
  } >"$f"
}

pack() {
  write_summary
  cp "$DIR/summary.md" "$OUT_DIR/$PHASE-summary.md"
  tar -czf "$OUT_DIR/$PHASE-logs.tar.gz" -C "$WORK" "gpu_check_$PHASE" 2>/dev/null
}

commit_id() {
  if [[ -n "${TRAINSCOPE_COMMIT:-}" ]]; then echo "$TRAINSCOPE_COMMIT"
  elif git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
    echo "$(git -C "$ROOT" rev-parse HEAD)$(git -C "$ROOT" status --porcelain --untracked-files=no | grep -q . && echo ' (with uncommitted changes)')"
  else echo "unknown (no .git; set TRAINSCOPE_COMMIT)"; fi
}

gpu_name() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1
  else
    echo "none visible"
  fi
}

# ---------------------------------------------------------------------------------------------
# Shared steps

environment() {
  echo "--- nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  echo "--- uname"; uname -a
  echo "--- cores: $(nproc)"
  echo "--- nvcc"; nvcc --version 2>&1 || echo "nvcc: not found"
  echo "--- cmake"; cmake --version 2>&1 | head -n 1
  echo "--- ninja"; ninja --version 2>&1 || echo "ninja: not found"
  echo "--- compute-sanitizer"; compute-sanitizer --version 2>&1 | tail -n 1 || echo "compute-sanitizer: not found"
  echo "--- python"
  "$PYTHON" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| torch CUDA", torch.version.cuda)
print("CUDA available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
for mod in ("numpy", "pytest", "xdist", "pytest_timeout", "lightning", "tensorboard", "matplotlib", "scipy",
            "expecttest", "backpack", "cockpit"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod}: {getattr(m, '__version__', 'present')}")
    except Exception as e:  # noqa: BLE001
        print(f"{mod}: missing ({type(e).__name__})")
EOF
}

# The optional peers (BackPACK, Cockpit) from wheels carried along (`make peer-wheels` puts the
# ones a GPU image lacks in .whl/), installed into this run's own folder: nothing to download.
peers() {
  local wheels="${PEER_WHEELS:-$ROOT/.whl}"
  "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$wheels"/*.whl
}

gpu_visible() {
  "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1
}

configure() {
  local gen=()
  if [[ ! -f "$BUILD/CMakeCache.txt" ]] && command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); fi
  cmake -S "$ROOT" -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" \
    -DTRAINSCOPE_CUDA=ON -DTRAINSCOPE_BUILD_TESTS=ON -DTRAINSCOPE_BUILD_BENCH=ON -DPython_EXECUTABLE="$PYTHON"
}

export ROOT BUILD CUDA_ARCH PYTHON WORK PEER_WHEELS
export -f environment configure peers

# peers: installs the carried wheels, if any, and puts them on the path of every later step.
with_peers() {
  local wheels="${PEER_WHEELS:-$ROOT/.whl}"
  if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
    skip peers "no wheels in ${wheels#"$ROOT"/} (make peer-wheels): peer rows say not installed"
    return
  fi
  if step peers 60 peers; then export PYTHONPATH="$WORK/site:$PYTHONPATH"; fi
}

# ---------------------------------------------------------------------------------------------
# test phase

CUDA_SUITES=(test_param_stats_cuda test_per_sample_stats_cuda test_hist2d_cuda test_dead_units_cuda test_rank_cuda)
# Left out under the sanitizers: the > 2³¹-element tests (minutes under instrumentation) and the
# "launch does not wait" tests (the sanitizers serialise launches, so the stream is idle).
SANITIZER_FILTER='-*2To31*:*DoesNotWait*:*DoNotWait*'

# Whether compute-sanitizer works here: one small CUDA test under memcheck must run (not skip) and
# report no error. Where the device is refused (some virtual machines), the summary says so.
sanitizer_usable() {
  local log="$LOGS/sanitizer_probe.log"
  timeout 60 compute-sanitizer --tool memcheck --error-exitcode 3 "$BUILD/tests/test_rank_cuda" \
    --gtest_filter=RankCudaTest.GramUpdateBothSidesAndAccumulate >"$log" 2>&1 &&
    grep -q 'ERROR SUMMARY: 0 errors' "$log" && grep -q '^\[  PASSED  \] 1 test' "$log" &&
    ! grep -q '^\[  SKIPPED \]' "$log"
}

run_test_phase() {
  step environment 60 environment
  local gpu=0
  if gpu_visible; then gpu=1; fi
  if (( !DRY_RUN && !gpu )); then
    row "gpu" "FAILED" 0 "torch sees no CUDA device; the GPU steps below show what that costs"
    FAILED=1
  fi
  with_peers
  step configure 180 configure || return
  step build 420 cmake --build "$BUILD" -j "$JOBS" || return

  # The torch-free launchers' suites (they skip each test without a GPU).
  for suite in "${CUDA_SUITES[@]}"; do
    step "$suite" 120 "$BUILD/tests/$suite" --gtest_output="xml:$DIR/xml/$suite.xml"
  done

  # Every public op, and a whole monitored training step, in a CUDA graph; a monitored step under
  # torch.cuda.set_sync_debug_mode("error").
  step cuda_graphs 150 "$PYTHON" -m pytest "$ROOT/tests/python/test_cuda_graphs.py" -v -rs -p no:cacheprovider \
    --junitxml="$DIR/xml/cuda_graphs.xml"

  # pytest: every test with its CUDA variants, in parallel when pytest-xdist is there.
  local py=("$PYTHON" -m pytest -q -rs -p no:cacheprovider --junitxml="$DIR/xml/pytest.xml")
  if "$PYTHON" -c "import xdist" >/dev/null 2>&1; then py+=(-n "$JOBS"); fi
  if "$PYTHON" -c "import pytest_timeout" >/dev/null 2>&1; then py+=(--timeout 240); fi
  if (( DRY_RUN )); then
    py+=("$ROOT/tests/python/test_param_stats.py" -k cuda)   # a selection: the plumbing, not the suite
  else
    py+=("$ROOT/tests/python" --ignore="$ROOT/tests/python/test_cuda_graphs.py")
  fi
  step pytest 300 "${py[@]}"

  # ctest: the LibTorch API suites with their CUDA variants, the CPU suites and the install consumer
  # (the launchers' CUDA suites ran above).
  local ct=(ctest --test-dir "$BUILD" -j "$JOBS" --output-on-failure --timeout 240 --output-junit "$DIR/xml/ctest.xml")
  if (( DRY_RUN )); then ct+=(-R 'OncePerDevice|RankMath\.'); else ct+=(-E 'CudaTest\.'); fi
  step ctest 300 "${ct[@]}"

  # compute-sanitizer: memcheck on the launchers' suites, racecheck on the histogram kernels.
  if ! command -v compute-sanitizer >/dev/null 2>&1; then
    skip sanitizers "compute-sanitizer not installed"
    return
  fi
  if ! sanitizer_usable; then
    local why
    why="$(grep -m 1 -iE 'not supported|error|skipped|no cuda' "$LOGS/sanitizer_probe.log" | cut -c1-160)"
    row sanitizer_probe "refused" 0 "compute-sanitizer does not work here (${why:-see the log}); memcheck and racecheck not run"
    echo "[gpu_check] compute-sanitizer refused here; going on"
    echo "compute-sanitizer was refused on this machine: ${why:-see logs/sanitizer_probe.log}" >"$DIR/notes.md"
    return
  fi
  row sanitizer_probe "ok" 0 "compute-sanitizer runs here"
  for suite in "${CUDA_SUITES[@]}"; do
    step "memcheck_$suite" 40 compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
      "$BUILD/tests/$suite" --gtest_filter="$SANITIZER_FILTER"
  done
  step racecheck_param_stats_hist 40 compute-sanitizer --tool racecheck --error-exitcode 3 --print-limit 20 \
    "$BUILD/tests/test_param_stats_cuda" --gtest_filter='*HistogramsAreExact*'
  step racecheck_per_sample_hist 40 compute-sanitizer --tool racecheck --error-exitcode 3 --print-limit 20 \
    "$BUILD/tests/test_per_sample_stats_cuda" --gtest_filter='*HistogramsAreExact*'
  step racecheck_hist2d 40 compute-sanitizer --tool racecheck --error-exitcode 3 --print-limit 20 \
    "$BUILD/tests/test_hist2d_cuda" --gtest_filter='*SharedPerWarpPerBlockAndGlobalCounters*'
}

# ---------------------------------------------------------------------------------------------
# bench phase

# bench_py NAME DEFAULT_ARGS OVERRIDE_ARGS CAP [SCRIPT [FIXED_ARGS]]
# SCRIPT: the benchmark's name when it differs from NAME (one script, two steps); FIXED_ARGS come
# first in both modes, so that DEFAULT_ARGS or OVERRIDE_ARGS can still replace them.
bench_py() {
  local name="$1" args="$2" override="$3" cap="$4" script="${5:-$1}" fixed="${6:-}"
  local a
  # A dry run shares the CPU with the rest of `make test`: its --quick runs get three times the cap.
  if (( DRY_RUN )); then a="$fixed --quick --device cpu"; cap=$(( 3 * cap )); else a="$fixed ${override:-$args} --device cuda"; fi
  # shellcheck disable=SC2086  # a list of words
  step "bench_$name" "$cap" "$PYTHON" "$ROOT/bench/bench_$script.py" $a --json "$DIR/json/bench_$name.json"
}

run_bench_phase() {
  step environment 60 environment
  if (( !DRY_RUN )) && ! gpu_visible; then
    row "gpu" "FAILED" 0 "torch sees no CUDA device"
    FAILED=1
  fi
  with_peers
  step configure 180 configure || return
  # Reuses the test phase's build; builds only what the benchmarks need on a fresh machine.
  step build 300 cmake --build "$BUILD" -j "$JOBS" --target bench_param_stats trainscope_ops || return

  local cpp="${CPP_ARGS:---sizes 125M,1B --repeats 20 --warmup 3}"
  (( DRY_RUN )) && cpp="--sizes 1M --repeats 2 --warmup 1"  # exits at once without a GPU
  # shellcheck disable=SC2086
  step bench_param_stats_cpp 40 "$BUILD/bench/bench_param_stats" $cpp --json "$DIR/json/bench_param_stats_cpp.json"
  bench_py param_stats "--sizes 125M,1B --repeats 20 --warmup 3" "${PY_ARGS:-}" 50
  bench_py per_sample_stats "--batch-sizes 128 --dims 4096 --seq-lens 1,128 --repeats 5 --warmup 2" "${PS_ARGS:-}" 45 \
    per_sample_stats "--models mlp"
  bench_py dead_units "--repeats 30 --warmup 5" "${DEAD_UNITS_ARGS:-}" 25
  bench_py rank "--widths 1024,4096 --methods trainscope,trainscope_grams,trainscope_svd,svdvals --repeats 3 --warmup 1" \
    "${RANK_ARGS:-}" 40
  # Cockpit's configurations on 3c3d only (Cockpit cannot run gpt2, and trainscope's curvature
  # family there, 100 Hutchinson probes per step, would outlast the cap alone); business and full
  # (each step ~100 Hessian-vector products) time 2 rounds of 1 + 2 steps.
  bench_py monitor "--models 3c3d,gpt2 --rounds 2 --repeats 15 --warmup 3 --config-models 3c3d \
--curvature-repeats 2 --curvature-warmup 1" "${MONITOR_ARGS:-}" 50
  bench_py per_sample_hist "--batch 64 --repeats 10" "${PS_HIST_ARGS:-}" 20
  # Whole models last: GPT-2-small-sized (B 8, T 1024, 6 of its 12 blocks to fit the budget) and
  # ResNet-18 (B 128, CIFAR-sized 32x32 input: at 224x224 the vmap and Opacus rows alone would
  # outlast it); plain, trainscope, Opacus ghost clipping, vmap. Where the steps before left too
  # little time, skipped (not failed): the rows above are the phase's first results.
  if (( $(time_left) < 40 )); then
    skip bench_per_sample_models "out of time for the whole-model rows (phase budget ${BUDGET_S} s; raise BUDGET_S)"
  else
    bench_py per_sample_models "--gpt-layers 6 --gpt-batch 8 --seq-len 1024 --cnn-batch 128 --image-size 32 \
--repeats 5 --warmup 2 --profile" "${PS_MODELS_ARGS:-}" 90 per_sample_stats "--models gpt2,resnet18"
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -q -d CLOCK,TEMPERATURE,PERFORMANCE,POWER >"$LOGS/nvidia-smi-after.txt" 2>&1
  fi
}

# ---------------------------------------------------------------------------------------------

trap 'pack; exit 130' INT TERM
echo "[gpu_check] $PHASE phase$( (( DRY_RUN )) && echo ' (dry run)'), budget ${BUDGET_S} s; results in $OUT_DIR"
if [[ "$PHASE" == test ]]; then run_test_phase; else run_bench_phase; fi
pack
echo
cat "$DIR/summary.md"
rm -rf "$WORK"
exit $FAILED
