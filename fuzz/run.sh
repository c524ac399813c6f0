#!/usr/bin/env bash
# `make fuzz SECONDS=600`: coverage-guided fuzzing of the frame reader's C++ core with libFuzzer (clang; ASan +
# UBSan + LeakSanitizer), seeded by fuzz/make_corpus.py. Usage: fuzz/run.sh SECONDS [extra libFuzzer flags]
# The corpus grows in build/fuzz/corpus (kept between runs); crashes land in build/fuzz/crashes. A crash is fixed
# in the reader and its input copied to tests/data/fuzz/ (tests/test_fuzz_regressions.py replays it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
BUILD=$ROOT/build/fuzz
SECONDS_TO_RUN=${1:-600}
shift || true

if ! command -v clang++ >/dev/null; then
  echo "fuzz: installing clang (Debian's, for libFuzzer)"
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang
fi
start=$(date +%s)
if [ ! -f "$BUILD/build.ninja" ]; then
  "$VENV/bin/cmake" -S fuzz -B "$BUILD" -G Ninja -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" \
    -DCMAKE_CXX_COMPILER=clang++ -DPython_EXECUTABLE="$VENV/bin/python"
fi
"$VENV/bin/cmake" --build "$BUILD"
echo "fuzz build: $(( $(date +%s) - start )) s"

mkdir -p "$BUILD/corpus" "$BUILD/crashes"
[ -d "$BUILD/seeds" ] || "$VENV/bin/python" fuzz/make_corpus.py "$BUILD/seeds"
# One worker process (the build machines have 2 cores) that goes on after a finding (-fork=1 -ignore_*), so one
# run collects them all; inputs up to 64 KiB; an input may take 10 s and 2 GB.
"$BUILD/fuzz_reader" -max_total_time="$SECONDS_TO_RUN" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
  -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
  -dict=fuzz/mp4.dict -artifact_prefix="$BUILD/crashes/" -print_final_stats=1 "$@" \
  "$BUILD/corpus" "$BUILD/seeds" "$ROOT/tests/data/fuzz"
