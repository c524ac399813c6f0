"""Varlen attention on the CPU: ours against the PyTorch paths a model could take, and the machine's matmul limit
measured in the same run: per dtype the fastest of torch.mm and oneDNN in that dtype and in float32 (ours widens
16-bit tiles to float32 where the CPU has no 16-bit dot products, so float32's rate bounds it there).

Workloads use ViT-B heads (12 x 64): the real token counts RLT keeps on 8 clips of 16 x 224 x 224 cut from the
sample videos, and synthetic length spreads (8 clips: all kept, about half, about a quarter; one sequence of two clips). Passes:
forward, and forward + backward. Peers, timed in the same run on the same tensors:
  padded  - F.scaled_dot_product_attention on the batch padded to the longest sequence, with a key-padding mask
            (padding and unpadding are not timed: generous to this path);
  loop    - one SDPA call per sequence on views of the packed tensors;
  nested  - SDPA on a jagged nested tensor (torch.nested, layout=torch.jagged);
  flex    - FlexAttention compiled (torch.compile), the packed tensors with a block mask of the sequences (building
            the mask is not timed); forward only, as PyTorch has no FlexAttention backward on the CPU.
GFLOP/s counts useful work only: 4 L^2 H D per sequence forward, 2.5x that for the backward pass. "peak MiB" is the
rise of the process's peak resident memory during one call (outputs and gradients included). The printout and the
JSON name the CPU, its vector ISA and the CPU path ours took (VIDFAST_ATTENTION_PATH, or --path, forces one).
Run: python -m bench.varlen_attention [--quick] [--path brgemm|avx2|default]
"""

import argparse
import ctypes
import os
import sys
from pathlib import Path

# Every allocation of 64 KiB or more gets its own mapping, returned on free, so the peak resident memory of a call
# shows what it allocated (glibc would otherwise serve it from memory already resident).
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.common import grouped_bar_chart, machine, markdown_table, matmul_rate, time_interleaved, write_json  # noqa: E402
from pyvidfast.ops import rlt_tokenize, varlen_attention  # noqa: E402
from pyvidfast.ops.varlen_attention import CPU_PATHS, cpu_path  # noqa: E402
from pyvidfast.io import decode_frames  # noqa: E402
from pyvidfast.samples import CLIPS, sample_path  # noqa: E402

HEADS, HEAD_DIM = 12, 64
FULL = 8 * 14 * 14  # tokens of a 16 x 224 x 224 clip with 2 x 16 x 16 tubelets
PEERS = ("padded", "loop", "nested", "flex")


def rlt_lengths(clips=8, frames=16, size=224):
    names = list(CLIPS)
    videos = [
        decode_frames(sample_path(names[i % len(names)]), frames, start=(i // len(names)) * 48, stride=2,
                      size=(size, size))
        for i in range(clips)
    ]
    tokens = rlt_tokenize(torch.stack(videos))
    return (tokens.cu_seqlens[1:] - tokens.cu_seqlens[:-1]).tolist()


def workloads(quick):
    gen = torch.Generator().manual_seed(0)
    spread = lambda lo, hi: torch.randint(int(lo * FULL), int(hi * FULL) + 1, (8,), generator=gen).tolist()  # noqa
    loads = {"rlt-8-clips": rlt_lengths(), "all-kept": [FULL] * 8, "half-kept": spread(0.25, 0.75),
             "quarter-kept": spread(0.1, 0.4), "one-long": [2 * FULL]}
    if quick:
        loads = {k: loads[k] for k in ("rlt-8-clips", "half-kept")}
    return loads


def peak_rss_rise_mib(fn):
    """Peak resident memory reached during fn() minus the resident memory before, via /proc (Linux)."""
    status = Path("/proc/self/status")
    clear = Path("/proc/self/clear_refs")
    if not (status.exists() and clear.exists()):
        return float("nan")

    def field(name):
        for line in status.read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1]) / 1024
        return float("nan")

    try:
        clear.write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    before = field("VmRSS:")
    fn()
    return field("VmHWM:") - before


