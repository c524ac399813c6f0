"""The training loop shared by every task (``pretrain``, ``finetune``, ``finetune --flux``, ``distill``, and any
task file's).

The loop knows nothing of any task: it builds the task by name (:mod:`pyvidfast.train.tasks`), trains
``task.model`` on ``task(batch) -> (loss, metrics)`` and checkpoints it. Single process or ``torchrun``: DDP by
default, FSDP2 with ``--fsdp`` (gloo on CPU, NCCL on GPU; :mod:`pyvidfast.train.distributed`), activation
checkpointing with ``--activation-checkpointing``, ``--accum-steps`` micro-batches per optimizer step.
Checkpoints (:mod:`pyvidfast.train.checkpoint`) hold model, optimizer, scheduler, step and every rank's RNG states
and are written atomically; ``--resume`` restores them and the step sampler replays the same batches, so the loss
sequence continues as if never interrupted. SIGTERM (a scheduler's pre-emption, torchrun stopping its workers)
ends the step in progress, saves and exits cleanly.
"""

import contextlib
import json
import random
import resource
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pyvidfast.train.checkpoint import (CHECKPOINT_NAME, is_sharded, load_checkpoint, resume_path, save_checkpoint,
                                        state_bytes)
from pyvidfast.train.data import Batch, StepSampler, TrainingClips, collate
from pyvidfast.train.distributed import Context, checkpoint_activations, full_value, shard
from pyvidfast.train.optim import make_optimizer, make_scheduler
from pyvidfast.train.recipe import apply_recipe, describe
from pyvidfast.train.tasks import get_task

__all__ = ["CHECKPOINT_NAME", "Context", "autocast", "read_metrics", "train", "train_step"]

SETTINGS_NAME = "settings.json"  # the recipe settings the run used and where each came from


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Metrics


