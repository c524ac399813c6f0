"""Shared benchmark harness: medians over repeats, the machine's limits measured in the same run, JSON output,
and a Markdown table for the README."""

import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_fn(fn, repeats: int = 10, warmup: int = 2, sync=None) -> dict:
    """Median, min and max wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "repeats": repeats}


def copy_bandwidth(nbytes: int, repeats: int = 10) -> dict:
    """The memory floor: one copy of nbytes (read + write), as GB/s of bytes read, and its median time."""
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), repeats=repeats)
    return {**t, "bytes": nbytes, "gb_per_s": nbytes / (t["median_ms"] * 1e-3) / 1e9}


def matmul_rate(n: int = 1024, dtype=torch.float32, repeats: int = 5) -> dict:
    """The compute limit: torch.mm GFLOP/s on n x n matrices."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    t = time_fn(lambda: torch.mm(a, b), repeats=repeats)
    return {**t, "n": n, "dtype": str(dtype), "gflop_per_s": 2 * n**3 / (t["median_ms"] * 1e-3) / 1e9}


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
