#!/usr/bin/env bash
# Assembles build/gpu-carry/, what bench/gpu_check.sh needs on the GPU machine (no network, no FFmpeg development
# files) and cannot find there; carry it with the device tool (carry: ["build/gpu-carry"], 64 MiB at most):
#   ffmpeg.tar.xz  Debian's libavcodec59, libavformat59, libavutil57, libswscale6, libswresample4, their -dev
#                  packages (headers, .pc files), pkgconf, and the shared libraries all of them need (their
#                  DT_NEEDED closure, except glibc, libstdc++ and libgcc), fetched with `apt-get download` and
#                  unpacked with `dpkg -x`; compressed, since unpacked it is ~160 MB. gpu_check.sh unpacks it into
#                  build/ffmpeg-bundle and drops the libraries the machine has itself.
#   samples/       the sample clips the NVDEC check decodes (bikes, balle-jbart: H.264 4:2:0; cockatoo: 4:4:4,
#                  which falls back to the CPU), for VIDFAST_CACHE.
#   frames.pt      the decoded 16 x 224 x 224 frames the GPU benchmarks use (bench.common_gpu.sample_frames), so
#                  they run even when the bundle cannot load there; left out with --no-frames, or when it does not
#                  fit beside the rest.
#   wheels/        pytest, expecttest and their dependencies (pure-Python wheels) for a python3 that lacks them.
# Prints what each part weighs and the total against the 64 MiB limit.
#
#   bash bench/gpu_ffmpeg_bundle.sh [--no-frames] [--rebuild-ffmpeg]
# An existing ffmpeg.tar.xz is kept unless --rebuild-ffmpeg (compressing it takes minutes on 2 cores).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
FRAMES=1 REBUILD=0
for arg in "$@"; do
  case $arg in
    --no-frames) FRAMES=0 ;;
    --rebuild-ffmpeg) REBUILD=1 ;;
    *) echo "gpu_ffmpeg_bundle: unknown argument $arg" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-$ROOT/.venv/bin/python}
CARRY=build/gpu-carry
WORK=build/ffmpeg-bundle-work
LIMIT=$((64 * 1024 * 1024))
mkdir -p "$CARRY" "$WORK"

# ------------------------------------------------------------------------------------------------- FFmpeg
if [ -f "$CARRY/ffmpeg.tar.xz" ] && [ "$REBUILD" = 0 ]; then
  echo "keeping $CARRY/ffmpeg.tar.xz (--rebuild-ffmpeg makes it anew)"
else
SEED=(libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavcodec-dev libavformat-dev
      libavutil-dev libswscale-dev libswresample-dev pkgconf-bin libpkgconf3)
# Present on every glibc machine (and tied to its glibc/compiler): never carried.
BASE='^(libc|libm|libmvec|libpthread|libdl|librt|libresolv|libutil|ld-linux-x86-64|libstdc\+\+|libgcc_s)\.so'
LIBDIR=/usr/lib/x86_64-linux-gnu
owner() {  # the Debian package that ships shared library $1 (a soname) on this machine
  dpkg -S "*/$1" 2>/dev/null | awk -F': ' -v n="/$1" 'substr($2, length($2) - length(n) + 1) == n {print $1; exit}' \
    | sed 's/:amd64$//; s/, .*//'
}
closure=$( { for lib in libavcodec.so.59 libavformat.so.59 libavutil.so.57 libswscale.so.6 libswresample.so.4; do
               ldd "$LIBDIR/$lib"; done; ldd "$(command -v pkgconf)"; } | awk '$2 == "=>" && $3 ~ /^\// {print $1}' \
           | grep -vE "$BASE" | sort -u)
packages=("${SEED[@]}")
for so in $closure; do
  pkg=$(owner "$so")
  [ -n "$pkg" ] || { echo "no package ships $so here (apt-get install the FFmpeg -dev packages first)"; exit 1; }
  packages+=("$pkg")
