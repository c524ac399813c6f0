"""Per-rank memory of training with DDP against FSDP2, with and without activation checkpointing, at 2 processes
(``torchrun --standalone``, gloo on the CPU, NCCL on GPUs) through the real loop on the sample clips.

The model is ViT-L-shaped (VideoMAE V2 ViT-L width 1024, 16 heads, MLP 4096) with few layers (``--depth``), so
the run fits a small machine. From each run's ``metrics.jsonl`` (rank 0): ``state_mb`` (the rank's parameters,
gradients and AdamW states, its shards under FSDP2: what FSDP2 divides), ``max_memory_mb`` (CPU: the rank's peak
resident set over the run, which includes building the whole model before sharding; CUDA: the step's peak
allocated memory) and the median step time over the steps after the first. On the CPU the peak resident set is
a lifetime peak (the whole model built before sharding, the runtime, the state), so it shows activation
checkpointing's saving only when activations dominate (many tokens per rank); on a GPU the per-step CUDA peak does.
Step times on a shared machine are noisy; the configurations run back to back.

Targets (issue 15): FSDP2 at 2 ranks holds <= 0.6x DDP's per-rank state; activation checkpointing cuts activation
memory >= 3x at <= 1.4x step time.

    python -m bench.train_memory [--depth 4] [--frames 8] [--size 224] [--steps 3] [--device cpu|cuda]
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench.common import markdown_table, write_json
from bench.train import run_training, sample_list
from pyvidfast import samples

CONFIGS = {"DDP": [], "DDP + AC": ["--activation-checkpointing"], "FSDP2": ["--fsdp"],
           "FSDP2 + AC": ["--fsdp", "--activation-checkpointing"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2, help="global batch (1 clip per rank at 2 ranks)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    kwargs = json.dumps({"num_frames": args.frames, "img_size": args.size, "depth": args.depth,
                         "num_classes": len(samples.CLIPS)})
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        listing = sample_list(Path(tmp))
        for name, flags in CONFIGS.items():
            out = Path(tmp) / name.replace(" + ", "_")
            argv = ["finetune", "--list", str(listing), "--out", str(out), "--model", "videomae_vit_large_patch16_224",
                    "--model-kwargs", kwargs, "--steps", str(args.steps), "--batch-size", str(args.batch),
                    "--workers", "0", "--device", args.device, "--quiet", "--save-every", "1000000", *flags]
            records = run_training(argv, nproc=args.nproc)
            steady = records[1:] or records
            results[name] = {"state_mb": records[-1]["state_mb"], "max_memory_mb": records[-1]["max_memory_mb"],
                             "step_s": statistics.median(r["step_s"] for r in steady)}
            print(name, results[name], flush=True)
    ddp, fsdp = results["DDP"], results["FSDP2"]
    ratios = {"fsdp_state_over_ddp": fsdp["state_mb"] / ddp["state_mb"],
              "ac_peak_over_no_ac_ddp": results["DDP + AC"]["max_memory_mb"] / ddp["max_memory_mb"],
              "ac_step_time_over_no_ac_ddp": results["DDP + AC"]["step_s"] / ddp["step_s"],
              "ac_step_time_over_no_ac_fsdp": results["FSDP2 + AC"]["step_s"] / fsdp["step_s"]}
    print(markdown_table(["engine", "state MiB / rank", "peak MiB / rank", "step s"],
                         [[name, r["state_mb"], r["max_memory_mb"], r["step_s"]] for name, r in results.items()]))
    print(json.dumps(ratios, indent=1))
    path = write_json("train_memory", {"config": vars(args), "results": results, "ratios": ratios,
                                       "note": "rank 0 of 2; step times on a shared machine are noisy"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
