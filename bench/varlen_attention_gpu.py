"""Varlen attention on a CUDA GPU: TFLOP/s of our kernels against PyTorch's SDPA on the padded batch (key-padding
mask), a per-sequence SDPA loop, torch.nn.attention.varlen.varlen_attn where this torch has it, flash-attn's
flash_attn_varlen_func and FlexAttention (document mask, compiled) where they import, each as a share of the
same-run matmul rate of its dtype. Every timed call sits in an NVTX range (domain "pyvidfast"):

    VIDFAST_NVTX=1 nsys profile -t cuda,nvtx -o attention python -m bench.varlen_attention_gpu

Workloads: ViT-B heads (12 x 64) with RLT's real kept lengths on 8 clips of 16 x 224 x 224 (bench.rlt_gpu's batch)
and synthetic spreads; bfloat16 and float16; forward and forward + backward. FLOPs count useful work (4 L^2 H D per
sequence forward, 2.5x more for backward). The JSON is rewritten after each workload, so a run stopped at its time
budget keeps what it measured. ``--dry-run``: the same paths on the CPU with tiny lengths.
"""

import importlib.util

import torch
import torch.nn.functional as F

from bench.common_gpu import device_for, matmul_rate, parser, time_device, write_result
from pyvidfast.ops import rlt_tokenize, varlen_attention
from pyvidfast.profiling import nvtx_range

HEADS, HEAD_DIM = 12, 64
FULL = 1568
# FlexAttention compiles per shape (tens of seconds each): only the real RLT lengths in bfloat16 get it.
FLEX_CASES = {("rlt-8-clips", torch.bfloat16)}


def workloads(dry_run):
    if dry_run:
        return {"tiny": [5, 3, 17]}
    from bench.rlt_gpu import batch_available, load_batch

    gen = torch.Generator().manual_seed(0)
    spread = lambda lo, hi, b=8: torch.randint(int(lo * FULL), int(hi * FULL) + 1, (b,), generator=gen).tolist()  # noqa
    loads = {"all-kept-x8": [FULL] * 8, "half-kept-x32": spread(0.25, 0.75, 32),
             "quarter-kept-x32": spread(0.1, 0.4, 32), "one-long": [8 * FULL]}
    if batch_available():
        loads = {"rlt-8-clips": rlt_tokenize(load_batch()).cu_seqlens.diff().tolist(), **loads}
    else:
        print("rlt-8-clips left out: no frames of the sample clips here (no reader, no frames.pt)")
    return loads


def peer_paths(q, k, v, lengths, cu, device, with_flex):
    """name -> fn(q, k, v) returning the packed [N, H, D] output (or the padded one for "padded"), and the function
    that turns a padded output back into the packed layout."""
    n, longest, b = sum(lengths), max(lengths), len(lengths)
    # Token i of the packed batch sits at (its sequence, its place in it) of the padded [B, longest] grid.
    seq = torch.repeat_interleave(torch.arange(b, device=device), torch.tensor(lengths, device=device))
    place = torch.arange(n, device=device) - cu.long()[seq]

    def pad(t):  # [N, H, D] -> [B, H, longest, D], zeros past each sequence's end
        padded = t.new_zeros(b, longest, *t.shape[1:])
        padded[seq, place] = t
        return padded.transpose(1, 2)

    mask = (torch.arange(longest, device=device)[None] < torch.tensor(lengths, device=device)[:, None]).view(b, 1, 1, -1)
    bounds = [(s, e) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s]
    paths = {
        "ours": lambda q, k, v: varlen_attention(q, k, v, cu, cu, longest, longest),
        # Padding is built inside the timed call: it is the work a padded batch costs.
        "padded": lambda q, k, v: F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask),
        "loop": lambda q, k, v: torch.cat([
            F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
            for s, e in bounds]),
    }
    if device.type == "cuda" and importlib.util.find_spec("torch.nn.attention.varlen"):
        from torch.nn.attention.varlen import varlen_attn

        paths["torch varlen_attn"] = lambda q, k, v: varlen_attn(q, k, v, cu, cu, longest, longest)
    if device.type == "cuda" and importlib.util.find_spec("flash_attn"):
        from flash_attn import flash_attn_varlen_func

        paths["flash-attn"] = lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, longest, longest)
    if with_flex and device.type == "cuda" and importlib.util.find_spec("torch.nn.attention.flex_attention"):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(torch.arange(b, device=device), torch.tensor(lengths, device=device))
        block_mask = create_block_mask(lambda b_, h, qi, ki: doc[qi] == doc[ki], None, None, n, n, device=device)
        flex = torch.compile(flex_attention, dynamic=False)
        paths["flex"] = lambda q, k, v: flex(*(t.transpose(0, 1)[None] for t in (q, k, v)),
                                             block_mask=block_mask)[0].transpose(0, 1)
    return paths, lambda padded: padded.transpose(1, 2)[seq, place]