class Problem:
    def __init__(self, lengths, dtype):
        self.lengths, self.dtype = lengths, dtype
        n, longest = sum(lengths), max(lengths)
        self.cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        self.max = longest
        self.packed = [torch.randn(n, HEADS, HEAD_DIM, dtype=dtype) for _ in range(3)]
        self.grad = torch.randn(n, HEADS, HEAD_DIM, dtype=dtype)
        # Padded [B, H, Lmax, D] copies and the key-padding mask [B, 1, 1, Lmax].
        b = len(lengths)
        self.padded = []
        for t in self.packed:
            p = t.new_zeros(b, longest, HEADS, HEAD_DIM)
            for i, (s, e) in enumerate(zip(self.cu[:-1].tolist(), self.cu[1:].tolist())):
                p[i, : e - s] = t[s:e]
            self.padded.append(p.transpose(1, 2))
        self.mask = (torch.arange(longest)[None] < torch.tensor(lengths)[:, None]).view(b, 1, 1, longest)
        self.padded_grad = torch.randn_like(self.padded[0])
        self.offsets = self.cu.long()
        self.block_mask = None
        self.flops = sum(4 * l * l * HEADS * HEAD_DIM for l in lengths)

    def flex_mask(self):
        from torch.nn.attention.flex_attention import create_block_mask

        n = sum(self.lengths)
        sequence = torch.repeat_interleave(torch.arange(len(self.lengths)), torch.tensor(self.lengths))
        return create_block_mask(lambda b, h, i, j: sequence[i] == sequence[j], None, None, n, n, device="cpu")

    def paths(self, backward):
        def run(make_leaves, forward, grad):
            leaves = make_leaves()
            out = forward(*leaves)
            if backward:
                out.backward(grad if grad.shape == out.shape else grad.view_as(out))
            return out

        packed_leaves = lambda: [t.detach().requires_grad_(backward) for t in self.packed]  # noqa: E731
        padded_leaves = lambda: [t.detach().requires_grad_(backward) for t in self.padded]  # noqa: E731

        def ours(q, k, v):
            return varlen_attention(q, k, v, self.cu, self.cu, self.max, self.max)

        def padded(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)

        bounds = list(zip(self.cu[:-1].tolist(), self.cu[1:].tolist()))

        def loop(q, k, v):
            outs = [
                F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
                for s, e in bounds
            ]
            return torch.cat(outs)

        def nested(q, k, v):
            nts = [torch.nested.nested_tensor_from_jagged(t, self.offsets).transpose(1, 2) for t in (q, k, v)]
            return F.scaled_dot_product_attention(*nts).transpose(1, 2).values()

        def flex(q, k, v):
            if self.block_mask is None:
                self.block_mask = self.flex_mask()
            heads_first = [t.transpose(0, 1)[None] for t in (q, k, v)]
            return compiled_flex_attention()(*heads_first, block_mask=self.block_mask)[0].transpose(0, 1)

        paths = {
            "ours": lambda: run(packed_leaves, ours, self.grad),
            "padded": lambda: run(padded_leaves, padded, self.padded_grad),
            "loop": lambda: run(packed_leaves, loop, self.grad),
            "nested": lambda: run(packed_leaves, nested, self.grad),
        }
        if not backward:
            paths["flex"] = lambda: run(packed_leaves, flex, self.grad)
        return paths


def usable_matmul_limit(limits: dict) -> dict:
    """GFLOP/s of the matmul each dtype's tiles can run on: the faster of its own matmul and float32's. Where the CPU
    has no 16-bit dot products (AVX2, AVX-512 without BF16) ours widens bfloat16 tiles to float32 and multiplies
    them at the float32 rate, while a bfloat16 torch.mm there is many times slower than that: dividing by it would
    give shares far above 100%."""
    f32 = limits[str(torch.float32)]["gflop_per_s"]
    return {d: max(r["gflop_per_s"], f32) for d, r in limits.items()}


def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    global _compiled_flex
    if _compiled_flex is None:
        # One compilation per workload and dtype (10 in the full run): past dynamo's default limit of 8 recompiles
        # flex_attention would silently run uncompiled, the slow reference path, and the peer's figure be wrong.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


