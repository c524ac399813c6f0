"""The training loop shared by every task (``pretrain``, ``finetune``, ``finetune --flux``, ``distill``).

The loop knows nothing of any task: it builds the task by name (:mod:`pyvidfast.train.tasks`), trains
``task.model`` on ``task(batch) -> (loss, metrics)`` and checkpoints it. Single process or ``torchrun`` (DDP: gloo
on CPU, NCCL on GPU). Checkpoints hold model, optimizer, scheduler, step and every rank's RNG states and are written
atomically (temporary file, then rename); ``--resume`` restores them and the step sampler replays the same batches,
so the loss sequence continues as if never interrupted.
"""

import contextlib
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from pyvidfast.train.data import Batch, StepSampler, collate
from pyvidfast.train.optim import make_optimizer, make_scheduler
from pyvidfast.train.recipe import apply_recipe, describe
from pyvidfast.train.tasks import get_task

CHECKPOINT_NAME = "checkpoint.pth"
SETTINGS_NAME = "settings.json"  # the recipe settings the run used and where each came from


# ----------------------------------------------------------------------------------------------------------------
# Processes and devices


class Context:
    """Rank, world size and device of this process; initialises the process group under torchrun."""

    def __init__(self, device: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> float:
        """Mean of a scalar over ranks."""
        value = value.detach().float().reshape(1).to(self.device)
        if self.world > 1:
            dist.all_reduce(value)
            value /= self.world
        return float(value)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        values = values.to(self.device)
        if self.world > 1:
            dist.all_reduce(values)
        return values

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as tensors and plain values, so checkpoints load with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and metrics


def save_checkpoint(path: Path, ctx: Context, model, optimizer, scheduler, step: int, args: dict) -> None:
    """Every rank contributes its RNG state; rank 0 writes a temporary file and renames it over ``path``.
    ``model`` is the task's trained module (not its DDP wrapper)."""
    states = [None] * ctx.world
    if ctx.world > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if ctx.main:
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "step": step, "rng": states, "args": args}
        partial = path.with_name(path.name + ".tmp")
        torch.save(payload, partial)
        os.replace(partial, path)  # atomic on POSIX: readers see the old or the new checkpoint, never half of one
    if ctx.world > 1:
        dist.barrier()


def load_checkpoint(path: Path, ctx: Context, model, optimizer, scheduler) -> int:
    """Restores a training checkpoint; returns the number of steps already done."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    states = payload["rng"]
    if len(states) != ctx.world:
        raise ValueError(f"resume: the checkpoint was written by {len(states)} ranks; this run has {ctx.world}")
    set_rng_state(states[ctx.rank])
    return int(payload["step"])


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


def train_step(objective, model: torch.nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, bf16: bool = False,
               clip_grad: float = 0.0) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """One optimizer step of ``objective`` (a task, or its DDP wrapper) on ``batch``, under bfloat16 autocast
    with ``bf16``, the gradient norm of ``model`` clipped to ``clip_grad`` (0: not clipped). Returns the loss, the
    task's metrics and the gradient norm before clipping."""
    with autocast(batch.video.device, bf16):
        loss, info = objective(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad if clip_grad > 0 else float("inf"))
    optimizer.step()
    return loss, info, grad_norm


def train(args, task_name: str) -> list[float]:
    """Runs task ``task_name`` (a key of :data:`pyvidfast.train.tasks.TASKS`) to ``args.steps`` (or
    ``args.stop_at``); returns this run's losses."""
    ctx = Context(args.device)
    out = Path(args.out)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
    settings = apply_recipe(args)
    if ctx.main:
        print(describe(settings), flush=True)
        (out / SETTINGS_NAME).write_text(json.dumps(settings, indent=1))
    seed_everything(args.seed + ctx.rank)
    task = get_task(task_name).build(args).to(ctx.device)
    optimizer = make_optimizer(task.model, args.lr, args.weight_decay, getattr(args, "layer_decay", 1.0),
                               betas=tuple(args.betas))
    scheduler = make_scheduler(optimizer, args.warmup_steps, args.steps, args.lr, args.min_lr)
    start = 0
    resume = out / CHECKPOINT_NAME if args.resume == "auto" else (Path(args.resume) if args.resume else None)
    if resume is not None and resume.exists():
        start = load_checkpoint(resume, ctx, task.model, optimizer, scheduler)
    elif args.resume and args.resume != "auto":
        raise FileNotFoundError(f"resume: no checkpoint at {resume}")
    objective = task
    if ctx.world > 1:
        objective = torch.nn.parallel.DistributedDataParallel(
            task, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=task.find_unused_parameters)

    stop = min(args.stop_at or args.steps, args.steps)
    # A task may choose its batches (Video-XL: grouped by window count) and keep samples of different lengths apart.
    make_sampler = getattr(task, "batch_sampler", None)
    sampler = (make_sampler(args.batch_size, ctx.rank, ctx.world, args.seed, start, stop) if make_sampler else
               StepSampler(len(task.dataset), args.batch_size, ctx.rank, ctx.world, args.seed, start, stop))
    # A dedicated generator: the loader must not draw from the global RNG, which the checkpoint restores.
    loader = DataLoader(task.dataset, batch_sampler=sampler, collate_fn=getattr(task, "collate", collate),
                        num_workers=args.workers,
                        generator=torch.Generator().manual_seed(args.seed), persistent_workers=False)
    metrics = MetricsLog(out, ctx.main)
    losses = []
    objective.train()
    progress = tqdm(total=args.steps, initial=start, disable=not ctx.main or args.quiet, desc=task_name, unit="step")
    step = start
    for batch in loader:
        began = time.perf_counter()
        lr = optimizer.param_groups[-1]["lr"]
        loss, info, grad_norm = train_step(objective, task.model, batch.to(ctx.device), optimizer, args.bf16,
                                           args.clip_grad)
        scheduler.step()
        step += 1
        value = ctx.mean(loss)
        losses.append(value)
        metrics.log({"step": step, "loss": value, "lr": lr, "grad_norm": float(grad_norm),
                     "step_s": time.perf_counter() - began, **info})
        progress.update(1)
        progress.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
        if step % args.save_every == 0 or step == stop:
            save_checkpoint(out / CHECKPOINT_NAME, ctx, task.model, optimizer, scheduler, step, vars(args))
    progress.close()
    metrics.close()
    ctx.close()
    return losses
