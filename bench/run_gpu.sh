#!/usr/bin/env bash
# Build and run every benchmark on a GPU machine; everything lands in one folder.
#
#   bench/run_gpu.sh [OUT_DIR]            (default: bench/results/latest)
#
# OUT_DIR receives: nvidia-smi.txt, nvidia-smi-q.txt (before), nvidia-smi-after.txt,
# environment.txt, build.log, bench_param_stats_cpp.{log,json} (launcher, C++),
# bench_param_stats.{log,json} (trainscope.param_stats against PyTorch, Python),
# bench_per_sample_stats.{log,json} (per-sample gradient statistics against vmap, the einsum
# ghost norm, BackPACK and Cockpit), bench_dead_units.{log,json} (the dead-unit pass against
# PyTorch), bench_rank.{log,json} (rank measures against torch.linalg.svdvals and SciPy),
# bench_monitor.{log,json} (a monitored training step against the plain one, and Cockpit),
# peers_install.log (with PEER_WHEELS), run_gpu.log.
#
# Environment (all optional):
#   PYTHON     interpreter with torch (default: .venv/bin/python if present, else python3)
#   BUILD_DIR  CMake build tree (default: build/gpu-bench)
#   CUDA_ARCH  CMAKE_CUDA_ARCHITECTURES (default: 90)
#   CPP_ARGS   extra arguments for the C++ bench, e.g. "--sizes 125M --repeats 100"
#   PY_ARGS    extra arguments for the Python bench, e.g. "--sizes 125M,1B"
#   PS_ARGS    extra arguments for bench_per_sample_stats.py, e.g. "--batch-sizes 128 --dims 4096"
#   DEAD_UNITS_ARGS, RANK_ARGS, MONITOR_ARGS  extra arguments for bench_dead_units.py, bench_rank.py
#              and bench_monitor.py
#   PEER_WHEELS  folder of wheels for bench/requirements-peers.txt (BackPACK, Cockpit and what they
#              import); when set they are installed first, offline and without dependency
#              resolution (`pip download --no-deps -d DIR -r bench/requirements-peers.txt` makes it)
#
# The Python bench uses the trainscope package if it imports already (e.g. after `make build`);
# otherwise the op library is built here and loaded through TRAINSCOPE_OPS_LIBRARY, with the
# package's Python sources taken from python_bindings/.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/bench/results/latest}"
mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)"
BUILD="${BUILD_DIR:-$ROOT/build/gpu-bench}"
CUDA_ARCH="${CUDA_ARCH:-90}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
JOBS="$(nproc 2>/dev/null || echo 4)"

: >"$OUT/run_gpu.log"
log() { echo "[run_gpu] $*" | tee -a "$OUT/run_gpu.log"; }
status=0

# ---- the machine ------------------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
  nvidia-smi -q >"$OUT/nvidia-smi-q.txt" 2>&1
else
  echo "nvidia-smi not found" >"$OUT/nvidia-smi.txt"
fi
{
  echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -a)"
  echo "command: $0 $*"
  echo "root: $ROOT"
  echo "build dir: $BUILD (CMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH)"
  echo "python: $PYTHON"
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| torch CUDA', torch.version.cuda)"
  echo "--- nvcc"; nvcc --version
  echo "--- cmake"; cmake --version | head -n 1
  echo "--- git"; git -C "$ROOT" rev-parse HEAD; git -C "$ROOT" status --short
} >"$OUT/environment.txt" 2>&1
log "results in $OUT"

# ---- build ------------------------------------------------------------------------------------
log "configuring $BUILD"
if ! cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" \
    -DTRAINSCOPE_BUILD_TESTS=OFF -DTRAINSCOPE_BUILD_BENCH=ON -DPython_EXECUTABLE="$(command -v "$PYTHON")" \
    >"$OUT/build.log" 2>&1; then
  log "cmake configure failed; see build.log"
  tail -n 30 "$OUT/build.log"
  exit 1
