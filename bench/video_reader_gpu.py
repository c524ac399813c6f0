"""NVDEC decoding and the fused NV12 conversion on a GPU.

``--nvdec-check``: each sample clip decoded by a CPU reader and a CUDA reader (NVDEC). Reported per clip: which
device decoded (H.264 4:4:4 and MS-MPEG4 fall back to the CPU), frame identity (CUDA frame i is nearest to CPU
frame i among CPU frames i-1, i, i+1, and the frame counts and timestamps agree), and the pixel differences of the
converted frames (uint8 at a resized size, normalized float32) against the conversion tolerance of the suite
(mean |diff| < 0.1 uint8 levels, < 0.01 normalized). Exits 1 on a mismatch, 77 when the reader is not built.

Default (benchmark): 16 frames per call at 224 x 224, normalized float32 CTHW, on NVDEC with our fused conversion
against the same frames decoded at native size (our NV12 -> RGB) and converted by PyTorch on the GPU (antialiased
bilinear resize, normalization), the PyTorch formulation of the whole NV12 -> model-input conversion on synthetic
planes of the clip's size, and the device copy bandwidth for the output bytes. Decoding is in every NVDEC row, so
the rows differ by the conversion.

    python -m bench.video_reader_gpu [--nvdec-check] [--dry-run]
"""

import torch
import torch.nn.functional as F

from bench.common_gpu import (CARRIED_CLIPS, copy_bandwidth, device_for, parser, reader_built, time_device,
                              write_result)
from pyvidfast.profiling import nvtx_range

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIPS = [*CARRIED_CLIPS, "vtest.avi"]  # vtest.avi where it is at hand (MS-MPEG4: the CPU fallback)


