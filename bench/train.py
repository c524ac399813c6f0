"""Training throughput through the real loop (``python -m pyvidfast.train``), loading included: VideoMAE V2 ViT-B
fine-tuning on the sample clips, dense against ``--rlt``, and FluxViT-B fine-tuning (``finetune --flux``) at each
token budget.

Each variant is a training run of ``--steps`` steps with ``--workers`` loader processes; from its
``metrics.jsonl`` (steps after the first, which warms up): clips/s end to end (clips / (time waiting for the loader
+ step time)) and clips/s of the model step alone (clips / step time). End to end well below the step alone means
the data pipeline starves the model. The variants alternate over ``--rounds`` rounds, so load changes on a shared
machine hit all of them; the RLT speed-up is the median of the per-round ratios. Step times on a shared machine are
noisy: compare within one run, and rerun on a quiet machine for figures.

FluxViT-B: clips of ``--flux-frames`` x ``--flux-size``^2 (patch 14, no tubelet: frames x (size / 14)^2 tokens;
flexi-sampling pinned to that one setting), one run per budget b of ``--flux-budgets``: the official multi-budget
step (``multi_budget_loss``) with every head at b, so the step costs three passes of b tokens. The default budgets
are the family's ``HEAD_BUDGETS`` (3072, 2048, 1024), scaled down in proportion when the clip holds fewer tokens
than the largest one (the CPU default: 8 x 56^2 = 128 tokens -> 128, 85, 42, so a step of the largest budget holds
384 tokens a clip against dense ViT-B's 196).

The default is sized for a 2-core CPU (8 frames at 112 px, batch 4, 5 steps, 2 rounds; ``--steps 3 --rounds 1`` is a
quick check); on a GPU give the published shape: ``--frames 16 --size 224 --batch 32 --flux-frames 16
--flux-size 224``.

    python -m bench.train [--frames 8] [--size 112] [--batch 4] [--steps 5] [--rounds 2] [--workers 2]
                          [--flux-frames 8] [--flux-size 56] [--flux-budgets B ...] [--no-flux] [--device cpu|cuda]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import markdown_table, write_json
from pyvidfast import samples
from pyvidfast.models.fluxvit import HEAD_BUDGETS
from pyvidfast.train.loop import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def sample_list(folder: Path, repeat: int = 8) -> Path:
    """A list file of the real sample clips (label = place in name order), each listed ``repeat`` times."""
    lines = [f"{samples.sample_path(name)} {label}" for label, name in enumerate(sorted(samples.CLIPS))]
    path = folder / "list.txt"
    path.write_text("\n".join(lines * repeat) + "\n")
    return path


def run_training(argv: list[str], nproc: int = 1, threads: int | None = None) -> list[dict]:
    """``python -m pyvidfast.train argv`` (``torchrun --standalone`` for nproc > 1) in a fresh process; its
    ``metrics.jsonl`` records. ``threads``: OMP_NUM_THREADS of each process (default: cores / nproc)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, *launcher, "-m", "pyvidfast.train", *argv], env=env, cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"training run failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return read_metrics(argv[argv.index("--out") + 1])


def throughput(records: list[dict]) -> dict:
    """Medians over the steps after the first: clips/s end to end and of the step alone, data wait, step time."""
    steady = records[1:] or records
    clips = [r["clips_per_s"] * r["step_s"] for r in steady]
    return {"end_to_end_clips_per_s": statistics.median(c / (r["step_s"] + r["data_s"]) for c, r in zip(clips, steady)),
            "step_clips_per_s": statistics.median(r["clips_per_s"] for r in steady),
            "step_s": statistics.median(r["step_s"] for r in steady),
            "data_s": statistics.median(r["data_s"] for r in steady),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
            "max_memory_mb": steady[-1]["max_memory_mb"], "steps": len(steady)}