_compiled_flex = None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="two workloads, for a smoke run")
    parser.add_argument("--skip-nested", action="store_true", help="leave out the (slow) nested-tensor path")
    parser.add_argument("--skip-flex", action="store_true", help="leave out FlexAttention (compiles for minutes)")
    parser.add_argument("--path", choices=CPU_PATHS, help="force this CPU path of ours (VIDFAST_ATTENTION_PATH)")
    args = parser.parse_args()
    if args.path:
        os.environ["VIDFAST_ATTENTION_PATH"] = args.path  # read by the library on its first call
    host = machine()  # write_json records it too; the path is what this benchmark adds
    cpu = {"model": host["cpu_model"], "isa": "+".join(host["isa_flags"]),
           "aten_capability": host["aten_cpu_capability"], "path": cpu_path()}
    print(f"CPU: {cpu['model']} ({cpu['isa']}; ATen capability {cpu['aten_capability']}), "
          f"varlen_attention CPU path: {cpu['path']}")

    # float32's limit is the best of three sizes (on this project's AMD machine 107 GFLOP/s at 1024^3, below our
    # kernel's rate, and 132 at 3072^3); a bfloat16 matmul without 16-bit dot products is too slow to time at 3072
    # and is below float32's anyway (usable_matmul_limit).
    limits = {str(torch.float32): max((matmul_rate(n, torch.float32) for n in (1024, 2048, 3072)),
                                      key=lambda r: r["gflop_per_s"]),
              str(torch.bfloat16): matmul_rate(1024, torch.bfloat16)}
    mm = usable_matmul_limit(limits)
    loads = workloads(args.quick)
    cases = [(w, d, bwd) for w in loads for d in (torch.float32, torch.bfloat16) for bwd in (False, True)]
    skipped = {name for name, skip in (("nested", args.skip_nested), ("flex", args.skip_flex)) if skip}
    nan = {"median_ms": float("nan"), "gflop_per_s": float("nan"), "peak_mib": float("nan")}
    results, rows = [], []
    for name, dtype, backward in tqdm(cases, desc="attention"):
        problem = Problem(loads[name], dtype)
        flops = problem.flops * (3.5 if backward else 1.0)
        entry = {"workload": name, "dtype": str(dtype), "pass": "fwd+bwd" if backward else "fwd",
                 "lengths": problem.lengths, "kept": sum(problem.lengths) / (FULL * len(problem.lengths)),
                 "gflop": flops / 1e9, "paths": {}}
        fns = {k: fn for k, fn in problem.paths(backward).items() if k not in skipped}
        # The nested path runs PyTorch's math kernel (slow): one run is enough to place it.
        timed = time_interleaved(fns, args.repeats, once=frozenset({"nested"}))
        for path in ("ours", *PEERS):
            if path not in timed:
                entry["paths"][path] = dict(nan)
                continue
            t = timed[path]
            t["gflop_per_s"] = flops / (t["median_ms"] * 1e-3) / 1e9
            t["peak_mib"] = peak_rss_rise_mib(fns[path])
            entry["paths"][path] = t
        p = entry["paths"]
        best_peer = min((k for k in PEERS if p[k]["median_ms"] == p[k]["median_ms"]), key=lambda k: p[k]["median_ms"])
        entry["best_peer"] = best_peer
        entry["speedup_vs_best_peer"] = p[best_peer]["median_ms"] / p["ours"]["median_ms"]
        entry["speedup_vs_padded"] = p["padded"]["median_ms"] / p["ours"]["median_ms"]
        entry["fraction_of_mm"] = p["ours"]["gflop_per_s"] / mm[str(dtype)]
        entry["best_peer_fraction_of_mm"] = p[best_peer]["gflop_per_s"] / mm[str(dtype)]
        results.append(entry)
        rows.append([name, str(dtype).replace("torch.", ""), entry["pass"], f"{entry['kept']:.0%}",
                     *(p[k]["median_ms"] for k in ("ours", *PEERS)), p["ours"]["gflop_per_s"],
                     f"{entry['fraction_of_mm']:.0%} / {entry['best_peer_fraction_of_mm']:.0%}",
                     f"{entry['speedup_vs_best_peer']:.2f} ({best_peer})", entry["speedup_vs_padded"],
                     f"{p['ours']['peak_mib']:.0f} / {p['padded']['peak_mib']:.0f}"])
    headers = ["workload", "dtype", "pass", "kept", "ours ms", *(f"{k} ms" for k in PEERS), "ours GFLOP/s",
               "of matmul limit ours / best peer", "x best peer", "x padded", "peak MiB ours / padded"]
    table = markdown_table(headers, rows)
    print("matmul: " + ", ".join(
        f"{d.replace('torch.', '')} {r['gflop_per_s']:.0f} GFLOP/s ({r['n']}^3, {r['path']}; "
        + ", ".join(f"{k} {v['gflop_per_s']:.0f}" for k, v in r["by_path"].items()) + ")" for d, r in limits.items())
        + f", {torch.get_num_threads()} threads; matmul limit used (the faster of the dtype's and float32's): "
        + ", ".join(f"{d.replace('torch.', '')} {v:.0f} GFLOP/s" for d, v in mm.items()))
    print(table)
    name = "varlen_attention" if args.path is None else f"varlen_attention_{args.path}"
    path = write_json(name, {"cpu": cpu, "matmul": limits, "matmul_limit_gflop_per_s": mm, "results": results,
                             "table": table})
    print(f"wrote {path} and {plot(results, path.with_suffix('.png'))}")


def plot(results: list[dict], out: Path) -> Path:
    """Bar chart: ms per call of ours and each PyTorch path, per workload, dtype and pass (log scale)."""
    labels = [f"{r['workload']}\n{r['dtype'].replace('torch.', '')} {r['pass']}" for r in results]
    series = {name: [r["paths"][name]["median_ms"] for r in results] for name in ("ours", *PEERS)}
    return grouped_bar_chart(labels, series, "ms per call (lower is better)",
                             "Varlen attention on the CPU, ViT-B heads (12 x 64)", out)


if __name__ == "__main__":
    main()
