"""RLT tokenization on a GPU: ours (from uint8, from float, bfloat16 output) against the original algorithm in
PyTorch ops (bench.rlt.original_rlt, the paper's steps) on the same device, and the device copy bandwidth of the
uint8 video (the memory floor). Batch: 8 clips of 16 x 224 x 224 cut from the sample clips that travel to the GPU
machine as bench.rlt cuts them (every 2nd frame, starts 48 frames apart).

    python -m bench.rlt_gpu [--dry-run] [--repeats 20]
"""

import torch

from bench.common_gpu import (CARRIED_CLIPS, copy_bandwidth, device_for, frames_at_hand, parser, sample_frames,
                              time_device, write_result)
from bench.rlt import normalize, original_rlt
from pyvidfast.ops import rlt_tokenize
from pyvidfast.profiling import nvtx_range


def batch_spec(clips: int = 8):
    """(sample clip, start frame) of each clip of the batch."""
    n = len(CARRIED_CLIPS)
    return [(CARRIED_CLIPS[i % n], (i // n) * 48) for i in range(clips)]


def batch_available(size: int = 224, frames: int = 16, clips: int = 8) -> bool:
    return all(frames_at_hand(name, frames, size, start) for name, start in batch_spec(clips))


def load_batch(size: int = 224, frames: int = 16, clips: int = 8) -> torch.Tensor:
    return torch.stack([sample_frames(name, frames, size, start) for name, start in batch_spec(clips)])


def main():
    args = parser(__doc__).parse_args()
    device = device_for(args)
    repeats = 1 if args.dry_run else args.repeats
    video = (torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8) if args.dry_run else load_batch()).to(device)
    x = normalize(video.cpu()).to(device)
    ours = rlt_tokenize(video)
    _, _, ref_counts = original_rlt(x)
    assert torch.equal(ref_counts.int().cpu(), ours.cu_seqlens.diff().cpu()), "token counts differ from the original"

    def timed(name, fn):
        def call():
            with nvtx_range(f"rlt/{name}"):
                fn()
        return time_device(call, device, repeats)

    results = {
        "original_pytorch_from_float": timed("original", lambda: original_rlt(x)),
        "ours_from_uint8": timed("uint8", lambda: rlt_tokenize(video)),
        "ours_from_float": timed("float", lambda: rlt_tokenize(x)),
        "ours_from_uint8_bf16_out": timed("uint8-bf16", lambda: rlt_tokenize(video, out_dtype=torch.bfloat16)),
        "copy_uint8_video": copy_bandwidth(device, video.numel(), repeats),
    }
    base, floor = results["original_pytorch_from_float"]["median_ms"], results["copy_uint8_video"]["median_ms"]
    rows = [[k, f"{r['median_ms']:.4f}", f"{base / r['median_ms']:.1f}", f"{r['median_ms'] / floor:.1f}"]
            for k, r in results.items()]
    share = ours.patches.shape[0] / (video.shape[0] * (video.shape[1] // 2) * (video.shape[2] // 16) ** 2)
    print(f"batch {tuple(video.shape)} uint8 on {device}; {share:.1%} of tokens kept")
    speedup = base / results["ours_from_uint8"]["median_ms"]
    write_result("rlt_gpu", {"shape": list(video.shape), "share_kept": share, "results": results,
                             "headline": f"uint8 {results['ours_from_uint8']['median_ms']:.3f} ms: {speedup:.1f}x the "
                                         f"PyTorch original, {results['ours_from_uint8']['median_ms'] / floor:.1f}x "
                                         "the copy floor"},
                 rows, ["path", "median ms", "speed-up vs original", "x copy floor"])


if __name__ == "__main__":
    main()