def flux_budgets(frames: int, size: int, budgets: list[int] | None) -> list[int]:
    """``budgets``, or HEAD_BUDGETS scaled down in proportion when a clip holds fewer tokens than the largest."""
    if budgets:
        return budgets
    scale = min(1.0, frames * (size // 14) ** 2 / HEAD_BUDGETS[0])
    return [int(b * scale) for b in HEAD_BUDGETS]


def variant_argv(variant: str, args, listing: Path, out: Path) -> list[str]:
    """The command line of one variant: ``dense``, ``rlt`` (VideoMAE V2) or ``flux-B`` (FluxViT, budget B)."""
    common = ["--list", str(listing), "--out", str(out), "--steps", str(args.steps), "--batch-size", str(args.batch),
              "--workers", str(args.workers), "--device", args.device, "--quiet", "--save-every", "1000000"]
    if variant.startswith("flux-"):
        kwargs = {"num_frames": args.flux_frames, "img_size": args.flux_size, "num_classes": len(samples.CLIPS)}
        budget = variant.split("-")[1]
        return ["finetune", "--flux", *common, "--model", args.flux_model, "--model-kwargs", json.dumps(kwargs),
                "--flexi-frames", str(args.flux_frames), "--flexi-resolutions", str(args.flux_size),
                "--min-tokens", "0", "--max-tokens", str(10**9), "--budgets", budget, budget, budget]
    kwargs = {"num_frames": args.frames, "img_size": args.size, "num_classes": len(samples.CLIPS)}
    return ["finetune", *common, "--model", args.model, "--model-kwargs", json.dumps(kwargs),
            *(["--rlt"] if variant == "rlt" else [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="videomae_vit_base_patch16_224")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--flux-model", default="fluxvit_base_patch14")
    parser.add_argument("--flux-frames", type=int, default=8)
    parser.add_argument("--flux-size", type=int, default=56)
    parser.add_argument("--flux-budgets", type=int, nargs="+", default=None,
                        help="default: HEAD_BUDGETS, scaled to the clip's tokens when it holds fewer")
    parser.add_argument("--no-flux", action="store_true", help="only VideoMAE V2 dense and --rlt")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    args.flux_budgets = [] if args.no_flux else flux_budgets(args.flux_frames, args.flux_size, args.flux_budgets)
    runs: dict[str, list[dict]] = {"dense": [], "rlt": [], **{f"flux-{b}": [] for b in args.flux_budgets}}
    with tempfile.TemporaryDirectory() as tmp:
        listing = sample_list(Path(tmp))
        for round_ in range(args.rounds):
            for variant in runs:
                argv = variant_argv(variant, args, listing, Path(tmp) / f"{variant}{round_}")
                runs[variant].append(throughput(run_training(argv)))
                print(variant, round_, runs[variant][-1], flush=True)
    summary = {variant: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
               for variant, rounds in runs.items()}
    speedup = statistics.median(r["end_to_end_clips_per_s"] / d["end_to_end_clips_per_s"]
                                for r, d in zip(runs["rlt"], runs["dense"]))
    step_speedup = statistics.median(r["step_clips_per_s"] / d["step_clips_per_s"]
                                     for r, d in zip(runs["rlt"], runs["dense"]))
    names = {"dense": f"VideoMAE V2 ViT-B dense, {args.frames} x {args.size}^2",
             "rlt": f"VideoMAE V2 ViT-B --rlt, {args.frames} x {args.size}^2",
             **{f"flux-{b}": f"FluxViT-B budget {b} (3 heads), {args.flux_frames} x {args.flux_size}^2"
                for b in args.flux_budgets}}
    rows = [[names[variant], s["end_to_end_clips_per_s"], s["step_clips_per_s"],
             s["end_to_end_clips_per_s"] / s["step_clips_per_s"], s["data_s"], s["step_s"], s["max_memory_mb"]]
            for variant, s in summary.items()]
    table = (markdown_table(["variant", "clips/s end to end", "clips/s step alone", "end to end / step",
                             "data wait s", "step s", "peak RSS MiB"], rows)
             + f"\n\nBatch {args.batch}, {args.workers} loader workers. RLT / dense clips/s: end to end "
               f"{speedup:.2f}x, step alone {step_speedup:.2f}x (target >= 1.3x).")
    print(table)
    path = write_json("train", {"config": vars(args), "runs": runs, "summary": summary,
                                "rlt_speedup_end_to_end": speedup, "rlt_speedup_step": step_speedup, "table": table})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
