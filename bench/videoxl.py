"""Video-XL prefill: ours (chunked vision, packed window steps on varlen_attention) against the same model without
compression (one causal pass over every visual token) and against the official algorithm written plainly (batch 1,
all frames through CLIP at once, a Python loop over placeholder positions, SDPA with an explicit mask per window).

    python -m bench.videoxl                 # small random config on the CPU
    python -m bench.videoxl --quick --threads 2   # fewer points, the same target measurements: minutes
    python -m bench.videoxl --quick --threads 1 --clock cpu   # CPU time: steadier on a busy machine
    python -m bench.videoxl --preset 7b     # Qwen2-7B + CLIP ViT-L/14-336 shapes (random weights) on a GPU

Two targets are ratios of times and are measured interleaved (best of ``--rounds`` rounds that run the compared
calls in turn): time per frame at 2048 frames over 128 (<= 1.3x), and a batch of 4 videos of different lengths in
one call over 4 calls of batch 1 (>= 2x), each for the whole prefill and for the window steps alone (features
encoded beforehand), with the profiled shares of GEMMs, the attention op and the rest on the CPU.

Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the peak resident-set growth during the run.
Writes bench/results/videoxl.json (its "table" fills docs/videoxl.md through bench.report) and videoxl.png.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig
from transformers.models.qwen2.modeling_qwen2 import rotate_half

from bench.common import RESULTS_DIR, markdown_table, write_json
from pyvidfast.models.videoxl import IMAGE_TOKEN_INDEX, Memory, VideoXL, clip_vit_l14_336_config, qwen2_7b_config

PRESETS = {
    # 16 tokens per frame (112 px, 8x8 patches, 2x2 pool); windows of 240 tokens = 15 frames (divisible by 2..16)
    "small": dict(llm=dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, beacon_window=240, beacon_stride=240,
                           mm_hidden_size=64, max_position_embeddings=65536, eos_token_id=3,
                           bos_token_id=None),
                  vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=112, patch_size=14, hidden_act="quick_gelu")),
    "7b": dict(llm={}, vision=None),
}
PROMPT_BEFORE, PROMPT_AFTER = 14, 20  # ChatML system turn + user prefix; the question and assistant header


def build(preset: str, device: str, dtype: torch.dtype) -> VideoXL:
    spec = PRESETS[preset]
    vision = CLIPVisionConfig(**spec["vision"]) if spec["vision"] else clip_vit_l14_336_config()
    with torch.device(device):
        model = VideoXL(qwen2_7b_config(**spec["llm"]), vision, vision_chunk=32)
    return model.to(dtype).eval()


def inputs(model: VideoXL, frames: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(4, 1000, (PROMPT_BEFORE,), generator=g), torch.tensor([IMAGE_TOKEN_INDEX]),
                     torch.randint(4, 1000, (PROMPT_AFTER,), generator=g)])
    size = model.model.vision_tower.image_size
    device = model.lm_head.weight.device
    video = torch.randn(frames, 3, size, size, generator=g).to(device, model.lm_head.weight.dtype)
    return ids.to(device), video


# ----------------------------------------------------------------------------------------------- the methods


def ours(model, ids, video, ratio):
    return model.prefill([ids], [video], ratio=ratio).memory.nbytes()


def full_attention(model, ids, video, ratio=None):
    """The same model, no compression: one causal pass over the prompt, every visual token and the question."""
    where = int((ids == IMAGE_TOKEN_INDEX).nonzero())
    feats = model.encode_frames(video)
    embeds = torch.cat([model.model.embed_tokens(ids[:where]), feats, model.model.embed_tokens(ids[where + 1:])])
    cfg = model.config
    memory = Memory.empty(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, model.model.layers[0].self_attn.head_dim,
                          embeds)
    model._step(memory, embeds, [len(embeds)], None, None, "text")
    return memory.nbytes()


def official_plain(model, ids, video, ratio):
    """The official algorithm, plainly: CLIP on all frames at once, placeholders filled one position at a time,
    per window an explicit float mask (memory visible, causal inside) through SDPA, VST keys/values kept."""
    lm = model.model
    tower = lm.vision_tower
    # all frames at once through every layer, all hidden states kept (encode_multimodals)
    hidden = tower.vision_tower(pixel_values=video, output_hidden_states=True).hidden_states[tower.select_layer][:, 1:]
    patches = lm.mm_projector(hidden)
    n, _, c = patches.shape
    grid = patches.view(n, tower.grid, tower.grid, c).permute(0, 3, 1, 2)
    image_features = F.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(-1, c)
    where = int((ids == IMAGE_TOKEN_INDEX).nonzero())
    placeholder, beacon = model.vocab_size - 1, model.vocab_size
    expanded = torch.cat([ids[:where], ids.new_full((len(image_features),), placeholder), ids[where + 1:]])
    skip_last = where + len(image_features)
    layers = lm.layers
    mem_k = [None] * len(layers)
    mem_v = [None] * len(layers)
    image_idx = 0
    window = model.settings.window
    steps = [(0, where, 0)] + [(s, min(s + window, skip_last), ratio) for s in range(where, skip_last, window)]
    steps.append((skip_last, len(expanded), 0))
    for start, end, r in steps:
        raw = expanded[start:end]
        if len(raw) == 0:
            continue
        if r:
            slots = torch.arange(len(raw) + len(raw) // r)
            step_ids = raw.new_full((len(slots),), beacon)
            step_ids[slots % (r + 1) != r] = raw
        else:
            step_ids = raw
        embeds = []
        for token in step_ids.tolist():  # the official per-position loop with a running image_idx
            if token == placeholder:
                embeds.append(image_features[image_idx])
                image_idx += 1
            elif token == beacon:
                embeds.append(lm.beacon_embed_tokens.weight[0])
            else:
                embeds.append(lm.embed_tokens.weight[token])
        h = torch.stack(embeds)[None]
        is_vst = step_ids == beacon
        cur = h.shape[1]
        past = 0 if mem_k[0] is None else mem_k[0].shape[2]
        mask = torch.zeros(cur, past + cur, dtype=h.dtype, device=h.device)
        mask[:, past:] = torch.full((cur, cur), float("-inf"), dtype=h.dtype, device=h.device).triu(1)
        cos, sin = lm.rotary_emb(h, torch.arange(past + cur, device=h.device)[None])
        for i, layer in enumerate(layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            sel = is_vst[None, :, None]
            q = torch.where(sel, a.beacon_q_proj(x), a.q_proj(x)).view(1, cur, -1, a.head_dim).transpose(1, 2)
            k = torch.where(sel, a.beacon_k_proj(x), a.k_proj(x)).view(1, cur, -1, a.head_dim).transpose(1, 2)
            v = torch.where(sel, a.beacon_v_proj(x), a.v_proj(x)).view(1, cur, -1, a.head_dim).transpose(1, 2)
            keys = k if mem_k[i] is None else torch.cat([mem_k[i], k], 2)
            values = v if mem_v[i] is None else torch.cat([mem_v[i], v], 2)
            qr = q * cos[:, None, past:] + rotate_half(q) * sin[:, None, past:]
            kr = keys * cos[:, None] + rotate_half(keys) * sin[:, None]
            out = F.scaled_dot_product_attention(qr, kr, values, attn_mask=mask, enable_gqa=True)
            h = h + a.o_proj(out.transpose(1, 2).reshape(1, cur, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            keep = is_vst if r else torch.ones_like(is_vst)
            keep = torch.cat([torch.ones(past, dtype=torch.bool, device=h.device), keep])
            mem_k[i], mem_v[i] = keys[:, :, keep], values[:, :, keep]
    return sum(k.numel() * k.element_size() * 2 for k in mem_k)


def vision_ours(model, ids, video, ratio=None):
    model.encode_frames(video)
    return 0


def vision_all_at_once(model, ids, video, ratio=None):
    model.encode_frames(video, chunk=len(video))
    return 0


METHODS = {"ours": ours, "full_attention": full_attention, "official_plain": official_plain,
           "vision_ours": vision_ours, "vision_all_at_once": vision_all_at_once}


# ---------------------------------------------------------------------------------------------- measurement


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]  # --clock cpu: this process's CPU time, steadier than wall time on a shared machine


def timed(fn, device, quick_ms: float = 5000.0):
    """Time of fn() in ms on ``clock`` (the better of two runs when one is quicker than quick_ms) and its
    result."""
    best, out = float("inf"), None
    for attempt in range(2):
        sync(device)
        start = clock()
        out = fn()
        sync(device)
        best = min(best, (clock() - start) * 1e3)
        if best > quick_ms:
            break
    return best, out


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def peak_memory(args, method, frames, ratio) -> int:
    """Peak memory growth of one run: CUDA allocator stats on a GPU; on the CPU the peak resident set (VmHWM,
    reset through /proc/self/clear_refs) above the resident set before the run. glibc returns freed large blocks
    to the system only with a fixed mmap threshold, which main() sets by re-executing itself."""
    model = args.model
    ids, video = inputs(model, frames)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_bytes("VmRSS")
    with torch.no_grad():
        METHODS[method](model, ids, video, ratio)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _status_bytes("VmHWM") - base


def kv_formula(model, frames, ratio) -> int:
    cfg = model.config
    entries = PROMPT_BEFORE + frames * model.tokens_per_frame // ratio + PROMPT_AFTER
    head_dim = model.model.layers[0].self_attn.head_dim
    per_entry = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * model.lm_head.weight.element_size()
    return per_entry * entries


def interleaved(fns: dict, device: str, rounds: int) -> dict:
    """Best time in ms of each of ``fns`` over ``rounds`` rounds that run them in turn (a busy machine
    slows neighbours alike, so the ratios of one round stay comparable)."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            ms, _ = timed(fn, device, quick_ms=0.0)
            best[name] = min(best[name], ms)
    return best


