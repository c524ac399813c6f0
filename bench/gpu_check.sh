#!/usr/bin/env bash
# GPU check: builds pyvidfast against the python3 (and torch) it finds, then runs the GPU tests, a CUDA-vs-CPU
# parity sweep, compute-sanitizer on a small case of each kernel, the NVDEC check and the GPU benchmarks.
# Run from anywhere; it works in the repository root. Writes $OUT/gpu_check.json and $OUT/gpu_check.log
# (default OUT: bench/results/gpu). Each stage runs under `timeout` with a budget, cut to what is left of the
# whole run's budget (GPU_CHECK_BUDGET_S, default 530 s); a failing stage is reported and the next one runs.
#
#   bash bench/gpu_check.sh                  # on the GPU machine (see docs/gpu.md for the device tool's command)
#   bash bench/gpu_check.sh --dry-run        # here: the same stages on the CPU, GPU parts skipped, no rebuild
#   bash bench/gpu_check.sh --only build,parity   # a subset of the stages
#
# Stages report through their exit status: 0 ok, 77 skipped (the reason is the last line they print), 124/137
# over budget, anything else failed. Python stages write $OUT/<stage>.json, which the summary gathers.
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DRY=0 ONLY="" STAGE=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --only) ONLY=$2; shift ;;
    --stage) STAGE=$2; shift ;;  # internal: runs one stage in a child process (so `timeout` can stop it)
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
export DRY

STAGES=(env ffmpeg build tests parity sanitizer nvdec bench-attention bench-rlt bench-group-topk bench-convert
        bench-model)
# Seconds per stage on the GPU machine (H200, 16 cores); cut to the time left.
declare -A BUDGET=([env]=20 [ffmpeg]=30 [build]=240 [tests]=90 [parity]=60 [sanitizer]=90 [nvdec]=30
                   [bench-attention]=75 [bench-rlt]=20 [bench-group-topk]=20 [bench-convert]=20 [bench-model]=75)
CARRY=build/gpu-carry          # made here by bench/gpu_ffmpeg_bundle.sh, carried to the GPU machine
BUNDLE=build/ffmpeg-bundle     # FFmpeg unpacked from $CARRY/ffmpeg.tar.xz
PYLIB=build/gpu-pylib          # pytest & co. installed from $CARRY/wheels when the machine has none

if [ "$DRY" = 1 ]; then
  export OUT=${OUT:-bench/results/gpu-dry-run}
  [ -x .venv/bin/python ] && : "${PYTHON:=.venv/bin/python}"
  BUILD_DIR=build/gpu-dry-run
else
  export OUT=${OUT:-bench/results/gpu}
  BUILD_DIR=build/gpu
fi
PY=${PYTHON:-python3}
case $PY in /*) ;; */*) PY=$ROOT/$PY ;; *) PY=$(command -v "$PY" || echo "$PY") ;; esac
export PY BUILD_DIR CARRY BUNDLE PYLIB
mkdir -p "$OUT"

# The environment every stage sees: the unpacked FFmpeg (when its stage made it usable) and carried Python
# packages; the sample clips come from the carried folder when this machine has none cached.
stage_env() {
  if [ -f "$BUNDLE/.usable" ]; then
    local lib=$ROOT/$BUNDLE/usr/lib/x86_64-linux-gnu
    export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    export PKG_CONFIG_PATH=$lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}
    command -v pkg-config >/dev/null || export PKG_CONFIG=$ROOT/$BUNDLE/usr/bin/pkgconf
  fi
  [ -d "$PYLIB" ] && export PYTHONPATH=$ROOT/$PYLIB${PYTHONPATH:+:$PYTHONPATH}
  if [ -d "$CARRY/samples" ] && [ ! -d "${VIDFAST_CACHE:-$HOME/.cache/pyvidfast}/samples" ]; then
    export VIDFAST_CACHE=$ROOT/$CARRY
  fi
  return 0
}

