"""Small cases of every CUDA kernel, for compute-sanitizer (memcheck, racecheck): RLT mask/lengths/gather (uint8
and float video, odd grid), group_topk (shared-memory and global score buffers), varlen attention forward and
backward (tensor-core bf16/fp16 and the float32 kernel; empty, one-token and odd sequences, grouped-query heads,
causal), and the NV12 conversion when the frame reader is built and a sample clip is at hand.

    compute-sanitizer --tool memcheck python -m bench.sanitize_gpu     (bench/gpu_check.sh runs it)
    python -m bench.sanitize_gpu --dry-run                            (the same calls on the CPU)
"""

import torch

from bench.common_gpu import device_for, parser, reader_built
from pyvidfast.ops import group_topk, rlt_tokenize, varlen_attention


def cu_seqlens(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def main():
    p = parser(__doc__)
    p.add_argument("--tool", default="memcheck", help="the sanitizer tool running this (printed only)")
    args = p.parse_args()
    device = device_for(args)
    torch.manual_seed(0)
    done = []

    video = torch.randint(0, 256, (2, 4, 48, 80, 3), dtype=torch.uint8)
    video[:, 2:] = video[:, :2]
    for v in (video, video.permute(0, 4, 1, 2, 3).float().div(255).contiguous()):
        leaf = v.to(device).requires_grad_(v.is_floating_point())
        packed = rlt_tokenize(leaf)
        if leaf.requires_grad:
            packed.patches.sum().backward()
        done.append(f"rlt {v.dtype}")

    for shape, groups, budget in [((2, 4, 7, 33), 2, 13), ((1, 2, 5888, 4), 1, 7000), ((1, 2, 16, 8), 2, 0)]:
        group_topk(torch.randn(shape, device=device), groups, budget, return_scores=True)
        done.append(f"group_topk {shape}")

    lengths_q, lengths_k = [0, 1, 70, 5], [3, 1, 70, 0]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for head_dim in (64, 80):
            for causal in (False, True):
                q = torch.randn(sum(lengths_q), 4, head_dim, device=device, dtype=dtype, requires_grad=True)
                k, v = (torch.randn(sum(lengths_k), 2, head_dim, device=device, dtype=dtype, requires_grad=True)
                        for _ in range(2))
                out = varlen_attention(q, k, v, cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device),
                                       max(lengths_q), max(lengths_k), causal=causal)
                out.float().square().sum().backward()
                done.append(f"attention {dtype} d={head_dim} causal={causal}")

    if reader_built():
        from pyvidfast.io import VideoReader
        from pyvidfast.samples import sample_path

        with VideoReader(sample_path("bikes.mp4"), device=str(device)) as reader:
            reader.get_frames([0, 3], size=(61, 97))
            reader.get_frames([5], size=(224, 224), dtype=torch.float32, mean=[0.5] * 3, std=[0.2] * 3, layout="CTHW")
        done.append("nv12 conversion (bikes.mp4)")
    else:
        print("frame reader not built: the NV12 conversion kernel is not checked")
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"{args.tool}: ran {len(done)} cases: " + "; ".join(done))


if __name__ == "__main__":
    main()
