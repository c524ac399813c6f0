"""Every CUDA op against the CPU op on the same inputs, recorded case by case (the GPU check's sweep beside the
suite's CUDA tests, which stop at the first failure): varlen attention forward and backward against the float64
reference (the CPU op in float64), for each dtype, head dim, causal mode, odd and empty sequences and grouped-query
heads; RLT mask/tokenize (uint8, float32, bfloat16, float16 video; odd grids; the gradient to a float video);
group_topk (each dtype, ties, empty and full budgets, both score buffers). Writes $OUT/parity_gpu.json with the
error of each case beside its tolerance and exits 1 on any mismatch.

    python -m bench.parity_gpu [--dry-run]
"""

import math
import time

import torch

from bench.common_gpu import device_for, parser, write_result
from pyvidfast.ops import group_topk, rlt_mask, rlt_tokenize, varlen_attention

# Attention tolerances: relative to the reference's largest magnitude, as tests/test_varlen_attention.py budgets them
# (bfloat16/float16 round the output and P; the backward pass rounds once more, so twice the forward budget).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def cu_seqlens(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    scale = max(expected.abs().max().item(), 1e-3)
    return (actual.double().cpu() - expected.double().cpu()).abs().max().item() / scale


def attention_case(device, dtype, head_dim, causal, lengths_q, lengths_k, heads, kv_heads):
    """Errors of out, lse and the three gradients of the device op in dtype against the CPU op in float64."""
    q = torch.randn(sum(lengths_q), heads, head_dim).to(dtype)
    k = torch.randn(sum(lengths_k), kv_heads, head_dim).to(dtype)
    v = torch.randn(sum(lengths_k), kv_heads, head_dim).to(dtype)
    max_q, max_k = max(lengths_q, default=0), max(lengths_k, default=0)
    results = []
    for dev, cast in ((device, dtype), (torch.device("cpu"), torch.float64)):
        leaves = [t.to(dev, cast, copy=True).requires_grad_() for t in (q, k, v)]
        out, lse = varlen_attention(*leaves, cu_seqlens(lengths_q, dev), cu_seqlens(lengths_k, dev), max_q, max_k,
                                    causal=causal, return_lse=True)
        results.append((out, lse, leaves))
    (out, lse, leaves), (ref_out, ref_lse, ref_leaves) = results
    grad_out = torch.randn(ref_out.shape, dtype=torch.float64)
    finite = torch.isfinite(ref_lse)
    grad_lse = torch.randn(ref_lse.shape, dtype=torch.float64).masked_fill(~finite, 0.0)
    for o, l, g_o in ((out, lse, grad_out.to(device)), (ref_out, ref_lse, grad_out)):
        ((o.double() * g_o).sum() + (l.double().nan_to_num(0, 0, 0) * grad_lse.to(l.device)).sum()).backward()
    lse_cpu = lse.detach().cpu()
    errors = {"out": relative_error(out.detach(), ref_out.detach()),
              "lse": relative_error(lse_cpu[finite], ref_lse.detach()[finite]),
              **{f"grad_{n}": relative_error(a.grad, b.grad) for n, a, b in zip("qkv", leaves, ref_leaves)}}
    tol = {name: TOLERANCE[dtype] * (2 if name.startswith("grad") else 1) for name in errors}
    ok = all(errors[n] <= tol[n] for n in errors) and torch.equal(torch.isfinite(lse_cpu), finite)
    return {"errors": errors, "tolerance": tol, "ok": bool(ok)}


def attention_cases(dry_run):
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    head_dims = [64, 80] if dry_run else [32, 64, 80, 96, 128]
    # Empty and one-token sequences, lengths around the tile sizes, queries != keys, and one long sequence.
    shapes = [([0, 1, 300, 129, 7, 64, 513], [3, 1, 300, 200, 0, 64, 513], 4, 2)]
    if dry_run:
        shapes = [([0, 5, 17], [2, 5, 17], 4, 2)]
    else:
        shapes.append(([1568, 1000, 333], [1568, 1000, 333], 12, 12))
    for dtype in dtypes:
        for head_dim in head_dims:
            for causal in (False, True):
                for lq, lk, h, hkv in shapes:
                    yield (f"attention {str(dtype)[6:]} d={head_dim} causal={causal} H={h}/{hkv} "
                           f"lengths={len(lq)}x max {max(lq)}", (dtype, head_dim, causal, lq, lk, h, hkv))