skip() { echo "skipped: $*"; exit 77; }
gpu_only() { [ "$DRY" = 1 ] && skip "dry run: $*"; return 0; }
nproc_all() { nproc 2>/dev/null || echo 2; }

# ---------------------------------------------------------------------------------------------- the stages
stage_env_facts() {
  echo "python: $PY"; "$PY" --version
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  for tool in nvcc cmake ninja pkg-config compute-sanitizer xz; do
    printf '%-18s %s\n' "$tool" "$(command -v $tool || echo missing)"
  done
  ldd --version 2>/dev/null | head -1
  ldconfig -p 2>/dev/null | grep -E "libnvcuvid|libcuda\.so" || echo "libnvcuvid/libcuda: not in the ldconfig cache"
  "$PY" -m bench.env_gpu
}

stage_ffmpeg() {
  if [ ! -f "$CARRY/ffmpeg.tar.xz" ]; then
    skip "no $CARRY/ffmpeg.tar.xz (make it with bash bench/gpu_ffmpeg_bundle.sh and carry $CARRY)"
  fi
  if [ ! -f "$BUNDLE/.unpacked" ] || [ "$CARRY/ffmpeg.tar.xz" -nt "$BUNDLE/.unpacked" ]; then
    rm -rf "$BUNDLE" && mkdir -p "$BUNDLE"
    tar -C "$BUNDLE" -xJf "$CARRY/ffmpeg.tar.xz" || exit 1
    # Debian's .pc files name /usr: point them at the unpacked tree.
    sed -i "s#/usr#$ROOT/$BUNDLE/usr#g" "$BUNDLE"/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc
    # A library this machine has itself (same soname: the same ABI, likely newer) is taken from the machine, so
    # LD_LIBRARY_PATH does not put Debian's older copy in front of what its other programs were built against.
    local cache dropped=0 f lib=$BUNDLE/usr/lib/x86_64-linux-gnu
    cache=$( (ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null) | awk '{print $1}')
    for f in "$lib"/*.so.*; do
      [ -e "$f" ] || continue  # the target of a soname removed before
      case ${f##*/} in libav*|libsw*|libpkgconf*) continue ;; esac
      if grep -qxF "${f##*/}" <<< "$cache"; then
        [ -L "$f" ] && rm -f "$lib/$(readlink "$f")"
        rm -f "$f"; dropped=$((dropped + 1))
      fi
    done
    echo "libraries: $dropped taken from this machine (same soname), $(ls "$lib" | grep -c '\.so\.') files from the bundle"
    touch "$BUNDLE/.unpacked"
  fi
  rm -f "$BUNDLE/.usable"
  echo "unpacked: $(du -sh "$BUNDLE" | cut -f1) in $BUNDLE"
  local lib=$ROOT/$BUNDLE/usr/lib/x86_64-linux-gnu
  # Every library must load with this machine's glibc; ldd names what is missing.
  local missing
  missing=$(LD_LIBRARY_PATH=$lib ldd "$lib"/libavformat.so.* "$lib"/libavcodec.so.* "$lib"/libswscale.so.* 2>&1 \
            | grep -E "not found|GLIBC" | sort -u)
  if [ -n "$missing" ]; then echo "$missing"; echo "the FFmpeg bundle cannot load here (above)"; exit 1; fi
  LD_LIBRARY_PATH=$lib "$PY" -c "import ctypes; [ctypes.CDLL(n) for n in ('libavutil.so.57', 'libavcodec.so.59', 'libavformat.so.59', 'libswscale.so.6')]; print('FFmpeg libraries load')" || exit 1
  touch "$BUNDLE/.usable"
}

