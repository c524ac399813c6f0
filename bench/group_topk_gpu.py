"""group_topk on a GPU against the official FluxViT selection and a lean PyTorch selection (bench.group_topk's peers)
on the same device, and the device copy bandwidth of the input (the op reads every embedding once).
Patch embeddings [B=8, T=16, L=256, D] float32 and bfloat16, G=4 groups, budgets 1024 / 2048 / 3072.

    python -m bench.group_topk_gpu [--dry-run] [--repeats 20]
"""

import torch

from bench.common_gpu import copy_bandwidth, device_for, parser, time_device, write_result
from bench.group_topk import G, official_selection, torch_selection
from pyvidfast.ops import group_topk
from pyvidfast.profiling import nvtx_range


def main():
    args = parser(__doc__).parse_args()
    device = device_for(args)
    repeats = 1 if args.dry_run else args.repeats
    shape, dims, budgets = ((2, 8, 16), (8,), (32,)) if args.dry_run else ((8, 16, 256), (384, 768), (1024, 2048, 3072))
    rows, results = [], []
    for dtype in (torch.float32, torch.bfloat16):
        for dim in dims:
            x = torch.randn(*shape, dim, device=device).to(dtype)
            nbytes = x.numel() * x.element_size()
            floor = copy_bandwidth(device, nbytes, repeats)
            for budget in budgets:
                assert torch.equal(group_topk(x, G, budget), torch_selection(x, budget, exact=True)), "selection differs"

                def timed(name, fn):
                    def call():
                        with nvtx_range(f"group_topk/{name}/D{dim}/K{budget}"):
                            fn()
                    return time_device(call, device, repeats)

                r = {"dtype": str(dtype), "D": dim, "budget": budget,
                     "op": timed("op", lambda: group_topk(x, G, budget)),
                     "official": timed("official", lambda: official_selection(x, budget)),
                     "torch": timed("torch", lambda: torch_selection(x, budget)), "copy": floor}
                r["op_gb_per_s"] = nbytes / (r["op"]["median_ms"] * 1e-3) / 1e9
                results.append(r)
                op = r["op"]["median_ms"]
                rows.append([str(dtype)[6:], dim, budget, f"{op:.4f}", f"{r['official']['median_ms'] / op:.1f}",
                             f"{r['torch']['median_ms'] / op:.1f}", f"{r['op_gb_per_s']:.0f}",
                             f"{floor['gb_per_s']:.0f}"])
    best = max(results, key=lambda r: r["op_gb_per_s"])
    write_result("group_topk_gpu", {"B_T_L": list(shape), "G": G, "results": results,
                                    "headline": f"up to {best['op_gb_per_s']:.0f} GB/s read "
                                                f"({best['op_gb_per_s'] / best['copy']['gb_per_s']:.0%} of copy)"},
                 rows, ["dtype", "D", "budget", "op ms", "official / op", "torch / op", "op GB/s read", "copy GB/s"])


if __name__ == "__main__":
    main()
