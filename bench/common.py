"""Shared benchmark harness: medians over repeats, the machine's limits measured in the same run, JSON output
(with the machine it ran on), and the Markdown table that ``python -m bench.report`` puts into the docs."""

import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

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


def time_interleaved(fns: dict, repeats: int, once: frozenset = frozenset()) -> dict:
    """Median, min and max ms of each fn, timed in turns (one call of each per round) so that a change in the load of
    a shared machine, or in the memory bandwidth it gets, affects every path alike. Paths in `once` (slow ones) get
    one call and no warm-up."""
    times = {name: [] for name in fns}
    for name, fn in fns.items():
        if name not in once:
            fn()  # warm-up (and compilation, for FlexAttention)
    for round_ in range(repeats):
        for name, fn in fns.items():
            if name in once and round_ > 0:
                continue
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t), "max_ms": max(t), "repeats": len(t)}
            for name, t in times.items()}


def copy_floor(nbytes: int):
    """The memory floor as a callable: one copy of nbytes (read + write) between two buffers made once."""
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def with_bandwidth(timing: dict, nbytes: int) -> dict:
    """A copy's timing with its size and GB/s of bytes read."""
    return {**timing, "bytes": nbytes, "gb_per_s": nbytes / (timing["median_ms"] * 1e-3) / 1e9}


def copy_bandwidth(nbytes: int, repeats: int = 10) -> dict:
    """The memory floor: one copy of nbytes, as GB/s of bytes read, and its median time."""
    return with_bandwidth(time_fn(copy_floor(nbytes), repeats=repeats), nbytes)


def matmul_rate(n: int = 1024, dtype=torch.float32, repeats: int = 5) -> dict:
    """The compute limit: the best GFLOP/s of an n x n x n CPU matmul, through torch.mm and through oneDNN directly.
    torch.mm runs MKL, which takes a generic AVX2 path on AMD CPUs; oneDNN's JIT kernels use AVX-512 there and can
    be twice as fast, so the faster of the two is the limit."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    paths = {"torch.mm": lambda: torch.mm(a, b)}
    if torch.backends.mkldnn.is_available():
        a_onednn, b_onednn = a.to_mkldnn(), b.to_mkldnn()
        paths["oneDNN"] = lambda: torch._C._nn.mkldnn_linear(a_onednn, b_onednn)  # a @ b.T: the same work
    by_path = {}
    for name, fn in paths.items():
        try:
            fn()
        except RuntimeError:  # oneDNN has no bf16 matmul on CPUs without AVX-512 (or AVX-NE-CONVERT)
            continue
        t = time_fn(fn, repeats=repeats)
        by_path[name] = {**t, "gflop_per_s": 2 * n**3 / (t["median_ms"] * 1e-3) / 1e9}
    best = max(by_path, key=lambda k: by_path[k]["gflop_per_s"])
    return {**by_path[best], "n": n, "dtype": str(dtype), "path": best, "by_path": by_path}


# CPU features that decide which kernels run (ATen's and ours): the widest vector ISA and the dot-product extensions.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_vbmi", "avx512_bf16",
             "amx_bf16", "amx_tile")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's model name and which of ISA_FLAGS it has, from /proc/cpuinfo (Linux; elsewhere platform's guess)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), []
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", platform.machine()), [f for f in ISA_FLAGS if f in flags]


def isa_level(flags: list[str]) -> str:
    """avx512_bf16, avx512, avx2 or baseline: the level a reader compares runs by."""
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "baseline"


def machine() -> dict:
    model, flags = cpu_model_and_flags()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": model,
        "isa": isa_level(flags),
        "isa_flags": flags,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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


def grouped_bar_chart(labels: list[str], series: dict[str, list[float]], ylabel: str, title: str, out: Path) -> Path:
    """A PNG of one bar per series for each label, on a log scale (missing values: nan, no bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(8, len(labels) * 0.8), 4.5))
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(labels))], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, fontsize=7, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def cpu_allocations(run) -> tuple[list[tuple[float, int]], float | None]:
    """``run()`` under the profiler's memory events: [(time in us, bytes allocated by then since the start)] in
    time order, and the time a ``"forward"`` range that ``run`` may open ends (None without one)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                    key=lambda e: e["ts"])
    if not memory:
        raise RuntimeError("the profiler recorded no CPU memory events")
    # The running total counts every allocation since profiling first started in this process: start from zero.
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    forward = next((e for e in events if e.get("name") == "forward" and e.get("ph") == "X"), None)
    totals = [(e["ts"], e["args"]["Total Allocated"] - start) for e in memory]
    return totals, None if forward is None else forward["ts"] + forward["dur"]
