"""RLT tokenization: ours (from uint8 and from float) against the original algorithm in PyTorch ops and the
memory floor, on 8 clips of 16 x 224 x 224 cut from the real sample clips. Run: python -m bench.rlt"""

import argparse
import torch
import torch.nn.functional as F

from bench.common import copy_floor, markdown_table, time_interleaved, with_bandwidth, write_json
from pyvidfast.ops import IMAGENET_MEAN, IMAGENET_STD, rlt_tokenize
from pyvidfast.io import decode_frames
from pyvidfast.samples import CLIPS, sample_path


def original_rlt(x, tubelet=2, patch=16, threshold=0.1):
    """RLT the way the paper's code runs it, from a normalized float [B, 3, T, H, W]: frame differences pooled
    per patch, threshold, run lengths from a (b, h, w, t) diff, einops-style patchify, per-clip gather loop."""
    b, c, t, h, w = x.shape
    tp = t // tubelet
    later = x[:, :, tubelet + tubelet - 1 :: tubelet]
    earlier = x[:, :, 0 : (tp - 1) * tubelet : tubelet]
    diff = F.avg_pool3d((later - earlier).abs(), kernel_size=(1, patch, patch)).mean(dim=1)  # [B, T'-1, H', W']
    first = torch.full_like(diff[:, :1], 255.0)
    keep = torch.cat([first, diff], dim=1) > threshold
    # Run lengths: position of each kept token along t, next kept position, difference (sentinel at T').
    cols = keep.permute(0, 2, 3, 1)  # [B, H', W', T']
    tidx = torch.arange(tp + 1, device=x.device).expand(*cols.shape[:3], tp + 1)
    kept_t = torch.where(F.pad(cols, (0, 1), value=True), tidx, tp + 1)
    next_kept = kept_t.flip(-1).cummin(-1).values.flip(-1)[..., 1:]
    lengths = torch.where(cols, next_kept - tidx[..., :tp], 0).permute(0, 3, 1, 2)
    patches = x.reshape(b, c, tp, tubelet, h // patch, patch, w // patch, patch)
    patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, -1, c * tubelet * patch * patch)
    flat_keep = keep.reshape(b, -1)
    tokens = [patches[i][flat_keep[i]] for i in range(b)]
    return torch.cat(tokens), lengths[keep], flat_keep.sum(1)


def load_batch(frames=16, size=224, clips=8):
    videos = []
    names = list(CLIPS)
    for i in range(clips):
        name = names[i % len(names)]
        start = (i // len(names)) * 48
        videos.append(decode_frames(sample_path(name), frames, start=start, stride=2, size=(size, size)))
    return torch.stack(videos), [names[i % len(names)] for i in range(clips)]


def normalize(video):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    return ((video.permute(0, 4, 1, 2, 3).float() / 255.0 - mean) / std).contiguous()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    video, names = load_batch()
    x = normalize(video)
    ours = rlt_tokenize(video)
    ref_tokens, ref_lengths, ref_counts = original_rlt(x)
    assert torch.equal(ref_counts.int(), (ours.cu_seqlens[1:] - ours.cu_seqlens[:-1])), "token counts differ"
    counts = (ours.cu_seqlens[1:] - ours.cu_seqlens[:-1]).tolist()
    per_clip = 8 * 14 * 14
    kept = {f"{i}:{n}": c / per_clip for i, (n, c) in enumerate(zip(names, counts))}

    # Timed in turns, so the memory floor is measured under the same load (and bandwidth) as the paths over it.
    results = time_interleaved({
        "original_pytorch_from_float": lambda: original_rlt(x),
        "ours_from_uint8": lambda: rlt_tokenize(video),
        "ours_from_float": lambda: rlt_tokenize(x),
        # Half the output bytes, for models that run in bfloat16: the float32 output is what bounds (b).
        "ours_from_uint8_bf16_out": lambda: rlt_tokenize(video, out_dtype=torch.bfloat16),
        "memory_floor_copy_uint8": copy_floor(video.numel()),
        # The same copy into a fresh tensor, as any op that returns new memory pays for it.
        "clone_uint8": lambda: video.clone(),
    }, args.repeats)
    results["memory_floor_copy_uint8"] = with_bandwidth(results["memory_floor_copy_uint8"], video.numel())
    floor = results["memory_floor_copy_uint8"]["median_ms"]
    base = results["original_pytorch_from_float"]["median_ms"]
    rows = []
    for name, r in results.items():
        rows.append([name, r["median_ms"], base / r["median_ms"], r["median_ms"] / floor])
    table = markdown_table(["path", "median ms", "speed-up vs original", "x memory floor"], rows)
    print(f"batch {tuple(video.shape)} uint8 ({video.numel() / 1e6:.1f} MB), {torch.get_num_threads()} threads")
    print(f"tokens kept: {sum(counts)} of {per_clip * len(counts)} ({sum(counts) / per_clip / len(counts):.1%}); "
          + ", ".join(f"{k} {v:.0%}" for k, v in kept.items()))
    print(table)
    path = write_json("rlt", {"shape": list(video.shape), "share_kept_per_clip": kept, "results": results,
                              "table": table})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
