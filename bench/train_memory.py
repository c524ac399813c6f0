"""Memory and step time of training at scale: activation checkpointing (AC) against none, and DDP against FSDP2 at
2 processes, for a ViT-L-shaped (or ViT-g-shaped) model through the training loop's own task, units and step, on
the real sample clips.

1. Activation checkpointing, one process. The fine-tuning task is built from the command line
   (``pyvidfast.train`` ``finetune``) with the real width, heads and MLP of the family and ``--depth`` layers, once
   plain and once with ``checkpoint_activations`` (the loop's ``--activation-checkpointing``: every block under
   ``torch.utils.checkpoint``). Activation memory is counted by the allocator: on the CPU the memory events of
   ``torch.profiler`` (``profile_memory=True``; every tensor allocation and free of ATen's CPU allocator, with the
   running total), on CUDA ``torch.cuda.memory_allocated``. ``saved_mb``: bytes allocated by the forward and still
   alive at its end (what autograd keeps for the backward, the block inputs a checkpoint keeps, the loss);
   ``peak_mb``: the most allocated over forward and backward above the level before the step (gradients included,
   ``grad_mb`` of them). Step time: the loop's ``train_step`` (forward, backward, AdamW), the two variants
   alternating over ``--rounds`` rounds after a warm-up step each; medians, and the median of per-round ratios.
2. DDP against FSDP2 at ``--nproc`` processes (``torchrun --standalone``; gloo on the CPU, NCCL on GPUs) through
   the whole loop (``python -m pyvidfast.train finetune``): ``state_mb`` (a rank's parameters, gradients and AdamW
   states, its shards under FSDP2: what FSDP2 divides), ``max_memory_mb`` (CPU: the rank's peak resident set over
   the run, a lifetime peak that includes building the whole model before sharding; CUDA: the step's peak
   allocated) and the median step time after the first. ``--skip-ranks`` leaves this part out.

Targets (issue 15): FSDP2 at 2 ranks holds <= 0.6x DDP's per-rank state; AC cuts activation memory (``saved_mb``)
>= 3x at <= 1.4x step time. With AC a block keeps only its input (one of the ~16 tensors of that size it keeps
without), so the saved ratio hardly depends on the depth; the step peak also holds the gradients and transients
outside the blocks, which AC does not touch: at 784 tokens a ViT-L block's activations (49 MiB) weigh as much as its
gradients (50 MiB), so the backward frees as much as it allocates and the peak stays where the gradients put it;
with ``--frames 16`` (1568 tokens) the activations dominate and the peak falls too. The defaults (ViT-L width, 4 layers,
1 clip of 8 x 224^2 = 784 tokens per rank) take a few minutes on 2 cores. Step times on a shared machine are
noisy: compare within one run; figures come from a quiet machine.

    python -m bench.train_memory [--model videomae_vit_large_patch16_224] [--depth 4] [--frames 8] [--size 224]
                                 [--batch 1] [--rounds 5] [--nproc 2] [--steps 3] [--skip-ranks] [--device cpu|cuda]
"""

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import record_function

from bench.common import cpu_allocations, markdown_table, write_json
from bench.train import run_training, sample_list
from pyvidfast import samples
from pyvidfast.train.__main__ import parse_args
from pyvidfast.train.data import collate
from pyvidfast.train.distributed import checkpoint_activations
from pyvidfast.train.loop import train_step
from pyvidfast.train.tasks import get_task

MIB = 2**20
RANK_CONFIGS = {"DDP": [], "FSDP2": ["--fsdp"], "FSDP2 + AC": ["--fsdp", "--activation-checkpointing"]}


def activation_memory(objective, batch, device: torch.device) -> dict:
    """Allocator bytes of one forward and backward of ``objective(batch)`` (its gradients cleared first):
    ``saved_mb`` alive at the end of the forward, ``peak_mb`` at most over forward and backward, both above the
    level before, and ``grad_mb`` (the gradients the backward allocates, part of the peak)."""
    parameters = [p for p in objective.parameters() if p.requires_grad]
    objective.zero_grad(set_to_none=True)

    def forward_backward():
        with record_function("forward"):
            loss, _ = objective(batch)
        loss.backward()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        loss, _ = objective(batch)
        saved = torch.cuda.memory_allocated(device) - before
        loss.backward()
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        totals, forward_end = cpu_allocations(forward_backward)
        saved = next((total for ts, total in reversed(totals) if ts <= forward_end), 0)
        peak = max(total for _, total in totals)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in parameters if p.grad is not None)
    objective.zero_grad(set_to_none=True)
    return {"saved_mb": saved / MIB, "peak_mb": peak / MIB, "grad_mb": grads / MIB}


def finetune_task(model: str, kwargs: dict, listing: Path, device: torch.device):
    """The ``finetune`` task of the command line (as the loop builds it), on ``device``, in training mode."""
    args = parse_args(["finetune", "--list", str(listing), "--out", "unused", "--steps", "1", "--model", model,
                       "--model-kwargs", json.dumps(kwargs), "--lr", "1e-4"])
    return get_task("finetune").build(args).to(device).train()


