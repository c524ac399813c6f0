"""GPU benchmark helpers for bench/*_gpu.py and bench/gpu_check.sh: CUDA-event timing, the same-run bf16 matmul
rate and device copy bandwidth (the machine's limits), sample frames that work without FFmpeg, and result files in
$OUT (default bench/results/gpu/).

Every ``*_gpu.py`` script takes ``--dry-run``: the same code on the CPU with tiny sizes and one repeat, so that
``bash bench/gpu_check.sh --dry-run`` catches a broken script on a machine without a GPU.
"""

import argparse
import json
import os
import statistics
from functools import cache
from pathlib import Path

import torch

from bench.common import machine, markdown_table

REPO = Path(__file__).resolve().parents[1]
# What bench/gpu_ffmpeg_bundle.sh prepares here for the GPU machine (sample clips, decoded frames, FFmpeg).
CARRY_DIR = REPO / "build" / "gpu-carry"
FRAMES_FILE = CARRY_DIR / "frames.pt"
# The sample clips that travel to the GPU machine (vtest.avi, 8 MB of MS-MPEG4 that NVDEC cannot decode, stays).
CARRIED_CLIPS = ("bikes.mp4", "balle-jbart.mp4", "cockatoo.mp4")


def out_dir() -> Path:
    path = Path(os.environ.get("OUT") or REPO / "bench" / "results" / "gpu")
    path.mkdir(parents=True, exist_ok=True)
    return path


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, one repeat: checks the script runs")
    p.add_argument("--repeats", type=int, default=20)
    return p


def device_for(args) -> torch.device:
    """cuda for a real run (which needs a GPU and a build with CUDA kernels), cpu for --dry-run."""
    if args.dry_run:
        return torch.device("cpu")
    import pyvidfast

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch (use --dry-run on a machine without a GPU)")
    if not pyvidfast.build_info()["cuda_kernels"]:
        raise SystemExit("this build of pyvidfast has no CUDA kernels: rebuild with VIDFAST_CUDA=ON")
    return torch.device("cuda")


def sync_for(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def time_device(fn, device: torch.device, repeats: int = 20, warmup: int = 3) -> dict:
    """Median/min/max milliseconds of fn(): CUDA events around each call on a GPU (no host gaps counted), the wall
    clock on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        import time

        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "repeats": repeats}


def matmul_rate(device: torch.device, dtype=torch.bfloat16, n: int = 8192, repeats: int = 10) -> dict:
    """The compute limit in the same run: TFLOP/s of one n x n x n matmul in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_device(lambda: a @ b, device, repeats)
    return {**t, "n": n, "dtype": str(dtype), "tflop_per_s": 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12}


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> dict:
    """The memory limit in the same run: one device-to-device copy of nbytes, as GB/s of bytes read."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = time_device(lambda: dst.copy_(src), device, repeats)
    return {**t, "bytes": nbytes, "gb_per_s": nbytes / (t["median_ms"] * 1e-3) / 1e9}


def reader_built() -> bool:
    import pyvidfast  # noqa: F401  (loads the library that registers the class)

    try:
        torch.classes.vidfast.VideoReader
        return True
    except RuntimeError:
        return False


def frames_key(name: str, frames: int, size: int, start: int = 0, stride: int = 2) -> str:
    return f"{name}:{frames}x{size}:{start}:{stride}"


@cache
def saved_frames() -> dict:
    return torch.load(FRAMES_FILE, weights_only=True) if FRAMES_FILE.exists() else {}


def frames_at_hand(name: str, frames: int, size: int, start: int = 0, stride: int = 2) -> bool:
    """Whether sample_frames can return these frames here (saved, or a built reader and the clip in the cache)."""
    from pyvidfast.samples import cache_dir

    return frames_key(name, frames, size, start, stride) in saved_frames() or (
        reader_built() and (cache_dir() / name).exists())


def sample_frames(name: str, frames: int, size: int, start: int = 0, stride: int = 2) -> torch.Tensor:
    """uint8 [frames, size, size, 3] of a sample clip: the frames bench/gpu_ffmpeg_bundle.sh decoded and saved
    when they are there (the GPU machine may have no FFmpeg, and the same frames make runs comparable), else
    decoded now."""
    key = frames_key(name, frames, size, start, stride)
    if key in saved_frames():
        return saved_frames()[key]
    if not reader_built():
        raise SystemExit(f"the frame reader is not built and {FRAMES_FILE} has no frames {key!r}: run "
                         "bench/gpu_ffmpeg_bundle.sh where FFmpeg is, and carry build/gpu-carry")
    from pyvidfast.io import decode_frames
    from pyvidfast.samples import sample_path

    return decode_frames(sample_path(name), frames, start=start, stride=stride, size=(size, size))


def write_result(name: str, payload: dict, rows: list[list] | None = None, headers: list[str] | None = None) -> Path:
    """$OUT/<name>.json with the machine facts; prints the table when given."""
    if rows is not None:
        table = markdown_table(headers, rows)
        print(table)
        payload = {**payload, "table": table}
    path = out_dir() / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))
    print(f"wrote {path}")
    return path
