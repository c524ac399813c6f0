"""Varlen attention on a CUDA GPU: TFLOP/s of our kernels against PyTorch's SDPA on the padded batch (key-padding
mask), a per-sequence SDPA loop, and torch.nn.attention.varlen.varlen_attn where this torch has it. Every timed
call sits in an NVTX range (domain "pyvidfast"), so the script is ready for Nsight Systems:

    VIDFAST_NVTX=1 nsys profile -t cuda,nvtx -o varlen_attention python -m bench.varlen_attention_gpu

Workloads: ViT-B heads (12 x 64) with RLT's real kept lengths on 8 clips of 16 x 224 x 224 and synthetic spreads;
bfloat16 and float16; forward and forward + backward. FLOPs count useful work (4 L^2 H D per sequence forward,
2.5x for backward). Without a GPU it says so and exits 0.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import markdown_table, time_fn, write_json  # noqa: E402
from pyvidfast import build_info  # noqa: E402
from pyvidfast.ops import varlen_attention  # noqa: E402
from pyvidfast.profiling import enable_nvtx, nvtx_range  # noqa: E402

HEADS, HEAD_DIM = 12, 64
FULL = 1568


def workloads():
    from bench.varlen_attention import rlt_lengths  # decodes the sample clips on the CPU

    gen = torch.Generator().manual_seed(0)
    spread = lambda lo, hi, b=8: torch.randint(int(lo * FULL), int(hi * FULL) + 1, (b,), generator=gen).tolist()  # noqa
    return {"rlt-8-clips": rlt_lengths(), "all-kept-x8": [FULL] * 8, "half-kept-x32": spread(0.25, 0.75, 32),
            "quarter-kept-x32": spread(0.1, 0.4, 32), "one-long": [8 * FULL]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not (torch.cuda.is_available() and build_info()["cuda_kernels"]):
        print("varlen_attention_gpu: no CUDA device or no CUDA kernels in this build; nothing to measure")
        return
    enable_nvtx(True)
    dev = torch.device("cuda")
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    results, rows = [], []
    sync = torch.cuda.synchronize
    for name, lengths in workloads().items():
        for dtype in (torch.bfloat16, torch.float16):
            n, longest, b = sum(lengths), max(lengths), len(lengths)
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
            q, k, v = (torch.randn(n, HEADS, HEAD_DIM, dtype=dtype, device=dev) for _ in range(3))
            grad = torch.randn_like(q)
            pad = lambda t: torch.nested.nested_tensor_from_jagged(t, cu.long()).to_padded_tensor(0.0).transpose(1, 2)  # noqa
            pq, pk, pv = pad(q), pad(k), pad(v)
            mask = (torch.arange(longest, device=dev)[None] < torch.tensor(lengths, device=dev)[:, None]).view(b, 1, 1, -1)
            bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
            paths = {
                "ours": lambda q, k, v: varlen_attention(q, k, v, cu, cu, longest, longest),
                "padded": lambda q, k, v: F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask),
                "loop": lambda q, k, v: torch.cat([
                    F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
                    for s, e in bounds]),
            }
            if varlen_attn is not None:
                paths["torch varlen_attn"] = lambda q, k, v: varlen_attn(q, k, v, cu, cu, longest, longest)
            flops = sum(4 * l * l * HEADS * HEAD_DIM for l in lengths)
            for backward in (False, True):
                entry = {"workload": name, "dtype": str(dtype), "pass": "fwd+bwd" if backward else "fwd", "paths": {}}
                for path, fn in paths.items():
                    def call(fn=fn, path=path):
                        leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
                        if path == "padded":
                            for t in (pq, pk, pv):
                                t.requires_grad_(backward)
                        with nvtx_range(f"attn/{path}/{name}/{entry['pass']}"):
                            out = fn(*leaves)
                            if backward:
                                out.backward(grad if out.shape == grad.shape else torch.ones_like(out))
                    torch.cuda.reset_peak_memory_stats()
                    t = time_fn(call, repeats=args.repeats, warmup=3, sync=sync)
                    t["tflop_per_s"] = flops * (3.5 if backward else 1) / (t["median_ms"] * 1e-3) / 1e12
                    t["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
                    entry["paths"][path] = t
                results.append(entry)
                p = entry["paths"]
                rows.append([name, str(dtype).replace("torch.", ""), entry["pass"]]
                            + [f"{p[k]['median_ms']:.3f} ms / {p[k]['tflop_per_s']:.0f}" for k in paths])
                headers = ["workload", "dtype", "pass"] + [f"{k} (ms / TFLOP/s)" for k in paths]
    print(f"device: {torch.cuda.get_device_name(0)}")
    table = markdown_table(headers, rows)
    print(table)
    print(f"wrote {write_json('varlen_attention_gpu', {'results': results, 'table': table})}")


if __name__ == "__main__":
    main()
