#!/usr/bin/env bash
# `make sanitize`: builds the library with AddressSanitizer + UndefinedBehaviorSanitizer (+ LeakSanitizer at exit)
# in build/sanitize (gcc, CPU kernels only) and runs tests against it. Usage:
#   sanitize/run.sh [test files or pytest arguments]      (default: $SANITIZE_TESTS below)
# The Python interpreter is not instrumented, so the ASan runtime is preloaded into it (LD_PRELOAD); the tests
# import a copy of the package beside the instrumented library (build/sanitize/python), not the source tree's.
# docs/reliability.md explains the options.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
BUILD=$ROOT/build/sanitize
FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
TESTS=("$@")
if [ ${#TESTS[@]} -eq 0 ]; then
  TESTS=(tests/test_rlt.py tests/test_group_topk.py tests/test_varlen_attention.py tests/test_video_reader.py
         tests/test_ops_properties.py tests/test_concurrency.py tests/test_fuzz_regressions.py)
fi

# -g1: line tables only. Reports still name file:line, and the build takes half the time of -g (torch's headers).
start=$(date +%s)
if [ ! -f "$BUILD/build.ninja" ]; then
  "$VENV/bin/cmake" -S . -B "$BUILD" -G Ninja -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" \
    -DPython_EXECUTABLE="$VENV/bin/python" -DVIDFAST_INPLACE=OFF -DVIDFAST_CUDA=OFF \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -g1 -DNDEBUG" \
    "-DCMAKE_CXX_FLAGS=$FLAGS" "-DCMAKE_SHARED_LINKER_FLAGS=$FLAGS"
fi
"$VENV/bin/cmake" --build "$BUILD"
echo "sanitize build: $(( $(date +%s) - start )) s"

rm -rf "$BUILD/python" && mkdir -p "$BUILD/python"
tar -c --exclude='_C*.so' --exclude=__pycache__ pyvidfast | tar -x -C "$BUILD/python"
cp "$BUILD/_C.so" "$BUILD/python/pyvidfast/"

# libstdc++ is preloaded too: ASan intercepts __cxa_throw and must find the real one when it starts, before the
# interpreter (which does not link libstdc++) loads it; without it the first C++ exception aborts in a CHECK.
export LD_PRELOAD
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
# halt_on_error: the first report fails the run. detect_leaks: LeakSanitizer at exit, with the suppressions of
# the interpreter's and torch's own start-up allocations (sanitize/lsan.supp). alloc_dealloc_mismatch=0 and
# detect_odr_violation=0: torch's uninstrumented libraries trip both without a bug of ours (new[]/delete pairs
# split across libraries, symbols defined in several of torch's libraries).
export ASAN_OPTIONS=halt_on_error=1:detect_leaks=1:alloc_dealloc_mismatch=0:detect_odr_violation=0:allocator_may_return_null=1
export LSAN_OPTIONS=suppressions=$ROOT/sanitize/lsan.supp:print_suppressions=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# -s: a report aborts the process, and pytest's captured output (where the report went) would be lost with it.
export VIDFAST_SANITIZE=1 VIDFAST_HYPOTHESIS_PROFILE=${VIDFAST_HYPOTHESIS_PROFILE:-thorough}
export PYTHONPATH=$BUILD/python  # subprocesses of the tests import the instrumented copy too
cd "$BUILD/python"  # python -c puts the working folder first on sys.path
"$VENV/bin/python" -c "import pyvidfast, pyvidfast.ops; print('sanitize: testing', pyvidfast.__file__)"
start=$SECONDS  # no `date`: every program run from here on has the ASan runtime preloaded (and LSan's exit code)
status=0
"$VENV/bin/python" -m pytest -q -s -p no:cacheprovider -o "pythonpath=$BUILD/python" --rootdir "$ROOT" \
  "${TESTS[@]/#tests\//$ROOT/tests/}" || status=$?
echo "sanitize tests: $(( SECONDS - start )) s"
exit $status
