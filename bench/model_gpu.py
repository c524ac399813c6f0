"""Model inference throughput on a GPU, bfloat16: VideoMAE V2 ViT-B dense (Conv3d + SDPA over all 1568 tokens)
against RLT-packed (rlt_tokenize + varlen_attention over the kept tokens, tokenization timed), and FluxViT-B at the
token budgets 3072 / 2048 / 1024 against all tokens (group_topk inside the forward). bench.model's cases and
interleaved timing, on frames that need no FFmpeg on the GPU machine (bench.common_gpu.sample_frames).

ViT-B batches: for each sample clip that travels to the GPU machine, its clips of bench.rlt_gpu's batch (16 x 224 x
224, starts 48 frames apart) repeated to the batch size. FluxViT-B: random frames of 16 x 252 x 252 (its cost does
not depend on the content). The limit beside the achieved TFLOP/s: the same-run bf16 matmul rate.

    python -m bench.model_gpu [--dry-run] [--batch 16] [--repeats 5]
"""

import torch

from bench.common_gpu import (CARRIED_CLIPS, device_for, frames_at_hand, matmul_rate, parser, sample_frames,
                              write_result)
from bench.model import flux_cases, forward_flops, measure_case, rlt_cases
from bench.rlt_gpu import batch_spec
from pyvidfast.models.fluxvit import fluxvit_base_patch14
from pyvidfast.models.layers import normalize_video
from pyvidfast.models.videomae import videomae_vit_base_patch16_224
from pyvidfast.profiling import nvtx_range

TINY = dict(embed_dim=64, depth=1, num_heads=2)  # --dry-run: the same code on a one-block model
# The constructors themselves, not create_model: that imports every model family, and one that needs a package
# the GPU machine lacks (transformers) would stop these two.
MODELS = {"ViT-B": videomae_vit_base_patch16_224, "FluxViT-B": fluxvit_base_patch14}


def main():
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.1)
    p.set_defaults(repeats=5)
    args = p.parse_args()
    device = device_for(args)
    dry = args.dry_run
    dtype = torch.bfloat16
    batch, repeats = (2, 1) if dry else (args.batch, args.repeats)
    frames, size, flux_size = (4, 32, 28) if dry else (16, 224, 252)
    limit = matmul_rate(device, dtype, n=256 if dry else 8192, repeats=repeats)

    def clips_of(name):
        if dry:
            return torch.randint(0, 256, (batch, frames, size, size, 3), dtype=torch.uint8)
        own = torch.stack([sample_frames(clip, frames, size, start) for clip, start in batch_spec() if clip == name])
        return own.repeat(-(-batch // len(own)), 1, 1, 1, 1)[:batch]

    rows, records = [], []
    for label in MODELS:
        torch.manual_seed(0)
        extra = dict(TINY, img_size=size, num_frames=frames) if dry and label == "ViT-B" else TINY if dry else {}
        model = MODELS[label](**extra).to(device=device, dtype=dtype).eval()
        if label == "FluxViT-B":
            video = torch.randint(0, 256, (batch, frames, flux_size, flux_size, 3), dtype=torch.uint8, device=device)
            config = model.data_config
            cases = flux_cases(model, "random", normalize_video(video, config.mean, config.std, dtype=dtype))
        else:
            names = [n for n in (CARRIED_CLIPS[:1] if dry else CARRIED_CLIPS) if dry or frames_at_hand(n, frames, size)]
            if not names:
                print("ViT-B left out: no frames of the sample clips here (no reader, no frames.pt)")
            videos = {name: clips_of(name).to(device) for name in names}
            cases = rlt_cases(model, videos, dtype, args.threshold)
        for clip_name, variant, total, kept, full_fn, variant_fn, checks in cases:
            with nvtx_range(f"model/{label}/{clip_name}/{variant}"):
                full, reduced, ratios, full_mem, variant_mem = measure_case(full_fn, variant_fn, repeats, device)
            share = sum(kept) / (total * batch)
            speedup = sorted(ratios)[len(ratios) // 2]
            full_tflops = forward_flops(model, [total] * batch) / (full["median_ms"] * 1e-3) / 1e12
            variant_tflops = forward_flops(model, kept) / (reduced["median_ms"] * 1e-3) / 1e12
            records.append({"model": label, "clip": clip_name, "variant": variant, "batch": batch,
                            "tokens_per_clip": kept, "all_tokens_per_clip": total, "share_kept": share,
                            "full": full, "variant_time": reduced, "speedup": speedup,
                            "full_clips_per_s": batch / full["median_ms"] * 1e3,
                            "variant_clips_per_s": batch / reduced["median_ms"] * 1e3,
                            "full_tflop_per_s": full_tflops, "variant_tflop_per_s": variant_tflops,
                            "full_peak_bytes": full_mem.peak, "variant_peak_bytes": variant_mem.peak, **checks})
            rows.append([label, clip_name, variant, f"{share:.2f}", f"{full['median_ms']:.1f}",
                         f"{reduced['median_ms']:.1f}", f"{batch / reduced['median_ms'] * 1e3:.0f}", f"{speedup:.2f}",
                         f"{full_tflops:.0f} / {variant_tflops:.0f}",
                         f"{full_mem.peak / 2**20:.0f} / {variant_mem.peak / 2**20:.0f}"])
        del model
    print(f"batch {batch}, bf16 on {device}; same-run bf16 matmul: {limit['tflop_per_s']:.0f} TFLOP/s")
    vit = [r for r in records if r["model"] == "ViT-B"]
    write_result("model_gpu", {"batch": batch, "dtype": str(dtype), "limit": limit, "results": records,
                               "headline": "ViT-B RLT speed-up " + ", ".join(f"{r['speedup']:.2f}" for r in vit)},
                 rows, ["model", "clips", "variant", "share kept", "all-token ms", "variant ms", "variant clips/s",
                        "speed-up", "TFLOP/s all / variant", "peak MiB all / variant"])


if __name__ == "__main__":
    main()