def nvdec_check(device, clips):
    from pyvidfast.io import VideoReader
    from pyvidfast.samples import cache_dir

    records, ok_all = [], True
    for name in clips:
        path = cache_dir() / name
        if not path.exists():  # the GPU machine has the carried clips only
            print(f"{name}: not at hand ({path}), not checked")
            continue
        with VideoReader(path) as cpu, VideoReader(path, device=str(device)) as gpu:
            n = len(cpu)
            idx = sorted({0, 1, 2, n // 2, n // 2 + 1, n - 2, n - 1})
            rec = {"clip": name, "decode_device": gpu.metadata.decode_device, "frames_cpu": n, "frames_gpu": len(gpu),
                   "same_timestamps": bool(torch.equal(cpu.timestamps(), gpu.timestamps()))}
            # Identity: each requested frame against its neighbours in the CPU decode (native size, uint8); a tie
            # (a repeated frame) counts for frame i.
            around = sorted({c for i in idx for c in (i - 1, i, i + 1) if 0 <= c < n})
            ref = dict(zip(around, cpu.get_frames(around).float()))
            a = torch.stack([ref[i] for i in idx])
            b = gpu.get_frames(idx).float().cpu()
            nearest = [min((c for c in (i, i - 1, i + 1) if c in ref), key=lambda c: (ref[c] - b[j]).abs().mean())
                       for j, i in enumerate(idx)]
            rec["identity"] = nearest == idx
            rec["native_uint8_mean_abs_diff"] = (a - b).abs().mean().item()
            rec["native_uint8_max_abs_diff"] = (a - b).abs().max().item()
            small_a = cpu.get_frames(idx, size=(61, 97)).float()
            small_b = gpu.get_frames(idx, size=(61, 97)).float().cpu()
            rec["resized_uint8_mean_abs_diff"] = (small_a - small_b).abs().mean().item()
            kw = dict(size=(224, 224), dtype=torch.float32, mean=MEAN, std=STD, layout="CTHW")
            rec["normalized_mean_abs_diff"] = (cpu.get_frames(idx, **kw) - gpu.get_frames(idx, **kw).cpu()).abs().mean().item()
        rec["ok"] = bool(rec["identity"] and rec["frames_cpu"] == rec["frames_gpu"] and rec["same_timestamps"]
                         and rec["resized_uint8_mean_abs_diff"] < 0.1 and rec["normalized_mean_abs_diff"] < 0.01)
        ok_all &= rec["ok"]
        records.append(rec)
        print(rec, flush=True)
    on_nvdec = [r["clip"] for r in records if r["decode_device"] == "cuda"]
    rows = [[r["clip"], r["decode_device"], r["identity"], f"{r['resized_uint8_mean_abs_diff']:.3f}",
             f"{r['normalized_mean_abs_diff']:.4f}", r["ok"]] for r in records]
    write_result("nvdec", {"clips": records, "headline": f"{len(on_nvdec)} of {len(records)} clips on NVDEC, "
                           f"{sum(not r['ok'] for r in records)} mismatches"},
                 rows, ["clip", "decoded on", "frame identity", "uint8 mean |diff|", "normalized mean |diff|", "ok"])
    return ok_all


def torch_nv12_to_model(y: torch.Tensor, uv: torch.Tensor, size) -> torch.Tensor:
    """The PyTorch formulation: NV12 planes (Y [T, H, W], UV [T, H/2, W/2, 2]) -> BT.709 limited-range RGB,
    antialiased bilinear resize, [0, 1], ImageNet normalization -> float32 [3, T, h, w]."""
    u, v = (uv[..., i].float().repeat_interleave(2, 1).repeat_interleave(2, 2) - 128 for i in range(2))
    yf = (y.float() - 16) * (255 / 219)
    cs = 255 / 224
    r = yf + cs * 1.5748 * v
    g = yf - cs * (0.1873 * u + 0.4681 * v)
    b = yf + cs * 1.8556 * u
    rgb = torch.stack([r, g, b], 1).clamp_(0, 255)
    x = F.interpolate(rgb, size=size, mode="bilinear", antialias=True).div_(255)
    x = (x - torch.tensor(MEAN, device=x.device)[:, None, None]) / torch.tensor(STD, device=x.device)[:, None, None]
    return x.transpose(0, 1)


def convert_bench(device, repeats, dry_run):
    from pyvidfast.io import VideoReader
    from pyvidfast.samples import sample_path

    frames, size = (4, (32, 32)) if dry_run else (16, (224, 224))
    rows, results = [], []
    for name in ["bikes.mp4"] if dry_run else ["bikes.mp4", "balle-jbart.mp4"]:
        with VideoReader(sample_path(name), device=str(device)) as reader:
            h, w = reader.metadata.height, reader.metadata.width
            idx = list(range(0, 2 * frames, 2))
            kw = dict(size=size, dtype=torch.float32, mean=MEAN, std=STD, layout="CTHW")

            def fused():
                with nvtx_range(f"convert/fused/{name}"):
                    return reader.get_frames(idx, **kw)

            def native_then_torch():
                with nvtx_range(f"convert/native+torch/{name}"):
                    x = reader.get_frames(idx).permute(0, 3, 1, 2).float()
                    x = F.interpolate(x, size=size, mode="bilinear", antialias=True).clamp_(0, 255).div_(255)
                    mean = torch.tensor(MEAN, device=x.device)[:, None, None]
                    return ((x - mean) / torch.tensor(STD, device=x.device)[:, None, None]).transpose(0, 1)

            y = torch.randint(16, 236, (frames, h, w), dtype=torch.uint8, device=device)
            uv = torch.randint(16, 241, (frames, h // 2, w // 2, 2), dtype=torch.uint8, device=device)

            def torch_only():
                with nvtx_range(f"convert/torch-nv12/{name}"):
                    return torch_nv12_to_model(y, uv, size)

            out_bytes = 3 * frames * size[0] * size[1] * 4
            r = {"clip": name, "decoded_on": reader.metadata.decode_device, "frames": frames,
                 "fused": time_device(fused, device, repeats),
                 "native_uint8_then_torch": time_device(native_then_torch, device, repeats),
                 "torch_nv12_formulation_no_decode": time_device(torch_only, device, repeats),
                 "copy_of_output_bytes": copy_bandwidth(device, out_bytes, repeats)}
            results.append(r)
            rows.append([name, r["decoded_on"]] + [f"{r[k]['median_ms']:.3f}" for k in
                        ("fused", "native_uint8_then_torch", "torch_nv12_formulation_no_decode", "copy_of_output_bytes")])
    write_result("video_reader_gpu", {"results": results, "headline": "fused " + ", ".join(
        f"{r['fused']['median_ms']:.2f} ms vs native+torch {r['native_uint8_then_torch']['median_ms']:.2f} ms"
        for r in results)}, rows, ["clip", "decoded on", "fused ms", "native + torch ms", "torch NV12 (no decode) ms",
                                   "copy of output ms"])


def main():
    p = parser(__doc__)
    p.add_argument("--nvdec-check", action="store_true")
    args = p.parse_args()
    if not reader_built():
        print("skipped: the frame reader is not built (FFmpeg's libraries were missing at build time)")
        raise SystemExit(77)
    device = device_for(args)
    if args.nvdec_check:
        raise SystemExit(0 if nvdec_check(device, CLIPS[:1] if args.dry_run else CLIPS) else 1)
    convert_bench(device, 1 if args.dry_run else args.repeats, args.dry_run)


if __name__ == "__main__":
    main()