def main():
    args = parser(__doc__).parse_args()
    device = device_for(args)
    repeats = 1 if args.dry_run else args.repeats
    dtypes = (torch.bfloat16, torch.float16)
    limits = {str(d): matmul_rate(device, d, n=256 if args.dry_run else 8192, repeats=repeats) for d in dtypes}
    results, rows, columns = [], [], []
    for name, lengths in workloads(args.dry_run).items():
        for dtype in dtypes:
            n = sum(lengths)
            cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
            q, k, v = (torch.randn(n, HEADS, HEAD_DIM, dtype=dtype, device=device) for _ in range(3))
            grad = torch.randn_like(q)
            paths, unpad = peer_paths(q, k, v, lengths, cu, device, (name, dtype) in FLEX_CASES)
            # Every peer must compute the same attention: its largest difference from ours goes into the JSON.
            ours = paths["ours"](q, k, v).float()
            differences = {}
            for path, fn in paths.items():
                try:
                    out = fn(q, k, v)
                    out = unpad(out) if path == "padded" else out
                    differences[path] = (out.float() - ours).abs().max().item()
                except Exception as e:  # noqa: BLE001  (timed below, where the error is recorded)
                    differences[path] = f"{type(e).__name__}"
            flops = sum(4 * l * l * HEADS * HEAD_DIM for l in lengths)
            rate = limits[str(dtype)]["tflop_per_s"]
            for backward in (False, True):
                entry = {"workload": name, "lengths": lengths, "dtype": str(dtype),
                         "pass": "fwd+bwd" if backward else "fwd", "paths": {}, "max_abs_diff_vs_ours": differences}
                for path, fn in paths.items():
                    def call(fn=fn, path=path):
                        leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
                        with nvtx_range(f"attn/{path}/{name}/{entry['pass']}"):
                            out = fn(*leaves)
                            if backward:
                                out.backward(grad if out.shape == grad.shape else torch.ones_like(out))
                    try:
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        t = time_device(call, device, repeats)
                    except Exception as e:  # a peer that cannot run this case is reported, not fatal
                        entry["paths"][path] = {"error": f"{type(e).__name__}: {e}"[:300]}
                        continue
                    t["tflop_per_s"] = flops * (3.5 if backward else 1) / (t["median_ms"] * 1e-3) / 1e12
                    t["share_of_matmul"] = t["tflop_per_s"] / rate
                    if device.type == "cuda":
                        t["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
                    entry["paths"][path] = t
                results.append(entry)
                p = entry["paths"]
                columns = list(dict.fromkeys(c for r in results for c in r["paths"]))
                rows.append([name, str(dtype)[6:], entry["pass"]] + [
                    f"{p[c]['median_ms']:.3f} / {p[c]['tflop_per_s']:.0f} / {p[c]['share_of_matmul']:.0%}"
                    if "median_ms" in p.get(c, {}) else ("error" if c in p else "-") for c in columns])
                # Saved after each case, so a run stopped at its budget keeps what it measured.
                save(limits, results, rows, columns, final=False)
    save(limits, results, rows, columns, final=True)


def save(limits, results, rows, columns, final):
    longest = max(results, key=lambda r: max(r["lengths"]))
    ours = [r["paths"]["ours"].get("share_of_matmul", 0) for r in results
            if r["workload"] == longest["workload"] and "ours" in r["paths"]]
    headers = ["workload", "dtype", "pass"] + [f"{c} ms / TFLOP/s / % mm" for c in columns]
    rows = [r + ["-"] * (len(headers) - len(r)) for r in rows]
    write_result("varlen_attention_gpu", {
        "heads": HEADS, "head_dim": HEAD_DIM, "matmul": limits, "results": results, "complete": final,
        "headline": f"longest workload ({longest['workload']}): ours {min(ours):.0%}-{max(ours):.0%} of the same-run "
                    "matmul rate"}, rows if final else None, headers)


if __name__ == "__main__":
    main()