stage_build() {
  # The GPU machine compiles the CUDA kernels; a dry run with a build at hand only configures (no compile), else
  # it builds the CPU kernels.
  local cuda=ON compile=1
  if [ "$DRY" = 1 ]; then
    cuda=OFF
    if ls pyvidfast/_C*.so >/dev/null 2>&1; then
      compile=0
      echo "dry run: a build exists (pyvidfast/_C*.so); configure only, into $BUILD_DIR"
    fi
  fi
  local cmake="" ninja gen=()
  # The first CMake new enough for CMakeLists.txt (3.26): next to the interpreter (a venv's), then on PATH.
  local candidate version
  for candidate in "$(dirname "$PY")/cmake" "$(command -v cmake)"; do
    [ -x "$candidate" ] || continue
    version=$("$candidate" --version | awk 'NR == 1 {print $3}')
    if printf '3.26\n%s\n' "$version" | sort -V -C; then cmake=$candidate; break; fi
    echo "cmake $candidate is $version, older than 3.26"
  done
  [ -n "$cmake" ] || { echo "no cmake >= 3.26 found (next to $PY or on PATH)"; exit 1; }
  ninja=$(command -v "$(dirname "$PY")/ninja" || command -v ninja) && gen=(-G Ninja -DCMAKE_MAKE_PROGRAM="$ninja")
  echo "cmake: $cmake ($("$cmake" --version | head -1)); generator: ${gen[1]:-default}; $(nproc_all) cores"
  local link=()
  # The bundle's libraries need each other at link time too.
  [ -f "$BUNDLE/.usable" ] && link=("-DCMAKE_SHARED_LINKER_FLAGS=-Wl,-rpath-link,$ROOT/$BUNDLE/usr/lib/x86_64-linux-gnu")
  local t0=$SECONDS
  rm -f "$BUILD_DIR/CMakeCache.txt"
  "$cmake" -S . -B "$BUILD_DIR" "${gen[@]}" -DPython_EXECUTABLE="$PY" -DVIDFAST_INPLACE=ON \
    -DVIDFAST_CUDA=$cuda -DVIDFAST_CUDA_ARCHS=9.0a -DVIDFAST_FFMPEG=AUTO "${link[@]}" 2>&1 | tee "$OUT/configure.log"
  local rc=${PIPESTATUS[0]}
  local t_conf=$((SECONDS - t0))
  if grep -q "FFmpeg" "$OUT/configure.log"; then
    grep -E "pyvidfast: CUDA kernels|FFmpeg" "$OUT/configure.log" | head -3
  fi
  if [ "$rc" != 0 ]; then
    grep -qi "ffmpeg\|libav" "$OUT/configure.log" && echo "configure failed on FFmpeg: this CMake requires it and" \
      "this machine lacks it (pkg-config: $(command -v pkg-config || echo missing); bundle usable:" \
      "$([ -f "$BUNDLE/.usable" ] && echo yes || echo no))"
    exit 1
  fi
  if [ "$compile" = 0 ]; then
    echo "configure: ${t_conf} s (no compile in a dry run)"
  else
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc_all) "$cmake" --build "$BUILD_DIR" -j "$(nproc_all)" || exit 1
    echo "build: configure ${t_conf} s, compile $((SECONDS - t0 - t_conf)) s on $(nproc_all) cores"
  fi
  "$PY" -c "import json, pyvidfast; print('built:', json.dumps(pyvidfast.build_info()))" || exit 1
  if ! "$PY" -c "import sys; from bench.common_gpu import reader_built; sys.exit(0 if reader_built() else 1)"; then
    local absent=""
    if command -v "${PKG_CONFIG:-pkg-config}" >/dev/null; then
      for m in libavformat libavcodec libavutil libswscale; do "${PKG_CONFIG:-pkg-config}" --exists $m || absent+=" $m"; done
    else
      absent=" pkg-config itself"
    fi
    echo "frame reader not built (NVDEC and the conversion are not checked): missing${absent:- (see configure.log)}"
  fi
  if [ "$DRY" = 0 ]; then
    "$PY" -c "import pyvidfast, sys; sys.exit(0 if pyvidfast.build_info()['cuda_kernels'] else 1)" \
      || { echo "the library has no CUDA kernels"; exit 1; }
  fi
}