fi
log "building bench_param_stats"
if ! cmake --build "$BUILD" --target bench_param_stats -j "$JOBS" >>"$OUT/build.log" 2>&1; then
  log "build of bench_param_stats failed; see build.log"
  tail -n 30 "$OUT/build.log"
  status=1
fi

# ---- C++: the launcher alone ------------------------------------------------------------------
if [[ -x "$BUILD/bench/bench_param_stats" ]]; then
  log "running bench_param_stats (C++) ${CPP_ARGS:-}"
  # shellcheck disable=SC2086  # CPP_ARGS is a list of words
  "$BUILD/bench/bench_param_stats" ${CPP_ARGS:-} --json "$OUT/bench_param_stats_cpp.json" 2>&1 |
    tee "$OUT/bench_param_stats_cpp.log"
  rc=${PIPESTATUS[0]}
  if [[ $rc -ne 0 ]]; then log "C++ bench exited with $rc"; status=1; fi
fi

# ---- Python: trainscope.param_stats against the PyTorch composition ---------------------------
if "$PYTHON" -c "import trainscope" >/dev/null 2>&1; then
  log "using the installed trainscope package"
else
  log "trainscope does not import; building the op library in $BUILD"
  if cmake --build "$BUILD" --target trainscope_ops -j "$JOBS" >>"$OUT/build.log" 2>&1; then
    export TRAINSCOPE_OPS_LIBRARY="$BUILD/libtrainscope_ops.so"
    export PYTHONPATH="$ROOT/python_bindings${PYTHONPATH:+:$PYTHONPATH}"
  else
    log "build of trainscope_ops failed; see build.log"
    tail -n 30 "$OUT/build.log"
  fi
fi
"$PYTHON" -c "import trainscope; print('trainscope library:', trainscope.library_path)" 2>&1 | tee -a "$OUT/run_gpu.log"

# One Python benchmark: bench/bench_<name>.py --device cuda <extra args> --json <OUT>/bench_<name>.json
run_py_bench() {
  local name="$1" args="$2"
  if ! "$PYTHON" -c "import trainscope" >/dev/null 2>&1; then
    log "cannot import trainscope; bench_$name.py not run"
    status=1
    return
  fi
  log "running bench_$name.py $args"
  # shellcheck disable=SC2086  # args is a list of words
  "$PYTHON" "$ROOT/bench/bench_$name.py" --device cuda $args \
    --json "$OUT/bench_$name.json" 2>&1 | tee "$OUT/bench_$name.log"
  local rc=${PIPESTATUS[0]}
  if [[ $rc -ne 0 ]]; then log "bench_$name.py exited with $rc"; status=1; fi
}

# ---- Python: trainscope.param_stats against the PyTorch composition ---------------------------
run_py_bench param_stats "${PY_ARGS:-}"

# ---- Python: per-sample gradient statistics against vmap, einsum ghost norm, BackPACK, Cockpit --
if [[ -n "${PEER_WHEELS:-}" ]]; then
  log "installing the optional peers from $PEER_WHEELS (no index, no dependency resolution)"
  if ! "$PYTHON" -m pip install --no-index --no-deps --find-links "$PEER_WHEELS" \
      -r "$ROOT/bench/requirements-peers.txt" >"$OUT/peers_install.log" 2>&1; then
    log "installing the peers failed; see peers_install.log (their rows will say not installed)"
  fi
fi
run_py_bench per_sample_stats "${PS_ARGS:-}"

# ---- Python: representation metrics (dead units, ranks) and the Monitor's step overhead ---------
run_py_bench dead_units "${DEAD_UNITS_ARGS:-}"
run_py_bench rank "${RANK_ARGS:-}"
run_py_bench monitor "${MONITOR_ARGS:-}"

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -q -d CLOCK,TEMPERATURE,PERFORMANCE,POWER >"$OUT/nvidia-smi-after.txt" 2>&1
fi
log "done (status $status); results in $OUT"
exit $status
