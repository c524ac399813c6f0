"""Model inference with fewer tokens against all tokens, on clips of the real sample clips: throughput and peak memory.

- VideoMAE V2 ViT-S/B, dense versus RLT-packed, batches of 16x224x224 clips. For each sample clip a batch is cut
  from it (clips starting every ``--gap`` frames, every ``--stride``-th frame, short side resized to 224, centre
  crop). Dense: Conv3d patch embedding and SDPA over all 1568 tokens per clip. Packed: ``rlt_tokenize`` (included
  in the time) and ``varlen_attention`` over the kept tokens.
- FluxViT-S/B at token budgets 3072 / 2048 / 1024 against all tokens: a batch of 16x252x252 clips (5184 tokens per
  clip, sampled densely the token-optimization way; ``--flux-frames``, ``--flux-size``) that ``group_topk`` cuts to each budget. Cost does not depend
  on the content here, so only the first sample clip is used.

Each variant runs back to back with the all-token forward in each round, so load changes on a shared machine hit
both; the speed-up is the median of the per-round ratios. Reported: median times, clips/s, peak memory of one
forward (CUDA: max allocated; CPU: peak RSS growth sampled every millisecond after ``malloc_trim``), tokens kept per
clip, speed-up, and the target 0.8 / share kept. The machine's limit is the best matmul GFLOP/s in the same run (torch.mm or oneDNN, see bench.common.matmul_rate); the
achieved GFLOP/s (counted multiply-adds x 2 of the encoder) stand next to it.

    python -m bench.model [--models ViT-S ViT-B FluxViT-S FluxViT-B] [--batch 1] [--repeats 3] [--device cpu|cuda]
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
from pyvidfast.io import decode_frames
from pyvidfast.models import create_model
from pyvidfast.models.fluxvit import HEAD_BUDGETS, FluxViT
from pyvidfast.models.layers import normalize_video

MODELS = {"ViT-S": "videomae_vit_small_patch16_224", "ViT-B": "videomae_vit_base_patch16_224",
          "FluxViT-S": "fluxvit_small_patch14", "FluxViT-B": "fluxvit_base_patch14"}


def load_batch(name: str, batch: int, frames: int, stride: int, gap: int, size: int = 224) -> torch.Tensor:
    """uint8 [batch, frames, size, size, 3]: clips of one sample video starting gap frames apart."""
    clip = samples.CLIPS[name]
    scale = size / min(clip.width, clip.height)
    resized = (max(size, round(clip.height * scale)), max(size, round(clip.width * scale)))
    top, left = (resized[0] - size) // 2, (resized[1] - size) // 2
    path = samples.sample_path(name)
    clips = [decode_frames(path, frames, start=i * gap, stride=stride, size=resized) for i in range(batch)]
    return torch.stack(clips)[:, :, top:top + size, left:left + size].contiguous()


def forward_flops(model, tokens_per_clip: list[int]) -> float:
    """Multiply-adds x 2 of the patch embedding and the blocks (projections, MLP, attention) on the kept tokens."""
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
    parser.add_argument("--flux-frames", type=int, default=16, help="FluxViT clip frames (all tokens: T (R/14)^2)")
    parser.add_argument("--flux-size", type=int, default=252, help="FluxViT clip resolution R")
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
    for label in args.models:
        torch.manual_seed(0)
        model = create_model(MODELS[label]).to(device=device, dtype=dtype).eval()
        if isinstance(model, FluxViT):
            name = next(iter(samples.CLIPS))
            video = load_batch(name, batch, args.flux_frames, args.stride, args.gap, args.flux_size).to(device)
            config = model.data_config
            cases = flux_cases(model, name, normalize_video(video, config.mean, config.std, dtype=dtype))
        else:
            cases = rlt_cases(model, videos, dtype, args.threshold)
        for clip_name, variant, total, kept, full_fn, variant_fn, checks in cases:
            with torch.no_grad():
                full, reduced, ratios = _interleaved(full_fn, variant_fn, args.repeats, sync)
                with PeakMemory(device) as full_mem:
                    full_fn()
                with PeakMemory(device) as variant_mem:
                    variant_fn()
            share = sum(kept) / (total * batch)
            speedup = sorted(ratios)[len(ratios) // 2]
            full_gflops = forward_flops(model, [total] * batch) / (full["median_ms"] * 1e-3) / 1e9
            variant_gflops = forward_flops(model, kept) / (reduced["median_ms"] * 1e-3) / 1e9
            rows.append([label, clip_name, variant, f"{min(kept)}-{max(kept)}", f"{share:.2f}",
                         f"{full['median_ms']:.0f}", f"{reduced['median_ms']:.0f}",
                         f"{batch / reduced['median_ms'] * 1e3:.2f}",
                         f"{full_mem.peak / 2**20:.0f} / {variant_mem.peak / 2**20:.0f}", f"{speedup:.2f}",
                         f"{0.8 / share:.2f}", "yes" if speedup >= 0.8 / share else "no",
                         f"{full_gflops:.0f} / {variant_gflops:.0f}"])
            records.append({"model": label, "clip": clip_name, "variant": variant, "tokens_per_clip": kept,
                            "all_tokens_per_clip": total, "share_kept": share, "full": full, "variant_time": reduced,
                            "speedup_per_round": ratios, "speedup": speedup, "target": 0.8 / share,
                            "meets_target": speedup >= 0.8 / share, "full_peak_bytes": full_mem.peak,
                            "variant_peak_bytes": variant_mem.peak, "full_gflop_per_s": full_gflops,
                            "variant_gflop_per_s": variant_gflops, **checks})
        del model

    headers = ["model", "clips", "variant", "tokens/clip", "share kept", "all-token ms", "variant ms",
               "variant clips/s", "peak MiB all / variant", "speed-up", "target 0.8/share", "met",
               "GFLOP/s all / variant"]
    load = os.getloadavg()[0]  # other processes on a shared machine skew CPU timings: say how busy it was
    print(f"batch {batch}: 16x224x224 (ViT, RLT threshold {args.threshold}), {args.flux_frames}x{args.flux_size}x{args.flux_size} "
          f"(FluxViT); {device.type} {dtype}, medians of "
          f"{args.repeats} interleaved rounds; machine limit: {limit['path']} matmul {limit['gflop_per_s']:.0f} GFLOP/s; "
          f"{torch.get_num_threads()} threads, load average {load:.1f} on {os.cpu_count()} CPUs")
    print(markdown_table(headers, rows))
    path = write_json("model", {"batch": batch, "device": device.type, "dtype": str(dtype), "limit": limit,
                                "threshold": args.threshold, "threads": torch.get_num_threads(),
                                "load_average": load, "results": records})
    png = plot(records, RESULTS_DIR / "model_speedup.png")
    print(f"wrote {path} and {png}")


def rlt_cases(model, videos: dict[str, torch.Tensor], dtype, threshold: float):
    """(clip, variant, all tokens per clip, kept per clip, all-token forward, variant forward, checks): dense
    against RLT-packed per sample clip; checks: how far RLT moves the logits."""
    for clip_name, video in videos.items():
        dense_input = normalize_video(video, model.data_config.mean, model.data_config.std, dtype=dtype)
        compared = compare_dense_packed(model, video, threshold)
        difference = (compared["dense_logits"] - compared["packed_logits"]).abs().max().item()
        yield (clip_name, "RLT packed", model.patch_embed.num_patches, compared["tokens_kept"],
               lambda x=dense_input: model(x), lambda v=video: model(model.tokenize(v, threshold)),
               {"max_abs_logit_difference": difference})


def flux_cases(model, clip_name: str, video: torch.Tensor):
    """The same, for FluxViT: all tokens against each head's budget (group_topk selection inside the forward)."""
    total = video.shape[2] * (video.shape[3] // model.patch_size) ** 2
    for budget in HEAD_BUDGETS:
        yield (clip_name, f"budget {budget}", total, [min(budget, total)] * video.shape[0], lambda: model(video),
               lambda budget=budget: model(video, budget=budget), {})


@torch.no_grad()
def compare_dense_packed(model, video: torch.Tensor, threshold: float | None = None, repeats: int = 1) -> dict:
    """Runs a VideoMAE ``model`` on a uint8 video ``[B, T, H, W, 3]`` (or one clip ``[T, H, W, 3]``) densely and
    RLT-packed.

    Returns the two logits, the median wall times in ms over ``repeats`` (the packed time includes tokenization),
    the tokens kept per clip, the tokens per clip of the dense path, the share kept and the speed-up.
    """
    if video.dim() == 4:
        video = video[None]
    model.eval()
    device, dtype = model.pos_embed.device, model.pos_embed.dtype
    video = video.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    config = model.data_config
    dense_input = normalize_video(video, config.mean, config.std, dtype=dtype)
    dense_logits = model(dense_input)
    packed_logits = model(model.tokenize(video, threshold))
    dense_ms = time_fn(lambda: model(dense_input), repeats=repeats, warmup=0, sync=sync)["median_ms"]
    packed_ms = time_fn(lambda: model(model.tokenize(video, threshold)), repeats=repeats, warmup=0,
                        sync=sync)["median_ms"]
    kept = model.tokenize(video, threshold).cu_seqlens.diff().tolist()
    total = model.patch_embed.num_patches
    return {
        "dense_logits": dense_logits, "packed_logits": packed_logits, "dense_ms": dense_ms, "packed_ms": packed_ms,
        "tokens_kept": kept, "tokens_per_clip": total, "share_kept": sum(kept) / (total * len(kept)),
        "speedup": dense_ms / packed_ms,
    }


def _interleaved(full_fn, variant_fn, repeats: int, sync) -> tuple[dict, dict, list[float]]:
    """Times the all-token and the fewer-token forward back to back in each round (after one warm-up of each), so
    that a load change on a shared machine hits both; returns both timings and the per-round speed-ups."""
    full_fn(), variant_fn()
    full_times, variant_times = [], []
    for _ in range(repeats):
        for fn, times in ((full_fn, full_times), (variant_fn, variant_times)):
            times.append(time_fn(fn, repeats=1, warmup=0, sync=sync)["median_ms"])
    ratios = [f / v for f, v in zip(full_times, variant_times)]

    def summary(times):
        return {"median_ms": sorted(times)[len(times) // 2], "min_ms": min(times), "max_ms": max(times),
                "repeats": repeats}

    return summary(full_times), summary(variant_times), ratios


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
    for model, marker in zip(MODELS, "osD^"):
        points = [r for r in records if r["model"] == model]
        if points:
            ax.scatter([r["share_kept"] for r in points], [r["speedup"] for r in points], marker=marker, s=50,
                       label=model if model.startswith("FluxViT") else f"VideoMAE V2 {model} (RLT)")
            for r in points:
                note = r["variant"].removeprefix("budget ") if model.startswith("FluxViT") else r["clip"].split(".")[0]
                ax.annotate(note, (r["share_kept"], r["speedup"]), fontsize=7, xytext=(4, 3),
                            textcoords="offset points")
    ax.set_xlabel("share of tokens kept (RLT, or FluxViT's budget)")
    ax.set_ylabel("speed-up over all tokens")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Fewer tokens vs all tokens, inference")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    main()
