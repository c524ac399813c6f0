"""The README's main job on a real clip: sample frames with the frame reader, RLT-tokenize them, run VideoMAE V2
densely and on the packed kept tokens, report tokens kept, times and speed-up, and draw the kept patches."""

import statistics
import time
from pathlib import Path

import torch

from pyvidfast.ops import rlt_mask, rlt_tokenize
from pyvidfast.profiling import nvtx_range
from pyvidfast.io import decode_frames
from pyvidfast.samples import CLIPS, sample_path

FRAMES, STRIDE, SIZE = 16, 4, 224  # VideoMAE V2 / RLT sampling: 16 frames at stride 4, 224 x 224


def load_clip(clip: str) -> tuple[Path, torch.Tensor]:
    path = sample_path(clip) if clip in CLIPS else Path(clip)
    if not path.exists():
        raise FileNotFoundError(f"clip: {clip} is neither a sample clip name ({', '.join(CLIPS)}) nor a file")
    with nvtx_range("demo/decode"):
        frames = decode_frames(path, FRAMES, stride=STRIDE, size=(SIZE, SIZE))
    return path, frames


def run_model(name: str, checkpoint: str | None, video: torch.Tensor, threshold: float, repeats: int) -> None:
    """VideoMAE V2 dense against RLT-packed on the same clip and weights (bench.model times it in depth)."""
    from pyvidfast.models import create_model
    from pyvidfast.models.layers import normalize_video

    model = create_model(name, pretrained=checkpoint).eval()
    config = model.data_config
    dense_input = normalize_video(video, config.mean, config.std)
    with torch.inference_mode(), nvtx_range("demo/videomae"):
        dense, packed = model(dense_input), model(model.tokenize(video, threshold))
        dense_ms = timed(lambda: model(dense_input), repeats)
        packed_ms = timed(lambda: model(model.tokenize(video, threshold)), repeats)
        kept = model.tokenize(video, threshold).patches.shape[0] / (video.shape[0] * model.patch_embed.num_patches)
    diff = (dense.softmax(-1) - packed.softmax(-1)).abs().max().item()
    weights = checkpoint or "random weights"
    print(f"{name} ({weights}): dense {dense_ms:.0f} ms, RLT-packed {packed_ms:.0f} ms "
          f"(tokenization included), speed-up {dense_ms / packed_ms:.2f}x at {kept:.1%} of tokens; "
          f"max |softmax difference| {diff:.3g}")


def timed(fn, repeats: int = 5) -> float:
    """Median wall time of fn() in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def save_kept_patches_png(frames: torch.Tensor, keep: torch.Tensor, path: Path, tubelet: int, patch: int) -> None:
    """One panel per tubelet (its last frame, the one RLT compares), dropped patches dimmed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp = keep.shape[0]
    dim = keep.repeat_interleave(patch, 1).repeat_interleave(patch, 2)  # [T', H, W]
    cols = 4
    rows = (tp + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows))
    for t, ax in enumerate(axes.flat):
        ax.axis("off")
        if t >= tp:
            continue
        frame = frames[t * tubelet + tubelet - 1].float()
        shade = torch.where(dim[t, :, :, None], 1.0, 0.25)
        ax.imshow((frame * shade).byte().numpy())
        ax.set_title(f"tubelet {t}: {int(keep[t].sum())}/{keep[t].numel()} kept", fontsize=9)
    fig.suptitle(f"RLT kept patches ({int(keep.sum())}/{keep.numel()} tokens); dropped patches dimmed")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(args) -> None:
    path, frames = load_clip(args.clip)
    video = frames[None]  # [1, T, H, W, 3] uint8
    tubelet, patch = 2, 16
    with nvtx_range("demo/rlt_tokenize"):
        packed = rlt_tokenize(video, tubelet, patch, args.threshold)
    keep, _ = rlt_mask(video, tubelet, patch, args.threshold)
    total = keep.numel()
    ms = timed(lambda: rlt_tokenize(video, tubelet, patch, args.threshold))
    print(f"clip: {path.name} ({FRAMES} frames at stride {STRIDE}, {SIZE}x{SIZE})")
    print(f"tokens kept: {packed.patches.shape[0]} of {total} ({packed.patches.shape[0] / total:.1%}), "
          f"mean run length {packed.lengths.float().mean():.2f} tubelets")
    print(f"rlt_tokenize: {ms:.2f} ms (median of 5, {torch.get_num_threads()} CPU threads)")
    if args.model:
        run_model(args.model, args.checkpoint, video, args.threshold, args.repeats)
    png = Path(args.out) / f"rlt_{path.stem}.png"
    save_kept_patches_png(frames, keep[0], png, tubelet, patch)
    print(f"wrote {png}")
