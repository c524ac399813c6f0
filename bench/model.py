"""VideoMAE V2 ViT-S and ViT-B inference, dense versus RLT-packed, on batches of 16x224x224 clips of the real
sample clips.

For each sample clip a batch is cut from it (clips starting every ``--gap`` frames, every ``--stride``-th frame,
short side resized to 224, centre crop). Dense: Conv3d patch embedding and SDPA over all 1568 tokens per clip.
Packed: ``rlt_tokenize`` (included in the time) and ``varlen_attention`` over the kept tokens. Dense and packed run
back to back in each round, so load changes on a shared machine hit both; the speed-up is the median of the
per-round ratios. Reported: median times, clips/s, peak memory of one forward (CUDA: max allocated; CPU: peak RSS
growth sampled every millisecond after ``malloc_trim``), tokens kept per clip, speed-up, and the target
0.8 / share kept. The machine's limit is torch.mm's GFLOP/s in the same run; the achieved GFLOP/s (counted
multiply-adds x 2 of the model) stand next to it.

    python -m bench.model [--batch 1] [--repeats 3] [--device cpu|cuda]
"""

import argparse
import ctypes
import os
import threading
import time
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, markdown_table, matmul_rate, time_fn, write_json
from pyvidfast import samples
from pyvidfast.models import create_model
from pyvidfast.models.videomae import normalize_video

MODELS = {"ViT-S": "videomae_vit_small_patch16_224", "ViT-B": "videomae_vit_base_patch16_224"}


def load_batch(name: str, batch: int, frames: int, stride: int, gap: int, size: int = 224) -> torch.Tensor:
    """uint8 [batch, frames, size, size, 3]: clips of one sample video starting gap frames apart."""
    clip = samples.CLIPS[name]
    scale = size / min(clip.width, clip.height)
    resized = (max(size, round(clip.height * scale)), max(size, round(clip.width * scale)))
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    path = samples.sample_path(name)
    clips = [samples.decode_frames(path, frames, start=i * gap, stride=stride, size=resized) for i in range(batch)]
    return torch.stack(clips)[:, :, top:top + size, left:left + size].contiguous()


def forward_flops(model, tokens_per_clip: list[int]) -> float:
    """Multiply-adds x 2 of the patch embedding, the blocks (projections, MLP, attention) and the head."""
    width = model.embed_dim
    hidden = model.blocks[0].mlp.fc1.out_features
    patch_dim = model.patch_embed.proj.weight[0].numel()
    total = 0.0
    for n in tokens_per_clip:
        per_block = n * (2 * 4 * width * width + 2 * 2 * width * hidden) + 2 * 2 * n * n * width
        total += n * 2 * patch_dim * width + len(model.blocks) * per_block
    return total