done
mapfile -t packages < <(printf '%s\n' "${packages[@]}" | sort -u)
echo "FFmpeg bundle: ${#packages[@]} Debian packages for ${#SEED[@]} seeds + $(wc -w <<< "$closure") libraries"
rm -rf "$WORK/debs" "$WORK/root" && mkdir -p "$WORK/debs" "$WORK/root"
(cd "$WORK/debs" && apt-get download -q "${packages[@]}" >/dev/null)
for deb in "$WORK"/debs/*.deb; do dpkg -x "$deb" "$WORK/root"; done
# One library folder (Debian 12 puts some under /lib), no docs, no manuals.
root=$WORK/root
if [ -d "$root/lib/x86_64-linux-gnu" ]; then
  mkdir -p "$root$LIBDIR" && cp -a "$root"/lib/x86_64-linux-gnu/. "$root$LIBDIR"/ && rm -rf "$root/lib"
fi
rm -rf "$root"/usr/share "$root"/etc
find "$root" -name '*.a' -delete  # static archives of the -dev packages: the build links the shared libraries
find "$root$LIBDIR" -mindepth 1 -maxdepth 1 -type d ! -name pkgconfig -exec rm -rf {} +  # plugins, loaders
missing=$(cd "$root$LIBDIR" && for so in $closure libavcodec.so.59 libavformat.so.59 libswscale.so.6; do
            [ -e "$so" ] || echo "$so"; done)
[ -z "$missing" ] || { echo "the unpacked packages lack: $missing"; exit 1; }
ls "$root$LIBDIR"/pkgconfig/libavformat.pc >/dev/null
echo "unpacked: $(du -sh "$root" | cut -f1)"
tar -C "$root" -cf - usr | xz -T0 -6 > "$CARRY/ffmpeg.tar.xz.part"
mv "$CARRY/ffmpeg.tar.xz.part" "$CARRY/ffmpeg.tar.xz"
fi

# ------------------------------------------------------------------------------------------- clips, frames
rm -rf "$CARRY/samples" && mkdir -p "$CARRY/samples"
"$PY" -c "
import shutil
from bench.common_gpu import CARRIED_CLIPS
from pyvidfast.samples import sample_path
for clip in CARRIED_CLIPS:
    shutil.copy(sample_path(clip), '$CARRY/samples/')"
rm -f "$CARRY/frames.pt"
if [ "$FRAMES" = 1 ]; then
  "$PY" - "$CARRY/frames.pt" <<'EOF'
import sys

import torch

from bench.common_gpu import frames_key, sample_frames
from bench.rlt_gpu import batch_spec

# The clips the GPU benchmarks read: bench.rlt_gpu's batch (which bench.model_gpu's batches reuse).
frames = {frames_key(name, 16, 224, start): sample_frames(name, 16, 224, start) for name, start in batch_spec()}
torch.save(frames, sys.argv[1])
EOF
fi

# ------------------------------------------------------------------------------------------------ wheels
rm -rf "$CARRY/wheels"
"$PY" -m pip download -q --only-binary :all: -d "$CARRY/wheels" pytest expecttest

# ------------------------------------------------------------------------------------------------- total
du -b --apparent-size -s "$CARRY"/* | awk '{printf "  %6.1f MiB  %s\n", $1 / 1048576, $2}'
total=$(du -b --apparent-size -s "$CARRY" | cut -f1)
if [ "$total" -gt "$LIMIT" ] && [ -f "$CARRY/frames.pt" ]; then
  # The bundle matters more (NVDEC, the reader's tests, decoding the clips there); the frames are a fallback.
  rm "$CARRY/frames.pt"
  echo "frames.pt left out: it does not fit beside the rest (the GPU benchmarks decode the carried clips there)"
  total=$(du -b --apparent-size -s "$CARRY" | cut -f1)
fi
awk -v t="$total" 'BEGIN {printf "build/gpu-carry: %.1f MiB of the 64 MiB carry limit\n", t / 1048576}'
[ "$total" -le "$LIMIT" ] || { echo "over the carry limit"; exit 1; }
