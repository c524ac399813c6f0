"""UniFormerV2-B/16 (Kinetics and SSv2 configurations): ours against the official forward written plainly
(``nn.MultiheadAttention`` in the LND layout, as the official code; the re-derivation in
tests/reference_uniformerv2.py, on the same weights) and against VideoMAE V2 ViT-B, on the same clips of the real sample videos.

For each configuration x frames x batch x mode (``forward``: inference under no_grad in eval mode; ``train``:
forward + cross-entropy + backward in train mode, drop path 0), the three models run back to back in each round, so
load changes on a shared machine hit all of them. Reported: median time, clips/s, peak memory of one call counted by
the allocator above the level before it (gradients of an earlier step freed first; CUDA: max allocated; CPU: the
running total of the profiler's memory events, which RSS growth only approximates), and our speed-up over the
official forward.

The default run is sized for a 2-core CPU (batch 1, 8 frames, 2 rounds; about 3 minutes); on CUDA the default is the
full matrix (8 and 16 frames, batch 1 and 8). ``VIDFAST_NVTX=1`` adds the models' NVTX ranges for nsys.

    python -m bench.uniformerv2 [--configs kinetics ssv2] [--frames 8 16] [--batch 1 8] [--modes forward train]
                                [--repeats 2] [--size 224] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import cpu_allocations, markdown_table, write_json
from bench.model import load_batch
from pyvidfast import samples
from pyvidfast.models import create_model
from pyvidfast.models.layers import normalize_video


def load_reference():
    """tests/reference_uniformerv2.py, loaded by its path (tests/ is no package)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "reference_uniformerv2.py"
    spec = importlib.util.spec_from_file_location("reference_uniformerv2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RefUniFormerV2 = load_reference().RefUniFormerV2
CONFIGS = {"kinetics": "uniformerv2_base_patch16_224", "ssv2": "uniformerv2_base_patch16_224_ssv2"}


def official_model(ours) -> RefUniFormerV2:
    """The plain official forward with our model's weights (B/16 layout of the chosen configuration)."""
    t = ours.transformer
    ref = RefUniFormerV2(ours.img_size, ours.patch_size, ours.width, len(t.resblocks),
                         t.resblocks[0].attn.num_heads, ours.temporal_stride == 2,
                         t.resblocks[0].lmhra1 is None, t.return_list, ours.num_classes)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref


def make_step(model, x, labels, mode, dtype):
    autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32)
    if mode == "forward":
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                return model(x)
    else:
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(model(x).float(), labels)
            loss.backward()
    return step


def allocator_peak(model, step, device: torch.device) -> int:
    """Peak bytes the allocator holds during ``step()`` above the level before it (the model's gradients freed
    first, so a training step counts its activations and new gradients)."""
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    totals, _ = cpu_allocations(step)
    return max(total for _, total in totals)


def run_case(models, x, labels, mode, dtype, repeats, sync):
    steps = {name: make_step(m, x, labels, mode, dtype) for name, m in models.items()}
    peaks = {}
    for name, step in steps.items():  # warm-up, then one call under the memory probe
        step()
        peaks[name] = allocator_peak(models[name], step, x.device)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "peak_bytes": peaks[name]} for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--frames", nargs="+", type=int)
    parser.add_argument("--batch", nargs="+", type=int)
    parser.add_argument("--modes", nargs="+", default=["forward", "train"], choices=["forward", "train"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-videomae", action="store_true", help="skip the VideoMAE V2 ViT-B comparison")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    on_cuda = device.type == "cuda"
    frames_list = args.frames or ([8, 16] if on_cuda else [8])
    batches = args.batch or ([1, 8] if on_cuda else [1])
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    clip_name = sorted(samples.CLIPS)[0]

    rows, results = [], []
    for config in args.configs:
        torch.manual_seed(0)
        # The size is fixed by the position embedding; a smaller --size builds the same model at that size.
        ours = create_model(CONFIGS[config], img_size=args.size, backbone_drop_path_rate=0.0,
                            drop_path_rate=0.0).to(device)
        for frames in frames_list:
            models = {"ours": ours, "official": official_model(ours).to(device)}
            if not args.no_videomae:
                models["VideoMAE V2 ViT-B"] = create_model("videomae_vit_base_patch16_224", img_size=args.size,
                                                           num_frames=frames).to(device)
            for batch in batches:
                video = load_batch(clip_name, batch, frames, stride=4, gap=8, size=args.size)
                cfg = ours.data_config
                x = normalize_video(video, cfg.mean, cfg.std).to(device)
                labels = torch.randint(0, ours.num_classes, (batch,), device=device)
                for mode in args.modes:
                    case = run_case(models, x, labels, mode, dtype, args.repeats, sync)
                    base = case["official"]["median_s"]
                    for name, r in case.items():
                        speedup = base / r["median_s"]
                        rows.append([config, frames, batch, mode, name, f"{r['median_s'] * 1e3:.0f}",
                                     batch / r["median_s"], f"{r['peak_bytes'] / 2**20:.0f}", f"{speedup:.2f}"])
                        results.append({"config": config, "frames": frames, "batch": batch, "mode": mode,
                                        "model": name, **r, "clips_per_s": batch / r["median_s"],
                                        "speedup_vs_official": speedup})
                        print(rows[-1], flush=True)
    table = markdown_table(["config", "frames", "batch", "mode", "model", "ms", "clips/s", "peak MiB",
                            "x official"], rows)
    path = write_json("uniformerv2", {"table": table, "results": results, "args": vars(args)})
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