def rlt_case(device, video):
    """Mask and lengths equal; packed tokens equal (1e-6); the gradient to a float video close."""
    keep_cpu, len_cpu = rlt_mask(video)
    keep_dev, len_dev = rlt_mask(video.to(device))
    same_mask = torch.equal(keep_cpu, keep_dev.cpu()) and torch.equal(len_cpu, len_dev.cpu())
    errors = {}
    cpu, dev = rlt_tokenize(video), rlt_tokenize(video.to(device))
    for name, a, b in zip(cpu._fields, cpu, dev):
        if a.shape != b.shape:
            errors[name] = math.inf
        else:
            errors[name] = (a.double() - b.double().cpu()).abs().max().item() if a.numel() else 0.0
    # The same arithmetic on both devices: float32 rounding only (16-bit inputs: a little more for the cast).
    tol = {name: (1e-5 if video.dtype in (torch.bfloat16, torch.float16) else 1e-6) if name == "patches" else 0.0
           for name in errors}
    if video.is_floating_point():
        grads = []
        for dev_ in (torch.device("cpu"), device):
            leaf = video.to(dev_, copy=True).requires_grad_()
            packed = rlt_tokenize(leaf)
            weight = torch.linspace(-1, 1, packed.patches.numel(), device=dev_).view_as(packed.patches)
            (packed.patches.float() * weight).sum().backward()
            grads.append(leaf.grad.double().cpu())
        errors["grad_video"] = (grads[0] - grads[1]).abs().max().item()
        tol["grad_video"] = tol["patches"]
    ok = same_mask and all(errors[n] <= tol[n] for n in errors)
    return {"same_mask_and_lengths": same_mask, "errors": errors, "tolerance": tol, "ok": bool(ok)}


def rlt_videos(dry_run):
    gen = torch.Generator().manual_seed(1)

    def planted(b, t, h, w):
        """Random frames with repeats planted, so that both kept and dropped tokens occur."""
        video = torch.randint(0, 256, (b, t, h, w, 3), dtype=torch.uint8, generator=gen)
        video[:, 2:4] = video[:, 0:2]
        video[:, -2:, : h // 2] = video[:, -4:-2, : h // 2]
        return video

    shapes = [(2, 4, 32, 48)] if dry_run else [(2, 16, 224, 224), (3, 6, 48, 80), (1, 2, 16, 16), (4, 8, 112, 96)]
    for shape in shapes:
        u8 = planted(*shape)
        yield f"rlt uint8 {tuple(u8.shape)}", u8
        x = (u8.permute(0, 4, 1, 2, 3).double() / 255 - 0.45) / 0.225
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            yield f"rlt {str(dtype)[6:]} {tuple(x.shape)}", x.to(dtype).contiguous()


def group_topk_cases(dry_run):
    shapes = [((2, 4, 3, 8), 4, 5), ((3, 6, 49, 65), 2, 77), ((2, 4, 7, 5), 2, 0), ((2, 4, 7, 5), 2, 28)]
    if not dry_run:  # 11776 tokens fill the shared-memory score buffer; more take the global scratch path
        shapes += [((8, 16, 256, 768), 4, 2048), ((1, 2, 5888, 4), 1, 7000), ((2, 8, 2000, 8), 1, 9001)]
    for shape, groups, budget in shapes:
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            yield f"group_topk {str(dtype)[6:]} {shape} G={groups} K={budget}", (shape, groups, budget, dtype)


def group_topk_case(device, shape, groups, budget, dtype):
    x = torch.randn(shape).to(dtype)
    x[:, 1] = x[:, 0]  # exact zero scores: the tie rule decides
    cpu = group_topk(x, groups, budget, return_scores=True)
    dev = group_topk(x.to(device), groups, budget, return_scores=True)
    same_indices = torch.equal(cpu[0], dev[0].cpu())
    same_scores = torch.equal(cpu[1].nan_to_num(-1), dev[1].cpu().nan_to_num(-1))
    return {"same_indices": same_indices, "same_scores": same_scores, "ok": bool(same_indices and same_scores)}


def main():
    args = parser(__doc__).parse_args()
    device = device_for(args)
    torch.manual_seed(0)
    records = []

    def run(op, name, fn):
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # a crash is a mismatch too; the sweep goes on
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
        result.update(op=op, case=name, seconds=round(time.perf_counter() - t0, 3))
        records.append(result)
        print(("ok  " if result["ok"] else "FAIL") + f" {name}" + (f": {result.get('error', result.get('errors'))}"
                                                                  if not result["ok"] else ""), flush=True)

    for name, case in attention_cases(args.dry_run):
        run("varlen_attention", name, lambda case=case: attention_case(device, *case))
    for name, video in rlt_videos(args.dry_run):
        run("rlt", name, lambda video=video: rlt_case(device, video))
    for name, case in group_topk_cases(args.dry_run):
        run("group_topk", name, lambda case=case: group_topk_case(device, *case))
    if device.type == "cuda":
        torch.cuda.synchronize()
    failed = [r["case"] for r in records if not r["ok"]]
    per_op = {}
    for r in records:
        n, bad = per_op.get(r["op"], (0, 0))
        per_op[r["op"]] = (n + 1, bad + (not r["ok"]))
    rows = [[op, n, bad] for op, (n, bad) in per_op.items()]
    write_result("parity_gpu", {"device": str(device), "cases": records, "failed": failed,
                                "headline": f"{len(records)} cases, {len(failed)} mismatches"},
                 rows, ["op", "cases", "mismatches"])
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