ensure_pytest() {
  "$PY" -c "import pytest" 2>/dev/null && return 0
  if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
    # Pure-Python wheels are zip files that work unpacked on sys.path: no pip, no site-packages to write.
    mkdir -p "$PYLIB"
    for wheel in "$CARRY"/wheels/*.whl; do "$PY" -m zipfile -e "$wheel" "$PYLIB" || exit 1; done
    export PYTHONPATH=$ROOT/$PYLIB${PYTHONPATH:+:$PYTHONPATH}
    "$PY" -c "import pytest; print('pytest', pytest.__version__, 'from $CARRY/wheels')" && return 0
  fi
  echo "pytest is not installed and $CARRY/wheels has no wheels for it"; exit 1
}

# The suite's CUDA tests: every test whose name or parameters say cuda/gpu/nvdec (the device-parametrized ones);
# not this script's own dry-run test.
PYTEST_SELECT="cuda or gpu or nvdec"
# A module that cannot import there (test_io needs PyAV) is reported; the other modules still run.
PYTEST_ARGS=(tests -q -p no:cacheprovider --ignore=tests/test_gpu_check.py --continue-on-collection-errors
             -k "$PYTEST_SELECT")
stage_tests() {
  ensure_pytest
  if [ "$DRY" = 1 ]; then
    "$PY" -m pytest "${PYTEST_ARGS[@]}" --collect-only | tail -3
    exit "${PIPESTATUS[0]}"
  fi
  "$PY" -m pytest "${PYTEST_ARGS[@]}" -rfEs --junitxml="$OUT/pytest.xml"
}

stage_parity() { "$PY" -m bench.parity_gpu ${DRY_FLAG:-}; }

stage_sanitizer() {
  local sanitizer="" nvcc_dir candidate
  nvcc_dir=$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent/nvcc)")")
  for candidate in "$(command -v compute-sanitizer)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
                   "$nvcc_dir/compute-sanitizer" "$nvcc_dir/../compute-sanitizer/compute-sanitizer"; do
    [ -n "$candidate" ] && [ -x "$candidate" ] && { sanitizer=$candidate; break; }
  done
  if [ "$DRY" = 1 ]; then
    "$PY" -m bench.sanitize_gpu --dry-run || exit 1
    skip "dry run: the cases ran without compute-sanitizer (${sanitizer:-not found here})"
  fi
  [ -n "$sanitizer" ] || skip "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, the toolkit of nvcc)"
  local rc=0 filter=(--kernel-name kns=vidfast)
  for tool in memcheck racecheck; do
    echo "--- compute-sanitizer --tool $tool"
    # Only our kernels are checked (torch's own run unchecked), which keeps the run short.
    "$sanitizer" --tool "$tool" --error-exitcode 9 "${filter[@]}" "$PY" -m bench.sanitize_gpu --tool "$tool" \
      > "$OUT/sanitizer-$tool.log" 2>&1
    local r=$?
    if [ "$r" != 0 ] && [ "$r" != 9 ] && grep -qiE "unrecognized|invalid.*(option|kernel-name)" "$OUT/sanitizer-$tool.log"; then
      echo "this compute-sanitizer rejects ${filter[*]}: every kernel is checked"; filter=()
      "$sanitizer" --tool "$tool" --error-exitcode 9 "$PY" -m bench.sanitize_gpu --tool "$tool" \
        > "$OUT/sanitizer-$tool.log" 2>&1
      r=$?
    fi
    tail -25 "$OUT/sanitizer-$tool.log"
    echo "$tool: exit $r ($(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer-$tool.log" | tail -1))"
    [ "$r" = 0 ] || rc=1
  done
  exit $rc
}

stage_nvdec() { "$PY" -m bench.video_reader_gpu --nvdec-check ${DRY_FLAG:-}; }
stage_bench-attention() { "$PY" -m bench.varlen_attention_gpu ${DRY_FLAG:-}; }
stage_bench-rlt() { "$PY" -m bench.rlt_gpu ${DRY_FLAG:-}; }
stage_bench-group-topk() { "$PY" -m bench.group_topk_gpu ${DRY_FLAG:-}; }
stage_bench-convert() { "$PY" -m bench.video_reader_gpu ${DRY_FLAG:-}; }
stage_bench-model() { "$PY" -m bench.model_gpu ${DRY_FLAG:-}; }

if [ -n "$STAGE" ]; then  # child: one stage
  stage_env
  [ "$DRY" = 1 ] && DRY_FLAG=--dry-run
  export VIDFAST_NVTX=1  # NVTX ranges on (a no-op where the nvtx package is missing)
  case $STAGE in env) stage_env_facts ;; *) "stage_$STAGE" ;; esac
  exit $?
fi

# --------------------------------------------------------------------------------------------- the driver
# A dry run checks that every stage runs, not how fast: on a shared, busy 2-core machine it gets 10x the time
# (each stage is one small process with tiny sizes; the waiting is for CPU time).
SCALE=$([ "$DRY" = 1 ] && echo "${GPU_CHECK_DRY_SCALE:-10}" || echo 1)
TOTAL=${GPU_CHECK_BUDGET_S:-$((530 * SCALE))}
LOG=$OUT/gpu_check.log
RESULTS=$OUT/stages.tsv
: > "$RESULTS"
exec > >(tee "$LOG") 2>&1
TEE_PID=$!
START=$(date +%s)
DEADLINE=$((START + TOTAL))
echo "gpu_check $( [ "$DRY" = 1 ] && echo "(dry run) ")at $(date -u +%FT%TZ) on $(hostname), $(nproc_all) cores;" \
     "python $PY; OUT=$OUT; budget ${TOTAL} s"

for name in "${STAGES[@]}"; do
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then continue; fi
  left=$((DEADLINE - $(date +%s) - 10))  # 10 s kept for the summary
  budget=$((BUDGET[$name] * SCALE))
  [ "$budget" -gt "$left" ] && budget=$left
  echo
  echo "=== $name (budget ${budget} s) ==="
  if [ "$budget" -lt 5 ]; then
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" skipped 0 "$((BUDGET[$name] * SCALE))" "no time left in the run's budget" \
      >> "$RESULTS"
    echo "skipped: no time left"; continue
  fi
  t0=$(date +%s)
  timeout --kill-after=5 "$budget" bash "$0" --stage "$name" $( [ "$DRY" = 1 ] && echo --dry-run ) \
    2>&1 | tee "$OUT/stage-$name.log"
  rc=${PIPESTATUS[0]}
  secs=$(( $(date +%s) - t0 ))
  case $rc in
    0) status=ok; note="" ;;
    77) status=skipped; note=$(grep "^skipped: " "$OUT/stage-$name.log" | tail -1 | sed 's/^skipped: //') ;;
    124|137) status=timeout; note="stopped at its budget of ${budget} s" ;;
    *) status=failed; note="exit $rc: $(grep -v '^\s*$' "$OUT/stage-$name.log" | tail -1 | cut -c1-200)" ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$secs" "$budget" "$note" >> "$RESULTS"
  echo "--- $name: $status in ${secs} s${note:+ ($note)}"
  [ "$name" = ffmpeg ] && stage_env  # later stages build and run against the bundle when it is usable
done

echo
stage_env
"$PY" -m bench.summary_gpu "$RESULTS" --seconds $(( $(date +%s) - START )) $( [ "$DRY" = 1 ] && echo --dry-run )
rc=$?  # 1 when a stage failed or ran over its budget
exec 1>&- 2>&-
wait "$TEE_PID"  # the log is complete when the script exits
exit $rc