def time_shares(fn) -> dict:
    """Shares of one run's wall time (torch.profiler, self time per op): GEMMs (aten::mm/addmm/bmm), the attention
    op, and everything else (elementwise ops, gathers, norms, Python between ops)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()  # wall time, as the profiler's per-op times
        fn()
        total_ms = (time.perf_counter() - start) * 1e3
    self_ms = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
    gemm = sum(self_ms.get(k, 0.0) for k in ("aten::mm", "aten::addmm", "aten::bmm"))
    attention = self_ms.get("vidfast::varlen_attention_fwd", 0.0)
    return {"profiled_ms": total_ms, "gemm_ms": gemm, "attention_ms": attention,
            "other_ms": total_ms - gemm - attention, "ops": sum(e.count for e in prof.key_averages())}


def measure_targets(model, args) -> dict:
    """The two targets that need ratios of times: time per frame at the largest F over the smallest (target
    <= 1.3x at 2048 against 128), and a batch of 4 videos of different lengths in one call against 4 calls of
    batch 1 (target >= 2x), each timed interleaved; the batch both with the vision pass (the whole prefill)
    and on features encoded beforehand (the window steps alone)."""
    small, large = args.linearity_frames
    clips = {f: inputs(model, f) for f in (small, large)}
    per_frame = interleaved({f: (lambda f=f: ours(model, *clips[f], args.ratio)) for f in (small, large)},
                            args.device, args.rounds)
    feats = {f: model.encode_frames(clips[f][1]) for f in (small, large)}
    steps = interleaved({f: (lambda f=f: model.prefill([clips[f][0]], features=[feats[f]], ratio=args.ratio))
                         for f in (small, large)}, args.device, args.rounds)
    linearity = {"frames": [small, large], "ratio": args.ratio,
                 "prefill_ms_per_frame": [per_frame[f] / f for f in (small, large)],
                 "window_steps_ms_per_frame": [steps[f] / f for f in (small, large)]}
    linearity["per_frame_growth"] = per_frame[large] / large / (per_frame[small] / small)
    linearity["window_steps_per_frame_growth"] = steps[large] / large / (steps[small] / small)

    frames = args.batch_frames
    lengths = [frames, frames // 2, frames // 4 * 3, frames // 8 * 5]
    batch = [inputs(model, f, seed=i) for i, f in enumerate(lengths)]
    prompts, videos = [b[0] for b in batch], [b[1] for b in batch]
    features = [model.encode_frames(v) for v in videos]
    fns = {"batch4_ms": lambda: model.prefill(prompts, videos, ratio=args.ratio),
           "four_batch1_ms": lambda: [model.prefill([i], [v], ratio=args.ratio) for i, v in zip(prompts, videos)],
           "batch4_steps_ms": lambda: model.prefill(prompts, features=features, ratio=args.ratio),
           "four_batch1_steps_ms": lambda: [model.prefill([i], features=[f], ratio=args.ratio)
                                            for i, f in zip(prompts, features)]}
    batched = {"frames": lengths, "ratio": args.ratio, **interleaved(fns, args.device, args.rounds)}
    batched["speedup"] = batched["four_batch1_ms"] / batched["batch4_ms"]
    batched["steps_speedup"] = batched["four_batch1_steps_ms"] / batched["batch4_steps_ms"]
    if not args.device.startswith("cuda"):
        batched["shares"] = {"batch4_steps": time_shares(fns["batch4_steps_ms"]),
                             "four_batch1_steps": time_shares(fns["four_batch1_steps_ms"])}
    return {"linearity": linearity, "batch": batched}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="fewer points (frames 128 512 2048, ratios 2 16 at 256 frames, full attention up to 512 "
                        "frames): a few minutes on 2 CPU threads; the targets are measured the same way")
    p.add_argument("--frames", type=int, nargs="+", default=None, help="default 64 .. 2048")
    p.add_argument("--ratios", type=int, nargs="+", default=None, help="default 2 4 8 12 16")
    p.add_argument("--ratio", type=int, default=16, help="ratio of the frame sweep and of the targets")
    p.add_argument("--ratio-frames", type=int, default=None, help="frames of the ratio sweep (default 512)")
    p.add_argument("--full-attention-max-frames", type=int, default=None,
                   help="largest F of the uncompressed baseline (default 2048, --quick 512)")
    p.add_argument("--linearity-frames", type=int, nargs=2, default=[128, 2048],
                   help="time per frame at the second F over the first (target: <= 1.3x at 2048 over 128)")
    p.add_argument("--batch-frames", type=int, default=512, help="the longest of the 4 videos of the batch target")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the target measurements")
    p.add_argument("--budget-s", type=float, default=60.0, help="skip a method at larger F once one run exceeds it")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="cpu: the process's CPU time (with --threads 1 on a CPU; steadier on a busy machine)")
    args = p.parse_args(argv)
    if args.clock == "cpu" and (args.device.startswith("cuda") or args.threads != 1):
        p.error("--clock cpu: needs --device cpu and --threads 1 (CPU time adds up the threads' time)")
    args.frames = args.frames or ([128, 512, 2048] if args.quick else [64, 128, 256, 512, 1024, 2048])
    args.ratios = args.ratios or ([2, 16] if args.quick else [2, 4, 8, 12, 16])
    args.ratio_frames = args.ratio_frames or (256 if args.quick else 512)
    args.full_attention_max_frames = args.full_attention_max_frames or (512 if args.quick else 2048)
    if not args.device.startswith("cuda") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)  # see peak_memory
        os.execv(sys.executable, [sys.executable, "-m", "bench.videoxl", *(sys.argv[1:] if argv is None else argv)])
    if args.threads:
        torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    model = build(args.preset, args.device, dtype)
    args.model = model
    results = {"preset": args.preset, "device": args.device, "dtype": str(dtype), "quick": args.quick,
               "clock": args.clock,
               "tokens_per_frame": model.tokens_per_frame, "window": model.settings.window, "frames": [],
               "ratios": []}
    over_budget = set()
    with torch.no_grad():
        ids, video = inputs(model, 8)
        ours(model, ids, video, args.ratio)  # warm-up
        for frames in args.frames:
            ids, video = inputs(model, frames)
            row = {"frames": frames, "ratio": args.ratio}
            for method in ("ours", "official_plain", "full_attention", "vision_ours", "vision_all_at_once"):
                if method in over_budget or (method == "full_attention" and frames > args.full_attention_max_frames):
                    continue
                ms, kv = timed(lambda: METHODS[method](model, ids, video, args.ratio), args.device)
                row[f"{method}_ms"] = ms
                if method in ("ours", "official_plain", "full_attention"):
                    row[f"{method}_kv_bytes"] = kv
                if not args.no_memory:
                    row[f"{method}_peak_bytes"] = peak_memory(args, method, frames, args.ratio)
                if ms > args.budget_s * 1e3:
                    over_budget.add(method)
            row["kv_formula_bytes"] = kv_formula(model, frames, args.ratio)
            row["ours_ms_per_frame"] = row["ours_ms"] / frames
            results["frames"].append(row)
            print(json.dumps(row), flush=True)
        ids, video = inputs(model, args.ratio_frames)
        for ratio in args.ratios:
            ms, kv = timed(lambda: ours(model, ids, video, ratio), args.device)
            row = {"frames": args.ratio_frames, "ratio": ratio, "ours_ms": ms, "ours_kv_bytes": kv,
                   "kv_formula_bytes": kv_formula(model, args.ratio_frames, ratio)}
            results["ratios"].append(row)
            print(json.dumps(row), flush=True)
        results.update(measure_targets(model, args))
        print(json.dumps({k: results[k] for k in ("linearity", "batch")}), flush=True)
    results["table"] = table(results)
    path = write_json("videoxl", results)
    plot(results)
    print(results["table"])
    print(f"wrote {path}")


def table(results) -> str:
    rows = []
    for r in results["frames"]:
        rows.append([r["frames"], _ms(r["ours_ms"]), _ms(r.get("official_plain_ms")),
                     _ms(r.get("full_attention_ms")), r["ours_ms_per_frame"],
                     f"{r['ours_kv_bytes']} = {r['kv_formula_bytes']}" if r["ours_kv_bytes"] == r["kv_formula_bytes"]
                     else f"{r['ours_kv_bytes']} != {r['kv_formula_bytes']}",
                     _mb(r.get("vision_ours_peak_bytes")), _mb(r.get("vision_all_at_once_peak_bytes"))])
    frames = markdown_table(["frames", "ours ms", "official plain ms", "full attention ms", "ours ms/frame",
                             "KV bytes = formula", "vision peak MB (chunked)", "vision peak MB (all at once)"], rows)
    ratios = markdown_table(["ratio", "frames", "ours ms", "KV bytes", "KV formula"],
                            [[r["ratio"], r["frames"], _ms(r["ours_ms"]), r["ours_kv_bytes"], r["kv_formula_bytes"]]
                             for r in results["ratios"]])
    lin, bat = results["linearity"], results["batch"]
    (small, large), lengths = lin["frames"], "+".join(map(str, bat["frames"]))
    targets = [
        [f"time per frame, {large} over {small} frames (prefill)", f"{lin['per_frame_growth']:.2f}x",
         "<= 1.3x", "yes" if lin["per_frame_growth"] <= 1.3 else "no"],
        [f"time per frame, {large} over {small} frames (window steps alone)",
         f"{lin['window_steps_per_frame_growth']:.2f}x", "", ""],
        [f"batch of 4 ({lengths} frames) over 4 calls of batch 1 (prefill)", f"{bat['speedup']:.2f}x", ">= 2x",
         "yes" if bat["speedup"] >= 2 else "no"],
        ["the same, window steps alone (features given)", f"{bat['steps_speedup']:.2f}x", "", ""],
    ]
    for name, key in (("batch 4", "batch4_steps"), ("4 x batch 1", "four_batch1_steps")):
        s = bat.get("shares", {}).get(key)
        if s:
            total = s["profiled_ms"]
            targets.append([f"window steps, {name}: GEMM / attention / other share of {total:.0f} ms "
                            f"({s['ops']} ops, profiled)",
                            " / ".join(f"{s[k] / total:.0%}" for k in ("gemm_ms", "attention_ms", "other_ms")),
                            "", ""])
    targets = markdown_table(["target", "measured", "goal", "met"], targets)
    return (f"Prefill at r = {results['frames'][0]['ratio']} ({results['clock']} time):\n\n{frames}\n\n"
            f"Ratios:\n\n{ratios}\n\nTargets (interleaved, best of rounds):\n\n{targets}")


def _mb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _ms(ms) -> str:
    return "-" if ms is None else f"{ms:,.0f}"


def plot(results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    frames = [r["frames"] for r in results["frames"]]
    for method in ("ours", "official_plain", "full_attention"):
        pts = [(r["frames"], r[f"{method}_ms"]) for r in results["frames"] if f"{method}_ms" in r]
        ax1.plot(*zip(*pts), marker="o", label=method)
    ax1.set_xscale("log", base=2), ax1.set_yscale("log")
    ax1.set_xlabel("frames"), ax1.set_ylabel("prefill ms"), ax1.legend(), ax1.set_title("prefill time")
    for method in ("vision_ours", "vision_all_at_once"):
        pts = [(r["frames"], r[f"{method}_peak_bytes"] / 2**20) for r in results["frames"]
               if f"{method}_peak_bytes" in r]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=method)
    ax2.set_xscale("log", base=2), ax2.set_xlabel("frames"), ax2.set_ylabel("peak MiB"), ax2.legend()
    ax2.set_title("vision peak memory")
    fig.suptitle(f"Video-XL prefill ({results['preset']}, {results['device']}); frames {frames[0]}..{frames[-1]}")
    fig.tight_layout()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS_DIR / "videoxl.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