def checkpointing_comparison(task, batch, rounds: int, device: torch.device) -> dict:
    """``task`` plain against a copy with every unit checkpointed: activation memory and step time (see the module
    docstring)."""
    variants = {"no AC": task, "AC": copy.deepcopy(task)}
    units = checkpoint_activations(variants["AC"].model)
    optimizers = {name: torch.optim.AdamW(t.parameters(), lr=1e-4) for name, t in variants.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(name: str) -> float:
        sync()
        began = time.perf_counter()
        train_step(variants[name], variants[name].model, batch, optimizers[name])
        sync()
        return time.perf_counter() - began

    for name in variants:  # warm-up: first-call costs and AdamW's states
        step(name)
    memory = {name: activation_memory(t, batch, device) for name, t in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(rounds):
        for name in (list(variants) if round_ % 2 == 0 else list(variants)[::-1]):
            times[name].append(step(name))
    results = {name: {**memory[name], "step_s": statistics.median(times[name]), "step_times_s": times[name]}
               for name in variants}
    ratios = {"saved_no_ac_over_ac": memory["no AC"]["saved_mb"] / memory["AC"]["saved_mb"],
              "peak_no_ac_over_ac": memory["no AC"]["peak_mb"] / memory["AC"]["peak_mb"],
              "step_time_ac_over_no_ac": statistics.median(a / b for a, b in zip(times["AC"], times["no AC"]))}
    return {"units": units, "results": results, "ratios": ratios}


def rank_comparison(args, kwargs: dict, listing: Path, folder: Path) -> dict:
    results = {}
    for name, flags in RANK_CONFIGS.items():
        out = folder / name.replace(" + ", "_")
        argv = ["finetune", "--list", str(listing), "--out", str(out), "--model", args.model, "--model-kwargs",
                json.dumps(kwargs), "--steps", str(args.steps), "--batch-size", str(args.batch * args.nproc),
                "--workers", "0", "--device", args.device, "--quiet", "--save-every", "1000000", *flags]
        records = run_training(argv, nproc=args.nproc)
        steady = records[1:] or records
        results[name] = {"state_mb": records[-1]["state_mb"], "max_memory_mb": records[-1]["max_memory_mb"],
                         "step_s": statistics.median(r["step_s"] for r in steady)}
        print(name, results[name], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="videomae_vit_large_patch16_224",
                        help="a VideoMAE V2 fine-tuning model (its width, heads and MLP; e.g. "
                             "videomae_vit_giant_patch14_224)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1, help="clips per rank")
    parser.add_argument("--rounds", type=int, default=5, help="AC: timed steps of each variant, alternating")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="DDP / FSDP2: steps of each run")
    parser.add_argument("--skip-ranks", action="store_true", help="only the activation checkpointing comparison")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    kwargs = {"num_frames": args.frames, "img_size": args.size, "depth": args.depth,
              "num_classes": len(samples.CLIPS)}
    with tempfile.TemporaryDirectory() as tmp:
        listing = sample_list(Path(tmp))
        torch.manual_seed(0)
        task = finetune_task(args.model, kwargs, listing, device)
        batch = collate([task.dataset[(i, 1000 + i)] for i in range(args.batch)]).to(device)
        tokens = task.model.patch_embed.num_patches
        ac = checkpointing_comparison(task, batch, args.rounds, device)
        del task
        print(json.dumps(ac["ratios"], indent=1), flush=True)
        ranks = {} if args.skip_ranks else rank_comparison(args, kwargs, listing, Path(tmp))
    ratios = dict(ac["ratios"])
    if ranks:
        ratios["fsdp_state_over_ddp"] = ranks["FSDP2"]["state_mb"] / ranks["DDP"]["state_mb"]
        ratios["fsdp_step_time_ac_over_no_ac"] = ranks["FSDP2 + AC"]["step_s"] / ranks["FSDP2"]["step_s"]
    ac_rows = [[name, r["saved_mb"], r["saved_mb"] / ac["units"], r["peak_mb"], r["grad_mb"], r["step_s"]]
               for name, r in ac["results"].items()]
    table = (f"Activation checkpointing, 1 process, {args.batch} clip(s) of {tokens} tokens, {args.model} width "
             f"with {args.depth} layers:\n\n"
             + markdown_table(["variant", "saved at end of forward MiB", "saved MiB / layer", "step peak MiB",
                               "of which gradients MiB", "step s"], ac_rows)
             + f"\n\nAC saves {ratios['saved_no_ac_over_ac']:.2f}x the activation memory (step peak "
               f"{ratios['peak_no_ac_over_ac']:.2f}x) at {ratios['step_time_ac_over_no_ac']:.2f}x the step time "
               f"(target >= 3x at <= 1.4x).")
    if ranks:
        table += (f"\n\n{args.nproc} processes ({args.batch} clip(s) per rank):\n\n"
                  + markdown_table(["engine", "state MiB / rank", "peak MiB / rank", "step s"],
                                   [[name, r["state_mb"], r["max_memory_mb"], r["step_s"]]
                                    for name, r in ranks.items()])
                  + f"\n\nFSDP2 holds {ratios['fsdp_state_over_ddp']:.2f}x DDP's per-rank state (target <= 0.6x).")
    print(table)
    path = write_json("train_memory", {"config": vars(args), "tokens_per_clip": tokens, "activation_checkpointing": ac,
                                       "ranks": ranks, "ratios": ratios, "table": table})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
