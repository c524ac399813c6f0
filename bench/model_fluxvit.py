"""FluxViT-S/B inference at token budgets 3072 / 2048 / 1024 against all tokens of the same clip: throughput and
peak memory. The clip is sampled densely (16 frames at 252^2 = 5184 tokens, the token-optimization way) and
group_topk cuts it to each budget. Run: python -m bench.model_fluxvit [--models small base] [--repeats 3]

CPU peak memory is the process's peak resident set during the forward minus its resident set before it (Linux
VmHWM, reset through /proc/self/clear_refs); the script re-runs itself with a fixed glibc mmap threshold so that
freed tensors leave the resident set. GPU peak memory is torch's peak allocation.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from bench.common import markdown_table, time_fn, write_json
from pyvidfast.flux import token_count
from pyvidfast.models import create_model

BUDGETS = (None, 3072, 2048, 1024)  # None: all tokens


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_memory_mib(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = _rss_kib("VmRSS")
    fn()
    return (_rss_kib("VmHWM") - before) / 1024


def process_time_ms(fn, repeats: int) -> float:
    """Median CPU time of the process per call: on a shared machine it leaves out the time others held the core."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1e3)
    return statistics.median(times)


def main():
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # glibc otherwise raises its mmap threshold after frees and keeps freed blocks resident.
        os.environ.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
        os.execv(sys.executable, [sys.executable, "-m", "bench.model_fluxvit", *sys.argv[1:]])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small", "base"], choices=["small", "base"])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=252)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else None
    video = torch.randn(args.batch, 3, args.frames, args.resolution, args.resolution, device=device, dtype=dtype)
    all_tokens = token_count(args.frames, args.resolution)
    rows, results = [], []
    runs = [(m, b) for m in args.models for b in BUDGETS]
    model, model_name = None, None
    for name, budget in tqdm(runs, desc="FluxViT budgets"):
        if name != model_name:
            model_name = name
            model = create_model(f"fluxvit_{name}_patch14", num_classes=400).to(device, dtype).eval()

        def forward():
            with torch.no_grad():
                model(video, budget=budget)

        tokens = all_tokens if budget is None else min(budget, all_tokens)
        peak = peak_memory_mib(forward, device)
        t = time_fn(forward, repeats=args.repeats, warmup=0, sync=sync)  # the memory run warmed up
        cpu_ms = process_time_ms(forward, args.repeats)
        clips_per_s = args.batch / (t["median_ms"] * 1e-3)
        results.append({"model": name, "budget": budget, "tokens": tokens, "time": t, "clips_per_s": clips_per_s,
                        "process_cpu_ms": cpu_ms, "peak_mib": peak})
        rows.append([f"FluxViT-{name[0].upper()}", "all" if budget is None else budget, tokens, t["median_ms"],
                     cpu_ms, clips_per_s, peak])
    # Speed-up (by wall and by CPU time) and memory against all tokens, per model.
    for row in rows:
        ref = next(r for r in rows if r[0] == row[0] and r[1] == "all")
        row += [ref[3] / row[3], ref[4] / row[4], row[6] / ref[6]]
    print(f"FluxViT forward on {device} ({dtype}), batch {args.batch}, {args.frames} x {args.resolution}^2 = "
          f"{all_tokens} tokens, medians of {args.repeats}, {torch.get_num_threads()} CPU threads")
    print(markdown_table(["model", "budget", "tokens", "wall ms", "CPU ms", "clips/s (wall)", "peak MiB",
                          "speed-up vs all (wall)", "(CPU time)", "memory vs all"], rows))
    print("wrote", write_json("model_fluxvit", {"device": device, "dtype": str(dtype), "frames": args.frames,
                                                "resolution": args.resolution, "batch": args.batch,
                                                "results": results}))


if __name__ == "__main__":
    main()