class MetricsLog:
    """JSON lines in ``out/metrics.jsonl`` (appended on resume), and TensorBoard scalars when it is installed."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.file = open(out / "metrics.jsonl", "a") if enabled else None
        self.board = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.board is not None:
            self.board.close()


def read_metrics(out: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# Training


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def gradient_sync(objective, enabled: bool):
    """Context of one micro-batch's backward: gradients are reduced over ranks only when ``enabled`` (the last
    micro-batch of a step); before that each rank accumulates locally (DDP ``no_sync``, FSDP2
    ``set_requires_gradient_sync``)."""
    if hasattr(objective, "set_requires_gradient_sync"):  # FSDP2
        objective.set_requires_gradient_sync(enabled)
    elif hasattr(objective, "no_sync") and not enabled:  # DDP
        return objective.no_sync()
    return contextlib.nullcontext()


def train_step(objective, model: torch.nn.Module, batches: Batch | list[Batch], optimizer: torch.optim.Optimizer,
               bf16: bool = False, clip_grad: float = 0.0) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """One optimizer step of ``objective`` (a task, or its DDP/FSDP2 form) on one batch or on a list of equal
    micro-batches whose gradients accumulate (each loss weighted 1 / len(batches), so the step equals one on their
    union for a loss that is a mean over samples), under bfloat16 autocast with ``bf16``, the gradient norm of
    ``model`` clipped to ``clip_grad`` (0: not clipped). Returns the mean loss, the first micro-batch's task
    metrics and the gradient norm before clipping."""
    batches = [batches] if isinstance(batches, Batch) else batches
    optimizer.zero_grad(set_to_none=True)
    losses, info = [], {}
    for i, batch in enumerate(batches):
        with gradient_sync(objective, i == len(batches) - 1):
            with autocast(batch.video.device, bf16):
                loss, metrics = objective(batch)
            (loss / len(batches)).backward()
        losses.append(loss.detach())
        info = info or metrics
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad if clip_grad > 0 else float("inf"))
    optimizer.step()
    return torch.stack(losses).mean(), info, full_value(grad_norm)


class StopRequest:
    """SIGTERM sets it; the loop finishes the step, all ranks agree (in the step's one all-reduce), save, exit.
    Python takes signals in the main thread only: a loop run from another thread keeps the default handling."""

    def __init__(self):
        self.requested = False
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def close(self) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self.previous)


def input_tokens(batch: Batch, model: torch.nn.Module) -> int:
    """Patch tokens of the batch's clips on the model's grid (before any token dropping: RLT, budgets, masks), or
    the batch's own count where it has one (Video-XL: text tokens)."""
    if hasattr(batch, "num_tokens"):
        return batch.num_tokens
    config = getattr(model, "data_config", None) or getattr(getattr(model, "backbone", None), "data_config", None)
    if config is None:
        return 0
    _, _, frames, height, width = batch.video.shape
    return len(batch.seeds) * frames // config.tubelet_size * (height // config.patch_size) * (
        width // config.patch_size)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory allocated since the last call (reset here); CPU: the process's peak resident set."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def state_mb(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """This rank's parameters, gradients and optimizer states (its shards under FSDP2), in MiB."""
    tensors = {f"p{i}": p for i, p in enumerate(model.parameters())}
    tensors.update({f"g{i}": p.grad for i, p in enumerate(model.parameters()) if p.grad is not None})
    return (state_bytes(tensors) + sum(state_bytes(state) for state in optimizer.state.values())) / 2**20


def micro_batches(loader, accum_steps: int):
    """The loader's micro-batches grouped by optimizer step."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == accum_steps:
            yield group
            group = []


def wrap(task, ctx: Context, args):
    """The module the loop calls: the task itself (one process), DDP over it, or the task sharded by FSDP2 (the
    task is FSDP2's root, so whatever of the model a task's forward uses outside the blocks is gathered)."""
    if getattr(args, "activation_checkpointing", False):
        checkpoint_activations(task.model)
    if getattr(args, "fsdp", False):
        shard(task, ctx, args.fsdp_reshard_after_forward, args.fsdp_mp)
        return task
    if ctx.world > 1:
        return torch.nn.parallel.DistributedDataParallel(
            task, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=task.find_unused_parameters)
    return task


def train(args, task_name: str) -> list[float]:
    """Runs task ``task_name`` (a key of :data:`pyvidfast.train.tasks.TASKS`) to ``args.steps`` (or
    ``args.stop_at``, or a SIGTERM); returns this run's losses."""
    fsdp = getattr(args, "fsdp", False)
    accum = getattr(args, "accum_steps", 1)
    out = Path(args.out)
    resume = resume_path(out, args.resume, sharded=fsdp)
    ctx = Context(args.device, distributed=fsdp or (resume is not None and is_sharded(resume)))
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
    settings = apply_recipe(args)
    if ctx.main:
        print(describe(settings), flush=True)
        (out / SETTINGS_NAME).write_text(json.dumps(settings, indent=1))
    seed_everything(args.seed)  # the same initialisation on every rank (FSDP2 shards each rank's own copy)
    task = get_task(task_name).build(args).to(ctx.device)
    seed_everything(args.seed + ctx.rank)  # per-rank draws in training (dropout, drop path)
    if isinstance(task.dataset, TrainingClips):
        task.dataset.on_bad_sample = getattr(args, "on_bad_sample", "fail")
    objective = wrap(task, ctx, args)
    bf16 = args.bf16 or getattr(args, "fsdp_mp", "") == "bf16"  # bf16 parameters: the ops between blocks too
    optimizer = make_optimizer(task.model, args.lr, args.weight_decay, getattr(args, "layer_decay", 1.0),
                               betas=tuple(args.betas))
    scheduler = make_scheduler(optimizer, args.warmup_steps, args.steps, args.lr, args.min_lr)
    start = 0
    if resume is not None:
        start = load_checkpoint(resume, ctx, task.model, optimizer, scheduler)
        if ctx.main:
            print(f"resume: {resume} (step {start})", flush=True)

    stop = min(args.stop_at or args.steps, args.steps)
    # A task may choose its batches (Video-XL: grouped by window count) and keep samples of different lengths apart.
    make_sampler = getattr(task, "batch_sampler", None)
    if make_sampler is not None and accum > 1:
        raise ValueError(f"accum_steps: the {task_name} task draws its own batches (grouped by length) and takes no "
                         f"gradient accumulation yet; got --accum-steps {accum}")
    sampler = (make_sampler(args.batch_size, ctx.rank, ctx.world, args.seed, start, stop) if make_sampler else
               StepSampler(len(task.dataset), args.batch_size, ctx.rank, ctx.world, args.seed, start, stop, accum))
    # A dedicated generator: the loader must not draw from the global RNG, which the checkpoint restores.
    loader = DataLoader(task.dataset, batch_sampler=sampler, collate_fn=getattr(task, "collate", collate),
                        num_workers=args.workers,
                        generator=torch.Generator().manual_seed(args.seed), persistent_workers=False)
    metrics = MetricsLog(out, ctx.main)
    stop_request = StopRequest()
    losses = []
    objective.train()
    progress = tqdm(total=args.steps, initial=start, disable=not ctx.main or args.quiet, desc=task_name, unit="step")
    step, bad_total = start, 0
    waited = time.perf_counter()
    for batches in micro_batches(loader, accum):
        began = time.perf_counter()
        lr = optimizer.param_groups[-1]["lr"]
        batches = [batch.to(ctx.device) for batch in batches]
        loss, info, grad_norm = train_step(objective, task.model, batches, optimizer, bf16, args.clip_grad)
        scheduler.step()
        step += 1
        skipped = [path for batch in batches for path in batch.skipped]
        for path in skipped:
            print(f"rank {ctx.rank} step {step}: skipped a broken video: {path}", file=sys.stderr, flush=True)
        # One all-reduce per step: the loss, the broken samples and whether any rank was asked to stop.
        loss_mean, bad_mean, stop_mean = ctx.means(torch.tensor([float(loss), len(skipped),
                                                                 float(stop_request.requested)])).tolist()
        bad = round(bad_mean * ctx.world)
        bad_total += bad
        losses.append(loss_mean)
        step_s = time.perf_counter() - began
        clips = sum(len(batch.seeds) for batch in batches) * ctx.world
        record = {"step": step, "loss": loss_mean, "lr": lr, "grad_norm": float(grad_norm), "step_s": step_s,
                  "data_s": began - waited, "clips_per_s": clips / step_s,
                  "tokens_per_s": sum(input_tokens(b, task.model) for b in batches) * ctx.world / step_s,
                  "max_memory_mb": peak_memory_mb(ctx.device), "state_mb": state_mb(task.model, optimizer), **info}
        if bad_total:
            record.update(bad_samples=bad, bad_samples_total=bad_total)
        metrics.log(record)
        progress.update(1)
        progress.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{lr:.2e}")
        stopping = stop_mean > 0
        if step % args.save_every == 0 or step == stop or stopping:
            path = save_checkpoint(out, ctx, task.model, optimizer, scheduler, step, vars(args), sharded=fsdp)
            if stopping:
                if ctx.main:
                    print(f"SIGTERM: saved {path} at step {step}; resume with --resume auto", flush=True)
                break
        waited = time.perf_counter()
    stop_request.close()
    progress.close()
    metrics.close()
    ctx.close()
    return losses