class PeakMemory:
    """Peak memory growth of the code inside the ``with`` block, in bytes."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS growth shows this forward's needs
        self.base = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak - self.base, 0)

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="clips per batch (default: 16 on GPU, 1 on CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stride", type=int, default=2, help="take every stride-th frame")
    parser.add_argument("--gap", type=int, default=40, help="frames between the starts of a batch's clips")
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (0: torch's default). On a busy shared machine every parallel region waits "
                             "for descheduled threads, a fixed cost per op that swamps small packed batches; 1 "
                             "thread gives times that follow the work")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch or (16 if device.type == "cuda" else 1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    limit = matmul_rate(1024) if device.type == "cpu" else _cuda_mm_rate(dtype)

    videos = {name: load_batch(name, batch, 16, args.stride, args.gap).to(device) for name in samples.CLIPS}
    rows, records = [], []
    for label, model_name in ((m, MODELS[m]) for m in args.models):
        torch.manual_seed(0)
        model = create_model(model_name).to(device=device, dtype=dtype).eval()
        total = model.patch_embed.num_patches
        dense_flops = forward_flops(model, [total] * batch)
        for clip_name, video in videos.items():
            with torch.no_grad():
                dense_input = normalize_video(video, dtype=dtype)
                kept = model.tokenize(video, args.threshold).cu_seqlens.diff().tolist()
                dense, packed, ratios = _interleaved(lambda: model(dense_input),
                                                     lambda: model(model.tokenize(video, args.threshold)),
                                                     args.repeats, sync)
                with PeakMemory(device) as dense_mem:
                    model(dense_input)
                with PeakMemory(device) as packed_mem:
                    model(model.tokenize(video, args.threshold))
            share = sum(kept) / (total * batch)
            speedup = sorted(ratios)[len(ratios) // 2]
            dense_gflops = dense_flops / (dense["median_ms"] * 1e-3) / 1e9
            packed_gflops = forward_flops(model, kept) / (packed["median_ms"] * 1e-3) / 1e9
            rows.append([label, clip_name, f"{min(kept)}-{max(kept)}", f"{share:.2f}", f"{dense['median_ms']:.0f}",
                         f"{packed['median_ms']:.0f}", f"{batch / packed['median_ms'] * 1e3:.2f}",
                         f"{dense_mem.peak / 2**20:.0f} / {packed_mem.peak / 2**20:.0f}", f"{speedup:.2f}",
                         f"{0.8 / share:.2f}", "yes" if speedup >= 0.8 / share else "no",
                         f"{dense_gflops:.0f} / {packed_gflops:.0f}"])
            records.append({"model": label, "clip": clip_name, "tokens_per_clip": kept, "share_kept": share,
                            "dense": dense, "packed": packed, "speedup_per_round": ratios, "speedup": speedup,
                            "target": 0.8 / share, "meets_target": speedup >= 0.8 / share,
                            "dense_peak_bytes": dense_mem.peak, "packed_peak_bytes": packed_mem.peak,
                            "dense_gflop_per_s": dense_gflops, "packed_gflop_per_s": packed_gflops})
        del model

    headers = ["model", "clips", "tokens/clip", "share kept", "dense ms", "packed ms", "packed clips/s",
               "peak MiB dense / packed", "speed-up", "target 0.8/share", "met", "GFLOP/s dense / packed"]
    load = os.getloadavg()[0]  # other processes on a shared machine skew CPU timings: say how busy it was
    print(f"batch {batch} x 16x224x224, {device.type} {dtype}, threshold {args.threshold}, medians of "
          f"{args.repeats} interleaved rounds; machine limit: torch.mm {limit['gflop_per_s']:.0f} GFLOP/s; "
          f"{torch.get_num_threads()} threads, load average {load:.1f} on {os.cpu_count()} CPUs")
    print(markdown_table(headers, rows))
    path = write_json("model", {"batch": batch, "device": device.type, "dtype": str(dtype), "limit": limit,
                                "threshold": args.threshold, "threads": torch.get_num_threads(),
                                "load_average": load, "results": records})
    png = plot(records, RESULTS_DIR / "model_speedup.png")
    print(f"wrote {path} and {png}")


def _interleaved(dense_fn, packed_fn, repeats: int, sync) -> tuple[dict, dict, list[float]]:
    """Times dense and packed back to back in each round (after one warm-up of each), so that a load change on a
    shared machine hits both; returns both timings and the per-round speed-ups."""
    dense_fn(), packed_fn()
    dense_times, packed_times = [], []
    for _ in range(repeats):
        for fn, times in ((dense_fn, dense_times), (packed_fn, packed_times)):
            times.append(time_fn(fn, repeats=1, warmup=0, sync=sync)["median_ms"])
    ratios = [d / p for d, p in zip(dense_times, packed_times)]

    def summary(times):
        return {"median_ms": sorted(times)[len(times) // 2], "min_ms": min(times), "max_ms": max(times),
                "repeats": repeats}

    return summary(dense_times), summary(packed_times), ratios


def _cuda_mm_rate(dtype, n: int = 8192) -> dict:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    t = time_fn(lambda: a @ b, repeats=10, sync=torch.cuda.synchronize)
    return {**t, "n": n, "dtype": str(dtype), "gflop_per_s": 2 * n**3 / (t["median_ms"] * 1e-3) / 1e9}


def plot(records: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    shares = torch.linspace(0.1, 1.0, 100)
    ax.plot(shares, 1 / shares, "k:", label="1 / share (cost linear in tokens)")
    ax.plot(shares, 0.8 / shares, "k--", label="target 0.8 / share")
    for model, marker in (("ViT-S", "o"), ("ViT-B", "s")):
        points = [r for r in records if r["model"] == model]
        if points:
            ax.scatter([r["share_kept"] for r in points], [r["speedup"] for r in points], marker=marker, s=50,
                       label=f"VideoMAE V2 {model}")
            for r in points:
                ax.annotate(r["clip"].split(".")[0], (r["share_kept"], r["speedup"]), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("share of tokens kept by RLT")
    ax.set_ylabel("speed-up of packed over dense")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("RLT-packed vs dense inference, 16x224x224 clips")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    main()
